//! The planned checks against Kubernetes' semantics ([`crate::evaluate`]): on thousands of
//! random clusters (namespaces, labelled pods on two nodes with named ports, policies with
//! every kind of peer and port), every packet between pods, nodes and outside addresses is
//! admitted by the plan exactly when the semantics admit it.

use super::*;
use crate::evaluate::{End, Packet, evaluate};
use crate::random::{case, node_ip};

#[test]
fn the_plan_admits_exactly_what_kubernetes_semantics_admit() {
    let mut checked = 0;
    let mut denied = 0;
    for seed in 0..1500 {
        let (cluster, pods) = case(seed);
        let plans: BTreeMap<String, NodePolicy> = ["n0", "n1"]
            .iter()
            .map(|n| (n.to_string(), plan(&cluster, &pods, n, [node_ip(n)])))
            .collect();
        let outside: Vec<End> = vec![
            End::Address("1.2.3.4".parse().unwrap()),
            End::Address("2001:db8::4".parse().unwrap()),
            End::Address("fd00:244:1::200".parse().unwrap()),
            End::Address("10.244.1.200".parse().unwrap()),
            End::Node {
                node: "n0",
                ip: node_ip("n0"),
            },
            End::Node {
                node: "n1",
                ip: node_ip("n1"),
            },
        ];
        let mut ends: Vec<End> = (pods.iter())
            .flat_map(|p| p.ips.iter().map(move |ip| End::Pod { pod: p, ip: *ip }))
            .collect();
        ends.extend(outside);
        for from in &ends {
            for to in &ends {
                if from.ip() == to.ip() || from.ip().is_ipv4() != to.ip().is_ipv4() {
                    continue;
                }
                for (protocol, port) in [
                    (Protocol::Tcp, 80),
                    (Protocol::Tcp, 8080),
                    (Protocol::Tcp, 8443),
                    (Protocol::Tcp, 443),
                    (Protocol::Udp, 53),
                ] {
                    let packet = Packet {
                        from: *from,
                        to: *to,
                        protocol,
                        port,
                    };
                    let want = evaluate(&cluster, &packet);
                    let got = trace(&plans, from.ip(), to.ip(), protocol, port);
                    assert_eq!(
                        got,
                        want.allowed(),
                        "seed {seed}: {} -> {} {protocol} {port}: semantics say {want:?}\npolicies: {:#?}",
                        from.ip(),
                        to.ip(),
                        cluster.policies
                    );
                    checked += 1;
                    denied += usize::from(!got);
                }
            }
        }
    }
    // The generator must reach both outcomes often, or the comparison proves little.
    assert!(
        denied > checked / 10 && denied < checked * 9 / 10,
        "{denied} of {checked}"
    );
}

#[test]
fn a_pod_that_is_gone_leaves_no_address_in_any_set() {
    let (cluster, mut pods) = case(7);
    let gone = pods.remove(0);
    let plan = plan(&cluster, &pods, "n0", []);
    for set in plan.sets.values() {
        assert!(!set.contains(&gone.ips[0]));
    }
    for set in plan.port_sets.values() {
        assert!(set.iter().all(|(ip, _, _)| *ip != gone.ips[0]));
    }
    assert!(!plan.ingress.contains_key(&gone.ips[0]));
}
