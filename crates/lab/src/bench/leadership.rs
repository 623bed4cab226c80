//! `lab bench leadership`: seed 001 measured on a lab on a real etcd.
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
//! - **peer**: `etcdctl elect`, etcd's own election client, measured in the same run on the
//!   same etcd: takeover after its leader is killed, and how long its leader goes on acting
//!   after the store freezes (it stops when its session lease runs out; its TTL is fixed at
//!   60 s in etcdctl 3.4).
//!
//! Agents run with the default election timing (`ElectionConfig::default()`).

use super::{CONNECT_TIMEOUT, SERVER_PORT, Server, connect_from, percentile};
use crate::agent_admin::{metrics_of, ready_of};
use crate::fault::{self, Fault, FaultKind};
use crate::state::{self, LabState};
use crate::store::{self, StoreFault, StoreKind};
use crate::up::bring_up;
use crate::{build, processes};
use anyhow::{Context, bail};
use serde::Serialize;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::{Instant, sleep};
use trellis_model::GatewayHealth;

const LAB: &str = "bld";
const POLL: Duration = Duration::from_millis(50);
const ATTEMPT_EVERY: Duration = Duration::from_millis(20);
/// `etcdctl elect` campaigns on a session with the client library's default TTL.
const PEER_SESSION_TTL: Duration = Duration::from_secs(60);
const PEER_ELECTION: &str = "trellis-bench-peer";

pub struct LeadershipArgs {
    /// Repetitions of the takeover and of the stop-acting measurement.
    pub reps: usize,
    /// Store faults in the restart and data-plane part.
    pub faults: usize,
    /// How long each store fault is held.
    pub hold: Duration,
    pub peer: bool,
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
pub struct PeerReport {
    pub takeover_ms: f64,
    pub stop_acting_ms: f64,
    pub session_ttl_ms: u64,
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
}

pub async fn leadership(args: &LeadershipArgs) -> anyhow::Result<LeadershipReport> {
    let _ = build::teardown(LAB);
    let params = crate::spec::LabParams {
        store: StoreKind::Etcd,
        ..super::bench_lab(LAB, GatewayHealth::Forwarding)
    };
    let spec = params.spec()?;
    let result = async {
        bring_up(&spec, Duration::from_secs(90)).await?;
        measure(args).await
    }
    .await;
    let _ = build::teardown(LAB);
    result
}

async fn measure(args: &LeadershipArgs) -> anyhow::Result<LeadershipReport> {
    let election = trellis_agent::leader::ElectionConfig::default();
    let mut takeovers = Vec::new();
    for rep in 0..args.reps {
        let ms = takeover()
            .await
            .with_context(|| format!("takeover {rep}"))?;
        eprintln!("takeover {}/{}: {ms:.0} ms", rep + 1, args.reps);
        takeovers.push(ms);
    }
    let (mut stops, mut backs) = (Vec::new(), Vec::new());
    for rep in 0..args.reps {
        let (stop, back) = stop_acting()
            .await
            .with_context(|| format!("stop acting {rep}"))?;
        eprintln!(
            "stop acting {}/{}: leader stopped {stop:.0} ms after the freeze; a leader acted {back:.0} ms after the thaw",
            rep + 1,
            args.reps
        );
        stops.push(stop);
        backs.push(back);
    }
    let faults = store_faults(args).await?;
    let peer = if args.peer {
        Some(peer().await.context("the etcdctl elect peer")?)
    } else {
        None
    };
    Ok(LeadershipReport {
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
    })
}

/// The nodes whose agent acts as leader now (a silent or dead agent does not).
pub(crate) async fn acting_leaders(lab: &str) -> anyhow::Result<Vec<String>> {
    let lab = LabState::load(lab)?;
    tokio::task::spawn_blocking(move || {
        lab.spec
            .nodes
            .iter()
            .filter(|n| {
                metrics_of(&lab, &n.name).is_ok_and(|m| {
                    m.lines()
                        .any(|l| l.starts_with("trellis_leader{") && l.ends_with(" 1"))
                })
            })
            .map(|n| n.name.clone())
            .collect()
    })
    .await
    .context("polling the agents")
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

async fn wait_ready(node: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let lab = LabState::load(LAB)?;
        let name = node.to_string();
        let ready =
            tokio::task::spawn_blocking(move || ready_of(&lab, &name).unwrap_or(false)).await?;
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{node} not ready within {within:?}");
        }
        sleep(Duration::from_millis(200)).await;
    }
}

async fn takeover() -> anyhow::Result<f64> {
    let leader = one_leader(LAB, Duration::from_secs(40)).await?;
    let killed = Instant::now();
    let kill = Fault::new(FaultKind::Kill, false, None)?;
    fault::inject(LAB, &leader, kill).await?;
    let ms = new_leader(LAB, Some(&leader), killed, Duration::from_secs(40)).await?;
    fault::heal(LAB, &leader).await?;
    wait_ready(&leader, Duration::from_secs(30)).await?;
    Ok(ms)
}

/// (stopped after the freeze, leader back after the thaw), in ms.
async fn stop_acting() -> anyhow::Result<(f64, f64)> {
    let leader = one_leader(LAB, Duration::from_secs(40)).await?;
    store::inject(LAB, StoreFault::Freeze).await?;
    let frozen = Instant::now();
    let stopped = loop {
        if !acting_leaders(LAB).await?.contains(&leader) {
            break frozen.elapsed().as_secs_f64() * 1000.0;
        }
        if frozen.elapsed() > Duration::from_secs(30) {
            store::heal(LAB).await?;
            bail!("{leader} still acted 30 s after the store froze");
        }
        sleep(POLL).await;
    };
    // Hold the freeze past the lease, as a real outage would, before thawing.
    let lease = trellis_agent::leader::ElectionConfig::default().lease;
    sleep(lease.saturating_sub(frozen.elapsed())).await;
    store::heal(LAB).await?;
    let back = new_leader(LAB, None, Instant::now(), Duration::from_secs(40)).await?;
    Ok((stopped, back))
}

struct FaultsOutcome {
    kinds: Vec<String>,
    leader_back: Vec<f64>,
    restarts: usize,
    attempts: usize,
    lost: usize,
}

async fn store_faults(args: &LeadershipArgs) -> anyhow::Result<FaultsOutcome> {
    let lab = LabState::load(LAB)?;
    let pids_before = lab.agent_pids.clone();
    let traffic = Traffic::start(&lab).await?;
    let mut kinds = Vec::new();
    let mut leader_back = Vec::new();
    for i in 0..args.faults {
        let leader = one_leader(LAB, Duration::from_secs(40)).await?;
        let fault = match i % 4 {
            0 => StoreFault::Freeze,
            1 => StoreFault::Kill,
            2 => StoreFault::Partition(leader),
            _ => StoreFault::Throttle,
        };
        store::inject(LAB, fault.clone()).await?;
        sleep(args.hold).await;
        store::heal(LAB).await?;
        let back = new_leader(LAB, None, Instant::now(), Duration::from_secs(40)).await?;
        eprintln!(
            "store fault {}/{} ({fault}, held {:?}): leader acting {back:.0} ms after the heal; {} of {} connections lost so far",
            i + 1,
            args.faults,
            args.hold,
            traffic.lost.load(Ordering::Relaxed),
            traffic.attempts.load(Ordering::Relaxed),
        );
        kinds.push(fault.to_string());
        leader_back.push(back);
    }
    let (attempts, lost) = traffic.stop().await;
    let lab = LabState::load(LAB)?;
    let restarts = pids_before
        .iter()
        .filter(|(node, pid)| {
            lab.agent_pids.get(*node) != Some(pid)
                || !processes::is_alive(**pid)
                || processes::run_state(**pid) == Some('Z')
        })
        .count();
    Ok(FaultsOutcome {
        kinds,
        leader_back,
        restarts,
        attempts,
        lost,
    })
}

/// New TCP connections between every ordered pair of pods, one attempt every 20 ms in
/// turn; each attempt is its own task, so a slow one never delays the next.
pub(crate) struct Traffic {
    pub(crate) attempts: Arc<AtomicUsize>,
    pub(crate) lost: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    _servers: Vec<Server>,
}

impl Traffic {
    pub(crate) async fn start(lab: &LabState) -> anyhow::Result<Self> {
        let pods: Vec<_> = lab.spec.nodes.iter().map(|n| n.pods[0].clone()).collect();
        let mut servers = Vec::new();
        for pod in &pods {
            servers.push(Server::start(&pod.netns).await?);
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

/// `etcdctl elect` candidates in the store's namespace, on the same etcd.
async fn peer() -> anyhow::Result<PeerReport> {
    let lab = LabState::load(LAB)?;
    let netns = store::netns_of(&lab.spec);
    let start = |proposal: &str| -> anyhow::Result<(i32, std::path::PathBuf)> {
        let log = state::log_path(LAB, &format!("peer-{proposal}"));
        let _ = std::fs::remove_file(&log);
        let args: Vec<String> = [
            format!("--endpoints=127.0.0.1:{}", store::ETCD_CLIENT_PORT),
            "elect".into(),
            PEER_ELECTION.into(),
            proposal.into(),
        ]
        .into();
        let pid = processes::spawn_program_in(&netns, "etcdctl".as_ref(), &args, &log)
            .context("starting etcdctl (apt-get install etcd-client)")?;
        Ok((pid, log))
    };
    // A candidate prints the leader key and its proposal once it is elected.
    let elected = |log: &std::path::Path, proposal: &str| {
        std::fs::read_to_string(log).is_ok_and(|l| l.lines().any(|line| line == proposal))
    };
    let (first, first_log) = start("peer-1")?;
    let (second, second_log) = start("peer-2")?;
    let outcome = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !elected(&first_log, "peer-1") {
            if Instant::now() > deadline {
                bail!("etcdctl elect never elected its first candidate");
            }
            sleep(POLL).await;
        }
        sleep(Duration::from_secs(1)).await; // the second is campaigning, behind the first
        let killed = Instant::now();
        reap(first, libc::SIGKILL);
        while !elected(&second_log, "peer-2") {
            if killed.elapsed() > PEER_SESSION_TTL * 2 {
                bail!(
                    "etcdctl elect: no takeover within {:?}",
                    PEER_SESSION_TTL * 2
                );
            }
            sleep(POLL).await;
        }
        let takeover_ms = killed.elapsed().as_secs_f64() * 1000.0;
        eprintln!("peer: etcdctl elect took over {takeover_ms:.0} ms after its leader was killed");
        store::inject(LAB, StoreFault::Freeze).await?;
        let frozen = Instant::now();
        // Its leader acts until the process ends on "session expired".
        let stop_acting_ms = loop {
            if exited(second) {
                break frozen.elapsed().as_secs_f64() * 1000.0;
            }
            if frozen.elapsed() > PEER_SESSION_TTL * 2 {
                store::heal(LAB).await?;
                bail!(
                    "etcdctl elect still leading {:?} after the freeze",
                    PEER_SESSION_TTL * 2
                );
            }
            sleep(POLL).await;
        };
        eprintln!("peer: etcdctl elect's leader stopped {stop_acting_ms:.0} ms after the freeze");
        store::heal(LAB).await?;
        anyhow::Ok(PeerReport {
            takeover_ms,
            stop_acting_ms,
            session_ttl_ms: PEER_SESSION_TTL.as_millis() as u64,
        })
    }
    .await;
    reap(first, libc::SIGKILL);
    reap(second, libc::SIGKILL);
    outcome
}

/// Whether a child this process started has exited (and reaps it if so).
fn exited(pid: i32) -> bool {
    // SAFETY: waitpid on our own child, without blocking.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) == pid }
}

fn reap(pid: i32, signal: i32) {
    if processes::is_alive(pid) {
        // SAFETY: kill(2) and waitpid(2) on a child this process started.
        unsafe {
            libc::kill(pid, signal);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
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
