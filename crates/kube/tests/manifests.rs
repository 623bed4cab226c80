//! The deployment manifests (deploy/): what they must say, checked by reading them, and
//! their validity, checked by tools.
//!
//! Pure (always run): the agent's DaemonSet (host network, every node, the API reached at
//! its real address with the pod's own credentials, probes where the agent serves them,
//! the CNI files where the plugin looks for them), least-privilege RBAC, the settings
//! ConfigMap as the agent decodes it, and the CRDs' schemas against the objects the agent
//! writes (a field a schema does not declare is silently pruned by the API server, so it
//! counts as an error here).
//!
//! With tools: the overlays rendered by `kubectl kustomize` (full: the CNI plugin installed;
//! mesh-only: neither it nor the service proxy), and `scripts/validate-manifests.sh`, which
//! validates every rendered object against Kubernetes 1.33's schemas and the agent's custom
//! resources against their CRDs with a JSON Schema validator. Where a tool cannot be had
//! these skip, saying so, on a developer's machine, and fail when `CI` is set.

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use trellis_kube::{location, peer};

const NAMESPACE: &str = "trellis-system";
const METRICS_PORT: u64 = 9742;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The objects of a YAML stream (`---` between documents; empty documents skipped).
fn documents(text: &str, source: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut flush = |doc: &mut String| {
        let value: Value =
            serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("{source}: {e}\n{doc}"));
        if !value.is_null() {
            out.push(value);
        }
        doc.clear();
    };
    for line in text.lines() {
        if line.trim_end() == "---" {
            flush(&mut current);
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current);
    out
}

fn read_documents(relative: &str) -> Vec<Value> {
    documents(&read(relative), relative)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A tool this test needs cannot be had: a skip on a developer's machine, a failure in CI.
fn unavailable(why: &str) {
    assert!(!in_ci(), "{why} (CI is set: a missing tool fails the test)");
    eprintln!("SKIPPED: {why} (this fails when CI is set)");
}

/// A constant of the CNI plugin's core, read from its source (trellis-kube does not depend
/// on trellis-cni): where the plugin looks for the files the agent writes.
fn cni_default(name: &str) -> String {
    let source = read("crates/cni/src/spec.rs");
    let prefix = format!("pub const {name}: &str = \"");
    let line = source
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("crates/cni/src/spec.rs has no {name}"));
    line.split('"').next().unwrap().to_string()
}

// ---- the agent's DaemonSet ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// Mesh, service proxy and CNI plugin (the base, and overlays/full).
    Full,
    /// Mesh only, beside another CNI plugin and kube-proxy.
    MeshOnly,
}

/// Flags without a value.
const SWITCHES: [&str; 1] = ["--no-service-proxy"];

/// `--name=value`, `--name value` and switches, by name.
fn flags(args: &[String]) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if !arg.starts_with("--") {
            continue;
        }
        let flag = arg.as_str();
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None if SWITCHES.contains(&flag) => (flag.to_string(), None),
            None => {
                let value = args.get(i).cloned();
                i += 1;
                (flag.to_string(), value)
            }
        };
        assert!(
            out.insert(name.clone(), value).is_none(),
            "{name} given twice"
        );
    }
    out
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The host path a container sees at `path`: the hostPath volume mounted at it or above
/// it, with whether the mount is read-only and the volume's hostPath type.
fn host_path_of(pod: &Value, container: &Value, path: &str) -> Option<(String, bool, String)> {
    let mounts = container["volumeMounts"].as_array()?;
    let mount = mounts
        .iter()
        .filter(|m| {
            let at = m["mountPath"].as_str().unwrap();
            path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())?;
    let volume = pod["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    let host = volume["hostPath"]["path"].as_str()?;
    let below = &path[mount["mountPath"].as_str().unwrap().len()..];
    Some((
        format!("{host}{below}"),
        mount["readOnly"] == true,
        volume["hostPath"]["type"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    ))
}

fn env_field(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .map(str::to_string)
}

/// Everything the agent's DaemonSet must say, in either variant.
fn check_agent_daemonset(ds: &Value, variant: Variant) {
    assert_eq!(ds["apiVersion"], "apps/v1");
    assert_eq!(ds["metadata"]["namespace"], NAMESPACE);
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"], true,
        "the agent programs the node's network"
    );
    assert_eq!(
        pod["dnsPolicy"], "Default",
        "the node's resolver: the cluster DNS is a Service address"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    assert_eq!(pod["serviceAccountName"], "trellis");
    assert_ne!(
        pod["automountServiceAccountToken"], false,
        "the token is the agent's credentials"
    );
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "every node, whatever its taints (NotReady ones first: the CNI plugin makes them Ready)"
    );

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];
    assert_eq!(agent["name"], "agent");
    let args = strings(&agent["args"]);
    assert_eq!(args[0], "agent");
    let flags = flags(&args[1..]);
    let flag = |name: &str| flags.get(name).cloned().flatten();
    assert_eq!(flag("--store").as_deref(), Some("kubernetes"));
    assert_eq!(flag("--node").as_deref(), Some("$(NODE_NAME)"));
    assert_eq!(
        env_field(agent, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    match flag("--kube-namespace").as_deref() {
        Some("$(POD_NAMESPACE)") => {
            assert_eq!(
                env_field(agent, "POD_NAMESPACE").as_deref(),
                Some("metadata.namespace")
            );
        }
        other => assert_eq!(other, Some(NAMESPACE)),
    }
    for flag in ["--location", "--internal-ip", "--pod-cidr", "--overlay-ip"] {
        assert!(
            !flags.contains_key(flag),
            "{flag}: read from the Node object on the kubernetes store"
        );
    }

    // Seed 003: never the API through a service address.
    let service_address = |text: &str| {
        text.contains("KUBERNETES_SERVICE")
            || text.contains("kubernetes.default")
            || text.contains(".svc")
    };
    if let Some(api) = flag("--kube-api") {
        assert!(
            !service_address(&api),
            "--kube-api {api}: a service address"
        );
        assert!(api.starts_with("https://"), "--kube-api {api}");
    }
    for arg in &args {
        assert!(!service_address(arg), "{arg}: a service address");
    }
    for env in agent["env"].as_array().into_iter().flatten() {
        let text = env.to_string();
        assert!(!service_address(&text), "{text}: a service address");
    }
    // The kubelet's kubeconfig, read-only, from the node: the file alone, for its server
    // address (the credentials are the pod's). Not the rest of /etc/kubernetes (admin.conf
    // and the CA keys on a control plane node), nor the kubelet's client key.
    let kubeconfig = flag("--kubeconfig").unwrap_or_else(|| "/etc/kubernetes/kubelet.conf".into());
    let (host, read_only, kind) =
        host_path_of(pod, agent, &kubeconfig).expect("the kubelet's kubeconfig is mounted");
    assert_eq!(host, kubeconfig);
    assert!(read_only, "{kubeconfig} is the kubelet's: read-only");
    assert_eq!(kind, "File", "{kubeconfig} alone");
    for secret in ["/etc/kubernetes/admin.conf", "/etc/kubernetes/pki/ca.key"] {
        assert_eq!(host_path_of(pod, agent, secret), None, "{secret}");
    }
    for volume in pod["volumes"].as_array().unwrap() {
        let host = volume["hostPath"]["path"].as_str().unwrap_or("");
        assert!(
            !host.starts_with("/var/lib/kubelet"),
            "{host}: the kubelet's credentials are not the agent's"
        );
    }

    // Probes where the admin endpoint listens.
    let metrics = flag("--metrics-addr").expect("--metrics-addr");
    let port: u64 = metrics.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(port, METRICS_PORT, "{metrics}");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], METRICS_PORT, "{probe}");
        assert!(
            get.get("host").is_none(),
            "{probe}: the pod's (the node's) address"
        );
    }

    // Its state on the node's disk, at the node's paths.
    for file_flag in ["--key-file", "--state-cache"] {
        let file = flag(file_flag).unwrap_or_else(|| panic!("{file_flag}"));
        let (host, read_only, kind) = host_path_of(pod, agent, &file)
            .unwrap_or_else(|| panic!("{file_flag} {file} is not on the node"));
        assert_eq!(host, file, "{file_flag}: the same path on the node");
        assert!(!read_only && kind == "DirectoryOrCreate", "{file_flag}");
    }
    let (host, _, kind) = host_path_of(pod, agent, "/dev/net/tun").expect("/dev/net/tun");
    assert_eq!(
        (host.as_str(), kind.as_str()),
        ("/dev/net/tun", "CharDevice")
    );
    let security = &agent["securityContext"];
    let caps = strings(&security["capabilities"]["add"]);
    assert!(
        security["privileged"] == true
            || (caps.contains(&"NET_ADMIN".to_string()) && caps.contains(&"NET_RAW".to_string())),
        "netlink and probes need NET_ADMIN and NET_RAW: {security}"
    );
    if security["privileged"] == true {
        assert_ne!(
            security["allowPrivilegeEscalation"], false,
            "the API refuses privileged with allowPrivilegeEscalation: false"
        );
    }

    let resources = &agent["resources"];
    assert_eq!(resources["requests"]["cpu"], "50m");
    assert_eq!(resources["requests"]["memory"], "64Mi");
    assert_eq!(resources["limits"]["memory"], "256Mi");
    assert!(
        resources["limits"].get("cpu").is_none(),
        "no CPU limit: a throttled agent answers probes late and looks like a failed gateway"
    );

    let init = pod["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match variant {
        Variant::Full => {
            assert!(!flags.contains_key("--no-service-proxy"));
            // The files the plugin (run by the runtime, on the node) reads, at the paths
            // the installed configuration names: `cni install`'s defaults.
            for (file_flag, default) in [
                ("--cni-node-file", "DEFAULT_NODE_FILE"),
                ("--cni-ready-file", "DEFAULT_READY_FILE"),
            ] {
                let file = flag(file_flag).unwrap_or_else(|| panic!("{file_flag}"));
                assert_eq!(file, cni_default(default), "{file_flag}");
                let (host, read_only, _) = host_path_of(pod, agent, &file)
                    .unwrap_or_else(|| panic!("{file_flag} {file} is not on the node"));
                assert_eq!(host, file, "{file_flag}: the plugin reads it on the node");
                assert!(!read_only, "{file_flag}");
            }
            assert_eq!(init.len(), 1, "the CNI installer");
            let installer = &init[0];
            assert_eq!(installer["image"], agent["image"]);
            let args = strings(&installer["args"]);
            assert_eq!(args[..2], ["cni", "install"]);
            let install = self::flags(&args[2..]);
            for (dir_flag, on_node) in [
                ("--conf-dir", "/etc/cni/net.d"),
                ("--bin-dir", "/opt/cni/bin"),
            ] {
                let dir = install
                    .get(dir_flag)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| panic!("cni install {dir_flag}"));
                let (host, read_only, _) = host_path_of(pod, installer, &dir)
                    .unwrap_or_else(|| panic!("cni install {dir_flag} {dir} is not on the node"));
                assert_eq!(host, on_node, "cni install {dir_flag}");
                assert!(!read_only, "cni install {dir_flag}");
            }
            for file_flag in ["--node-file", "--ready-file", "--ipam-file"] {
                assert!(
                    !install.contains_key(file_flag),
                    "{file_flag}: the defaults, which the agent's flags match"
                );
            }
        }
        Variant::MeshOnly => {
            assert!(init.is_empty(), "no CNI installer: {init:?}");
            assert!(
                flags.contains_key("--no-service-proxy"),
                "kube-proxy keeps the Services"
            );
            for name in flags.keys() {
                assert!(!name.starts_with("--cni"), "{name}: no CNI plugin here");
            }
            for volume in pod["volumes"].as_array().unwrap() {
                let host = volume["hostPath"]["path"].as_str().unwrap_or("");
                assert!(
                    !["/etc/cni/net.d", "/opt/cni/bin"].contains(&host),
                    "{host}: no CNI plugin here"
                );
            }
        }
    }

    // Every mount has its volume, every volume is mounted.
    let volumes: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let mounted: BTreeSet<&str> = containers
        .iter()
        .chain(init.iter())
        .flat_map(|c| c["volumeMounts"].as_array().unwrap().iter())
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, mounted, "volumes and mounts");
}

#[test]
fn the_agent_runs_on_every_node_on_the_host_network_reaching_the_api_at_its_real_address() {
    let objects = read_documents("deploy/base/daemonset.yaml");
    assert_eq!(objects.len(), 1);
    check_agent_daemonset(find(&objects, "DaemonSet", "trellis"), Variant::Full);
}

/// A group, a resource, its verbs.
type Rule = (String, String, BTreeSet<String>);

#[test]
fn the_agent_has_the_least_rights_it_needs() {
    let objects = read_documents("deploy/base/rbac.yaml");
    let rules = |kind: &str| -> Vec<Rule> {
        let role = find(&objects, kind, "trellis");
        let mut out = Vec::new();
        for rule in role["rules"].as_array().unwrap() {
            let verbs: BTreeSet<String> = strings(&rule["verbs"]).into_iter().collect();
            assert!(rule.get("nonResourceURLs").is_none(), "{rule}");
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for text in [&group, &resource].into_iter().chain(&verbs) {
                        assert_ne!(text, "*", "{kind}: no wildcards: {rule}");
                    }
                    out.push((group.clone(), resource, verbs.clone()));
                }
            }
        }
        out
    };
    let verbs =
        |list: &[&str]| -> BTreeSet<String> { list.iter().map(|v| v.to_string()).collect() };
    let read = verbs(&["get", "list", "watch"]);
    let cluster = rules("ClusterRole");
    let expected_cluster = [
        ("", "nodes", verbs(&["get", "list", "watch", "patch"])),
        ("", "services", read.clone()),
        ("discovery.k8s.io", "endpointslices", read.clone()),
        ("networking.k8s.io", "networkpolicies", read.clone()),
        ("", "pods", read.clone()),
        ("", "namespaces", read.clone()),
        ("kilo.squat.ai", "peers", read.clone()),
        (
            "trellis.network",
            "locations",
            verbs(&["get", "list", "watch", "create", "patch", "update"]),
        ),
        (
            "trellis.network",
            "locations/status",
            verbs(&["get", "list", "watch", "create", "patch", "update"]),
        ),
    ];
    let as_owned = |list: &[(&str, &str, BTreeSet<String>)]| -> Vec<Rule> {
        list.iter()
            .map(|(g, r, v)| (g.to_string(), r.to_string(), v.clone()))
            .collect()
    };
    assert_eq!(cluster, as_owned(&expected_cluster));
    let nodes = &cluster.iter().find(|(_, r, _)| r == "nodes").unwrap().2;
    for verb in ["create", "update", "delete", "deletecollection"] {
        assert!(
            !nodes.contains(verb),
            "nodes {verb}: the agent only patches its own Node's annotations"
        );
    }
    for (group, resource, verbs) in &cluster {
        assert!(
            !verbs.contains("delete"),
            "{group}/{resource}: nothing cluster-wide is deleted"
        );
    }

    let role = find(&objects, "Role", "trellis");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    let expected_namespaced = [
        (
            "coordination.k8s.io",
            "leases",
            verbs(&[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ]),
        ),
        ("", "configmaps", read),
    ];
    assert_eq!(rules("Role"), as_owned(&expected_namespaced));

    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = find(&objects, kind, "trellis");
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": "trellis"})
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "trellis", "namespace": NAMESPACE}])
        );
        if kind == "RoleBinding" {
            assert_eq!(binding["metadata"]["namespace"], NAMESPACE);
        }
    }

    // Every custom resource the agent reads is one deploy/crds defines, and vice versa.
    let crds: BTreeSet<(String, String)> = crds()
        .iter()
        .map(|crd| {
            let spec = &crd["spec"];
            (
                spec["group"].as_str().unwrap().to_string(),
                spec["names"]["plural"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let custom: BTreeSet<(String, String)> = cluster
        .iter()
        .filter(|(g, _, _)| g.contains('.') && !g.ends_with(".k8s.io"))
        .map(|(g, r, _)| (g.clone(), r.split('/').next().unwrap().to_string()))
        .collect();
    assert_eq!(crds, custom);
}

#[test]
fn the_base_holds_the_namespace_account_and_settings_the_agent_expects() {
    let kustomization = read_documents("deploy/base/kustomization.yaml");
    let resources = strings(&kustomization[0]["resources"]);
    assert!(
        resources.contains(&"../crds".to_string()),
        "the base installs the CRDs"
    );
    let listed: BTreeSet<String> = resources
        .into_iter()
        .filter(|r| r.ends_with(".yaml"))
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo().join("deploy/base"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk, "every manifest in deploy/base is listed");

    let mut objects = Vec::new();
    for file in &listed {
        objects.extend(read_documents(&format!("deploy/base/{file}")));
    }
    let namespace = find(&objects, "Namespace", NAMESPACE);
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "the agent uses the host's network and devices"
    );
    find(&objects, "ServiceAccount", "trellis");
    for object in &objects {
        let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
        if !cluster_scoped.contains(&object["kind"].as_str().unwrap()) {
            assert_eq!(
                object["metadata"]["namespace"], NAMESPACE,
                "{} {}",
                object["kind"], object["metadata"]["name"]
            );
        }
    }

    // The settings, as the agent decodes them (unknown keys refused).
    let config = find(&objects, "ConfigMap", "trellis");
    let text = config["data"]["settings.json"]
        .as_str()
        .expect("settings.json");
    let settings: trellis_model::ClusterSettings =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("settings.json: {e}"));
    trellis_model::Validate::validate(&settings).unwrap();
    assert_eq!(settings.granularity, trellis_model::Granularity::Location);
    assert_eq!(settings.gateways_per_location, 2);
}

/// The image the manifests name is the one the Containerfile builds, from this workspace.
#[test]
fn the_containerfile_builds_the_binaries_the_manifests_run() {
    let containerfile = read("Containerfile");
    let manifest = read("Cargo.toml");
    let workspace_value = |key: &str| {
        manifest
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("Cargo.toml: no {key}"))
            .to_string()
    };
    let rust = workspace_value("rust-version");
    assert!(
        containerfile.contains(&format!("FROM docker.io/library/rust:{rust}-bookworm")),
        "the builder is Rust {rust}, the workspace's rust-version"
    );
    // Every package it builds exists, and its binaries are the ones copied.
    let packages: Vec<(String, String)> = std::fs::read_dir(repo().join("crates"))
        .unwrap()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path().join("Cargo.toml")).ok()?;
            let name = text
                .split("[package]")
                .nth(1)?
                .lines()
                .find_map(|l| l.strip_prefix("name = \""))?
                .split('"')
                .next()?
                .to_string();
            Some((name, text))
        })
        .collect();
    let built: Vec<&str> = containerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    assert_eq!(
        built.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from(["trellis", "trellis-cni-plugin"])
    );
    for package in &built {
        assert!(
            packages.iter().any(|(name, _)| name == package),
            "no package {package} in crates/"
        );
    }
    for (package, binary) in [
        ("trellis", "trellis"),
        ("trellis-cni-plugin", "trellis-cni"),
    ] {
        let (_, text) = packages.iter().find(|(n, _)| n == package).unwrap();
        assert!(
            text.contains(&format!("name = \"{binary}\"")),
            "{package} builds {binary}"
        );
        assert!(
            containerfile.contains(&format!("/usr/local/bin/{binary}")),
            "{binary} is in /usr/local/bin (the plugin beside trellis, where `cni install` finds it)"
        );
    }
    assert!(containerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/trellis"]"#));

    let version = workspace_value("version");
    let image = format!("ghcr.io/trellis-network/trellis:{version}");
    let ds = read_documents("deploy/base/daemonset.yaml");
    let pod = &ds[0]["spec"]["template"]["spec"];
    for container in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        assert_eq!(
            container["image"],
            image.as_str(),
            "the workspace's version"
        );
    }
}

// ---- the CRDs against the objects the agent writes ----

fn crds() -> Vec<Value> {
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/crds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path).unwrap();
        out.extend(documents(&text, &path.display().to_string()));
    }
    out
}

/// The openAPIV3Schema of `apiVersion`'s `kind` in deploy/crds.
fn schema_of(object: &Value) -> Value {
    let (group, version) = object["apiVersion"]
        .as_str()
        .unwrap()
        .split_once('/')
        .unwrap();
    for crd in crds() {
        let spec = &crd["spec"];
        if spec["group"] == group && spec["names"]["kind"] == object["kind"] {
            for v in spec["versions"].as_array().unwrap() {
                if v["name"] == version {
                    assert_eq!(v["served"], true);
                    return v["schema"]["openAPIV3Schema"].clone();
                }
            }
        }
    }
    panic!("no CRD in deploy/crds for {}", object["kind"]);
}

/// Where `value` breaks `schema` as the API server reads a structural schema: wrong types,
/// missing required fields, values outside an enum or range — and fields the schema does
/// not declare, which the server would prune (drop silently) rather than refuse.
fn schema_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "(object)" } else { path };
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    let type_ok = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("{at}: schema type {other}"),
    };
    if !type_ok {
        errors.push(format!("{at}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {}", schema["enum"]));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|min| n < min) {
            errors.push(format!("{at}: {n} is under {}", schema["minimum"]));
        }
        if schema["maximum"].as_f64().is_some_and(|max| n > max) {
            errors.push(format!("{at}: {n} is over {}", schema["maximum"]));
        }
    }
    if schema["format"] == "date-time"
        && let Some(text) = value.as_str()
    {
        let ok = text.len() >= 20
            && text.as_bytes()[10] == b'T'
            && (text.ends_with('Z') || text[19..].contains(['+', '-']));
        if !ok {
            errors.push(format!("{at}: {text:?} is not an RFC 3339 date-time"));
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            schema_errors(&schema["items"], item, &format!("{path}[{i}]"), errors);
        }
    }
    if let Some(fields) = value.as_object() {
        for required in strings(&schema["required"]) {
            if !fields.contains_key(&required) {
                errors.push(format!("{at}: {required} is required"));
            }
        }
        let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
        for (name, field) in fields {
            let field_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            if path.is_empty() && name == "metadata" {
                // The API server's own, validated as for every object.
                continue;
            }
            if let Some(declared) = schema["properties"].get(name) {
                schema_errors(declared, field, &field_path, errors);
            } else if schema["additionalProperties"].is_object() {
                schema_errors(&schema["additionalProperties"], field, &field_path, errors);
            } else if !preserve {
                errors.push(format!("{field_path}: not in the schema (pruned)"));
            }
        }
    }
}

fn check(object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    schema_errors(&schema_of(object), object, "", &mut errors);
    errors
}

/// A Location as the leader and two observers leave it: the slots, then each observer's
/// opinions, applied as the merge patches they send.
fn written_location() -> Value {
    let mut object = json!({
        "apiVersion": format!("{}/{}", location::GROUP, location::VERSION),
        "kind": location::KIND,
        "metadata": {"name": "site-a"},
        "spec": {"gateways": 2},
    });
    // The slots as the agents write them: a failover from a3 to a2, a vacant slot.
    json_patch::merge(
        &mut object,
        &trellis_kube::store::derive::slots_patch(
            &[Some("a1".into()), Some("a3".into()), None],
            &[Some("a1".into()), Some("a2".into()), None],
            &["a3".into()],
            "2026-11-30T11:00:00.000000Z",
        ),
    );
    for (observer, gateway, forwards) in [
        ("b1", "a1", true),
        ("b1", "a2", true),
        ("b2", "a1", false),
        ("b2", "a3", true),
    ] {
        let verdict = trellis_kube::store::derive::forwarding_summary(
            &object,
            gateway,
            observer,
            Some(forwards),
        );
        json_patch::merge(
            &mut object,
            &location::opinion_patch(observer, gateway, forwards),
        );
        json_patch::merge(
            &mut object,
            &json!({"status": {"candidates": {gateway: verdict}}}),
        );
    }
    assert!(object["status"]["slots"][2].is_null() && !object["status"]["lastFailover"].is_null());
    object
}

/// A Kilo Peer as Kilo's documentation writes one.
fn kilo_peer() -> Value {
    json!({
        "apiVersion": "kilo.squat.ai/v1alpha1",
        "kind": "Peer",
        "metadata": {"name": "laptop"},
        "spec": {
            "allowedIPs": ["10.5.0.1/32"],
            "publicKey": "GY5aT1N9dTR/nJnT1N2f4ClZWVj0jOAld0r8ysWLyjg=",
            "endpoint": {"dnsOrIP": {"ip": "203.0.113.7"}, "port": 51820},
            "persistentKeepalive": 10,
        },
    })
}

/// Objects each CRD must refuse (or prune), and why.
fn refused() -> Vec<(&'static str, Value)> {
    let mut opinion_not_bool = written_location();
    opinion_not_bool["status"]["opinions"]["b1"]["a1"] = json!("yes");
    let mut undeclared = written_location();
    undeclared["status"]["verdicts"] = json!({"a1": "up"});
    let mut bad_verdict = written_location();
    bad_verdict["status"]["candidates"] = json!({"a1": "maybe"});
    let mut too_many = written_location();
    too_many["spec"]["gateways"] = json!(17);
    let mut no_key = kilo_peer();
    no_key["spec"].as_object_mut().unwrap().remove("publicKey");
    let mut port_zero = kilo_peer();
    port_zero["spec"]["endpoint"]["port"] = json!(0);
    vec![
        ("an opinion that is not a boolean", opinion_not_bool),
        ("a status field the schema does not declare", undeclared),
        ("a verdict outside up, down, unknown", bad_verdict),
        ("more than 16 gateways", too_many),
        ("a peer without its public key", no_key),
        ("a peer endpoint on port 0", port_zero),
    ]
}

#[test]
fn the_crds_accept_what_the_agent_writes_and_reads() {
    let location = written_location();
    assert_eq!(
        location::opinions(&location).len(),
        4,
        "the opinions are the agent's own reading"
    );
    assert_eq!(check(&location), Vec::<String>::new());
    let mut with_verdicts = location.clone();
    with_verdicts["status"]["candidates"] = json!({"a1": "up", "a2": "down", "a3": "unknown"});
    with_verdicts["status"]["lastFailover"] =
        json!({"at": "2026-11-30T10:00:00Z", "from": ["a2"], "to": ["a3"]});
    assert_eq!(check(&with_verdicts), Vec::<String>::new());

    let kilo = kilo_peer();
    let accepted = peer::peer_from_object(&kilo).expect("the agent reads it");
    assert_eq!(accepted.persistent_keepalive, Some(10));
    assert_eq!(check(&kilo), Vec::<String>::new());

    for (why, object) in refused() {
        assert!(!check(&object).is_empty(), "{why}: accepted");
    }
}

// ---- with tools: kubectl kustomize, and scripts/validate-manifests.sh ----

/// The overlay rendered by the first kubectl that can ($KUBECTL, PATH, /usr/bin), or why
/// none could.
fn kustomize(overlay: &str) -> Result<Vec<Value>, String> {
    let dir = repo().join("deploy/overlays").join(overlay);
    let mut tried = Vec::new();
    let candidates = std::env::var("KUBECTL")
        .ok()
        .into_iter()
        .chain(["kubectl".to_string(), "/usr/bin/kubectl".to_string()]);
    for kubectl in candidates {
        match Command::new(&kubectl).arg("kustomize").arg(&dir).output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8(out.stdout).unwrap();
                return Ok(documents(&text, &format!("{kubectl} kustomize {overlay}")));
            }
            Ok(out) => tried.push(format!(
                "{kubectl}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .next()
                    .unwrap_or("failed")
            )),
            Err(e) => tried.push(format!("{kubectl}: {e}")),
        }
    }
    Err(format!(
        "no kubectl renders deploy/overlays/{overlay} (1.21 or later needed): {}",
        tried.join("; ")
    ))
}

#[test]
fn the_overlays_render_as_documented() {
    let (full, mesh) = match (kustomize("full"), kustomize("mesh-only")) {
        (Ok(full), Ok(mesh)) => (full, mesh),
        (Err(why), _) | (_, Err(why)) => return unavailable(&why),
    };
    check_agent_daemonset(find(&full, "DaemonSet", "trellis"), Variant::Full);
    check_agent_daemonset(find(&mesh, "DaemonSet", "trellis"), Variant::MeshOnly);
    let inventory = |objects: &[Value]| -> Vec<String> {
        let mut names: Vec<String> = objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        inventory(&full),
        [
            "ClusterRole/trellis",
            "ClusterRoleBinding/trellis",
            "ConfigMap/trellis",
            "CustomResourceDefinition/locations.trellis.network",
            "DaemonSet/trellis",
            "Namespace/trellis-system",
            "Role/trellis",
            "RoleBinding/trellis",
            "ServiceAccount/trellis",
        ]
    );
    assert_eq!(inventory(&mesh), inventory(&full));
    // Beyond the DaemonSet the two are the same objects.
    for object in full.iter().filter(|o| o["kind"] != "DaemonSet") {
        let name = object["metadata"]["name"].as_str().unwrap();
        let kind = object["kind"].as_str().unwrap();
        assert_eq!(find(&mesh, kind, name), object, "{kind}/{name}");
    }
    // The mesh-only agent runs with the same flags less the CNI files, plus
    // --no-service-proxy.
    let args = |objects: &[Value]| {
        strings(
            &find(objects, "DaemonSet", "trellis")["spec"]["template"]["spec"]["containers"][0]["args"],
        )
    };
    let expected: Vec<String> = args(&full)
        .into_iter()
        .filter(|a| !a.starts_with("--cni-"))
        .chain(["--no-service-proxy".to_string()])
        .collect();
    assert_eq!(args(&mesh), expected);
}

/// Removes a temporary directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_manifests_validate_against_kubernetes_1_33_and_the_agents_objects_against_the_crds() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("trt-manifests-test-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let write = |name: &str, object: &Value| {
        let path = dir.0.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(object).unwrap()).unwrap();
        path
    };
    let mut command = Command::new("bash");
    command.arg(repo().join("scripts/validate-manifests.sh"));
    command.arg(write("location.json", &written_location()));
    command.arg(write("peer.json", &kilo_peer()));
    for (i, (_, object)) in refused().iter().enumerate() {
        command
            .arg("--invalid")
            .arg(write(&format!("refused-{i}.json"), object));
    }
    let out = command
        .output()
        .expect("running scripts/validate-manifests.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            // What it checked, for the test's log.
            eprintln!("{stdout}");
            assert!(stdout.contains("deploy/overlays/full:"), "{stdout}");
            assert!(stdout.contains("deploy/overlays/mesh-only:"), "{stdout}");
            assert_eq!(stdout.matches("accepted by its CRD").count(), 2, "{stdout}");
            assert_eq!(
                stdout.matches("refused as it should be").count(),
                refused().len(),
                "{stdout}"
            );
        }
        Some(3) => unavailable(stderr.trim()),
        code => panic!("scripts/validate-manifests.sh exited {code:?}\n{stdout}\n{stderr}"),
    }
}
