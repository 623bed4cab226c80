//! The planner as it was before the scale work (commit 799c593), kept as an oracle: the
//! tests in `equivalence` check that the faster planner builds the same topologies and
//! plans. Copied verbatim but for `Topology` becoming `Old` (which derefs to it) and the
//! functions it calls being copied alongside. Delete it with those tests once the planner's
//! results are meant to change.

use crate::gateways::pair_weight;
use crate::health::{OBSERVERS_PER_GATEWAY, TARGETS_PER_GATEWAY, UNRELAYED_ID_RANGE, id_range};
use crate::{
    Hop, NextHop, PathTarget, PeerPlan, Plan, PlanError, ProbeTarget, RelayTarget, RoutePlan,
    Settings, Slots, Topology, active,
};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use trellis_model::{Endpoint, ExternalPeer, Granularity, Node, PublicKey};

/// A topology built and planned the old way.
pub(crate) struct Old(pub Topology);

impl std::ops::Deref for Old {
    type Target = Topology;
    fn deref(&self) -> &Topology {
        &self.0
    }
}

impl std::ops::DerefMut for Old {
    fn deref_mut(&mut self) -> &mut Topology {
        &mut self.0
    }
}

impl Old {
    /// Build the cluster-wide topology. `previous_gateways` is the sticky record of each
    /// location's serving gateways, as last stored.
    pub fn build(
        settings: Settings,
        nodes: impl IntoIterator<Item = Node>,
        peers: impl IntoIterator<Item = ExternalPeer>,
        previous_gateways: &BTreeMap<String, Slots>,
    ) -> Old {
        Self::build_with_health(settings, nodes, peers, previous_gateways, &BTreeSet::new())
    }

    /// [`Topology::build`], leaving out of the gateway choice the nodes measured `down`.
    pub fn build_with_health(
        settings: Settings,
        nodes: impl IntoIterator<Item = Node>,
        peers: impl IntoIterator<Item = ExternalPeer>,
        previous_gateways: &BTreeMap<String, Slots>,
        down: &BTreeSet<String>,
    ) -> Old {
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

        let mut topology = Old(Topology {
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
        });
        topology.serving = topology.assign_serving_gateways();
        topology.observers = candidates(topology.nodes.values())
            .into_iter()
            .map(|g| {
                let observers = observers_for(topology.nodes.values(), g, OBSERVERS_PER_GATEWAY);
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
    ) -> Old {
        for (a, b) in pairs {
            let (Some(na), Some(nb)) = (self.nodes.get(a), self.nodes.get(b)) else {
                continue;
            };
            if a != b && self.tunnels_by_design(na, nb) && na.location != nb.location {
                self.broken_paths.insert(ordered(a, b));
            }
        }
        let mut cut = Vec::new(); // (pushed to `self.warnings` after the loop: borrows)
        for (a, b) in &self.broken_paths {
            let (na, nb) = (&self.nodes[a], &self.nodes[b]);
            if self.relay_for(na, nb).is_none() {
                cut.push(format!(
                    "the direct path {a} <-> {b} is broken and no gateway can relay it: traffic between them is cut"
                ));
            }
        }
        self.0.warnings.extend(cut);
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
                        via: crate::internal_via(&dst, node.internal_ip.addr()),
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
                        relays: relay_targets(self.nodes.values(), g, TARGETS_PER_GATEWAY).len(),
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
            relay_targets(self.nodes.values(), me, TARGETS_PER_GATEWAY)
                .into_iter()
                .enumerate()
                .map(|(i, (node, to))| RelayTarget {
                    node,
                    to,
                    ids: id_range(i),
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
            internal_link_local: match me.internal_ip.addr() {
                std::net::IpAddr::V4(internal) => (self.nodes.values())
                    .flat_map(|n| n.owned_prefixes())
                    .chain(self.peers.values().flat_map(|p| p.allowed_ips.clone()))
                    .any(|p| matches!(p, IpNet::V6(_)))
                    .then(|| crate::internal_link_local(internal)),
                std::net::IpAddr::V6(_) => None,
            },
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

pub fn qualifies_as_gateway(members: &[&Node], m: &Node) -> bool {
    let any_public = members.iter().any(|n| n.gateway.eligible && n.is_public());
    m.gateway.eligible && (m.is_public() || !any_public)
}

/// Fill `wanted` gateway slots among a location's members.
///
/// A gateway must be reachable from other locations, so only eligible nodes with a public
/// endpoint qualify; only a location with none of those falls back to its eligible private
/// nodes (useful where internal networks are routed between locations).
///
/// Sticky: a gateway from `previous` that still qualifies keeps its slot, so a node that
/// qualifies later never displaces one (Kilo issue 39). Nodes in `down` (measured not to
/// forward) lose their slot. Vacant slots are filled by higher priority, then name, so every
/// node fills them the same way.
pub fn choose_gateways(
    members: &[&Node],
    previous: &[Option<String>],
    wanted: usize,
    down: &BTreeSet<String>,
) -> Slots {
    let qualifies = |m: &Node| qualifies_as_gateway(members, m) && !down.contains(&m.name);
    let keeps = |name: &str| members.iter().any(|m| m.name == name && qualifies(m));
    let mut slots: Slots = Vec::with_capacity(wanted);
    for i in 0..wanted {
        let kept = previous
            .get(i)
            .cloned()
            .flatten()
            .filter(|name| keeps(name) && !slots.iter().flatten().any(|s| s == name));
        slots.push(kept);
    }
    let mut candidates: Vec<&&Node> = members
        .iter()
        .filter(|m| qualifies(m) && !slots.iter().flatten().any(|s| *s == m.name))
        .collect();
    candidates.sort_by(|a, b| (b.gateway.priority, &a.name).cmp(&(a.gateway.priority, &b.name)));
    let mut candidates = candidates.into_iter();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match candidates.next() {
            Some(m) => *slot = Some(m.name.clone()),
            None => break,
        }
    }
    slots
}

pub fn serving_slot<'a>(node: &str, slots: &'a [Option<String>]) -> Option<&'a str> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_deref().map(|g| (i, g)))
        .max_by_key(|(i, _)| {
            (
                pair_weight(node, &format!("slot-{i}")),
                std::cmp::Reverse(*i),
            )
        })
        .map(|(_, g)| g)
}

pub fn candidates<'a>(nodes: impl IntoIterator<Item = &'a Node> + Clone) -> Vec<&'a Node> {
    let mut by_location: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in nodes {
        by_location.entry(&n.location).or_default().push(n);
    }
    by_location
        .values()
        .flat_map(|members| {
            members
                .iter()
                .filter(|m| m.probe_ip.is_some() && qualifies_as_gateway(members, m))
                .copied()
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether `a` can send to `b` at all: same location, or both public.
fn can_reach(a: &Node, b: &Node) -> bool {
    a.location == b.location || (a.is_public() && b.is_public())
}

/// Up to `k` observers of `gateway`: nodes with a probe address that can reach it,
/// nodes of other locations before its own, spread over as many locations as possible,
/// ranked within a location by a hash of the pair. Deterministic.
pub fn observers_for<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    gateway: &Node,
    k: usize,
) -> Vec<String> {
    let mut by_location: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in nodes {
        if n.name != gateway.name && n.probe_ip.is_some() && can_reach(n, gateway) {
            by_location.entry(&n.location).or_default().push(n);
        }
    }
    for members in by_location.values_mut() {
        members.sort_by_key(|n| {
            std::cmp::Reverse((pair_weight(&gateway.name, &n.name), n.name.clone()))
        });
    }
    // Round-robin over locations: other locations (ranked by the pair hash of their first
    // member, for spread), then the gateway's own.
    let mut locations: Vec<&str> = by_location
        .keys()
        .copied()
        .filter(|l| *l != gateway.location)
        .collect();
    locations.sort_by_key(|l| std::cmp::Reverse(pair_weight(&gateway.name, l)));
    if by_location.contains_key(gateway.location.as_str()) {
        locations.push(&gateway.location);
    }
    let mut chosen = Vec::with_capacity(k);
    let mut round = 0;
    while chosen.len() < k {
        let mut progressed = false;
        for l in &locations {
            if chosen.len() == k {
                break;
            }
            if let Some(n) = by_location[l].get(round) {
                chosen.push(n.name.clone());
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
        round += 1;
    }
    chosen
}

/// The nodes behind `gateway` that its probes are relayed to: up to `k` of its location's
/// other members, ranked by a hash of the pair. Empty for a location of one.
pub fn relay_targets<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    gateway: &Node,
    k: usize,
) -> Vec<(String, IpAddr)> {
    let mut mates: Vec<&Node> = nodes
        .into_iter()
        .filter(|n| n.location == gateway.location && n.name != gateway.name)
        .collect();
    mates.sort_by_key(|n| std::cmp::Reverse((pair_weight(&gateway.name, &n.name), n.name.clone())));
    mates
        .into_iter()
        .take(k.min(UNRELAYED_ID_RANGE))
        .map(|n| (n.name.clone(), n.internal_ip.addr()))
        .collect()
}
