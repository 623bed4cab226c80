//! Scratch network namespaces for kernel tests: uniquely named `trt-…`, deleted when
//! dropped (also when the test panics); a routed three-namespace topology in both
//! families; and iproute2 as an independent witness of what the kernel has. Tests may use
//! the tools the product must not.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use trellis_dataplane::netns::{self, OwnedNetns};
use trellis_dataplane::sysctl;

/// A fresh namespace named `trt-<pid>-<counter>-<tag>`.
pub fn scratch_netns(tag: &str) -> OwnedNetns {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "trt-{}-{}-{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    OwnedNetns::create(&name).unwrap_or_else(|err| panic!("creating test netns {name}: {err:#}"))
}

/// A unique name for a namespace the test creates (and deletes) itself.
pub fn scratch_name(tag: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "trt-{}-x{}-{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes a namespace by name on drop, for tests that call `netns::create`
/// themselves.
pub struct DeleteOnDrop(pub String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let _ = netns::delete(&self.0);
    }
}

/// Runs `ip ARGS...`, panics unless it succeeds, returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `ip -j ARGS...` and parses the JSON answer.
pub fn ip_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let text = ip(&full);
    if text.trim().is_empty() {
        return serde_json::Value::Array(Vec::new());
    }
    serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("ip {full:?} printed bad JSON ({err}): {text}"))
}

/// Whether `ip ARGS...` succeeds (without panicking when it does not).
pub fn ip_succeeds(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

/// (device, inode) of a namespace file: equal means same namespace.
pub fn netns_identity(path: &str) -> (u64, u64) {
    let meta = fs::metadata(path).unwrap_or_else(|err| panic!("stat {path}: {err}"));
    (meta.dev(), meta.ino())
}

/// The namespace of the calling thread.
pub fn current_thread_netns() -> (u64, u64) {
    netns_identity("/proc/thread-self/ns/net")
}

/// The namespace of this process's main thread: the host's for these tests.
pub fn host_netns() -> (u64, u64) {
    netns_identity("/proc/self/ns/net")
}

/// A — R — B: A and B are hosts, R routes between them, in both families.
///
/// ```text
///  A: a0 10.91.1.2/24 ── r0 10.91.1.1/24 :R: r1 10.91.2.1/24 ── b0 10.91.2.2/24 :B
///        fd91:1::2/64       fd91:1::1/64       fd91:2::1/64        fd91:2::2/64
/// ```
/// A and B route everything via R; R forwards. All three namespaces go away when this is
/// dropped.
pub struct Routed {
    pub a: OwnedNetns,
    pub r: OwnedNetns,
    pub b: OwnedNetns,
}

impl Routed {
    pub const A: &str = "10.91.1.2";
    pub const R_A: &str = "10.91.1.1";
    pub const R_B: &str = "10.91.2.1";
    pub const B: &str = "10.91.2.2";
    pub const A6: &str = "fd91:1::2";
    pub const R_A6: &str = "fd91:1::1";
    pub const R_B6: &str = "fd91:2::1";
    pub const B6: &str = "fd91:2::2";
    /// R's link towards A and towards B.
    pub const R_TO_A: &str = "r0";
    pub const R_TO_B: &str = "r1";

    pub fn new(tag: &str) -> Routed {
        let routed = Routed {
            a: scratch_netns(&format!("{tag}-a")),
            r: scratch_netns(&format!("{tag}-r")),
            b: scratch_netns(&format!("{tag}-b")),
        };
        let (a, r, b) = (routed.a(), routed.r(), routed.b());
        // No duplicate address detection on the links to come, link-local addresses
        // included: IPv6 works the moment the links are up, instead of a second or two
        // later.
        for ns in [a, r, b] {
            netns::run_in(ns, || {
                sysctl::set("net.ipv6.conf.all.accept_dad", "0")?;
                sysctl::set("net.ipv6.conf.default.accept_dad", "0")
            })
            .expect("entering a test namespace")
            .expect("turning duplicate address detection off");
        }
        let veth = |name, peer, peer_netns| {
            ip(&["-n", r, "link", "add", "name", name, "type", "veth"]
                .into_iter()
                .chain(["peer", "name", peer, "netns", peer_netns])
                .collect::<Vec<_>>());
        };
        veth(Routed::R_TO_A, "a0", a);
        veth(Routed::R_TO_B, "b0", b);
        for (ns, link, address) in [
            (a, "a0", "10.91.1.2/24"),
            (r, Routed::R_TO_A, "10.91.1.1/24"),
            (r, Routed::R_TO_B, "10.91.2.1/24"),
            (b, "b0", "10.91.2.2/24"),
        ] {
            ip(&["-n", ns, "address", "add", address, "dev", link]);
            ip(&["-n", ns, "link", "set", "dev", link, "up"]);
        }
        for (ns, link, address) in [
            (a, "a0", "fd91:1::2/64"),
            (r, Routed::R_TO_A, "fd91:1::1/64"),
            (r, Routed::R_TO_B, "fd91:2::1/64"),
            (b, "b0", "fd91:2::2/64"),
        ] {
            // No duplicate address detection: the addresses are usable at once.
            ip(&["-n", ns, "address", "add", address, "dev", link, "nodad"]);
        }
        for ns in [a, r, b] {
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"]);
        }
        ip(&["-n", a, "route", "add", "default", "via", Routed::R_A]);
        ip(&["-n", b, "route", "add", "default", "via", Routed::R_B]);
        ip(&[
            "-n",
            a,
            "-6",
            "route",
            "add",
            "default",
            "via",
            Routed::R_A6,
        ]);
        ip(&[
            "-n",
            b,
            "-6",
            "route",
            "add",
            "default",
            "via",
            Routed::R_B6,
        ]);
        netns::run_in(r, || {
            sysctl::set("net.ipv4.ip_forward", "1")?;
            sysctl::set("net.ipv6.conf.all.forwarding", "1")
        })
        .expect("entering R")
        .expect("enabling forwarding in R");
        routed
    }

    pub fn a(&self) -> &str {
        self.a.name()
    }

    pub fn r(&self) -> &str {
        self.r.name()
    }

    pub fn b(&self) -> &str {
        self.b.name()
    }
}
