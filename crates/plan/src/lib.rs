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
//!
//! Both families are planned alike: a node's IPv6 pod CIDRs get the same peers' allowed IPs
//! and the same hops as its IPv4 ones. Only a hop over a location's internal network
//! differs, when that network is IPv4 only (the overlay and probe addresses are IPv4 too):
//! Linux cannot route an IPv6 packet to an IPv4 gateway (`RTA_VIA` is refused for IPv6
//! routes, and so is an IPv4 nexthop object), so an IPv6 destination is routed to the next
//! node's link-local address derived from its internal IPv4 address ([`internal_via`]), which
//! every node carries on its internal interface while the mesh carries IPv6
//! ([`Plan::internal_link_local`]).

mod gateways;
pub mod graph;
pub mod health;
pub mod leader_work;
pub mod rounds;
pub mod showconf;

use gateways::pair_weight;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
    /// The link-local address this node must answer on its internal network, so that the
    /// IPv6 routes of the other nodes of its location can point at it (see
    /// [`internal_via`]). `None` when its internal address is IPv6 (routes point at that)
    /// or when the mesh carries no IPv6 prefix.
    pub internal_link_local: Option<Ipv6Addr>,
}

/// The link-local address standing for an IPv4 address on an IPv4-only internal network:
/// `fe80::` with the IPv4 address as the last 32 bits (`172.20.0.11` → `fe80::ac14:b`).
/// Unique on the link because the IPv4 addresses are; it cannot collide with a modified
/// EUI-64 interface identifier (those carry `ff:fe` in their middle), and collides with a
/// random one (RFC 7217) with odds of 2^-32 per pair of addresses.
pub fn internal_link_local(internal: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = internal.octets();
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    )
}

/// The gateway for `dst` toward the node at `internal` on their location's internal
/// network: always an address of `dst`'s own family or, for an IPv4 destination, an IPv6
/// one (RFC 5549; Linux installs it with `RTA_VIA` since 5.2). The converse does not exist
/// in Linux, so an IPv6 destination behind an IPv4 address goes to that address's
/// [`internal_link_local`] (on the internal interface: a link-local gateway needs the
/// device named).
pub fn internal_via(dst: &IpNet, internal: IpAddr) -> IpAddr {
    match (dst, internal) {
        (IpNet::V6(_), IpAddr::V4(v4)) => IpAddr::V6(internal_link_local(v4)),
        _ => internal,
    }
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
    ///
    /// Every agent runs this on every change of the cluster state, so its cost is kept
    /// O(n log n) in the number of nodes (plus O(candidates × locations) for the observers).
    pub fn build_with_health(
        settings: Settings,
        nodes: impl IntoIterator<Item = Node>,
        peers: impl IntoIterator<Item = ExternalPeer>,
        previous_gateways: &BTreeMap<String, Slots>,
        down: &BTreeSet<String>,
    ) -> Topology {
        let mut warnings = Vec::new();
        let mut nodes = admit_nodes(nodes, &mut warnings);
        let peers = admit_peers(peers, &nodes, &mut warnings);
        admit_location_prefixes(&mut nodes, &peers, &mut warnings);
        let mut topology = Topology {
            settings,
            nodes,
            peers,
            slots: BTreeMap::new(),
            gateways: BTreeMap::new(),
            serving: BTreeMap::new(),
            warnings: Vec::new(),
            observers: BTreeMap::new(),
            down: down.clone(),
            broken_paths: BTreeSet::new(),
        };
        let by_location = by_location(topology.nodes.values());

        let wanted = topology.settings.gateways_per_location.max(1);
        let mut slots = Vec::with_capacity(by_location.len());
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
            slots.push(chosen);
        }

        // Each node that other locations cannot tunnel to is served by one of its
        // location's gateways (rendezvous over the slots).
        let granularity = topology.settings.granularity;
        let mut serving = Vec::new();
        for ((_, members), slots) in by_location.iter().zip(&slots) {
            let gateways = active(slots);
            let slot_hashes: Vec<u64> = (0..slots.len())
                .map(|i| gateways::name_hash(&format!("slot-{i}")))
                .collect();
            for m in members {
                if direct_by_role(granularity, m, gateways.contains(&m.name)) {
                    continue;
                }
                let node = gateways::name_hash(&m.name);
                if let Some(g) = gateways::serving_slot_hashed(node, slots, &slot_hashes) {
                    serving.push((m.name.clone(), g.to_string()));
                }
            }
        }

        let pool = health::ObserverPool::from_groups(&by_location);
        let observers = health::candidates_in(&by_location)
            .map(|g| {
                let observers = pool.observers_for(g, health::OBSERVERS_PER_GATEWAY);
                (g.name.clone(), observers)
            })
            .collect();

        topology.slots = (by_location.iter().map(|(l, _)| l.to_string()))
            .zip(slots)
            .collect();
        topology.gateways = (topology.slots.iter())
            .map(|(l, s)| (l.clone(), active(s)))
            .collect();
        topology.serving = serving.into_iter().collect();
        topology.observers = observers;
        topology.warnings = warnings;
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
            if a != b && self.scan().tunnels_by_design(na, nb) && na.location != nb.location {
                self.broken_paths.insert(ordered(a, b));
            }
        }
        let mut cut = Vec::new();
        let view = self.scan();
        for (a, b) in &self.broken_paths {
            let (na, nb) = (&self.nodes[a], &self.nodes[b]);
            if view.relay_for(na, nb).is_none() {
                cut.push(format!(
                    "the direct path {a} <-> {b} is broken and no gateway can relay it: traffic between them is cut"
                ));
            }
        }
        self.warnings.extend(cut);
        self
    }

    /// Answers straight from the topology's maps, for any node record.
    fn scan(&self) -> View<'_> {
        View {
            t: self,
            index: None,
        }
    }

    /// Answers from hash tables built once, for the topology's own nodes.
    fn indexed(&self) -> View<'_> {
        View {
            t: self,
            index: Some(Index::new(self)),
        }
    }

    pub fn is_gateway(&self, node: &Node) -> bool {
        self.scan().is_gateway(node)
    }

    /// Whether nodes of other locations tunnel to this node itself.
    pub fn is_direct(&self, node: &Node) -> bool {
        self.scan().is_direct(node)
    }

    /// Whether two distinct nodes hold a WireGuard tunnel between them (for their traffic;
    /// a broken pair may keep a peer entry for its probes alone).
    pub fn has_tunnel(&self, a: &Node, b: &Node) -> bool {
        self.scan().has_tunnel(a, b)
    }

    /// The gateway serving `node` for traffic from other locations (itself when direct).
    pub fn serving_gateway<'a>(&'a self, node: &'a Node) -> Option<&'a Node> {
        self.scan().serving_gateway(node)
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

    /// What [`Plan::internal_link_local`] says for `me`: its internal address's link-local
    /// stand-in while any node or external peer has an IPv6 prefix, which another node of
    /// its location may then route through it. One scan of the prefixes, as cheap as the
    /// rest of a plan.
    fn internal_link_local_of(&self, me: &Node) -> Option<Ipv6Addr> {
        let IpAddr::V4(internal) = me.internal_ip.addr() else {
            return None;
        };
        let carries_ipv6 = (self.nodes.values())
            .any(|n| n.pod_cidrs.iter().any(|p| p.addr().is_ipv6()) || n.overlay_ip.is_ipv6())
            || (self.peers.values()).any(|p| p.allowed_ips.iter().any(|a| a.addr().is_ipv6()));
        carries_ipv6.then(|| internal_link_local(internal))
    }

    /// The WireGuard peers and routes of one node.
    ///
    /// O(n) hash lookups for n nodes (plus sorting the routes): each agent runs it for its
    /// own node on every change.
    pub fn plan_for(&self, name: &str) -> Result<Plan, PlanError> {
        let me = self
            .nodes
            .get(name)
            .ok_or_else(|| PlanError::UnknownNode(name.to_string()))?;
        let view = self.indexed();
        let mut routes = Vec::new();
        let mut allowed: FastMap<&str, Vec<IpNet>> = FastMap::default();

        let mut record = |prefixes: &[IpNet], hop| {
            for &dst in prefixes {
                let next_hop = match &hop {
                    Hop::Tunnel(peer) => {
                        allowed.entry(*peer).or_default().push(dst);
                        NextHop::Tunnel {
                            peer: peer.to_string(),
                        }
                    }
                    Hop::Internal(node) => NextHop::Internal {
                        node: node.name.clone(),
                        via: internal_via(&dst, node.internal_ip.addr()),
                    },
                };
                routes.push(RoutePlan { dst, next_hop });
            }
        };

        for other in self.nodes.values().filter(|n| n.name != me.name) {
            if let Some(hop) = view.hop_to_node(me, other) {
                // Another location's own network: reached the way the node naming it is
                // reached; its own location leaves it to that network.
                if other.location != me.location {
                    record(&other.location_prefixes, hop.clone());
                }
                record(&other.owned_prefixes(), hop);
            }
        }
        for peer in self.peers.values() {
            if let Some(hop) = view.hop_to_external(me, peer) {
                record(&peer.allowed_ips, hop);
            }
        }

        // Probe paths: an observer and the gateway it probes each route the other's probe
        // address into the tunnel between them, adding a peer if they have none.
        let mut observe = Vec::new();
        let mut probe_prefixes: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
        if me.probe_ip.is_some() {
            for (gateway, observers) in &self.observers {
                let observed = observers.contains(&me.name);
                if !observed && *gateway != me.name {
                    continue;
                }
                let g = &self.nodes[gateway];
                let probe_ip = g.probe_ip.expect("candidates have probe addresses");
                if observed {
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
                    || !view.tunnels_by_design(me, other)
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
                    broken: view.is_broken(me, other),
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
                .entry(*peer)
                .or_default()
                .extend(prefixes.iter().copied());
        }

        let mut peers: Vec<PeerPlan> = Vec::new();
        for other in self.nodes.values() {
            let probes_only = probe_prefixes.contains_key(other.name.as_str());
            if other.name != me.name && (view.has_tunnel(me, other) || probes_only) {
                peers.push(PeerPlan {
                    name: other.name.clone(),
                    external: false,
                    public_key: other.public_key.expect("admitted nodes have keys"),
                    endpoint: Some(Self::endpoint_between(me, other)),
                    allowed_ips: sorted(allowed.remove(other.name.as_str()).unwrap_or_default()),
                    // A node behind a NAT asks every peer for its own keepalive.
                    persistent_keepalive: other
                        .persistent_keepalive
                        .or(self.settings.persistent_keepalive),
                });
            }
        }
        if view.is_direct(me) {
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
        sort_routes(&mut routes);
        Ok(Plan {
            node: me.name.clone(),
            address: IpNet::from(me.overlay_ip),
            is_gateway: view.is_gateway(me),
            peers,
            routes,
            probe_address: me.probe_ip.map(IpNet::from),
            observe,
            relay,
            paths,
            internal_link_local: self.internal_link_local_of(me),
        })
    }
}

/// `routes.sort()`, in a fraction of the instructions for thousands of routes: by a key
/// packed from the destination (ordered as `IpNet` orders: IPv4 first, then address, then
/// prefix length), then by the whole route where destinations are equal.
fn sort_routes(routes: &mut Vec<RoutePlan>) {
    let mut v4: Vec<(u64, u32)> = Vec::with_capacity(routes.len());
    let mut v6: Vec<(u128, u8, u32)> = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        match r.dst {
            IpNet::V4(n) => v4.push((
                u64::from(n.addr().to_bits()) << 8 | u64::from(n.prefix_len()),
                i as u32,
            )),
            IpNet::V6(n) => v6.push((n.addr().to_bits(), n.prefix_len(), i as u32)),
        }
    }
    v4.sort_unstable();
    v6.sort_unstable();
    let order: Vec<u32> = (v4.iter().map(|(_, i)| *i))
        .chain(v6.iter().map(|(_, _, i)| *i))
        .collect();
    let mut slots: Vec<Option<RoutePlan>> = std::mem::take(routes).into_iter().map(Some).collect();
    *routes = (order.iter())
        .map(|&i| slots[i as usize].take().expect("each route once"))
        .collect();
    // Runs of one destination: by next hop.
    let mut start = 0;
    while start < routes.len() {
        let end = start + routes[start..].partition_point(|r| r.dst == routes[start].dst);
        if end - start > 1 {
            routes[start..end].sort_unstable();
        }
        start = end;
    }
}

/// Whether other locations tunnel to a node itself, given whether it is a gateway.
fn direct_by_role(granularity: Granularity, node: &Node, gateway: bool) -> bool {
    match granularity {
        Granularity::Location => gateway,
        Granularity::Full | Granularity::Cross | Granularity::Hybrid => node.is_public() || gateway,
    }
}

/// The questions planning asks about nodes, answered from the topology's maps or, for a
/// whole plan, from an [`Index`] built once.
struct View<'a> {
    t: &'a Topology,
    index: Option<Index<'a>>,
}

/// What a plan asks about every node, in hash tables built once: whether it is a gateway,
/// whether other locations tunnel to it, which gateway serves it; and which pairs are
/// broken. Nodes are looked up by address, so only the topology's own node records are
/// found; for any other record the view falls back to the topology's maps.
struct Index<'a> {
    facts: FastMap<usize, Facts<'a>>,
    broken: FastSet<(&'a str, &'a str)>,
}

struct Facts<'a> {
    gateway: bool,
    direct: bool,
    serving: Option<&'a Node>,
}

/// The key of one of the topology's node records in an [`Index`].
fn address(node: &Node) -> usize {
    std::ptr::from_ref(node) as usize
}

impl<'a> Index<'a> {
    fn new(t: &'a Topology) -> Self {
        // The gateways of each location that are nodes of that location: exactly the
        // nodes `is_gateway` holds for.
        let gateways: FastMap<&str, &Node> = (t.gateways.iter())
            .flat_map(|(location, names)| {
                names.iter().filter_map(move |g| {
                    t.nodes
                        .get(g)
                        .filter(|n| &n.location == location)
                        .map(|n| (g.as_str(), n))
                })
            })
            .collect();
        // `serving` and `nodes` are both in name order: walk them side by side.
        let mut serving = t.serving.iter().peekable();
        let mut facts = FastMap::with_capacity_and_hasher(t.nodes.len(), Default::default());
        for node in t.nodes.values() {
            while serving.next_if(|(n, _)| **n < node.name).is_some() {}
            let served_by = serving
                .next_if(|(n, _)| **n == node.name)
                .map(|(_, g)| match gateways.get(g.as_str()) {
                    Some(gateway) => *gateway,
                    None => &t.nodes[g],
                });
            let gateway = gateways.contains_key(node.name.as_str());
            facts.insert(
                address(node),
                Facts {
                    gateway,
                    direct: direct_by_role(t.settings.granularity, node, gateway),
                    serving: served_by,
                },
            );
        }
        Index {
            facts,
            broken: (t.broken_paths.iter())
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect(),
        }
    }
}

impl<'a> View<'a> {
    fn facts(&self, node: &Node) -> Option<&Facts<'a>> {
        self.index.as_ref()?.facts.get(&address(node))
    }

    fn is_gateway(&self, node: &Node) -> bool {
        if let Some(facts) = self.facts(node) {
            return facts.gateway;
        }
        (self.t.gateways.get(&node.location)).is_some_and(|g| g.contains(&node.name))
    }

    fn is_direct(&self, node: &Node) -> bool {
        if let Some(facts) = self.facts(node) {
            return facts.direct;
        }
        direct_by_role(self.t.settings.granularity, node, self.is_gateway(node))
    }

    fn is_broken(&self, a: &Node, b: &Node) -> bool {
        if self.t.broken_paths.is_empty() {
            return false;
        }
        match &self.index {
            Some(ix) => {
                let (a, b) = (a.name.as_str(), b.name.as_str());
                ix.broken.contains(&if a <= b { (a, b) } else { (b, a) })
            }
            None => self.t.broken_paths.contains(&ordered(&a.name, &b.name)),
        }
    }

    fn has_tunnel(&self, a: &Node, b: &Node) -> bool {
        self.tunnels_by_design(a, b) && !self.is_broken(a, b)
    }

    /// Whether the granularity and the nodes' roles call for a tunnel between them.
    fn tunnels_by_design(&self, a: &Node, b: &Node) -> bool {
        if a.location == b.location {
            match self.t.settings.granularity {
                Granularity::Full => true,
                Granularity::Hybrid => a.is_public() && b.is_public(),
                Granularity::Location | Granularity::Cross => false,
            }
        } else {
            self.is_direct(a) && self.is_direct(b)
        }
    }

    fn serving_gateway(&self, node: &'a Node) -> Option<&'a Node> {
        if let Some(facts) = self.facts(node) {
            return if facts.direct {
                Some(node)
            } else {
                facts.serving
            };
        }
        if self.is_direct(node) {
            return Some(node);
        }
        self.t.serving.get(&node.name).map(|g| &self.t.nodes[g])
    }

    /// The relay for a broken pair: an active gateway of either end's location, neither end
    /// itself, that both ends reach (by a tunnel or their internal network), chosen by a
    /// hash of the pair so that both ends pick the same one.
    fn relay_for(&self, a: &Node, b: &Node) -> Option<&'a Node> {
        let reaches = |x: &Node, y: &Node| x.location == y.location || self.has_tunnel(x, y);
        let pair = {
            let (x, y) = ordered(&a.name, &b.name);
            format!("{x}|{y}")
        };
        [&a.location, &b.location]
            .into_iter()
            .filter_map(|l| self.t.gateways.get(l))
            .flatten()
            .map(|g| &self.t.nodes[g])
            .filter(|r| r.name != a.name && r.name != b.name && reaches(a, r) && reaches(r, b))
            .max_by_key(|r| (pair_weight(&pair, &r.name), r.name.clone()))
    }

    /// How `from` reaches prefixes owned by node `to`. None when `to` is cut off.
    fn hop_to_node(&self, from: &'a Node, to: &'a Node) -> Option<Hop<'a>> {
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
    fn hop_to_own_gateway(&self, from: &'a Node) -> Option<Hop<'a>> {
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
    fn hop_to_external(&self, from: &'a Node, peer: &'a ExternalPeer) -> Option<Hop<'a>> {
        if self.is_direct(from) {
            Some(Hop::Tunnel(&peer.name))
        } else {
            self.hop_to_own_gateway(from)
        }
    }
}

/// The hasher of the planner's hash tables, keyed by short names: FxHash's multiply and
/// rotate over eight bytes at a time (as rustc uses), several times cheaper than SipHash
/// there. No defence against crafted collisions is needed: keys come from the cluster's
/// own records, and a collision costs time, never a different answer.
#[derive(Default)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.add(u64::from_le_bytes(word.try_into().expect("eight bytes")));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let word = (rest.iter().rev()).fold(0u64, |word, b| word << 8 | u64::from(*b));
            self.add(word ^ ((rest.len() as u64) << 59));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        // the table picks buckets by the low bits, which the multiply mixes least
        self.0.rotate_left(26)
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<Fx>>;

/// Nodes grouped by location: locations in name order, members in the order given (what a
/// `BTreeMap<&str, Vec<&Node>>` would collect, without a string-comparing tree walk per node).
pub(crate) fn by_location<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Vec<(&'a str, Vec<&'a Node>)> {
    let mut index: FastMap<&str, usize> = FastMap::default();
    let mut groups: Vec<(&str, Vec<&Node>)> = Vec::new();
    let mut last = usize::MAX; // nodes of a location often come together
    for n in nodes {
        if groups.get(last).is_none_or(|(l, _)| *l != n.location) {
            last = *index.entry(&n.location).or_insert_with(|| {
                groups.push((&n.location, Vec::new()));
                groups.len() - 1
            });
        }
        groups[last].1.push(n);
    }
    groups.sort_unstable_by_key(|(location, _)| *location);
    groups
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

/// A prefix as the range of addresses it covers: (IPv6, first, last), IPv4 widened.
/// Two prefixes [`overlaps`] exactly when their ranges (of one family) intersect.
fn span(net: &IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (
            false,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// Which of `claims` (each one node's prefixes) overlap a prefix of another: only those
/// can clash. Prefixes are nested or disjoint, so one sweep in address order finds them.
fn overlapping(claims: &[Vec<IpNet>]) -> Vec<bool> {
    let mut suspect = vec![false; claims.len()];
    // IPv4 packed in one word per prefix (first address, then the last one descending),
    // which sorts several times faster than the general form IPv6 takes.
    let mut v4: Vec<(u64, usize)> = Vec::new();
    let mut v6: Vec<(u128, std::cmp::Reverse<u128>, usize)> = Vec::new();
    for (i, prefixes) in claims.iter().enumerate() {
        for p in prefixes {
            match span(p) {
                (false, first, last) => {
                    v4.push(((first << 32 | (u128::from(u32::MAX) - last)) as u64, i));
                }
                (true, first, last) => v6.push((first, std::cmp::Reverse(last), i)),
            }
        }
    }
    v4.sort_unstable();
    v6.sort_unstable();
    let v4 = v4.into_iter().map(|(key, i)| {
        let first = u128::from(key >> 32);
        (
            first,
            u128::from(u32::MAX) - u128::from(key & u64::from(u32::MAX)),
            i,
        )
    });
    let v6 = v6
        .into_iter()
        .map(|(first, std::cmp::Reverse(last), i)| (first, last, i));
    sweep(v4, &mut suspect);
    sweep(v6, &mut suspect);
    suspect
}

/// Marks the owners of overlapping spans (first, last, owner), given by start and the wider
/// first, so that a span comes after every span that contains it.
fn sweep(spans: impl Iterator<Item = (u128, u128, usize)>, suspect: &mut [bool]) {
    // The spans containing the current one's start: a chain, each inside the previous.
    let mut open: Vec<(u128, usize)> = Vec::new();
    for (first, last, i) in spans {
        while open.last().is_some_and(|&(olast, _)| olast < first) {
            open.pop();
        }
        for &(_, j) in &open {
            if j != i {
                suspect[i] = true;
                suspect[j] = true;
            }
        }
        open.push((last, i));
    }
}

/// Keep nodes that can take part: they have a key, and neither their prefixes nor their
/// key collide with a node admitted before them (by name, so every node agrees).
fn admit_nodes(
    nodes: impl IntoIterator<Item = Node>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Node> {
    let mut sorted: Vec<Node> = nodes.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let claims: Vec<Vec<IpNet>> = sorted.iter().map(Node::claimed_prefixes).collect();
    // Only a node whose prefixes overlap another's can clash, and only with such a node:
    // the others are admitted without a search.
    let suspect = overlapping(&claims);
    let mut admitted: Vec<Node> = Vec::with_capacity(sorted.len());
    let mut admitted_suspects: Vec<(usize, usize)> = Vec::new();
    let mut keys: FastSet<PublicKey> = FastSet::default();
    for (i, node) in sorted.into_iter().enumerate() {
        let Some(key) = node.public_key else {
            warnings.push(format!(
                "node {} has no public key yet: left out",
                node.name
            ));
            continue;
        };
        // Sorted by name: an admitted namesake is the last one admitted.
        if admitted.last().is_some_and(|a| a.name == node.name) {
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
        // The first clash in name order, among the admitted nodes that can clash at all.
        let clash = suspect[i]
            .then(|| {
                claims[i].iter().find_map(|p| {
                    admitted_suspects.iter().find_map(|&(j, k)| {
                        claims[j]
                            .iter()
                            .find(|q| overlaps(p, q))
                            .map(|q| (*p, k, *q))
                    })
                })
            })
            .flatten();
        if let Some((p, other, q)) = clash {
            keys.remove(&key);
            warnings.push(format!(
                "node {} prefix {p} overlaps {q} of node {}: left out",
                node.name, admitted[other].name
            ));
            continue;
        }
        if suspect[i] {
            admitted_suspects.push((i, admitted.len()));
        }
        admitted.push(node);
    }
    admitted.into_iter().map(|n| (n.name.clone(), n)).collect()
}

/// Keep each node's location prefixes that no one else has: not overlapping any node's
/// own prefixes, any external peer's, or a location prefix accepted before it (nodes in
/// (location, name) order, so every node agrees). Refused ones are said in the warnings.
fn admit_location_prefixes(
    nodes: &mut BTreeMap<String, Node>,
    peers: &BTreeMap<String, ExternalPeer>,
    warnings: &mut Vec<String>,
) {
    if nodes.values().all(|n| n.location_prefixes.is_empty()) {
        return;
    }
    let claimed = Claimed::new(nodes);
    let mut order: Vec<(String, String)> = (nodes.values())
        .filter(|n| !n.location_prefixes.is_empty())
        .map(|n| (n.location.clone(), n.name.clone()))
        .collect();
    order.sort();
    let mut accepted: Vec<(IpNet, String)> = Vec::new();
    for (_, name) in order {
        let node = nodes.get_mut(&name).expect("listed above");
        let mut kept = Vec::new();
        for prefix in std::mem::take(&mut node.location_prefixes) {
            let clash = if claimed.overlaps(&prefix) {
                Some("a node's own prefix".to_string())
            } else if let Some(p) = peers
                .values()
                .find(|p| p.allowed_ips.iter().any(|a| overlaps(a, &prefix)))
            {
                Some(format!("external peer {}", p.name))
            } else {
                accepted
                    .iter()
                    .find(|(a, _)| overlaps(a, &prefix))
                    .map(|(a, by)| format!("{a} of node {by}"))
            };
            match clash {
                Some(what) => warnings.push(format!(
                    "node {name} location prefix {prefix} overlaps {what}: left out"
                )),
                None => {
                    accepted.push((prefix, name.clone()));
                    kept.push(prefix);
                }
            }
        }
        node.location_prefixes = kept;
    }
}

/// The prefixes the admitted nodes claim, sorted, to tell in O(log n) whether any overlaps
/// a given prefix.
struct Claimed {
    /// Sorted by family and first address.
    spans: Vec<(bool, u128, u128)>,
    /// For each span, the greatest (family, last address) up to it.
    reach: Vec<(bool, u128)>,
}

impl Claimed {
    fn new(nodes: &BTreeMap<String, Node>) -> Self {
        let mut spans: Vec<(bool, u128, u128)> = (nodes.values())
            .flat_map(|n| n.claimed_prefixes())
            .map(|p| span(&p))
            .collect();
        spans.sort_unstable();
        let mut reach: Vec<(bool, u128)> = Vec::with_capacity(spans.len());
        for &(v6, _, last) in &spans {
            let here = (v6, last);
            reach.push(reach.last().map_or(here, |r| here.max(*r)));
        }
        Claimed { spans, reach }
    }

    /// Whether a claimed prefix overlaps `net`: one starts inside it, or one that starts
    /// before it reaches into it.
    fn overlaps(&self, net: &IpNet) -> bool {
        let (v6, first, last) = span(net);
        let i = (self.spans).partition_point(|&(f, start, _)| (f, start) < (v6, first));
        self.spans
            .get(i)
            .is_some_and(|&(f, start, _)| (f, start) <= (v6, last))
            || (i > 0 && self.reach[i - 1] >= (v6, first))
    }
}

fn admit_peers(
    peers: impl IntoIterator<Item = ExternalPeer>,
    nodes: &BTreeMap<String, Node>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, ExternalPeer> {
    let mut sorted: Vec<ExternalPeer> = peers.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut admitted: BTreeMap<String, ExternalPeer> = BTreeMap::new();
    if sorted.is_empty() {
        return admitted;
    }
    let node_keys: BTreeSet<PublicKey> = nodes.values().filter_map(|n| n.public_key).collect();
    let mut claimed: Option<Claimed> = None;
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
        // The first taken prefix that overlaps, nodes' before peers': the nodes' are
        // scanned only when the index says one of them does.
        let claimed = claimed.get_or_insert_with(|| Claimed::new(nodes));
        let clashes = |q: &IpNet| peer.allowed_ips.iter().any(|p| overlaps(p, q));
        let peers_taken = || {
            admitted
                .values()
                .flat_map(|p| p.allowed_ips.iter().copied())
        };
        let clash = if peer.allowed_ips.iter().any(|p| claimed.overlaps(p)) {
            (nodes.values())
                .flat_map(|n| n.claimed_prefixes())
                .chain(peers_taken())
                .find(clashes)
        } else {
            peers_taken().find(clashes)
        };
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
mod equivalence;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
