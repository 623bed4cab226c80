//! A real container runtime on a lab node (issue 10): podman 4.3 with runc and its CNI
//! network backend (Debian's packages) runs containers on node a1 of a lab through
//! `trellis-cni`, configured exactly as the lab configures it for its own pods
//! ([`trellis_lab::pod_network::plugin_config`]: the node file the agent keeps on the
//! node's disk, the node's IPAM and ready files). A container gets its address from a1's
//! pod CIDR and reaches a lab pod on the other location across the WireGuard mesh; then
//! a1's agent and the store are killed, and `podman rm` still removes the container (its
//! veth gone, its address released) and a new container still gets an address: ADD and
//! DEL need nothing but the node.
//!
//! podman runs only inside the node's namespace (`nsenter --net`, never `ip netns exec`,
//! which hides the cgroup mounts from runc), with its own configuration, storage (`vfs`),
//! state and file locks in `/tmp/trt-tpod-PID`, the network `trt-tpod-PID`, and its
//! containers' cgroups under `/trt-tpod-PID`. All of it is removed when the test ends, also
//! when it fails, before the lab's guard removes the lab; what a killed run left is removed
//! by the next one. The plumbing is [`trellis_testkit::podman`]'s, shared with
//! crates/cni-plugin/tests/runtime.rs (standalone namespaces there), here with one network
//! of `trellis-cni` on a lab node.
//!
//! podman 4.3 links libcni 1.1, which knows CNI results up to 1.0.0: the network says
//! `"cniVersion": "1.0.0"` (the plugin negotiates down).
//!
//! Needs root (labs, podman with runc); skipped otherwise. In CI, which runs as root, the
//! packages come from scripts/test.sh: podman, runc, busybox-static, etcd-server.

mod support;

use ipnet::IpNet;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{Lab, text, wait_until};
use trellis_testkit::podman::{self, Podman, alive, is_root};

const LAB: &str = "tpod";
/// The node podman runs on.
const NODE: &str = "a1";
/// A lab pod on the same node, and one on the other location (across the mesh).
const LOCAL_POD: &str = "a1-p0";
const REMOTE_POD: &str = "b1-p0";
/// Everything this test makes besides the lab is named `trt-tpod-PID`.
const PREFIX: &str = "trt-tpod-";
/// How long a ping from the container may take to work (a WireGuard handshake, say).
const PING_WITHIN: Duration = Duration::from_secs(10);

/// Prints the step the test is at, so a failure says where it happened.
fn step(name: &str) {
    eprintln!("== {name}");
}

/// podman on lab node a1, on a network of `trellis-cni` alone: the container's address
/// is from a1's pod CIDR and recorded in the node's IPAM file, the container reaches lab
/// pods on its node and across the mesh and is reached from the other location; with a1's
/// agent and the store killed, `podman rm` removes it (veth, route, address, libcni's
/// cached result) and `podman run --rm` still gets an address and reaches a1's lab pod.
#[test]
fn podman_on_a_lab_node_works_with_the_agent_and_store_down() {
    if !is_root() {
        eprintln!(
            "skipped: this test needs root (a lab, podman with runc); \
             CI runs it as root after scripts/test.sh installed the packages"
        );
        return;
    }
    sweep_leftovers();
    step("lab up: two nodes in two locations, on etcd");
    let lab = Lab::up(
        LAB,
        &["--nodes", "2", "--locations", "2", "--store", "etcd"],
    );
    lab.wait_connected(
        "the lab's pods to reach each other",
        Duration::from_secs(30),
    );
    let status = lab.status_json();
    let pod_ip = |name: &str| -> String {
        status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|n| n["pods"].as_array().into_iter().flatten())
            .find(|p| p["name"] == name)
            .and_then(|p| p["ip"].as_str())
            .unwrap_or_else(|| panic!("no pod {name} in lab status: {status}"))
            .to_string()
    };
    let (local, remote) = (pod_ip(LOCAL_POD), pod_ip(REMOTE_POD));
    let agent_pid = lab.node(NODE)["agent_pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{NODE}'s agent runs: {status}"));
    let store_pid = status["store"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("the store runs: {status}"));

    // Declared after `lab`, so dropped before it: podman's containers go while the node
    // is still there.
    let node = PodmanNode::new(&lab, NODE);
    let pod_network = node.pod_network();
    let lab_veths = node.veths();

    step("podman run -d on a1");
    let id = node.run_detached("c1", &[], &["sleep", "600"]);
    let c1 = node.view_of("c1");
    c1.assert_attached(&node, &pod_network);
    assert_ne!(c1.addr, local, "the lab's pod keeps its own address");
    let attachment = node
        .attachment(&id)
        .unwrap_or_else(|| panic!("the IPAM file records {id}\n{}", node.diagnostics()));
    assert_eq!(attachment["ifname"], "eth0", "{attachment}");
    assert!(
        attachment["addresses"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == c1.addr.as_str())),
        "the IPAM file records {} for {id}: {attachment}",
        c1.addr
    );
    let host = node.host_end(&c1);

    step("the container reaches lab pods, on a1 and across the mesh");
    node.ping("c1", &local, PING_WITHIN);
    node.ping("c1", &remote, PING_WITHIN);
    wait_until(
        &format!("{REMOTE_POD} to reach the container at {}", c1.addr),
        Duration::from_secs(10),
        || lab.reach(REMOTE_POD, &c1.addr),
    );

    step("a1's agent and the store killed");
    for target in [NODE, "store"] {
        let out = lab.run(&["lab", "fault", target, "kill"]);
        assert!(out.status.success(), "fault {target} kill: {}", text(&out));
    }
    for (what, pid) in [("a1's agent", agent_pid), ("the store", store_pid)] {
        wait_until(
            &format!("{what} to be gone"),
            Duration::from_secs(5),
            || !alive(pid),
        );
    }

    step("podman rm -f with the agent and store down");
    node.podman_ok(&["rm", "-f", "-t", "0", "c1"]);
    // The plugin's DEL hands the veth's teardown to a detached helper: it goes moments
    // after DEL answers.
    wait_until("the host end to go", Duration::from_secs(5), || {
        node.link(&host).is_none() && node.link_by_index(c1.peer_index).is_none()
    });
    assert_eq!(
        node.ip(&["-4", "route", "show", "exact", &format!("{}/32", c1.addr)]),
        "",
        "the node's route to {} is gone",
        c1.addr
    );
    assert!(
        node.attachment(&id).is_none() && !node.allocated().contains(&c1.addr),
        "{} is released\n{}",
        c1.addr,
        node.diagnostics()
    );
    assert!(
        !node.cache_path(&id).exists(),
        "libcni dropped its cached result"
    );
    assert!(
        node.allocated().contains(&local),
        "the lab's pod keeps its address\n{}",
        node.diagnostics()
    );

    step("podman run --rm with the agent and store down");
    let script = format!(
        "{VIEW_SCRIPT}; echo @@; \
         for i in 1 2 3; do ping -c 1 -W 1 {local} >/dev/null && {{ echo reached; exit 0; }}; done; \
         echo unreached"
    );
    let out = node.run(&["--rm"], &["sh", "-c", &script]);
    let (view, reached) = out
        .rsplit_once("@@")
        .unwrap_or_else(|| panic!("the script printed: {out}"));
    let c2 = PodView::parse(view);
    c2.assert_attached(&node, &pod_network);
    assert_eq!(
        reached.trim(),
        "reached",
        "the new container reaches {LOCAL_POD} at {local} with the agent down: {out}"
    );
    assert!(
        node.link_by_index(c2.peer_index).is_none(),
        "the exited --rm container's veth is gone\n{}",
        node.diagnostics()
    );
    assert!(
        !node.allocated().contains(&c2.addr),
        "the --rm container's address {} is released\n{}",
        c2.addr,
        node.diagnostics()
    );
    wait_until(
        "only the lab's pods' veths to be left",
        Duration::from_secs(5),
        || node.veths() == lab_veths,
    );
}

// ---------------------------------------------------------------------------------------
// podman on a lab node: its world in a directory, removed on drop.

struct PodmanNode {
    /// `trt-tpod-PID`: the directory under /tmp, the CNI network (libcni caches results by
    /// its name), the containers' cgroup parent; in the lab node's namespace.
    podman: Podman,
    /// The plugin's configuration on the node, as the lab gives it.
    plugin: Value,
}

impl std::ops::Deref for PodmanNode {
    type Target = Podman;

    fn deref(&self) -> &Podman {
        &self.podman
    }
}

impl PodmanNode {
    fn new(lab: &Lab, node: &str) -> PodmanNode {
        podman::require(&[], &[]);
        // The lab found the plugin beside `trellis`; so does podman.
        let plugin_dir = Path::new(env!("CARGO_BIN_EXE_trellis"))
            .parent()
            .expect("the target directory")
            .to_path_buf();
        assert!(
            plugin_dir.join("trellis-cni").is_file(),
            "no trellis-cni in {}: cargo build -p trellis-cni-plugin",
            plugin_dir.display()
        );
        // One plugin of the network: the lab's configuration without the list's fields.
        let mut plugin = trellis_lab::pod_network::plugin_config(&lab.name, node);
        let fields = plugin.as_object_mut().expect("the plugin's configuration");
        fields.remove("cniVersion");
        fields.remove("name");
        assert_eq!(plugin["type"], "trellis-cni", "{plugin}");

        let name = format!("{PREFIX}{}", std::process::id());
        let mut on_node = world(&name, lab.netns(node));
        on_node.ipam_file = file(&plugin, "ipamFile");
        let podman = PodmanNode {
            podman: on_node,
            plugin,
        };
        // From here on, a failure drops `podman`, which removes whatever was made.
        podman.make_dirs(&[]);
        assert!(
            podman.node_file().is_file(),
            "the agent wrote the node file {}",
            podman.node_file().display()
        );
        podman.write_network(vec![podman.plugin.clone()]);
        // A root filesystem: busybox and its applets.
        podman.make_rootfs(&["sh", "ip", "ping", "sleep", "cat", "echo"]);
        podman.write_containers_conf(&[plugin_dir]);
        podman
    }

    fn node_file(&self) -> PathBuf {
        file(&self.plugin, "nodeFile")
    }

    /// The node's IPv4 pod CIDR and the pods' MTU, from the node file the agent keeps.
    fn pod_network(&self) -> (IpNet, u32) {
        let text = std::fs::read_to_string(self.node_file()).expect("reading the node file");
        let file: Value = serde_json::from_str(&text).expect("the node file is JSON");
        let cidr = file["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str()?.parse::<IpNet>().ok())
            .find(|c| matches!(c, IpNet::V4(_)))
            .unwrap_or_else(|| panic!("an IPv4 pod CIDR in the node file: {text}"));
        let mtu = file["mtu"].as_u64().expect("an MTU in the node file");
        (cidr, mtu as u32)
    }

    /// The container's network as it sees it.
    fn view_of(&self, name: &str) -> PodView {
        PodView::parse(&self.exec(name, &["sh", "-c", VIEW_SCRIPT]))
    }

    /// The host end of a container's veth, checked: a veth in the node's namespace named
    /// as the plugin names them, with the container's MTU and the node's route to the
    /// container through it.
    fn host_end(&self, pod: &PodView) -> String {
        let name = self.podman.host_end(pod.peer_index, pod.mtu, pod);
        podman::assert_named_by_trellis_cni(&name);
        self.assert_routes(&pod.addr, &name);
        name
    }

    fn ipam(&self) -> Value {
        let text = match std::fs::read_to_string(&self.ipam_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return json!({}),
            Err(e) => panic!("reading the IPAM file: {e}"),
        };
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("the IPAM file is not JSON ({e}): {text}"))
    }

    /// The IPAM file's record of a container's attachment.
    fn attachment(&self, container_id: &str) -> Option<Value> {
        self.ipam()["attachments"]
            .as_array()?
            .iter()
            .find(|a| a["container_id"] == container_id)
            .cloned()
    }

    /// The addresses the IPAM file holds for attachments.
    fn allocated(&self) -> BTreeSet<String> {
        self.ipam()["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["addresses"].as_array().into_iter().flatten())
            .filter_map(|a| Some(a.as_str()?.to_string()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// A container's view of its network, printed by busybox inside it.

const VIEW_SCRIPT: &str = "ip -4 addr show dev eth0; echo @@; cat /sys/class/net/eth0/iflink; \
                           echo @@; cat /sys/class/net/eth0/mtu";

#[derive(Debug)]
struct PodView {
    /// eth0's IPv4 address and its prefix length.
    addr: String,
    prefix: u8,
    mtu: u32,
    /// The host end's ifindex in the node's namespace.
    peer_index: u32,
}

impl PodView {
    fn parse(text: &str) -> PodView {
        let sections: Vec<&str> = text.split("@@").map(str::trim).collect();
        assert_eq!(sections.len(), 3, "the view script printed: {text}");
        let inet: Vec<(String, u8)> = sections[0]
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next()? == "inet").then_some(())?;
                let (addr, len) = words.next()?.split_once('/')?;
                Some((addr.to_string(), len.parse().ok()?))
            })
            .collect();
        let [(addr, prefix)] = inet.as_slice() else {
            panic!("one IPv4 address on eth0: {text}");
        };
        let number = |s: &str| {
            s.parse()
                .unwrap_or_else(|_| panic!("a number, not {s:?}, in: {text}"))
        };
        PodView {
            addr: addr.clone(),
            prefix: *prefix,
            peer_index: number(sections[1]),
            mtu: number(sections[2]),
        }
    }

    /// An address of the node's pod CIDR, routed (/32), with the node file's MTU.
    fn assert_attached(&self, node: &PodmanNode, (cidr, mtu): &(IpNet, u32)) {
        let addr: IpAddr = self.addr.parse().expect("an address");
        assert!(
            cidr.contains(&addr) && addr != cidr.network() && addr != cidr.broadcast(),
            "the container's address {addr} is from {}'s pod CIDR {cidr}: {self:?}",
            node.netns
        );
        assert_eq!(self.prefix, 32, "a routed /32: {self:?}");
        assert_eq!(self.mtu, *mtu, "the node file's MTU: {self:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Cleaning up.

/// The world of `trt-tpod-PID` on the lab node whose namespace is `netns`: the directory
/// under /tmp, the network and the cgroup parent named so, and a stand-in namespace of
/// its own should the lab be gone when it is removed; no IPAM file yet. Nothing is made
/// yet; dropped, it removes whatever of it exists, never anything of the lab's.
fn world(name: &str, netns: String) -> Podman {
    Podman {
        netns,
        own_netns: false,
        dir: std::env::temp_dir().join(name),
        network: name.to_string(),
        cgroup: name.to_string(),
        ipam_file: PathBuf::new(),
    }
}

/// Removes what earlier runs left when they were killed (nothing dropped): directories,
/// containers, cgroups, cached results and stand-in namespaces named `trt-tpod-PID` after
/// a process that is gone. (Their lab goes with `lab up`'s `lab down`.)
fn sweep_leftovers() {
    let mut places = vec![
        std::env::temp_dir(),
        PathBuf::from("/run/netns"),
        PathBuf::from("/var/lib/cni/results"),
    ];
    places.extend(podman::cgroup_roots());
    let stale: BTreeSet<String> = podman::leftovers(PREFIX, &places)
        .iter()
        .filter_map(|rest| Some(format!("{PREFIX}{}", rest.split('-').next()?)))
        .collect();
    for name in stale {
        eprintln!("removing what a killed run left: {name}");
        drop(world(&name, format!("tl-{LAB}-{NODE}")));
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// A file the plugin's configuration names.
fn file(plugin: &Value, field: &str) -> PathBuf {
    PathBuf::from(
        plugin[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} in {plugin}")),
    )
}
