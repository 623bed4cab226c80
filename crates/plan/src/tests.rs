use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use trellis_model::{GatewayPolicy, Granularity::*};

/// A node of location `loc` (0-based) with global index `k`.
fn node(name: &str, loc: usize, k: usize, public: bool) -> Node {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(k as u64 + 1).to_le_bytes());
    Node {
        name: name.to_string(),
        location: format!("site-{loc}"),
        internal_ip: format!("172.20.{loc}.{}/24", k % 250 + 2).parse().unwrap(),
        endpoint: public.then(|| {
            format!("198.18.{}.{}:51820", k / 250, k % 250 + 1)
                .parse()
                .unwrap()
        }),
        listen_port: 51820,
        public_key: Some(PublicKey(key)),
        pod_cidrs: vec![format!("10.244.{k}.0/24").parse().unwrap()],
        gateway: GatewayPolicy::default(),
        overlay_ip: format!("100.64.{}.{}", k / 250, k % 250 + 1)
            .parse()
            .unwrap(),
        probe_ip: Some(
            format!("100.65.{}.{}", k / 250, k % 250 + 1)
                .parse()
                .unwrap(),
        ),
        persistent_keepalive: None,
        location_prefixes: Vec::new(),
    }
}

/// `per_location[i]` nodes in location i; the first `public` of each are public.
fn cluster(per_location: &[usize], public: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (loc, &count) in per_location.iter().enumerate() {
        for i in 0..count {
            let k = nodes.len();
            let name = format!("{}{}", (b'a' + loc as u8) as char, i + 1);
            nodes.push(node(&name, loc, k, i < public));
        }
    }
    nodes
}

/// The same nodes, each with an IPv6 pod CIDR beside its IPv4 one (`fd00:10:244:K::/64`,
/// as the lab's `--dual-stack` gives them).
fn dual_stack(mut nodes: Vec<Node>) -> Vec<Node> {
    for (k, n) in nodes.iter_mut().enumerate() {
        n.pod_cidrs
            .push(format!("fd00:10:244:{k:x}::/64").parse().unwrap());
    }
    nodes
}

fn slots(names: &[&str]) -> Slots {
    names.iter().map(|n| Some(n.to_string())).collect()
}

fn names(slots: Slots) -> Vec<String> {
    active(&slots)
}

fn none() -> BTreeSet<String> {
    BTreeSet::new()
}

fn settings(granularity: Granularity, gateways: usize) -> Settings {
    Settings {
        granularity,
        gateways_per_location: gateways,
        persistent_keepalive: None,
    }
}

fn build(nodes: &[Node], granularity: Granularity, gateways: usize) -> Topology {
    Topology::build(
        settings(granularity, gateways),
        nodes.to_vec(),
        [],
        &BTreeMap::new(),
    )
}

/// Probe addresses in these tests: 100.65.0.0/16.
fn is_probe(net: &IpNet) -> bool {
    "100.65.0.0/16".parse::<IpNet>().unwrap().contains(net)
}

/// The mesh peers of a plan, leaving out peers that exist only to carry probes.
fn peer_names(plan: &Plan) -> Vec<&str> {
    plan.peers
        .iter()
        .filter(|p| !p.allowed_ips.iter().all(is_probe))
        .map(|p| p.name.as_str())
        .collect()
}

fn hop_of<'a>(plan: &'a Plan, node: &Node) -> &'a NextHop {
    &plan
        .routes
        .iter()
        .find(|r| r.dst == node.pod_cidrs[0])
        .unwrap_or_else(|| panic!("{} has no route to {}", plan.node, node.name))
        .next_hop
}

fn tunnel(peer: &str) -> NextHop {
    NextHop::Tunnel { peer: peer.into() }
}

fn internal(nodes: &[Node], name: &str) -> NextHop {
    let n = nodes.iter().find(|n| n.name == name).unwrap();
    NextHop::Internal {
        node: name.into(),
        via: n.internal_ip.addr(),
    }
}

// ---------------------------------------------------------------- table tests

#[test]
fn location_granularity_routes_through_one_gateway_per_location() {
    let nodes = cluster(&[3, 3], 2);
    let t = build(&nodes, Location, 1);
    assert_eq!(t.gateways["site-0"], ["a1"]);
    assert_eq!(t.gateways["site-1"], ["b1"]);
    // gateway: tunnels only to the other gateway, plain to its own location
    let a1 = t.plan_for("a1").unwrap();
    assert!(a1.is_gateway);
    assert_eq!(peer_names(&a1), ["b1"]);
    assert_eq!(hop_of(&a1, &nodes[4]), &tunnel("b1"));
    assert_eq!(hop_of(&a1, &nodes[1]), &internal(&nodes, "a2"));
    // the gateway's peer entry carries the whole remote location
    let b1 = a1.peers.iter().find(|p| p.name == "b1").unwrap();
    let mesh: Vec<&IpNet> = b1.allowed_ips.iter().filter(|ip| !is_probe(ip)).collect();
    assert_eq!(mesh.len(), 6, "3 pod CIDRs + 3 overlay addresses");
    assert_eq!(
        b1.endpoint.as_ref().unwrap().to_string(),
        "198.18.0.4:51820"
    );
    // non-gateway: no peers, everything remote via its gateway's internal address
    let a3 = t.plan_for("a3").unwrap();
    assert!(peer_names(&a3).is_empty());
    assert_eq!(hop_of(&a3, &nodes[5]), &internal(&nodes, "a1"));
    assert_eq!(hop_of(&a3, &nodes[1]), &internal(&nodes, "a2"));
}

#[test]
fn full_granularity_tunnels_every_reachable_pair() {
    let nodes = cluster(&[3, 3], 2);
    let t = build(&nodes, Full, 1);
    // a public node: every node of its location and every public node elsewhere
    let a2 = t.plan_for("a2").unwrap();
    assert_eq!(peer_names(&a2), ["a1", "a3", "b1", "b2"]);
    // the private b3 is reached through its gateway b1
    assert_eq!(hop_of(&a2, &nodes[5]), &tunnel("b1"));
    // same-location peers are dialled on the internal address
    let a1 = a2.peers.iter().find(|p| p.name == "a1").unwrap();
    assert_eq!(
        a1.endpoint.as_ref().unwrap().to_string(),
        "172.20.0.2:51820"
    );
    // a private node tunnels inside its location, and leaves it through its gateway
    let a3 = t.plan_for("a3").unwrap();
    assert_eq!(peer_names(&a3), ["a1", "a2"]);
    assert_eq!(hop_of(&a3, &nodes[4]), &tunnel("a1"));
    assert_eq!(hop_of(&a3, &nodes[5]), &tunnel("a1"));
}

#[test]
fn cross_granularity_never_tunnels_inside_a_location() {
    let nodes = cluster(&[3, 3], 2);
    let t = build(&nodes, Cross, 1);
    let a2 = t.plan_for("a2").unwrap();
    assert_eq!(peer_names(&a2), ["b1", "b2"]);
    assert_eq!(hop_of(&a2, &nodes[0]), &internal(&nodes, "a1"));
    assert_eq!(hop_of(&a2, &nodes[5]), &tunnel("b1"));
    let a3 = t.plan_for("a3").unwrap();
    assert!(peer_names(&a3).is_empty());
    assert_eq!(hop_of(&a3, &nodes[4]), &internal(&nodes, "a1"));
}

#[test]
fn hybrid_granularity_tunnels_between_public_nodes_only() {
    let nodes = cluster(&[3, 3], 2);
    let t = build(&nodes, Hybrid, 1);
    let a2 = t.plan_for("a2").unwrap();
    assert_eq!(peer_names(&a2), ["a1", "b1", "b2"]);
    assert_eq!(hop_of(&a2, &nodes[2]), &internal(&nodes, "a3"));
    let a3 = t.plan_for("a3").unwrap();
    assert!(peer_names(&a3).is_empty());
    assert_eq!(hop_of(&a3, &nodes[1]), &internal(&nodes, "a2"));
    assert_eq!(hop_of(&a3, &nodes[3]), &internal(&nodes, "a1"));
}

#[test]
fn several_gateways_split_a_location_between_them() {
    let nodes = cluster(&[8, 8], 3);
    let t = build(&nodes, Location, 2);
    assert_eq!(t.gateways["site-0"], ["a1", "a2"]);
    let served: BTreeSet<&str> = t
        .serving
        .iter()
        .filter(|(n, _)| n.starts_with('a'))
        .map(|(_, g)| g.as_str())
        .collect();
    assert_eq!(
        served,
        BTreeSet::from(["a1", "a2"]),
        "both gateways serve someone"
    );
    // every remote gateway peer entry lists exactly its own share
    let b1 = t.plan_for("b1").unwrap();
    for peer in b1
        .peers
        .iter()
        .filter(|p| !p.allowed_ips.iter().all(is_probe))
    {
        let share: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.name == peer.name || t.serving.get(&n.name) == Some(&peer.name))
            .collect();
        let mesh = peer.allowed_ips.iter().filter(|ip| !is_probe(ip)).count();
        assert_eq!(mesh, share.len() * 2, "{}", peer.name);
    }
}

#[test]
fn gateway_choice_is_sticky_and_prefers_public_then_priority() {
    let mut nodes = cluster(&[4], 2);
    nodes[3].gateway.priority = 100; // private: ranks after the public ones anyway
    nodes[1].gateway.priority = 5;
    let members: Vec<&Node> = nodes.iter().collect();
    assert_eq!(
        names(choose_gateways(&members, &slots(&[]), 1, &none())),
        ["a2"]
    );
    assert_eq!(
        names(choose_gateways(&members, &slots(&[]), 3, &none())),
        ["a2", "a1"],
        "private nodes only as a last resort"
    );
    // a previous choice stays even when a better-ranked node exists
    assert_eq!(
        names(choose_gateways(&members, &slots(&["a1"]), 1, &none())),
        ["a1"]
    );
    assert_eq!(
        names(choose_gateways(&members, &slots(&["a1"]), 2, &none())),
        ["a1", "a2"]
    );
    // a private node serves only where no public node qualifies
    let private: Vec<Node> = cluster(&[3], 0);
    let members: Vec<&Node> = private.iter().collect();
    assert_eq!(
        names(choose_gateways(&members, &slots(&["a3"]), 2, &none())),
        ["a3", "a1"]
    );
    // ...but not once it is no longer eligible or gone
    nodes[0].gateway.eligible = false;
    let members: Vec<&Node> = nodes.iter().collect();
    assert_eq!(
        names(choose_gateways(&members, &slots(&["a1"]), 1, &none())),
        ["a2"]
    );
    assert_eq!(
        names(choose_gateways(&members, &slots(&["zz"]), 1, &none())),
        ["a2"]
    );
}

#[test]
fn a_newly_eligible_node_does_not_displace_the_gateway() {
    let mut nodes = cluster(&[3, 2], 2);
    nodes[0].gateway.eligible = false;
    let t = build(&nodes, Location, 1);
    assert_eq!(t.gateways["site-0"], ["a2"]);
    nodes[0].gateway.eligible = true;
    nodes[0].gateway.priority = 10;
    let t2 = Topology::build(settings(Location, 1), nodes.clone(), [], &t.slots);
    assert_eq!(t2.gateways["site-0"], ["a2"]);
}

#[test]
fn nodes_without_keys_or_with_clashing_prefixes_are_left_out_loudly() {
    let mut nodes = cluster(&[3], 1);
    nodes[1].public_key = None;
    nodes[2].pod_cidrs = nodes[0].pod_cidrs.clone();
    let t = build(&nodes, Full, 1);
    assert_eq!(t.nodes.keys().collect::<Vec<_>>(), ["a1"]);
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("a2 has no public key"))
    );
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("a3 prefix 10.244.0.0/24 overlaps"))
    );
    assert_eq!(
        t.plan_for("a2").unwrap_err(),
        PlanError::UnknownNode("a2".into())
    );
}

#[test]
fn a_location_without_eligible_nodes_is_reported_cut_off() {
    let mut nodes = cluster(&[2, 2], 1);
    nodes[2].gateway.eligible = false;
    nodes[3].gateway.eligible = false;
    let t = build(&nodes, Location, 1);
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("site-1") && w.contains("cut off"))
    );
    let a1 = t.plan_for("a1").unwrap();
    assert!(a1.routes.iter().all(|r| {
        !nodes[2..]
            .iter()
            .any(|n| n.owned_prefixes().contains(&r.dst))
    }));
}

fn laptop(key: u8) -> ExternalPeer {
    ExternalPeer {
        name: "laptop".into(),
        public_key: PublicKey([key; 32]),
        allowed_ips: vec!["10.5.0.1/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    }
}

/// Kilo's `allowed-location-ips`: a location's own network, named on one of its nodes, is
/// reached from other locations through the tunnel that reaches that node, and left to
/// that network inside its own location; a prefix someone else has is refused, said.
#[test]
fn location_prefixes_are_routed_from_other_locations_only_and_never_twice() {
    let lan: IpNet = "192.168.50.0/24".parse().unwrap();
    let mut nodes = cluster(&[3, 3], 2);
    // a3 is private: other locations reach it, and its location's LAN, via a gateway.
    nodes[2].location_prefixes = vec![lan];
    // Part of the same LAN named in a later location, and a prefix that is a pod CIDR.
    nodes[5].location_prefixes = vec!["192.168.50.128/25".parse().unwrap()];
    nodes[4].location_prefixes = vec!["10.244.0.0/24".parse().unwrap()];
    let t = Topology::build(
        settings(Location, 1),
        nodes.clone(),
        [laptop(0xee)],
        &BTreeMap::new(),
    );
    let said = |what: &str| t.warnings.iter().any(|w| w.contains(what));
    assert!(
        said("node b3 location prefix 192.168.50.128/25 overlaps 192.168.50.0/24 of node a3"),
        "{:?}",
        t.warnings
    );
    assert!(
        said("node b2 location prefix 10.244.0.0/24"),
        "{:?}",
        t.warnings
    );
    let b3 = t.plan_for("b3").unwrap();
    let b1 = t.plan_for("b1").unwrap();
    // Private b3 goes through its gateway b1, which tunnels to a3's gateway.
    assert_eq!(route_to(&b3, &lan), &internal(&nodes, "b1"));
    let via = t.serving["a3"].clone();
    assert_eq!(route_to(&b1, &lan), &NextHop::Tunnel { peer: via.clone() });
    let peer = b1.peers.iter().find(|p| p.name == via).unwrap();
    assert!(peer.allowed_ips.contains(&lan), "{peer:?}");
    for inside in ["a1", "a2", "a3"] {
        let plan = t.plan_for(inside).unwrap();
        assert!(
            plan.routes.iter().all(|r| !overlaps(&r.dst, &lan)),
            "{inside} leaves its own LAN to the LAN"
        );
    }
    let conf = showconf::external_peer_config(&t, "laptop").unwrap();
    assert!(conf.contains("192.168.50.0/24"), "{conf}");
}

/// Kilo's `persistent-keepalive` on a node behind a NAT: every peer of that node keeps its
/// mapping open; others keep the cluster's setting.
#[test]
fn a_nodes_keepalive_is_what_its_peers_send_it() {
    let mut nodes = cluster(&[2, 2], 2);
    nodes[2].persistent_keepalive = Some(7);
    let t = build(&nodes, Full, 2);
    let a1 = t.plan_for("a1").unwrap();
    for p in &a1.peers {
        let want = (p.name == "b1").then_some(7);
        assert_eq!(p.persistent_keepalive, want, "{}", p.name);
    }
    let b1 = t.plan_for("b1").unwrap();
    assert!(b1.peers.iter().all(|p| p.persistent_keepalive.is_none()));
}

#[test]
fn external_peers_attach_to_direct_nodes_and_get_a_config_covering_everything() {
    let nodes = cluster(&[3, 3], 2);
    let t = Topology::build(
        settings(Location, 1),
        nodes.clone(),
        [laptop(0xee)],
        &BTreeMap::new(),
    );
    let a1 = t.plan_for("a1").unwrap();
    assert_eq!(peer_names(&a1), ["b1", "laptop"]);
    let a3 = t.plan_for("a3").unwrap();
    let to_laptop = a3
        .routes
        .iter()
        .find(|r| r.dst.to_string() == "10.5.0.1/32")
        .unwrap();
    assert_eq!(to_laptop.next_hop, internal(&nodes, "a1"));

    let conf = showconf::external_peer_config(&t, "laptop").unwrap();
    assert_eq!(conf.matches("[Peer]").count(), 2, "{conf}");
    for n in &nodes {
        assert!(
            conf.contains(&n.pod_cidrs[0].to_string()),
            "{} missing:\n{conf}",
            n.name
        );
    }
    assert!(conf.contains("Address = 10.5.0.1/32"));
    assert!(showconf::external_peer_config(&t, "nobody").is_none());
}

#[test]
fn external_peers_that_clash_are_left_out() {
    let nodes = cluster(&[2], 1);
    let mut p = laptop(1); // same key as node a1
    p.public_key = nodes[0].public_key.unwrap();
    let mut q = laptop(0xee);
    q.name = "a2".into();
    let mut r = laptop(0xef);
    r.name = "overlapping".into();
    r.allowed_ips = vec!["10.244.0.0/16".parse().unwrap()];
    let t = Topology::build(settings(Full, 1), nodes, [p, q, r], &BTreeMap::new());
    assert!(t.peers.is_empty());
    assert_eq!(t.warnings.len(), 3, "{:?}", t.warnings);
}

#[test]
fn graph_draws_locations_gateways_and_tunnels() {
    let nodes = cluster(&[2, 2], 1);
    let dot = graph::dot(&build(&nodes, Location, 1));
    assert!(dot.starts_with("graph trellis {"));
    assert_eq!(dot.matches("subgraph cluster_").count(), 2);
    assert!(dot.contains("\"a1\" -- \"b1\";"));
    assert!(dot.contains("\"a2\" -- \"a1\" [style=dashed"));
    assert_eq!(dot.matches("style=bold").count(), 2);
}

#[test]
fn node_config_lists_every_peer() {
    let nodes = cluster(&[2, 2], 2);
    let t = build(&nodes, Full, 1);
    let conf = showconf::node_config(&t.plan_for("a1").unwrap(), 51820);
    assert_eq!(conf.matches("[Peer]").count(), 3);
    assert!(conf.contains("ListenPort = 51820"));
}

#[test]
fn gateways_measured_down_are_replaced_and_only_their_share_moves() {
    let nodes = cluster(&[8, 3], 3);
    let healthy = build(&nodes, Location, 2);
    assert_eq!(healthy.gateways["site-0"], ["a1", "a2"]);
    let down = BTreeSet::from(["a1".to_string()]);
    let failed = Topology::build_with_health(
        settings(Location, 2),
        nodes.clone(),
        [],
        &healthy.slots,
        &down,
    );
    assert_eq!(
        failed.gateways["site-0"],
        ["a3", "a2"],
        "a3 takes a1's slot, a2 keeps its own"
    );
    for (node, gw) in &healthy.serving {
        if node == "a3" {
            continue; // now a gateway itself
        }
        let expected = if gw == "a1" { "a3" } else { gw.as_str() };
        assert_eq!(failed.serving[node], expected, "{node} was served by {gw}");
    }
    assert_full_reachability(&failed);
    // a recovered gateway gets a place back only through a vacancy: sticky
    let recovered = Topology::build_with_health(
        settings(Location, 2),
        nodes.clone(),
        [],
        &failed.slots,
        &none(),
    );
    assert_eq!(recovered.gateways["site-0"], ["a3", "a2"]);
    // with every candidate down the location says so loudly
    let all = BTreeSet::from(["a1".to_string(), "a2".to_string(), "a3".to_string()]);
    let cut = Topology::build_with_health(settings(Location, 2), nodes, [], &BTreeMap::new(), &all);
    assert!(cut.gateways["site-0"].is_empty());
    assert!(
        cut.warnings
            .iter()
            .any(|w| w.contains("site-0 has NO WORKING GATEWAY")),
        "{:?}",
        cut.warnings
    );
}

#[test]
fn every_candidate_is_probed_by_observers_it_can_reach_along_dedicated_routes() {
    let nodes = cluster(&[3, 3, 2], 2);
    for g in Granularity::ALL {
        let t = build(&nodes, g, 1);
        let plans = all_plans(&t);
        // candidates: the public nodes, active (a1) or standby (a2)
        assert_eq!(
            t.observers.keys().collect::<Vec<_>>(),
            ["a1", "a2", "b1", "b2", "c1", "c2"]
        );
        for (gateway, observers) in &t.observers {
            assert_eq!(observers.len(), 3, "{gateway}: {observers:?}");
            let locations: BTreeSet<&str> = observers
                .iter()
                .map(|o| t.nodes[o].location.as_str())
                .collect();
            assert!(
                locations.len() >= 2,
                "{gateway}: observers from one location only: {observers:?}"
            );
            let probe = IpNet::from(t.nodes[gateway].probe_ip.unwrap());
            for o in observers {
                let here = &t.nodes[o];
                let there = &t.nodes[gateway];
                assert!(here.location == there.location || (here.is_public() && there.is_public()));
                // the observer routes the gateway's probe address into the tunnel to it...
                let route = plans[o]
                    .routes
                    .iter()
                    .find(|r| r.dst == probe)
                    .expect("probe route");
                assert_eq!(route.next_hop, tunnel(gateway));
                assert!(plans[o].observe.iter().any(|p| &p.gateway == gateway));
                // ...and the gateway routes the observer's back, so answers return the same way
                let back = IpNet::from(here.probe_ip.unwrap());
                let peer = plans[gateway]
                    .peers
                    .iter()
                    .find(|p| &p.name == o)
                    .expect("gateway peers with its observer");
                assert!(peer.allowed_ips.contains(&back));
            }
            // a gateway relays probes to up to three nodes behind it, each on its own ids
            let relay = &plans[gateway].relay;
            assert_eq!(
                relay.len(),
                t.nodes
                    .values()
                    .filter(|n| n.location == t.nodes[gateway].location)
                    .count()
                    - 1
            );
            assert!(
                relay
                    .iter()
                    .all(|r| t.nodes[&r.node].location == t.nodes[gateway].location)
            );
        }
        // probes ride on the mesh without breaking it
        assert_full_reachability(&t);
    }
}

// ---------------------------------------------------------------- IPv6 pod CIDRs

/// A node's route to `dst`, which must exist.
fn route_to<'a>(plan: &'a Plan, dst: &IpNet) -> &'a NextHop {
    &plan
        .routes
        .iter()
        .find(|r| r.dst == *dst)
        .unwrap_or_else(|| panic!("{} has no route to {dst}", plan.node))
        .next_hop
}

/// What a hop toward an IPv6 prefix must be, given the hop toward the same node's IPv4
/// prefix: the same tunnel, or the same node over the internal network at its link-local
/// stand-in (an IPv6 packet cannot be routed to an IPv4 gateway).
fn as_ipv6_hop(v4_hop: &NextHop) -> NextHop {
    match v4_hop {
        NextHop::Tunnel { peer } => tunnel(peer),
        NextHop::Internal { node, via } => NextHop::Internal {
            node: node.clone(),
            via: IpAddr::V6(internal_link_local(match via {
                IpAddr::V4(v4) => *v4,
                IpAddr::V6(_) => panic!("an IPv4 internal network in these tests"),
            })),
        },
    }
}

/// In every granularity, each node's IPv6 pod CIDR takes exactly the path its IPv4 one
/// takes: the same tunnel and the same peer's allowed IPs, or the same node over the
/// internal network (at its link-local stand-in, since Linux has no IPv6 route to an IPv4
/// gateway). Every pair of pods reaches each other in both families, hop by hop.
#[test]
fn ipv6_pod_cidrs_follow_their_nodes_ipv4_paths_in_every_granularity() {
    for g in Granularity::ALL {
        for (shape, gateways) in [(vec![3, 3], 1), (vec![3, 3], 2), (vec![4, 1, 3], 2)] {
            let nodes = dual_stack(cluster(&shape, 2));
            let t = build(&nodes, g, gateways);
            assert!(t.warnings.is_empty(), "{:?}", t.warnings);
            let mut internal_v6 = 0;
            for plan in all_plans(&t).values() {
                let me = &t.nodes[&plan.node];
                let IpAddr::V4(internal) = me.internal_ip.addr() else {
                    unreachable!()
                };
                assert_eq!(
                    plan.internal_link_local,
                    Some(internal_link_local(internal)),
                    "{g}: {} answers on its link-local stand-in",
                    plan.node
                );
                for other in nodes.iter().filter(|n| n.name != plan.node) {
                    let (v4, v6) = (other.pod_cidrs[0], other.pod_cidrs[1]);
                    let hop = route_to(plan, &v6);
                    assert_eq!(
                        hop,
                        &as_ipv6_hop(route_to(plan, &v4)),
                        "{g}: {} -> {}",
                        plan.node,
                        other.name
                    );
                    match hop {
                        NextHop::Tunnel { peer } => {
                            let entry = plan.peers.iter().find(|p| &p.name == peer).unwrap();
                            assert!(entry.allowed_ips.contains(&v6), "{g}: {entry:?}");
                            assert!(entry.allowed_ips.contains(&v4), "{g}: {entry:?}");
                        }
                        NextHop::Internal { .. } => internal_v6 += 1,
                    }
                }
            }
            // location, cross and hybrid route over internal networks; full never does
            assert_eq!(internal_v6 == 0, g == Full, "{g} {shape:?}");
            assert_full_reachability(&t);
        }
    }
}

#[test]
fn a_private_node_sends_ipv6_to_its_gateway_at_the_gateways_link_local_stand_in() {
    let nodes = dual_stack(cluster(&[3, 3], 2));
    let t = build(&nodes, Location, 1);
    let a3 = t.plan_for("a3").unwrap();
    // b3's IPv6 pods: through a1, on the internal network, at fe80::<a1's 172.20.0.2>
    assert_eq!(
        route_to(&a3, &nodes[5].pod_cidrs[1]),
        &NextHop::Internal {
            node: "a1".into(),
            via: "fe80::ac14:2".parse().unwrap(),
        }
    );
    // a1 tunnels them to b1, whose peer entry carries location b's IPv6 CIDRs too
    let a1 = t.plan_for("a1").unwrap();
    assert_eq!(route_to(&a1, &nodes[5].pod_cidrs[1]), &tunnel("b1"));
    let b1 = a1.peers.iter().find(|p| p.name == "b1").unwrap();
    for b in &nodes[3..] {
        assert!(b.pod_cidrs.iter().all(|c| b1.allowed_ips.contains(c)));
    }
    // and routes its own location's IPv6 pods back in at their stand-ins
    assert_eq!(
        route_to(&a1, &nodes[2].pod_cidrs[1]),
        &NextHop::Internal {
            node: "a3".into(),
            via: "fe80::ac14:4".parse().unwrap(),
        }
    );
    // the IPv4 routes are what they were
    assert_eq!(hop_of(&a3, &nodes[5]), &internal(&nodes, "a1"));
}

#[test]
fn the_link_local_stand_in_is_asked_for_only_while_the_mesh_carries_ipv6() {
    let v4_only = cluster(&[3, 3], 2);
    for plan in all_plans(&build(&v4_only, Location, 1)).values() {
        assert_eq!(plan.internal_link_local, None, "{}", plan.node);
    }
    // one IPv6 CIDR anywhere (here on b3 only): every node may have to forward toward it
    let mut one = v4_only.clone();
    one[5].pod_cidrs.push("fd00:10:244:5::/64".parse().unwrap());
    let t = build(&one, Location, 1);
    let plans = all_plans(&t);
    assert!(plans.values().all(|p| p.internal_link_local.is_some()));
    assert_reachability_except(&t, |_, _| false);
    // an external peer's IPv6 addresses count too; its route leaves a private node through
    // the gateway's stand-in
    let mut laptop = laptop(0xee);
    laptop.allowed_ips.push("fd00:5::1/128".parse().unwrap());
    let t = Topology::build(
        settings(Location, 1),
        v4_only.clone(),
        [laptop],
        &BTreeMap::new(),
    );
    let a3 = t.plan_for("a3").unwrap();
    assert_eq!(a3.internal_link_local, "fe80::ac14:4".parse().ok());
    assert_eq!(
        route_to(&a3, &"fd00:5::1/128".parse().unwrap()),
        &NextHop::Internal {
            node: "a1".into(),
            via: "fe80::ac14:2".parse().unwrap(),
        }
    );
    // a node on an IPv6 internal network needs no stand-in: IPv6 routes point at its own
    // address, IPv4 ones too (RFC 5549)
    let mut v6_internal = dual_stack(cluster(&[3], 1));
    for (i, n) in v6_internal.iter_mut().enumerate() {
        n.internal_ip = format!("fd20::{}/64", i + 2).parse().unwrap();
    }
    let t = build(&v6_internal, Location, 1);
    let a2 = t.plan_for("a2").unwrap();
    assert_eq!(a2.internal_link_local, None);
    let a3 = &v6_internal[2];
    for cidr in &a3.pod_cidrs {
        assert_eq!(
            route_to(&a2, cidr),
            &NextHop::Internal {
                node: "a3".into(),
                via: "fd20::4".parse().unwrap(),
            }
        );
    }
}

#[test]
fn internal_next_hops_are_always_of_a_family_linux_can_route() {
    let v4: IpAddr = "172.20.1.23".parse().unwrap();
    let v6: IpAddr = "fd20::17".parse().unwrap();
    let (to_v4, to_v6): (IpNet, IpNet) = (
        "10.244.0.0/24".parse().unwrap(),
        "fd00::/64".parse().unwrap(),
    );
    assert_eq!(internal_via(&to_v4, v4), v4);
    assert_eq!(internal_via(&to_v6, v6), v6);
    assert_eq!(internal_via(&to_v4, v6), v6, "RFC 5549: RTA_VIA");
    assert_eq!(
        internal_via(&to_v6, v4),
        "fe80::ac14:117".parse::<IpAddr>().unwrap()
    );
    // distinct IPv4 addresses, distinct stand-ins; all link-local
    let a = internal_link_local("172.20.0.10".parse().unwrap());
    let b = internal_link_local("172.20.0.11".parse().unwrap());
    assert_ne!(a, b);
    assert!(a.is_unicast_link_local() && b.is_unicast_link_local());
    assert_eq!(
        internal_link_local("255.255.255.255".parse().unwrap()).to_string(),
        "fe80::ffff:ffff"
    );
}

// ---------------------------------------------------------------- forwarding simulation

/// Follow a packet from `src` (address `src_ip`) to address `dst_ip` hop by hop through
/// every node's plan, checking that each hop is physically possible and that WireGuard's
/// cryptokey routing accepts it on arrival. Returns the path of node names.
fn forward(
    t: &Topology,
    plans: &BTreeMap<String, Plan>,
    src: &str,
    src_ip: IpNet,
    dst_ip: IpNet,
) -> Result<Vec<String>, String> {
    let owner = |ip: &IpNet| {
        t.nodes
            .values()
            .find(|n| n.owned_prefixes().iter().any(|p| p.contains(ip)))
            .map(|n| n.name.clone())
    };
    let dst = owner(&dst_ip).ok_or("destination owned by nobody")?;
    let mut path = vec![src.to_string()];
    let mut at = src.to_string();
    while at != dst {
        if path.len() > 6 {
            return Err(format!("too long: {path:?}"));
        }
        let plan = &plans[&at];
        let mut matches = plan.routes.iter().filter(|r| r.dst.contains(&dst_ip));
        let route = matches
            .next()
            .ok_or_else(|| format!("{at} has no route to {dst_ip} ({path:?})"))?;
        if matches.next().is_some() {
            return Err(format!("{at} has two routes to {dst_ip}"));
        }
        let here = &t.nodes[&at];
        let next = match &route.next_hop {
            NextHop::Tunnel { peer } => {
                let entry = plan
                    .peers
                    .iter()
                    .find(|p| &p.name == peer)
                    .ok_or(format!("{at} routes to missing peer {peer}"))?;
                if !entry.allowed_ips.iter().any(|p| p.contains(&dst_ip)) {
                    return Err(format!("{at}: peer {peer} does not allow {dst_ip}"));
                }
                let there = &t.nodes[peer];
                let reachable =
                    here.location == there.location || (here.is_public() && there.is_public());
                if !reachable {
                    return Err(format!("{at} cannot reach {peer} physically"));
                }
                let pair = if at < *peer {
                    (at.clone(), peer.clone())
                } else {
                    (peer.clone(), at.clone())
                };
                if t.broken_paths.contains(&pair) {
                    return Err(format!(
                        "{at} sends through the broken path to {peer} ({path:?})"
                    ));
                }
                // cryptokey routing on receive: the source must be allowed for the sender
                let back = plans[peer]
                    .peers
                    .iter()
                    .find(|p| p.name == at)
                    .ok_or(format!("{peer} has no peer entry for {at}"))?;
                if !back.allowed_ips.iter().any(|p| p.contains(&src_ip)) {
                    return Err(format!(
                        "{peer} would drop {src_ip} arriving from {at} ({path:?})"
                    ));
                }
                peer.clone()
            }
            NextHop::Internal { node, via } => {
                let there = &t.nodes[node];
                if there.location != here.location {
                    return Err(format!("{at} routes via {node} outside its location"));
                }
                // The kernel takes an IPv4 destination to an IPv6 gateway, never the
                // converse; a link-local gateway is answered only by a node that carries it.
                let answers = match via {
                    IpAddr::V4(_) => dst_ip.addr().is_ipv4() && *via == there.internal_ip.addr(),
                    IpAddr::V6(v6) if v6.is_unicast_link_local() => {
                        plans[node].internal_link_local == Some(*v6)
                    }
                    IpAddr::V6(_) => *via == there.internal_ip.addr(),
                };
                if !answers {
                    return Err(format!(
                        "{at} routes {dst_ip} via {via}, which {node} does not answer ({path:?})"
                    ));
                }
                node.clone()
            }
        };
        if path.contains(&next) {
            return Err(format!("loop: {path:?} -> {next}"));
        }
        path.push(next.clone());
        at = next;
    }
    Ok(path)
}

fn all_plans(t: &Topology) -> BTreeMap<String, Plan> {
    t.nodes
        .keys()
        .map(|n| (n.clone(), t.plan_for(n).unwrap()))
        .collect()
}

fn assert_full_reachability(t: &Topology) {
    assert_reachability_except(t, |_, _| false);
}

/// Every pair reaches each other with no loop, no cryptokey violation and no hop across a
/// broken path, except pairs for which `cut` says the topology may leave them unreachable.
fn assert_reachability_except(t: &Topology, cut: impl Fn(&Node, &Node) -> bool) {
    let plans = all_plans(t);
    for plan in plans.values() {
        // allowed IPs of a node's peers never overlap
        let all: Vec<(&str, IpNet)> = plan
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |ip| (p.name.as_str(), *ip)))
            .collect();
        for (i, (pa, a)) in all.iter().enumerate() {
            for (pb, b) in &all[i + 1..] {
                assert!(!overlaps(a, b), "{}: {pa} {a} overlaps {pb} {b}", plan.node);
            }
        }
        let peer_keys: BTreeSet<_> = plan.peers.iter().map(|p| p.public_key).collect();
        assert_eq!(peer_keys.len(), plan.peers.len());
    }
    for src in t.nodes.values() {
        for dst in t.nodes.values() {
            if src.name == dst.name {
                continue;
            }
            // every pod CIDR to every pod CIDR of the same family (dual-stack nodes have two)
            let pod_pairs = (src.pod_cidrs.iter()).flat_map(|s| {
                (dst.pod_cidrs.iter())
                    .filter(|d| d.addr().is_ipv4() == s.addr().is_ipv4())
                    .map(|d| (*s, *d))
            });
            let overlay = (IpNet::from(src.overlay_ip), IpNet::from(dst.overlay_ip));
            for (s, d) in pod_pairs.chain([overlay]) {
                let host = |n: IpNet| IpNet::from(n.hosts().next().unwrap_or(n.addr()));
                if let Err(e) = forward(t, &plans, &src.name, host(s), host(d)) {
                    if cut(src, dst) && e.contains("has no route") {
                        continue;
                    }
                    panic!(
                        "{} -> {} ({}): {e}",
                        src.name, dst.name, t.settings.granularity
                    );
                }
            }
        }
    }
}

#[test]
fn every_granularity_connects_the_lab_shapes() {
    for g in Granularity::ALL {
        for (shape, gws) in [
            (vec![3, 3], 1),
            (vec![4, 4, 4], 1),
            (vec![3, 3], 2),
            (vec![1], 1),
            (vec![5, 1, 2], 3),
        ] {
            let t = build(&cluster(&shape, 2), g, gws);
            assert!(t.warnings.is_empty(), "{:?}", t.warnings);
            assert_full_reachability(&t);
        }
    }
}

#[test]
fn a_broken_direct_path_is_relayed_through_a_gateway_both_ways() {
    // full granularity, two public nodes per location: a0-a1 and b0-b1 tunnel to everyone
    let nodes = cluster(&[3, 3], 2);
    let base = build(&nodes, Granularity::Full, 2);
    let (a, b) = ("a1", "b1");
    let t = base.clone().with_broken_paths([(b, a)]);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(
        t.broken_paths,
        BTreeSet::from([("a1".to_string(), "b1".to_string())])
    );
    let plans = all_plans(&t);
    let via_a = hop_of(&plans[a], &nodes[3]).clone();
    let via_b = hop_of(&plans[b], &nodes[0]).clone();
    let NextHop::Tunnel { peer: relay } = &via_a else {
        panic!("{a} reaches {b} through a tunnel to a relay, not {via_a:?}")
    };
    assert_ne!(relay, b);
    assert_eq!(via_b, tunnel(relay), "both ends use the same relay");
    // the direct peer stays, carrying only the probe addresses, so the path is measured
    let direct = plans[a]
        .peers
        .iter()
        .find(|p| p.name == b)
        .expect("probe-only peer");
    assert!(direct.allowed_ips.iter().all(is_probe), "{direct:?}");
    let path = plans[a].paths.iter().find(|p| p.peer == b).unwrap();
    assert!(path.broken);
    assert_full_reachability(&t);
    // everything not involving the pair is unchanged
    for n in nodes.iter().filter(|n| n.name != a && n.name != b) {
        let strip = |p: &Plan| -> Vec<RoutePlan> {
            p.routes
                .iter()
                .filter(|r| !is_probe(&r.dst))
                .cloned()
                .collect()
        };
        assert_eq!(
            strip(&base.plan_for(&n.name).unwrap()),
            strip(&plans[&n.name]),
            "routes of {}",
            n.name
        );
    }
}

#[test]
fn a_broken_path_between_the_only_gateways_is_reported_cut() {
    let nodes = cluster(&[3, 3], 1);
    let t = build(&nodes, Granularity::Location, 1);
    let ga = &t.gateways["site-0"][0];
    let gb = &t.gateways["site-1"][0];
    let t = t.clone().with_broken_paths([(ga.as_str(), gb.as_str())]);
    assert!(
        t.warnings
            .iter()
            .any(|w| w.contains("no gateway can relay it")),
        "{:?}",
        t.warnings
    );
    // and paths that do not tunnel directly anyway are ignored
    let t = build(&nodes, Granularity::Location, 1).with_broken_paths([
        ("a1", "a1"),
        ("a2", "b3"),
        ("zz", "b1"),
    ]);
    assert!(t.broken_paths.is_empty());
}

// ---------------------------------------------------------------- property tests

#[derive(Debug, Clone)]
struct RandomCluster {
    nodes: Vec<Node>,
    granularity: Granularity,
    gateways: usize,
}

fn random_cluster() -> impl Strategy<Value = RandomCluster> {
    (
        1usize..=20,
        1usize..=200,
        0usize..4,
        1usize..=3,
        any::<u64>(),
    )
        .prop_map(|(locations, total, g, gateways, seed)| {
            let locations = locations.min(total);
            let mut rng = seed;
            let mut next = move || {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                rng >> 33
            };
            let mut nodes = Vec::with_capacity(total);
            for k in 0..total {
                // every location gets at least one node; the first of each is public so
                // that every location can reach the others
                let loc = if k < locations {
                    k
                } else {
                    next() as usize % locations
                };
                let first = k < locations;
                let public = first || next() % 3 == 0;
                let mut n = node(&format!("n{k}"), loc, k, public);
                // about half the clusters are dual-stack, most of their nodes with IPv6
                if seed & 1 == 1 && next() % 5 != 0 {
                    n.pod_cidrs
                        .push(format!("fd00:10:244:{k:x}::/64").parse().unwrap());
                }
                n.gateway.eligible = first || next() % 4 != 0;
                n.gateway.priority = (next() % 3) as i32;
                nodes.push(n);
            }
            RandomCluster {
                nodes,
                granularity: Granularity::ALL[g],
                gateways,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_clusters_are_fully_reachable_without_loops(c in random_cluster()) {
        let t = build(&c.nodes, c.granularity, c.gateways);
        prop_assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_full_reachability(&t);
    }

    #[test]
    fn broken_direct_paths_are_relayed_or_reported(
        c in random_cluster(),
        picks in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..6),
    ) {
        let base = build(&c.nodes, c.granularity, c.gateways);
        let names: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
        let pairs: Vec<(&str, &str)> = picks
            .iter()
            .map(|(x, y)| (names[x.index(names.len())], names[y.index(names.len())]))
            .collect();
        let t = base.with_broken_paths(pairs);
        // unrelayable pairs are named; only traffic that needs one of them may be cut
        let cut: BTreeSet<(String, String)> = t
            .broken_paths
            .iter()
            .filter(|(a, b)| t.warnings.iter().any(|w| w.contains(&format!("{a} <-> {b} ")))).cloned()
            .collect();
        prop_assert!(t.warnings.len() == cut.len(), "{:?}", t.warnings);
        let gateway_of = |n: &Node| t.serving_gateway(n).map(|g| g.name.clone());
        assert_reachability_except(&t, |src, dst| {
            let ends = [Some(src.name.clone()), gateway_of(src)];
            let other_ends = [Some(dst.name.clone()), gateway_of(dst)];
            cut.iter().any(|(a, b)| {
                let (a, b) = (Some(a.clone()), Some(b.clone()));
                (ends.contains(&a) && other_ends.contains(&b)) || (ends.contains(&b) && other_ends.contains(&a))
            })
        });
    }

    #[test]
    fn plans_are_deterministic_whatever_the_input_order(c in random_cluster()) {
        let t = build(&c.nodes, c.granularity, c.gateways);
        let mut reversed = c.nodes.clone();
        reversed.reverse();
        let r = build(&reversed, c.granularity, c.gateways);
        prop_assert_eq!(&t, &r);
        prop_assert_eq!(all_plans(&t), all_plans(&r));
    }

    #[test]
    fn removing_a_node_changes_only_entries_that_involve_it(c in random_cluster(), pick in any::<prop::sample::Index>()) {
        let before = build(&c.nodes, c.granularity, c.gateways);
        let removed = c.nodes[pick.index(c.nodes.len())].clone();
        let rest: Vec<Node> = c.nodes.iter().filter(|n| n.name != removed.name).cloned().collect();
        prop_assume!(!rest.is_empty());
        // the survivors keep the stored gateway record, as a running cluster would
        let after = Topology::build(settings(c.granularity, c.gateways), rest, [], &before.slots);
        let was_gateway = before.is_gateway(&removed);
        let new_gateways: BTreeSet<&String> = after.gateways.values().flatten()
            .filter(|g| !before.gateways.values().flatten().any(|b| b == *g)).collect();
        prop_assert!(was_gateway || new_gateways.is_empty());

        // nodes whose serving gateway changed, and the gateways involved
        let mut involved: BTreeSet<String> = BTreeSet::from([removed.name.clone()]);
        for g in &new_gateways { involved.insert((*g).clone()); }
        for n in after.nodes.values() {
            if before.serving.get(&n.name) != after.serving.get(&n.name) {
                involved.insert(n.name.clone());
                prop_assert!(
                    before.serving.get(&n.name) == Some(&removed.name)
                        || after.serving.get(&n.name).is_some_and(|g| new_gateways.contains(g))
                        || new_gateways.contains(&n.name),
                    "{} moved from {:?} to {:?}", n.name, before.serving.get(&n.name), after.serving.get(&n.name)
                );
            }
        }
        let prefixes_of = |names: &BTreeSet<String>| -> BTreeSet<IpNet> {
            c.nodes.iter().filter(|n| names.contains(&n.name)).flat_map(|n| n.owned_prefixes()).collect()
        };
        let touched = prefixes_of(&involved);
        for name in after.nodes.keys() {
            let old = before.plan_for(name).unwrap();
            let new = after.plan_for(name).unwrap();
            // Probe relations follow the observer choice, which legitimately changes when an
            // observer leaves; they are tested on their own.
            let strip_routes = |p: &Plan| -> Vec<RoutePlan> {
                p.routes.iter().filter(|r| !touched.contains(&r.dst) && !is_probe(&r.dst)
                    && !matches!(&r.next_hop, NextHop::Tunnel { peer } | NextHop::Internal { node: peer, .. } if involved.contains(peer)))
                    .cloned().collect()
            };
            let strip_peers = |p: &Plan| -> Vec<(String, Vec<IpNet>)> {
                p.peers.iter().filter(|q| !involved.contains(&q.name) && !q.allowed_ips.iter().all(is_probe))
                    .map(|q| (q.name.clone(), q.allowed_ips.iter().filter(|ip| !touched.contains(ip) && !is_probe(ip)).copied().collect()))
                    .collect()
            };
            if involved.contains(name) && was_gateway {
                continue; // a moved node's own view legitimately changes wholesale
            }
            prop_assert_eq!(strip_routes(&old), strip_routes(&new), "routes of {}", name);
            prop_assert_eq!(strip_peers(&old), strip_peers(&new), "peers of {}", name);
        }
    }
}
