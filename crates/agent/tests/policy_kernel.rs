//! Network policy against a real kernel: three namespaces, A — R — B, where R is the node,
//! B its pod `shop/db` and A a pod `shop/web` elsewhere. Policies and pods come from a
//! store; what the agent wrote is read back with `nft` as an independent witness,
//! tampered with from outside (a removed deny, a stale allow), and must be repaired.

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_agent::admin::Metrics;
use trellis_agent::policy::run::{PolicyConfig, run};
use trellis_dataplane::nftables::Nft;
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;
use trellis_testkit::netns::Routed;
use trellis_testkit::nft::nft;
use trellis_testkit::wait_for;

fn serve_in(ns: &str, addr: &'static str) {
    trellis_testkit::tcp::serve(ns, addr, "ok");
}

fn connect(ns: &str, to: &str) -> Result<String, String> {
    trellis_testkit::tcp::exchange(ns, to, Duration::from_millis(300))
}

async fn put(store: &EmbeddedStore, key: &str, value: serde_json::Value) {
    trellis_testkit::tcp::put_json(store, key, value).await;
}

fn pod(name: &str, app: &str, ips: [&str; 2], node: &str) -> serde_json::Value {
    json!({"namespace": "shop", "name": name, "labels": {"app": app}, "ips": ips, "node": node})
}

fn db_from_web() -> serde_json::Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": "shop", "name": "db-from-web"},
           "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                 "ports": [{"port": 8080}]}]}})
}

/// Waits until `a` reaching `to` gives `Ok` (`reach`) or not.
async fn until(a: &str, to: &'static str, reach: bool, what: &str) {
    let a = a.to_string();
    wait_for(what, Duration::from_secs(10), move || {
        let a = a.clone();
        async move { (connect(&a, to).is_ok() == reach).then_some(()) }
    })
    .await;
}

fn metric(metrics: &Metrics, line_start: &str) -> u64 {
    let text = metrics.render(Instant::now());
    (text.lines())
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_enforced_repaired_after_tampering_and_their_drops_counted() {
    let net = Routed::new("policy");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    serve_in(&b, "0.0.0.0:8080");
    serve_in(&b, "0.0.0.0:8081");
    serve_in(&b, "[fd91:2::2]:8080");
    let store = EmbeddedStore::new();
    put(
        &store,
        "namespaces/shop",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
    )
    .await;
    put(
        &store,
        "pods/shop/db",
        pod("db", "db", [Routed::B, Routed::B6], "r"),
    )
    .await;
    put(
        &store,
        "pods/shop/web",
        pod("web", "web", [Routed::A, Routed::A6], "other"),
    )
    .await;
    let metrics = Metrics::new("r");
    let enforcer = tokio::spawn(run(
        store.clone() as Arc<dyn Store>,
        Arc::new(Nft::connect_in(&r).unwrap()),
        PolicyConfig {
            node: "r".into(),
            audit_interval: Duration::from_millis(500),
            cni_allocations: None,
            publish_pods: false,
            programmed_file: None,
        },
        metrics.policy(),
    ));

    // No policy: everything reaches B.
    until(&a, "10.91.2.2:8081", true, "B to be reachable").await;

    // Isolated: web reaches 8080 only, in both families; the rest is dropped, not refused.
    put(&store, "networkpolicies/shop/db-from-web", db_from_web()).await;
    until(&a, "10.91.2.2:8081", false, "8081 to be dropped").await;
    assert_eq!(connect(&a, "10.91.2.2:8081"), Err("timed out".into()));
    assert_eq!(connect(&a, "10.91.2.2:8080"), Ok("ok".into()));
    assert_eq!(connect(&a, "[fd91:2::2]:8080"), Ok("ok".into()));
    let listed = nft(&r, &["list", "table", "ip", "trellis-policy"]);
    // What nft lists, nft reads back (`nft -c -f`): every name is one it can parse.
    let file = std::env::temp_dir().join(format!("trt-policy-{}.nft", std::process::id()));
    std::fs::write(&file, &listed).unwrap();
    nft(&r, &["-c", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(listed.contains("10.91.2.2 : jump check-"), "{listed}");
    assert!(listed.contains("shop/db-from-web rule 0"), "{listed}");
    assert!(listed.contains("tcp dport 8080 return"), "{listed}");
    // The selector's set, named after it (app=web in shop), as nft lists it.
    let peers = (listed.lines())
        .find_map(|l| {
            l.trim()
                .strip_prefix("set ")
                .filter(|n| n.starts_with("peers-shop/app_web"))
        })
        .expect("the selector's set")
        .trim_end_matches(" {")
        .to_string();
    let peers = peers.as_str();
    assert!(
        nft(&r, &["list", "set", "ip", "trellis-policy", peers]).contains("10.91.1.2"),
        "web's address is in the selector's set"
    );
    wait_for("the drop to be counted", Duration::from_secs(5), || {
        let n = metric(
            &metrics,
            "trellis_policy_dropped_packets_total{node=\"r\",policy=\"shop/db-from-web\",direction=\"ingress\"}",
        );
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert_eq!(metric(&metrics, "trellis_policy_pods_selected{"), 2);

    // web relabelled: its address leaves the set, and 8080 is dropped too.
    put(
        &store,
        "pods/shop/web",
        pod("web", "other", [Routed::A, Routed::A6], "other"),
    )
    .await;
    until(
        &a,
        "10.91.2.2:8080",
        false,
        "web's address to leave the set",
    )
    .await;

    // Tampering: a stale allow (web's address back in the set) and a removed deny (B's
    // entry in the ingress map). Both open B; the audit closes it again.
    nft(
        &r,
        &[
            "add",
            "element",
            "ip",
            "trellis-policy",
            peers,
            "{ 10.91.1.2 }",
        ],
    );
    nft(
        &r,
        &[
            "delete",
            "element",
            "ip",
            "trellis-policy",
            "ingress",
            "{ 10.91.2.2 }",
        ],
    );
    let repaired_before = metric(&metrics, "trellis_policy_drift_repaired_total{");
    until(
        &a,
        "10.91.2.2:8081",
        false,
        "the audit to repair the tampering",
    )
    .await;
    assert_eq!(connect(&a, "10.91.2.2:8080"), Err("timed out".into()));
    assert!(
        !nft(&r, &["list", "set", "ip", "trellis-policy", peers]).contains("10.91.1.2"),
        "the stale allow is gone"
    );
    assert!(metric(&metrics, "trellis_policy_drift_repaired_total{") >= repaired_before + 2);

    // The policy deleted: B is open again and no check chain is left.
    store
        .delete("networkpolicies/shop/db-from-web")
        .await
        .unwrap();
    until(&a, "10.91.2.2:8081", true, "B to be open again").await;
    let listed = nft(&r, &["list", "table", "ip", "trellis-policy"]);
    assert!(!listed.contains("check-"), "{listed}");
    enforcer.abort();
}
