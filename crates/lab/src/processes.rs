//! Starting and stopping the lab's processes: the store server in the fabric namespace and
//! one `trellis agent` per node namespace. They are the production binary, started the
//! way `ip netns exec` would start them, detached into their own session.

use crate::spec::{ETCD_CLIENT_PORT, LabSpec, NodeSpec, StoreKind, etcd_ip};
use crate::state;
use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trellis_dataplane::netns;

/// Spawn `args` of this executable inside `netns_name`, detached, logging to `log`.
pub fn spawn_in(netns_name: &str, args: &[String], log: &std::path::Path) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("locating the trellis executable")?;
    spawn_program_in(netns_name, &exe, args, log)
}

/// Spawn `program` (looked up on PATH if relative) inside `netns_name`, detached.
pub fn spawn_program_in(
    netns_name: &str,
    program: &std::path::Path,
    args: &[String],
    log: &std::path::Path,
) -> anyhow::Result<i32> {
    let exe = program;
    let ns = netns::open(netns_name)?;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env(
            "TRELLIS_LOG",
            std::env::var("TRELLIS_LOG").unwrap_or_else(|_| "info".into()),
        );
    // SAFETY: between fork and exec only async-signal-safe calls: setns and setsid.
    unsafe {
        cmd.pre_exec(move || {
            netns::enter_fd(fd)?;
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {args:?} in {netns_name}"))?;
    Ok(child.id() as i32)
}

/// Each agent serves its metrics here, on the loopback of its own node namespace.
pub const METRICS_PORT: u16 = 9464;

pub fn agent_args(spec: &LabSpec, node: &NodeSpec) -> Vec<String> {
    let (lab, resync_seconds) = (spec.name.as_str(), spec.agent_resync);
    let mut args = vec![
        "agent".to_string(),
        format!("--resync-seconds={resync_seconds}"),
        format!("--node={}", node.name),
        format!("--location={}", node.location),
        format!("--internal-ip={}", node.internal_ip),
        format!("--pod-cidr={}", node.pod_cidr),
        format!("--overlay-ip={}", node.overlay_ip),
        format!("--probe-ip={}", node.probe_ip),
        format!("--interface={}", node.interface),
        format!("--listen-port={}", crate::spec::LISTEN_PORT),
        format!("--key-file={}", state::key_path(lab, &node.name).display()),
        format!(
            "--state-cache={}",
            state::cache_path(lab, &node.name).display()
        ),
        format!("--store={}", agent_store_url(spec, &node.location)),
        format!(
            "--cni-node-file={}",
            state::cni_node_file(lab, &node.name).display()
        ),
        format!(
            "--cni-ready-file={}",
            state::cni_ready_file(lab, &node.name).display()
        ),
        format!(
            "--cni-ipam-file={}",
            state::cni_ipam_file(lab, &node.name).display()
        ),
        format!(
            "--cni-policy-file={}",
            state::cni_policy_file(lab, &node.name).display()
        ),
        format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"),
    ];
    if let Some(v6) = node.pod_cidr_v6 {
        args.push(format!("--pod-cidr={v6}"));
    }
    if spec.store == StoreKind::Kubernetes {
        args.extend(kube_args(spec, &node.location));
    }
    if let Some(public) = node.public_ip {
        args.push(format!(
            "--endpoint={}:{}",
            public.addr(),
            crate::spec::LISTEN_PORT
        ));
    }
    args
}

/// Whether the process runs. A zombie does not: it is dead and only waits for whoever
/// started it (or, when that was a `trellis lab` command that has exited, for init, which
/// in a container may take its time) to reap it.
pub fn is_alive(pid: i32) -> bool {
    // Signal 0 only checks that the process exists.
    kill(Pid::from_raw(pid), None).is_ok() && !is_zombie(pid)
}

/// Sends `signal`; false if the process is gone.
pub fn signal(pid: i32, signal: Signal) -> bool {
    kill(Pid::from_raw(pid), signal).is_ok()
}

/// Waits until a child of this process exits and reaps it; returns at once for a process
/// that is not our child (another `trellis lab` command started it).
pub fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), None);
}

/// SIGKILL, then [`reap`]: SIGKILL cannot be caught, so the wait is short.
pub fn kill_and_reap(pid: i32) {
    signal(pid, Signal::SIGKILL);
    reap(pid);
}

/// Whether a child of this process has exited, reaping it if so, without waiting; with
/// its exit code when it exited normally.
pub fn exited(pid: i32) -> Option<Option<i32>> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(Some(code)),
        Ok(WaitStatus::StillAlive) | Err(_) => None,
        Ok(_) => Some(None),
    }
}

/// SIGTERM every process in the namespace, then SIGKILL what is left after `grace`.
pub fn kill_all_in(netns_name: &str, grace: Duration) {
    let pids = netns::pids_in(netns_name);
    for pid in &pids {
        signal(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|p| is_alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in netns::pids_in(netns_name) {
        signal(pid, Signal::SIGKILL);
    }
    // Reap the ones this process started itself (`lab demo`), so none lingers as a zombie.
    for pid in pids {
        exited(pid);
    }
}

fn is_zombie(pid: i32) -> bool {
    run_state(pid).is_none_or(|state| state == 'Z')
}

/// The process's state letter from /proc (R, S, T for stopped, Z for zombie...); `None`
/// when it is gone.
pub fn run_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

/// The `--store` an agent of `location` is given: the embedded store's socket, or the lab's
/// etcd on the agent's own location network.
fn agent_store_url(spec: &LabSpec, location: &str) -> String {
    let index = spec
        .locations
        .iter()
        .position(|l| l.name == location)
        .unwrap_or(0);
    match spec.store {
        StoreKind::Embedded => format!("unix:{}", state::store_socket(&spec.name).display()),
        StoreKind::Etcd => format!("etcd://{}:{ETCD_CLIENT_PORT}", etcd_ip(index)),
        StoreKind::Kubernetes => "kubernetes".into(),
    }
}

/// How an agent of `location` reaches the lab's Kubernetes API: its real address, never a
/// kubeconfig or a service address.
fn kube_args(spec: &LabSpec, location: &str) -> Vec<String> {
    let index = spec
        .locations
        .iter()
        .position(|l| l.name == location)
        .unwrap_or(0);
    vec![
        format!("--kube-api={}", crate::kube_api::agent_url(index)),
        format!("--kube-namespace={}", crate::kube_api::NAMESPACE),
    ]
}
