//! Starting and stopping the lab's processes: the store server in the fabric namespace and
//! one `trellis agent` per node namespace. They are the production binary, started the
//! way `ip netns exec` would start them, detached into their own session.

use crate::spec::NodeSpec;
use crate::state;
use anyhow::Context;
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

pub fn agent_args(spec: &crate::spec::LabSpec, node: &NodeSpec) -> Vec<String> {
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
        format!(
            "--store={}",
            crate::store::agent_store_url(spec, &node.location)
        ),
        format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"),
    ];
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
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists && !is_zombie(pid)
}

/// SIGTERM every process in the namespace, then SIGKILL what is left after `grace`.
pub fn kill_all_in(netns_name: &str, grace: Duration) {
    let pids = netns::pids_in(netns_name);
    for pid in &pids {
        // SAFETY: plain kill(2) on pids read from /proc.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|p| is_alive(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in netns::pids_in(netns_name) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // Reap the ones this process started itself (`lab demo`), so none lingers as a zombie.
    for pid in pids {
        // SAFETY: waitpid on a pid that is either our child or not (then it returns -1).
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
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
