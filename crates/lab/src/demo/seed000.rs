//! Seed 000: a gateway keeps answering pings and WireGuard handshakes but stops forwarding
//! new flows; Trellis's observers notice, the gateway is replaced, traffic flows again, and
//! after the fault is healed and the hold-down has passed the gateway takes its share back.
//! Every step is printed with its time since the fault (or the heal).

use super::lab::{summary_table, up_and_check, wall_clock};
use crate::bench::{SERVER_PORT, Servers, Stream, connect_from};
use crate::fault::{self, Fault, FaultKind};
use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use trellis_model::Granularity;

/// Connection attempts (started, finished, succeeded), appended by the traffic task as
/// they finish.
type Attempts = Arc<Mutex<Vec<(Instant, Instant, bool)>>>;

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

/// What the demo saw, in milliseconds since the fault (failover part) or the heal
/// (failback part); also the `--json` summary. `None` (`null`): did not happen within the
/// limit.
#[derive(Default, Debug, serde::Serialize)]
pub(super) struct Summary {
    /// Every pod reached every other before the fault.
    pairs_ok: bool,
    /// The gateway that stops forwarding new flows.
    gateway: String,
    /// The node whose pod the measured stream goes to, served by `gateway`.
    served: String,
    fault: String,
    first_observer: Option<String>,
    first_observer_ms: Option<u128>,
    verdict_down_ms: Option<u128>,
    /// The gateway that took `served` over.
    replaced_by: Option<String>,
    replaced_ms: Option<u128>,
    /// New connections to `served`'s pod succeed again.
    restored_ms: Option<u128>,
    connections_lost: usize,
    connections_attempted: usize,
    /// Since the heal: every observer sees `gateway` forward again.
    observers_up_ms: Option<u128>,
    /// Since the heal: `gateway` serves `served` again.
    failback_ms: Option<u128>,
    hold_down_ms: u128,
    connections_lost_after_heal: usize,
    connections_attempted_after_heal: usize,
}

impl Summary {
    pub(super) fn passed(&self) -> bool {
        self.pairs_ok && self.restored_ms.is_some() && self.failback_ms.is_some()
    }

    pub(super) fn table(&self) -> String {
        let ms = |v: Option<u128>| v.map_or("did not happen".to_string(), |v| format!("{v} ms"));
        let mut rows: Vec<(String, String)> = vec![
            (
                format!("fault: {} on gateway {}", self.fault, self.gateway),
                "t = 0".into(),
            ),
            (
                format!(
                    "first observer says it stopped forwarding ({})",
                    self.first_observer.as_deref().unwrap_or("-")
                ),
                ms(self.first_observer_ms),
            ),
            ("majority verdict: down".into(), ms(self.verdict_down_ms)),
            (
                format!(
                    "gateway replaced (by {})",
                    self.replaced_by.as_deref().unwrap_or("-")
                ),
                ms(self.replaced_ms),
            ),
            (
                format!("new connections to {}'s pod succeed again", self.served),
                ms(self.restored_ms),
            ),
            (
                "connections lost".into(),
                format!(
                    "{} of {}",
                    self.connections_lost, self.connections_attempted
                ),
            ),
            ("fault healed".into(), "t = 0".into()),
            (
                "every observer sees it forward again".into(),
                ms(self.observers_up_ms),
            ),
            (
                format!(
                    "failback: {} serves again (hold-down {} s)",
                    self.gateway,
                    hold_down().as_secs()
                ),
                ms(self.failback_ms),
            ),
            (
                "connections lost during failback".into(),
                format!(
                    "{} of {}",
                    self.connections_lost_after_heal, self.connections_attempted_after_heal
                ),
            ),
        ];
        rows.push((
            "the same fault under Kilo (liveness only)".into(),
            "never detected: node Ready, handshakes fine".into(),
        ));
        summary_table(&rows)
    }
}

pub(super) async fn scenario(name: &str, granularity: Granularity) -> anyhow::Result<Summary> {
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
        hold_down_ms: hold_down().as_millis(),
        ..Default::default()
    };
    let mut servers = Servers::default();
    servers.ensure(&server.netns).await?;
    let target = SocketAddr::V4(SocketAddrV4::new(server.ip.addr(), SERVER_PORT));
    say!(
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
        say!(
            "\n== trellis lab fault --name {name} {gateway} {fault}   (seed 000: {gateway} still answers pings and handshakes, but drops every new flow it should forward)"
        );
        fault::inject(name, &gateway, fault).await?;
        let t0 = Instant::now();
        say!("  t = 0 at {}", wall_clock());
        failover(store.as_ref(), &attempts, t0, &mut summary).await?;

        say!("\n== trellis lab heal --name {name} {gateway}");
        fault::heal(name, &gateway).await?;
        let h0 = Instant::now();
        say!("  t = 0 at {}", wall_clock());
        failback(store.as_ref(), &attempts, h0, &mut summary).await?;
        let (lost, total) = tally(&attempts, By::Start, h0, Instant::now());
        summary.connections_lost_after_heal = lost;
        summary.connections_attempted_after_heal = total;
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
                say!(
                    "  +{:>5} ms  observer {o} sees {gateway} stop forwarding",
                    since(now)
                );
                summary.first_observer = Some(o.clone());
                summary.first_observer_ms = Some(since(now));
            }
            if summary.verdict_down_ms.is_none() && view.down.contains(&gateway) {
                let o = view.observers_down(&gateway).join(", ");
                say!(
                    "  +{:>5} ms  majority verdict: {gateway} is down (observers {o})",
                    since(now)
                );
                summary.verdict_down_ms = Some(since(now));
            }
            if summary.replaced_by.is_none()
                && let Some(new) = view.serving.get(&summary.served)
                && *new != gateway
            {
                say!(
                    "  +{:>5} ms  {} is now served by {new}; {gateway} has left its slot",
                    since(now),
                    summary.served
                );
                summary.replaced_by = Some(new.clone());
                summary.replaced_ms = Some(since(now));
            }
        }
        if summary.restored_ms.is_none()
            && let Some(restored) = restored_at(attempts, t0, now)
        {
            say!(
                "  +{:>5} ms  new connections succeed again (first success after the last failure; confirmed at +{} ms)",
                since(restored),
                since(now)
            );
            summary.restored_ms = Some(since(restored));
        }
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            report_traffic(attempts, since(now), last_report, now, "in the last second");
            last_report = now;
        }
        if summary.replaced_by.is_some() && summary.restored_ms.is_some() {
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
    summary.connections_lost = lost;
    summary.connections_attempted = total;
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
            if summary.observers_up_ms.is_none()
                && view.observers_down(&gateway).is_empty()
                && !view.down.contains(&gateway)
            {
                say!(
                    "  +{:>5} ms  every observer sees {gateway} forward again (it waited out the {} s hold-down)",
                    since(now),
                    hold_down().as_secs()
                );
                summary.observers_up_ms = Some(since(now));
            }
            if summary.failback_ms.is_none() && view.serving.get(&summary.served) == Some(&gateway)
            {
                say!(
                    "  +{:>5} ms  failback: {} is served by {gateway} again",
                    since(now),
                    summary.served
                );
                summary.failback_ms = Some(since(now));
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
    say!(
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
    say!(
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
