//! Seed 001 replayed on a lab on etcd. The store stops
//! answering (SIGSTOP, as an API server under pressure); the leader stops its leader-only
//! work at its renew deadline and nothing else happens: no agent exits, every node stays
//! ready, traffic between every pair of pods keeps flowing. After the store is back a
//! leader acts again. Every step is printed with its time since the freeze (or the thaw).

use super::lab::{summary_table, up_and_check};
use crate::agent_admin::ready;
use crate::bench::leadership::{Traffic, acting_leaders, new_leader, one_leader};
use crate::processes;
use crate::state::LabState;
use crate::store::{self, StoreFault, StoreKind};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::{Instant, sleep};
use trellis_model::Granularity;

const POLL: Duration = Duration::from_millis(50);
/// How long the store stays frozen: past the election lease, so the old term is surely
/// over everywhere.
const OUTAGE: Duration = Duration::from_secs(15);
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// What the demo saw, in milliseconds since the freeze (or the thaw, for `back_ms`); also
/// the `--json` summary. `None` (`null`): did not happen within the limit.
#[derive(Default, Debug, serde::Serialize)]
pub struct Summary {
    /// Every pod reached every other before the freeze.
    pairs_ok: bool,
    /// The leader when the store froze, and its epoch.
    leader: String,
    epoch: u64,
    /// The leader stopped its leader-only work.
    stopped_ms: Option<u128>,
    renew_deadline_ms: u128,
    /// Agent processes that exited or were replaced (target 0).
    restarts: usize,
    /// Readiness samples of running agents, and how many said not ready (target 0).
    readiness_samples: usize,
    unready_samples: usize,
    /// New TCP connections between every pair of pods, and how many failed (target 0).
    connections_attempted: usize,
    connections_lost: usize,
    /// After the thaw: a leader acts again, who, with which epoch.
    back_ms: Option<u128>,
    next_leader: Option<String>,
    next_epoch: Option<u64>,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.pairs_ok
            && self
                .stopped_ms
                .is_some_and(|ms| ms <= self.renew_deadline_ms + 1_000)
            && self.unready_samples == 0
            && self.restarts == 0
            && self.connections_lost == 0
            && self.back_ms.is_some()
    }

    pub fn table(&self) -> String {
        let rows: Vec<(String, String)> = vec![
            (
                format!("store frozen; {} leads (epoch {})", self.leader, self.epoch),
                "t = 0".into(),
            ),
            (
                format!(
                    "{} stops leader-only work (renew deadline {} ms)",
                    self.leader, self.renew_deadline_ms
                ),
                self.stopped_ms
                    .map_or("did not happen".into(), |ms| format!("{ms} ms")),
            ),
            (
                "agent processes that exited or restarted".into(),
                self.restarts.to_string(),
            ),
            (
                "node readiness samples that were not ready".into(),
                format!("{} of {}", self.unready_samples, self.readiness_samples),
            ),
            (
                "new TCP connections between all pod pairs that failed".into(),
                format!(
                    "{} of {}",
                    self.connections_lost, self.connections_attempted
                ),
            ),
            ("store thawed".into(), "t = 0".into()),
            (
                match (&self.next_leader, self.next_epoch) {
                    (Some(node), Some(epoch)) => {
                        format!("a leader acts again: {node} (epoch {epoch})")
                    }
                    _ => "a leader acts again".into(),
                },
                self.back_ms
                    .map_or("did not happen".into(), |ms| format!("{ms} ms")),
            ),
            (
                "the same outage under Skupper (seed 001)".into(),
                "controller exits: restarts, NotReady, config drift".into(),
            ),
        ];
        summary_table(&rows)
    }
}

pub async fn scenario(name: &str) -> anyhow::Result<Summary> {
    let (lab, pairs_ok) = up_and_check(name, Granularity::Location, StoreKind::Etcd).await?;

    let leader = one_leader(name, Duration::from_secs(30)).await?;
    let epoch = trellis_agent::leader::current_leader(crate::open_store(name)?.as_ref())
        .await?
        .map_or(0, |(_, epoch)| epoch);
    let election = trellis_agent::leader::ElectionConfig::default();
    let mut summary = Summary {
        pairs_ok,
        leader: leader.clone(),
        epoch,
        renew_deadline_ms: election.renew_deadline.as_millis(),
        ..Default::default()
    };
    say!(
        "\n== leader: {leader} (epoch {epoch}); lease {} s, renew deadline {} s",
        election.lease.as_secs(),
        election.renew_deadline.as_secs()
    );
    let pids_before = lab.agent_pids.clone();
    say!(
        "== traffic: a new TCP connection every 20 ms, in turn between every ordered pair of the 6 pods"
    );
    let traffic = Traffic::start(&lab).await?;
    sleep(Duration::from_secs(1)).await;

    say!(
        "\n== trellis lab fault --name {name} store freeze   (seed 001: the store stops answering, connections stay open)"
    );
    store::inject(name, StoreFault::Freeze).await?;
    let t0 = Instant::now();
    let mut next_progress = t0 + PROGRESS_EVERY;
    while t0.elapsed() < OUTAGE {
        if summary.stopped_ms.is_none() && !acting_leaders(name).await?.contains(&leader) {
            let ms = t0.elapsed().as_millis();
            summary.stopped_ms = Some(ms);
            say!(
                "  t = {ms:>5} ms  {leader} stops leader-only work: its last renewal is older than the renew deadline (it does not exit)"
            );
        }
        if Instant::now() >= next_progress {
            next_progress += PROGRESS_EVERY;
            let (ready, running) = readiness(name).await?;
            summary.readiness_samples += running.len();
            summary.unready_samples += running.len() - ready;
            say!(
                "  t = {:>5} ms  agents running {}/6, data plane ready {ready}/6, connections {} ok, {} failed",
                t0.elapsed().as_millis(),
                running.len(),
                traffic.attempts.load(Ordering::Relaxed) - traffic.lost.load(Ordering::Relaxed),
                traffic.lost.load(Ordering::Relaxed),
            );
        }
        sleep(POLL).await;
    }

    say!("\n== trellis lab heal --name {name} store");
    store::heal(name).await?;
    let h0 = Instant::now();
    if let Ok(ms) = new_leader(name, None, h0, Duration::from_secs(30)).await {
        let (node, epoch) =
            trellis_agent::leader::current_leader(crate::open_store(name)?.as_ref())
                .await?
                .unwrap_or_default();
        say!("  t = {ms:>5.0} ms  a leader acts again: {node} (epoch {epoch})");
        summary.back_ms = Some(ms as u128);
        summary.next_leader = Some(node);
        summary.next_epoch = Some(epoch);
    }
    let (attempts, lost) = traffic.stop().await;
    summary.connections_attempted = attempts;
    summary.connections_lost = lost;
    let lab = LabState::load(name)?;
    summary.restarts = pids_before
        .iter()
        .filter(|(node, pid)| lab.agent_pids.get(*node) != Some(pid) || !processes::is_alive(**pid))
        .count();
    Ok(summary)
}

/// (ready agents, running agents) right now.
async fn readiness(name: &str) -> anyhow::Result<(usize, Vec<String>)> {
    let lab = LabState::load(name)?;
    let running: Vec<String> = lab
        .spec
        .nodes
        .iter()
        .filter(|n| {
            lab.agent_pids
                .get(&n.name)
                .is_some_and(|p| processes::is_alive(*p))
        })
        .map(|n| n.name.clone())
        .collect();
    let answers = futures::future::join_all(running.iter().map(|n| ready(&lab, n))).await;
    let ready = answers
        .into_iter()
        .filter(|r| matches!(r, Ok(true)))
        .count();
    Ok((ready, running))
}
