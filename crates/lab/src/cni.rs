//! Calling a CNI plugin the way a container runtime does: the `CNI_*` environment, the
//! network configuration on stdin, the plugin run in the node's network namespace (a
//! runtime runs plugins in its own, the host's), its answer on stdout and its exit status.
//! The lab's pods, `lab bench cni` and the tests go through here, so every one of them
//! exercises the plugin as a runtime would.

use anyhow::Context;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trellis_dataplane::netns;

/// The plugin binary the workspace builds.
pub const PLUGIN: &str = "trellis-cni";
/// A plugin call that takes longer than this is killed and reported as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `trellis-cni` is: beside the running `trellis` executable (both are built into
/// the same target directory, and installed side by side).
pub fn plugin_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the trellis executable")?;
    let dir = exe
        .parent()
        .context("the trellis executable has no directory")?;
    // Test binaries live one level down, in target/*/deps.
    for candidate in [dir.join(PLUGIN), dir.join("..").join(PLUGIN)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{PLUGIN} is not beside {} (build it with `cargo build -p trellis-cni-plugin`)",
        exe.display()
    )
}

/// One call of a plugin.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub plugin: &'a Path,
    /// The namespace the runtime runs in (a lab node's).
    pub runtime_netns: &'a str,
    /// `ADD`, `DEL`, `CHECK`, `GC`, `STATUS`, `VERSION`.
    pub command: &'a str,
    pub container_id: &'a str,
    /// The pod's namespace as a path (`/run/netns/NAME`); empty when there is none.
    pub netns_path: &'a str,
    pub ifname: &'a str,
    /// Directories searched for delegated plugins (`CNI_PATH`).
    pub cni_path: &'a str,
    /// `CNI_ARGS` (`K=V;K=V`, as a kubelet names the pod); empty for none.
    pub args: &'a str,
    /// The network configuration (one plugin's, with `name` and `cniVersion`).
    pub config: &'a Value,
}

/// What the plugin did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Exit status; `None` when it was killed (by the timeout or by a signal).
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Outcome {
    /// The answer as JSON, when the plugin succeeded; otherwise the CNI error's message.
    pub fn result(&self) -> anyhow::Result<Value> {
        match self.status {
            Some(0) if self.stdout.iter().all(u8::is_ascii_whitespace) => Ok(Value::Null),
            Some(0) => serde_json::from_slice(&self.stdout).context("the plugin's answer"),
            status => {
                let error: Option<Value> = serde_json::from_slice(&self.stdout).ok();
                let msg = error
                    .as_ref()
                    .and_then(|e| {
                        Some(format!(
                            "code {}: {} {}",
                            e.get("code")?,
                            e.get("msg")?.as_str()?,
                            e.get("details").and_then(Value::as_str).unwrap_or("")
                        ))
                    })
                    .unwrap_or_else(|| {
                        format!(
                            "{} {}",
                            String::from_utf8_lossy(&self.stdout),
                            String::from_utf8_lossy(&self.stderr)
                        )
                    });
                anyhow::bail!("the plugin failed ({status:?}): {}", msg.trim())
            }
        }
    }
}

/// Starts a call and returns the running plugin, so a caller can kill it mid-way (the
/// churn benchmark does); [`finish`] collects it.
pub fn start(call: &Call) -> anyhow::Result<std::process::Child> {
    let ns = netns::open(call.runtime_netns)?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(call.plugin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns_path)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", call.cni_path)
        .env("CNI_ARGS", call.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only setns, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || netns::enter_fd(fd));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", call.plugin.display()))?;
    let mut stdin = child.stdin.take().context("the plugin's stdin")?;
    // A plugin that dies before reading its configuration closes the pipe: not an error
    // of the call, its status says what happened.
    let _ = stdin.write_all(serde_json::to_vec(call.config)?.as_slice());
    drop(ns);
    Ok(child)
}

/// Waits for a started call, killing it at `timeout`.
pub fn finish(
    mut child: std::process::Child,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let mut stdout = child.stdout.take().context("the plugin's stdout")?;
    let mut stderr = child.stderr.take().context("the plugin's stderr")?;
    let readers = std::thread::spawn(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let _ = stdout.read_to_end(&mut out);
        let _ = stderr.read_to_end(&mut err);
        (out, err)
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let elapsed = started.elapsed();
    let (stdout, stderr) = readers.join().unwrap_or_default();
    Ok(Outcome {
        status: status.code(),
        stdout,
        stderr,
        elapsed,
    })
}

/// One whole call, with [`CALL_TIMEOUT`].
pub fn call(call: &Call) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let child = start(call)?;
    finish(child, started, CALL_TIMEOUT)
}
