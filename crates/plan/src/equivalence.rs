//! The faster planner against the old one ([`crate::reference`]): same topologies, same
//! plans, same observers, on clusters built to hit the corner cases (clashing prefixes and
//! keys, duplicate names, nodes without keys or probe addresses, stale gateway records,
//! gateways measured down, broken paths, external peers) and on realistic large ones.

use crate::reference::{self, Old};
use crate::{Settings, Slots, Topology, health};
use ipnet::IpNet;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use trellis_model::{ExternalPeer, GatewayPolicy, Granularity, Node, PublicKey};

#[derive(Debug, Clone)]
struct Case {
    settings: Settings,
    nodes: Vec<Node>,
    peers: Vec<ExternalPeer>,
    previous: BTreeMap<String, Slots>,
    down: BTreeSet<String>,
    broken: Vec<(String, String)>,
}

fn key(k: u64) -> PublicKey {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(k + 1).to_le_bytes());
    PublicKey(key)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A cluster from a seed: mostly well-formed, with every kind of defect now and then.
fn case_from(seed: u64, size: usize, locations: usize, g: usize, gateways: usize) -> Case {
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n.max(1)
    };
    let mut nodes: Vec<Node> = Vec::with_capacity(size);
    for k in 0..size {
        let loc = next(locations as u64) as usize;
        let name = if k > 0 && next(20) == 0 {
            nodes[next(k as u64) as usize].name.clone() // a duplicate name
        } else {
            format!("n{k}")
        };
        let public_key = match next(20) {
            0 => None,
            1 if k > 0 => nodes[next(k as u64) as usize].public_key,
            _ => Some(key(k as u64)),
        };
        let mut pod_cidrs = vec![net(&format!("10.244.{k}.0/24"))];
        match next(25) {
            0 => pod_cidrs = vec![],
            1 => pod_cidrs.push(net(&format!("fd00:{k:x}::/64"))),
            2 => pod_cidrs = vec![net("10.244.0.0/16")], // overlaps many
            3 if k > 0 => pod_cidrs = nodes[next(k as u64) as usize].pod_cidrs.clone(),
            4 => pod_cidrs.push(net(&format!("10.244.{k}.128/25"))), // overlaps its own
            5 => pod_cidrs = vec![net(&format!("10.244.{k}.7/24"))], // host bits set
            _ => {}
        }
        let overlay_ip = if k > 0 && next(30) == 0 {
            nodes[next(k as u64) as usize].overlay_ip
        } else {
            format!("100.64.{}.{}", k / 250, k % 250 + 1)
                .parse()
                .unwrap()
        };
        let probe_ip = match next(12) {
            0 => None,
            1 => Some(format!("fd65::{:x}", k + 1).parse().unwrap()),
            _ => Some(
                format!("100.65.{}.{}", k / 250, k % 250 + 1)
                    .parse()
                    .unwrap(),
            ),
        };
        let public = next(2) == 0;
        nodes.push(Node {
            name,
            location: format!("l{loc}"),
            // now and then a node on an IPv6 internal network (no link-local stand-in)
            internal_ip: if next(15) == 0 {
                net(&format!("fd20:{loc:x}::{:x}/64", k + 2))
            } else {
                net(&format!("172.20.{loc}.{}/24", k % 250 + 2))
            },
            endpoint: public.then(|| {
                format!("198.18.{}.{}:51820", k / 250, k % 250 + 1)
                    .parse()
                    .unwrap()
            }),
            listen_port: 51820,
            public_key,
            pod_cidrs,
            gateway: GatewayPolicy {
                eligible: next(4) != 0,
                priority: next(3) as i32,
            },
            overlay_ip,
            probe_ip,
            persistent_keepalive: None,
            location_prefixes: Vec::new(),
        });
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let pick = |i: u64| names[i as usize % names.len()].clone();
    let peers = (0..next(4))
        .map(|i| ExternalPeer {
            name: if next(6) == 0 {
                pick(next(size as u64))
            } else {
                format!("p{i}")
            },
            public_key: if next(6) == 0 {
                key(next(size as u64))
            } else {
                PublicKey([0xe0 + i as u8; 32])
            },
            allowed_ips: match next(8) {
                0 => vec![net("10.244.0.0/20")],
                1 => vec![net("10.5.0.0/16")],
                2 => vec![net(&format!("10.244.{}.9/32", next(size as u64)))],
                3 => vec![net("fd00::/8"), net(&format!("10.5.{i}.1/32"))],
                _ => vec![net(&format!("10.5.{i}.1/32"))],
            },
            endpoint: None,
            persistent_keepalive: (next(2) == 0).then_some(25),
        })
        .collect();
    let mut previous = BTreeMap::new();
    for loc in 0..locations {
        if next(2) == 0 {
            let slots: Slots = (0..next(4))
                .map(|_| match next(4) {
                    0 => None,
                    1 => Some("zz".to_string()),
                    _ => Some(pick(next(size as u64))),
                })
                .collect();
            previous.insert(format!("l{loc}"), slots);
        }
    }
    let down = (0..next(4)).map(|_| pick(next(size as u64))).collect();
    let broken = (0..next(5))
        .map(|_| (pick(next(size as u64)), pick(next(size as u64))))
        .collect();
    Case {
        settings: Settings {
            granularity: Granularity::ALL[g],
            gateways_per_location: gateways,
            persistent_keepalive: (next(2) == 0).then_some(25),
        },
        nodes,
        peers,
        previous,
        down,
        broken,
    }
}

fn any_case() -> impl Strategy<Value = Case> {
    (any::<u64>(), 1usize..=40, 1usize..=8, 0usize..4, 0usize..=3).prop_map(
        |(seed, size, locations, g, gateways)| case_from(seed, size, locations, g, gateways),
    )
}

fn assert_same(c: &Case) -> Result<(), TestCaseError> {
    let pairs = || c.broken.iter().map(|(a, b)| (a.as_str(), b.as_str()));
    let old = Old::build_with_health(
        c.settings.clone(),
        c.nodes.clone(),
        c.peers.clone(),
        &c.previous,
        &c.down,
    )
    .with_broken_paths(pairs());
    let new = Topology::build_with_health(
        c.settings.clone(),
        c.nodes.clone(),
        c.peers.clone(),
        &c.previous,
        &c.down,
    )
    .with_broken_paths(pairs());
    prop_assert_eq!(&old.0, &new);
    for name in c.nodes.iter().map(|n| n.name.as_str()).chain(["nobody"]) {
        prop_assert_eq!(old.plan_for(name), new.plan_for(name), "plan of {}", name);
    }
    // the public questions, on the topology's nodes and on the raw records
    for n in new.nodes.values().chain(&c.nodes) {
        prop_assert_eq!(old.is_gateway(n), new.is_gateway(n));
        prop_assert_eq!(old.is_direct(n), new.is_direct(n));
        prop_assert_eq!(
            old.serving_gateway(n).map(|g| &g.name),
            new.serving_gateway(n).map(|g| &g.name)
        );
        for m in new.nodes.values() {
            prop_assert_eq!(old.has_tunnel(n, m), new.has_tunnel(n, m));
        }
    }
    Ok(())
}

fn assert_same_health(nodes: &[Node]) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        reference::candidates(nodes.iter()),
        health::candidates(nodes.iter())
    );
    let pool = health::ObserverPool::new(nodes);
    for g in nodes {
        for k in 0..=5 {
            let old = reference::observers_for(nodes, g, k);
            prop_assert_eq!(&old, &health::observers_for(nodes, g, k));
            prop_assert_eq!(&old, &pool.observers_for(g, k));
        }
        for k in 0..=4 {
            prop_assert_eq!(
                reference::relay_targets(nodes, g, k),
                health::relay_targets(nodes, g, k)
            );
        }
    }
    // verdicts: every assigned observer but the first reports down, strangers report up
    let mut reports: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    for g in reference::candidates(nodes.iter()) {
        let observers = reference::observers_for(nodes, g, health::OBSERVERS_PER_GATEWAY);
        let entry = reports.entry(g.name.clone()).or_default();
        for (i, o) in observers.iter().enumerate() {
            entry.insert(o.clone(), i == 0);
        }
        entry.insert("stranger".into(), true);
    }
    let old: BTreeMap<String, health::Verdict> = reference::candidates(nodes.iter())
        .into_iter()
        .map(|g| {
            let observers: BTreeSet<String> =
                reference::observers_for(nodes, g, health::OBSERVERS_PER_GATEWAY)
                    .into_iter()
                    .collect();
            let opinions = reports[&g.name]
                .iter()
                .filter(|(o, _)| observers.contains(*o))
                .map(|(_, up)| *up);
            (g.name.clone(), health::verdict(opinions))
        })
        .collect();
    prop_assert_eq!(old, health::verdicts(nodes, &reports));
    Ok(())
}

fn assert_same_gateway_choice(c: &Case) -> Result<(), TestCaseError> {
    let mut by_location: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in &c.nodes {
        by_location.entry(&n.location).or_default().push(n);
    }
    for (location, members) in &by_location {
        let previous = c.previous.get(*location).map(Vec::as_slice).unwrap_or(&[]);
        for wanted in 0..=3 {
            let old = reference::choose_gateways(members, previous, wanted, &c.down);
            prop_assert_eq!(
                &old,
                &crate::choose_gateways(members, previous, wanted, &c.down)
            );
            for n in &c.nodes {
                prop_assert_eq!(
                    reference::serving_slot(&n.name, &old),
                    crate::serving_slot(&n.name, &old)
                );
            }
        }
        for m in members {
            prop_assert_eq!(
                reference::qualifies_as_gateway(members, m),
                crate::qualifies_as_gateway(members, m)
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_faster_planner_plans_what_the_old_one_did(c in any_case()) {
        assert_same(&c)?;
    }

    #[test]
    fn observers_relays_and_verdicts_are_unchanged(c in any_case()) {
        assert_same_health(&c.nodes)?;
    }

    #[test]
    fn gateway_choice_is_unchanged(c in any_case()) {
        assert_same_gateway_choice(&c)?;
    }
}

/// A realistic shape, larger than the property tests reach: 3 public nodes per location,
/// the rest private, a stored gateway record, one gateway down and one broken path.
#[test]
fn a_large_realistic_cluster_is_planned_as_before() {
    let (n, locations, per) = (600, 60, 10);
    let nodes: Vec<Node> = (0..n)
        .map(|k| {
            let (loc, i) = (k / per, k % per);
            Node {
                name: format!("site-{loc:02}-node-{i:02}"),
                location: format!("site-{loc:02}"),
                internal_ip: format!("172.20.{loc}.{}/24", i + 2).parse().unwrap(),
                endpoint: (i < 3).then(|| {
                    format!("198.18.{}.{}:51820", k / 250, k % 250 + 1)
                        .parse()
                        .unwrap()
                }),
                listen_port: 51820,
                public_key: Some(key(k as u64)),
                pod_cidrs: vec![net(&format!("10.{}.{}.0/24", k / 256, k % 256))],
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
        })
        .collect();
    assert_eq!(nodes.len() / per, locations);
    assert_same_health(&nodes).unwrap();
    for granularity in Granularity::ALL {
        let settings = Settings {
            granularity,
            ..Settings::default()
        };
        let first = Topology::build(settings.clone(), nodes.clone(), [], &BTreeMap::new());
        assert_eq!(
            Old::build(settings.clone(), nodes.clone(), [], &BTreeMap::new()).0,
            first
        );
        let gateway = first.gateways["site-07"][0].clone();
        let direct: Vec<&Node> = first
            .nodes
            .values()
            .filter(|n| first.is_direct(n))
            .collect();
        let broken = vec![(
            direct[0].name.clone(),
            direct[direct.len() - 1].name.clone(),
        )];
        let case = Case {
            settings,
            nodes: nodes.clone(),
            peers: vec![],
            previous: first.slots.clone(),
            down: BTreeSet::from([gateway]),
            broken,
        };
        assert_same(&case).unwrap();
    }
}
