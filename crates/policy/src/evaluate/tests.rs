//! The cases of the Kubernetes NetworkPolicy documentation, and the corners its semantics
//! define (the ANDed peer, named ports and ranges, protocols, the resident node).

use super::*;
use crate::cluster::{NamedPort, Namespace};
use serde_json::json;
use std::collections::BTreeMap;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(namespace: &str, name: &str, ip: &str, pairs: &[(&str, &str)]) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: labels(pairs),
        ips: vec![ip.parse().unwrap()],
        node: "n1".into(),
        ports: vec![NamedPort {
            name: "redis".into(),
            protocol: Protocol::Tcp,
            port: 6379,
        }],
    }
}

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    let p: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec,
    }))
    .unwrap();
    trellis_model::Validate::validate(&p).unwrap();
    p
}

fn at(p: &Pod) -> End<'_> {
    End::Pod {
        pod: p,
        ip: p.ips[0],
    }
}

fn tcp<'a>(from: End<'a>, to: End<'a>, port: u16) -> Packet<'a> {
    Packet {
        from,
        to,
        protocol: Protocol::Tcp,
        port,
    }
}

fn cluster(policies: Vec<NetworkPolicy>) -> Cluster {
    Cluster::new(
        [
            Namespace {
                name: "default".into(),
                labels: labels(&[("kubernetes.io/metadata.name", "default")]),
            },
            Namespace {
                name: "myproject".into(),
                labels: labels(&[("project", "myproject")]),
            },
            Namespace {
                name: "other".into(),
                labels: labels(&[]),
            },
        ],
        policies,
    )
}

/// The documentation's `test-network-policy`: db pods admit TCP 6379 from 172.17/16 except
/// 172.17.1/24, from any pod of namespaces labelled project=myproject, and from frontend
/// pods of their own namespace; they may send only to 10.0.0.0/24 on TCP 5978.
fn documented() -> NetworkPolicy {
    policy(
        "default",
        "test-network-policy",
        json!({
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [
                {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                {"podSelector": {"matchLabels": {"role": "frontend"}}}],
              "ports": [{"protocol": "TCP", "port": 6379}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
              "ports": [{"protocol": "TCP", "port": 5978}]}],
        }),
    )
}

#[test]
fn the_documented_policy_admits_exactly_what_it_says() {
    let c = cluster(vec![documented()]);
    let db = pod("default", "db", "10.244.1.5", &[("role", "db")]);
    let frontend = pod("default", "fe", "10.244.1.6", &[("role", "frontend")]);
    let frontend_elsewhere = pod("other", "fe", "10.244.2.6", &[("role", "frontend")]);
    let anything_in_project = pod("myproject", "x", "10.244.3.7", &[]);
    let cases: Vec<(Packet, bool)> = vec![
        (tcp(at(&frontend), at(&db), 6379), true),
        (tcp(at(&frontend), at(&db), 6380), false),
        (tcp(at(&frontend_elsewhere), at(&db), 6379), false),
        (tcp(at(&anything_in_project), at(&db), 6379), true),
        (
            tcp(End::Address("172.17.0.9".parse().unwrap()), at(&db), 6379),
            true,
        ),
        (
            tcp(End::Address("172.17.1.9".parse().unwrap()), at(&db), 6379),
            false,
        ),
        // db's egress: only 10.0.0.0/24 TCP 5978
        (
            tcp(at(&db), End::Address("10.0.0.5".parse().unwrap()), 5978),
            true,
        ),
        (
            tcp(at(&db), End::Address("10.0.0.5".parse().unwrap()), 80),
            false,
        ),
        (tcp(at(&db), at(&frontend), 5978), false),
        // frontend is not selected: its traffic elsewhere is not isolated
        (tcp(at(&frontend), at(&frontend_elsewhere), 80), true),
    ];
    for (i, (packet, allowed)) in cases.iter().enumerate() {
        let d = evaluate(&c, packet);
        assert_eq!(d.allowed(), *allowed, "case {i}: {d:?}");
    }
    let d = evaluate(&c, &tcp(at(&frontend), at(&db), 6379));
    assert_eq!(d.egress, Side::NotIsolated);
    assert_eq!(
        d.ingress,
        Side::Allowed(vec![PolicyRef {
            namespace: "default".into(),
            name: "test-network-policy".into(),
            rule: Some(0),
        }])
    );
    let d = evaluate(&c, &tcp(at(&frontend_elsewhere), at(&db), 6379));
    assert!(matches!(&d.ingress, Side::Denied(by) if by[0].name == "test-network-policy"));
}

#[test]
fn default_deny_isolates_every_pod_of_its_namespace_and_no_other() {
    let deny = policy("default", "deny", json!({"podSelector": {}}));
    let c = cluster(vec![deny.clone()]);
    let a = pod("default", "a", "10.244.1.1", &[]);
    let b = pod("default", "b", "10.244.1.2", &[]);
    let elsewhere = pod("other", "c", "10.244.2.1", &[]);
    assert!(!evaluate(&c, &tcp(at(&a), at(&b), 80)).allowed());
    assert!(
        evaluate(&c, &tcp(at(&a), at(&elsewhere), 80)).allowed(),
        "ingress only"
    );
    assert!(!evaluate(&c, &tcp(at(&elsewhere), at(&a), 80)).allowed());
    // An allow-all policy beside it: policies add up.
    let allow = policy(
        "default",
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    let c = cluster(vec![deny, allow]);
    assert!(evaluate(&c, &tcp(at(&elsewhere), at(&a), 80)).allowed());
}

#[test]
fn default_deny_egress_with_dns_allowed() {
    let p = policy(
        "default",
        "egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
    );
    let c = cluster(vec![p]);
    let app = pod("default", "app", "10.244.1.1", &[]);
    let dns = pod("default", "dns", "10.244.1.53", &[("k8s-app", "kube-dns")]);
    let udp53 = Packet {
        protocol: Protocol::Udp,
        ..tcp(at(&app), at(&dns), 53)
    };
    assert!(evaluate(&c, &udp53).allowed());
    assert!(evaluate(&c, &tcp(at(&app), at(&dns), 53)).allowed());
    assert!(!evaluate(&c, &tcp(at(&app), at(&dns), 80)).allowed());
    assert!(
        !evaluate(
            &c,
            &tcp(at(&app), End::Address("8.8.8.8".parse().unwrap()), 53)
        )
        .allowed()
    );
    let sctp = Packet {
        protocol: Protocol::Sctp,
        ..tcp(at(&app), at(&dns), 53)
    };
    assert!(
        !evaluate(&c, &sctp).allowed(),
        "protocols are not interchangeable"
    );
}

/// One peer with both selectors is an AND; two peers are an OR (the documentation's
/// "Behavior of to and from selectors").
#[test]
fn both_selectors_in_one_peer_are_anded_and_two_peers_ored() {
    let and = policy(
        "default",
        "and",
        json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"project": "myproject"}},
             "podSelector": {"matchLabels": {"role": "client"}}}]}]}),
    );
    let or = policy(
        "default",
        "or",
        json!({"podSelector": {}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
            {"podSelector": {"matchLabels": {"role": "client"}}}]}]}),
    );
    let target = pod("default", "t", "10.244.1.1", &[]);
    let client_in_project = pod("myproject", "c", "10.244.3.1", &[("role", "client")]);
    let other_in_project = pod("myproject", "o", "10.244.3.2", &[]);
    let client_here = pod("default", "c", "10.244.1.2", &[("role", "client")]);
    let expect = [
        (&client_in_project, true, true),
        (&other_in_project, false, true),
        (&client_here, false, true),
    ];
    for (from, under_and, under_or) in expect {
        let with = |p: &NetworkPolicy| {
            evaluate(&cluster(vec![p.clone()]), &tcp(at(from), at(&target), 80)).allowed()
        };
        assert_eq!(with(&and), under_and, "{} under AND", from.name);
        assert_eq!(with(&or), under_or, "{} under OR", from.name);
    }
}

#[test]
fn named_ports_are_the_destinations_and_ranges_are_inclusive() {
    let p = policy(
        "default",
        "ports",
        json!({"podSelector": {}, "ingress": [{"ports": [
            {"port": "redis"}, {"port": 32000, "endPort": 32768}]}]}),
    );
    let c = cluster(vec![p]);
    let client = pod("other", "c", "10.244.2.1", &[]);
    let server = pod("default", "s", "10.244.1.1", &[]);
    let mut renamed = server.clone();
    renamed.ports[0].port = 7000; // the same name on another number
    assert!(evaluate(&c, &tcp(at(&client), at(&server), 6379)).allowed());
    assert!(!evaluate(&c, &tcp(at(&client), at(&renamed), 6379)).allowed());
    assert!(evaluate(&c, &tcp(at(&client), at(&renamed), 7000)).allowed());
    for (port, allowed) in [(31999, false), (32000, true), (32768, true), (32769, false)] {
        assert_eq!(
            evaluate(&c, &tcp(at(&client), at(&server), port)).allowed(),
            allowed,
            "{port}"
        );
    }
}

#[test]
fn the_resident_node_always_reaches_its_pods() {
    let c = cluster(vec![policy("default", "deny", json!({"podSelector": {}}))]);
    let p = pod("default", "p", "10.244.1.1", &[]);
    let own = End::Node {
        node: "n1",
        ip: "172.20.0.10".parse().unwrap(),
    };
    let other_node = End::Node {
        node: "n2",
        ip: "172.20.0.11".parse().unwrap(),
    };
    let d = evaluate(&c, &tcp(own, at(&p), 8080));
    assert!(d.allowed());
    assert_eq!(d.ingress, Side::NotApplicable);
    assert!(!evaluate(&c, &tcp(other_node, at(&p), 8080)).allowed());
}

/// A selector is no address: a pod selector never matches an address outside the
/// cluster, and an `ipBlock` matches pod addresses like any other.
#[test]
fn selectors_select_pods_and_ip_blocks_addresses() {
    let p = policy(
        "default",
        "mixed",
        json!({"podSelector": {}, "ingress": [{"from": [
            {"podSelector": {}}, {"ipBlock": {"cidr": "10.244.2.0/24"}}]}]}),
    );
    let c = cluster(vec![p]);
    let target = pod("default", "t", "10.244.1.1", &[]);
    let neighbour = pod("default", "n", "10.244.1.2", &[]);
    let foreign_pod = pod("other", "f", "10.244.2.9", &[]);
    let outsider = End::Address("10.244.1.200".parse().unwrap());
    assert!(evaluate(&c, &tcp(at(&neighbour), at(&target), 80)).allowed());
    assert!(evaluate(&c, &tcp(at(&foreign_pod), at(&target), 80)).allowed());
    assert!(!evaluate(&c, &tcp(outsider, at(&target), 80)).allowed());
}

#[test]
fn every_namespace_is_selectable_by_its_name_listed_or_not() {
    let by_name = policy(
        "default",
        "from-unlisted",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": "unlisted"}}}]}],
        }),
    );
    let c = cluster(vec![by_name]);
    let target = pod("default", "t", "10.0.0.1", &[]);
    let stranger = pod("unlisted", "s", "10.0.0.2", &[]);
    let other = pod("other", "o", "10.0.0.3", &[]);
    assert!(evaluate(&c, &tcp(at(&stranger), at(&target), 80)).allowed());
    assert!(!evaluate(&c, &tcp(at(&other), at(&target), 80)).allowed());
}
