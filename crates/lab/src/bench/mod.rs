//! `lab bench failover` (here) and `lab bench leadership` (in `leadership`).
//!
//! `lab bench failover`: how long new connections fail when a gateway breaks, with
//! forwarding probes and with liveness only (the Kilo model), measured in the same run.
//!
//! Per trial: a stream of new TCP connections, one every 10 ms, from the pods of the other
//! location to the pod of a node served by the gateway under test; the fault is injected
//! half a second in. Outage: from the injection to the end of the last failed attempt, so
//! it is the time until connections succeed again. Lost: failed attempts.

pub mod cni;
pub(crate) mod leadership;
mod peer;
pub mod policy;
pub mod proxy;
mod tcp;

pub use leadership::{LeadershipArgs, leadership, table as leadership_table};
pub(crate) use tcp::{CONNECT_TIMEOUT, SERVER_PORT, Servers, connect_from};

use crate::build;
use crate::fault::{self, Fault, FaultKind};
use crate::spec::LabParams;
use crate::state::LabState;
use crate::up::bring_up;
use anyhow::{Context, bail};
use serde::Serialize;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use trellis_model::{GatewayHealth, Granularity};

const ATTEMPT_EVERY: Duration = Duration::from_millis(10);
const BEFORE_FAULT: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub kind: String,
    pub baseline: bool,
    pub trials: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub lost: usize,
    /// Trials that had not recovered when the observation window closed (their outage is
    /// counted as the whole window).
    pub unrecovered: usize,
    /// Trials the rig could not run (an error of its own, not an outage), even when
    /// retried once; they are not in the percentiles.
    pub rig_errors: usize,
}

pub struct FailoverArgs {
    /// The lab's name; `None`: bff for the forwarding trials, bfl for the baseline.
    pub name: Option<String>,
    pub trials: usize,
    pub window: Duration,
    /// What breaks: gateways (with these fault kinds), or the direct path between two
    /// public nodes of different locations.
    pub target: Target,
    /// Run the forwarding-probe trials, the liveness-only baseline, or both.
    pub forwarding: bool,
    pub baseline: bool,
}

pub enum Target {
    Gateways(Vec<Fault>),
    /// `cut-path` between a public node of the first location and one of the second, on a
    /// `full` mesh, so they have a direct tunnel to lose.
    DirectPath,
}

pub fn default_kinds() -> Vec<Fault> {
    vec![
        Fault {
            kind: FaultKind::BlackholeForward,
            new_flows_only: false,
            percent: None,
            peer: None,
        },
        Fault {
            kind: FaultKind::BlackholeForward,
            new_flows_only: true,
            percent: None,
            peer: None,
        },
        Fault {
            kind: FaultKind::Kill,
            new_flows_only: false,
            percent: None,
            peer: None,
        },
        Fault {
            kind: FaultKind::Partition,
            new_flows_only: false,
            percent: None,
            peer: None,
        },
        Fault {
            kind: FaultKind::Loss,
            new_flows_only: false,
            percent: Some(60),
            peer: None,
        },
    ]
}

/// What a failover bench measured, and why it stopped early if it did: the rows measured
/// before that are kept.
pub struct Failover {
    pub rows: Vec<Row>,
    pub stopped: Option<anyhow::Error>,
}

pub async fn failover(args: &FailoverArgs) -> Failover {
    let mut out = Failover {
        rows: Vec::new(),
        stopped: None,
    };
    for (baseline, health) in [
        (false, GatewayHealth::Forwarding),
        (true, GatewayHealth::Liveness),
    ] {
        if (baseline && !args.baseline) || (!baseline && !args.forwarding) {
            continue;
        }
        // One lab at a time, so both modes may share a --name.
        let name = match &args.name {
            Some(n) => n.clone(),
            None if baseline => "bfl".into(),
            None => "bff".into(),
        };
        let _ = build::teardown(&name);
        let result = failover_mode(args, &name, baseline, health, &mut out.rows).await;
        let _ = build::teardown(&name);
        if let Err(e) = result {
            out.stopped = Some(e);
            break;
        }
    }
    out
}

/// One mode's trials on a lab of its own; each fault kind's row is pushed to `rows` as
/// soon as it is known, so a run cut short keeps them.
async fn failover_mode(
    args: &FailoverArgs,
    name: &str,
    baseline: bool,
    health: GatewayHealth,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let mode = if baseline { "liveness" } else { "forwarding" };
    let mut params = bench_lab(name, health);
    if matches!(args.target, Target::DirectPath) {
        params.granularity = Granularity::Full;
    }
    let spec = params.spec()?;
    let kinds = match &args.target {
        Target::Gateways(kinds) => kinds.clone(),
        Target::DirectPath => vec![Fault::cut_path(&direct_pair(&spec)?.1)],
    };
    bring_up(&spec, Duration::from_secs(60)).await?;
    // Detectors hold their verdicts for a start-up grace; the first trial should
    // not fall inside it while the others do not.
    let grace = trellis_plan::health::DetectorConfig::default().startup_grace_ms;
    tokio::time::sleep(Duration::from_millis(grace + 500)).await;
    let mut servers = Servers::default();
    for kind in &kinds {
        let mut outages = Vec::new();
        let (mut lost, mut unrecovered, mut rig_errors) = (0, 0, 0);
        for trial in 0..args.trials {
            let what = format!("{mode} {kind}: trial {}/{}", trial + 1, args.trials);
            let t = match retried_trial(args, &spec, kind, trial, &mut servers, &what).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{what}: not measured, an error of the rig: {e:#}");
                    rig_errors += 1;
                    continue;
                }
            };
            eprintln!(
                "{what}: outage {:.0} ms, {} connections lost{}",
                t.outage.as_secs_f64() * 1000.0,
                t.lost,
                if t.recovered {
                    ""
                } else {
                    " (not recovered in the window)"
                }
            );
            outages.push(t.outage.as_secs_f64() * 1000.0);
            lost += t.lost;
            unrecovered += usize::from(!t.recovered);
        }
        outages.sort_by(f64::total_cmp);
        let row = Row {
            kind: kind.to_string(),
            baseline,
            trials: outages.len(),
            p50_ms: percentile(&outages, 0.50),
            p95_ms: percentile(&outages, 0.95),
            p99_ms: percentile(&outages, 0.99),
            max_ms: outages.last().copied().unwrap_or(0.0),
            lost,
            unrecovered,
            rig_errors,
        };
        // each kind's row as soon as it is known: a long run cut short keeps them
        eprintln!(
            "{mode} {kind}: p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms, {lost} lost, {unrecovered} not recovered, {rig_errors} not measured",
            row.p50_ms, row.p95_ms, row.p99_ms, row.max_ms,
        );
        rows.push(row);
    }
    Ok(())
}

/// One trial; if the rig fails (not the mesh: an outage is a result), the fault is healed,
/// the mesh given time to settle, and the trial run once more.
async fn retried_trial(
    args: &FailoverArgs,
    spec: &crate::spec::LabSpec,
    kind: &Fault,
    trial: usize,
    servers: &mut Servers,
    what: &str,
) -> anyhow::Result<Trial> {
    let lab = spec.name.as_str();
    let mut last = None;
    for attempt in 0..2 {
        let scenario = match args.target {
            Target::Gateways(_) => Scenario::gateway(lab, kind, trial).await?,
            Target::DirectPath => Scenario::direct_path(spec, kind)?,
        };
        match run_trial(lab, &scenario, args.window, servers).await {
            Ok(t) => return Ok(t),
            Err(e) => {
                if attempt == 0 {
                    eprintln!("{what}: an error of the rig, retrying once: {e:#}");
                }
                let _ = settle(lab, &scenario.fault_node).await;
                last = Some(e.context(scenario.fault.to_string()));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt ran")))
}

/// The benchmarks' lab: two locations of three nodes, two of them public, two gateways each.
fn bench_lab(name: &str, gateway_health: GatewayHealth) -> LabParams {
    LabParams {
        name: name.to_string(),
        nodes: 6,
        locations: 2,
        granularity: Granularity::Location,
        gateways: 2,
        public_per_location: 2,
        pods_per_node: 1,
        agent_resync: 10,
        gateway_health,
        store: crate::store::StoreKind::Embedded,
        dual_stack: false,
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Trial {
    outage: Duration,
    lost: usize,
    recovered: bool,
}

/// A stream of new connections through one gateway: to the pod of a node of `location`
/// that the gateway serves, from the pods of the other locations.
pub(crate) struct Stream {
    pub served: String,
    pub gateway: String,
    pub server: crate::spec::PodSpec,
    /// Network namespaces of the client pods.
    pub clients: Vec<String>,
}

impl Stream {
    pub fn choose(
        spec: &crate::spec::LabSpec,
        serving: &std::collections::BTreeMap<String, String>,
        location: &str,
    ) -> anyhow::Result<Self> {
        let (served, gateway) = serving
            .iter()
            .find(|(n, _)| spec.node(n).is_ok_and(|s| s.location == location))
            .map(|(n, g)| (n.clone(), g.clone()))
            .with_context(|| format!("no node of {location} is served by a gateway"))?;
        let server = spec.node(&served)?.pods[0].clone();
        let clients = spec
            .nodes
            .iter()
            .filter(|n| n.location != location)
            .map(|n| n.pods[0].netns.clone())
            .collect();
        Ok(Self {
            served,
            gateway,
            server,
            clients,
        })
    }
}

/// One trial's setting: which node gets which fault, and the stream that measures it.
struct Scenario {
    fault_node: String,
    fault: Fault,
    server: crate::spec::PodSpec,
    /// Network namespaces of the client pods.
    clients: Vec<String>,
}

impl Scenario {
    /// The server: a node served by a gateway, in each location in turn; the fault goes
    /// into that gateway. Clients: the pods of the other locations.
    async fn gateway(lab: &str, kind: &Fault, trial: usize) -> anyhow::Result<Self> {
        let state = LabState::load(lab)?;
        let cluster = trellis_agent::state::load(crate::open_store(lab)?.as_ref()).await?;
        let topology = cluster.topology(&trellis_plan::Settings::default());
        let location = &state.spec.locations[trial % state.spec.locations.len()].name;
        let stream = Stream::choose(&state.spec, &topology.serving, location)?;
        Ok(Self {
            fault_node: stream.gateway,
            fault: kind.clone(),
            server: stream.server,
            clients: stream.clients,
        })
    }

    /// The direct tunnel between two public nodes of different locations is cut; the
    /// stream runs between their pods.
    fn direct_path(spec: &crate::spec::LabSpec, cut: &Fault) -> anyhow::Result<Self> {
        let (from, to) = direct_pair(spec)?;
        Ok(Self {
            fault_node: from.clone(),
            fault: cut.clone(),
            server: spec.node(&to)?.pods[0].clone(),
            clients: vec![spec.node(&from)?.pods[0].netns.clone()],
        })
    }
}

/// The first public node of the first location and of the second.
fn direct_pair(spec: &crate::spec::LabSpec) -> anyhow::Result<(String, String)> {
    let public_of = |location: &str| {
        spec.nodes
            .iter()
            .find(|n| n.location == location && n.public_ip.is_some())
            .map(|n| n.name.clone())
            .with_context(|| format!("no public node in {location}"))
    };
    match spec.locations.as_slice() {
        [a, b, ..] => Ok((public_of(&a.name)?, public_of(&b.name)?)),
        _ => bail!("a direct path needs two locations"),
    }
}

async fn run_trial(
    lab: &str,
    scenario: &Scenario,
    window: Duration,
    servers: &mut Servers,
) -> anyhow::Result<Trial> {
    let Scenario {
        fault_node,
        fault: kind,
        server: server_pod,
        clients,
    } = scenario;
    servers.ensure(&server_pod.netns).await?;
    let target = SocketAddr::V4(SocketAddrV4::new(server_pod.ip.addr(), SERVER_PORT));

    let start = Instant::now();
    let fault_at = start + BEFORE_FAULT;
    let results: Arc<tokio::sync::Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let mut attempts = tokio::time::interval(ATTEMPT_EVERY);
    let mut injected = false;
    let mut i = 0usize;
    let end = fault_at + window;
    while Instant::now() < end {
        attempts.tick().await;
        if !injected && Instant::now() >= fault_at {
            fault::inject(lab, fault_node, kind.clone()).await?;
            injected = true;
        }
        let ns = clients[i % clients.len()].clone();
        i += 1;
        let sink = results.clone();
        tokio::spawn(async move {
            let at = Instant::now();
            let ok = connect_from(&ns, target).await;
            sink.lock().await.push((at, ok));
        });
        // Stop early once the stream has succeeded for a second after the fault.
        let r = results.lock().await;
        let since = Instant::now() - Duration::from_secs(1) - CONNECT_TIMEOUT;
        if injected
            && since > fault_at
            && r.iter().filter(|(at, _)| *at >= since).all(|(_, ok)| *ok)
            && r.iter().any(|(at, _)| *at >= since)
        {
            break;
        }
    }
    tokio::time::sleep(CONNECT_TIMEOUT + Duration::from_millis(100)).await;
    let r = results.lock().await.clone();
    let failures: Vec<Instant> = r
        .iter()
        .filter(|(at, ok)| !ok && *at >= fault_at - ATTEMPT_EVERY)
        .map(|(at, _)| *at)
        .collect();
    let lost = r.iter().filter(|(_, ok)| !ok).count();
    let last_failure = failures.iter().max().copied();
    let recovered = match last_failure {
        None => true,
        Some(last) => r.iter().any(|(at, ok)| *ok && *at > last),
    };
    let outage = match last_failure {
        None => Duration::ZERO,
        Some(_) if !recovered => window,
        Some(last) => (last + ATTEMPT_EVERY).saturating_duration_since(fault_at),
    };

    settle(lab, fault_node).await?;
    Ok(Trial {
        outage,
        lost,
        recovered,
    })
}

/// Heal, and wait until every candidate forwards again (after the hold-down, or longer
/// if its flapping is being damped) and the mesh has converged, so trials start alike.
async fn settle(lab: &str, fault_node: &str) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    fault::heal(lab, fault_node).await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let store = crate::open_store(lab)?;
        let cluster = trellis_agent::state::load(store.as_ref()).await?;
        let inputs = cluster.plan_inputs(&trellis_plan::Settings::default());
        let all_up = inputs.measured_down().is_empty()
            && inputs.broken_paths().is_empty()
            && trellis_plan::health::candidates(inputs.nodes.values())
                .iter()
                .all(|c| {
                    cluster
                        .observations
                        .get(&c.name)
                        .is_none_or(|o| o.values().all(|up| *up))
                });
        if all_up
            && crate::up::converged(store.as_ref(), &state.spec)
                .await?
                .is_none()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the mesh did not fully recover within 180 s of healing {fault_node}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | health | trials | p50 ms | p95 ms | p99 ms | max ms | lost connections | not recovered |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |\n",
            r.kind,
            if r.baseline {
                "liveness only (baseline)"
            } else {
                "forwarding probes"
            },
            r.trials,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            r.lost,
            r.unrecovered
        ));
    }
    // Rare, so not a column: a row's trials column already counts only measured trials.
    for r in rows.iter().filter(|r| r.rig_errors > 0) {
        out.push_str(&format!(
            "\n{} ({}): {} trial{} not measured (errors of the rig, not outages)",
            r.kind,
            if r.baseline { "liveness" } else { "forwarding" },
            r.rig_errors,
            if r.rig_errors == 1 { "" } else { "s" }
        ));
    }
    if rows.iter().any(|r| r.rig_errors > 0) {
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Serialize)]
pub struct FalseFailover {
    pub minutes: f64,
    pub loss_percent: u8,
    /// Times a location's set of active gateways changed.
    pub gateway_changes: usize,
    /// Times a majority verdict said a gateway was down.
    pub verdicts_down: usize,
    /// Times a single observer's opinion went down (outvoted unless the verdict followed).
    pub observer_downs: usize,
    /// Times a direct path was held broken and relayed (a false fallback).
    pub path_breaks: usize,
}

/// Random loss on every link of every node for `duration`; count gateway changes (the
/// target is none) and the single observers' false alarms that the majority absorbed.
pub async fn false_failover(
    name: &str,
    duration: Duration,
    loss: u8,
) -> anyhow::Result<FalseFailover> {
    let _ = build::teardown(name);
    let spec = bench_lab(name, GatewayHealth::Forwarding).spec()?;
    let result = async {
        bring_up(&spec, Duration::from_secs(60)).await?;
        let fault = Fault::new(FaultKind::Loss, false, Some(loss))?;
        for node in &spec.nodes {
            fault::inject(name, &node.name, fault.clone()).await?;
        }
        let store = crate::open_store(name)?;
        let mut last_gateways = None;
        let mut last_down = std::collections::BTreeSet::new();
        let mut last_opinions: std::collections::BTreeMap<(String, String), bool> =
            Default::default();
        let mut report = FalseFailover {
            minutes: duration.as_secs_f64() / 60.0,
            loss_percent: loss,
            gateway_changes: 0,
            verdicts_down: 0,
            observer_downs: 0,
            path_breaks: 0,
        };
        let mut last_broken = std::collections::BTreeSet::new();
        let started = Instant::now();
        let end = started + duration;
        let mut next_progress = started + Duration::from_secs(60);
        while Instant::now() < end {
            if Instant::now() >= next_progress {
                eprintln!(
                    "{:.0} min: {} gateway changes, {} verdicts down, {} single-observer downs, {} path breaks so far",
                    started.elapsed().as_secs_f64() / 60.0,
                    report.gateway_changes,
                    report.verdicts_down,
                    report.observer_downs,
                    report.path_breaks
                );
                next_progress += Duration::from_secs(60);
            }
            // The store is local (a Unix socket), so sampling it is not affected by the loss.
            if let Ok(cluster) = trellis_agent::state::load(store.as_ref()).await {
                let inputs = cluster.plan_inputs(&trellis_plan::Settings::default());
                let topology = inputs.topology();
                let gateways = topology.gateways;
                if last_gateways.as_ref().is_some_and(|g| *g != gateways) {
                    report.gateway_changes += 1;
                    eprintln!("gateway change: {gateways:?}");
                }
                last_gateways = Some(gateways);
                let broken = inputs.broken_paths();
                report.path_breaks += broken.difference(&last_broken).count();
                last_broken = broken;
                let down = topology.down;
                report.verdicts_down += down.difference(&last_down).count();
                last_down = down;
                for (g, seen) in &cluster.observations {
                    for (o, up) in seen {
                        let before = last_opinions.insert((g.clone(), o.clone()), *up);
                        if before == Some(true) && !up {
                            report.observer_downs += 1;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(report)
    }
    .await;
    let _ = build::teardown(name);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 10.0);
        assert_eq!(percentile(&v, 0.95), 19.0);
        assert_eq!(percentile(&v, 0.99), 20.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn trials_the_rig_failed_are_noted_under_the_table() {
        let row = |rig_errors| Row {
            kind: "kill".into(),
            baseline: false,
            trials: 2,
            p50_ms: 400.0,
            p95_ms: 500.0,
            p99_ms: 500.0,
            max_ms: 500.0,
            lost: 80,
            unrecovered: 0,
            rig_errors,
        };
        assert!(!table(&[row(0)]).contains("not measured"));
        let t = table(&[row(0), row(1)]);
        assert!(t.contains("| kill | forwarding probes | 2 | 400 |"), "{t}");
        assert!(
            t.ends_with(
                "\nkill (forwarding): 1 trial not measured (errors of the rig, not outages)\n"
            ),
            "{t}"
        );
    }
}
