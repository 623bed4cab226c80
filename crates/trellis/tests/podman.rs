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
//! by the next one. The plumbing follows crates/cni-plugin/tests/runtime.rs (standalone
//! namespaces there), trimmed to one network of `trellis-cni` on a lab node.
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
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{Lab, text, wait_until};

const LAB: &str = "tpod";
/// The node podman runs on.
const NODE: &str = "a1";
/// A lab pod on the same node, and one on the other location (across the mesh).
const LOCAL_POD: &str = "a1-p0";
const REMOTE_POD: &str = "b1-p0";
/// The CNI version podman 4.3's libcni speaks at most.
const CNI_VERSION: &str = "1.0.0";
/// Everything this test makes besides the lab is named `trt-tpod-PID`.
const PREFIX: &str = "trt-tpod-";
/// Every podman call is killed after this (a hung runtime fails the test, not CI).
const PODMAN_TIMEOUT_S: u32 = 60;

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
    let id = node.run_detached("c1", &["sleep", "600"]);
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
    node.ping("c1", &local);
    node.ping("c1", &remote);
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
    /// its name), the containers' cgroup parent.
    name: String,
    /// The lab node's namespace.
    netns: String,
    dir: PathBuf,
    /// The plugin's configuration on the node, as the lab gives it.
    plugin: Value,
}

impl PodmanNode {
    fn new(lab: &Lab, node: &str) -> PodmanNode {
        for tool in ["podman", "runc", "nsenter", "timeout"] {
            assert!(
                which(tool),
                "{tool} is missing: scripts/test.sh installs what this test needs"
            );
        }
        assert!(
            Path::new("/bin/busybox").exists(),
            "/bin/busybox is missing: scripts/test.sh installs busybox-static"
        );
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
        let podman = PodmanNode {
            dir: std::env::temp_dir().join(&name),
            netns: lab.netns(node),
            name,
            plugin,
        };
        // From here on, a failure drops `podman`, which removes whatever was made.
        let _ = std::fs::remove_dir_all(&podman.dir);
        for sub in ["net.d", "storage", "run", "tmp", "rootfs/bin"] {
            std::fs::create_dir_all(podman.dir.join(sub)).expect("creating the test directory");
        }
        assert!(
            podman.node_file().is_file(),
            "the agent wrote the node file {}",
            podman.node_file().display()
        );

        let list = json!({
            "cniVersion": CNI_VERSION,
            "name": podman.name,
            "plugins": [podman.plugin],
        });
        std::fs::write(
            podman
                .dir
                .join("net.d")
                .join(format!("{}.conflist", podman.name)),
            serde_json::to_vec_pretty(&list).expect("JSON"),
        )
        .expect("writing the conflist");

        // A root filesystem: busybox and its applets.
        let rootfs = podman.rootfs();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copying busybox");
        for applet in ["sh", "ip", "ping", "sleep", "cat", "echo"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("linking an applet");
        }

        // podman's configuration: the CNI backend, the plugin's and the network's
        // directories, per-boot state and file locks of the test's own.
        let d = |sub: &str| podman.dir.join(sub).display().to_string();
        let conf = format!(
            "[network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [\"{plugins}\"]\n\
             network_config_dir = \"{netd}\"\n\
             default_network = \"{network}\"\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             tmp_dir = \"{tmp}\"\n\
             lock_type = \"file\"\n\
             events_logger = \"file\"\n\
             events_logfile_path = \"{events}\"\n",
            plugins = plugin_dir.display(),
            netd = d("net.d"),
            network = podman.name,
            tmp = d("tmp"),
            events = d("events.log"),
        );
        std::fs::write(podman.dir.join("containers.conf"), conf).expect("writing containers.conf");
        podman
    }

    fn file(&self, field: &str) -> PathBuf {
        PathBuf::from(
            self.plugin[field]
                .as_str()
                .unwrap_or_else(|| panic!("{field} in {}", self.plugin)),
        )
    }

    fn node_file(&self) -> PathBuf {
        self.file("nodeFile")
    }

    fn ipam_file(&self) -> PathBuf {
        self.file("ipamFile")
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
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

    // --- podman, in the node's namespace.

    fn podman(&self, args: &[&str]) -> Output {
        podman_command(&self.netns, &self.dir, args)
            .output()
            .expect("running podman")
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}\n{}",
            describe(&out),
            self.diagnostics()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `podman run` on the network with `options`, running `cmd` in the busybox root
    /// filesystem; returns its output.
    fn run(&self, options: &[&str], cmd: &[&str]) -> String {
        // The containers' cgroups (and conmon's) under the test's own, removed with it.
        let cgroup_parent = format!("/{}", self.name);
        let mut args = vec![
            "run",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            &self.name,
            "--cgroup-parent",
            &cgroup_parent,
        ];
        args.extend_from_slice(options);
        let rootfs = self.rootfs().display().to_string();
        args.extend_from_slice(&["--rootfs", &rootfs]);
        args.extend_from_slice(cmd);
        self.podman_ok(&args)
    }

    /// Starts a named container in the background; returns its ID.
    fn run_detached(&self, name: &str, cmd: &[&str]) -> String {
        self.run(&["-d", "--name", name], cmd).trim().to_string()
    }

    /// The container's network as it sees it.
    fn view_of(&self, name: &str) -> PodView {
        PodView::parse(&self.podman_ok(&["exec", name, "sh", "-c", VIEW_SCRIPT]))
    }

    /// Pings `to` from container `from`, giving the path a few seconds (a WireGuard
    /// handshake, say).
    fn ping(&self, from: &str, to: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.podman(&["exec", from, "ping", "-c", "1", "-W", "1", to]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{from} cannot reach {to}: {}\n{}",
                describe(&out),
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where libcni keeps a container's ADD result.
    fn cache_path(&self, container_id: &str) -> PathBuf {
        PathBuf::from(format!(
            "/var/lib/cni/results/{}-{container_id}-eth0",
            self.name
        ))
    }

    // --- The node, read with the host's tools.

    fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.netns]).args(args))
    }

    fn links(&self) -> Vec<Value> {
        let text = self.ip(&["-j", "-d", "link", "show"]);
        match serde_json::from_str(&text) {
            Ok(Value::Array(links)) => links,
            _ => panic!("ip -j link printed {text}"),
        }
    }

    fn link(&self, name: &str) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifname"] == name)
    }

    fn link_by_index(&self, index: u32) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifindex"] == index)
    }

    fn veths(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|l| l["linkinfo"]["info_kind"] == "veth")
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// The host end of a container's veth, checked: a veth in the node's namespace named
    /// as the plugin names them, with the container's MTU and the node's route to the
    /// container through it.
    fn host_end(&self, pod: &PodView) -> String {
        let link = self.link_by_index(pod.peer_index).unwrap_or_else(|| {
            panic!(
                "no host end (ifindex {}) in {}: {pod:?}\n{}",
                pod.peer_index,
                self.netns,
                self.diagnostics()
            )
        });
        let name = link["ifname"].as_str().expect("a name").to_string();
        assert_eq!(link["linkinfo"]["info_kind"], "veth", "{link}");
        assert_eq!(
            link["mtu"], pod.mtu,
            "the host end has the pod's MTU: {link}"
        );
        let hex = name.strip_prefix("tp").unwrap_or("");
        assert!(
            hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "the host end is named tp<12 hex>: {name}"
        );
        let route = self.ip(&["-4", "route", "show", "exact", &format!("{}/32", pod.addr)]);
        assert!(
            route.contains(&format!("dev {name}")),
            "the node routes {} through {name}: {route:?}",
            pod.addr
        );
        name
    }

    fn ipam(&self) -> Value {
        let text = match std::fs::read_to_string(self.ipam_file()) {
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

    /// What to print when something fails: the node's links and the plugin's state.
    fn diagnostics(&self) -> String {
        let links = Command::new("ip")
            .args(["-n", &self.netns, "-br", "link"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ipam = std::fs::read_to_string(self.ipam_file()).unwrap_or_default();
        format!("--- {} links\n{links}--- IPAM file\n{ipam}", self.netns)
    }
}

impl Drop for PodmanNode {
    fn drop(&mut self) {
        teardown(&self.name, &self.netns);
    }
}

/// podman with the test's configuration, storage and state, in the node's namespace.
fn podman_command(netns: &str, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &PODMAN_TIMEOUT_S.to_string()])
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("podman")
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .stdin(Stdio::null());
    cmd
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

/// Stops and removes the test's containers (DEL for each, their namespaces, their
/// mounts) with podman in the node's namespace, then removes everything else it made.
fn teardown(name: &str, netns: &str) {
    let dir = std::env::temp_dir().join(name);
    if dir.join("containers.conf").exists() {
        // podman runs in a lab node's namespace only: if the lab is gone already, an empty
        // namespace of the test's own stands in for it.
        let standin = format!("{name}-standin");
        let ns = if Path::new("/run/netns").join(netns).exists() {
            netns
        } else {
            let _ = Command::new("ip").args(["netns", "add", &standin]).status();
            &standin
        };
        let out = podman_command(ns, &dir, &["rm", "-a", "-f", "-t", "0"]).output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!("cleaning up, podman rm -a failed: {}", describe(&out));
        }
    }
    remove(name, &dir);
}

/// Removes what the test made, whatever state it is in: containers podman could not
/// remove, the processes in its cgroup parent (conmon, containers), mounts under its
/// directory, libcni's cached results for its network, the directory, the cgroups, a
/// stand-in namespace. Never anything of the lab's.
fn remove(name: &str, dir: &Path) {
    for (id, rootfs) in runc_containers() {
        if rootfs.starts_with(dir) {
            let _ = Command::new("runc")
                .args(["delete", "--force", &id])
                .stderr(Stdio::null())
                .status();
        }
    }
    let cgroups = cgroup_parents(name);
    let mut pids = BTreeSet::new();
    for parent in &cgroups {
        cgroup_procs(parent, &mut pids);
    }
    for pid in pids {
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
    let prefix = dir.display().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", &m]).status();
    }
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        let ours = format!("{name}-");
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&ours) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    // Killed processes leave their cgroups a moment later.
    let deadline = Instant::now() + Duration::from_secs(2);
    for parent in &cgroups {
        while !remove_cgroup(parent) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let standin = format!("{name}-standin");
    if Path::new("/run/netns").join(&standin).exists() {
        let _ = Command::new("ip")
            .args(["netns", "delete", &standin])
            .status();
    }
}

/// The containers runc knows (podman runs it with its default state directory), with
/// their root filesystems.
fn runc_containers() -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/run/runc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let state: Value =
                serde_json::from_slice(&std::fs::read(e.path().join("state.json")).ok()?).ok()?;
            let rootfs = PathBuf::from(state["config"]["rootfs"].as_str()?);
            Some((e.file_name().into_string().ok()?, rootfs))
        })
        .collect()
}

/// The cgroup hierarchies (cgroup v1 controllers, v2).
fn cgroup_roots() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = vec![root.to_path_buf()];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        roots.extend(hierarchies.filter_map(Result::ok).map(|h| h.path()));
    }
    roots
}

/// The test's cgroup parent in every hierarchy that has it.
fn cgroup_parents(name: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(name))
        .filter(|p| p.is_dir())
        .collect()
}

/// The processes in a cgroup and the cgroups under it.
fn cgroup_procs(path: &Path, pids: &mut BTreeSet<String>) {
    if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
        pids.extend(procs.split_whitespace().map(str::to_string));
    }
    for child in sub_cgroups(path) {
        cgroup_procs(&child, pids);
    }
}

/// Removes a cgroup and the cgroups under it; whether it is gone.
fn remove_cgroup(path: &Path) -> bool {
    for child in sub_cgroups(path) {
        remove_cgroup(&child);
    }
    let _ = std::fs::remove_dir(path);
    !path.exists()
}

fn sub_cgroups(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes what earlier runs left when they were killed (nothing dropped): directories,
/// containers, cgroups, cached results and stand-in namespaces named `trt-tpod-PID` after
/// a process that is gone. (Their lab goes with `lab up`'s `lab down`.)
fn sweep_leftovers() {
    let dead = |entry: &str| -> Option<String> {
        let pid = entry.strip_prefix(PREFIX)?.split(['-', '/']).next()?;
        let pid: i64 = pid.parse().ok()?;
        (!alive(pid)).then(|| format!("{PREFIX}{pid}"))
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let tmp = std::env::temp_dir();
    let mut places = vec![
        tmp.clone(),
        PathBuf::from("/run/netns"),
        PathBuf::from("/var/lib/cni/results"),
    ];
    places.extend(cgroup_roots());
    let mut stale: BTreeSet<String> = places
        .iter()
        .flat_map(|p| names(p))
        .filter_map(|n| dead(&n))
        .collect();
    for (_, rootfs) in runc_containers() {
        if let Ok(rest) = rootfs.strip_prefix(&tmp) {
            stale.extend(dead(&rest.to_string_lossy()));
        }
    }
    for name in stale {
        eprintln!("removing what a killed run left: {name}");
        teardown(&name, &format!("tl-{LAB}-{NODE}"));
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// Whether a process exists and is not a zombie (a killed run's process may stay one for
/// a while).
fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
