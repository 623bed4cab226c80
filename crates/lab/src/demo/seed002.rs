//! Seed 002: kube-proxy in IPVS mode kept real servers pointing at dead pods and retried
//! deleting them forever, while connections went to pods that no longer existed. Replayed:
//! a Service with backends in both locations, under a steady stream of new connections from
//! pods of both locations. One backend pod is deleted: its endpoint goes terminating (it
//! still serves), every proxy stops giving it new connections, then it exits and its
//! endpoint goes away, and no connection fails. Then another node's proxy rules are
//! tampered with from outside, sending the Service to the dead pod's address: that node's
//! proxy, which trusts only the kernel, finds the drift in its next audit and repairs it,
//! and no connection fails after that. Every step is printed with its time.

use super::lab::{summary_table, up_and_check_with, wall_clock};
use crate::fault;
use crate::pods::{self, ECHO_PORT, Failure, L4};
use crate::service::{self, Conditions, Request, Type};
use crate::state::LabState;
use crate::store::StoreKind;
use anyhow::Context;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep};
use trellis_model::Granularity;

const SERVICE: &str = "web";
const PORT: u16 = 80;
/// Two backends in each location.
const BACKENDS: [&str; 4] = ["a1-p0", "a2-p0", "b1-p0", "b2-p0"];
/// One client pod in each location.
const CLIENTS: [&str; 2] = ["a3-p0", "b3-p0"];
/// The backend pod that is deleted.
const VICTIM: &str = "b1-p0";
/// The node whose proxy rules are tampered with: a client's, so its traffic shows it.
const TAMPERED: &str = "a3";
/// The agents' resync, and so their proxies' audit, interval in this lab (seconds).
const AUDIT_EVERY_S: u64 = 2;
/// A new connection this often, from the clients in turn.
const CONNECT_EVERY: Duration = Duration::from_millis(10);
/// A connection not answered within this long has failed.
const TIMEOUT: Duration = Duration::from_millis(1000);
const POLL: Duration = Duration::from_millis(20);
/// How long no new connection may reach the deleted pod before it counts as out of
/// rotation everywhere.
const QUIET: Duration = Duration::from_millis(1500);
/// Steady traffic before anything happens.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long the demo waits for a step before calling it failed.
const STEP_LIMIT: Duration = Duration::from_secs(15);
/// The agents' counter of repaired differences.
const DRIFT_METRIC: &str = "trellis_proxy_drift_repaired_total";

/// One connection: which client, when it started and ended, who answered or why not.
struct Attempt {
    client: usize,
    start: Instant,
    end: Instant,
    result: Result<String, Failure>,
}

type Attempts = Arc<Mutex<Vec<Attempt>>>;

/// What the demo saw, in milliseconds since the pod's deletion (pod part) or the
/// tampering (proxy part); also the `--json` summary. `None` (`null`): did not happen
/// within the limit.
#[derive(Default, Debug, serde::Serialize)]
pub(super) struct Summary {
    /// Every pod reached every other before the Service was added.
    pairs_ok: bool,
    service: String,
    cluster_ip: String,
    backends: Vec<String>,
    clients: Vec<String>,
    /// Before the deletion, every backend answered both clients.
    every_backend_reached: bool,
    /// The backend pod that is deleted.
    victim: String,
    /// Start of the last new connection the deleted pod answered, after its endpoint went
    /// terminating (0: none reached it after that).
    stopped_ms: Option<u128>,
    /// New connections it answered after its endpoint went terminating (it still served).
    answered_while_terminating: usize,
    /// The pod exited and its endpoint was removed from the slice.
    removed_ms: Option<u128>,
    /// New connections from the deletion to the end of that phase, and how many failed.
    connections_attempted_pod_deleted: usize,
    connections_failed_pod_deleted: usize,
    /// The node whose rules were tampered with, and what was done.
    tampered_node: String,
    tamper: String,
    audit_interval_s: u64,
    /// The tampered node's proxy repaired the drift (its drift counter went up).
    repaired_ms: Option<u128>,
    drift_repaired: u64,
    /// New connections between the tampering and the repair, and how many failed (those
    /// from the tampered node's pod went to the dead pod's address).
    connections_attempted_before_repair: usize,
    connections_failed_before_repair: usize,
    /// Of those failures, the ones from clients on other nodes (target 0).
    connections_failed_before_repair_elsewhere: usize,
    /// New connections after the repair, and how many failed (target 0).
    connections_attempted_after_repair: usize,
    connections_failed_after_repair: usize,
    /// After the repair, new connections the dead pod's address got (target 0).
    answered_by_victim_after_repair: usize,
}

impl Summary {
    pub(super) fn passed(&self) -> bool {
        self.pairs_ok
            && self.every_backend_reached
            && self.stopped_ms.is_some()
            && self.removed_ms.is_some()
            && self.connections_failed_pod_deleted == 0
            && self.repaired_ms.is_some()
            && self.connections_attempted_after_repair > 0
            && self.connections_failed_after_repair == 0
    }

    pub(super) fn table(&self) -> String {
        let ms = |v: Option<u128>| v.map_or("did not happen".to_string(), |v| format!("{v} ms"));
        let rows: Vec<(String, String)> = vec![
            (
                format!(
                    "service {} ({}:{PORT}), backends {}; clients {}",
                    self.service,
                    self.cluster_ip,
                    self.backends.join(","),
                    self.clients.join(",")
                ),
                if self.every_backend_reached {
                    "every backend answered both".into()
                } else {
                    "NOT every backend answered".into()
                },
            ),
            (
                format!(
                    "{} deleted: endpoint terminating (ready false, serving true)",
                    self.victim
                ),
                "t = 0".into(),
            ),
            (
                format!(
                    "new connections stop going to {} ({} reached it after t = 0)",
                    self.victim, self.answered_while_terminating
                ),
                ms(self.stopped_ms),
            ),
            (
                format!("{} exits, its endpoint removed", self.victim),
                ms(self.removed_ms),
            ),
            (
                "connections that failed meanwhile".into(),
                format!(
                    "{} of {}",
                    self.connections_failed_pod_deleted, self.connections_attempted_pod_deleted
                ),
            ),
            (
                format!(
                    "{}'s rules tampered with: {} sent to the dead pod",
                    self.tampered_node, self.service
                ),
                "t = 0".into(),
            ),
            (
                format!(
                    "drift found and repaired by {}'s proxy (audit every {} s, {} differences)",
                    self.tampered_node, self.audit_interval_s, self.drift_repaired
                ),
                ms(self.repaired_ms),
            ),
            (
                format!(
                    "connections that failed until the repair (from other nodes: {})",
                    self.connections_failed_before_repair_elsewhere
                ),
                format!(
                    "{} of {}",
                    self.connections_failed_before_repair, self.connections_attempted_before_repair
                ),
            ),
            (
                "connections that failed after the repair".into(),
                format!(
                    "{} of {}",
                    self.connections_failed_after_repair, self.connections_attempted_after_repair
                ),
            ),
            (
                "the same under kube-proxy in IPVS mode (seed 002)".into(),
                "dead pods kept as real servers, deletes retried forever".into(),
            ),
        ];
        summary_table(&rows)
    }
}

pub(super) async fn scenario(name: &str) -> anyhow::Result<Summary> {
    let (lab, pairs_ok) = up_and_check_with(
        name,
        Granularity::Location,
        StoreKind::Embedded,
        AUDIT_EVERY_S,
    )
    .await?;
    let mut summary = Summary {
        pairs_ok,
        service: SERVICE.into(),
        backends: BACKENDS.map(String::from).to_vec(),
        clients: CLIENTS.map(String::from).to_vec(),
        victim: VICTIM.into(),
        tampered_node: TAMPERED.into(),
        audit_interval_s: AUDIT_EVERY_S,
        ..Summary::default()
    };
    say!(
        "\n== trellis lab service add {SERVICE} --port {PORT} --backends {} --name {name}",
        BACKENDS.join(",")
    );
    let added = service::add(
        name,
        &Request {
            name: SERVICE.into(),
            port: PORT.into(),
            target_port: None,
            protocol: L4::Tcp,
            type_: Type::ClusterIP,
            backends: BACKENDS.map(String::from).to_vec(),
            affinity: false,
            external_traffic_policy: None,
            internal_traffic_policy: None,
            families: Default::default(),
        },
    )
    .await?;
    let cluster_ip = added.cluster_ip.context("the service has no ClusterIP")?;
    summary.cluster_ip = cluster_ip.to_string();
    say!(
        "service {SERVICE}: ClusterIP {cluster_ip}, port {PORT}/TCP to the pods' echo port {ECHO_PORT}; 4 ready endpoints, 2 per location; every agent's proxy programs it"
    );
    let target = SocketAddr::new(cluster_ip, PORT);
    let clients = CLIENTS
        .iter()
        .map(|c| pods::client_netns(&lab.spec, c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    say!(
        "\n== traffic: a new TCP connection every {} ms, in turn from {} (site-a) and {} (site-b), to {target}; each answer names the pod that served it",
        CONNECT_EVERY.as_millis(),
        CLIENTS[0],
        CLIENTS[1]
    );
    let attempts: Attempts = Arc::default();
    let traffic = tokio::spawn(generate(clients, target, attempts.clone()));
    let result = steps(name, &lab, &attempts, &mut summary).await;
    traffic.abort();
    result?;
    Ok(summary)
}

async fn steps(
    name: &str,
    lab: &LabState,
    attempts: &Attempts,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    // Every backend answers both clients.
    let start = Instant::now();
    while start.elapsed() < STEP_LIMIT {
        sleep(POLL).await;
        let all = (0..CLIENTS.len()).all(|c| {
            let by = answers(attempts, start, Instant::now(), Some(c));
            BACKENDS.iter().all(|b| by.contains_key(*b))
        });
        if all && start.elapsed() >= WARM_UP {
            summary.every_backend_reached = true;
            break;
        }
    }
    let now = Instant::now();
    for (c, client) in CLIENTS.iter().enumerate() {
        let (failed, _) = failures(attempts, start, now, Some(c));
        say!(
            "  +{:>5} ms  {client} reached {}{}",
            ms_since(start, now),
            listed(&answers(attempts, start, now, Some(c))),
            if failed > 0 {
                format!(
                    "; {failed} failed ({})",
                    listed(&failure_kinds(attempts, start, now, Some(c)))
                )
            } else {
                String::new()
            }
        );
    }
    if !summary.every_backend_reached {
        say!(
            "  not every backend answered both clients within {} s",
            STEP_LIMIT.as_secs()
        );
        return Ok(());
    }

    // The victim is deleted: its endpoint goes terminating, then away.
    say!(
        "\n== {VICTIM} is deleted: its endpoint goes terminating (ready false, serving true, terminating true) while it finishes its work; it still answers"
    );
    let with = |victim: Option<Conditions>| -> Vec<(&str, Conditions)> {
        BACKENDS
            .iter()
            .filter_map(|b| match (*b == VICTIM, victim) {
                (true, Some(c)) => Some((*b, c)),
                (true, None) => None,
                (false, _) => Some((*b, Conditions::READY)),
            })
            .collect()
    };
    service::set_endpoints(name, SERVICE, &with(Some(Conditions::TERMINATING))).await?;
    let t0 = Instant::now();
    say!("  t = 0 at {}", wall_clock());
    while t0.elapsed() < STEP_LIMIT {
        sleep(POLL).await;
        let now = Instant::now();
        let last = last_answer_by(attempts, VICTIM, t0);
        let quiet_since = last.unwrap_or(t0);
        if now.duration_since(quiet_since) < QUIET {
            continue;
        }
        let reached = count(attempts, t0, now, |a| answered(a, VICTIM));
        let since_last = count(attempts, quiet_since, now, |_| true);
        let ms = ms_since(t0, quiet_since);
        match last {
            Some(_) => say!(
                "  +{ms:>5} ms  the last new connection {VICTIM} answered started here ({reached} reached it after t = 0, while the proxies took the change); none of the {since_last} since went to it"
            ),
            None => say!(
                "  +{ms:>5} ms  no new connection went to {VICTIM} after t = 0 (none of {since_last})"
            ),
        }
        summary.stopped_ms = Some(ms);
        summary.answered_while_terminating = reached;
        break;
    }

    say!("\n== {VICTIM} exits: its interface is gone, nothing answers at its address any more");
    pods::cut(name, VICTIM).await?;
    say!("  +{:>5} ms  {VICTIM} is gone", t0.elapsed().as_millis());
    service::set_endpoints(name, SERVICE, &with(None)).await?;
    let removed = Instant::now();
    summary.removed_ms = Some(ms_since(t0, removed));
    say!(
        "  +{:>5} ms  its endpoint is removed from the EndpointSlice ({} endpoints left)",
        ms_since(t0, removed),
        BACKENDS.len() - 1
    );
    sleep(Duration::from_secs(1)).await;
    let end = Instant::now();
    // Attempts end within their timeout: wait for the last ones before counting.
    sleep(TIMEOUT + Duration::from_millis(200)).await;
    let (failed, total) = failures(attempts, t0, end, None);
    summary.connections_failed_pod_deleted = failed;
    summary.connections_attempted_pod_deleted = total;
    say!(
        "  +{:>5} ms  since t = 0: {total} new connections, {failed} failed; answered by {}",
        ms_since(t0, end),
        listed(&answers(attempts, t0, end, None))
    );

    // Another node's rules are tampered with.
    let victim_ip = lab
        .spec
        .all_pods()
        .find(|(_, p)| p.name == VICTIM)
        .map(|(_, p)| p.ip.addr())
        .context("the victim pod")?;
    let base = drift_repaired(name).await?;
    say!(
        "\n== trellis lab fault --name {name} {TAMPERED} proxy-tamper   (seed 002: from outside, {TAMPERED}'s rules now send {SERVICE} to the dead pod {VICTIM} at {victim_ip}, as IPVS kept dead pods as real servers)"
    );
    let tampered = fault::tamper_proxy(name, TAMPERED, Some(victim_ip)).await?;
    let t1 = Instant::now();
    say!("  t = 0 at {}", wall_clock());
    say!("  {tampered}");
    summary.tamper = tampered.to_string();
    let tampered_client = CLIENTS
        .iter()
        .position(|c| c.starts_with(&format!("{TAMPERED}-")));
    let limit = Duration::from_secs(3 * AUDIT_EVERY_S + 5);
    let mut last_report = t1;
    let mut repaired_at = None;
    while t1.elapsed() < limit {
        sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        if let Ok(value) = drift_repaired(name).await
            && value > base
        {
            summary.repaired_ms = Some(ms_since(t1, now));
            summary.drift_repaired = value - base;
            say!(
                "  +{:>5} ms  {TAMPERED}'s proxy audit read its table back, found the drift and repaired it ({DRIFT_METRIC} {base} -> {value})",
                ms_since(t1, now)
            );
            repaired_at = Some(now);
            break;
        }
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            for (c, client) in CLIENTS.iter().enumerate() {
                let (failed, total) = finished(attempts, last_report, now, c);
                say!(
                    "  +{:>5} ms  {client}: {} connections answered, {failed} failed{} in the last second",
                    ms_since(t1, now),
                    total - failed,
                    if Some(c) == tampered_client && failed > 0 {
                        " (sent to the dead pod, timed out)"
                    } else {
                        ""
                    }
                );
            }
            last_report = now;
        }
    }
    let Some(repaired_at) = repaired_at else {
        say!("  the drift was not repaired within {} s", limit.as_secs());
        return Ok(());
    };
    if fault::proxy_repaired(name, TAMPERED).await? {
        say!(
            "  the table read back over netlink: the foreign chain is gone, every service chain has its rules again"
        );
    }
    sleep(Duration::from_secs(2)).await;
    let end = Instant::now();
    sleep(TIMEOUT + Duration::from_millis(200)).await;
    let (failed, total) = failures(attempts, t1, repaired_at, None);
    summary.connections_failed_before_repair = failed;
    summary.connections_attempted_before_repair = total;
    summary.connections_failed_before_repair_elsewhere = (0..CLIENTS.len())
        .filter(|c| Some(*c) != tampered_client)
        .map(|c| failures(attempts, t1, repaired_at, Some(c)).0)
        .sum();
    let (failed, total) = failures(attempts, repaired_at, end, None);
    summary.connections_failed_after_repair = failed;
    summary.connections_attempted_after_repair = total;
    summary.answered_by_victim_after_repair =
        count(attempts, repaired_at, end, |a| answered(a, VICTIM));
    say!(
        "  +{:>5} ms  since the repair: {total} new connections, {failed} failed; answered by {}",
        ms_since(t1, end),
        listed(&answers(attempts, repaired_at, end, None))
    );
    say!("\n== trellis lab heal --name {name} {TAMPERED}");
    fault::heal(name, TAMPERED).await?;
    say!("{TAMPERED}: proxy-tamper: nothing to undo, its proxy repaired the rules itself");
    Ok(())
}

/// New connections, one every [`CONNECT_EVERY`], from the clients in turn.
async fn generate(clients: Vec<String>, target: SocketAddr, attempts: Attempts) {
    let mut tick = tokio::time::interval(CONNECT_EVERY);
    for i in 0.. {
        tick.tick().await;
        let client = i % clients.len();
        let ns = clients[client].clone();
        let sink = attempts.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let result = pods::echo(&ns, target, L4::Tcp, TIMEOUT).await;
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Attempt {
                    client,
                    start,
                    end: Instant::now(),
                    result,
                });
        });
    }
}

fn ms_since(from: Instant, at: Instant) -> u128 {
    at.saturating_duration_since(from).as_millis()
}

fn answered(a: &Attempt, pod: &str) -> bool {
    a.result.as_deref() == Ok(pod)
}

/// Attempts started in [from, to) that `keep`.
fn count(
    attempts: &Attempts,
    from: Instant,
    to: Instant,
    keep: impl Fn(&Attempt) -> bool,
) -> usize {
    let a = attempts.lock().unwrap_or_else(|e| e.into_inner());
    a.iter()
        .filter(|a| a.start >= from && a.start < to && keep(a))
        .count()
}

/// Failed and total attempts started in [from, to), of one client or all.
fn failures(
    attempts: &Attempts,
    from: Instant,
    to: Instant,
    client: Option<usize>,
) -> (usize, usize) {
    let of_client = |a: &Attempt| client.is_none_or(|c| a.client == c);
    (
        count(attempts, from, to, |a| of_client(a) && a.result.is_err()),
        count(attempts, from, to, of_client),
    )
}

/// Failed and total attempts of one client that ended in [from, to).
fn finished(attempts: &Attempts, from: Instant, to: Instant, client: usize) -> (usize, usize) {
    let a = attempts.lock().unwrap_or_else(|e| e.into_inner());
    let of = |a: &&Attempt| a.client == client && a.end >= from && a.end < to;
    (
        a.iter().filter(of).filter(|a| a.result.is_err()).count(),
        a.iter().filter(of).count(),
    )
}

/// Answers per pod among attempts started in [from, to), of one client or all.
fn answers(
    attempts: &Attempts,
    from: Instant,
    to: Instant,
    client: Option<usize>,
) -> BTreeMap<String, usize> {
    tally(attempts, from, to, client, |r| r.as_ref().ok().cloned())
}

/// Failures per kind among attempts started in [from, to), of one client or all.
fn failure_kinds(
    attempts: &Attempts,
    from: Instant,
    to: Instant,
    client: Option<usize>,
) -> BTreeMap<String, usize> {
    tally(attempts, from, to, client, |r| {
        r.as_ref().err().map(ToString::to_string)
    })
}

/// Attempts started in [from, to), of one client or all, counted by what `label` makes
/// of their outcome (left out when it makes nothing).
fn tally(
    attempts: &Attempts,
    from: Instant,
    to: Instant,
    client: Option<usize>,
    label: impl Fn(&Result<String, Failure>) -> Option<String>,
) -> BTreeMap<String, usize> {
    let a = attempts.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = BTreeMap::new();
    for a in a.iter() {
        if a.start >= from
            && a.start < to
            && client.is_none_or(|c| a.client == c)
            && let Some(key) = label(&a.result)
        {
            *out.entry(key).or_insert(0) += 1;
        }
    }
    out
}

/// When the last connection `pod` answered, among those started since `from`, started.
fn last_answer_by(attempts: &Attempts, pod: &str, from: Instant) -> Option<Instant> {
    let a = attempts.lock().unwrap_or_else(|e| e.into_inner());
    a.iter()
        .filter(|a| a.start >= from && answered(a, pod))
        .map(|a| a.start)
        .max()
}

fn listed(answers: &BTreeMap<String, usize>) -> String {
    if answers.is_empty() {
        return "nobody".into();
    }
    answers
        .iter()
        .map(|(pod, n)| format!("{pod} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tampered node's drift counter, from its agent's metrics.
async fn drift_repaired(name: &str) -> anyhow::Result<u64> {
    let lab = LabState::load(name)?;
    let text = crate::agent_admin::metrics(&lab, TAMPERED).await?;
    Ok(metric_sum(&text, DRIFT_METRIC) as u64)
}

/// The sum of the samples of one metric in OpenMetrics text.
pub(crate) fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_by_exact_name() {
        let text = "# TYPE trellis_proxy_drift_repaired counter\n\
                    trellis_proxy_drift_repaired_total{node=\"a3\"} 4\n\
                    trellis_proxy_drift_repaired_total_x 9\n";
        assert_eq!(metric_sum(text, DRIFT_METRIC), 4.0);
    }

    #[test]
    fn the_victim_is_a_backend_and_the_tampered_node_a_clients() {
        assert!(BACKENDS.contains(&VICTIM));
        assert!(
            CLIENTS
                .iter()
                .any(|c| c.starts_with(&format!("{TAMPERED}-")))
        );
    }
}
