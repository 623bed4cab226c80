//! `v1 Service`, in the shape `kubectl` accepts and prints, so a Kubernetes backend can pass
//! Services through unchanged. Integers are int32 and addresses strings, as on the wire:
//! a bad value is refused by validation with the value as it was written, not lost in a
//! decode error. The proxy reads them through the typed helpers below, which are sound on
//! validated records.

mod defaults;
mod validate;

use crate::meta::{IntOrString, ObjectMeta, Protocol, nullable};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub const SERVICE_API_VERSION: &str = "v1";
pub const SERVICE_KIND: &str = "Service";
/// The label that hands a Service to another proxy: ours skips it (as kube-proxy does).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// `clusterIP` of a headless Service.
pub const CLUSTER_IP_NONE: &str = "None";
/// Kubernetes' default ClientIP affinity timeout: three hours.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10800;
/// The longest ClientIP affinity timeout the API server accepts: one day.
pub const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86400;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: ServiceSpec,
    #[serde(default, deserialize_with = "nullable")]
    pub status: ServiceStatus,
}

fn api_version() -> String {
    SERVICE_API_VERSION.to_string()
}
fn kind() -> String {
    SERVICE_KIND.to_string()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub type_: ServiceType,
    #[serde(rename = "clusterIP", default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(
        rename = "clusterIPs",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cluster_ips: Vec<String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_families: Vec<IpFamily>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<IpFamilyPolicy>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<ServicePort>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub selector: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub session_affinity: SessionAffinity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(
        rename = "externalIPs",
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<i32>,
    #[serde(
        rename = "loadBalancerIP",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub load_balancer_ip: Option<String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_source_ranges: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_load_balancer_node_ports: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_not_ready_addresses: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
    /// Absent means the same number as `port` (filled in by defaulting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// Absent (or 0) until allocated, on NodePort and LoadBalancer Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        Self::of(&net.addr())
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIP,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP", default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientIpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

/// `externalTrafficPolicy` and `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub load_balancer: LoadBalancerStatus,
    /// Written by controllers; kept as given.
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub conditions: Vec<serde_json::Value>,
}

impl ServiceStatus {
    pub fn is_empty(&self) -> bool {
        *self == ServiceStatus::default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerStatus {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ingress: Vec<LoadBalancerIngress>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerIngress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_mode: Option<LoadBalancerIpMode>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<PortStatus>,
}

/// `VIP`: traffic arrives with the load balancer's IP as destination, so the proxy must
/// catch it; `Proxy`: the load balancer rewrites it to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LoadBalancerIpMode {
    #[serde(rename = "VIP")]
    Vip,
    Proxy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortStatus {
    pub port: i32,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Service {
    /// A Service of type ClusterIP with no ports: the start of a builder-style literal.
    pub fn new(namespace: &str, name: &str) -> Service {
        Service {
            api_version: api_version(),
            kind: kind(),
            metadata: ObjectMeta::named(namespace, name),
            spec: ServiceSpec::default(),
            status: ServiceStatus::default(),
        }
    }

    /// `clusterIP: None`: DNS names the endpoints directly; no proxying.
    pub fn is_headless(&self) -> bool {
        self.spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE)
    }

    /// The proxy this Service is handed to, when it is not the default one.
    pub fn proxy_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_PROXY_NAME_LABEL)
            .map(String::as_str)
    }

    /// Its ClusterIPs, primary family first; none for headless and ExternalName Services.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let ips = if self.spec.cluster_ips.is_empty() {
            self.spec.cluster_ip.iter().collect::<Vec<_>>()
        } else {
            self.spec.cluster_ips.iter().collect()
        };
        ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
    }

    pub fn external_ips(&self) -> Vec<IpAddr> {
        parsed(&self.spec.external_ips)
    }

    /// The load balancer addresses from status, as the proxy catches them: only those in
    /// `VIP` mode (the default) arrive with the address as destination.
    pub fn load_balancer_ips(&self) -> Vec<IpAddr> {
        self.status
            .load_balancer
            .ingress
            .iter()
            .filter(|i| i.ip_mode != Some(LoadBalancerIpMode::Proxy))
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect()
    }

    /// `loadBalancerSourceRanges`, host bits cleared (the API server accepts them set).
    pub fn source_ranges(&self) -> Vec<IpNet> {
        self.spec
            .load_balancer_source_ranges
            .iter()
            .filter_map(|r| r.trim().parse::<IpNet>().ok())
            .map(|r| r.trunc())
            .collect()
    }

    /// The ClientIP affinity timeout, when affinity is on.
    pub fn affinity_timeout_seconds(&self) -> Option<u32> {
        (self.spec.session_affinity == SessionAffinity::ClientIP).then(|| {
            self.spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref()?.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
                .clamp(1, MAX_AFFINITY_TIMEOUT_SECONDS) as u32
        })
    }

    pub fn external_traffic_policy(&self) -> TrafficPolicy {
        self.spec
            .external_traffic_policy
            .unwrap_or(TrafficPolicy::Cluster)
    }

    pub fn internal_traffic_policy(&self) -> TrafficPolicy {
        self.spec
            .internal_traffic_policy
            .unwrap_or(TrafficPolicy::Cluster)
    }

    pub fn health_check_node_port(&self) -> Option<u16> {
        self.spec.health_check_node_port.and_then(nonzero_port)
    }

    /// Whether this type of Service is reached on node ports.
    pub fn uses_node_ports(&self) -> bool {
        match self.spec.type_ {
            ServiceType::NodePort => true,
            ServiceType::LoadBalancer => self.spec.allocate_load_balancer_node_ports != Some(false),
            ServiceType::ClusterIP | ServiceType::ExternalName => false,
        }
    }

    /// Whether a health check node port belongs to it: LoadBalancer with Local policy.
    pub fn needs_health_check_node_port(&self) -> bool {
        self.spec.type_ == ServiceType::LoadBalancer
            && self.spec.external_traffic_policy == Some(TrafficPolicy::Local)
    }
}

impl ServicePort {
    pub fn new(name: &str, port: u16) -> ServicePort {
        ServicePort {
            name: name.to_string(),
            protocol: Protocol::Tcp,
            app_protocol: None,
            port: port.into(),
            target_port: None,
            node_port: None,
        }
    }

    /// The port number, on a validated record.
    pub fn port(&self) -> u16 {
        nonzero_port(self.port).unwrap_or(0)
    }

    /// Where traffic goes on the endpoint: a number, or a name the EndpointSlice's ports
    /// resolve. Absent means the same number as `port`.
    pub fn target_port(&self) -> IntOrString {
        match &self.target_port {
            None | Some(IntOrString::Int(0)) => IntOrString::Int(self.port),
            Some(IntOrString::String(s)) if s.is_empty() => IntOrString::Int(self.port),
            Some(t) => t.clone(),
        }
    }

    pub fn node_port(&self) -> Option<u16> {
        self.node_port.and_then(nonzero_port)
    }
}

fn nonzero_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn parsed(texts: &[String]) -> Vec<IpAddr> {
    texts.iter().filter_map(|t| t.parse().ok()).collect()
}

#[cfg(test)]
pub(crate) mod tests;
