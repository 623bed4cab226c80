//! The planned proxy state: what the kernel should hold, described so that both the
//! nftables renderer and the packet tracer read the same thing.
//!
//! The shape is kube-proxy's nftables mode (so operators who know it can read ours), one
//! table per family:
//!
//! - verdict maps keyed by `daddr . l4proto . dport`: `service-ips` (ClusterIPs, external
//!   and load-balancer IPs → the service's chain), `no-endpoint-services` (→ reject or
//!   drop), `firewall-ips` (load-balancer IPs with source ranges → their firewall chain);
//!   keyed by `l4proto . dport` and matched only on the node's own addresses:
//!   `service-nodeports`, `no-endpoint-nodeports`; the set `cluster-ips` rejects unknown
//!   ports of a ClusterIP. One lookup per packet whatever the number of services.
//! - per service port: a cluster chain (`service-…`), a local chain for Local policies
//!   (`local-…`), an external chain (`external-…`), a firewall chain (`firewall-…`), and
//!   one chain per endpoint (`endpoint-…`) that DNATs; random choice with `numgen`.
//! - fixed chains hooked into netfilter that do the lookups, and `masquerading`, which
//!   masquerades what a service chain marked.
//!
//! Everything a service port contributes is kept apart ([`ServiceRules`]) so an event
//! replans and reprograms only the ports it touches.

use crate::input::{IpFamily, Protocol, ServicePortName};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

/// Names of the fixed maps and sets.
pub mod names {
    pub const SERVICE_IPS: &str = "service-ips";
    pub const SERVICE_NODEPORTS: &str = "service-nodeports";
    pub const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
    pub const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
    pub const FIREWALL_IPS: &str = "firewall-ips";
    pub const CLUSTER_IPS: &str = "cluster-ips";
    pub const NODEPORT_IPS: &str = "nodeport-ips";
}

/// A service address as packets name it: `daddr . l4proto . dport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Destination {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a} . {} . {}", self.protocol, self.port),
            IpAddr::V6(a) => write!(f, "{a} . {} . {}", self.protocol, self.port),
        }
    }
}

/// A port opened on every node address: `l4proto . dport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NodePort {
    pub protocol: Protocol,
    pub port: u16,
}

/// How traffic that cannot be served is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Refusal {
    /// The service has no endpoints at all: the client is told at once (ICMP port
    /// unreachable, which TCP clients see as "connection refused").
    Reject,
    /// A Local policy without a local endpoint: silently dropped, so that a load balancer
    /// health-checking this node moves on rather than the client giving up.
    Drop,
}

/// One rule of a service port's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Rule {
    /// `ip daddr A th dport P ip saddr != <cluster cidrs> jump mark-for-masquerade`: traffic
    /// to a ClusterIP from outside the pod network (a host process, another node) must
    /// come back through this node, so it is masqueraded. With no cluster CIDRs known, all
    /// of it is.
    MasqueradeFromOutsideCluster { addr: IpAddr, port: u16 },
    /// `jump mark-for-masquerade`.
    Masquerade,
    /// `ip saddr A jump mark-for-masquerade`: an endpoint reaching its own service
    /// (hairpin) must see the reply come from the service, not from itself.
    MasqueradeIfSource(IpAddr),
    /// `fib saddr type local jump mark-for-masquerade`.
    MasqueradeIfLocalSource,
    /// `ip saddr <cluster cidrs> goto C`: pods reaching an external address of a Local
    /// service are served by any endpoint, as if they had used the ClusterIP.
    GotoIfFromCluster(String),
    /// `fib saddr type local goto C`.
    GotoIfLocalSource(String),
    /// `ip saddr @S goto C`: a client with ClientIP affinity returns to its endpoint.
    GotoIfAffine { set: String, chain: String },
    /// `numgen random mod N vmap { 0 : goto C0, … }`: one endpoint chain, uniformly.
    Balance(Vec<String>),
    /// `update @S { ip saddr }`: remember the client for affinity (the set holds the
    /// timeout).
    RememberClient { set: String },
    /// `meta l4proto P dnat to A:P`.
    Dnat { addr: IpAddr, port: u16 },
    /// `ip saddr != { R… } drop`: load-balancer source ranges.
    DropUnlessSourceIn(Vec<IpNet>),
    /// `goto C`.
    Goto(String),
    /// `drop`: external traffic of a Local policy on a node without a local endpoint, once
    /// pods and the node itself have been short-circuited to any endpoint.
    Drop,
}

impl Rule {
    /// The chains this rule sends packets to.
    pub fn targets(&self) -> Vec<&str> {
        match self {
            Rule::GotoIfFromCluster(c) | Rule::GotoIfLocalSource(c) | Rule::Goto(c) => vec![c],
            Rule::GotoIfAffine { chain, .. } => vec![chain],
            Rule::Balance(chains) => chains.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// What one service port contributes to one family's table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceRules {
    /// `service-ips` entries: destination → chain to go to.
    pub service_ips: BTreeMap<Destination, String>,
    /// `service-nodeports` entries.
    pub node_ports: BTreeMap<NodePort, String>,
    /// `no-endpoint-services` entries.
    pub no_endpoint_services: BTreeMap<Destination, Refusal>,
    /// `no-endpoint-nodeports` entries.
    pub no_endpoint_node_ports: BTreeMap<NodePort, Refusal>,
    /// `firewall-ips` entries.
    pub firewall_ips: BTreeMap<Destination, String>,
    /// `cluster-ips` elements.
    pub cluster_ips: BTreeSet<IpAddr>,
    /// The port's own chains and their rules, in order.
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// Affinity sets (one per endpoint) and their timeout in seconds.
    pub affinity_sets: BTreeMap<String, u32>,
}

impl ServiceRules {
    pub fn is_empty(&self) -> bool {
        self == &ServiceRules::default()
    }

    /// Number of map and set elements, for sizing batches and reports.
    pub fn element_count(&self) -> usize {
        self.service_ips.len()
            + self.node_ports.len()
            + self.no_endpoint_services.len()
            + self.no_endpoint_node_ports.len()
            + self.firewall_ips.len()
            + self.cluster_ips.len()
    }
}

/// One family's planned table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Table {
    pub family: IpFamily,
    /// The `nodeport-ips` set: where NodePorts answer.
    pub node_port_addresses: BTreeSet<IpAddr>,
    /// The pod networks, for the masquerade decisions.
    pub cluster_cidrs: Vec<IpNet>,
    /// Every service port with something to program in this family.
    pub services: BTreeMap<ServicePortName, ServiceRules>,
}

impl Table {
    pub fn new(family: IpFamily) -> Table {
        Table {
            family,
            node_port_addresses: BTreeSet::new(),
            cluster_cidrs: Vec::new(),
            services: BTreeMap::new(),
        }
    }

    /// Every chain of every service port.
    pub fn chains(&self) -> impl Iterator<Item = (&String, &Vec<Rule>)> {
        self.services.values().flat_map(|s| s.chains.iter())
    }

    /// The whole table's view of one map, as the kernel holds it once every port is
    /// programmed. When two ports claim one key (two services given the same external IP
    /// and port, which Kubernetes allows), the first port by name wins, as everywhere.
    pub fn merged<K: Ord + Clone, V: Clone>(
        &self,
        part: impl Fn(&ServiceRules) -> &BTreeMap<K, V>,
    ) -> BTreeMap<K, V> {
        let mut all = BTreeMap::new();
        for rules in self.services.values() {
            for (k, v) in part(rules) {
                all.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        all
    }
}

/// A health-check port (`healthCheckNodePort`) and what it reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// `namespace/name` of the service.
    pub service: String,
    /// Ready endpoints on this node: 200 when above zero, 503 otherwise.
    pub local_endpoints: usize,
}

/// The whole plan for one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub v4: Table,
    pub v6: Table,
    /// Health-check ports by port number.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

impl Plan {
    pub fn table(&self, family: IpFamily) -> &Table {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    pub fn table_mut(&mut self, family: IpFamily) -> &mut Table {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// Chain and set names of one service port. The names read like kube-proxy's (without its
/// hash prefix: nftables allows 255 bytes, and a readable name is what an operator looks
/// for in `nft list table`).
pub mod chain {
    use crate::input::ServicePortName;
    use std::net::IpAddr;

    pub fn cluster(port: &ServicePortName) -> String {
        format!("service-{port}")
    }
    pub fn local(port: &ServicePortName) -> String {
        format!("local-{port}")
    }
    pub fn external(port: &ServicePortName) -> String {
        format!("external-{port}")
    }
    pub fn firewall(port: &ServicePortName) -> String {
        format!("firewall-{port}")
    }
    pub fn endpoint(port: &ServicePortName, addr: IpAddr, target: u16) -> String {
        match addr {
            IpAddr::V4(a) => format!("endpoint-{port}__{a}/{target}"),
            IpAddr::V6(a) => format!("endpoint-{port}__[{a}]/{target}"),
        }
    }
    pub fn affinity(port: &ServicePortName, addr: IpAddr, target: u16) -> String {
        match addr {
            IpAddr::V4(a) => format!("affinity-{port}__{a}/{target}"),
            IpAddr::V6(a) => format!("affinity-{port}__[{a}]/{target}"),
        }
    }
}
