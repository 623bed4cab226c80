//! One process run inside a bench namespace and measured from outside: wall time from
//! spawn to exit, and the resources the kernel accounted to it alone (`wait4`: peak
//! resident memory, user and system CPU), with a deadline after which it is killed.

use anyhow::Context;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use trellis_dataplane::netns;

/// How much of a child's output is kept.
const KEPT: usize = 1 << 20;

#[derive(Debug)]
pub struct Measured {
    pub wall: Duration,
    /// Exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub max_rss_kb: i64,
    pub user: Duration,
    pub sys: Duration,
    /// The first [`KEPT`] bytes of its output.
    pub stdout: Vec<u8>,
    /// How much it printed on stdout in all.
    pub stdout_bytes: usize,
    pub stderr: Vec<u8>,
    /// Killed at the deadline.
    pub timed_out: bool,
}

impl Measured {
    pub fn ok(&self) -> bool {
        !self.timed_out && self.code == Some(0)
    }

    pub fn rss_mb(&self) -> f64 {
        self.max_rss_kb as f64 / 1024.0
    }

    pub fn wall_ms(&self) -> f64 {
        self.wall.as_secs_f64() * 1000.0
    }

    /// Why it failed, for a report: the deadline, or its exit and the end of its stderr.
    pub fn failure(&self) -> String {
        if self.timed_out {
            return format!(
                "killed at the deadline after {:.0} s",
                self.wall.as_secs_f64()
            );
        }
        let err = String::from_utf8_lossy(&self.stderr);
        let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        match self.code {
            Some(c) => format!("exited with {c}: {tail}"),
            None => format!("ended by a signal: {tail}"),
        }
    }
}

/// Runs `program ARGS` inside `netns_name` (stdin from `/dev/null`, stdout and stderr
/// captured) and waits for it, at most `timeout`.
pub fn run_in(
    netns_name: &str,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<Measured> {
    let ns = netns::open(netns_name)?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: between fork and exec only setns, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || netns::enter_fd(fd));
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} in {netns_name}", program.display()))?;
    drop(ns);
    let pid = child.id() as libc::pid_t;
    // Read as it comes (a full pipe would stall the child), keeping the beginning.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut total = 0;
            let mut chunk = vec![0u8; 1 << 16];
            if let Some(mut p) = pipe {
                while let Ok(n) = p.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    total += n;
                    let room = KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
            (kept, total)
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(wait4(pid, started));
    });
    let (timed_out, waited) = match rx.recv_timeout(timeout) {
        Ok(w) => (false, w),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (true, rx.recv().context("waiting for a killed child")?)
        }
    };
    let (status, usage, wall) =
        waited.with_context(|| format!("waiting for {}", program.display()))?;
    // The child is reaped: dropping the handle must not wait for it again.
    drop(child);
    let (stdout, stdout_bytes) = out.join().unwrap_or_default();
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    Ok(Measured {
        wall,
        code,
        max_rss_kb: usage.ru_maxrss,
        user: timeval(usage.ru_utime),
        sys: timeval(usage.ru_stime),
        stdout,
        stdout_bytes,
        stderr: err.join().unwrap_or_default().0,
        timed_out,
    })
}

fn wait4(pid: libc::pid_t, started: Instant) -> std::io::Result<(i32, libc::rusage, Duration)> {
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes only into the two out-parameters given.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((status, usage, started.elapsed()));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Peak and current resident memory of this process, in MB (`VmHWM`, `VmRSS`).
pub fn own_rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}
