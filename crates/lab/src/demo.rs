//! `trellis lab demo`: seed 000 replayed on a lab. A gateway keeps answering pings and
//! WireGuard handshakes but stops forwarding new flows; Trellis's observers notice, the
//! gateway is replaced, traffic flows again, and after the fault is healed and the hold-down
//! has passed the gateway takes its share back. Every step is printed with its time since
//! the fault (or the heal), and a summary table closes the run.

use crate::bench::{SERVER_PORT, Server, Stream, connect_from};
use crate::fault::{self, Fault, FaultKind};
use crate::spec::LabParams;
use crate::state::LabState;
use crate::{build, check, state};
use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use trellis_model::{GatewayHealth, Granularity};

/// A new connection this often, from the other location's pods to a pod the faulty gateway
/// serves: the stream whose outage the demo measures.
const CONNECT_EVERY: Duration = Duration::from_millis(20);
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long the demo waits for a step before calling it failed.
const FAILOVER_LIMIT: Duration = Duration::from_secs(15);
const FAILBACK_LIMIT: Duration = Duration::from_secs(40);
/// How long a healed gateway must forward before it takes traffic back: the agents' default.
fn hold_down() -> Duration {
    Duration::from_millis(trellis_plan::health::DetectorConfig::default().hold_down_ms)
}

/// The incidents the demo replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seed {
    /// A gateway stops forwarding new flows while it still answers pings and handshakes.
    Gateway000,
    /// The store stops answering; the leader must stop without taking anything down.
    Lease001,
}

/// Replays one incident on a lab of its own, prints each step and a summary table, and
/// removes the lab, also when interrupted. `Ok(true)` when the demo passed.
pub async fn run(name: &str, granularity: Granularity, seed: Seed) -> anyhow::Result<bool> {
    let name = name.to_string();
    crate::spec::validate_lab_name(&name)?;
    if state::dir(&name).join("lab.json").exists() {
        println!("== removing a leftover lab {name}");
        build::teardown(&name)?;
    }
    // Ctrl-C must not leave a half-built lab behind: the teardown below always runs.
    let replay = async {
        anyhow::Ok(if seed == Seed::Lease001 {
            let s = crate::lease_demo::scenario(&name).await?;
            (s.table(), s.passed(), SEED_001_PASSED)
        } else {
            let s = scenario(&name, granularity).await?;
            (s.table(), s.passed(), SEED_000_PASSED)
        })
    };
    let result = tokio::select! {
        r = replay => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    println!("\n== trellis lab down --name {name}");
    match build::teardown(&name) {
        Ok(d) => println!(
            "removed {} namespaces and {} processes",
            d.namespaces, d.processes
        ),
        Err(e) => eprintln!("teardown failed: {e:#}"),
    }
    let (table, passed, success) = result?;
    println!("\n{table}");
    if passed {
        println!("{success}");
    } else {
        println!("demo FAILED: see the steps above");
    }
    Ok(passed)
}

const SEED_000_PASSED: &str = "demo passed: the gateway that stopped forwarding was routed around and took its share back after the hold-down";
const SEED_001_PASSED: &str = "demo passed: the leader stopped at its renew deadline, nothing else stopped, and a leader came back with the store";

/// What the demo saw, in milliseconds since the fault (failover part) or the heal
/// (failback part). `None`: did not happen within the limit.
#[derive(Default, Debug)]
struct Summary {
    pairs_ok: bool,
    gateway: String,
    served: String,
    fault: String,
    first_observer: Option<(u128, String)>,
    verdict_down: Option<u128>,
    replaced: Option<(u128, String)>,
    restored: Option<u128>,
    lost: usize,
    attempts: usize,
    observers_up: Option<u128>,
    failback: Option<u128>,
    lost_after_heal: usize,
    attempts_after_heal: usize,
}

impl Summary {
    fn passed(&self) -> bool {
        self.pairs_ok && self.restored.is_some() && self.failback.is_some()
    }

    fn table(&self) -> String {
        let ms = |v: Option<u128>| v.map_or("did not happen".to_string(), |v| format!("{v} ms"));
        let mut rows: Vec<(String, String)> = vec![
            (
                format!("fault: {} on gateway {}", self.fault, self.gateway),
                "t = 0".into(),
            ),
            (
                format!(
                    "first observer says it stopped forwarding ({})",
                    self.first_observer
                        .as_ref()
                        .map_or("-", |(_, o)| o.as_str())
                ),
                ms(self.first_observer.as_ref().map(|(t, _)| *t)),
            ),
            ("majority verdict: down".into(), ms(self.verdict_down)),
            (
                format!(
                    "gateway replaced (by {})",
                    self.replaced.as_ref().map_or("-", |(_, g)| g.as_str())
                ),
                ms(self.replaced.as_ref().map(|(t, _)| *t)),
            ),
            (
                format!("new connections to {}'s pod succeed again", self.served),
                ms(self.restored),
            ),
            (
                "connections lost".into(),
                format!("{} of {}", self.lost, self.attempts),
            ),
            ("fault healed".into(), "t = 0".into()),
            (
                "every observer sees it forward again".into(),
                ms(self.observers_up),
            ),
            (
                format!(
                    "failback: {} serves again (hold-down {} s)",
                    self.gateway,
                    hold_down().as_secs()
                ),
                ms(self.failback),
            ),
            (
                "connections lost during failback".into(),
                format!("{} of {}", self.lost_after_heal, self.attempts_after_heal),
            ),
        ];
        rows.push((
            "the same fault under Kilo (liveness only)".into(),
            "never detected: node Ready, handshakes fine".into(),
        ));
        summary_table(&rows)
    }
}

/// A demo's closing table: what happened, and when or how much.
pub(crate) fn summary_table(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{:width$}  {}\n", "SUMMARY", "");
    for (k, v) in rows {
        out.push_str(&format!("{k:width$}  {v}\n"));
    }
    out
}

/// Connection attempts (started, finished, succeeded), appended by the traffic task as
/// they finish.
type Attempts = Arc<Mutex<Vec<(Instant, Instant, bool)>>>;

/// The demos' lab: 6 nodes in 2 locations, 2 gateways each, brought up and checked
/// pair by pair, with each step printed. Returns the lab and whether every pair answered.
pub(crate) async fn up_and_check(
    name: &str,
    granularity: Granularity,
    store: crate::store::StoreKind,
) -> anyhow::Result<(LabState, bool)> {
    println!(
        "== trellis lab up --name {name} --nodes 6 --locations 2 --gateways 2 --granularity {granularity} --store {}",
        store.name()
    );
    let params = LabParams {
        name: name.to_string(),
        nodes: 6,
        locations: 2,
        granularity,
        gateways: 2,
        public_per_location: 2,
        pods_per_node: 1,
        agent_resync: 10,
        gateway_health: GatewayHealth::Forwarding,
        store,
    };
    let up = crate::up::up(&params, Duration::from_secs(60)).await?;
    println!("{}", crate::up::summary(&up));
    print!("{}", crate::status::show(name, false).await?);
    let lab = LabState::load(name)?;
    println!("\n== trellis lab check --name {name}   (ICMP between every pair of pods)");
    let report = check::all_pairs(&lab.spec, 3, Duration::from_secs(1)).await?;
    print!("{}", check::matrix(&report));
    Ok((lab, report.ok))
}

async fn scenario(name: &str, granularity: Granularity) -> anyhow::Result<Summary> {
    let (lab, pairs_ok) =
        up_and_check(name, granularity, crate::store::StoreKind::Embedded).await?;

    let store = crate::open_store(name)?;
    let view = View::load(store.as_ref()).await?;
    let Stream {
        served,
        gateway,
        server,
        clients,
    } = Stream::choose(&lab.spec, &view.serving, &lab.spec.locations[0].name)?;
    let mut summary = Summary {
        pairs_ok,
        gateway: gateway.clone(),
        served: served.clone(),
        ..Default::default()
    };
    let _server = Server::start(&server.netns).await?;
    let target = SocketAddr::V4(SocketAddrV4::new(server.ip.addr(), SERVER_PORT));
    println!(
        "\n== traffic: a new TCP connection every {} ms from the pods of the other location to {} ({}'s pod, served by gateway {gateway})",
        CONNECT_EVERY.as_millis(),
        server.ip.addr(),
        served
    );
    let attempts: Attempts = Arc::default();
    let traffic = tokio::spawn(generate(clients, target, attempts.clone()));
    let result = async {
        progress(&attempts, Instant::now(), Duration::from_secs(2), "before the fault").await;

        let fault = Fault::new(FaultKind::BlackholeForward, true, None)?;
        summary.fault = fault.to_string();
        println!(
            "\n== trellis lab fault --name {name} {gateway} {fault}   (seed 000: {gateway} still answers pings and handshakes, but drops every new flow it should forward)"
        );
        fault::inject(name, &gateway, fault).await?;
        let t0 = Instant::now();
        println!("  t = 0 at {}", wall_clock());
        failover(store.as_ref(), &attempts, t0, &mut summary).await?;

        println!("\n== trellis lab heal --name {name} {gateway}");
        fault::heal(name, &gateway).await?;
        let h0 = Instant::now();
        println!("  t = 0 at {}", wall_clock());
        failback(store.as_ref(), &attempts, h0, &mut summary).await?;
        let (lost, total) = tally(&attempts, By::Start, h0, Instant::now());
        summary.lost_after_heal = lost;
        summary.attempts_after_heal = total;
        anyhow::Ok(())
    }
    .await;
    traffic.abort();
    result?;
    Ok(summary)
}

/// Watch the store and the traffic until the faulty gateway is replaced and the stream
/// has been clean for a second, printing each step as it happens.
async fn failover(
    store: &dyn trellis_store::Store,
    attempts: &Attempts,
    t0: Instant,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let gateway = summary.gateway.clone();
    let since = |at: Instant| at.duration_since(t0).as_millis();
    let mut last_report = t0;
    while t0.elapsed() < FAILOVER_LIMIT {
        tokio::time::sleep(POLL_EVERY).await;
        let now = Instant::now();
        if let Ok(view) = View::load(store).await {
            if summary.first_observer.is_none()
                && let Some(o) = view.observers_down(&gateway).first()
            {
                println!(
                    "  +{:>5} ms  observer {o} sees {gateway} stop forwarding",
                    since(now)
                );
                summary.first_observer = Some((since(now), o.clone()));
            }
            if summary.verdict_down.is_none() && view.down.contains(&gateway) {
                let o = view.observers_down(&gateway).join(", ");
                println!(
                    "  +{:>5} ms  majority verdict: {gateway} is down (observers {o})",
                    since(now)
                );
                summary.verdict_down = Some(since(now));
            }
            if summary.replaced.is_none()
                && let Some(new) = view.serving.get(&summary.served)
                && *new != gateway
            {
                println!(
                    "  +{:>5} ms  {} is now served by {new}; {gateway} has left its slot",
                    since(now),
                    summary.served
                );
                summary.replaced = Some((since(now), new.clone()));
            }
        }
        if summary.restored.is_none()
            && let Some(restored) = restored_at(attempts, t0, now)
        {
            println!(
                "  +{:>5} ms  new connections succeed again (first success after the last failure; confirmed at +{} ms)",
                since(restored),
                since(now)
            );
            summary.restored = Some(since(restored));
        }
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            report_traffic(attempts, since(now), last_report, now, "in the last second");
            last_report = now;
        }
        if summary.replaced.is_some() && summary.restored.is_some() {
            break;
        }
    }
    let now = Instant::now();
    report_traffic(
        attempts,
        since(now),
        last_report,
        now,
        "since the last line",
    );
    let (lost, total) = tally(attempts, By::Start, t0, now);
    summary.lost = lost;
    summary.attempts = total;
    Ok(())
}

/// Watch the healed gateway come back: observers first, then (after the hold-down) its
/// slot, with the stream running throughout.
async fn failback(
    store: &dyn trellis_store::Store,
    attempts: &Attempts,
    h0: Instant,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let gateway = summary.gateway.clone();
    let since = |at: Instant| at.duration_since(h0).as_millis();
    let mut last_report = h0;
    let mut done_at = None;
    while h0.elapsed() < FAILBACK_LIMIT {
        tokio::time::sleep(POLL_EVERY).await;
        let now = Instant::now();
        if let Ok(view) = View::load(store).await {
            if summary.observers_up.is_none()
                && view.observers_down(&gateway).is_empty()
                && !view.down.contains(&gateway)
            {
                println!(
                    "  +{:>5} ms  every observer sees {gateway} forward again (it waited out the {} s hold-down)",
                    since(now),
                    hold_down().as_secs()
                );
                summary.observers_up = Some(since(now));
            }
            if summary.failback.is_none() && view.serving.get(&summary.served) == Some(&gateway) {
                println!(
                    "  +{:>5} ms  failback: {} is served by {gateway} again",
                    since(now),
                    summary.served
                );
                summary.failback = Some(since(now));
                done_at = Some(now);
            }
        }
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            report_traffic(attempts, since(now), last_report, now, "in the last second");
            last_report = now;
        }
        // keep the stream going a second past the failback, to see that it lost nothing
        if done_at.is_some_and(|d| now.duration_since(d) > Duration::from_secs(1)) {
            break;
        }
    }
    Ok(())
}

async fn progress(attempts: &Attempts, from: Instant, length: Duration, label: &str) {
    tokio::time::sleep(length).await;
    let (lost, total) = tally(attempts, By::Start, from, Instant::now());
    println!(
        "  traffic {label}: {}/{} new connections ok",
        total - lost,
        total
    );
}

/// New connections, one every [`CONNECT_EVERY`], from the clients in turn.
async fn generate(clients: Vec<String>, target: SocketAddr, attempts: Attempts) {
    let mut tick = tokio::time::interval(CONNECT_EVERY);
    for i in 0.. {
        tick.tick().await;
        let ns = clients[i % clients.len()].clone();
        let sink = attempts.clone();
        tokio::spawn(async move {
            let at = Instant::now();
            let ok = connect_from(&ns, target).await;
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, Instant::now(), ok));
        });
    }
}

/// Which end of an attempt places it in a time window.
#[derive(Clone, Copy)]
enum By {
    /// When it started: what a phase cost, once its attempts have finished.
    Start,
    /// When it finished: what the last second showed.
    End,
}

/// Failed and total attempts in [from, to).
fn tally(attempts: &Attempts, by: By, from: Instant, to: Instant) -> (usize, usize) {
    let a = attempts.lock().unwrap_or_else(|e| e.into_inner());
    let window: Vec<bool> = a
        .iter()
        .filter(|(start, end, _)| {
            let at = match by {
                By::Start => *start,
                By::End => *end,
            };
            at >= from && at < to
        })
        .map(|(_, _, ok)| *ok)
        .collect();
    (window.iter().filter(|ok| !**ok).count(), window.len())
}

/// One progress line: how the connections that finished since `from` fared.
fn report_traffic(attempts: &Attempts, elapsed_ms: u128, from: Instant, now: Instant, span: &str) {
    let (lost, total) = tally(attempts, By::End, from, now);
    println!(
        "  +{elapsed_ms:>5} ms  traffic: {} connections succeeded, {lost} failed (timed out) {span}",
        total - lost
    );
}

/// When the stream recovered: the first success after the last failure since `t0`, once
/// a further half second has gone by without failures (a connection may take up to its
/// timeout to fail, so only older attempts are trusted).
fn restored_at(attempts: &Attempts, t0: Instant, now: Instant) -> Option<Instant> {
    let a = attempts.lock().unwrap_or_else(|e| e.into_inner());
    let mut sorted: Vec<(Instant, bool)> = a
        .iter()
        .filter(|(at, _, _)| *at >= t0)
        .map(|(at, _, ok)| (*at, *ok))
        .collect();
    sorted.sort_by_key(|(at, _)| *at);
    let last_failure = sorted.iter().rev().find(|(_, ok)| !ok)?.0;
    let first_ok = sorted.iter().find(|(at, ok)| *ok && *at > last_failure)?.0;
    (now.duration_since(first_ok) > Duration::from_millis(500) + crate::bench::CONNECT_TIMEOUT)
        .then_some(first_ok)
}

/// What the store says now: verdicts, observer opinions and who serves whom.
struct View {
    down: std::collections::BTreeSet<String>,
    observations: BTreeMap<String, BTreeMap<String, bool>>,
    serving: BTreeMap<String, String>,
}

impl View {
    async fn load(store: &dyn trellis_store::Store) -> anyhow::Result<Self> {
        let cluster = trellis_agent::state::load(store).await?;
        let topology = cluster.topology(&trellis_plan::Settings::default());
        Ok(Self {
            down: topology.down,
            observations: cluster.observations.clone(),
            serving: topology.serving,
        })
    }

    fn observers_down(&self, gateway: &str) -> Vec<String> {
        self.observations
            .get(gateway)
            .into_iter()
            .flatten()
            .filter(|(_, up)| !**up)
            .map(|(o, _)| o.clone())
            .collect()
    }
}

/// UTC time of day with milliseconds, for lining the demo up with the agents' logs.
fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, ms) = (now.as_secs() % 86_400, now.subsec_millis());
    format!(
        "{:02}:{:02}:{:02}.{ms:03} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}
