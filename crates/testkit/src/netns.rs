//! Scratch network namespaces for kernel tests: uniquely named `trt-…`, deleted when
//! dropped (also when the test panics), and a routed three-namespace topology. iproute2
//! builds them: tests may use the tools the product must not.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use trellis_dataplane::netns::{self, OwnedNetns};
use trellis_dataplane::sysctl;

/// A fresh namespace named `trt-<pid>-<counter>-<tag>`.
pub fn scratch(tag: &str) -> OwnedNetns {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "trt-{}-k{}-{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    OwnedNetns::create(&name).unwrap_or_else(|err| panic!("creating test netns {name}: {err:#}"))
}

/// Runs `ip ARGS...`, panics unless it succeeds, returns its stdout.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `nft ARGS...` in a namespace, panics unless it succeeds, returns its stdout.
pub fn nft(netns_name: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", netns_name, "nft"];
    full.extend_from_slice(args);
    run("ip", &full)
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A — R — B: A and B are hosts, R routes between them, in both families.
///
/// ```text
///  A: a0 10.91.1.2/24 ── r0 10.91.1.1/24 :R: r1 10.91.2.1/24 ── b0 10.91.2.2/24 :B
///        fd91:1::2/64       fd91:1::1/64       fd91:2::1/64        fd91:2::2/64
/// ```
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

    pub fn new(tag: &str) -> Routed {
        let routed = Routed {
            a: scratch(&format!("{tag}-a")),
            r: scratch(&format!("{tag}-r")),
            b: scratch(&format!("{tag}-b")),
        };
        let (a, r, b) = (routed.a.name(), routed.r.name(), routed.b.name());
        ip(&[
            "-n", r, "link", "add", "name", "r0", "type", "veth", "peer", "name", "a0", "netns", a,
        ]);
        ip(&[
            "-n", r, "link", "add", "name", "r1", "type", "veth", "peer", "name", "b0", "netns", b,
        ]);
        for (ns, link, address) in [
            (a, "a0", "10.91.1.2/24"),
            (r, "r0", "10.91.1.1/24"),
            (r, "r1", "10.91.2.1/24"),
            (b, "b0", "10.91.2.2/24"),
        ] {
            ip(&["-n", ns, "address", "add", address, "dev", link]);
            ip(&["-n", ns, "link", "set", "dev", link, "up"]);
        }
        for (ns, link, address) in [
            (a, "a0", "fd91:1::2/64"),
            (r, "r0", "fd91:1::1/64"),
            (r, "r1", "fd91:2::1/64"),
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
}
