//! Interrupting a lab command removes what it built: one test per signal, each on a
//! different command, each signalled at a point where its lab exists. Needs root. Labs are
//! named `tsig…` and removed by a guard, also when a test fails.

mod support;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use support::lab_namespaces;

/// A `trellis lab …` command running in the background, with its output in files; on drop
/// it is killed if it still runs and its lab is removed.
struct Running {
    lab: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn start(lab: &str, args: &[&str]) -> Running {
        let _ = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["lab", "down", "--name", lab])
            .output();
        let dir = std::env::temp_dir();
        let stdout = dir.join(format!("trellis-test-{lab}.out"));
        let stderr = dir.join(format!("trellis-test-{lab}.err"));
        let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(args)
            .env("TRELLIS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("starting trellis");
        Running {
            lab: lab.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits until `ok`, failing the test if the command exits first or time runs out.
    fn wait_for(&mut self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok(self) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("exited ({status}) before {what}:\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, signal: Signal) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("exited ({status}) before the signal:\n{}", self.output());
        }
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running {timeout:?} after the signal:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the interrupted command must have removed: no namespace, no state, no process.
    fn assert_nothing_left(&self, pids: &[i32]) {
        let namespaces = lab_namespaces(&self.lab);
        assert!(namespaces.is_empty(), "left behind: {namespaces:?}");
        assert!(
            !Path::new(&format!("/run/trellis/labs/{}", self.lab)).exists(),
            "the lab's state directory was left behind"
        );
        let alive: Vec<&i32> = pids.iter().filter(|p| alive(**p)).collect();
        assert!(alive.is_empty(), "processes left running: {alive:?}");
        let strays = processes_of(&self.lab);
        assert!(strays.is_empty(), "processes of the lab left: {strays:?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["lab", "down", "--name", &self.lab])
            .output();
        let _ = std::fs::remove_file(&self.stdout);
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// The lab's state file, once written.
fn lab_state(lab: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(format!("/run/trellis/labs/{lab}/lab.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The store's and agents' pids the state file records.
fn recorded_pids(lab: &str) -> Vec<i32> {
    let Some(state) = lab_state(lab) else {
        return Vec::new();
    };
    let agents = state["agent_pids"].as_object().cloned().unwrap_or_default();
    agents
        .values()
        .chain(std::iter::once(&state["store_pid"]))
        .filter_map(|p| p.as_i64())
        .map(|p| p as i32)
        .collect()
}

/// Running (not zombie) processes.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.trim_start().chars().next())
            != Some('Z')
    })
}

/// Live processes whose command line names the lab (agents' key files and store, etcd's
/// data directory), whether or not the state file recorded them.
fn processes_of(lab: &str) -> Vec<String> {
    let markers = [format!("/run/trellis/labs/{lab}/"), format!("--name={lab}")];
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| alive(*pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            markers
                .iter()
                .any(|m| cmdline.contains(m.as_str()))
                .then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

fn assert_exit(status: ExitStatus, code: i32, run: &Running) {
    let out = run.output();
    eprintln!("{} exited with {status}:\n{out}", run.lab);
    assert_eq!(status.code(), Some(code), "{status}:\n{out}");
    assert!(
        out.contains(&format!("removed lab {}:", run.lab)),
        "no line saying what was removed:\n{out}"
    );
}

/// Ctrl-C in the middle of a failover trial: the fault is injected, agents, store and
/// traffic run. Everything goes, and the exit code is SIGINT's. A second Ctrl-C during
/// the teardown does not cut it short.
#[test]
fn sigint_during_a_bench_trial_removes_the_bench_lab() {
    let _serial = support::serial();
    let lab = "tsigi";
    let mut run = Running::start(
        lab,
        &[
            "lab",
            "bench",
            "failover",
            "--trials",
            "1",
            "--kinds",
            "blackhole-forward",
            "--health",
            "forwarding",
            "--name",
            lab,
        ],
    );
    let mut pids = Vec::new();
    run.wait_for(
        "a fault injected by the trial",
        Duration::from_secs(60),
        |_| {
            lab_state(lab).is_some_and(|s| {
                s["faults"].as_object().is_some_and(|f| {
                    f.values()
                        .any(|v| v.as_array().is_some_and(|a| !a.is_empty()))
                })
            })
        },
    );
    pids.extend(recorded_pids(lab));
    assert_eq!(pids.len(), 7, "6 agents and the store");
    run.signal(Signal::SIGINT);
    run.wait_for("the teardown to begin", Duration::from_secs(10), |run| {
        std::fs::read_to_string(&run.stderr).is_ok_and(|e| e.contains("interrupted by SIGINT"))
    });
    run.signal(Signal::SIGINT);
    let status = run.wait_exit(Duration::from_secs(30));
    assert_exit(status, 130, &run);
    run.assert_nothing_left(&pids);
}

/// SIGTERM while the demo's traffic runs: the demo's lab goes, exit code 143.
#[test]
fn sigterm_during_the_demo_removes_the_demo_lab() {
    let _serial = support::serial();
    let lab = "tsigt";
    let mut run = Running::start(lab, &["lab", "demo", "--name", lab]);
    run.wait_for("the demo's traffic", Duration::from_secs(60), |run| {
        std::fs::read_to_string(&run.stdout).is_ok_and(|out| out.contains("== traffic"))
    });
    let pids = recorded_pids(lab);
    assert_eq!(pids.len(), 7, "6 agents and the store");
    run.signal(Signal::SIGTERM);
    let status = run.wait_exit(Duration::from_secs(30));
    assert_exit(status, 143, &run);
    run.assert_nothing_left(&pids);
}

/// SIGHUP (a closed terminal) while `lab up` waits for convergence: what it built goes,
/// exit code 129. The store is frozen as soon as the agents are started, so the lab cannot
/// converge before the signal; the teardown must also cope with a stopped process.
#[test]
fn sighup_during_lab_up_removes_the_half_built_lab() {
    let _serial = support::serial();
    let lab = "tsigh";
    let mut run = Running::start(lab, &["lab", "up", "--name", lab, "--nodes", "4"]);
    run.wait_for("its store and agents", Duration::from_secs(30), |_| {
        recorded_pids(lab).len() == 5
    });
    let store = lab_state(lab)
        .and_then(|s| s["store_pid"].as_i64())
        .unwrap() as i32;
    kill(Pid::from_raw(store), Signal::SIGSTOP).expect("freezing the store");
    let pids = recorded_pids(lab);
    run.signal(Signal::SIGHUP);
    let status = run.wait_exit(Duration::from_secs(30));
    assert_exit(status, 129, &run);
    run.assert_nothing_left(&pids);
}
