//! Whole apply passes against the in-memory kernel: what a pass installs, that an
//! unchanged plan writes nothing, that a change to one peer touches only that peer, that a
//! route removed behind the agent's back is put back and counted, and that a failing step
//! is reported without stopping the others.

use super::*;
use trellis_dataplane::fake::{FakeInterfaces, FakeRoutes, FakeRuleset, FakeWireGuard};
use trellis_dataplane::nftables::Family;
use trellis_model::{Endpoint, GatewayPolicy, PublicKey, keys};
use trellis_store::embedded::EmbeddedStore;
use trellis_store::{KeyValue, Store};

/// Two locations of three nodes; the first two of each are public.
fn nodes() -> Vec<Node> {
    let mut out = Vec::new();
    for (l, location) in ["site-a", "site-b"].iter().enumerate() {
        for j in 0..3u8 {
            let k = l as u8 * 3 + j;
            let name = format!("{}{}", ['a', 'b'][l], j + 1);
            out.push(Node {
                name,
                location: location.to_string(),
                internal_ip: format!("172.20.{l}.{}/24", 10 + j).parse().unwrap(),
                endpoint: (j < 2).then(|| {
                    Endpoint::parse("endpoint", &format!("198.18.0.{}:51820", 10 + k)).unwrap()
                }),
                listen_port: 51820,
                public_key: Some(PublicKey([k + 1; 32])),
                pod_cidrs: vec![format!("10.244.{k}.0/24").parse().unwrap()],
                gateway: GatewayPolicy {
                    eligible: true,
                    priority: 0,
                },
                overlay_ip: format!("100.64.0.{}", k + 1).parse().unwrap(),
                probe_ip: Some(format!("100.65.0.{}", k + 1).parse().unwrap()),
                persistent_keepalive: None,
                location_prefixes: Vec::new(),
            });
        }
    }
    out
}

fn state_of(nodes: &[Node]) -> ClusterState {
    let kvs: Vec<KeyValue> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| KeyValue {
            key: keys::node(&n.name),
            value: serde_json::to_vec(n).unwrap(),
            create_revision: i as u64 + 1,
            mod_revision: i as u64 + 1,
            lease: None,
        })
        .collect();
    ClusterState::from_list(&kvs, kvs.len() as u64)
}

struct Rig {
    device: Arc<FakeWireGuard>,
    interfaces: Arc<FakeInterfaces>,
    routes: Arc<FakeRoutes>,
    ruleset: Arc<FakeRuleset>,
    store: Arc<EmbeddedStore>,
    reconciler: Reconciler,
}

fn rig(node: &Node) -> Rig {
    let device = Arc::new(FakeWireGuard::new("wg0"));
    let interfaces = Arc::new(FakeInterfaces::default());
    let routes = Arc::new(FakeRoutes::new(ROUTE_PROTOCOL));
    let ruleset = Arc::new(FakeRuleset::default());
    let store = EmbeddedStore::new();
    let kernel = Kernel {
        device: device.clone(),
        interfaces: interfaces.clone(),
        routes: routes.clone(),
        ruleset: ruleset.clone(),
        service_proxy: None,
        network_policy: None,
    };
    let reconciler = Reconciler::new(node.clone(), "wg0".into(), kernel, store.clone());
    Rig {
        device,
        interfaces,
        routes,
        ruleset,
        store,
        reconciler,
    }
}

async fn pass(rig: &mut Rig, state: &ClusterState) -> Outcome {
    let inputs = state.plan_inputs(&trellis_plan::Settings::default());
    rig.reconciler.reconcile(state, &inputs, true).await
}

#[tokio::test]
async fn a_pass_installs_the_plan_and_an_unchanged_plan_writes_nothing() {
    let nodes = nodes();
    let a1 = nodes[0].clone();
    let state = state_of(&nodes);
    let mut rig = rig(&a1);
    let outcome = pass(&mut rig, &state).await;
    assert!(outcome.errors().is_empty(), "{:?}", outcome.errors());
    let plan = outcome.plan().unwrap().clone();
    assert!(plan.is_gateway, "a1 is a gateway of site-a");

    let mut planned: Vec<PublicKey> = plan.peers.iter().map(|p| p.public_key).collect();
    planned.sort();
    assert_eq!(
        rig.device.sessions().into_keys().collect::<Vec<_>>(),
        planned,
        "exactly the planned peers"
    );
    let mut want_routes = route_specs(&plan, "wg0", None);
    want_routes.sort();
    assert_eq!(rig.routes.all(), want_routes);
    let link = rig.interfaces.link("wg0").unwrap();
    assert_eq!(link.addresses, [plan.address, plan.probe_address.unwrap()]);
    assert!(link.up && link.mtu == TUNNEL_MTU);
    assert_eq!(
        rig.ruleset
            .comments(Family::Inet, relay::TABLE, "relay_pre")
            .len(),
        plan.relay.len(),
        "the gateway relays probes to the nodes behind it"
    );
    let recorded = rig.store.get(&keys::gateways("site-a")).await.unwrap();
    assert!(
        recorded.is_some(),
        "the gateway choice is recorded in the store"
    );

    // the same state again: nothing is written anywhere
    let sessions = rig.device.sessions();
    let outcome = pass(&mut rig, &state).await;
    assert!(outcome.errors().is_empty());
    assert_eq!(rig.device.sessions(), sessions);
    for key in sessions.keys() {
        assert_eq!(rig.device.writes_to(key), 1, "peer {key} written once");
    }
    assert_eq!(rig.ruleset.applied().len(), 1);
    assert_eq!(outcome.routes_repaired(), 0);
    assert!(outcome.status("a1", 6).applied);
}

#[tokio::test]
async fn a_change_to_one_peer_touches_that_peer_only() {
    let mut nodes = nodes();
    let a1 = nodes[0].clone();
    let mut rig = rig(&a1);
    pass(&mut rig, &state_of(&nodes)).await;
    let sessions = rig.device.sessions();
    // b1 moves to a new public address
    nodes[3].endpoint = Some(Endpoint::parse("endpoint", "198.18.5.5:51820").unwrap());
    let outcome = pass(&mut rig, &state_of(&nodes)).await;
    assert!(outcome.errors().is_empty(), "{:?}", outcome.errors());
    let b1 = PublicKey([4; 32]);
    assert_eq!(rig.device.writes_to(&b1), 2, "b1 rewritten");
    assert_eq!(
        rig.device.peer(&b1).unwrap().endpoint,
        Some("198.18.5.5:51820".parse().unwrap())
    );
    for key in sessions.keys().filter(|k| **k != b1) {
        assert_eq!(rig.device.writes_to(key), 1, "peer {key} untouched");
    }
    assert_eq!(rig.device.sessions(), sessions, "no session restarted");
}

#[tokio::test]
async fn a_route_removed_by_someone_else_is_put_back_and_counted() {
    let nodes = nodes();
    let mut rig = rig(&nodes[2]); // a3, private: everything remote goes via a gateway
    let state = state_of(&nodes);
    pass(&mut rig, &state).await;
    let before = rig.routes.all();
    let victim = before[0].clone();
    rig.routes.remove_where(|r| *r != victim);
    let outcome = pass(&mut rig, &state).await;
    assert_eq!(outcome.routes_repaired(), 1);
    assert_eq!(rig.routes.all(), before);
}

#[tokio::test]
async fn a_failing_route_is_reported_and_the_rest_still_applied() {
    let nodes = nodes();
    let mut rig = rig(&nodes[0]);
    rig.routes.fail_on("10.244.4.0/24"); // b2's pods
    let outcome = pass(&mut rig, &state_of(&nodes)).await;
    let errors = outcome.errors().join("; ");
    assert!(errors.contains("10.244.4.0/24"), "{errors}");
    assert!(!outcome.status("a1", 6).applied);
    assert!(
        !rig.device.sessions().is_empty(),
        "peers were still configured"
    );
    assert!(
        rig.routes
            .all()
            .iter()
            .any(|r| r.dst.to_string() == "10.244.3.0/24"),
        "the other routes were still installed"
    );
}

/// The same nodes, each with an IPv6 pod CIDR too.
fn dual_stack(mut nodes: Vec<Node>) -> Vec<Node> {
    for (k, n) in nodes.iter_mut().enumerate() {
        n.pod_cidrs
            .push(format!("fd00:10:244:{k:x}::/64").parse().unwrap());
    }
    nodes
}

fn routes_to(rig: &Rig, dst: &str) -> Vec<RouteSpec> {
    let dst: IpNet = dst.parse().unwrap();
    rig.routes
        .all()
        .into_iter()
        .filter(|r| r.dst == dst)
        .collect()
}

#[tokio::test]
async fn ipv6_over_the_internal_network_goes_to_link_local_stand_ins_on_the_internal_link() {
    let dual = dual_stack(nodes());
    let a3 = dual[2].clone(); // private: everything remote via a gateway
    let mut rig = rig(&a3);
    let internal = a3.internal_ip;
    rig.interfaces.add_address("int0", internal).await.unwrap();
    let outcome = pass(&mut rig, &state_of(&dual)).await;
    assert!(outcome.errors().is_empty(), "{:?}", outcome.errors());
    // a3 answers at its own stand-in (172.20.0.12 → fe80::ac14:c) beside its IPv4 address
    let int0 = rig.interfaces.link("int0").unwrap();
    let stand_in: IpNet = "fe80::ac14:c/64".parse().unwrap();
    assert_eq!(int0.addresses, [internal, stand_in]);
    // b3's IPv6 pods: via the gateway's stand-in, on int0, no IPv4 source
    let via_gateway = routes_to(&rig, "fd00:10:244:5::/64");
    let plan = outcome.plan().unwrap();
    let to_b3 = (plan.routes.iter())
        .find(|r| r.dst.to_string() == "10.244.5.0/24")
        .unwrap();
    let NextHop::Internal {
        via: IpAddr::V4(gw),
        ..
    } = to_b3.next_hop
    else {
        panic!("{to_b3:?}")
    };
    assert_eq!(
        via_gateway,
        [RouteSpec {
            dst: "fd00:10:244:5::/64".parse().unwrap(),
            via: Some(IpAddr::V6(trellis_plan::internal_link_local(gw))),
            dev: Some("int0".into()),
            src: None,
            protocol: ROUTE_PROTOCOL,
        }]
    );
    // the IPv4 route beside it is as it always was
    assert_eq!(
        routes_to(&rig, "10.244.5.0/24")[0].src,
        Some("100.64.0.3".parse().unwrap())
    );

    // a gateway tunnels IPv6 into the WireGuard interface, with no IPv4 source
    let mut gateway_rig = rig_with_internal(&dual[0]).await;
    let outcome = pass(&mut gateway_rig, &state_of(&dual)).await;
    assert!(outcome.errors().is_empty(), "{:?}", outcome.errors());
    let remote = routes_to(&gateway_rig, "fd00:10:244:3::/64");
    assert_eq!(remote.len(), 1, "{remote:?}");
    assert_eq!(
        (remote[0].via, remote[0].dev.as_deref(), remote[0].src),
        (None, Some("wg0"), None)
    );
    let b1 = gateway_rig.device.peer(&PublicKey([4; 32])).unwrap();
    assert!(
        b1.allowed_ips
            .contains(&"fd00:10:244:3::/64".parse().unwrap()),
        "{b1:?}"
    );

    // once the mesh carries no IPv6, the stand-in goes and the IPv4 address stays
    let outcome = pass(&mut rig, &state_of(&nodes())).await;
    assert!(outcome.errors().is_empty(), "{:?}", outcome.errors());
    assert_eq!(rig.interfaces.link("int0").unwrap().addresses, [internal]);
    assert!(rig.routes.all().iter().all(|r| r.dst.addr().is_ipv4()));
}

async fn rig_with_internal(node: &Node) -> Rig {
    let rig = rig(node);
    (rig.interfaces)
        .add_address("int0", node.internal_ip)
        .await
        .unwrap();
    rig
}

#[tokio::test]
async fn without_a_link_holding_the_internal_address_ipv6_routes_are_reported_not_guessed() {
    let dual = dual_stack(nodes());
    let mut unlinked = rig(&dual[2]); // no link holds 172.20.0.12
    let outcome = pass(&mut unlinked, &state_of(&dual)).await;
    let errors = outcome.errors().join("; ");
    assert!(
        errors.contains("no link holds the internal address 172.20.0.12"),
        "{errors}"
    );
    assert!(!outcome.status("a3", 6).applied);
    // the IPv4 mesh is programmed all the same, and IPv6 as far as it is tunnelled
    assert!(!routes_to(&unlinked, "10.244.5.0/24").is_empty());
    assert!(routes_to(&unlinked, "fd00:10:244:5::/64").is_empty());
    // an IPv4-only mesh needs no internal link at all
    let v4_only = nodes();
    let mut v4 = rig(&v4_only[2]);
    let outcome = pass(&mut v4, &state_of(&v4_only)).await;
    assert!(outcome.errors().is_empty(), "{:?}", outcome.errors());
}
