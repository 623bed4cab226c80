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
//! - *shape* chains shared by every port of the same policy shape and endpoint count
//!   (`shape-clusterip-cluster-3`: masquerade what comes from outside the pod network,
//!   then `dnat to daddr . l4proto . dport . numgen random mod 3 map
//!   @cluster-endpoints`): the endpoints are elements of four maps keyed by the frontend
//!   (`daddr . l4proto . dport` or, for NodePorts, `l4proto . dport`) and an index;
//! - for ports with ClientIP affinity, kube-proxy's shape: a cluster chain (`service-…`),
//!   a local chain (`local-…`), an external chain (`external-…`) and one chain per
//!   endpoint (`endpoint-…`) with its affinity set; a firewall chain (`firewall-…`) for
//!   load-balancer source ranges;
//! - fixed chains hooked into netfilter that do the lookups, and `masquerading`, which
//!   masquerades what a chain marked and connections from an endpoint to itself.
//!
//! Why shared chains: at each commit that adds a rule or a jump, the kernel re-validates
//! every chain reachable from the hooks, and binding a map from a new chain walks the
//! map whole. With a chain per service (let alone per endpoint) both grow with the
//! cluster; with shape chains an endpoint event changes map elements (and, when a
//! port's endpoint count changes, which shape its frontends lead to), and the validation
//! walks a handful of chains. Measured in `docs/benchmarks.md`.
//!
//! Everything a service port contributes is kept apart ([`ServiceRules`]) so an event
//! replans and reprograms only the ports it touches.

use crate::input::{IpFamily, Protocol, ServicePortName};
use crate::small::{SmallMap, SmallSet};
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
    /// `daddr . l4proto . dport . index` → endpoint, for the cluster pool.
    pub const CLUSTER_ENDPOINTS: &str = "cluster-endpoints";
    /// The same for the local pool (Local policies).
    pub const LOCAL_ENDPOINTS: &str = "local-endpoints";
    /// `l4proto . dport . index` → endpoint, NodePorts' cluster pool.
    pub const NODEPORT_CLUSTER_ENDPOINTS: &str = "nodeport-cluster-endpoints";
    /// NodePorts' local pool.
    pub const NODEPORT_LOCAL_ENDPOINTS: &str = "nodeport-local-endpoints";
    /// `saddr . daddr` of this node's endpoints: a connection from an endpoint to itself
    /// through its service is masqueraded.
    pub const HAIRPIN: &str = "hairpin";

    use super::{FrontendKind, Role};

    /// The endpoint map of a pool role, for a kind of frontend.
    pub fn endpoints(role: Role, frontend: FrontendKind) -> &'static str {
        match (role, frontend) {
            (Role::Cluster, FrontendKind::Address) => CLUSTER_ENDPOINTS,
            (Role::Local, FrontendKind::Address) => LOCAL_ENDPOINTS,
            (Role::Cluster, FrontendKind::NodePort) => NODEPORT_CLUSTER_ENDPOINTS,
            (Role::Local, FrontendKind::NodePort) => NODEPORT_LOCAL_ENDPOINTS,
        }
    }
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
    /// `jump masquerade-unless-cluster`: in a shape chain of ClusterIPs, traffic from
    /// outside the pod network is masqueraded.
    MasqueradeUnlessFromCluster,
    /// `[CONDITION] [mark for masquerade] dnat to KEY . numgen random mod COUNT map @MAP`:
    /// one of `count` endpoints of the pool of `role`, found by the packet's frontend.
    Pick {
        when: Condition,
        masquerade: bool,
        role: Role,
        frontend: FrontendKind,
        count: u32,
    },
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

/// When a [`Rule::Pick`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Condition {
    Always,
    /// The source is in the pod network (`ip saddr <cluster cidrs>`).
    FromCluster,
    /// The source is one of the node's addresses (`fib saddr type local`).
    LocalSource,
}

/// Which of a port's endpoints a pool holds: all usable ones (Cluster policy), or this
/// node's (Local policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Role {
    Cluster,
    Local,
}

/// How a packet names its service: by address (ClusterIPs, external and load-balancer
/// IPs: `daddr . l4proto . dport`) or as a NodePort on a node address
/// (`l4proto . dport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    Address,
    NodePort,
}

/// One frontend of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Frontend {
    Address(Destination),
    NodePort(NodePort),
}

impl Frontend {
    pub fn kind(self) -> FrontendKind {
        match self {
            Frontend::Address(_) => FrontendKind::Address,
            Frontend::NodePort(_) => FrontendKind::NodePort,
        }
    }
}

/// An endpoint as packets are sent to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
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
    pub service_ips: SmallMap<Destination, String>,
    /// `service-nodeports` entries.
    pub node_ports: SmallMap<NodePort, String>,
    /// `no-endpoint-services` entries.
    pub no_endpoint_services: SmallMap<Destination, Refusal>,
    /// `no-endpoint-nodeports` entries.
    pub no_endpoint_node_ports: SmallMap<NodePort, Refusal>,
    /// `firewall-ips` entries.
    pub firewall_ips: SmallMap<Destination, String>,
    /// `cluster-ips` elements.
    pub cluster_ips: SmallSet<IpAddr>,
    /// The port's own chains and their rules, in order (ports with affinity, firewalls).
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// The shape chains its frontends lead to: shared, each name always has the same
    /// rules.
    pub shapes: SmallMap<String, Vec<Rule>>,
    /// Endpoints of its pools, in address order: an endpoint's index is its position.
    pub pools: SmallMap<Role, Vec<Backend>>,
    /// The pools each frontend's shape picks from (the endpoint maps' keys).
    pub frontends: SmallMap<Frontend, SmallSet<Role>>,
    /// `hairpin` elements: this node's endpoints (and those of no known node).
    pub hairpin: SmallSet<IpAddr>,
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
            + self
                .frontends
                .values()
                .flatten()
                .map(|role| self.pools.get(role).map_or(0, Vec::len))
                .sum::<usize>()
            + self.hairpin.len()
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

    /// Every chain of every service port, shape chains included (once per port that
    /// uses one).
    pub fn chains(&self) -> impl Iterator<Item = (&String, &Vec<Rule>)> {
        self.services
            .values()
            .flat_map(|s| s.chains.iter().chain(s.shapes.iter()))
    }

    /// The whole table's view of one map, as the kernel holds it once every port is
    /// programmed. When two ports claim one key (two services given the same external IP
    /// and port, which Kubernetes allows), the first port by name wins, as everywhere.
    pub fn merged<K: Ord + Clone, V: Clone>(
        &self,
        part: impl Fn(&ServiceRules) -> &SmallMap<K, V>,
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
