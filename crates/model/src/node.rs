use crate::{Endpoint, InvalidField, PublicKey, Validate, validate_name};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One machine of the mesh, as its agent publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub location: String,
    /// Address and prefix on the location's internal network; same-location traffic and
    /// the hop to a gateway use it.
    pub internal_ip: IpNet,
    /// Where nodes of other locations can reach this node's WireGuard port. A node
    /// without one is "private": only its own location reaches it directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// WireGuard UDP port, also used with `internal_ip` inside the location.
    pub listen_port: u16,
    /// Absent until the agent has generated its key and published it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PublicKey>,
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub gateway: GatewayPolicy,
    /// The node's own address on the overlay (its WireGuard interface).
    pub overlay_ip: IpAddr,
    /// A second overlay address used only by forwarding probes: observers send from
    /// theirs to a gateway's, which relays them to a node behind it. Routed only between
    /// a gateway and its observers. A node without one neither probes nor is probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_ip: Option<IpAddr>,
    /// Keepalive every peer of this node sends it, in seconds: for a node behind a NAT
    /// whose mapping would expire (Kilo's `persistent-keepalive`); over the cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// Prefixes reachable through this node's location by the location's own network (a
    /// site's LAN, a VPN there): other locations route them to the tunnel that reaches this
    /// node, and its location leaves them to its network (Kilo's `allowed-location-ips`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub location_prefixes: Vec<IpNet>,
}

/// Whether a node may serve as a location gateway, and how much it is preferred when a
/// vacancy is filled (higher first). Priority never displaces a serving gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPolicy {
    pub eligible: bool,
    #[serde(default)]
    pub priority: i32,
}

impl Default for GatewayPolicy {
    fn default() -> Self {
        Self {
            eligible: true,
            priority: 0,
        }
    }
}

impl Node {
    pub fn is_public(&self) -> bool {
        self.endpoint.is_some()
    }

    /// Every prefix that belongs to this node: its overlay address and its pod CIDRs.
    pub fn owned_prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(self.pod_cidrs.len() + 1);
        out.push(IpNet::from(self.overlay_ip));
        out.extend(self.pod_cidrs.iter().copied());
        out
    }

    /// Every prefix no other node may use: the owned ones plus the probe address.
    pub fn claimed_prefixes(&self) -> Vec<IpNet> {
        let mut out = self.owned_prefixes();
        out.extend(self.probe_ip.map(IpNet::from));
        out
    }
}

impl Validate for Node {
    fn validate(&self) -> Result<(), InvalidField> {
        validate_name("name", &self.name)?;
        validate_name("location", &self.location)?;
        if self.listen_port == 0 {
            return Err(InvalidField::new("listen_port", 0, "must be 1-65535"));
        }
        for cidr in &self.pod_cidrs {
            if cidr.trunc() != *cidr {
                return Err(InvalidField::new(
                    "pod_cidrs",
                    cidr,
                    format!("has host bits set; did you mean {}?", cidr.trunc()),
                ));
            }
            if cidr.contains(&self.overlay_ip) {
                return Err(InvalidField::new(
                    "overlay_ip",
                    self.overlay_ip,
                    format!("lies inside pod CIDR {cidr}"),
                ));
            }
        }
        if let Some(probe) = self.probe_ip
            && (probe == self.overlay_ip || self.pod_cidrs.iter().any(|c| c.contains(&probe)))
        {
            return Err(InvalidField::new(
                "probe_ip",
                probe,
                "must differ from the overlay address and lie outside the pod CIDRs",
            ));
        }
        for prefix in &self.location_prefixes {
            if prefix.trunc() != *prefix {
                return Err(InvalidField::new(
                    "location_prefixes",
                    prefix,
                    format!("has host bits set; did you mean {}?", prefix.trunc()),
                ));
            }
            if let Some(own) = self.claimed_prefixes().iter().find(|c| overlaps(c, prefix)) {
                return Err(InvalidField::new(
                    "location_prefixes",
                    prefix,
                    format!("overlaps {own}, the node's own"),
                ));
            }
        }
        if self.persistent_keepalive == Some(0) {
            return Err(InvalidField::new(
                "persistent_keepalive",
                0,
                "must be 1-65535 seconds (omit it for none)",
            ));
        }
        for (i, a) in self.pod_cidrs.iter().enumerate() {
            if let Some(b) = self.pod_cidrs[i + 1..].iter().find(|b| overlaps(a, b)) {
                return Err(InvalidField::new(
                    "pod_cidrs",
                    a,
                    format!("overlaps {b} of the same node"),
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The gateway slots of one location (null: vacant). Kept in the store so that the choice
/// is sticky: a node that becomes eligible later never displaces a gateway while it stays
/// usable, and a replacement takes over the slot, and so exactly the share, of the gateway
/// it replaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySet {
    pub location: String,
    pub slots: Vec<Option<String>>,
}

impl Validate for GatewaySet {
    fn validate(&self) -> Result<(), InvalidField> {
        validate_name("location", &self.location)?;
        for g in self.slots.iter().flatten() {
            validate_name("slots", g)?;
        }
        Ok(())
    }
}

/// Which pairs of nodes hold direct WireGuard tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// Every pair that can reach each other tunnels directly.
    Full,
    /// Only gateways tunnel; a location's other nodes use its internal network.
    #[default]
    Location,
    /// Nodes tunnel directly to nodes of other locations, never inside their own.
    Cross,
    /// Public nodes tunnel directly to each other; private nodes go through gateways.
    Hybrid,
}

impl Granularity {
    pub const ALL: [Granularity; 4] = [Self::Full, Self::Location, Self::Cross, Self::Hybrid];
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Location => "location",
            Self::Cross => "cross",
            Self::Hybrid => "hybrid",
        })
    }
}

impl FromStr for Granularity {
    type Err = InvalidField;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|g| g.to_string() == s)
            .ok_or_else(|| {
                InvalidField::new(
                    "granularity",
                    s,
                    "expected one of full, location, cross, hybrid",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        Node {
            name: "a1".into(),
            location: "site-a".into(),
            internal_ip: "172.20.0.2/24".parse().unwrap(),
            endpoint: Some("198.18.0.2:51820".parse().unwrap()),
            listen_port: 51820,
            public_key: Some(PublicKey([1; 32])),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            gateway: GatewayPolicy::default(),
            overlay_ip: "100.64.0.1".parse().unwrap(),
            probe_ip: Some("100.65.0.1".parse().unwrap()),
            persistent_keepalive: None,
            location_prefixes: Vec::new(),
        }
    }

    #[test]
    fn json_round_trip() {
        let n = node();
        let bytes = serde_json::to_vec(&n).unwrap();
        assert_eq!(crate::decode::<Node>("node a1", &bytes).unwrap(), n);
    }

    #[test]
    fn errors_name_the_record_field_and_value() {
        let mut n = node();
        n.pod_cidrs = vec!["10.244.1.7/24".parse().unwrap()];
        let err = crate::decode::<Node>("node a1", &serde_json::to_vec(&n).unwrap()).unwrap_err();
        assert_eq!(err.field, "node a1: pod_cidrs");
        assert_eq!(err.value, "10.244.1.7/24");

        let mut n = node();
        n.overlay_ip = "10.244.1.9".parse().unwrap();
        assert_eq!(n.validate().unwrap_err().field, "overlay_ip");

        let mut n = node();
        n.probe_ip = Some(n.overlay_ip);
        assert_eq!(n.validate().unwrap_err().field, "probe_ip");
        let mut n = node();
        n.location_prefixes = vec!["10.244.1.0/25".parse().unwrap()];
        assert_eq!(n.validate().unwrap_err().field, "location_prefixes");
        n.location_prefixes = vec!["192.168.1.1/24".parse().unwrap()];
        assert_eq!(n.validate().unwrap_err().field, "location_prefixes");
        n.location_prefixes = vec!["192.168.1.0/24".parse().unwrap()];
        assert!(n.validate().is_ok());
        n.persistent_keepalive = Some(0);
        assert_eq!(n.validate().unwrap_err().field, "persistent_keepalive");

        let mut n = node();
        n.pod_cidrs.push("10.244.0.0/16".parse().unwrap());
        assert!(n.validate().unwrap_err().reason.contains("overlaps"));

        let err = crate::decode::<Node>("node x", br#"{"name":"x","bogus":1}"#).unwrap_err();
        assert!(err.reason.contains("bogus"), "{err}");
    }

    #[test]
    fn granularity_parses_all_and_lists_choices_on_error() {
        for g in Granularity::ALL {
            assert_eq!(g.to_string().parse::<Granularity>().unwrap(), g);
        }
        let err = "mesh".parse::<Granularity>().unwrap_err();
        assert!(err.to_string().contains("full, location, cross, hybrid"));
    }
}
