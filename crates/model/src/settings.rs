use crate::{Granularity, InvalidField, ServiceSettings, Validate};
use serde::{Deserialize, Serialize};

/// Cluster-wide settings, stored once so that every node plans with the same ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    pub granularity: Granularity,
    pub gateways_per_location: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// What decides that a gateway is down.
    #[serde(default)]
    pub gateway_health: GatewayHealth,
    /// Where the leader takes pod CIDRs for nodes that register without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr_pool: Option<PodCidrPool>,
    /// How long a node's agent must have been gone before the leader deletes its records.
    #[serde(default = "default_gc_after_seconds")]
    pub gc_after_seconds: u64,
    /// Service CIDRs and node port range; absent (as in records written before Services
    /// existed) means the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServiceSettings>,
}

impl ClusterSettings {
    /// The service settings in force.
    pub fn services(&self) -> ServiceSettings {
        self.services.clone().unwrap_or_default()
    }
}

pub const DEFAULT_GC_AFTER_SECONDS: u64 = 600;

fn default_gc_after_seconds() -> u64 {
    DEFAULT_GC_AFTER_SECONDS
}

/// A cluster CIDR cut into one block per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodCidrPool {
    pub cidr: ipnet::IpNet,
    /// Prefix length of each node's block (e.g. 24 in a /16 pool).
    pub node_prefix: u8,
}

impl Validate for PodCidrPool {
    fn validate(&self) -> Result<(), InvalidField> {
        if self.cidr.trunc() != self.cidr {
            return Err(InvalidField::new(
                "pod_cidr_pool.cidr",
                self.cidr,
                format!("has host bits set; did you mean {}?", self.cidr.trunc()),
            ));
        }
        if self.node_prefix < self.cidr.prefix_len()
            || self.node_prefix > self.cidr.max_prefix_len()
        {
            return Err(InvalidField::new(
                "pod_cidr_pool.node_prefix",
                self.node_prefix,
                format!(
                    "must be {}-{} for {}",
                    self.cidr.prefix_len(),
                    self.cidr.max_prefix_len(),
                    self.cidr
                ),
            ));
        }
        Ok(())
    }
}

/// A pod CIDR the leader gave a node, with the leadership epoch that wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodCidrAllocation {
    pub node: String,
    pub cidr: ipnet::IpNet,
    pub epoch: u64,
}

impl Validate for PodCidrAllocation {
    fn validate(&self) -> Result<(), InvalidField> {
        crate::validate_name("node", &self.node)?;
        if self.cidr.trunc() != self.cidr {
            return Err(InvalidField::new("cidr", self.cidr, "has host bits set"));
        }
        Ok(())
    }
}

/// How gateway failure is judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayHealth {
    /// Measured forwarding: observers' probes through the gateway (the Trellis way).
    #[default]
    Forwarding,
    /// Liveness only: a gateway is down when its agent's lease has expired. What Kilo does;
    /// kept as the baseline the failover benchmark compares against.
    Liveness,
}

impl Validate for ClusterSettings {
    fn validate(&self) -> Result<(), InvalidField> {
        if !(1..=16).contains(&self.gateways_per_location) {
            return Err(InvalidField::new(
                "gateways_per_location",
                self.gateways_per_location,
                "must be 1-16",
            ));
        }
        if let Some(pool) = &self.pod_cidr_pool {
            pool.validate()?;
        }
        if self.gc_after_seconds < 60 {
            return Err(InvalidField::new(
                "gc_after_seconds",
                self.gc_after_seconds,
                "must be at least 60: an agent restarting must not lose its records",
            ));
        }
        if let Some(services) = &self.services {
            services.validate()?;
        }
        Ok(())
    }
}

/// What an agent last did, reported to the store under a lease so that it disappears when
/// the agent does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    /// Store revision of the cluster state the applied plan was computed from.
    pub revision: u64,
    /// Nodes in the topology the plan came from.
    pub nodes: usize,
    pub peers: usize,
    pub routes: usize,
    pub gateway: bool,
    /// Whether the last plan was fully applied and read back.
    pub applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Validate for AgentStatus {
    fn validate(&self) -> Result<(), InvalidField> {
        crate::validate_name("node", &self.node)
    }
}

/// What one observer currently concludes about one gateway candidate, after its own
/// hysteresis. Published when it changes, under the observer's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observation {
    pub gateway: String,
    pub observer: String,
    pub up: bool,
}

impl Validate for Observation {
    fn validate(&self) -> Result<(), InvalidField> {
        crate::validate_name("gateway", &self.gateway)?;
        crate::validate_name("observer", &self.observer)
    }
}

/// What one node concludes about its direct tunnel to another (across locations), after its
/// own hysteresis: whether probes sent straight through that tunnel come back. Published
/// when it changes, under the node's lease. Either end's "down" makes the pair relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathReport {
    pub from: String,
    pub to: String,
    pub up: bool,
}

impl Validate for PathReport {
    fn validate(&self) -> Result<(), InvalidField> {
        crate::validate_name("from", &self.from)?;
        crate::validate_name("to", &self.to)?;
        if self.from == self.to {
            return Err(InvalidField::new(
                "to",
                &self.to,
                "a path joins two different nodes",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_written_before_services_still_decode() {
        let old = br#"{"granularity":"location","gateways_per_location":2,"gc_after_seconds":600}"#;
        let s: ClusterSettings = crate::decode("settings", old).unwrap();
        assert_eq!(s.services, None);
        assert_eq!(s.services().node_port_range().to_string(), "30000-32767");
        assert!(
            !serde_json::to_string(&s).unwrap().contains("services"),
            "an absent section stays absent"
        );
    }

    #[test]
    fn a_bad_services_section_is_refused() {
        let bad = br#"{"granularity":"location","gateways_per_location":2,
            "services":{"cidrs":["10.96.0.1/12"]}}"#;
        let e = crate::decode::<ClusterSettings>("settings", bad).unwrap_err();
        assert_eq!(e.field, "settings: services.cidrs[0]", "{e}");
    }
}
