//! What the planner reads: one service port at a time, already resolved from the
//! Kubernetes objects (target ports by name, slices grouped by service, headless and
//! foreign services skipped), so that the planner's rules are about packets, not about
//! object shapes.

use ipnet::IpNet;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

/// A transport protocol a service port can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number (`meta l4proto`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The name nft and Kubernetes chain names use.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// IPv4 or IPv6: the proxy programs one table per family and every address in a rule
/// belongs to the table's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(addr: IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        IpFamily::of(net.addr())
    }

    /// The host's loopback range, where NodePorts are never opened.
    pub fn loopback(self) -> IpNet {
        match self {
            IpFamily::V4 => "127.0.0.0/8".parse().expect("literal"),
            IpFamily::V6 => "::1/128".parse().expect("literal"),
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        })
    }
}

/// Which endpoints a kind of traffic may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum TrafficPolicy {
    /// Any endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the node the traffic arrived at; the client's address is kept.
    Local,
}

/// One port of one service: the unit the proxy programs and the name of its chains.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for a service's single unnamed port.
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `namespace/name/protocol/port`, the form kube-proxy's chain names use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.namespace, self.name, self.protocol, self.port
        )
    }
}

/// A service port as the proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// At most one per family (dual-stack services have two).
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    /// Opened on the node's addresses (NodePort and LoadBalancer services).
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// Ingress IPs from the service's load-balancer status.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Sources allowed to reach the load-balancer IPs (empty: everyone).
    pub source_ranges: Vec<IpNet>,
    /// ClientIP session affinity, with its timeout in seconds.
    pub affinity_seconds: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// Answered with the count of local ready endpoints (LoadBalancer with Local policy).
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// A ClusterIP-only service port with Cluster policies and nothing else set: the start
    /// of most tests and of the lab's `service add`.
    pub fn cluster_ip(name: ServicePortName, cluster_ip: IpAddr, port: u16) -> ServicePort {
        ServicePort {
            name,
            cluster_ips: vec![cluster_ip],
            port,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: Vec::new(),
            affinity_seconds: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
        }
    }

    /// Whether traffic can reach this port from outside the cluster network (and so the
    /// external traffic policy applies).
    pub fn is_external(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// One endpoint of a service port, with the conditions of its EndpointSlice entry (already
/// defaulted as Kubernetes defines: unknown `ready` is ready, unknown `serving` follows
/// `ready`, unknown `terminating` is false).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    /// The target port, resolved from the slice's ports.
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node the endpoint runs on (for Local policies).
    pub node: Option<String>,
}

impl Endpoint {
    pub fn ready(addr: IpAddr, port: u16, node: &str) -> Endpoint {
        Endpoint {
            addr,
            port,
            ready: true,
            serving: true,
            terminating: false,
            node: Some(node.to_string()),
        }
    }
}

/// The node the plan is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub name: String,
    /// Where NodePorts and health-check ports are opened: the node's own addresses, never
    /// loopback.
    pub node_port_addresses: Vec<IpAddr>,
    /// The cluster's pod networks. Traffic from them keeps its source; traffic from
    /// elsewhere to a ClusterIP is masqueraded so that replies come back through this
    /// node. Empty: masquerade all ClusterIP traffic.
    pub cluster_cidrs: Vec<IpNet>,
}
