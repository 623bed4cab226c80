//! `trellis-cni` under a real container runtime (issue 10): podman 4.3 with runc and its CNI
//! network backend (Debian's packages) calls the plugin exactly as it calls any other —
//! alone, chained before Debian's reference `portmap` and `bandwidth` plugins, and as the
//! delegate of a meta-plugin (as Multus calls its delegates).
//!
//! Every test builds its own node and nothing else:
//! - a network namespace `trt-podman-PID-TAG` that stands for the node: podman runs inside
//!   it (`nsenter --net`, never `ip netns exec`, which hides the cgroup mounts from runc),
//!   so the plugins run there and the host ends of the pods' veths land there; it is
//!   connected to nothing, the host's namespace least of all;
//! - a directory `/tmp/trt-cni-PID-TAG` with podman's configuration (`CONTAINERS_CONF`),
//!   storage (`--root`, `--runroot`, the `vfs` driver: no overlay mounts), per-boot state
//!   and file locks, the network configuration, the plugin directory, a busybox root
//!   filesystem, the node file and the IPAM file.
//!
//! There is no agent and no ready file: ADD, CHECK and DEL need nothing but the node.
//! Everything a test made is removed when it ends, also when it fails: containers (DEL
//! through podman), mounts, the directory, the containers' cgroup parent `/trt-podman-…`,
//! the namespace, libcni's cached results of the test's network. What a killed run left is
//! removed by the next one. Only libcni's and runc's own state directories
//! (`/var/lib/cni/results`, `/run/runc`) stay, empty. That plumbing is
//! [`trellis_testkit::podman`]'s, shared with crates/trellis/tests/podman.rs.
//!
//! The same scenarios with the reference `bridge` + `host-local` plugins are the controls:
//! they prove the harness (podman, runc, the chain, CHECK driven by hand), so a failure
//! that only the `trellis-cni` variant shows is the plugin's.
//!
//! podman 4.3 links libcni 1.1, which knows CNI results up to 1.0.0: the networks here say
//! `"cniVersion": "1.0.0"` (the plugin negotiates down), as they would on any runtime of
//! that age.
//!
//! Needs root (network namespaces, podman); skipped otherwise. In CI, which runs as root,
//! the packages come from scripts/test.sh: podman, runc, busybox-static,
//! containernetworking-plugins, iptables, jq.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use trellis_testkit::podman::{self, CNI_VERSION, Podman, describe, is_root, run_ok};

/// The plugin under test, as cargo built it.
const TRELLIS_CNI: &str = env!("CARGO_BIN_EXE_trellis-cni");
/// Debian's reference plugins (`containernetworking-plugins` 1.1.1).
const REFERENCE_DIR: &str = "/usr/lib/cni";

const POD_CIDR4: &str = "10.244.1.0/24";
const POD_CIDR6: &str = "fd00:10:244:1::/64";
const GATEWAY4: &str = "10.244.1.1";
const GATEWAY6: &str = "fd00:10:244:1::1";
const FIRST_POD4: &str = "10.244.1.2";
/// The overlay's MTU, as the agent writes it in the node file.
const MTU: u32 = 1420;
/// A local address of the node (on its lo) for host ports.
const NODE_ADDR: &str = "10.98.0.1";
const HOST_PORT: u16 = 18080;
const POD_PORT: u16 = 8080;
/// What the busybox web server in the chained test serves.
const PAGE: &str = "served by a pod behind portmap";
/// The `PATH` plugins get.
const SAFE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a ping between pods may take to work (a fresh IPv6 address).
const PING_WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The tests.

/// podman runs containers on a network of `trellis-cni` alone: addresses from the node
/// file's pod CIDRs (both families), its MTU, default routes, a host end per pod in the
/// node's namespace, pods reaching each other through the node; `podman rm -f` and a
/// `--rm` container's exit remove the veth and release the addresses, with no agent and
/// no ready file.
#[test]
fn podman_runs_containers_on_trellis_cni() {
    if skip() {
        return;
    }
    alone(Flavor::Trellis);
}

/// ADD, CHECK and DEL pass through `[trellis-cni, portmap, bandwidth]`.
#[test]
fn podman_chains_trellis_cni_with_portmap_and_bandwidth() {
    if skip() {
        return;
    }
    chained(Flavor::Trellis);
}

/// A meta-plugin's delegate: podman calls `trellis-test-meta`, which calls `trellis-cni`
/// with the delegate configuration it carries.
#[test]
fn trellis_cni_is_a_meta_plugins_delegate() {
    if skip() {
        return;
    }
    delegated(Flavor::Trellis);
}

/// Control: the first scenario with the reference bridge + host-local.
#[test]
fn control_podman_runs_containers_on_reference_bridge() {
    if skip() {
        return;
    }
    alone(Flavor::Reference);
}

/// Control: the chain with the reference bridge + host-local first.
#[test]
fn control_podman_chains_reference_bridge_with_portmap_and_bandwidth() {
    if skip() {
        return;
    }
    chained(Flavor::Reference);
}

fn skip() -> bool {
    if is_root() {
        return false;
    }
    eprintln!(
        "skipped: these tests need root (network namespaces, podman with runc); \
         CI runs them as root after scripts/test.sh installed the packages"
    );
    true
}

fn alone(flavor: Flavor) {
    let dual_stack = flavor == Flavor::Trellis;
    let node = Node::new("alone", flavor, dual_stack);
    node.write_network(vec![flavor.plugin(&node)]);
    assert!(
        !node.ready_file().exists(),
        "no ready file: ADD needs only the node"
    );

    // Two pods side by side.
    node.run_detached("a", &[], &["sleep", "600"]);
    let a = node.view_of("a");
    a.assert_attached(&node);
    assert_eq!(
        a.v4(),
        FIRST_POD4,
        "the first pod gets the pool's first address after the gateway: {a:?}"
    );
    node.run_detached("b", &[], &["sleep", "600"]);
    let b = node.view_of("b");
    b.assert_attached(&node);
    assert_ne!(a.v4(), b.v4(), "two pods, one address");
    if dual_stack {
        assert_ne!(a.v6(), b.v6(), "two pods, one IPv6 address");
    }
    let (host_a, host_b) = (node.host_end(&a), node.host_end(&b));
    assert_ne!(host_a, host_b);
    assert!(node.allocated().contains(&a.v4()) && node.allocated().contains(&b.v4()));

    // The pods reach each other (through the node, for trellis-cni: routed veths).
    node.ping("a", &b.v4(), PING_WITHIN);
    if dual_stack {
        node.ping("a", &b.v6(), PING_WITHIN);
    }

    // `podman rm -f` removes a pod's veth and releases its addresses; the other stays.
    let sandbox_a = node.sandbox("a");
    node.podman_ok(&["rm", "-f", "-t", "0", "a"]);
    a.assert_detached(&node, &host_a);
    assert!(
        !Path::new(&sandbox_a).exists(),
        "podman removed the pod's namespace {sandbox_a}"
    );
    assert!(node.link(&host_b).is_some(), "the other pod's veth stays");
    assert!(
        node.allocated().contains(&b.v4()),
        "the other pod keeps its address"
    );

    // A `--rm` container prints its own view of the network, and its exit cleans up.
    let out = node.run(&["--rm"], &["sh", "-c", VIEW_SCRIPT]);
    let c = PodView::parse(&out);
    c.assert_attached(&node);
    assert_ne!(c.v4(), b.v4());
    assert!(
        eventually(|| node.link_by_index(c.peer_index).is_none()),
        "the exited --rm container's veth is gone: {:?}",
        node.link_by_index(c.peer_index)
    );
    assert!(
        !node.allocated().contains(&c.v4()),
        "the --rm container's address is released: {:?}",
        node.allocated()
    );

    node.podman_ok(&["rm", "-f", "-t", "0", "b"]);
    b.assert_detached(&node, &host_b);
    assert_eq!(
        node.veths(),
        Vec::<String>::new(),
        "no veth left on the node"
    );
    assert_eq!(
        node.allocated(),
        BTreeSet::new(),
        "every address is released"
    );
    assert!(!node.ready_file().exists());
}

fn chained(flavor: Flavor) {
    let node = Node::new("chain", flavor, false);
    let network = node.write_network(vec![
        flavor.plugin(&node),
        json!({"type": "portmap", "capabilities": {"portMappings": true}}),
        // podman 4.3 passes no bandwidth capability; the rates are the configuration's.
        json!({
            "type": "bandwidth",
            "capabilities": {"bandwidth": true},
            "ingressRate": 100_000_000u64, "ingressBurst": 1_000_000u64,
            "egressRate": 100_000_000u64, "egressBurst": 1_000_000u64,
        }),
    ]);
    // A local address of the node, for clients of the host port (no dummy links in
    // this kernel: on lo).
    node.ip(&["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"]);

    // ADD through the chain.
    let mapping = format!("{HOST_PORT}:{POD_PORT}");
    let web_id = node.run_detached(
        "web",
        &["-p", &mapping],
        &["httpd", "-f", "-p", &POD_PORT.to_string(), "-h", "/www"],
    );
    let web = node.view_of("web");
    web.assert_attached(&node);
    let web_host = node.host_end(&web);
    let client_id = node.run_detached("client", &[], &["sleep", "600"]);
    let client = node.view_of("client");
    client.assert_attached(&node);
    let client_host = node.host_end(&client);

    // portmap's rules for the pod, in the node's namespace.
    let nat = node.iptables_nat();
    let dnat = format!("--to-destination {}:{POD_PORT}", web.v4());
    assert!(
        nat.contains(&dnat) && nat.contains(&web_id),
        "portmap's DNAT to {} for {web_id} in the node's nat table:\n{nat}",
        web.v4()
    );
    // bandwidth's shaping: a tbf on the host end (ingress), an ifb for egress.
    let qdiscs = node.tc_qdiscs(&web_host);
    assert!(qdiscs.contains("tbf"), "a tbf on {web_host}: {qdiscs}");
    let ifbs = node.ifbs();
    assert_eq!(
        ifbs.len(),
        2,
        "one ifb per pod for egress shaping: {ifbs:?}"
    );

    // The final result passed every plugin's contribution through: the first plugin's
    // interfaces and addresses, bandwidth's ifb.
    let cached = node.cached_result(&web_id);
    let result = &cached["result"];
    let names: Vec<&str> = result["interfaces"]
        .as_array()
        .expect("interfaces in the result")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert!(
        names.contains(&web_host.as_str()) && names.contains(&"eth0"),
        "the result names the host end {web_host} and eth0: {result}"
    );
    assert!(
        names.iter().any(|n| ifbs.contains(&n.to_string())),
        "the result names bandwidth's ifb: {result}"
    );
    let ips = result["ips"].as_array().expect("ips in the result");
    assert!(
        ips.iter().any(|ip| ip["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}/", web.v4())))),
        "the result has {}: {result}",
        web.v4()
    );
    for ip in ips {
        let interface =
            &result["interfaces"][ip["interface"].as_u64().unwrap_or(u64::MAX) as usize];
        assert!(
            interface["name"] == "eth0" && interface["sandbox"].is_string(),
            "{ip} names the pod's eth0 as its interface: {result}"
        );
    }

    // A host port leads to the pod.
    // (busybox-static's wget crashes in glibc's static NSS: HTTP by hand over nc.)
    let get =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {NODE_ADDR} {HOST_PORT}");
    let response = node.exec("client", &["sh", "-c", &get]);
    assert!(
        response.starts_with("HTTP/1.") && response.contains(PAGE),
        "{NODE_ADDR}:{HOST_PORT} leads to the web pod: {response:?}"
    );

    // CHECK through the chain, as libcni would (podman 4.3 cannot trigger it).
    node.check_chain(&network, &web_id)
        .unwrap_or_else(|e| panic!("CHECK through the chain for web: {e}"));
    node.check_chain(&network, &client_id)
        .unwrap_or_else(|e| panic!("CHECK through the chain for client: {e}"));
    // A pod whose address went missing fails CHECK, at the first plugin.
    let client_sandbox = node.sandbox("client");
    let prefix = if flavor == Flavor::Trellis { 32 } else { 24 };
    run_ok(
        Command::new("nsenter")
            .arg(format!("--net={client_sandbox}"))
            .args(["ip", "addr", "del"])
            .arg(format!("{}/{prefix}", client.v4()))
            .args(["dev", "eth0"]),
    );
    match node.check_chain(&network, &client_id) {
        Ok(()) => panic!(
            "CHECK passed for a pod whose address {} was removed",
            client.v4()
        ),
        Err(e) => {
            assert!(
                e.starts_with(flavor.first_type()),
                "the first plugin refuses: {e}"
            );
            eprintln!("CHECK refused the pod without its address, as it should: {e}");
        }
    }

    // DEL through the chain (the broken pod too): rules, ifbs, veths, addresses gone.
    node.podman_ok(&["rm", "-f", "-t", "0", "web"]);
    web.assert_detached(&node, &web_host);
    let nat = node.iptables_nat();
    assert!(
        !nat.contains(&web_id) && !nat.contains(&dnat),
        "portmap's rules for web are gone:\n{nat}"
    );
    assert_eq!(node.ifbs().len(), 1, "web's ifb is gone");
    node.podman_ok(&["rm", "-f", "-t", "0", "client"]);
    client.assert_detached(&node, &client_host);
    assert_eq!(node.ifbs(), Vec::<String>::new(), "every ifb is gone");
    assert!(
        !node.iptables_nat().contains("CNI-DN-"),
        "no DNAT chain left"
    );
    assert!(eventually(|| node.veths().is_empty()), "{:?}", node.veths());
    assert_eq!(node.allocated(), BTreeSet::new());
    assert!(
        !node.cache_path(&web_id).exists(),
        "libcni dropped its cached result"
    );
}

fn delegated(flavor: Flavor) {
    let node = Node::new("meta", flavor, false);
    let log = node.dir.join("meta.log");
    let script = META_PLUGIN.replace("@LOG@", &log.display().to_string());
    let meta = node.plugin_dir().join(META_TYPE);
    std::fs::write(&meta, script).expect("writing the meta-plugin");
    run_ok(Command::new("chmod").arg("755").arg(&meta));
    // The delegate is a whole network configuration of its own, as Multus's are.
    let mut delegate = flavor.plugin(&node);
    delegate["cniVersion"] = json!(CNI_VERSION);
    delegate["name"] = json!(format!("{}-delegate", node.network));
    node.write_network(vec![json!({"type": META_TYPE, "delegate": delegate})]);

    let out = node.run(&["--rm"], &["sh", "-c", VIEW_SCRIPT]);
    let first = PodView::parse(&out);
    first.assert_attached(&node);
    assert!(node.link_by_index(first.peer_index).is_none());
    assert!(!node.allocated().contains(&first.v4()));

    node.run_detached("m", &[], &["sleep", "600"]);
    let m = node.view_of("m");
    m.assert_attached(&node);
    let host = node.host_end(&m);
    assert!(node.allocated().contains(&m.v4()));
    node.podman_ok(&["rm", "-f", "-t", "0", "m"]);
    m.assert_detached(&node, &host);
    assert_eq!(node.allocated(), BTreeSet::new());

    // The calls really went through the meta-plugin.
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let adds = calls.lines().filter(|l| *l == "ADD").count();
    let dels = calls.lines().filter(|l| *l == "DEL").count();
    assert!(
        adds == 2 && dels >= 2,
        "podman called {META_TYPE}: ADD twice, DEL at least twice; its log:\n{calls}"
    );
}

// ---------------------------------------------------------------------------------------
// The plugin under test.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    /// `trellis-cni`.
    Trellis,
    /// Debian's `bridge` with `host-local` IPAM: the control.
    Reference,
}

impl Flavor {
    fn first_type(self) -> &'static str {
        match self {
            Flavor::Trellis => "trellis-cni",
            Flavor::Reference => "bridge",
        }
    }

    /// The first plugin of the node's network.
    fn plugin(self, node: &Node) -> Value {
        match self {
            Flavor::Trellis => json!({
                "type": "trellis-cni",
                "nodeFile": node.node_file(),
                "ipamFile": node.ipam_file(),
                "readyFile": node.ready_file(),
            }),
            Flavor::Reference => {
                let mut ranges = vec![json!([{"subnet": POD_CIDR4}])];
                let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
                if node.dual_stack {
                    ranges.push(json!([{"subnet": POD_CIDR6}]));
                    routes.push(json!({"dst": "::/0"}));
                }
                json!({
                    "type": "bridge",
                    "bridge": "trtbr0",
                    "isGateway": true,
                    "mtu": MTU,
                    "ipam": {
                        "type": "host-local",
                        "ranges": ranges,
                        "routes": routes,
                        "dataDir": node.dir.join("host-local"),
                    },
                })
            }
        }
    }

    /// The prefix length of a pod's address: routed /32 and /128 for trellis-cni, the
    /// bridge's subnet for the reference.
    fn prefix(self, v6: bool) -> u8 {
        match (self, v6) {
            (Flavor::Trellis, false) => 32,
            (Flavor::Trellis, true) => 128,
            (Flavor::Reference, false) => 24,
            (Flavor::Reference, true) => 64,
        }
    }
}

/// The meta-plugin: as Multus does with its delegates, it finds the delegate's plugin on
/// `CNI_PATH` and runs it with the delegate's configuration as stdin and the same
/// environment; its answer is the meta-plugin's. Each call is logged.
const META_TYPE: &str = "trellis-test-meta";
const META_PLUGIN: &str = r#"#!/bin/sh
set -eu
conf=$(cat)
echo "$CNI_COMMAND" >> '@LOG@'
if [ "$CNI_COMMAND" = VERSION ]; then
  printf '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}\n'
  exit 0
fi
fail() {
  printf '{"cniVersion":"1.0.0","code":7,"msg":"trellis-test-meta: %s"}\n' "$1"
  exit 1
}
delegate=$(printf '%s' "$conf" | jq -ce '.delegate | objects') || fail "no delegate object"
type=$(printf '%s' "$delegate" | jq -re '.type | strings') || fail "the delegate has no type"
IFS=:
for dir in $CNI_PATH; do
  if [ -x "$dir/$type" ]; then
    exec "$dir/$type" <<EOF
$delegate
EOF
  fi
done
fail "no plugin $type on CNI_PATH"
"#;

// ---------------------------------------------------------------------------------------
// The node: a namespace, podman's world in a directory, removed on drop.

struct Node {
    /// The node's namespace `trt-podman-…` (the containers' cgroup parent too), podman's
    /// directory `/tmp/trt-cni-…` and network `trt-…`: removed on drop.
    podman: Podman,
    flavor: Flavor,
    dual_stack: bool,
}

impl std::ops::Deref for Node {
    type Target = Podman;

    fn deref(&self) -> &Podman {
        &self.podman
    }
}

impl Node {
    fn new(tag: &str, flavor: Flavor, dual_stack: bool) -> Node {
        podman::require(
            &["iptables-save", "jq", "tc"],
            &["/usr/lib/cni/portmap", "/usr/lib/cni/bridge"],
        );
        sweep_leftovers();
        let pid = std::process::id();
        let flavor_tag = match flavor {
            Flavor::Trellis => "t",
            Flavor::Reference => "r",
        };
        let node = Node {
            podman: world(&format!("{pid}-{tag}-{flavor_tag}")),
            flavor,
            dual_stack,
        };
        // From here on, a failure drops `node`, which removes whatever was made.
        node.make_dirs(&["plugins", "rootfs/www"]);
        run_ok(Command::new("ip").args(["netns", "add", &node.netns]));
        node.ip(&["link", "set", "lo", "up"]);
        node.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
        node.sh("echo 1 > /proc/sys/net/ipv6/conf/all/forwarding");

        // The node's file, as the agent keeps it; there is no agent.
        let mut cidrs = vec![POD_CIDR4];
        if dual_stack {
            cidrs.push(POD_CIDR6);
        }
        let node_file = json!({"podCIDRs": cidrs, "mtu": MTU});
        std::fs::write(node.node_file(), node_file.to_string()).expect("writing the node file");

        // The plugin directory: trellis-cni as cargo built it.
        std::os::unix::fs::symlink(TRELLIS_CNI, node.plugin_dir().join("trellis-cni"))
            .expect("linking trellis-cni into the plugin directory");

        // A root filesystem: busybox and its applets, and a page to serve.
        node.make_rootfs(&[
            "sh", "ip", "ping", "ping6", "nc", "printf", "sleep", "cat", "echo", "httpd", "ls",
        ]);
        std::fs::write(node.rootfs().join("www/index.html"), format!("{PAGE}\n")).expect("a page");

        // podman's configuration: the test's plugin directory, then the reference plugins.
        node.write_containers_conf(&[node.plugin_dir(), PathBuf::from(REFERENCE_DIR)]);
        node
    }

    fn node_file(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    fn ipam_file(&self) -> PathBuf {
        self.ipam_file.clone()
    }

    /// Never created: no agent reports the data plane ready.
    fn ready_file(&self) -> PathBuf {
        self.dir.join("ready")
    }

    fn plugin_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    /// The pod's network as it sees it.
    fn view_of(&self, name: &str) -> PodView {
        PodView::parse(&self.exec(name, &["sh", "-c", VIEW_SCRIPT]))
    }

    /// The path of a container's network namespace.
    fn sandbox(&self, name: &str) -> String {
        self.podman_ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            name,
        ])
        .trim()
        .to_string()
    }

    // --- The node's namespace, read with the host's tools.

    fn sh(&self, script: &str) -> String {
        run_ok(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.netns))
                .args(["sh", "-c", script]),
        )
    }

    fn ifbs(&self) -> Vec<String> {
        self.links_of_kind("ifb")
    }

    /// The host end of a pod's veth, checked: a veth in the node's namespace, named as
    /// the plugin names them, with the pod's MTU, and (trellis-cni) the node's route to
    /// the pod through it.
    fn host_end(&self, pod: &PodView) -> String {
        let name = self.podman.host_end(pod.peer_index, MTU, pod);
        if self.flavor == Flavor::Trellis {
            podman::assert_named_by_trellis_cni(&name);
            self.assert_routes(&pod.v4(), &name);
            if self.dual_stack {
                self.assert_routes(&pod.v6(), &name);
            }
        }
        name
    }

    fn iptables_nat(&self) -> String {
        self.sh("iptables-save -t nat")
    }

    fn tc_qdiscs(&self, dev: &str) -> String {
        run_ok(Command::new("tc").args(["-n", &self.netns, "qdisc", "show", "dev", dev]))
    }

    /// The addresses the IPAM holds for attachments.
    fn allocated(&self) -> BTreeSet<String> {
        match self.flavor {
            Flavor::Trellis => {
                let text = match std::fs::read_to_string(self.ipam_file()) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeSet::new(),
                    Err(e) => panic!("reading the IPAM file: {e}"),
                };
                let state: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("the IPAM file is not JSON ({e}): {text}"));
                let mut found = BTreeSet::new();
                addresses_in(&state["attachments"], &mut found);
                found
            }
            // host-local: a file named by each address it handed out.
            Flavor::Reference => std::fs::read_dir(self.dir.join("host-local").join(&self.network))
                .map(|dir| {
                    dir.filter_map(Result::ok)
                        .filter_map(|e| e.file_name().into_string().ok())
                        .filter(|n| n.parse::<IpAddr>().is_ok())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    // --- CHECK, driven as libcni drives it.

    fn cached_result(&self, container_id: &str) -> Value {
        let path = self.cache_path(container_id);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("libcni's cached result {}: {e}", path.display()));
        serde_json::from_str(&text).expect("libcni's cache is JSON")
    }

    /// CHECK through a conflist as the CNI specification says and libcni does: every
    /// plugin in order, in the runtime's namespace, with its configuration plus the list's
    /// name and version, the ADD result as `prevResult`, and the runtime's capability
    /// arguments for the capabilities it declares. Stops at the first failure, returned as
    /// "TYPE: error".
    fn check_chain(&self, list: &Value, container_id: &str) -> Result<(), String> {
        let cached = self.cached_result(container_id);
        let netns = self.sandbox(container_id);
        let cni_args: Vec<String> = cached["cniArgs"]
            .as_array()
            .map(|args| {
                args.iter()
                    .filter_map(|kv| Some(format!("{}={}", kv[0].as_str()?, kv[1].as_str()?)))
                    .collect()
            })
            .unwrap_or_default();
        let dirs = [self.plugin_dir(), PathBuf::from(REFERENCE_DIR)];
        let cni_path = dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        for plugin in list["plugins"].as_array().expect("plugins") {
            let kind = plugin["type"].as_str().expect("type");
            let mut conf = plugin.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            conf["prevResult"] = cached["result"].clone();
            let mut runtime = serde_json::Map::new();
            if let Some(caps) = plugin["capabilities"].as_object() {
                for (cap, on) in caps {
                    let arg = &cached["capabilityArgs"][cap];
                    if on == true && !arg.is_null() {
                        runtime.insert(cap.clone(), arg.clone());
                    }
                }
            }
            if !runtime.is_empty() {
                conf["runtimeConfig"] = Value::Object(runtime);
            }
            let binary = dirs
                .iter()
                .map(|d| d.join(kind))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("no plugin {kind}"));
            // Debian's portmap 1.1.1 checks its per-pod chain in ip6tables too, where an
            // IPv4 pod has none, so its CHECK fails on every node with a usable ip6tables
            // (fixed upstream in 1.2). It is shown a node without one: it checks IPv4.
            let path = if kind == "portmap" {
                format!("{}:{SAFE_PATH}", self.no_ip6tables().display())
            } else {
                SAFE_PATH.to_string()
            };
            let out = self.call_plugin(
                &binary,
                &[
                    ("PATH", &path),
                    ("CNI_COMMAND", "CHECK"),
                    ("CNI_CONTAINERID", container_id),
                    ("CNI_NETNS", &netns),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_ARGS", &cni_args.join(";")),
                    ("CNI_PATH", &cni_path),
                ],
                &conf,
            );
            if !out.status.success() {
                return Err(format!("{kind}: {}", describe(&out)));
            }
            assert!(
                out.stdout.iter().all(u8::is_ascii_whitespace),
                "{kind}: CHECK answers nothing on success: {}",
                describe(&out)
            );
        }
        Ok(())
    }

    /// A directory with an `ip6tables` that fails, as on a node without IPv6 NAT.
    fn no_ip6tables(&self) -> PathBuf {
        let dir = self.dir.join("no-ip6tables");
        let shim = dir.join("ip6tables");
        if !shim.exists() {
            std::fs::create_dir_all(&dir).expect("creating a directory");
            std::fs::write(&shim, "#!/bin/sh\nexit 1\n").expect("writing a shim");
            run_ok(Command::new("chmod").arg("755").arg(&shim));
        }
        dir
    }

    /// Runs a plugin as a runtime does: in the node's namespace, the given environment
    /// (`PATH` and `CNI_*`) only, the configuration on stdin.
    fn call_plugin(&self, binary: &Path, env: &[(&str, &str)], conf: &Value) -> Output {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(binary)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting a plugin");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(conf.to_string().as_bytes())
            .expect("writing the configuration");
        drop(stdin);
        child.wait_with_output().expect("running a plugin")
    }
}

/// The world of the node `trt-podman-NAME`: its namespace (its own), its directory
/// `/tmp/trt-cni-NAME`, its network `trt-NAME`, its containers' cgroup parent named as the
/// namespace. Nothing is made yet; dropped, it removes whatever of it exists.
fn world(name: &str) -> Podman {
    let netns = format!("trt-podman-{name}");
    let dir = std::env::temp_dir().join(format!("trt-cni-{name}"));
    Podman {
        cgroup: netns.clone(),
        netns,
        own_netns: true,
        ipam_file: dir.join("ipam.json"),
        dir,
        network: format!("trt-{name}"),
    }
}

/// Removes what earlier runs of these tests left when they were killed (nothing dropped):
/// the containers, directories, namespaces, cgroups and cached results named after a
/// process that is gone.
fn sweep_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut stale = podman::leftovers("trt-cni-", &[std::env::temp_dir()]);
        let mut places = vec![PathBuf::from("/run/netns")];
        places.extend(podman::cgroup_roots());
        stale.extend(podman::leftovers("trt-podman-", &places));
        for name in stale {
            drop(world(&name));
        }
    });
}

// ---------------------------------------------------------------------------------------
// A pod's view of its network, printed by busybox inside the container.

const VIEW_SCRIPT: &str = "ip addr show dev eth0; echo @@; ip route; echo @@; ip -6 route; \
                           echo @@; ip neigh; echo @@; cat /sys/class/net/eth0/iflink";

#[derive(Debug)]
struct PodView {
    /// Global addresses of eth0 with their prefix lengths.
    addresses: Vec<(IpAddr, u8)>,
    mtu: u32,
    default4: Option<String>,
    default6: Option<String>,
    neighbours: String,
    /// The host end's ifindex in the node's namespace.
    peer_index: u32,
}

impl PodView {
    fn parse(text: &str) -> PodView {
        let sections: Vec<&str> = text.split("@@").collect();
        assert_eq!(sections.len(), 5, "the view script printed: {text}");
        let mut addresses = Vec::new();
        let mut mtu = 0;
        for line in sections[0].lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "mtu") {
                mtu = words.get(i + 1).and_then(|m| m.parse().ok()).unwrap_or(0);
            }
            if let [family, cidr, ..] = words.as_slice()
                && (*family == "inet" || *family == "inet6")
                && let Some((addr, len)) = cidr.split_once('/')
                && let (Ok(addr), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u8>())
                && !matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
            {
                addresses.push((addr, len));
            }
        }
        let default = |section: &str| {
            section.lines().find_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                match words.as_slice() {
                    ["default", "via", gw, ..] => Some(gw.to_string()),
                    _ => None,
                }
            })
        };
        PodView {
            addresses,
            mtu,
            default4: default(sections[1]),
            default6: default(sections[2]),
            neighbours: sections[3].to_string(),
            peer_index: sections[4]
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("eth0's iflink in: {text}")),
        }
    }

    fn of_family(&self, v6: bool) -> Vec<&(IpAddr, u8)> {
        self.addresses
            .iter()
            .filter(|(a, _)| a.is_ipv6() == v6)
            .collect()
    }

    fn v4(&self) -> String {
        self.family_addr(false)
    }

    fn v6(&self) -> String {
        self.family_addr(true)
    }

    fn family_addr(&self, v6: bool) -> String {
        match self.of_family(v6).first() {
            Some((addr, _)) => addr.to_string(),
            None => panic!("no {} address: {self:?}", if v6 { "IPv6" } else { "IPv4" }),
        }
    }

    /// The pod got what the node file says: one address per pod CIDR (not the gateway),
    /// the MTU, a default route through the gateway per family (with a permanent
    /// neighbour entry for it, trellis-cni).
    fn assert_attached(&self, node: &Node) {
        let flavor = node.flavor;
        let mut families = vec![(false, POD_CIDR4, GATEWAY4, &self.default4)];
        if node.dual_stack {
            families.push((true, POD_CIDR6, GATEWAY6, &self.default6));
        }
        for (v6, cidr, gateway, default) in families {
            let got = self.of_family(v6);
            assert_eq!(got.len(), 1, "one address per family: {self:?}");
            let (addr, len) = *got[0];
            assert!(
                in_cidr(addr, cidr) && addr.to_string() != gateway,
                "the pod's address {addr} is from the pod CIDR {cidr}: {self:?}"
            );
            assert_eq!(len, flavor.prefix(v6), "prefix of {addr}: {self:?}");
            assert_eq!(
                default.as_deref(),
                Some(gateway),
                "a default route via {gateway}: {self:?}"
            );
            if flavor == Flavor::Trellis {
                assert!(
                    self.neighbours
                        .lines()
                        .any(|l| l.starts_with(&format!("{gateway} ")) && l.contains("PERMANENT")),
                    "a permanent neighbour entry for the gateway {gateway}: {self:?}"
                );
            }
        }
        if !node.dual_stack {
            assert!(self.of_family(true).is_empty(), "no IPv6 address: {self:?}");
        }
        assert_eq!(self.mtu, MTU, "the node file's MTU: {self:?}");
    }

    /// After DEL: the host end is gone and the pod's addresses are released.
    fn assert_detached(&self, node: &Node, host_end: &str) {
        // trellis-cni's DEL leaves the kernel's veth teardown to a detached helper: the
        // link goes moments after DEL answers.
        assert!(
            eventually(|| {
                node.link(host_end).is_none() && node.link_by_index(self.peer_index).is_none()
            }),
            "the host end {host_end} is gone\n{}",
            node.diagnostics()
        );
        let allocated = node.allocated();
        for (addr, _) in &self.addresses {
            assert!(
                !allocated.contains(&addr.to_string()),
                "{addr} is released: {allocated:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers.

fn in_cidr(addr: IpAddr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("a CIDR");
    let len: u32 = len.parse().expect("a prefix length");
    match (addr, net.parse::<IpAddr>().expect("an address")) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Every string under `value` that is an IP address.
fn addresses_in(value: &Value, found: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            if let Ok(a) = s.split('/').next().unwrap_or("").parse::<IpAddr>() {
                found.insert(a.to_string());
            }
        }
        Value::Array(items) => items.iter().for_each(|v| addresses_in(v, found)),
        Value::Object(map) => map.values().for_each(|v| addresses_in(v, found)),
        _ => {}
    }
}

/// Whether `condition` holds within a few seconds (polled): for what a detached helper
/// finishes after the plugin has answered.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
