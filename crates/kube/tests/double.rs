//! The client edge against the in-process API double: list, watch from a version with
//! bookmarks, merge patches read back through the pure mapping, and the 410 that sends a
//! watcher back to a fresh list.

use futures::StreamExt;
use serde_json::json;
use std::time::Duration;
use trellis_kube::client::{Change, Kind, Kube, KubeError};
use trellis_kube::node::{annotations_patch, node_from_object};
use trellis_kube_double::KubeDouble;

mod common;

use common::double_and_client;

fn node(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": "site-a"}},
        "spec": {"podCIDRs": ["10.244.1.0/24"]},
    })
}

#[tokio::test]
async fn an_agent_lists_watches_and_patches_its_node_through_the_api() {
    let (double, kube) = double_and_client().await;
    let nodes = Kind::node();
    kube.create(&nodes, None, &node("a1")).await.unwrap();
    let (listed, version) = kube.list(&nodes, None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        node_from_object(&listed[0]).unwrap(),
        None,
        "no agent has joined it yet"
    );

    let mut watch = Box::pin(kube.watch(&nodes, None, &version).await.unwrap());
    kube.create(&nodes, None, &node("b1")).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next.change {
        Change::Applied(o) => assert_eq!(o["metadata"]["name"], "b1"),
        other => panic!("{other:?}"),
    }

    // The agent of a1 publishes itself: one merge patch, read back as a node record.
    let record = trellis_model::Node {
        name: "a1".into(),
        location: "site-a".into(),
        internal_ip: "172.20.0.10/24".parse().unwrap(),
        endpoint: None,
        listen_port: 51820,
        public_key: None,
        pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        gateway: Default::default(),
        overlay_ip: "100.64.0.1".parse().unwrap(),
        probe_ip: None,
        persistent_keepalive: None,
        location_prefixes: Vec::new(),
    };
    let patch = annotations_patch(&listed[0], &record).expect("a first publication");
    let patched = kube
        .merge_patch(&nodes, None, "a1", &patch, false)
        .await
        .unwrap();
    assert_eq!(
        node_from_object(&patched).unwrap().unwrap(),
        record,
        "what was written reads back as the same record"
    );
    assert_eq!(
        annotations_patch(&patched, &record),
        None,
        "nothing more to write"
    );
    let seen = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Change::Applied(o) = e.change
            && o["metadata"]["name"] == "a1"
        {
            break o;
        }
    };
    assert!(
        node_from_object(&seen).unwrap().is_some(),
        "the watcher sees a1 join"
    );

    // A bookmark arrives while nothing changes (the double sends one a second).
    let bookmark = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(bookmark.change, Change::Bookmark);
    assert!(!bookmark.resource_version.is_empty());

    // History compacted past the version a watcher resumes from: 410, list afresh.
    double.compact();
    let mut stale = Box::pin(kube.watch(&nodes, None, &version).await.unwrap());
    match tokio::time::timeout(Duration::from_secs(5), stale.next())
        .await
        .unwrap()
        .unwrap()
    {
        Err(KubeError::Expired { version: v, .. }) => assert_eq!(v, version),
        other => panic!("expected Expired: {other:?}"),
    }

    // A conflict is refused by code.
    match kube.create(&nodes, None, &node("a1")).await {
        Err(KubeError::Refused { code: 409, .. }) => {}
        other => panic!("expected 409: {other:?}"),
    }
}

/// The kubelet's kubeconfig brings the address and the credentials together (the double
/// takes none, so this checks the path through the kubeconfig loader).
#[tokio::test]
async fn a_client_from_the_kubelets_kubeconfig_reaches_the_api() {
    let double = KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("trt-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubelet.conf");
    std::fs::write(&path, double.kubeconfig()).unwrap();
    let path = path.to_str().unwrap().to_string();
    let text = std::fs::read_to_string(&path).unwrap();
    let address = trellis_kube::api_address::choose(None, Some((&path, &text)), |_| None).unwrap();
    assert_eq!(address.url, double.url());
    let kube = Kube::connect(&address, Duration::from_secs(5))
        .await
        .unwrap();
    kube.create(&Kind::node(), None, &node("a1")).await.unwrap();
    let (nodes, _) = kube.list(&Kind::node(), None).await.unwrap();
    assert_eq!(nodes.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The Location resource as an API serves it: the CRD registers it, the leader's slots
/// and two observers' opinions go to its status as merge patches that never conflict,
/// and read back whole.
#[tokio::test]
async fn observers_and_the_leader_share_a_location_without_conflicts() {
    use trellis_kube::location;
    let (_double, kube) = double_and_client().await;
    kube.create(&Kind::custom_resource_definition(), None, &location::crd())
        .await
        .unwrap();
    let site = Kind::location();
    kube.create(
        &site,
        None,
        &json!({
            "apiVersion": "trellis.network/v1alpha1",
            "kind": "Location",
            "metadata": {"name": "site-a"},
            "spec": {},
        }),
    )
    .await
    .unwrap();
    let slots = location::slots_status(&["a1".into()], &["a2".into()]);
    kube.merge_patch(&site, None, "site-a", &slots, true)
        .await
        .unwrap();
    for (observer, forwards) in [("b1", true), ("b2", false)] {
        kube.merge_patch(
            &site,
            None,
            "site-a",
            &location::opinion_patch(observer, "a1", forwards),
            true,
        )
        .await
        .unwrap();
    }
    let (all, _) = kube.list(&site, None).await.unwrap();
    let mut opinions = location::opinions(&all[0]);
    opinions.sort();
    assert_eq!(
        opinions,
        [
            ("b1".to_string(), "a1".to_string(), true),
            ("b2".into(), "a1".into(), false)
        ]
    );
    assert_eq!(all[0]["status"]["activeList"], "a1");
}

/// A Kilo Peer, applied as Kilo users apply it, reaches Trellis as an external peer.
#[tokio::test]
async fn a_kilo_peer_from_the_api_is_an_external_peer() {
    let (_double, kube) = double_and_client().await;
    kube.create(
        &Kind::custom_resource_definition(),
        None,
        &trellis_kube::peer::kilo_crd(),
    )
    .await
    .unwrap();
    kube.create(
        &Kind::kilo_peer(),
        None,
        &json!({
            "apiVersion": "kilo.squat.ai/v1alpha1",
            "kind": "Peer",
            "metadata": {"name": "laptop"},
            "spec": {
                "allowedIPs": ["10.5.0.1/32"],
                "publicKey": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
                "persistentKeepalive": 10,
            },
        }),
    )
    .await
    .unwrap();
    let (peers, _) = kube.list(&Kind::kilo_peer(), None).await.unwrap();
    let peer = trellis_kube::peer::peer_from_object(&peers[0]).unwrap();
    assert_eq!(peer.name, "laptop");
    assert_eq!(peer.persistent_keepalive, Some(10));
}
