//! `trellis apply|get|delete` as a person runs them, the built binary against a store: the
//! embedded store served on a Unix socket in this process (what a lab runs), and a real
//! etcd. Apply allocates a ClusterIP, a re-apply changes nothing, a bad manifest is refused
//! naming document, object, field and value with nothing written, `get -o yaml` applies
//! back unchanged, and delete leaves no record or claim behind.

mod support;

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use support::text;
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;

const MANIFEST: &str = r#"
# A Service as people write it, and its endpoints.
apiVersion: v1
kind: Service
metadata:
  name: web
  labels: {app: web}
spec:
  type: NodePort
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: dns
    port: 53
    protocol: UDP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: ["10.244.1.10"]
  conditions: {ready: true}
  nodeName: a1
- addresses: ["10.244.2.10"]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: b1
ports:
- name: http
  port: 8080
"#;

/// The Kubernetes documentation's NetworkPolicy, and one whose `except` leaves its block.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
    - namespaceSelector: {matchLabels: {project: myproject}}
    - podSelector: {matchLabels: {role: frontend}}
    ports: [{protocol: TCP, port: 6379}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 5978}]
"#;
const BAD_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: leaky}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/24]}}]
"#;

/// A valid Service, then one with a bad named port: the first must not be written either.
const BAD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec:
  ports:
  - {name: http, port: 80}
  - {name: admin, port: 81, targetPort: "Http!"}
"#;

struct Trellis {
    store_flags: Vec<String>,
}

impl Trellis {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(args)
            .args(&self.store_flags)
            .env("TRELLIS_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running trellis");
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("writing stdin");
        drop(input);
        child.wait_with_output().expect("trellis output")
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(out.status.success(), "trellis {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("writing a manifest");
    path
}

/// The whole session, against whatever store `trellis` reaches with `store_flags`;
/// `store` is a client of the same store, to check what is really there.
fn session(
    name: &str,
    store_flags: Vec<String>,
    store: Arc<dyn Store>,
    rt: &tokio::runtime::Runtime,
) {
    let trellis = Trellis { store_flags };
    let dir = std::env::temp_dir().join(format!("trellis-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = write(&dir, "web.yaml", MANIFEST);
    let manifest = manifest.to_str().unwrap();
    let bad = write(&dir, "bad.yaml", BAD);

    let out = trellis.ok(&["apply", "-f", manifest], None);
    assert_eq!(
        out,
        "service/web created\nendpointslice.discovery.k8s.io/web-abc12 created\n"
    );
    let web: Value =
        serde_json::from_str(&trellis.ok(&["get", "svc", "web", "-o", "json"], None)).unwrap();
    let cluster_ip: std::net::IpAddr = web["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    assert!(
        "10.96.0.0/12"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&cluster_ip),
        "{web}"
    );
    let node_ports: Vec<u64> = web["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["nodePort"].as_u64().expect("a node port"))
        .collect();
    assert!(
        node_ports.iter().all(|p| (30000..=32767).contains(p)),
        "{web}"
    );

    let out = trellis.ok(&["apply", "-f", manifest], None);
    assert_eq!(
        out,
        "service/web unchanged\nendpointslice.discovery.k8s.io/web-abc12 unchanged\n"
    );

    let (before, _) = rt.block_on(store.list("")).unwrap();
    let out = trellis.run(&["apply", "-f", bad.to_str().unwrap()], None);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        "bad.yaml, document 2",
        "Service shop/bad",
        "spec.ports[1].targetPort",
        "\"Http!\"",
    ] {
        assert!(stderr.contains(part), "{part} not named: {stderr}");
    }
    let (after, _) = rt.block_on(store.list("")).unwrap();
    assert_eq!(after, before, "nothing of the refused manifest was written");

    let table = trellis.ok(&["get", "services"], None);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME   TYPE       CLUSTER-IP"),
        "{table}"
    );
    assert!(
        lines[1].contains(&format!(
            "80:{}/TCP,53:{}/UDP",
            node_ports[0], node_ports[1]
        )),
        "{table}"
    );
    let slices = trellis.ok(&["get", "endpointslices", "-A"], None);
    assert!(
        slices.contains("default     web-abc12   IPv4          8080    10.244.1.10,10.244.2.10"),
        "{slices}"
    );

    // NetworkPolicies, as kubectl applies and lists them.
    let policy = write(&dir, "policy.yaml", POLICY);
    let policy = policy.to_str().unwrap();
    let out = trellis.ok(&["apply", "-f", policy], None);
    assert_eq!(
        out,
        "networkpolicy.networking.k8s.io/test-network-policy created\n"
    );
    let listed = trellis.ok(&["get", "netpol"], None);
    assert!(
        listed.contains("NAME                  POD-SELECTOR   AGE")
            && listed.contains("test-network-policy   role=db"),
        "{listed}"
    );
    let bad_policy = write(&dir, "bad-policy.yaml", BAD_POLICY);
    let out = trellis.run(&["apply", "-f", bad_policy.to_str().unwrap()], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("spec.ingress[0].from[0].ipBlock.except[0]")
            && stderr.contains("10.1.0.0/24"),
        "{stderr}"
    );
    let out = trellis.ok(&["delete", "-f", policy], None);
    assert_eq!(
        out,
        "networkpolicy.networking.k8s.io \"test-network-policy\" deleted\n"
    );

    // A Namespace with labels, for namespaceSelectors: cluster-scoped, whatever -n says.
    let out = trellis.ok(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n"),
    );
    assert_eq!(out, "namespace/shop created\n");
    let listed = trellis.ok(&["get", "namespaces", "-n", "other"], None);
    assert!(
        listed.starts_with("NAME   LABELS") && listed.contains("shop   team=a"),
        "{listed}"
    );
    let one = trellis.ok(&["get", "ns", "shop", "-o", "json"], None);
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["metadata"]["labels"]["team"], "a", "{one}");
    let out = trellis.run(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: Shop_1}\n"),
    );
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Shop_1"),
        "{out:?}"
    );
    let out = trellis.ok(&["delete", "namespace", "shop"], None);
    assert_eq!(out, "namespace \"shop\" deleted\n");

    // What `get -o yaml` prints is a manifest: it reads back as the same objects and
    // applies back unchanged, through standard input.
    let yaml = trellis.ok(&["get", "svc", "-o", "yaml"], None);
    let json = trellis.ok(&["get", "svc", "-o", "json"], None);
    let from_yaml: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    let from_json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(from_yaml, from_json);
    assert_eq!(from_yaml["kind"], "List");
    assert_eq!(from_yaml["items"][0], web);
    let out = trellis.ok(&["apply", "-f", "-"], Some(&yaml));
    assert_eq!(out, "service/web unchanged\n");

    let out = trellis.ok(&["delete", "-f", manifest], None);
    assert_eq!(
        out,
        "service \"web\" deleted\nendpointslice.discovery.k8s.io \"web-abc12\" deleted\n"
    );
    let out = trellis.run(&["delete", "svc", "web"], None);
    assert!(
        !out.status.success(),
        "deleting twice fails: {}",
        text(&out)
    );
    trellis.ok(&["delete", "svc", "web", "--ignore-not-found"], None);
    let out = trellis.run(&["get", "svc"], None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("No resources found"));
    let (left, _) = rt.block_on(store.list("")).unwrap();
    assert!(left.is_empty(), "no record or claim left: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn apply_get_delete_on_the_embedded_store_served_on_a_socket() {
    let rt = runtime();
    let dir = std::env::temp_dir().join(format!("trellis-objects-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("store.sock");
    // The store runs its lease timer on the runtime it is made in.
    let store = rt.block_on(async { EmbeddedStore::new() });
    let server = rt
        .block_on(trellis_store::etcd::server::serve_unix(
            store.clone(),
            &socket,
        ))
        .expect("serving the store");
    session(
        "served",
        vec!["--store".into(), format!("unix:{}", socket.display())],
        store,
        &rt,
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn apply_get_delete_on_etcd() {
    let rt = runtime();
    let etcd = trellis_testkit::etcd::Etcd::start();
    let store: Arc<dyn Store> = rt.block_on(async { etcd.store("/trellis/") as Arc<dyn Store> });
    rt.block_on(trellis_testkit::etcd::wait_answering(store.as_ref()));
    session(
        "etcd",
        vec![
            "--store".into(),
            format!("etcd://127.0.0.1:{}", etcd.client_port),
        ],
        store,
        &rt,
    );
}
