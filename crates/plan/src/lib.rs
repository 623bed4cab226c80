//! The topology planner: a pure function from cluster state to what one node must program.
//!
//! Two steps, both free of IO and clocks so that every node computes the same answer from
//! the same state and the whole space can be tested exhaustively:
//!
//! 1. [`Topology::build`] decides, cluster-wide, which nodes serve as gateways of each
//!    location, which nodes other locations can tunnel to directly, and which gateway serves
//!    each of the rest.
//! 2. [`Topology::plan_for`] derives one node's WireGuard peers and routes from it.
//!
//! The reachability model: two nodes of the same location reach each other on the
//! location's internal network; nodes of different locations reach each other only if both
//! have a public endpoint. A private node is reached from other locations through one of
//! its location's gateways, chosen by rendezvous hashing so that adding or removing a
//! gateway moves only that gateway's share.

mod gateways;
pub mod graph;
pub mod health;
pub mod leader_work;
pub mod rounds;
pub mod showconf;

use gateways::pair_weight;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use trellis_model::{Endpoint, ExternalPeer, Granularity, Node, PublicKey};

pub use gateways::{
    Slots, active, choose_gateways, qualifies_as_gateway, rendezvous_choice, serving_slot,
};

/// Cluster-wide settings that shape the topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub granularity: Granularity,
    /// Active gateways per location (at least 1).
    pub gateways_per_location: usize,
    /// Keepalive sent to node peers, in seconds (None: off).
    pub persistent_keepalive: Option<u16>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            granularity: Granularity::Location,
            gateways_per_location: 2,
            persistent_keepalive: None,
        }
    }
}

/// The cluster-wide part of the plan. Every node builds the same one from the same state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub settings: Settings,
    /// Nodes that take part (they have a public key and no conflicting prefixes).
    pub nodes: BTreeMap<String, Node>,
    pub peers: BTreeMap<String, ExternalPeer>,
    /// Gateway slots per location (the sticky record; see [`Slots`]).
    pub slots: BTreeMap<String, Slots>,
    /// Active gateways per location: the filled slots, in slot order.
    pub gateways: BTreeMap<String, Vec<String>>,
    /// For each node other locations cannot tunnel to: the gateway that serves it.
    pub serving: BTreeMap<String, String>,
    /// Things the operator must hear about: nodes left out, locations cut off.
    pub warnings: Vec<String>,
    /// For every gateway candidate (active or standby): the nodes that probe it.
    pub observers: BTreeMap<String, Vec<String>>,
    /// Gateway candidates measured not to forward: left out of the gateway choice.
    pub down: BTreeSet<String>,
    /// Pairs of nodes whose direct tunnel is measured broken, each as (lesser, greater)
    /// name. Their traffic goes through a relay; see [`Topology::with_broken_paths`].
    pub broken_paths: BTreeSet<(String, String)>,
}

/// What one node must program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub node: String,
    /// The node's address on its WireGuard interface.
    pub address: IpNet,
    pub is_gateway: bool,
    pub peers: Vec<PeerPlan>,
    pub routes: Vec<RoutePlan>,
    /// The node's probe address, put on its WireGuard interface beside `address`.
    pub probe_address: Option<IpNet>,
    /// Gateways this node probes.
    pub observe: Vec<ProbeTarget>,
    /// When this node is a gateway candidate: where it relays the probes it receives.
    pub relay: Vec<RelayTarget>,
    /// Direct tunnels to other locations whose path this node measures (including broken
    /// ones, so that their repair is seen): the peer and its probe address, which is routed
    /// into the direct tunnel whatever carries the peer's other traffic.
    pub paths: Vec<PathTarget>,
}

/// A direct tunnel whose path a node measures, at the peer's probe address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathTarget {
    pub peer: String,
    pub probe_ip: IpAddr,
    /// Whether the path is currently held broken (its traffic relayed).
    pub broken: bool,
}

/// A gateway an observer probes, at its probe address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeTarget {
    pub gateway: String,
    pub probe_ip: IpAddr,
    /// How many relay targets the gateway has (probes use that many id ranges).
    pub relays: usize,
}

/// Probes with an ICMP echo id in `ids` are relayed (DNAT) to `to`, a node behind the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RelayTarget {
    pub node: String,
    pub to: IpAddr,
    pub ids: (u16, u16),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerPlan {
    pub name: String,
    pub external: bool,
    pub public_key: PublicKey,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RoutePlan {
    pub dst: IpNet,
    pub next_hop: NextHop,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum NextHop {
    /// Into the WireGuard interface; the peer with this name holds the prefix.
    Tunnel { peer: String },
    /// Over the location's internal network to this node.
    Internal { node: String, via: IpAddr },
}

/// The ways a plan cannot be made for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    UnknownNode(String),
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::UnknownNode(n) => write!(
                f,
                "node {n:?} is not part of the mesh (not registered, no public key yet, or left out; see warnings)"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// Where a packet for some prefix goes next, from one member's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hop<'a> {
    Tunnel(&'a str),
    Internal(&'a Node),
}

impl Topology {
    /// Build the cluster-wide topology. `previous_gateways` is the sticky record of each
    /// location's serving gateways, as last stored.
    pub fn build(
        settings: Settings,
        nodes: impl IntoIterator<Item = Node>,
        peers: impl IntoIterator<Item = ExternalPeer>,
        previous_gateways: &BTreeMap<String, Slots>,
    ) -> Topology {
        Self::build_with_health(settings, nodes, peers, previous_gateways, &BTreeSet::new())
    }

    /// [`Topology::build`], leaving out of the gateway choice the nodes measured `down`.
    pub fn build_with_health(
        settings: Settings,
        nodes: impl IntoIterator<Item = Node>,
        peers: impl IntoIterator<Item = ExternalPeer>,
        previous_gateways: &BTreeMap<String, Slots>,
        down: &BTreeSet<String>,
    ) -> Topology {
        let mut warnings = Vec::new();
        let nodes = admit_nodes(nodes, &mut warnings);
        let peers = admit_peers(peers, &nodes, &mut warnings);

        let mut by_location: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
        for node in nodes.values() {
            by_location.entry(&node.location).or_default().push(node);
        }
        let wanted = settings.gateways_per_location.max(1);
        let mut slots = BTreeMap::new();
        for (location, members) in &by_location {
            let previous = previous_gateways
                .get(*location)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let chosen = choose_gateways(members, previous, wanted, down);
            if chosen.iter().all(Option::is_none) && by_location.len() > 1 {
                let any_eligible = members.iter().any(|m| m.gateway.eligible);
                warnings.push(if any_eligible {
                    format!("location {location} has NO WORKING GATEWAY: every candidate is measured down; it is cut off from other locations")
                } else {
                    format!("location {location} has no gateway-eligible node: it is cut off from other locations")
                });
            }
            slots.insert(location.to_string(), chosen);
        }

        let mut topology = Topology {
            settings,
            nodes,
            peers,
            gateways: slots.iter().map(|(l, s)| (l.clone(), active(s))).collect(),
            slots,
            serving: BTreeMap::new(),
            warnings,
            observers: BTreeMap::new(),
            down: down.clone(),
            broken_paths: BTreeSet::new(),
        };
        topology.serving = topology.assign_serving_gateways();
        topology.observers = health::candidates(topology.nodes.values())
            .into_iter()
            .map(|g| {
                let observers = health::observers_for(
                    topology.nodes.values(),
                    g,
                    health::OBSERVERS_PER_GATEWAY,
                );
                (g.name.clone(), observers)
            })
            .collect();
        topology
    }

    /// The same topology with these direct paths held broken (pairs in either order).
    /// A broken pair stops tunnelling directly: its traffic goes through a *relay*, an
    /// active gateway of either location that both ends still reach, the same one in both
    /// directions (WireGuard accepts a packet only from the peer its source is routed to).
    /// A pair that no gateway can relay is reported in the warnings. Paths between nodes
    /// that do not tunnel directly anyway are ignored.
    pub fn with_broken_paths<'a>(
        mut self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Topology {
        for (a, b) in pairs {
            let (Some(na), Some(nb)) = (self.nodes.get(a), self.nodes.get(b)) else {
                continue;
            };
            if a != b && self.tunnels_by_design(na, nb) && na.location != nb.location {
                self.broken_paths.insert(ordered(a, b));
            }
        }
        for (a, b) in &self.broken_paths {
            let (na, nb) = (&self.nodes[a], &self.nodes[b]);
            if self.relay_for(na, nb).is_none() {
                self.warnings.push(format!(
                    "the direct path {a} <-> {b} is broken and no gateway can relay it: traffic between them is cut"
                ));
            }
        }
        self
    }

    fn is_broken(&self, a: &Node, b: &Node) -> bool {
        !self.broken_paths.is_empty() && self.broken_paths.contains(&ordered(&a.name, &b.name))
    }

    /// The relay for a broken pair: an active gateway of either end's location, neither end
    /// itself, that both ends reach (by a tunnel or their internal network), chosen by a
    /// hash of the pair so that both ends pick the same one.
    fn relay_for<'a>(&'a self, a: &Node, b: &Node) -> Option<&'a Node> {
        let reaches = |x: &Node, y: &Node| x.location == y.location || self.has_tunnel(x, y);
        let pair = {
            let (x, y) = ordered(&a.name, &b.name);
            format!("{x}|{y}")
        };
        [&a.location, &b.location]
            .into_iter()
            .filter_map(|l| self.gateways.get(l))
            .flatten()
            .map(|g| &self.nodes[g])
            .filter(|r| r.name != a.name && r.name != b.name && reaches(a, r) && reaches(r, b))
            .max_by_key(|r| (pair_weight(&pair, &r.name), r.name.clone()))
    }

    fn assign_serving_gateways(&self) -> BTreeMap<String, String> {
        let mut serving = BTreeMap::new();
        for node in self.nodes.values() {
            if self.is_direct(node) {
                continue;
            }
            if let Some(g) = serving_slot(&node.name, &self.slots[&node.location]) {
                serving.insert(node.name.clone(), g.to_string());
            }
        }
        serving
    }

    pub fn is_gateway(&self, node: &Node) -> bool {
        self.gateways
            .get(&node.location)
            .is_some_and(|g| g.contains(&node.name))
    }

    /// Whether nodes of other locations tunnel to this node itself.
    pub fn is_direct(&self, node: &Node) -> bool {
        match self.settings.granularity {
            Granularity::Location => self.is_gateway(node),
            Granularity::Full | Granularity::Cross | Granularity::Hybrid => {
                node.is_public() || self.is_gateway(node)
            }
        }
    }

    /// Whether two distinct nodes hold a WireGuard tunnel between them (for their traffic;
    /// a broken pair may keep a peer entry for its probes alone).
    pub fn has_tunnel(&self, a: &Node, b: &Node) -> bool {
        self.tunnels_by_design(a, b) && !self.is_broken(a, b)
    }

    /// Whether the granularity and the nodes' roles call for a tunnel between them.
    fn tunnels_by_design(&self, a: &Node, b: &Node) -> bool {
        if a.location == b.location {
            match self.settings.granularity {
                Granularity::Full => true,
                Granularity::Hybrid => a.is_public() && b.is_public(),
                Granularity::Location | Granularity::Cross => false,
            }
        } else {
            self.is_direct(a) && self.is_direct(b)
        }
    }

    /// The gateway serving `node` for traffic from other locations (itself when direct).
    pub fn serving_gateway<'a>(&'a self, node: &'a Node) -> Option<&'a Node> {
        if self.is_direct(node) {
            return Some(node);
        }
        self.serving.get(&node.name).map(|g| &self.nodes[g])
    }

    /// How `from` reaches prefixes owned by node `to`. None when `to` is cut off.
    fn hop_to_node<'a>(&'a self, from: &'a Node, to: &'a Node) -> Option<Hop<'a>> {
        if self.has_tunnel(from, to) {
            return Some(Hop::Tunnel(&to.name));
        }
        if from.location == to.location {
            return Some(Hop::Internal(to));
        }
        let gateway = self.serving_gateway(to)?;
        if self.has_tunnel(from, gateway) {
            return Some(Hop::Tunnel(&gateway.name));
        }
        // Where traffic leaves `from`'s side: `from` itself, or the gateway serving it. When
        // that exit's direct path to `gateway` is broken, go to the pair's relay — straight
        // from here when it can be reached, so that the relay receives every relayed packet
        // from the peer it routes the packet's source to (WireGuard drops anything else).
        let exit = if self.is_direct(from) {
            from
        } else {
            self.serving_gateway(from)?
        };
        if self.is_broken(exit, gateway) {
            let relay = self.relay_for(exit, gateway)?;
            if self.has_tunnel(from, relay) {
                return Some(Hop::Tunnel(&relay.name));
            }
            if from.location == relay.location {
                return Some(Hop::Internal(relay));
            }
        }
        self.hop_to_own_gateway(from)
    }

    /// How a node that cannot tunnel out itself reaches its own serving gateway.
    fn hop_to_own_gateway<'a>(&'a self, from: &'a Node) -> Option<Hop<'a>> {
        let own = self.serving_gateway(from)?;
        if own.name == from.name {
            return None;
        }
        Some(if self.has_tunnel(from, own) {
            Hop::Tunnel(&own.name)
        } else {
            Hop::Internal(own)
        })
    }

    /// How `from` reaches an external peer: directly if it is itself reachable from
    /// outside, otherwise through its serving gateway.
    fn hop_to_external<'a>(&'a self, from: &'a Node, peer: &'a ExternalPeer) -> Option<Hop<'a>> {
        if self.is_direct(from) {
            Some(Hop::Tunnel(&peer.name))
        } else {
            self.hop_to_own_gateway(from)
        }
    }

    /// The endpoint `from` dials to reach `to`: the internal address inside a location,
    /// the public endpoint across locations (falling back to the internal address, which
    /// only works where the operator routes internal networks between locations).
    fn endpoint_between(from: &Node, to: &Node) -> Endpoint {
        let internal = Endpoint::from_socket(std::net::SocketAddr::new(
            to.internal_ip.addr(),
            to.listen_port,
        ));
        if from.location == to.location {
            internal
        } else {
            to.endpoint.clone().unwrap_or(internal)
        }
    }

    /// The WireGuard peers and routes of one node.
    pub fn plan_for(&self, name: &str) -> Result<Plan, PlanError> {
        let me = self
            .nodes
            .get(name)
            .ok_or_else(|| PlanError::UnknownNode(name.to_string()))?;
        let mut routes = Vec::new();
        let mut allowed: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();

        let mut record = |prefixes: Vec<IpNet>, hop: Hop<'_>| {
            for dst in prefixes {
                let next_hop = match &hop {
                    Hop::Tunnel(peer) => {
                        allowed.entry(peer.to_string()).or_default().push(dst);
                        NextHop::Tunnel {
                            peer: peer.to_string(),
                        }
                    }
                    Hop::Internal(node) => NextHop::Internal {
                        node: node.name.clone(),
                        via: node.internal_ip.addr(),
                    },
                };
                routes.push(RoutePlan { dst, next_hop });
            }
        };

        for other in self.nodes.values().filter(|n| n.name != me.name) {
            if let Some(hop) = self.hop_to_node(me, other) {
                record(other.owned_prefixes(), hop);
            }
        }
        for peer in self.peers.values() {
            if let Some(hop) = self.hop_to_external(me, peer) {
                record(peer.allowed_ips.clone(), hop);
            }
        }

        // Probe paths: an observer and the gateway it probes each route the other's probe
        // address into the tunnel between them, adding a peer if they have none.
        let mut observe = Vec::new();
        let mut probe_prefixes: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
        if me.probe_ip.is_some() {
            for (gateway, observers) in &self.observers {
                let g = &self.nodes[gateway];
                let probe_ip = g.probe_ip.expect("candidates have probe addresses");
                if observers.contains(&me.name) {
                    probe_prefixes
                        .entry(&g.name)
                        .or_default()
                        .push(IpNet::from(probe_ip));
                    observe.push(ProbeTarget {
                        gateway: g.name.clone(),
                        probe_ip,
                        relays: health::relay_targets(
                            self.nodes.values(),
                            g,
                            health::TARGETS_PER_GATEWAY,
                        )
                        .len(),
                    });
                }
                if *gateway == me.name {
                    for o in observers {
                        let probe = self.nodes[o]
                            .probe_ip
                            .expect("observers have probe addresses");
                        probe_prefixes
                            .entry(o)
                            .or_default()
                            .push(IpNet::from(probe));
                    }
                }
            }
        }
        // Direct paths to other locations: each end routes the other's probe address into
        // their own tunnel, broken or not, so the path is measured until it works again.
        let mut paths = Vec::new();
        if me.probe_ip.is_some() {
            for other in self.nodes.values() {
                if other.name == me.name
                    || other.location == me.location
                    || !self.tunnels_by_design(me, other)
                {
                    continue;
                }
                let Some(probe_ip) = other.probe_ip else {
                    continue;
                };
                probe_prefixes
                    .entry(&other.name)
                    .or_default()
                    .push(IpNet::from(probe_ip));
                paths.push(PathTarget {
                    peer: other.name.clone(),
                    probe_ip,
                    broken: self.is_broken(me, other),
                });
            }
        }
        let relay = if self.observers.contains_key(&me.name) {
            health::relay_targets(self.nodes.values(), me, health::TARGETS_PER_GATEWAY)
                .into_iter()
                .enumerate()
                .map(|(i, (node, to))| RelayTarget {
                    node,
                    to,
                    ids: health::id_range(i),
                })
                .collect()
        } else {
            Vec::new()
        };
        for (peer, prefixes) in &mut probe_prefixes {
            prefixes.sort();
            prefixes.dedup();
            for dst in prefixes.iter() {
                routes.push(RoutePlan {
                    dst: *dst,
                    next_hop: NextHop::Tunnel {
                        peer: peer.to_string(),
                    },
                });
            }
            allowed
                .entry(peer.to_string())
                .or_default()
                .extend(prefixes.iter().copied());
        }

        let mut peers: Vec<PeerPlan> = Vec::new();
        for other in self.nodes.values() {
            let probes_only = probe_prefixes.contains_key(other.name.as_str());
            if other.name != me.name && (self.has_tunnel(me, other) || probes_only) {
                peers.push(PeerPlan {
                    name: other.name.clone(),
                    external: false,
                    public_key: other.public_key.expect("admitted nodes have keys"),
                    endpoint: Some(Self::endpoint_between(me, other)),
                    allowed_ips: sorted(allowed.remove(other.name.as_str()).unwrap_or_default()),
                    persistent_keepalive: self.settings.persistent_keepalive,
                });
            }
        }
        if self.is_direct(me) {
            for peer in self.peers.values() {
                peers.push(PeerPlan {
                    name: peer.name.clone(),
                    external: true,
                    public_key: peer.public_key,
                    endpoint: peer.endpoint.clone(),
                    allowed_ips: sorted(allowed.remove(peer.name.as_str()).unwrap_or_default()),
                    persistent_keepalive: peer.persistent_keepalive,
                });
            }
        }
        routes.sort();
        Ok(Plan {
            node: me.name.clone(),
            address: IpNet::from(me.overlay_ip),
            is_gateway: self.is_gateway(me),
            peers,
            routes,
            probe_address: me.probe_ip.map(IpNet::from),
            observe,
            relay,
            paths,
        })
    }
}

fn ordered(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

fn sorted(mut v: Vec<IpNet>) -> Vec<IpNet> {
    v.sort();
    v
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Keep nodes that can take part: they have a key, and neither their prefixes nor their
/// key collide with a node admitted before them (by name, so every node agrees).
fn admit_nodes(
    nodes: impl IntoIterator<Item = Node>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Node> {
    let mut sorted: Vec<Node> = nodes.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut admitted: BTreeMap<String, Node> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for node in sorted {
        let Some(key) = node.public_key else {
            warnings.push(format!(
                "node {} has no public key yet: left out",
                node.name
            ));
            continue;
        };
        if admitted.contains_key(&node.name) {
            warnings.push(format!(
                "node {} is listed twice: second left out",
                node.name
            ));
            continue;
        }
        if !keys.insert(key) {
            warnings.push(format!(
                "node {} uses a public key another node already has: left out",
                node.name
            ));
            continue;
        }
        let clash = node.claimed_prefixes().into_iter().find_map(|p| {
            admitted.values().find_map(|other| {
                other
                    .claimed_prefixes()
                    .into_iter()
                    .find(|q| overlaps(&p, q))
                    .map(|q| (p, other.name.clone(), q))
            })
        });
        if let Some((p, other, q)) = clash {
            keys.remove(&key);
            warnings.push(format!(
                "node {} prefix {p} overlaps {q} of node {other}: left out",
                node.name
            ));
            continue;
        }
        admitted.insert(node.name.clone(), node);
    }
    admitted
}

fn admit_peers(
    peers: impl IntoIterator<Item = ExternalPeer>,
    nodes: &BTreeMap<String, Node>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, ExternalPeer> {
    let mut sorted: Vec<ExternalPeer> = peers.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut admitted: BTreeMap<String, ExternalPeer> = BTreeMap::new();
    let node_keys: BTreeSet<PublicKey> = nodes.values().filter_map(|n| n.public_key).collect();
    for peer in sorted {
        if nodes.contains_key(&peer.name) || admitted.contains_key(&peer.name) {
            warnings.push(format!(
                "peer {} has the name of a node or another peer: left out",
                peer.name
            ));
            continue;
        }
        if node_keys.contains(&peer.public_key)
            || admitted.values().any(|p| p.public_key == peer.public_key)
        {
            warnings.push(format!(
                "peer {} uses a public key that is already taken: left out",
                peer.name
            ));
            continue;
        }
        let taken = nodes
            .values()
            .flat_map(|n| n.claimed_prefixes())
            .chain(admitted.values().flat_map(|p| p.allowed_ips.clone()));
        let clash = taken
            .into_iter()
            .find(|q| peer.allowed_ips.iter().any(|p| overlaps(p, q)));
        if let Some(q) = clash {
            warnings.push(format!(
                "peer {} allowed IPs overlap {q} already in the mesh: left out",
                peer.name
            ));
            continue;
        }
        admitted.insert(peer.name.clone(), peer);
    }
    admitted
}

#[cfg(test)]
mod tests;
