//! `KubeStore` against the in-process API double: records land in the objects
//! docs/kubernetes.md names and come back through the mirror; leased records vanish when
//! their Lease is not renewed; the election holds one Lease and fences a lost holder;
//! a stale compare fails as on etcd.

use serde_json::{Value, json};
use std::time::Duration;
use trellis_kube::client::{Kind, Kube};
use trellis_kube::store::KubeStore;
use trellis_kube_double::KubeDoubleHandle;
use trellis_model::{GatewaySet, Node, keys};
use trellis_store::{Compare, Op, Store, StoreError};

const NS: &str = "trellis-system";

mod common;

/// A double with the Location CRD and three Nodes, as a cluster has before Trellis runs.
async fn double() -> (KubeDoubleHandle, Kube) {
    let (double, kube) = common::double_and_client().await;
    kube.create(
        &Kind::custom_resource_definition(),
        None,
        &trellis_kube::location::crd(),
    )
    .await
    .unwrap();
    for name in ["a1", "a2", "b1"] {
        let region = if name.starts_with('a') {
            "site-a"
        } else {
            "site-b"
        };
        kube.create(
            &Kind::node(),
            None,
            &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": region}},
                "spec": {"podCIDRs": [format!("10.244.{}.0/24", name.len() + name.as_bytes()[1] as usize)]}}),
        )
        .await
        .unwrap();
    }
    (double, kube)
}

async fn store(kube: &Kube) -> KubeStore {
    let store = KubeStore::start(kube.clone(), NS);
    tokio::time::timeout(Duration::from_secs(10), store.synced())
        .await
        .expect("lists every kind");
    store
}

fn record(name: &str, location: &str, i: u8, pod_cidr: &str) -> Node {
    serde_json::from_value(json!({
        "name": name, "location": location, "internal_ip": format!("172.20.0.{i}/24"),
        "listen_port": 51820, "overlay_ip": format!("100.64.0.{i}"),
        "public_key": trellis_model::PublicKey([i; 32]).to_string(),
        "pod_cidrs": [pod_cidr],
    }))
    .unwrap()
}

/// a1's agent publishes its node record, with the pod CIDR its Node has.
async fn join_a1(kube: &Kube, store: &KubeStore) -> Node {
    let node = get(kube, Kind::node(), None, "a1").await;
    let cidr = node["spec"]["podCIDRs"][0].as_str().unwrap().to_string();
    let mine = record("a1", "site-a", 1, &cidr);
    store
        .put(&keys::node("a1"), serde_json::to_vec(&mine).unwrap())
        .await
        .unwrap();
    mine
}

async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(kube: &Kube, kind: Kind, ns: Option<&str>, name: &str) -> Value {
    kube.get(&kind, ns, name)
        .await
        .unwrap()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_node_record_is_its_nodes_annotations_written_only_when_changed() {
    let (_double, kube) = double().await;
    let store = store(&kube).await;
    let mine = join_a1(&kube, &store).await;
    let read = store
        .get(&keys::node("a1"))
        .await
        .unwrap()
        .expect("mirrored");
    assert_eq!(serde_json::from_slice::<Node>(&read.value).unwrap(), mine);
    let patched = get(&kube, Kind::node(), None, "a1").await;
    assert_eq!(
        patched["metadata"]["annotations"]["trellis.network/overlay-ip"],
        "100.64.0.1"
    );
    let version = patched["metadata"]["resourceVersion"].clone();
    store
        .put(&keys::node("a1"), serde_json::to_vec(&mine).unwrap())
        .await
        .unwrap();
    let again = get(&kube, Kind::node(), None, "a1").await;
    assert_eq!(again["metadata"]["resourceVersion"], version, "no write");

    // What the API server owns is refused, naming what to use instead.
    let refused = store.put("services/default/web", b"{}".to_vec()).await;
    assert!(
        matches!(&refused, Err(StoreError::Denied(m)) if m.contains("kubectl")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn leased_records_live_on_the_nodes_lease_and_vanish_when_it_is_not_renewed() {
    let (_double, kube) = double().await;
    let store = store(&kube).await;
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let status = br#"{"node":"a1","revision":3,"nodes":3,"peers":2}"#.to_vec();
    let path = serde_json::to_vec(&json!({"from": "a1", "to": "b1", "up": false})).unwrap();
    store
        .txn(
            vec![],
            vec![
                Op::Put {
                    key: keys::status("a1"),
                    value: status.clone(),
                    lease: Some(lease),
                },
                Op::Put {
                    key: keys::path("a1", "b1"),
                    value: path,
                    lease: Some(lease),
                },
            ],
        )
        .await
        .unwrap();
    let object = get(&kube, Kind::lease(), Some(NS), "node.a1").await;
    assert_eq!(object["spec"]["holderIdentity"], "a1");
    assert_eq!(
        object["metadata"]["annotations"]["path.trellis.network/b1"],
        "down"
    );
    assert_eq!(
        store.get(&keys::status("a1")).await.unwrap().unwrap().value,
        status
    );

    // Renewed, it stays past its duration; not renewed, it goes, with the paths.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        store.keep_alive(lease).await.unwrap();
    }
    assert!(store.get(&keys::status("a1")).await.unwrap().is_some());
    eventually("the status vanishes", async || {
        store.get(&keys::status("a1")).await.unwrap().is_none()
    })
    .await;
    assert!(store.get(&keys::path("a1", "b1")).await.unwrap().is_none());

    // A revoked lease deletes the Lease object: gone for every reader at once.
    store.keep_alive(lease).await.unwrap();
    eventually("renewed again", async || {
        store.get(&keys::status("a1")).await.unwrap().is_some()
    })
    .await;
    store.revoke_lease(lease).await.unwrap();
    assert_eq!(
        get(&kube, Kind::lease(), Some(NS), "node.a1").await,
        Value::Null
    );
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// The election as the agent drives it (`trellis_agent::leader`): a candidate key put
/// under a session lease, the lowest create revision leading, the epoch as a fence.
#[tokio::test]
async fn one_lease_elects_one_leader_and_fences_the_one_that_lost_it() {
    let (_double, kube) = double().await;
    let (a, b) = (store(&kube).await, store(&kube).await);
    let campaign = async |store: &KubeStore, who: &str| {
        let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
        let key = keys::candidate(lease);
        let r = store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![Op::Put {
                    key: key.clone(),
                    value: who.as_bytes().to_vec(),
                    lease: Some(lease),
                }],
            )
            .await
            .unwrap();
        assert!(r.succeeded);
        (lease, key, r.revision)
    };
    let (lease_a, key_a, epoch_a) = campaign(&a, "a1").await;
    let held = get(&kube, Kind::lease(), Some(NS), "leader").await;
    assert_eq!(held["spec"]["holderIdentity"], "a1");
    let fence_a = Compare::CreateRevision(key_a.clone(), epoch_a);
    assert!(
        a.txn(vec![fence_a.clone()], vec![])
            .await
            .unwrap()
            .succeeded
    );

    // b waits while a renews; a stops renewing and b takes over after the duration.
    let b_campaign = tokio::spawn(async move {
        let won = campaign(&b, "b1").await;
        (b, won)
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.keep_alive(lease_a).await.unwrap();
        assert!(!b_campaign.is_finished(), "b must wait while a renews");
    }
    let (b, (_lease_b, key_b, epoch_b)) = tokio::time::timeout(Duration::from_secs(10), b_campaign)
        .await
        .expect("b leads after a's lease ran out")
        .unwrap();
    assert!(epoch_b > epoch_a);
    let (candidates, _) = b.list(keys::ELECTION).await.unwrap();
    assert_eq!(candidates.len(), 1, "only the holder's key");
    assert_eq!(candidates[0].key, key_b);
    // a's renewal finds the Lease taken: its session is over, and so is its fence.
    assert!(matches!(
        a.keep_alive(lease_a).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    eventually("a sees b lead", async || {
        !a.txn(vec![fence_a.clone()], vec![])
            .await
            .unwrap()
            .succeeded
    })
    .await;
    assert_eq!(
        get(&kube, Kind::lease(), Some(NS), "leader").await["spec"]["leaseTransitions"],
        1
    );
}

#[tokio::test]
async fn a_stale_gateway_choice_loses_and_kubectl_sees_the_slots() {
    let (_double, kube) = double().await;
    let (a, b) = (store(&kube).await, store(&kube).await);
    let set = |slots: &[&str]| {
        serde_json::to_vec(&GatewaySet {
            location: "site-a".into(),
            slots: slots.iter().map(|s| Some(s.to_string())).collect(),
        })
        .unwrap()
    };
    let write = async |store: &KubeStore, compare: Compare, slots: &[&str]| {
        store
            .txn(
                vec![compare],
                vec![Op::Put {
                    key: keys::gateways("site-a"),
                    value: set(slots),
                    lease: None,
                }],
            )
            .await
            .unwrap()
            .succeeded
    };
    assert!(write(&a, Compare::Absent(keys::gateways("site-a")), &["a1"]).await);
    let seen = a.get(&keys::gateways("site-a")).await.unwrap().unwrap();
    eventually("b sees the choice", async || {
        b.get(&keys::gateways("site-a")).await.unwrap().is_some()
    })
    .await;
    let seen_by_b = b.get(&keys::gateways("site-a")).await.unwrap().unwrap();
    assert!(
        write(
            &a,
            Compare::ModRevision(keys::gateways("site-a"), seen.mod_revision),
            &["a2"]
        )
        .await
    );
    // b writes over what it read before a's change: the Location's version has moved on.
    let stale = Compare::ModRevision(keys::gateways("site-a"), seen_by_b.mod_revision);
    // (Refused by b's mirror if it caught up already, else by the API's precondition.)
    assert!(!write(&b, stale, &["a1"]).await);
    let location = get(&kube, Kind::location(), None, "site-a").await;
    assert_eq!(location["status"]["activeList"], "a2");
    assert_eq!(location["status"]["lastFailover"]["from"], json!(["a1"]));
}

#[tokio::test]
async fn settings_are_a_config_map_and_services_come_from_the_api() {
    let (_double, kube) = double().await;
    let store = store(&kube).await;
    store
        .put(keys::SETTINGS, br#"{"granularity":"full"}"#.to_vec())
        .await
        .unwrap();
    let cm = get(&kube, Kind::config_map(), Some(NS), "trellis").await;
    assert_eq!(cm["data"]["settings.json"], r#"{"granularity":"full"}"#);
    kube.create(
        &Kind::service(),
        Some("default"),
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}}),
    )
    .await
    .unwrap();
    kube.create(
        &Kind::network_policy(),
        Some("default"),
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "default"}, "spec": {"podSelector": {}}}),
    )
    .await
    .unwrap();
    eventually("the NetworkPolicy arrives", async || {
        let kv = store
            .get(&keys::network_policy("default", "deny"))
            .await
            .unwrap();
        kv.is_some_and(|kv| {
            serde_json::from_slice::<trellis_model::NetworkPolicy>(&kv.value).is_ok()
        })
    })
    .await;
    eventually("the Service arrives", async || {
        store
            .get(&keys::service("default", "web"))
            .await
            .unwrap()
            .is_some()
    })
    .await;
    assert!(store.get(keys::SETTINGS).await.unwrap().is_some());
}

#[tokio::test]
async fn forgetting_a_node_removes_its_annotations_and_lease_and_nothing_else() {
    let (_double, kube) = double().await;
    let store = store(&kube).await;
    join_a1(&kube, &store).await;
    kube.merge_patch(
        &Kind::node(),
        None,
        "a1",
        &json!({"metadata": {"annotations": {"kilo.squat.ai/location": "site-a"}}}),
        false,
    )
    .await
    .unwrap();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store
        .txn(
            vec![],
            vec![Op::Put {
                key: keys::status("a1"),
                value: b"{}".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap();
    trellis_kube::store::forget_node(&kube, NS, "a1")
        .await
        .unwrap();
    trellis_kube::store::forget_node(&kube, NS, "a1")
        .await
        .unwrap(); // idempotent
    let after = get(&kube, Kind::node(), None, "a1").await;
    let annotations = after["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(
        annotations.keys().collect::<Vec<_>>(),
        ["kilo.squat.ai/location"],
        "only the user's annotation stays"
    );
    assert_eq!(
        get(&kube, Kind::lease(), Some(NS), "node.a1").await,
        Value::Null
    );
}

/// The API restarted with its history gone: every watch resumes from a version the API no
/// longer has, gets 410, and lists afresh; what changed meanwhile arrives, nothing is lost.
#[tokio::test]
async fn an_expired_version_relists_and_loses_nothing() {
    let (double, kube) = double().await;
    let store = store(&kube).await;
    store
        .put(keys::SETTINGS, br#"{"granularity":"full"}"#.to_vec())
        .await
        .unwrap();
    let service = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"port": 80}]}})
    };
    kube.create(&Kind::service(), Some("default"), &service("gone"))
        .await
        .unwrap();
    eventually("the first Service", async || {
        store
            .get(&keys::service("default", "gone"))
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let (before, _) = store.list("").await.unwrap();
    double.compact();
    double.end_watches();
    // Changed while the watches are down: the mirror must follow, whichever way it learns.
    kube.delete(&Kind::service(), Some("default"), "gone")
        .await
        .unwrap();
    kube.create(&Kind::service(), Some("default"), &service("late"))
        .await
        .unwrap();
    eventually(
        "the Service created after the history was lost",
        async || {
            store
                .get(&keys::service("default", "late"))
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    eventually("the deleted Service gone", async || {
        store
            .get(&keys::service("default", "gone"))
            .await
            .unwrap()
            .is_none()
    })
    .await;
    for kv in before.iter().filter(|kv| !kv.key.ends_with("/gone")) {
        assert!(
            store.get(&kv.key).await.unwrap().is_some(),
            "{} kept through the re-list",
            kv.key
        );
    }
}

/// An observer's opinion lands in its gateway's Location, with the candidate's summary,
/// and a withdrawn last opinion takes the observer's entry with it.
#[tokio::test]
async fn opinions_live_in_the_gateways_location_and_leave_no_empty_entry() {
    let (_double, kube) = double().await;
    let store = store(&kube).await;
    join_a1(&kube, &store).await;
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    let opinion = |up: Option<bool>| match up {
        Some(up) => Op::Put {
            key: keys::observation("a1", "b1"),
            value: serde_json::to_vec(&json!({"gateway": "a1", "observer": "b1", "up": up}))
                .unwrap(),
            lease: Some(lease),
        },
        None => Op::Delete {
            key: keys::observation("a1", "b1"),
        },
    };
    store.txn(vec![], vec![opinion(Some(false))]).await.unwrap();
    let location = get(&kube, Kind::location(), None, "site-a").await;
    assert_eq!(location["status"]["opinions"]["b1"]["a1"], false);
    assert_eq!(location["status"]["candidates"]["a1"], "down");
    store.txn(vec![], vec![opinion(None)]).await.unwrap();
    let location = get(&kube, Kind::location(), None, "site-a").await;
    assert!(
        location["status"]["opinions"].get("b1").is_none(),
        "{location}"
    );
}
