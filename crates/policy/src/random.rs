//! Random clusters for property tests (here and in the agent's tests of the nftables
//! rendering): namespaces with and without labels, labelled pods on two nodes with named
//! ports, policies with every kind of peer and port. Deterministic from a seed, so a
//! failing case is reproducible.

use crate::cluster::{Cluster, NamedPort, Namespace, Pod};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;
use trellis_model::{NetworkPolicy, Protocol};

/// A small deterministic generator (the cases must be reproducible from their seed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];

fn selector(rng: &mut Rng, keys: &[(&str, &[&str])]) -> Value {
    let (key, values) = rng.pick(keys);
    match rng.below(4) {
        0 => json!({}),
        1 => json!({"matchLabels": {*key: rng.pick(values)}}),
        2 => {
            json!({"matchExpressions": [{"key": key, "operator": "In", "values": [rng.pick(values), rng.pick(values)]}]})
        }
        _ => {
            json!({"matchExpressions": [{"key": key, "operator": if rng.chance(50) { "Exists" } else { "DoesNotExist" }}]})
        }
    }
}

const POD_LABELS: [(&str, &[&str]); 2] = [
    ("app", &["web", "db", "cache"]),
    ("tier", &["front", "back"]),
];
const NS_LABELS: [(&str, &[&str]); 2] = [
    ("team", &["a", "b"]),
    ("kubernetes.io/metadata.name", &["ns0", "ns1", "ns2"]),
];

fn peer(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => json!({"podSelector": selector(rng, &POD_LABELS)}),
        1 => json!({"namespaceSelector": selector(rng, &NS_LABELS)}),
        2 => {
            json!({"podSelector": selector(rng, &POD_LABELS), "namespaceSelector": selector(rng, &NS_LABELS)})
        }
        3 => json!({"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24"]}}),
        4 if rng.chance(40) => {
            json!({"ipBlock": {"cidr": "fd00:244::/32", "except": ["fd00:244:1::/48"]}})
        }
        _ => {
            json!({"ipBlock": {"cidr": rng.pick(&["10.244.0.0/24", "1.2.3.0/24", "172.20.0.0/24"])}})
        }
    }
}

fn port(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!({"port": 80}),
        1 => json!({"port": 8000, "endPort": 8080}),
        2 => json!({"port": "http"}),
        3 => json!({"protocol": "UDP", "port": "dns"}),
        4 => json!({"protocol": "UDP"}),
        _ => json!({"protocol": "TCP", "port": 443}),
    }
}

fn rules(rng: &mut Rng, side: &str) -> Vec<Value> {
    (0..rng.below(3))
        .map(|_| {
            let peers: Vec<Value> = (0..rng.below(3)).map(|_| peer(rng)).collect();
            let ports: Vec<Value> = (0..rng.below(3)).map(|_| port(rng)).collect();
            json!({side: peers, "ports": ports})
        })
        .collect()
}

/// The cluster of `seed`: three namespaces, six pods on nodes `n0` and `n1` (pod
/// addresses `10.244.NODE.*`, about half of them dual-stack with `fd00:244:NODE::*` too),
/// up to four policies.
pub fn case(seed: u64) -> (Cluster, Vec<Pod>) {
    let mut rng = Rng(seed);
    let namespaces = NAMESPACES.iter().map(|n| Namespace {
        name: n.to_string(),
        labels: if rng.chance(70) {
            labels(&[("team", *rng.pick(&["a", "b"]))])
        } else {
            labels(&[])
        },
    });
    let namespaces: Vec<Namespace> = namespaces.collect();
    let pods: Vec<Pod> = (0..6)
        .map(|i| {
            let node = rng.below(2);
            let mut ports = Vec::new();
            if rng.chance(60) {
                ports.push(NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: *rng.pick(&[80, 8080, 8443]),
                });
            }
            if rng.chance(40) {
                ports.push(NamedPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                });
            }
            let mut pairs = vec![("app", *rng.pick(&["web", "db", "cache"]))];
            if rng.chance(50) {
                pairs.push(("tier", *rng.pick(&["front", "back"])));
            }
            let mut ips = vec![format!("10.244.{node}.{}", i + 2).parse().unwrap()];
            if rng.chance(50) {
                ips.push(format!("fd00:244:{node}::{}", i + 2).parse().unwrap());
            }
            Pod {
                namespace: rng.pick(&NAMESPACES).to_string(),
                name: format!("p{i}"),
                labels: labels(&pairs),
                ips,
                node: format!("n{node}"),
                ports,
            }
        })
        .collect();
    let policies = (0..rng.below(5)).map(|i| {
        let types = match rng.below(4) {
            0 => json!([]),
            1 => json!(["Ingress"]),
            2 => json!(["Egress"]),
            _ => json!(["Ingress", "Egress"]),
        };
        let spec = json!({
            "podSelector": selector(&mut rng, &POD_LABELS),
            "policyTypes": types,
            "ingress": rules(&mut rng, "from"),
            "egress": rules(&mut rng, "to"),
        });
        let policy: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("pol{i}"), "namespace": rng.pick(&NAMESPACES)},
            "spec": spec,
        }))
        .unwrap();
        trellis_model::Validate::validate(&policy).unwrap();
        policy
    });
    let policies: Vec<NetworkPolicy> = policies.collect();
    (Cluster::new(namespaces, policies), pods)
}

/// Node `nN`'s own address.
pub fn node_ip(node: &str) -> IpAddr {
    format!("172.20.0.{}", 10 + node[1..].parse::<u8>().unwrap())
        .parse()
        .unwrap()
}
