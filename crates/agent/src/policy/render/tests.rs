use super::*;
use serde_json::json;
use trellis_dataplane::nftables::CmpOp;
use trellis_model::{Namespace, NetworkPolicy, Pod};
use trellis_policy::Cluster;
use trellis_policy::plan::plan;

fn pod(ns: &str, name: &str, app: &str, ips: &[&str], node: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_string(), app.to_string())].into(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        node: node.into(),
        ports: Vec::new(),
    }
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// db admits web on TCP 5432 and nothing else; web is not isolated.
fn db_policy() -> NetworkPolicy {
    policy(
        "shop",
        "db-from-web",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                         "ports": [{"port": 5432}]}],
        }),
    )
}

fn pods() -> Vec<Pod> {
    vec![
        pod("shop", "db-0", "db", &["10.244.1.2", "fd00:244:1::2"], "a1"),
        pod("shop", "db-1", "db", &["10.244.1.3", "fd00:244:1::3"], "a1"),
        pod(
            "shop",
            "web-0",
            "web",
            &["10.244.2.2", "fd00:244:2::2"],
            "b1",
        ),
    ]
}

fn rendered(policies: Vec<NetworkPolicy>, family: IpFamily) -> RenderedPolicy {
    let cluster = Cluster::new([Namespace::default()], policies);
    render(&plan(&cluster, &pods(), "a1", []), family, None)
}

fn element(addr: &str) -> Vec<u8> {
    concat(&[addr_datum(addr.parse().unwrap())])
}

fn jump_target(table: &RenderedTable, map: &str, addr: &str) -> Option<String> {
    match table.sets[map].elements.get(&element(addr)) {
        Some(Some(ElemValue::Verdict(Verdict::Jump(chain)))) => Some(chain.clone()),
        None => None,
        other => panic!("{map} {addr}: {other:?}"),
    }
}

#[test]
fn an_isolated_pod_jumps_to_a_check_that_returns_on_what_is_admitted_and_drops_the_rest() {
    let out = rendered(vec![db_policy()], IpFamily::V4);
    let chain = jump_target(&out.table, INGRESS, "10.244.1.2").expect("db-0 is isolated");
    let rules = &out.table.chains[&chain].rules;
    assert_eq!(rules.len(), 2, "{rules:#?}");
    assert!(rules[0].comment.ends_with(" shop/db-from-web rule 0"));
    assert!(matches!(
        rules[0].exprs.last(),
        Some(Expr::Verdict(Verdict::Return))
    ));
    assert!(
        rules[1]
            .comment
            .ends_with(" drop ingress: shop/db-from-web")
    );
    assert!(rules[1].exprs.contains(&Expr::Counter));
    assert!(matches!(
        rules[1].exprs.last(),
        Some(Expr::Verdict(Verdict::Drop))
    ));
    assert_eq!(out.drops[&chain].1.len(), 1);
    // Nothing isolates egress; the remote pod is not this node's to check.
    assert!(out.table.sets[EGRESS].elements.is_empty());
    assert_eq!(jump_target(&out.table, INGRESS, "10.244.2.2"), None);
    // The selector's set holds web's address of this family only.
    let peers: Vec<&RenderedSet> = (out.table.sets.iter())
        .filter(|(name, _)| name.starts_with(PEERS_PREFIX))
        .map(|(_, set)| set)
        .collect();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        peers[0].elements.keys().collect::<Vec<_>>(),
        [&element("10.244.2.2")]
    );
}

#[test]
fn pods_with_the_same_check_share_its_chain_and_a_changed_check_is_a_new_chain() {
    let out = rendered(vec![db_policy()], IpFamily::V4);
    let first = jump_target(&out.table, INGRESS, "10.244.1.2");
    assert_eq!(first, jump_target(&out.table, INGRESS, "10.244.1.3"));
    let checks = (out.table.chains.keys())
        .filter(|c| c.starts_with(CHECK_PREFIX))
        .count();
    assert_eq!(checks, 1);

    let mut wider = db_policy();
    wider.spec.ingress[0].ports[0].port = Some(trellis_model::IntOrString::Int(5433));
    let changed = rendered(vec![wider], IpFamily::V4);
    assert_ne!(first, jump_target(&changed.table, INGRESS, "10.244.1.2"));
}

#[test]
fn each_family_holds_its_own_addresses_and_blocks() {
    let block = policy(
        "shop",
        "db-egress",
        json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.2.0/24"]}},
                {"ipBlock": {"cidr": "fd00::/8"}},
            ]}],
        }),
    );
    for family in IpFamily::BOTH {
        let out = rendered(vec![block.clone()], family);
        let (own, other) = match family {
            IpFamily::V4 => ("10.244.1.2", "fd00:244:1::2"),
            IpFamily::V6 => ("fd00:244:1::2", "10.244.1.2"),
        };
        let chain = jump_target(&out.table, EGRESS, own).expect("isolated");
        assert!(
            !out.table.sets[EGRESS]
                .elements
                .contains_key(&element(other))
        );
        let rules = &out.table.chains[&chain].rules;
        // One block of this family, then the drop.
        assert_eq!(rules.len(), 2, "{family:?}: {rules:#?}");
        let neq = (rules[0].exprs.iter())
            .filter(|e| matches!(e, Expr::Cmp { op: CmpOp::Neq, .. }))
            .count();
        assert_eq!(neq, usize::from(family == IpFamily::V4), "the except");
    }
}

#[test]
fn port_ranges_compare_both_ends_and_a_whole_protocol_checks_only_the_protocol() {
    assert_eq!(
        port_match(&PortSpan {
            protocol: Protocol::Tcp,
            first: 8000,
            last: 8080
        })
        .iter()
        .filter(|e| matches!(
            e,
            Expr::Cmp {
                op: CmpOp::Gte | CmpOp::Lte,
                ..
            }
        ))
        .count(),
        2
    );
    assert_eq!(
        port_match(&PortSpan {
            protocol: Protocol::Udp,
            first: 1,
            last: u16::MAX
        }),
        dsl::l4proto(17)
    );
}

#[test]
fn names_too_long_for_the_kernel_are_cut_and_stay_distinct() {
    let long = "n".repeat(300);
    let a = object_name(PEERS_PREFIX, &format!("{long}/a"));
    let b = object_name(PEERS_PREFIX, &format!("{long}/b"));
    assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME);
    assert_ne!(a, b);
    assert_eq!(
        object_name(PEERS_PREFIX, "shop/p/in0/0"),
        "peers-shop/p/in0/0"
    );
    // What nft cannot read back is replaced, and the name made unique again.
    let eq = object_name(PEERS_PREFIX, "shop/app=web");
    let ne = object_name(PEERS_PREFIX, "shop/app,web");
    assert!(eq.starts_with("peers-shop/app_web."), "{eq}");
    assert_ne!(eq, ne);
    assert!(
        eq.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
    );
}

#[test]
fn a_note_is_cut_to_what_nft_keeps() {
    let rule = RenderedRule::noted(dsl::accept(), &"x".repeat(500));
    assert_eq!(rule.comment.len(), 128);
    assert!(rule.comment.starts_with("trellis:"));
}

#[test]
fn with_a_guard_unknown_addresses_on_pod_interfaces_are_counted_and_dropped() {
    let cluster = Cluster::new([Namespace::default()], [db_policy()]);
    let node_plan = plan(&cluster, &pods(), "a1", []);
    let guarded = render(&node_plan, IpFamily::V4, Some(Guard { prefix: "tp" }));
    let known = &guarded.table.sets[PODS];
    assert_eq!(
        known.elements.keys().collect::<Vec<_>>(),
        [&element("10.244.1.2"), &element("10.244.1.3")],
        "this node's pods, isolated or not, of this family"
    );
    let noted = |chain: &str| {
        (guarded.table.chains[chain].rules.iter())
            .filter(|r| r.comment.ends_with(UNKNOWN_POD_NOTE))
            .count()
    };
    assert_eq!(noted(FORWARD), 2, "from and to a pod interface");
    assert_eq!(noted(INPUT), 1);
    let unguarded = render(&node_plan, IpFamily::V4, None);
    assert_eq!(unguarded.table.chains[FORWARD].rules.len(), 3);
    assert_eq!(guarded.table.chains[FORWARD].rules.len(), 5);
}

/// The rendered tables, run by an interpreter of the expressions, admit exactly what the
/// plan admits (which is held equal to Kubernetes' semantics in `trellis-policy`), on
/// random clusters: every packet between pods, nodes and an outside address, through the
/// hooks it crosses on the source's node and the destination's.
#[test]
fn the_rendered_tables_admit_exactly_what_the_plan_admits() {
    use super::interpret::{Outcome, Packet, run};
    use std::collections::BTreeMap;
    use trellis_policy::plan::{NodePolicy, trace};
    use trellis_policy::random::{case, node_ip};

    let nodes = ["n0", "n1"];
    let mut checked = 0;
    for seed in 0..400 {
        let (cluster, pods) = case(seed);
        let plans: BTreeMap<String, NodePolicy> = (nodes.iter())
            .map(|n| (n.to_string(), plan(&cluster, &pods, n, [node_ip(n)])))
            .collect();
        let tables: BTreeMap<(String, IpFamily), RenderedTable> = (nodes.iter())
            .flat_map(|n| IpFamily::BOTH.map(|f| (n.to_string(), f)))
            .map(|(n, family)| {
                let guard = Some(Guard { prefix: "tp" });
                let table = render(&plans[&n], family, guard).table;
                ((n, family), table)
            })
            .collect();
        let table = |node: &str, ip: IpAddr| -> &RenderedTable {
            &tables[&(node.to_string(), IpFamily::of(ip))]
        };
        let node_of = |ip: IpAddr| {
            pods.iter()
                .find(|p| p.ips.contains(&ip))
                .map(|p| p.node.as_str())
        };
        let mut ends: Vec<IpAddr> = pods.iter().flat_map(|p| p.ips.clone()).collect();
        ends.extend(nodes.iter().map(|n| node_ip(n)));
        ends.push("1.2.3.4".parse().unwrap());
        ends.push("2001:db8::4".parse().unwrap());
        for &from in &ends {
            for &to in &ends {
                if from == to || from.is_ipv4() != to.is_ipv4() {
                    continue;
                }
                for (protocol, l4, port) in [
                    (Protocol::Tcp, 6, 80),
                    (Protocol::Tcp, 6, 8080),
                    (Protocol::Tcp, 6, 8443),
                    (Protocol::Tcp, 6, 443),
                    (Protocol::Udp, 17, 53),
                ] {
                    let own_node = |ip: IpAddr| nodes.iter().copied().find(|n| node_ip(n) == ip);
                    let packet = |iif, oif, node: &str| Packet {
                        saddr: from,
                        daddr: to,
                        l4proto: l4,
                        dport: port,
                        iif,
                        oif,
                        established: false,
                        saddr_local: node_ip(node) == from,
                    };
                    let mut admitted = true;
                    // The source pod's node: its input hook for the node itself, else
                    // forward (out of a pod interface, or back into one on the same node).
                    if let Some(a) = node_of(from) {
                        let same = node_of(to) == Some(a);
                        let (hook, oif) = if own_node(to) == Some(a) {
                            (INPUT, "")
                        } else if same {
                            (FORWARD, "tp2")
                        } else {
                            (FORWARD, "wg0")
                        };
                        admitted &=
                            run(table(a, from), hook, &packet("tp1", oif, a)) == Outcome::Accept;
                    }
                    // The destination pod's node, unless the packet was already there or
                    // its node sent it (locally sent packets cross no forward hook).
                    if let Some(b) = node_of(to)
                        && node_of(from) != Some(b)
                        && own_node(from) != Some(b)
                    {
                        admitted &= run(table(b, from), FORWARD, &packet("wg0", "tp2", b))
                            == Outcome::Accept;
                    }
                    let want = trace(&plans, from, to, protocol, port);
                    assert_eq!(
                        admitted, want,
                        "seed {seed}: {from} -> {to} {protocol:?} {port}\npolicies: {:#?}",
                        cluster.policies
                    );
                    checked += 1;
                }
            }
        }
        // A pod interface sending from an address no pod of the node has is refused.
        for n in nodes {
            let spoofed = Packet {
                saddr: format!("10.244.{}.250", &n[1..]).parse().unwrap(),
                daddr: "1.2.3.4".parse().unwrap(),
                l4proto: 6,
                dport: 80,
                iif: "tp9",
                oif: "wg0",
                established: false,
                saddr_local: false,
            };
            assert_eq!(
                run(table(n, spoofed.saddr), FORWARD, &spoofed),
                Outcome::Drop
            );
            // Replies of admitted connections pass whatever the checks.
            let reply = Packet {
                established: true,
                ..spoofed
            };
            assert_eq!(run(table(n, reply.saddr), FORWARD, &reply), Outcome::Accept);
        }
    }
    assert!(checked > 100_000, "{checked}");
}
