//! What the end-to-end tests share: running the `trellis` binary, a lab that is removed
//! when dropped (also when a test fails, after printing its agents' warnings), and reading
//! a lab's status.

#![allow(dead_code)] // each test binary uses its own part

use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

pub use trellis_testkit::wait_until;

/// Labs share two cores: one at a time keeps timings honest and failures readable.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_LOG", "warn")
        .output()
        .expect("running trellis")
}

pub fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// Runs a command and fails the test, with its output, unless it succeeds.
pub fn ok(args: &[&str]) -> String {
    let out = trellis(args);
    assert!(out.status.success(), "trellis {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("tl-{name}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A running lab, removed on drop.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn up(name: &str, extra: &[&str]) -> Lab {
        let _ = trellis(&["lab", "down", "--name", name]);
        let mut args = vec!["lab", "up", "--name", name];
        args.extend_from_slice(extra);
        let out = trellis(&args);
        let lab = Lab {
            name: name.to_string(),
        };
        assert!(
            out.status.success(),
            "lab up {extra:?} failed: {}",
            text(&out)
        );
        lab
    }

    /// `trellis ARGS --name LAB`
    pub fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--name", &self.name]);
        trellis(&all)
    }

    /// `trellis ARGS --lab LAB`, for the commands that read cluster state.
    pub fn state(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--lab", &self.name]);
        trellis(&all)
    }

    pub fn check(&self) {
        let out = self.run(&["lab", "check"]);
        assert!(
            out.status.success(),
            "lab check of {} failed: {}",
            self.name,
            text(&out)
        );
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.run(&["lab", "status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// One node of `lab status --json`.
    pub fn node(&self, name: &str) -> serde_json::Value {
        self.status_json()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no node {name}"))
            .clone()
    }

    /// The values of the samples of `node`'s metrics whose line starts with `prefix`.
    pub fn metric(&self, node: &str, prefix: &str) -> Vec<f64> {
        let out = self.run(&["lab", "metrics", node]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    pub fn netns(&self, node: &str) -> String {
        format!("tl-{}-{node}", self.name)
    }

    /// The store revision (`trellis status --json`).
    pub fn revision(&self) -> u64 {
        let out = self.state(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["revision"]
            .as_u64()
            .unwrap()
    }

    /// Whether one ping from a pod namespace to `ip` is answered.
    pub fn reach(&self, pod_netns_suffix: &str, ip: &str) -> bool {
        sh(&format!(
            "ip netns exec tl-{}-{pod_netns_suffix} ping -c 1 -W 1 {ip}",
            self.name
        ))
        .status
        .success()
    }

    /// Waits until every pod reaches every other in one round.
    pub fn wait_connected(&self, what: &str, timeout: Duration) {
        wait_until(what, timeout, || {
            self.run(&["lab", "check", "--attempts", "1"])
                .status
                .success()
        });
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test shows what the agents warned about: in CI that is all there is.
        if std::thread::panicking() {
            let logs = format!("/run/trellis/labs/{}/logs", self.name);
            for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in log.lines().filter(|l| !l.contains(" INFO ")) {
                    eprintln!("{}: {line}", entry.file_name().to_string_lossy());
                }
            }
        }
        let out = trellis(&["lab", "down", "--name", &self.name]);
        if !out.status.success() {
            eprintln!("lab down {} failed: {}", self.name, text(&out));
        }
    }
}
