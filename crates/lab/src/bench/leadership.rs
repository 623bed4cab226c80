//! `lab bench leadership`: seed 001 measured on a lab on a real etcd (or, `--store
//! kubernetes`, on the Kubernetes API double: the leader Lease instead of etcd's election,
//! and no kill among the store faults, since the double keeps its objects in its process).
//!
//! - **takeover**: the leader's node is killed (its agent, and with it the node's data
//!   plane); time until another agent acts as leader (its `trellis_leader` gauge is 1).
//! - **stop acting**: the store is frozen (SIGSTOP); time until the leader's gauge drops to 0,
//!   then how long after the thaw a leader acts again.
//! - **store faults**: freeze, kill, partition of the leader's node, throttling, in turn,
//!   each held longer than the renew deadline and then healed. Counted: agent processes that
//!   exited or were replaced (target 0), and failed new TCP connections between every pair of
//!   pods, one attempt every 20 ms throughout (target 0: the data plane never depends on the
//!   store).
//! - **peer** ([`super::peer`]): `etcdctl elect`, etcd's own election client, measured in the
//!   same run on the same etcd. A peer that misbehaves is reported as such: it never costs
//!   the run what Trellis measured.
//!
//! A measurement that fails is reported with the rest, and the run goes on with the next
//! part: what was measured is never thrown away.
//!
//! Agents run with the default election timing (`ElectionConfig::default()`).

use super::peer::{self, PeerReport};
use super::{CONNECT_TIMEOUT, SERVER_PORT, Servers, connect_from, percentile};
use crate::agent_admin::{metrics, ready};
use crate::fault::{self, Fault, FaultKind};
use crate::state::LabState;
use crate::store::{self, StoreFault, StoreKind};
use crate::up::bring_up;
use crate::{build, processes};
use anyhow::bail;
use serde::Serialize;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep};
use trellis_model::GatewayHealth;

const POLL: Duration = Duration::from_millis(50);
const ATTEMPT_EVERY: Duration = Duration::from_millis(20);

pub struct LeadershipArgs {
    /// The bench's lab.
    pub name: String,
    /// Repetitions of the takeover and of the stop-acting measurement.
    pub reps: usize,
    /// Store faults in the restart and data-plane part.
    pub faults: usize,
    /// How long each store fault is held.
    pub hold: Duration,
    pub peer: bool,
    /// Etcd or Kubernetes (the peer runs only on etcd).
    pub store: StoreKind,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
    pub all_ms: Vec<f64>,
}

impl Summary {
    fn of(mut ms: Vec<f64>) -> Self {
        ms.sort_by(f64::total_cmp);
        Self {
            samples: ms.len(),
            p50_ms: percentile(&ms, 0.5),
            max_ms: ms.last().copied().unwrap_or(0.0),
            all_ms: ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LeadershipReport {
    pub lease_ms: u64,
    pub renew_deadline_ms: u64,
    pub takeover: Summary,
    pub stop_acting: Summary,
    /// From the thaw to a leader acting again.
    pub leader_back_after_thaw: Summary,
    pub store_faults: Vec<String>,
    /// From each store fault's heal to a leader acting again.
    pub leader_back_after_fault: Summary,
    pub agent_restarts: usize,
    pub connections_during_faults: usize,
    pub connections_lost: usize,
    pub peer: Option<PeerReport>,
    /// Why the peer has no figures, when it failed (not a Trellis result).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_failed: Option<String>,
    /// Measurements of Trellis that failed, each ending its part of the run.
    pub failures: Vec<String>,
}

impl LeadershipReport {
    /// Trellis's own results only: no agent restarted, no connection lost, nothing failed.
    pub fn passed(&self) -> bool {
        self.agent_restarts == 0 && self.connections_lost == 0 && self.failures.is_empty()
    }
}

pub async fn leadership(args: &LeadershipArgs) -> anyhow::Result<LeadershipReport> {
    let lab = args.name.as_str();
    let _ = build::teardown(lab);
    let params = crate::spec::LabParams {
        store: args.store,
        ..super::bench_lab(lab, GatewayHealth::Forwarding)
    };
    let spec = params.spec()?;
    let result = async {
        bring_up(&spec, Duration::from_secs(90)).await?;
        anyhow::Ok(measure(lab, args).await)
    }
    .await;
    let _ = build::teardown(lab);
    result
}

async fn measure(lab: &str, args: &LeadershipArgs) -> LeadershipReport {
    let election = trellis_agent::leader::ElectionConfig::default();
    let mut failures = Vec::new();
    let mut takeovers = Vec::new();
    for rep in 0..args.reps {
        match takeover(lab).await {
            Ok(ms) => {
                eprintln!("takeover {}/{}: {ms:.0} ms", rep + 1, args.reps);
                takeovers.push(ms);
            }
            Err(e) => {
                failed(&mut failures, format!("takeover {}: {e:#}", rep + 1));
                break;
            }
        }
    }
    let (mut stops, mut backs) = (Vec::new(), Vec::new());
    for rep in 0..args.reps {
        match stop_acting(lab).await {
            Ok((stop, back)) => {
                eprintln!(
                    "stop acting {}/{}: leader stopped {stop:.0} ms after the freeze; a leader acted {back:.0} ms after the thaw",
                    rep + 1,
                    args.reps
                );
                stops.push(stop);
                backs.push(back);
            }
            Err(e) => {
                failed(&mut failures, format!("stop acting {}: {e:#}", rep + 1));
                break;
            }
        }
    }
    let faults = store_faults(lab, args).await;
    if let Some(e) = &faults.failure {
        failed(&mut failures, e.clone());
    }
    let (peer, peer_failed) = match args.peer && args.store == StoreKind::Etcd {
        false => (None, None),
        true => match peer::measure(lab).await {
            Ok(p) => (Some(p), None),
            Err(e) => {
                eprintln!("peer: etcdctl elect failed: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        },
    };
    LeadershipReport {
        lease_ms: election.lease.as_millis() as u64,
        renew_deadline_ms: election.renew_deadline.as_millis() as u64,
        takeover: Summary::of(takeovers),
        stop_acting: Summary::of(stops),
        leader_back_after_thaw: Summary::of(backs),
        store_faults: faults.kinds,
        leader_back_after_fault: Summary::of(faults.leader_back),
        agent_restarts: faults.restarts,
        connections_during_faults: faults.attempts,
        connections_lost: faults.lost,
        peer,
        peer_failed,
        failures,
    }
}

fn failed(failures: &mut Vec<String>, what: String) {
    eprintln!("failed: {what}");
    failures.push(what);
}

/// The nodes whose agent acts as leader now (a silent or dead agent does not).
pub(crate) async fn acting_leaders(lab: &str) -> anyhow::Result<Vec<String>> {
    let lab = LabState::load(lab)?;
    let pages =
        futures::future::join_all(lab.spec.nodes.iter().map(|n| metrics(&lab, &n.name))).await;
    Ok(lab
        .spec
        .nodes
        .iter()
        .zip(pages)
        .filter(|(_, page)| {
            page.as_ref().is_ok_and(|m| {
                m.lines()
                    .any(|l| l.starts_with("trellis_leader{") && l.ends_with(" 1"))
            })
        })
        .map(|(n, _)| n.name.clone())
        .collect())
}

/// Waits until exactly one agent acts as leader and returns it.
pub(crate) async fn one_leader(lab: &str, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        if let [leader] = acting_leaders(lab).await?.as_slice() {
            return Ok(leader.clone());
        }
        if Instant::now() > deadline {
            bail!("no single acting leader within {within:?}");
        }
        sleep(POLL).await;
    }
}

/// Waits until some agent other than `except` acts as leader; the time it took.
pub(crate) async fn new_leader(
    lab: &str,
    except: Option<&str>,
    since: Instant,
    within: Duration,
) -> anyhow::Result<f64> {
    loop {
        let leaders = acting_leaders(lab).await?;
        if leaders.iter().any(|l| Some(l.as_str()) != except) {
            return Ok(since.elapsed().as_secs_f64() * 1000.0);
        }
        if since.elapsed() > within {
            bail!("no new leader within {within:?}");
        }
        sleep(POLL).await;
    }
}

async fn wait_ready(lab: &str, node: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let lab = LabState::load(lab)?;
        if ready(&lab, node).await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{node} not ready within {within:?}");
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn takeover(lab: &str) -> anyhow::Result<f64> {
    let leader = one_leader(lab, Duration::from_secs(40)).await?;
    let killed = Instant::now();
    let kill = Fault::new(FaultKind::Kill, false, None)?;
    fault::inject(lab, &leader, kill).await?;
    let ms = new_leader(lab, Some(&leader), killed, Duration::from_secs(40)).await;
    // Healed whatever the outcome, so the next part starts on a whole lab.
    fault::heal(lab, &leader).await?;
    let ms = ms?;
    wait_ready(lab, &leader, Duration::from_secs(30)).await?;
    Ok(ms)
}

/// (stopped after the freeze, leader back after the thaw), in ms.
async fn stop_acting(lab: &str) -> anyhow::Result<(f64, f64)> {
    let leader = one_leader(lab, Duration::from_secs(40)).await?;
    store::inject(lab, StoreFault::Freeze).await?;
    let frozen = Instant::now();
    let stopped = loop {
        let acting = match acting_leaders(lab).await {
            Ok(acting) => acting,
            Err(e) => {
                store::heal(lab).await?;
                return Err(e);
            }
        };
        if !acting.contains(&leader) {
            break frozen.elapsed().as_secs_f64() * 1000.0;
        }
        if frozen.elapsed() > Duration::from_secs(30) {
            store::heal(lab).await?;
            bail!("{leader} still acted 30 s after the store froze");
        }
        sleep(POLL).await;
    };
    // Hold the freeze past the lease, as a real outage would, before thawing.
    let lease = trellis_agent::leader::ElectionConfig::default().lease;
    sleep(lease.saturating_sub(frozen.elapsed())).await;
    store::heal(lab).await?;
    let back = new_leader(lab, None, Instant::now(), Duration::from_secs(40)).await?;
    Ok((stopped, back))
}

struct FaultsOutcome {
    kinds: Vec<String>,
    leader_back: Vec<f64>,
    restarts: usize,
    attempts: usize,
    lost: usize,
    /// What ended the faults early, if anything did; the counts cover the run until then.
    failure: Option<String>,
}

async fn store_faults(lab: &str, args: &LeadershipArgs) -> FaultsOutcome {
    let mut out = FaultsOutcome {
        kinds: Vec::new(),
        leader_back: Vec::new(),
        restarts: 0,
        attempts: 0,
        lost: 0,
        failure: None,
    };
    let state = match LabState::load(lab) {
        Ok(s) => s,
        Err(e) => {
            out.failure = Some(format!("store faults: {e:#}"));
            return out;
        }
    };
    let pids_before = state.agent_pids.clone();
    let traffic = match Traffic::start(&state).await {
        Ok(t) => t,
        Err(e) => {
            out.failure = Some(format!("store faults: starting the traffic: {e:#}"));
            return out;
        }
    };
    for i in 0..args.faults {
        let result = async {
            let leader = one_leader(lab, Duration::from_secs(40)).await?;
            let mut kinds = vec![
                StoreFault::Freeze,
                StoreFault::Kill,
                StoreFault::Partition(leader),
                StoreFault::Throttle,
            ];
            if args.store == StoreKind::Kubernetes {
                kinds.retain(|k| *k != StoreFault::Kill);
            }
            let fault = kinds.swap_remove(i % kinds.len());
            store::inject(lab, fault.clone()).await?;
            sleep(args.hold).await;
            store::heal(lab).await?;
            let back = new_leader(lab, None, Instant::now(), Duration::from_secs(40)).await?;
            anyhow::Ok((fault, back))
        }
        .await;
        match result {
            Ok((fault, back)) => {
                eprintln!(
                    "store fault {}/{} ({fault}, held {:?}): leader acting {back:.0} ms after the heal; {} of {} connections lost so far",
                    i + 1,
                    args.faults,
                    args.hold,
                    traffic.lost.load(Ordering::Relaxed),
                    traffic.attempts.load(Ordering::Relaxed),
                );
                out.kinds.push(fault.to_string());
                out.leader_back.push(back);
            }
            Err(e) => {
                // Heal what may still be injected, so the counts below are of a whole lab.
                let _ = store::heal(lab).await;
                out.failure = Some(format!("store fault {}: {e:#}", i + 1));
                break;
            }
        }
    }
    (out.attempts, out.lost) = traffic.stop().await;
    if let Ok(state) = LabState::load(lab) {
        out.restarts = pids_before
            .iter()
            .filter(|(node, pid)| {
                state.agent_pids.get(*node) != Some(pid)
                    || !processes::is_alive(**pid)
                    || processes::run_state(**pid) == Some('Z')
            })
            .count();
    }
    out
}

/// New TCP connections between every ordered pair of pods, one attempt every 20 ms in
/// turn; each attempt is its own task, so a slow one never delays the next.
pub(crate) struct Traffic {
    pub(crate) attempts: Arc<AtomicUsize>,
    pub(crate) lost: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    _servers: Servers,
}

impl Traffic {
    pub(crate) async fn start(lab: &LabState) -> anyhow::Result<Self> {
        let pods: Vec<_> = lab.spec.nodes.iter().map(|n| n.pods[0].clone()).collect();
        let mut servers = Servers::default();
        for pod in &pods {
            servers.ensure(&pod.netns).await?;
        }
        let pairs: Vec<(String, SocketAddr)> = pods
            .iter()
            .flat_map(|from| {
                pods.iter()
                    .filter(move |to| to.name != from.name)
                    .map(|to| {
                        let target = SocketAddrV4::new(to.ip.addr(), SERVER_PORT);
                        (from.netns.clone(), SocketAddr::V4(target))
                    })
            })
            .collect();
        let (attempts, lost) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, l) = (attempts.clone(), lost.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ATTEMPT_EVERY);
            for (netns, target) in pairs.iter().cycle() {
                tick.tick().await;
                let (netns, target, a, l) = (netns.clone(), *target, a.clone(), l.clone());
                tokio::spawn(async move {
                    a.fetch_add(1, Ordering::Relaxed);
                    if !connect_from(&netns, target).await {
                        l.fetch_add(1, Ordering::Relaxed);
                        eprintln!("connection {netns} -> {target} failed");
                    }
                });
            }
        });
        Ok(Self {
            attempts,
            lost,
            task,
            _servers: servers,
        })
    }

    /// (attempts, lost), once the attempts in flight have finished.
    pub(crate) async fn stop(self) -> (usize, usize) {
        self.task.abort();
        sleep(CONNECT_TIMEOUT + Duration::from_millis(200)).await;
        (
            self.attempts.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }
}

pub fn table(r: &LeadershipReport) -> String {
    let row = |what: &str, s: &Summary| {
        format!(
            "| {what} | {} | {:.0} | {:.0} |\n",
            s.samples, s.p50_ms, s.max_ms
        )
    };
    let mut out = format!(
        "Trellis agents: lease {} ms, renew deadline {} ms\n\n| measurement | samples | p50 ms | max ms |\n|---|---|---|---|\n",
        r.lease_ms, r.renew_deadline_ms
    );
    out += &row("takeover after the leader's node is killed", &r.takeover);
    out += &row(
        "leader stops acting after the store freezes",
        &r.stop_acting,
    );
    out += &row(
        "a leader acts again after the thaw",
        &r.leader_back_after_thaw,
    );
    out += &row(
        "a leader acts again after a store fault heals",
        &r.leader_back_after_fault,
    );
    out += &format!(
        "\nstore faults: {} ({})\nagent restarts during them: {}\nnew connections between all pod pairs during them: {} attempted, {} lost\n",
        r.store_faults.len(),
        r.store_faults.join(", "),
        r.agent_restarts,
        r.connections_during_faults,
        r.connections_lost
    );
    if let Some(reason) = &r.peer_failed {
        out += &format!("\npeer, etcdctl elect: failed: {reason}\n");
    }
    if !r.failures.is_empty() {
        out += &format!(
            "\nmeasurements that failed (each ended its part of the run):\n{}",
            r.failures
                .iter()
                .map(|f| format!("- {f}\n"))
                .collect::<String>()
        );
    }
    if let Some(p) = &r.peer {
        out += &format!(
            "\npeer, etcdctl elect (session TTL {} ms), same etcd, one run:\n| measurement | etcdctl elect ms | Trellis p50 ms | ratio |\n|---|---|---|---|\n| takeover after the leader is killed | {:.0} | {:.0} | {:.1}x |\n| leader stops acting after the store freezes | {:.0} | {:.0} | {:.1}x |\n",
            p.session_ttl_ms,
            p.takeover_ms,
            r.takeover.p50_ms,
            p.takeover_ms / r.takeover.p50_ms.max(1.0),
            p.stop_acting_ms,
            r.stop_acting.p50_ms,
            p.stop_acting_ms / r.stop_acting.p50_ms.max(1.0),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> LeadershipReport {
        LeadershipReport {
            lease_ms: 10_000,
            renew_deadline_ms: 7_000,
            takeover: Summary::of(vec![900.0]),
            stop_acting: Summary::of(vec![6_000.0]),
            leader_back_after_thaw: Summary::of(vec![500.0]),
            store_faults: vec!["store freeze".into()],
            leader_back_after_fault: Summary::of(vec![100.0]),
            agent_restarts: 0,
            connections_during_faults: 100,
            connections_lost: 0,
            peer: None,
            peer_failed: None,
            failures: Vec::new(),
        }
    }

    #[test]
    fn a_failed_peer_is_reported_and_does_not_fail_the_run() {
        let r = LeadershipReport {
            peer_failed: Some("etcdctl elect peer-1 was not elected within 20s".into()),
            ..report()
        };
        assert!(r.passed());
        let table = table(&r);
        assert!(table.contains("etcdctl elect: failed: etcdctl elect peer-1"));
        assert!(table.contains("| takeover after the leader's node is killed | 1 | 900 |"));
    }

    #[test]
    fn a_failed_measurement_of_trellis_fails_the_run_and_is_listed() {
        let r = LeadershipReport {
            failures: vec!["takeover 2: no new leader within 40s".into()],
            ..report()
        };
        assert!(!r.passed());
        assert!(table(&r).contains("- takeover 2: no new leader within 40s"));
    }
}
