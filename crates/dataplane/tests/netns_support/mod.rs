//! Shared by the `netns_*` and `netlink_*` integration tests: uniquely named
//! `trt-` namespaces that are deleted on drop (also when a test panics), and
//! iproute2 as an independent witness of what the kernel has.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use trellis_dataplane::netns::{self, OwnedNetns};

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
