//! The leadership bench's peer: `etcdctl elect`, etcd's own election client, on the lab's
//! etcd. Measured: takeover after its leader is killed, and how long its leader goes on
//! acting after the store freezes (until its session lease runs out: 60 s in etcdctl 3.4).

use crate::processes;
use crate::state::{self, LabState};
use crate::store::{self, StoreFault};
use anyhow::{Context, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// `etcdctl elect` campaigns on a session with the client library's default TTL.
const SESSION_TTL: Duration = Duration::from_secs(60);
const ELECTION: &str = "trellis-bench-peer";
const POLL: Duration = Duration::from_millis(50);
/// How long a one-shot `etcdctl` command (health, get) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct PeerReport {
    pub takeover_ms: f64,
    pub stop_acting_ms: f64,
    pub session_ttl_ms: u64,
}

/// Two `etcdctl elect` candidates in the store's namespace: the first is elected, the
/// second campaigns behind it; the first is killed, then the store frozen.
pub(super) async fn measure(lab: &str) -> anyhow::Result<PeerReport> {
    let state = LabState::load(lab)?;
    let netns = store::netns_of(&state.spec);
    // The store faults before this may have restarted etcd: campaigning on a store that
    // is still starting would time the start, not the election.
    wait_healthy(lab, &netns, Duration::from_secs(30)).await?;
    let mut first = Candidate::start(lab, &netns, "peer-1")?;
    let outcome = async {
        // The second starts only once the first leads: started together, either could
        // win, and the one killed must be the leader.
        first
            .wait_elected(Duration::from_secs(20))
            .await
            .context("its first candidate")?;
        let mut second = Candidate::start(lab, &netns, "peer-2")?;
        let result = async {
            wait_campaigning(lab, &netns, 2, Duration::from_secs(10)).await?;
            let killed = Instant::now();
            first.kill();
            second
                .wait_elected(SESSION_TTL * 2)
                .await
                .context("takeover after its leader was killed")?;
            let takeover_ms = killed.elapsed().as_secs_f64() * 1000.0;
            eprintln!(
                "peer: etcdctl elect took over {takeover_ms:.0} ms after its leader was killed"
            );
            store::inject(lab, StoreFault::Freeze).await?;
            let frozen = Instant::now();
            // Its leader acts until the process ends on "session expired".
            let stop_acting_ms = loop {
                if second.exited() {
                    break frozen.elapsed().as_secs_f64() * 1000.0;
                }
                if frozen.elapsed() > SESSION_TTL * 2 {
                    bail!(
                        "etcdctl elect still leading {:?} after the freeze",
                        SESSION_TTL * 2
                    );
                }
                sleep(POLL).await;
            };
            eprintln!(
                "peer: etcdctl elect's leader stopped {stop_acting_ms:.0} ms after the freeze"
            );
            anyhow::Ok(PeerReport {
                takeover_ms,
                stop_acting_ms,
                session_ttl_ms: SESSION_TTL.as_millis() as u64,
            })
        }
        .await;
        second.kill();
        result
    }
    .await;
    first.kill();
    // Thaw whatever happened: the store must not stay frozen for what comes after.
    if LabState::load(lab).is_ok_and(|s| !s.store_faults.is_empty())
        && let Err(e) = store::heal(lab).await
    {
        eprintln!("peer: could not thaw the store: {e:#}");
    }
    outcome
}

/// One `etcdctl elect` process, logging to a file of the lab.
struct Candidate {
    pid: i32,
    proposal: String,
    log: PathBuf,
    reaped: bool,
}

impl Candidate {
    fn start(lab: &str, netns: &str, proposal: &str) -> anyhow::Result<Self> {
        let log = state::log_path(lab, proposal);
        let _ = std::fs::remove_file(&log);
        let args = [endpoint(), "elect".into(), ELECTION.into(), proposal.into()];
        let pid = processes::spawn_program_in(netns, "etcdctl".as_ref(), &args, &log)
            .context("starting etcdctl (apt-get install etcd-client)")?;
        Ok(Self {
            pid,
            proposal: proposal.to_string(),
            log,
            reaped: false,
        })
    }

    /// Once elected, etcdctl prints the leader key and then its proposal, each on a line
    /// of its own; a line still being written is not a whole line yet.
    fn elected(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|text| {
            text.split_inclusive('\n')
                .any(|line| line.trim_end_matches('\n') == self.proposal && line.ends_with('\n'))
        })
    }

    async fn wait_elected(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !self.elected() {
            if self.exited() {
                bail!(
                    "etcdctl elect {} exited before it was elected: {}",
                    self.proposal,
                    last_line(&self.log)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "etcdctl elect {} was not elected within {within:?}: {}",
                    self.proposal,
                    last_line(&self.log)
                );
            }
            sleep(POLL).await;
        }
        Ok(())
    }

    /// Whether it has exited (and reaps it if so).
    fn exited(&mut self) -> bool {
        if !self.reaped {
            self.reaped = processes::exited(self.pid).is_some();
        }
        self.reaped
    }

    fn kill(&mut self) {
        if !self.reaped {
            processes::kill_and_reap(self.pid);
            self.reaped = true;
        }
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        self.kill();
    }
}

fn endpoint() -> String {
    format!("--endpoints=127.0.0.1:{}", store::ETCD_CLIENT_PORT)
}

fn last_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!("its last output: {line}"),
        None => "it printed nothing".into(),
    }
}

async fn wait_healthy(lab: &str, netns: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match etcdctl(lab, netns, &["endpoint", "health"]).await {
            Ok(out) if out.contains("is healthy") => return Ok(()),
            Ok(out) if Instant::now() > deadline => bail!("etcd is not healthy: {out}"),
            Err(e) if Instant::now() > deadline => return Err(e.context("etcd is not healthy")),
            _ => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until `count` candidates have their key in the election.
async fn wait_campaigning(
    lab: &str,
    netns: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let prefix = format!("{ELECTION}/");
        let keys = etcdctl(lab, netns, &["get", "--prefix", "--keys-only", &prefix]).await?;
        if keys.lines().filter(|l| l.starts_with(&prefix)).count() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("etcdctl elect: {count} candidates not campaigning within {within:?}");
        }
        sleep(POLL).await;
    }
}

/// A one-shot `etcdctl` command in the store's namespace: its output, once it exits
/// within [`COMMAND_TIMEOUT`].
async fn etcdctl(lab: &str, netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let log = state::log_path(lab, "etcdctl-command");
    let _ = std::fs::remove_file(&log);
    let mut all = vec![endpoint(), "--command-timeout=5s".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let pid = processes::spawn_program_in(netns, "etcdctl".as_ref(), &all, &log)
        .context("starting etcdctl (apt-get install etcd-client)")?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        if let Some(code) = processes::exited(pid) {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            if code == Some(0) {
                return Ok(out);
            }
            bail!("etcdctl {}: {}", args.join(" "), out.trim());
        }
        if Instant::now() > deadline {
            processes::kill_and_reap(pid);
            bail!(
                "etcdctl {} took longer than {COMMAND_TIMEOUT:?}",
                args.join(" ")
            );
        }
        sleep(POLL).await;
    }
}
