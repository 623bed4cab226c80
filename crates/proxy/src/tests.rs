//! The planner held to Kubernetes' service semantics: named scenarios, then a property
//! test that traces every kind of packet through plans of random services and compares
//! each fate with an oracle written from the Kubernetes rules directly (not from the
//! planned chains).

use crate::input::*;
use crate::ruleset::chain;
use crate::{Fate, Origin, Packet, Plan, Tracer, plan};
use ipnet::IpNet;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::net::IpAddr;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn port_name(name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: "p".into(),
        protocol,
    }
}

const NODE_IP: &str = "172.20.0.1";
const OUTSIDE: &str = "198.18.7.7";
const POD: &str = "10.244.0.9";

fn node() -> NodeView {
    NodeView {
        name: "a".into(),
        node_port_addresses: vec![ip(NODE_IP), ip("fd20::1"), ip("127.0.0.1")],
        cluster_cidrs: vec![net("10.244.0.0/16"), net("fd44::/48")],
    }
}

fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint::ready(ip(addr), 8080, node)
}

fn web() -> ServicePort {
    ServicePort::cluster_ip(port_name("web", Protocol::Tcp), ip("10.96.0.10"), 80)
}

fn fates(plan: &Plan, src: &str, dst: &str, port: u16, origin: Origin) -> BTreeSet<Fate> {
    let src = ip(src);
    let family = IpFamily::of(src);
    Tracer::new(plan.table(family), &local_addresses()).trace(&Packet {
        src,
        dst: ip(dst),
        protocol: Protocol::Tcp,
        port,
        origin,
    })
}

fn local_addresses() -> Vec<IpAddr> {
    vec![ip(NODE_IP), ip("fd20::1"), ip("10.244.0.1")]
}

fn to(addr: &str, masqueraded: bool) -> Fate {
    Fate::Endpoint {
        addr: ip(addr),
        port: 8080,
        masqueraded,
        remembered: None,
    }
}

#[test]
fn a_cluster_ip_reaches_every_ready_endpoint_and_masquerades_only_from_outside_the_pods() {
    let p = plan(
        &[(web(), vec![ep("10.244.0.5", "a"), ep("10.244.1.5", "b")])],
        &node(),
    );
    assert_eq!(
        fates(&p, POD, "10.96.0.10", 80, Origin::Network),
        [to("10.244.0.5", false), to("10.244.1.5", false)].into()
    );
    assert_eq!(
        fates(&p, NODE_IP, "10.96.0.10", 80, Origin::LocalProcess),
        [to("10.244.0.5", true), to("10.244.1.5", true)].into(),
        "the node's own connections come back through it"
    );
    assert_eq!(
        fates(&p, "10.244.0.5", "10.96.0.10", 80, Origin::Network),
        [to("10.244.0.5", true), to("10.244.1.5", false)].into(),
        "hairpin: an endpoint reaching itself is masqueraded"
    );
}

#[test]
fn a_service_without_endpoints_rejects_and_an_unknown_port_of_a_cluster_ip_is_rejected() {
    let mut svc = web();
    svc.node_port = Some(30080);
    let p = plan(&[(svc, vec![])], &node());
    for origin in [Origin::Network, Origin::LocalProcess] {
        assert_eq!(
            fates(&p, POD, "10.96.0.10", 80, origin),
            [Fate::Rejected].into()
        );
    }
    assert_eq!(
        fates(&p, OUTSIDE, NODE_IP, 30080, Origin::Network),
        [Fate::Rejected].into()
    );

    let p = plan(&[(web(), vec![ep("10.244.1.5", "b")])], &node());
    assert_eq!(
        fates(&p, POD, "10.96.0.10", 81, Origin::Network),
        [Fate::Rejected].into()
    );
    assert_eq!(
        fates(&p, NODE_IP, "10.96.0.10", 81, Origin::LocalProcess),
        [Fate::Rejected].into()
    );
}

#[test]
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
    let mut leaving = ep("10.244.0.5", "a");
    leaving.ready = false;
    leaving.terminating = true;
    let p = plan(
        &[(web(), vec![leaving.clone(), ep("10.244.1.5", "b")])],
        &node(),
    );
    assert_eq!(
        fates(&p, POD, "10.96.0.10", 80, Origin::Network),
        [to("10.244.1.5", false)].into(),
        "no new connection to a terminating endpoint while another is ready"
    );
    let p = plan(&[(web(), vec![leaving])], &node());
    assert_eq!(
        fates(&p, POD, "10.96.0.10", 80, Origin::Network),
        [to("10.244.0.5", false)].into()
    );
}

#[test]
fn node_ports_answer_on_the_node_addresses_only_and_never_on_loopback() {
    let mut svc = web();
    svc.node_port = Some(30080);
    let p = plan(&[(svc, vec![ep("10.244.1.5", "b")])], &node());
    assert_eq!(
        fates(&p, OUTSIDE, NODE_IP, 30080, Origin::Network),
        [to("10.244.1.5", true)].into(),
        "Cluster policy: the client is masqueraded so the reply returns through this node"
    );
    assert_eq!(
        fates(&p, NODE_IP, "127.0.0.1", 30080, Origin::LocalProcess),
        [Fate::Untouched].into()
    );
    assert_eq!(
        fates(&p, OUTSIDE, "10.244.0.1", 30080, Origin::Network),
        [Fate::Untouched].into(),
        "a local address that is not a NodePort address"
    );
}

#[test]
fn local_external_policy_keeps_the_client_address_and_drops_without_a_local_endpoint() {
    let mut svc = web();
    svc.node_port = Some(30080);
    svc.load_balancer_ips = vec![ip("198.51.100.10")];
    svc.external_policy = TrafficPolicy::Local;
    let p = plan(
        &[(
            svc.clone(),
            vec![ep("10.244.0.5", "a"), ep("10.244.1.5", "b")],
        )],
        &node(),
    );
    assert_eq!(
        fates(&p, OUTSIDE, "198.51.100.10", 80, Origin::Network),
        [to("10.244.0.5", false)].into()
    );
    assert_eq!(
        fates(&p, OUTSIDE, NODE_IP, 30080, Origin::Network),
        [to("10.244.0.5", false)].into()
    );
    assert_eq!(
        fates(&p, POD, "198.51.100.10", 80, Origin::Network),
        [to("10.244.0.5", false), to("10.244.1.5", false)].into(),
        "pods are short-circuited to every endpoint"
    );
    assert_eq!(
        fates(&p, NODE_IP, "198.51.100.10", 80, Origin::LocalProcess),
        [to("10.244.0.5", true), to("10.244.1.5", true)].into(),
        "the node itself too, masqueraded"
    );
    assert_eq!(p.health_checks.len(), 0, "no healthCheckNodePort set");

    svc.health_check_node_port = Some(32000);
    let p = plan(&[(svc, vec![ep("10.244.1.5", "b")])], &node());
    assert_eq!(
        fates(&p, OUTSIDE, "198.51.100.10", 80, Origin::Network),
        [Fate::Dropped].into()
    );
    assert_eq!(
        fates(&p, OUTSIDE, NODE_IP, 30080, Origin::Network),
        [Fate::Dropped].into()
    );
    assert_eq!(
        fates(&p, POD, "198.51.100.10", 80, Origin::Network),
        [to("10.244.1.5", false)].into(),
        "pods are still short-circuited to the endpoints elsewhere"
    );
    assert_eq!(p.health_checks[&32000].local_endpoints, 0);
}

#[test]
fn local_internal_policy_uses_only_this_nodes_endpoints() {
    let mut svc = web();
    svc.internal_policy = TrafficPolicy::Local;
    let p = plan(&[(svc.clone(), vec![ep("10.244.1.5", "b")])], &node());
    assert_eq!(
        fates(&p, POD, "10.96.0.10", 80, Origin::Network),
        [Fate::Dropped].into()
    );
    let p = plan(
        &[(svc, vec![ep("10.244.0.5", "a"), ep("10.244.1.5", "b")])],
        &node(),
    );
    assert_eq!(
        fates(&p, POD, "10.96.0.10", 80, Origin::Network),
        [to("10.244.0.5", false)].into()
    );
}

#[test]
fn source_ranges_guard_load_balancer_ips() {
    let mut svc = web();
    svc.load_balancer_ips = vec![ip("198.51.100.10")];
    svc.source_ranges = vec![net("198.18.0.0/16")];
    let p = plan(&[(svc, vec![ep("10.244.1.5", "b")])], &node());
    assert_eq!(
        fates(&p, OUTSIDE, "198.51.100.10", 80, Origin::Network),
        [to("10.244.1.5", true)].into()
    );
    assert_eq!(
        fates(&p, "203.0.113.1", "198.51.100.10", 80, Origin::Network),
        [Fate::Dropped].into()
    );
}

#[test]
fn client_ip_affinity_returns_a_remembered_client_to_its_endpoint() {
    let mut svc = web();
    svc.affinity_seconds = Some(10800);
    let p = plan(
        &[(
            svc.clone(),
            vec![ep("10.244.0.5", "a"), ep("10.244.1.5", "b")],
        )],
        &node(),
    );
    let mut tracer = Tracer::new(&p.v4, &local_addresses());
    let packet = Packet {
        src: ip(POD),
        dst: ip("10.96.0.10"),
        protocol: Protocol::Tcp,
        port: 80,
        origin: Origin::Network,
    };
    let first = tracer.trace(&packet);
    assert_eq!(first.len(), 2, "a new client may go anywhere");
    let set = chain::affinity(&svc.name, ip("10.244.1.5"), 8080);
    assert!(
        first
            .iter()
            .any(|f| matches!(f, Fate::Endpoint { remembered: Some(s), .. } if *s == set))
    );
    tracer.remember(&set, ip(POD));
    assert_eq!(
        tracer.trace(&packet),
        [Fate::Endpoint {
            addr: ip("10.244.1.5"),
            port: 8080,
            masqueraded: false,
            remembered: Some(set),
        }]
        .into()
    );
    assert_eq!(p.v4.services[&svc.name].affinity_sets.len(), 2);
}

#[test]
fn dual_stack_services_are_programmed_in_both_tables_and_single_stack_in_one() {
    let mut svc = web();
    svc.cluster_ips.push(ip("fd00:96::10"));
    let v4_only = ServicePort::cluster_ip(port_name("v4", Protocol::Udp), ip("10.96.0.11"), 53);
    let p = plan(
        &[
            (
                svc.clone(),
                vec![ep("10.244.1.5", "b"), ep("fd44:1::5", "b")],
            ),
            (v4_only.clone(), vec![]),
        ],
        &node(),
    );
    assert_eq!(
        fates(&p, "fd44::9", "fd00:96::10", 80, Origin::Network),
        [to("fd44:1::5", false)].into()
    );
    assert!(p.v6.services.contains_key(&svc.name));
    assert!(!p.v6.services.contains_key(&v4_only.name));
    assert!(p.v4.services.contains_key(&v4_only.name));
}

#[test]
fn an_endpoint_change_replans_only_its_own_service_port() {
    let other = ServicePort::cluster_ip(port_name("other", Protocol::Tcp), ip("10.96.0.20"), 80);
    let before = plan(
        &[
            (web(), vec![ep("10.244.1.5", "b")]),
            (other.clone(), vec![ep("10.244.1.6", "b")]),
        ],
        &node(),
    );
    let after = plan(
        &[
            (web(), vec![ep("10.244.1.5", "b"), ep("10.244.1.7", "b")]),
            (other.clone(), vec![ep("10.244.1.6", "b")]),
        ],
        &node(),
    );
    assert_eq!(
        before.v4.services[&other.name], after.v4.services[&other.name],
        "the other port's rules are untouched"
    );
    assert_ne!(
        before.v4.services[&web().name],
        after.v4.services[&web().name]
    );
}

#[test]
fn names_of_the_longest_ports_fit_in_nftables() {
    let name = ServicePortName {
        namespace: "n".repeat(63),
        name: "s".repeat(63),
        port: "p".repeat(15),
        protocol: Protocol::Sctp,
    };
    let addr = ip("fd00:1111:2222:3333:4444:5555:6666:7777");
    for n in [
        chain::cluster(&name),
        chain::local(&name),
        chain::external(&name),
        chain::firewall(&name),
        chain::endpoint(&name, addr, 65535),
        chain::affinity(&name, addr, 65535),
    ] {
        // NFT_CHAIN_MAXNAMELEN and NFT_SET_MAXNAMELEN are 256 with the NUL.
        assert!(n.len() <= 255, "{n}: {} bytes", n.len());
    }
}

// --- The oracle and the property test ---

/// What Kubernetes says becomes of a packet, written from the service definitions.
fn oracle(
    ports: &[(ServicePort, Vec<Endpoint>)],
    node: &NodeView,
    locals: &[IpAddr],
    p: &Packet,
) -> BTreeSet<Fate> {
    let family = IpFamily::of(p.src);
    let in_cluster = |a: IpAddr| node.cluster_cidrs.iter().any(|n| n.contains(&a));
    let is_local = |a: IpAddr| locals.contains(&a) || a == ip("127.0.0.1") || a == ip("::1");
    let node_port_addr =
        |a: IpAddr| node.node_port_addresses.contains(&a) && !family.loopback().contains(&a);
    // Which port, and whether the traffic is internal (ClusterIP) or external.
    let mut found = None;
    let mut sorted: Vec<&(ServicePort, Vec<Endpoint>)> = ports.iter().collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (port, eps) in &sorted {
        let cluster_ip = port
            .cluster_ips
            .iter()
            .find(|a| IpFamily::of(**a) == family);
        let Some(cluster_ip) = cluster_ip else {
            continue;
        };
        if p.protocol != port.name.protocol {
            continue;
        }
        if p.dst == *cluster_ip && p.port == port.port {
            found = Some((port, eps, false));
            break;
        }
        let external_ip =
            port.external_ips.contains(&p.dst) || port.load_balancer_ips.contains(&p.dst);
        let node_port = port.node_port == Some(p.port) && node_port_addr(p.dst);
        if (external_ip && p.port == port.port) || node_port {
            if external_ip
                && port.load_balancer_ips.contains(&p.dst)
                && p.port == port.port
                && !port.source_ranges.is_empty()
                && !port.source_ranges.iter().any(|r| r.contains(&p.src))
            {
                return [Fate::Dropped].into();
            }
            found = Some((port, eps, true));
            break;
        }
    }
    let Some((port, eps, external)) = found else {
        let is_cluster_ip = ports.iter().any(|(s, _)| s.cluster_ips.contains(&p.dst));
        return [if is_cluster_ip {
            Fate::Rejected
        } else {
            Fate::Untouched
        }]
        .into();
    };
    let of_family: Vec<&Endpoint> = eps
        .iter()
        .filter(|e| IpFamily::of(e.addr) == family)
        .collect();
    let pick = |list: Vec<&Endpoint>| -> Vec<Endpoint> {
        let ready: Vec<Endpoint> = list
            .iter()
            .filter(|e| e.ready)
            .map(|e| (*e).clone())
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        list.iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| (*e).clone())
            .collect()
    };
    let cluster = pick(of_family.clone());
    let local = pick(
        of_family
            .iter()
            .copied()
            .filter(|e| e.node.as_deref() == Some(node.name.as_str()))
            .collect(),
    );
    if cluster.is_empty() {
        return [Fate::Rejected].into();
    }
    let policy = if external {
        port.external_policy
    } else {
        port.internal_policy
    };
    // Pods and the node itself reach a Local service's external addresses as if they
    // were inside the cluster (kube-proxy's short-circuit); only the rest is dropped
    // without a local endpoint.
    let (chosen, masquerade) = if !external {
        if policy == TrafficPolicy::Local && local.is_empty() {
            return [Fate::Dropped].into();
        }
        let chosen = if policy == TrafficPolicy::Local {
            local
        } else {
            cluster
        };
        (chosen, !in_cluster(p.src))
    } else if policy == TrafficPolicy::Cluster {
        (cluster, true)
    } else if in_cluster(p.src) {
        (cluster, false)
    } else if is_local(p.src) {
        (cluster, true)
    } else if local.is_empty() {
        return [Fate::Dropped].into();
    } else {
        (local, false)
    };
    // Hairpin: an endpoint reaching itself, when it is on this node (or on no known one;
    // another node's endpoints reach their service through their own node).
    let hairpin =
        |e: &Endpoint| p.src == e.addr && e.node.as_deref().is_none_or(|n| n == node.name);
    chosen
        .iter()
        .map(|e| Fate::Endpoint {
            addr: e.addr,
            port: e.port,
            masqueraded: masquerade || hairpin(e),
            remembered: port
                .affinity_seconds
                .map(|_| chain::affinity(&port.name, e.addr, e.port)),
        })
        .collect()
}

fn arb_endpoint(family: IpFamily) -> impl Strategy<Value = Endpoint> {
    (
        0u8..2,
        1u8..6,
        any::<(bool, bool, bool)>(),
        prop::sample::select(vec![8080u16, 9090]),
    )
        .prop_map(
            move |(node, host, (ready, serving, terminating), port)| Endpoint {
                addr: match family {
                    IpFamily::V4 => ip(&format!("10.244.{node}.{host}")),
                    IpFamily::V6 => ip(&format!("fd44:{node}::{host}")),
                },
                port,
                ready,
                serving: serving || ready,
                terminating,
                node: Some(["a", "b"][node as usize].to_string()),
            },
        )
}

fn arb_port(index: u8) -> impl Strategy<Value = (ServicePort, Vec<Endpoint>)> {
    (
        prop::sample::select(Protocol::ALL.to_vec()),
        prop::sample::select(vec![53u16, 80, 443]),
        any::<(bool, bool, bool, bool, bool)>(),
        any::<(bool, bool, bool)>(),
        prop::collection::vec(arb_endpoint(IpFamily::V4), 0..5),
        prop::collection::vec(arb_endpoint(IpFamily::V6), 0..3),
    )
        .prop_map(
            move |(
                protocol,
                port,
                (dual, node_port, external_ip, lb, ranges),
                (affinity, ext_local, int_local),
                v4,
                v6,
            )| {
                let mut svc = ServicePort::cluster_ip(
                    ServicePortName {
                        namespace: "ns".into(),
                        name: format!("s{index}"),
                        port: String::new(),
                        protocol,
                    },
                    ip(&format!("10.96.0.{}", 10 + index)),
                    port,
                );
                let mut eps = v4;
                if dual {
                    svc.cluster_ips
                        .push(ip(&format!("fd00:96::{}", 10 + index)));
                    eps.extend(v6);
                }
                if node_port {
                    svc.node_port = Some(30000 + u16::from(index));
                }
                if external_ip {
                    svc.external_ips
                        .push(ip(&format!("203.0.113.{}", 10 + index)));
                }
                if lb {
                    svc.load_balancer_ips
                        .push(ip(&format!("198.51.100.{}", 10 + index)));
                    if ranges {
                        svc.source_ranges = vec![net("198.18.0.0/16")];
                    }
                }
                svc.affinity_seconds = affinity.then_some(300);
                if ext_local && svc.is_external() {
                    svc.external_policy = TrafficPolicy::Local;
                }
                if int_local {
                    svc.internal_policy = TrafficPolicy::Local;
                }
                (svc, eps)
            },
        )
}

fn arb_ports() -> impl Strategy<Value = Vec<(ServicePort, Vec<Endpoint>)>> {
    (0u8..6).prop_flat_map(|n| (0..n).map(arb_port).collect::<Vec<_>>())
}

/// Every packet worth asking about: each service's addresses and ports (and a wrong port)
/// from each kind of source and both origins.
fn packets(ports: &[(ServicePort, Vec<Endpoint>)]) -> Vec<Packet> {
    let mut dsts: Vec<(IpAddr, Protocol, u16)> = Vec::new();
    for (svc, eps) in ports {
        let proto = svc.name.protocol;
        for a in svc
            .cluster_ips
            .iter()
            .chain(&svc.external_ips)
            .chain(&svc.load_balancer_ips)
        {
            dsts.push((*a, proto, svc.port));
            dsts.push((*a, proto, svc.port + 1));
        }
        if let Some(np) = svc.node_port {
            for a in [NODE_IP, "fd20::1", "127.0.0.1", "10.244.0.1"] {
                dsts.push((ip(a), proto, np));
            }
        }
        for e in eps {
            dsts.push((e.addr, proto, e.port));
        }
    }
    let mut srcs: Vec<IpAddr> = [
        POD,
        NODE_IP,
        OUTSIDE,
        "10.244.0.1",
        "fd44::9",
        "fd20::1",
        "2001:db8::1",
    ]
    .iter()
    .map(|s| ip(s))
    .collect();
    srcs.extend(ports.iter().flat_map(|(_, eps)| eps.iter().map(|e| e.addr)));
    let mut out = Vec::new();
    for (dst, protocol, port) in dsts {
        for src in &srcs {
            if IpFamily::of(*src) != IpFamily::of(dst) {
                continue;
            }
            for origin in [Origin::Network, Origin::LocalProcess] {
                if origin == Origin::LocalProcess && !local_addresses().contains(src) {
                    continue;
                }
                out.push(Packet {
                    src: *src,
                    dst,
                    protocol,
                    port,
                    origin,
                });
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_packet_meets_the_fate_kubernetes_defines(
        ports in arb_ports(),
        cidrs in any::<bool>(),
    ) {
        let mut node = node();
        if !cidrs {
            node.cluster_cidrs.clear();
        }
        let plan = plan(&ports, &node);
        for family in IpFamily::BOTH {
            for (name, rules) in &plan.table(family).services {
                for (chain, body) in &rules.chains {
                    for rule in body {
                        for target in rule.targets() {
                            prop_assert!(
                                rules.chains.contains_key(target),
                                "{name}: {chain} goes to missing {target}"
                            );
                        }
                    }
                }
            }
        }
        for packet in packets(&ports) {
            let family = IpFamily::of(packet.src);
            let traced = Tracer::new(plan.table(family), &local_addresses()).trace(&packet);
            let expected = oracle(&ports, &node, &local_addresses(), &packet);
            prop_assert_eq!(traced, expected, "{:?}", packet);
        }
    }
}

#[test]
fn ports_of_one_policy_and_endpoint_count_share_a_shape_and_an_endpoint_is_data() {
    let other = ServicePort::cluster_ip(port_name("other", Protocol::Tcp), ip("10.96.0.11"), 80);
    let p = plan(
        &[
            (web(), vec![ep("10.244.1.5", "b"), ep("10.244.1.6", "b")]),
            (
                other.clone(),
                vec![ep("10.244.1.7", "b"), ep("10.244.1.8", "b")],
            ),
        ],
        &node(),
    );
    let (a, b) = (&p.v4.services[&web().name], &p.v4.services[&other.name]);
    assert_eq!(a.shapes, b.shapes, "the same chain, with the same rules");
    assert_eq!(
        a.shapes.keys().collect::<Vec<_>>(),
        ["shape-clusterip-cluster-2"]
    );
    assert!(a.chains.is_empty(), "no chain of its own");

    // An endpoint replaced by another: the same shape, only the pool differs.
    let moved = plan(
        &[(web(), vec![ep("10.244.1.5", "b"), ep("10.244.1.9", "b")])],
        &node(),
    );
    let c = &moved.v4.services[&web().name];
    assert_eq!((&c.shapes, &c.service_ips), (&a.shapes, &a.service_ips));
    assert_ne!(c.pools, a.pools);
}
