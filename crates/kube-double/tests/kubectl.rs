//! A real client keeps the double honest: Debian's `kubectl` (package kubernetes-client)
//! lists and describes nodes, leases, Peers and a location-like custom resource, and its
//! `apply -f` of a Service, an EndpointSlice, a CRD and a Peer reaches a watcher.
//!
//! The binary is `$KUBECTL`, else `kubectl` on the PATH; without one the test is skipped with a
//! message, except in CI (`CI=true`), where it fails. The double serves no OpenAPI document,
//! so `apply` runs with `--validate=false`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use trellis_kube_double::{KubeDouble, KubeDoubleHandle};

fn find_kubectl() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("KUBECTL") {
        return Some(PathBuf::from(k));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
}

struct Kubectl {
    bin: PathBuf,
    dir: PathBuf,
}

impl Kubectl {
    fn new(bin: PathBuf, api: &KubeDoubleHandle) -> Kubectl {
        let dir = std::env::temp_dir().join(format!(
            "trellis-kube-double-{}-{}",
            std::process::id(),
            api.addr().port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig()).unwrap();
        Kubectl { bin, dir }
    }

    /// Runs kubectl; its standard output, which it must succeed to print.
    async fn run(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env("HOME", &self.dir)
            .output()
            .await
            .expect("run kubectl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    async fn apply(&self, manifest: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/manifests")
            .join(manifest);
        self.run(&["apply", "--validate=false", "-f", path.to_str().unwrap()])
            .await
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The table row of `name` split into its cells.
fn row<'a>(output: &'a str, name: &str) -> Vec<&'a str> {
    output
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.contains(&name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{output}"))
}

fn header(output: &str) -> Vec<&str> {
    output
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect()
}

fn node(name: &str, ready: &str, role: Option<&str>) -> Value {
    let mut labels =
        json!({"topology.kubernetes.io/region": "west", "kubernetes.io/hostname": name});
    if let Some(role) = role {
        labels[format!("node-role.kubernetes.io/{role}")] = json!("");
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {"trellis.dev/public-key": format!("key-of-{name}")}},
        "spec": {"podCIDRs": ["10.42.1.0/24"]},
        "status": {
            "conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady", "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "addresses": [{"type": "InternalIP", "address": "192.168.10.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.30.2", "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "6.1.0",
                         "osImage": "Debian GNU/Linux 12", "containerRuntimeVersion": "", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        },
    })
}

fn location_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "locations.example.trellis.dev"},
        "spec": {
            "group": "example.trellis.dev", "scope": "Cluster",
            "names": {"plural": "locations", "singular": "location", "kind": "Location"},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "additionalPrinterColumns": [
                    {"name": "Active", "type": "string", "jsonPath": ".status.active"},
                    {"name": "Standby", "type": "string", "jsonPath": ".status.standby"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
            }],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_reads_and_writes_through_the_double() {
    let Some(bin) = find_kubectl() else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "kubectl is required in CI: install kubernetes-client"
        );
        eprintln!("SKIPPED: no kubectl (install Debian's kubernetes-client, or set KUBECTL)");
        return;
    };
    let api = KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let a = api.addr();
    let k = Kubectl::new(bin, &api);

    // A lab's state: nodes with their leases, as the agents would write them.
    for (name, ready, role) in [("n1", "True", Some("gateway")), ("n2", "False", None)] {
        assert_eq!(
            post(a, "/api/v1/nodes", &node(name, ready, role)).await.0,
            201
        );
        let lease = json!({"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                                                                 "renewTime": "2026-01-01T00:00:00.000000Z"}});
        assert_eq!(
            post(
                a,
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                &lease
            )
            .await
            .0,
            201
        );
    }

    let nodes = k.run(&["get", "nodes"]).await;
    assert_eq!(
        header(&nodes),
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        "{nodes}"
    );
    let n1 = row(&nodes, "n1");
    assert_eq!(
        (n1[1], n1[2], n1[4]),
        ("Ready", "gateway", "v1.30.2"),
        "{nodes}"
    );
    let n2 = row(&nodes, "n2");
    assert_eq!((n2[1], n2[2]), ("NotReady", "<none>"), "{nodes}");

    let described = k.run(&["describe", "node", "n1"]).await;
    for expected in [
        "Name:               n1",
        "topology.kubernetes.io/region=west",
        "trellis.dev/public-key: key-of-n1",
        "HolderIdentity:  n1",
        "KubeletReady",
        "InternalIP:  192.168.10.1",
        "PodCIDRs:",
        "10.42.1.0/24",
    ] {
        assert!(
            described.contains(expected),
            "{expected:?} missing from:\n{described}"
        );
    }

    // `get -w` watches with the Table Accept header and prints each change as a row.
    let mut watching = tokio::process::Command::new(&k.bin)
        .arg("--kubeconfig")
        .arg(k.dir.join("kubeconfig"))
        .args(["get", "leases", "-n", "kube-node-lease", "-w"])
        .env("HOME", &k.dir)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run kubectl get -w");
    let mut lines = BufReader::new(watching.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        line.expect("a line from kubectl get -w within 10 s")
            .unwrap()
            .expect("kubectl get -w ended")
    };
    assert_eq!(
        next_line().await.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "HOLDER", "AGE"]
    );
    let mut initial = [next_line().await, next_line().await];
    initial.sort();
    assert!(
        initial[0].starts_with("n1 ") && initial[1].starts_with("n2 "),
        "{initial:?}"
    );
    let takeover = json!({"spec": {"holderIdentity": "n3"}});
    let lease = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2";
    assert_eq!(
        patch(a, lease, "application/merge-patch+json", &takeover)
            .await
            .0,
        200
    );
    assert_eq!(
        next_line()
            .await
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    drop(watching);

    let leases = k.run(&["get", "leases", "-A"]).await;
    assert_eq!(
        header(&leases),
        ["NAMESPACE", "NAME", "HOLDER", "AGE"],
        "{leases}"
    );
    assert_eq!(
        row(&leases, "n2")[..3],
        ["kube-node-lease", "n2", "n3"],
        "{leases}"
    );

    // A Service and an EndpointSlice applied by kubectl reach a watcher, as the proxy's.
    let (_, slices) = get(a, "/apis/discovery.k8s.io/v1/endpointslices").await;
    let mut slice_watch = Watch::open(
        a,
        &format!(
            "/apis/discovery.k8s.io/v1/endpointslices?watch=1&resourceVersion={}",
            rv(&slices)
        ),
    )
    .await;
    let mut service_watch = Watch::open(
        a,
        &format!(
            "/api/v1/namespaces/default/services?watch=1&resourceVersion={}",
            rv(&slices)
        ),
    )
    .await;
    assert_eq!(k.apply("service.yaml").await.trim(), "service/web created");
    let e = service_watch.next().await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["spec"]["ports"][0]["port"].as_u64()
        ),
        (Some("ADDED"), Some(80))
    );
    assert!(
        e["object"]["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );
    assert_eq!(
        k.apply("endpointslice.yaml").await.trim(),
        "endpointslice.discovery.k8s.io/web-abc created"
    );
    let e = slice_watch.next().await;
    assert_eq!(e["type"], "ADDED");
    assert_eq!(
        e["object"]["endpoints"][0]["addresses"],
        json!(["10.0.1.5"])
    );
    assert_eq!(
        e["object"]["metadata"]["labels"]["kubernetes.io/service-name"],
        "web"
    );
    let svc = k.run(&["get", "services"]).await;
    assert_eq!(
        row(&svc, "web")[..4],
        ["web", "ClusterIP", "10.96.0.10", "80/TCP"],
        "{svc}"
    );

    // A second apply of a changed Service is a strategic merge patch: the port is replaced.
    let changed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/service.yaml"),
    )
    .unwrap()
    .replace("port: 80\n", "port: 81\n");
    let path = k.dir.join("service.yaml");
    std::fs::write(&path, changed).unwrap();
    let out = k
        .run(&["apply", "--validate=false", "-f", path.to_str().unwrap()])
        .await;
    assert_eq!(out.trim(), "service/web configured");
    let e = service_watch.next().await;
    assert_eq!(e["type"], "MODIFIED");
    assert_eq!(
        e["object"]["spec"]["ports"],
        json!([{"name": "http", "port": 81, "protocol": "TCP", "targetPort": 8080}])
    );

    // Kilo's Peer CRD and a Peer, unchanged.
    assert_eq!(
        k.apply("peer-crd.yaml").await.trim(),
        "customresourcedefinition.apiextensions.k8s.io/peers.kilo.squat.ai created"
    );
    let (_, peers) = get(a, "/apis/kilo.squat.ai/v1alpha1/peers").await;
    let mut peer_watch = Watch::open(
        a,
        &format!(
            "/apis/kilo.squat.ai/v1alpha1/peers?watch=1&resourceVersion={}",
            rv(&peers)
        ),
    )
    .await;
    assert_eq!(
        k.apply("peer.yaml").await.trim(),
        "peer.kilo.squat.ai/laptop created"
    );
    let e = peer_watch.next().await;
    assert_eq!(e["type"], "ADDED");
    assert_eq!(
        e["object"]["spec"]["endpoint"],
        json!({"dnsOrIP": {"ip": "192.168.0.50"}, "port": 51820})
    );
    assert_eq!(
        e["object"]["spec"]["publicKey"],
        "GY5aT1N9dTR/nJnT1N2f4ClZWVj0jOAld0r8ysWLyjg="
    );
    let peers = k.run(&["get", "peers"]).await;
    assert_eq!(header(&peers), ["NAME", "AGE"], "{peers}");
    row(&peers, "laptop");
    let described = k.run(&["describe", "peer", "laptop"]).await;
    assert!(
        described.contains("10.5.0.1/32") && described.contains("Kind:         Peer"),
        "{described}"
    );

    // A location-like resource with printer columns prints them.
    assert_eq!(
        post(
            a,
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            &location_crd()
        )
        .await
        .0,
        201
    );
    let url = "/apis/example.trellis.dev/v1alpha1/locations";
    assert_eq!(
        post(a, url, &json!({"metadata": {"name": "west"}, "spec": {}}))
            .await
            .0,
        201
    );
    let status = json!({"status": {"active": "n1", "standby": "n2"}});
    assert_eq!(
        patch(
            a,
            &format!("{url}/west/status"),
            "application/merge-patch+json",
            &status
        )
        .await
        .0,
        200
    );
    let locations = k.run(&["get", "locations"]).await;
    assert_eq!(
        header(&locations),
        ["NAME", "ACTIVE", "STANDBY", "AGE"],
        "{locations}"
    );
    assert_eq!(
        row(&locations, "west")[..3],
        ["west", "n1", "n2"],
        "{locations}"
    );

    assert_eq!(
        k.run(&["delete", "peer", "laptop"]).await.trim(),
        "peer.kilo.squat.ai \"laptop\" deleted"
    );
    assert_eq!(peer_watch.next().await["type"], "DELETED");
}
