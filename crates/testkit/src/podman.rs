//! podman as a real container runtime for `trellis-cni` (issue 10): podman 4.3 with runc
//! and its CNI network backend (Debian's packages), confined to a test's own world, as
//! crates/cni-plugin/tests/runtime.rs (a standalone node) and crates/trellis/tests/podman.rs
//! (a lab node) use it.
//!
//! A [`Podman`] is named by its test (`trt-…`): podman runs only inside its namespace
//! (`nsenter --net`, never `ip netns exec`, which hides the cgroup mounts from runc), with
//! its own configuration, storage (`vfs`: no overlay mounts), per-boot state and file locks
//! in its directory, its CNI network, and its containers' cgroups under a parent of its
//! own. Everything of it is removed when it is dropped, also when the test fails: its
//! containers (DEL through podman), processes left in its cgroups, mounts under its
//! directory, the directory, the cgroups, libcni's cached results of its network, and its
//! namespace if it is its own. What a killed run left is found by [`leftovers`].
//!
//! Every podman call is killed after [`TIMEOUT_S`]: a hung runtime fails the test, not CI.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The CNI version podman 4.3's libcni speaks at most: the networks say it (the plugin
/// negotiates down).
pub const CNI_VERSION: &str = "1.0.0";
/// Every podman call is killed after this many seconds.
pub const TIMEOUT_S: u32 = 60;

/// Fails the test unless podman and what it runs with are installed (podman, runc,
/// nsenter, timeout, a static busybox for the containers), and `tools` and `files` too.
pub fn require(tools: &[&str], files: &[&str]) {
    for tool in ["podman", "runc", "nsenter", "timeout"].iter().chain(tools) {
        assert!(
            which(tool),
            "{tool} is missing: scripts/test.sh installs what the podman tests need"
        );
    }
    for file in ["/bin/busybox"].iter().chain(files) {
        assert!(
            Path::new(file).exists(),
            "{file} is missing: scripts/test.sh installs what the podman tests need"
        );
    }
}

/// A test's podman: its names, and what it made under them. Build it before making
/// anything, so that a failure drops it, which removes whatever was made; one named after a
/// killed run's leftovers and dropped sweeps them.
pub struct Podman {
    /// The namespace podman (and so the plugins) runs in.
    pub netns: String,
    /// Whether the namespace is the test's own: the test makes it, podman runs in a new one
    /// of that name if it is gone, processes in it are killed and it is deleted at the end.
    /// Otherwise (a lab node's) nothing in it but podman's is touched, and if it is gone an
    /// empty stand-in of the test's own, `NETWORK-standin`, serves for the cleanup.
    pub own_netns: bool,
    /// podman's configuration, storage and state, the network configuration, the busybox
    /// root filesystem, and whatever else the test keeps.
    pub dir: PathBuf,
    /// The CNI network's name (unique: libcni caches results by it in /var/lib/cni).
    pub network: String,
    /// The containers' cgroup parent (and conmon's), under every hierarchy's root, rather
    /// than podman's shared `libpod_parent`.
    pub cgroup: String,
    /// The plugin's IPAM file, shown when something fails.
    pub ipam_file: PathBuf,
}

impl Podman {
    /// Makes the directory afresh, with podman's subdirectories and `extra` ones.
    pub fn make_dirs(&self, extra: &[&str]) {
        let _ = std::fs::remove_dir_all(&self.dir);
        for sub in ["net.d", "storage", "run", "tmp", "rootfs/bin"]
            .iter()
            .chain(extra)
        {
            std::fs::create_dir_all(self.dir.join(sub)).expect("creating the test directory");
        }
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// A root filesystem: busybox and the applets named.
    pub fn make_rootfs(&self, applets: &[&str]) {
        let rootfs = self.rootfs();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copying busybox");
        for applet in applets {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("linking an applet");
        }
    }

    /// podman's configuration: the CNI backend, the plugin directories and the test's
    /// network directory, per-boot state and file locks in the test's directory (the
    /// default shared-memory locks are shared with every other podman on the machine).
    pub fn write_containers_conf(&self, plugin_dirs: &[PathBuf]) {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let plugins: Vec<String> = plugin_dirs
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        let conf = format!(
            "[network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [{plugins}]\n\
             network_config_dir = \"{netd}\"\n\
             default_network = \"{network}\"\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             tmp_dir = \"{tmp}\"\n\
             lock_type = \"file\"\n\
             events_logger = \"file\"\n\
             events_logfile_path = \"{events}\"\n",
            plugins = plugins.join(", "),
            netd = d("net.d"),
            network = self.network,
            tmp = d("tmp"),
            events = d("events.log"),
        );
        std::fs::write(self.dir.join("containers.conf"), conf).expect("writing containers.conf");
    }

    /// Writes the network as a conflist of `plugins`; returns it.
    pub fn write_network(&self, plugins: Vec<Value>) -> Value {
        let list = json!({
            "cniVersion": CNI_VERSION,
            "name": self.network,
            "plugins": plugins,
        });
        let path = self
            .dir
            .join("net.d")
            .join(format!("{}.conflist", self.network));
        std::fs::write(path, serde_json::to_vec_pretty(&list).expect("JSON"))
            .expect("writing the conflist");
        list
    }

    // --- podman, in the namespace.

    /// podman with the test's configuration, storage and state, in the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        podman_command(&self.netns, &self.dir, args)
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running podman")
    }

    /// podman's output; fails the test, with the diagnostics, unless it succeeds.
    pub fn podman_ok(&self, args: &[&str]) -> String {
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
    pub fn run(&self, options: &[&str], cmd: &[&str]) -> String {
        let cgroup_parent = format!("/{}", self.cgroup);
        let mut args = vec![
            "run",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            &self.network,
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
    pub fn run_detached(&self, name: &str, options: &[&str], cmd: &[&str]) -> String {
        let mut all = vec!["-d", "--name", name];
        all.extend_from_slice(options);
        self.run(&all, cmd).trim().to_string()
    }

    pub fn exec(&self, name: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.podman_ok(&args)
    }

    /// Pings `to` from container `from`, giving the path `within` to work (a fresh IPv6
    /// address, a WireGuard handshake).
    pub fn ping(&self, from: &str, to: &str, within: Duration) {
        let deadline = Instant::now() + within;
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

    /// Where libcni keeps a container's ADD result (podman's CNI backend sets no cache
    /// directory of its own).
    pub fn cache_path(&self, container_id: &str) -> PathBuf {
        PathBuf::from(format!(
            "/var/lib/cni/results/{}-{container_id}-eth0",
            self.network
        ))
    }

    // --- The namespace, read with the host's tools.

    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").args(["-n", &self.netns]).args(args))
    }

    pub fn links(&self) -> Vec<Value> {
        let text = self.ip(&["-j", "-d", "link", "show"]);
        match serde_json::from_str(&text) {
            Ok(Value::Array(links)) => links,
            _ => panic!("ip -j link printed {text}"),
        }
    }

    pub fn link(&self, name: &str) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifname"] == name)
    }

    pub fn link_by_index(&self, index: u32) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifindex"] == index)
    }

    /// The names of the links of a kind (`veth`, `ifb`).
    pub fn links_of_kind(&self, kind: &str) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|l| l["linkinfo"]["info_kind"] == kind)
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    pub fn veths(&self) -> Vec<String> {
        self.links_of_kind("veth")
    }

    /// The name of a container's host end, checked: a veth in the namespace with the
    /// container's MTU, whose ifindex is eth0's peer's as the container (`pod`) sees it.
    pub fn host_end(&self, peer_index: u32, mtu: u32, pod: &impl std::fmt::Debug) -> String {
        let link = self.link_by_index(peer_index).unwrap_or_else(|| {
            panic!(
                "no host end (ifindex {peer_index}) in {}: {pod:?}\n{}",
                self.netns,
                self.diagnostics()
            )
        });
        let name = link["ifname"].as_str().expect("a name").to_string();
        assert_eq!(link["linkinfo"]["info_kind"], "veth", "{link}");
        assert_eq!(link["mtu"], mtu, "the host end has the pod's MTU: {link}");
        name
    }

    /// The namespace routes a container's `addr` (a /32 or /128) through `dev`.
    pub fn assert_routes(&self, addr: &str, dev: &str) {
        let (family, len) = if addr.contains(':') {
            ("-6", 128)
        } else {
            ("-4", 32)
        };
        let route = self.ip(&[family, "route", "show", "exact", &format!("{addr}/{len}")]);
        assert!(
            route.contains(&format!("dev {dev}")),
            "the node routes {addr} through {dev}: {route:?}"
        );
    }

    /// What to print when something fails: the namespace's links and the plugin's state.
    pub fn diagnostics(&self) -> String {
        let links = Command::new("ip")
            .args(["-n", &self.netns, "-br", "link"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ipam = std::fs::read_to_string(&self.ipam_file).unwrap_or_default();
        format!("--- {} links\n{links}--- IPAM file\n{ipam}", self.netns)
    }

    // --- Cleaning up.

    fn standin(&self) -> String {
        format!("{}-standin", self.network)
    }

    /// Stops and removes the containers (DEL for each, their namespaces, their mounts) with
    /// podman in the namespace, then removes everything else the test made.
    fn teardown(&self) {
        if self.dir.join("containers.conf").exists() {
            // podman runs in the test's namespace only: if it is gone (a killed run, then
            // scripts/test.sh; a lab already down), a new one stands in for it, of the
            // same name if it is the test's own.
            let ns = if Path::new("/run/netns").join(&self.netns).exists() {
                self.netns.clone()
            } else {
                let ns = if self.own_netns {
                    self.netns.clone()
                } else {
                    self.standin()
                };
                let _ = Command::new("ip").args(["netns", "add", &ns]).status();
                ns
            };
            let out = podman_command(&ns, &self.dir, &["rm", "-a", "-f", "-t", "0"]).output();
            if let Ok(out) = out
                && !out.status.success()
            {
                eprintln!("cleaning up, podman rm -a failed: {}", describe(&out));
            }
        }
        self.remove();
    }

    /// Removes what the test made, whatever state it is in: containers podman could not
    /// remove, the processes in its cgroup parent (conmon, containers) and in its own
    /// namespace, mounts under its directory, libcni's cached results for its network, the
    /// directory, the cgroups, its own or stand-in namespace. Never anything of a lab's.
    fn remove(&self) {
        // Containers podman could not remove (its conmon killed, say): runc's state names
        // them by their root filesystem, in the test's directory.
        for (id, rootfs) in runc_containers() {
            if rootfs.starts_with(&self.dir) {
                let _ = Command::new("runc")
                    .args(["delete", "--force", &id])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let mut pids = BTreeSet::new();
        if self.own_netns
            && let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &self.netns])
                .output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string),
            );
        }
        let cgroups: Vec<PathBuf> = cgroup_roots()
            .into_iter()
            .map(|r| r.join(&self.cgroup))
            .filter(|p| p.is_dir())
            .collect();
        for parent in &cgroups {
            cgroup_procs(parent, &mut pids);
        }
        for pid in pids {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        let prefix = self.dir.display().to_string();
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
            let ours = format!("{}-", self.network);
            for e in entries.filter_map(Result::ok) {
                if e.file_name().to_string_lossy().starts_with(&ours) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // Killed processes leave their cgroups a moment later.
        let deadline = Instant::now() + Duration::from_secs(2);
        for parent in &cgroups {
            while !remove_cgroup(parent) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let ns = if self.own_netns {
            self.netns.clone()
        } else {
            self.standin()
        };
        if Path::new("/run/netns").join(&ns).exists() {
            let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn podman_command(netns: &str, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &TIMEOUT_S.to_string()])
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

/// The names trellis-cni gives host ends: `tp` and 12 hex digits.
pub fn assert_named_by_trellis_cni(host_end: &str) {
    let hex = host_end.strip_prefix("tp").unwrap_or("");
    assert!(
        hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "the host end is named tp<12 hex>: {host_end}"
    );
}

// ---------------------------------------------------------------------------------------
// What killed runs left.

/// What killed runs (nothing dropped) left: of the names in `places`, and of the
/// directories under the temporary directory that hold a container's root filesystem as
/// runc knows it, those that are `prefix` followed by the PID of a process that is gone
/// (or a zombie), then `-` or nothing. Returned without the prefix: `PID…`.
pub fn leftovers(prefix: &str, places: &[PathBuf]) -> BTreeSet<String> {
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
    let runc_dirs = runc_containers().into_iter().filter_map(|(_, rootfs)| {
        let rest = rootfs.strip_prefix(&tmp).ok()?;
        Some(rest.iter().next()?.to_str()?.to_string())
    });
    places
        .iter()
        .flat_map(|p| names(p))
        .chain(runc_dirs)
        .filter_map(|name| {
            let rest = name.strip_prefix(prefix)?;
            let pid: i64 = rest.split('-').next()?.parse().ok()?;
            (!alive(pid)).then(|| rest.to_string())
        })
        .collect()
}

/// The cgroup hierarchies (cgroup v2's root, cgroup v1's controllers).
pub fn cgroup_roots() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut roots = vec![root.to_path_buf()];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        roots.extend(hierarchies.filter_map(Result::ok).map(|h| h.path()));
    }
    roots
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

// ---------------------------------------------------------------------------------------
// Small helpers.

/// Whether a process exists and is not a zombie (a killed run's process may stay one for
/// a while).
pub fn alive(pid: i64) -> bool {
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

/// A command's output; fails the test, with what it printed, unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's status and output, for a failure's message.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether a tool is on `PATH` or in the sbin directories.
pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}

/// Whether the test runs as root (effective UID 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
