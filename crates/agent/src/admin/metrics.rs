//! What the agent measured, in the Prometheus text format (version 0.0.4), served on
//! `--metrics-addr`. Hand-written: a handful of counters and one histogram do not justify
//! an HTTP stack and a metrics crate in every node's agent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::probe::Subject;

/// Upper bounds of the probe RTT histogram, in seconds: from a direct LAN hop to the
/// longest a round ever waits.
const RTT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; RTT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in RTT_BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Default, Clone)]
struct GatewayProbes {
    probes_sent: u64,
    probes_answered: u64,
    rounds_failed: u64,
    opinion_changes: u64,
    up: bool,
    rtt: Histogram,
}

/// The last apply pass: what readiness is judged on.
struct ApplyPass {
    at: Instant,
    revision: u64,
    errors: Vec<String>,
}

#[derive(Default)]
struct Inner {
    probes: BTreeMap<Subject, GatewayProbes>,
    observer_stalls: u64,
    verdict_changes: u64,
    gateway_changes: u64,
    routes_repaired: u64,
    last_failover: Option<Instant>,
    down: BTreeSet<String>,
    gateways: Option<BTreeMap<String, Vec<String>>>,
    /// The epoch of the term this node holds, if it leads.
    leading_epoch: Option<u64>,
    terms: u64,
    leader_work: Option<Arc<crate::leader::work::WorkStats>>,
    last_pass: Option<ApplyPass>,
}

/// Shared by the prober (probe counters) and the main loop (verdicts and gateways).
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Update the counters of one probed subject.
    fn probed(&self, subject: &Subject, f: impl FnOnce(&mut GatewayProbes)) {
        self.with(|m| f(m.probes.entry(subject.clone()).or_default()));
    }

    pub fn probes_sent(&self, subject: &Subject, n: usize) {
        self.probed(subject, |p| p.probes_sent += n as u64);
    }

    /// Any echo answer, late or early: sent minus answered is probe loss.
    pub fn probe_answered(&self, subject: &Subject) {
        self.probed(subject, |p| p.probes_answered += 1);
    }

    /// The first answer of a round, which is what the RTT histogram and estimator follow.
    pub fn round_answered(&self, subject: &Subject, rtt: Duration) {
        self.probed(subject, |p| p.rtt.observe(rtt.as_secs_f64()));
    }

    pub fn round_failed(&self, subject: &Subject) {
        self.probed(subject, |p| p.rounds_failed += 1);
    }

    /// This node's own opinion of the subject.
    pub fn opinion(&self, subject: &Subject, up: bool, changed: bool) {
        self.probed(subject, |p| {
            p.up = up;
            p.opinion_changes += u64::from(changed);
        });
    }

    pub fn stop_watching(&self, subject: &Subject) {
        self.with(|m| m.probes.remove(subject));
    }

    pub fn routes_repaired(&self, n: usize) {
        self.with(|m| m.routes_repaired += n as u64);
    }

    /// One apply pass finished, with these errors (none: the kernel state was verified).
    pub fn applied(&self, at: Instant, revision: u64, errors: &[String]) {
        self.with(|m| {
            m.last_pass = Some(ApplyPass {
                at,
                revision,
                errors: errors.to_vec(),
            })
        });
    }

    /// Whether this node's data plane is in place: a plan was applied and verified by a
    /// pass no older than `stale_after`. Deliberately blind to the store and to
    /// leadership: a node that lost both still forwards, and taking it out of service
    /// for that would turn a control-plane outage into a data-plane one (seed 001).
    pub fn readiness(&self, now: Instant, stale_after: Duration) -> Result<String, String> {
        self.with(|m| match &m.last_pass {
            None => Err("no plan applied yet (nothing read from the store so far)".into()),
            Some(pass) if now.duration_since(pass.at) > stale_after => Err(format!(
                "the last apply pass was {:.1}s ago (expected every {:.1}s at most): the agent's loop is stuck",
                now.duration_since(pass.at).as_secs_f64(),
                stale_after.as_secs_f64()
            )),
            Some(pass) if !pass.errors.is_empty() => Err(format!(
                "the last apply pass failed: {}",
                pass.errors.join("; ")
            )),
            Some(pass) => Ok(format!(
                "data plane applied and verified at store revision {}, {:.1}s ago",
                pass.revision,
                now.duration_since(pass.at).as_secs_f64()
            )),
        })
    }

    pub fn observer_stalled(&self) {
        self.with(|m| m.observer_stalls += 1);
    }

    /// The cluster-wide view this node planned with: which gateways the verdicts hold down
    /// and which are active per location. Counts the changes; a change that drops a gateway
    /// held down is a failover.
    pub fn planned(
        &self,
        now: Instant,
        down: &BTreeSet<String>,
        gateways: &BTreeMap<String, Vec<String>>,
    ) {
        self.with(|m| {
            m.verdict_changes += m.down.symmetric_difference(down).count() as u64;
            if let Some(before) = &m.gateways
                && before != gateways
            {
                m.gateway_changes += 1;
                let dropped_down = before
                    .values()
                    .flatten()
                    .any(|g| down.contains(g) && !gateways.values().flatten().any(|a| a == g));
                if dropped_down {
                    m.last_failover = Some(now);
                }
            }
            m.down.clone_from(down);
            m.gateways = Some(gateways.clone());
        });
    }

    /// Reports what the leader work did (across all of this node's terms).
    pub fn count_leader_work(&self, stats: Arc<crate::leader::work::WorkStats>) {
        self.with(|m| m.leader_work = Some(stats));
    }

    /// Mirrors the leader election's role into the metrics until the campaign ends.
    pub async fn follow_role(self, mut role: tokio::sync::watch::Receiver<crate::leader::Role>) {
        loop {
            let epoch = match &*role.borrow_and_update() {
                crate::leader::Role::Leader { epoch } => Some(*epoch),
                _ => None,
            };
            self.with(|m| {
                if epoch.is_some() && m.leading_epoch != epoch {
                    m.terms += 1;
                }
                m.leading_epoch = epoch;
            });
            if role.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn render(&self, node: &str, now: Instant) -> String {
        self.with(|m| render(m, node, now))
    }
}

fn render(m: &Inner, node: &str, now: Instant) -> String {
    let mut out = String::new();
    let node = escape(node);
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{node=\"{node}\"{labels}}} {value}");
        }
    };
    family(
        "trellis_leader",
        "gauge",
        "1 while this node holds the cluster leadership (leader-only work runs), else 0.",
        vec![(
            String::new(),
            u8::from(m.leading_epoch.is_some()).to_string(),
        )],
    );
    family(
        "trellis_leader_terms_total",
        "counter",
        "Terms of leadership this node has begun.",
        vec![(String::new(), m.terms.to_string())],
    );
    if let Some(work) = &m.leader_work {
        let count = |c: &std::sync::atomic::AtomicU64| {
            vec![(
                String::new(),
                c.load(std::sync::atomic::Ordering::Relaxed).to_string(),
            )]
        };
        family(
            "trellis_leader_pod_cidrs_allocated_total",
            "counter",
            "Pod CIDRs this node allocated while leading.",
            count(&work.allocations),
        );
        family(
            "trellis_leader_records_collected_total",
            "counter",
            "Records of departed nodes this node deleted while leading.",
            count(&work.collected),
        );
        family(
            "trellis_leader_task_failures_total",
            "counter",
            "Leader task runs that failed and were retried within the term.",
            count(&work.failures),
        );
        family(
            "trellis_leader_writes_fenced_total",
            "counter",
            "Leader writes the store rejected because the term was over.",
            count(&work.fenced),
        );
    }
    let per_gateway = |f: &dyn Fn(&GatewayProbes) -> String| -> Vec<(String, String)> {
        m.probes
            .iter()
            .map(|(g, p)| (subject_label(g), f(p)))
            .collect()
    };
    family(
        "trellis_probes_sent_total",
        "counter",
        "Forwarding probes sent to a gateway candidate.",
        per_gateway(&|p| p.probes_sent.to_string()),
    );
    family(
        "trellis_probes_answered_total",
        "counter",
        "Forwarding probe answers received (sent minus answered is probe loss).",
        per_gateway(&|p| p.probes_answered.to_string()),
    );
    family(
        "trellis_probe_rounds_failed_total",
        "counter",
        "Probe rounds with no answer before their deadline.",
        per_gateway(&|p| p.rounds_failed.to_string()),
    );
    family(
        "trellis_gateway_observed_up",
        "gauge",
        "This node's opinion of a gateway (1 forwarding, 0 not) or of its direct path to a peer (1 working).",
        per_gateway(&|p| u8::from(p.up).to_string()),
    );
    family(
        "trellis_gateway_opinion_changes_total",
        "counter",
        "Changes of this node's opinion of a gateway or a direct path.",
        per_gateway(&|p| p.opinion_changes.to_string()),
    );
    let mut rtt = Vec::new();
    for (g, p) in &m.probes {
        let g = subject_label(g);
        for (bound, count) in RTT_BUCKETS.iter().zip(p.rtt.counts) {
            rtt.push((format!("{g},le=\"{bound}\""), count.to_string()));
        }
        rtt.push((format!("{g},le=\"+Inf\""), p.rtt.count.to_string()));
    }
    let _ = writeln!(
        out,
        "# HELP trellis_probe_rtt_seconds Round-trip time of the first answer of each probe round.\n# TYPE trellis_probe_rtt_seconds histogram"
    );
    for (labels, value) in rtt {
        let _ = writeln!(
            out,
            "trellis_probe_rtt_seconds_bucket{{node=\"{node}\"{labels}}} {value}"
        );
    }
    for (g, p) in &m.probes {
        let g = subject_label(g);
        let _ = writeln!(
            out,
            "trellis_probe_rtt_seconds_sum{{node=\"{node}\"{g}}} {}\ntrellis_probe_rtt_seconds_count{{node=\"{node}\"{g}}} {}",
            p.rtt.sum, p.rtt.count
        );
    }
    let mut family = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {value}"
        );
    };
    family(
        "trellis_observer_stalls_total",
        "counter",
        "Times a probe timer of this agent fired over 50 ms late (it was not running; deadlines were extended).",
        m.observer_stalls.to_string(),
    );
    family(
        "trellis_gateway_verdict_changes_total",
        "counter",
        "Changes of the cluster-wide verdicts (gateway down or up) this node planned with.",
        m.verdict_changes.to_string(),
    );
    family(
        "trellis_gateway_changes_total",
        "counter",
        "Changes of the active gateways of any location.",
        m.gateway_changes.to_string(),
    );
    family(
        "trellis_routes_repaired_total",
        "counter",
        "Routes someone else removed (or changed) that this agent put back.",
        m.routes_repaired.to_string(),
    );
    family(
        "trellis_gateways_down",
        "gauge",
        "Gateway candidates the verdicts hold down now.",
        m.down.len().to_string(),
    );
    family(
        "trellis_data_plane_applied",
        "gauge",
        "1 when the last apply pass installed and verified the whole plan, else 0 (readiness adds a staleness check).",
        u8::from(m.last_pass.as_ref().is_some_and(|p| p.errors.is_empty())).to_string(),
    );
    // NaN until the first failover: Prometheus' way of saying "no value yet".
    let since = m.last_failover.map_or("NaN".to_string(), |t| {
        format!("{:.3}", now.duration_since(t).as_secs_f64())
    });
    family(
        "trellis_seconds_since_last_failover",
        "gauge",
        "Seconds since an active gateway held down was last replaced (NaN: never).",
        since,
    );
    out
}

/// The labels of a probed subject: `gateway="g"`, or `path="p"` for a direct path.
fn subject_label(subject: &Subject) -> String {
    match subject {
        Subject::Gateway(g) => format!(",gateway=\"{}\"", escape(g)),
        Subject::Path(peer) => format!(",path=\"{}\"", escape(peer)),
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serve `GET /metrics` and `GET /readyz` until the process ends. A client that stalls is
/// dropped after a few seconds; one bad connection never blocks the next.
pub async fn serve(addr: SocketAddr, node: String, metrics: Metrics, stale_after: Duration) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(%addr, retry_in = ?delay, "metrics listener: {e}");
                tokio::time::sleep(delay).await;
            }
        }
    };
    tracing::info!(%addr, "serving /metrics and /readyz");
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (node, metrics) = (node.clone(), metrics.clone());
        tokio::spawn(async move {
            let exchange = async {
                let mut request = [0u8; 1024];
                let n = conn.read(&mut request).await?;
                let (status, content_type, body) =
                    answer(&request[..n], &node, &metrics, stale_after);
                let head = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                conn.write_all(head.as_bytes()).await?;
                conn.write_all(body.as_bytes()).await?;
                conn.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), exchange).await;
        });
    }
}

/// Status line, content type and body for one request.
fn answer(
    request: &[u8],
    node: &str,
    metrics: &Metrics,
    stale_after: Duration,
) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let path = String::from_utf8_lossy(line)
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let now = Instant::now();
    match path.as_str() {
        "/" | "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics.render(node, now),
        ),
        "/readyz" => match metrics.readiness(now, stale_after) {
            Ok(why) => ("200 OK", TEXT, format!("ready: {why}\n")),
            Err(why) => (
                "503 Service Unavailable",
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        other => (
            "404 Not Found",
            TEXT,
            format!("no page {other:?}: try /metrics or /readyz\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_probe_counters_histogram_and_failover_age() {
        let m = Metrics::default();
        let t0 = Instant::now();
        let b1 = Subject::Gateway("b1".into());
        m.probes_sent(&b1, 4);
        m.probe_answered(&b1);
        m.round_answered(&b1, Duration::from_micros(1_500));
        m.round_failed(&b1);
        m.opinion(&b1, true, false);
        m.opinion(&Subject::Path("b2".into()), false, true);
        let a = |gs: &[&str]| -> BTreeMap<String, Vec<String>> {
            [("a".to_string(), gs.iter().map(|g| g.to_string()).collect())].into()
        };
        m.planned(t0, &BTreeSet::new(), &a(&["a1"]));
        let text = m.render("n\"1", t0 + Duration::from_secs(1));
        assert!(
            text.contains("trellis_seconds_since_last_failover{node=\"n\\\"1\"} NaN"),
            "{text}"
        );
        // a1 held down and replaced by a2: one verdict change, one gateway change, a failover
        let down: BTreeSet<String> = ["a1".to_string()].into();
        m.planned(t0 + Duration::from_secs(2), &down, &a(&["a2"]));
        let text = m.render("n1", t0 + Duration::from_millis(4_500));
        for line in [
            "trellis_probes_sent_total{node=\"n1\",gateway=\"b1\"} 4",
            "trellis_probes_answered_total{node=\"n1\",gateway=\"b1\"} 1",
            "trellis_probe_rounds_failed_total{node=\"n1\",gateway=\"b1\"} 1",
            "trellis_probe_rtt_seconds_bucket{node=\"n1\",gateway=\"b1\",le=\"0.001\"} 0",
            "trellis_probe_rtt_seconds_bucket{node=\"n1\",gateway=\"b1\",le=\"0.002\"} 1",
            "trellis_probe_rtt_seconds_bucket{node=\"n1\",gateway=\"b1\",le=\"+Inf\"} 1",
            "trellis_probe_rtt_seconds_count{node=\"n1\",gateway=\"b1\"} 1",
            "trellis_gateway_verdict_changes_total{node=\"n1\"} 1",
            "trellis_gateway_observed_up{node=\"n1\",path=\"b2\"} 0",
            "trellis_gateway_changes_total{node=\"n1\"} 1",
            "trellis_gateways_down{node=\"n1\"} 1",
            "trellis_seconds_since_last_failover{node=\"n1\"} 2.500",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // a gateway change without anything held down (a node joined) is no failover
        m.planned(
            t0 + Duration::from_secs(5),
            &BTreeSet::new(),
            &a(&["a2", "a3"]),
        );
        let text = m.render("n1", t0 + Duration::from_secs(6));
        assert!(text.contains("trellis_gateway_changes_total{node=\"n1\"} 2"));
        assert!(text.contains("trellis_seconds_since_last_failover{node=\"n1\"} 4.000"));
    }

    #[test]
    fn readiness_follows_the_last_apply_pass_and_nothing_else() {
        let m = Metrics::default();
        let t0 = Instant::now();
        let stale = Duration::from_secs(60);
        let ready = |now| m.readiness(now, stale);
        assert!(ready(t0).unwrap_err().contains("no plan applied yet"));

        m.applied(t0, 7, &[]);
        assert!(
            ready(t0 + Duration::from_secs(1))
                .unwrap()
                .contains("revision 7")
        );
        assert!(ready(t0 + Duration::from_secs(59)).is_ok());
        assert!(
            ready(t0 + Duration::from_secs(61))
                .unwrap_err()
                .contains("stuck")
        );

        m.applied(
            t0 + Duration::from_secs(62),
            8,
            &["route 10.244.3.0/24: EPERM".into()],
        );
        let why = ready(t0 + Duration::from_secs(62)).unwrap_err();
        assert!(why.contains("10.244.3.0/24: EPERM"), "{why}");
        let text = m.render("n1", t0);
        assert!(
            text.contains("trellis_data_plane_applied{node=\"n1\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn requests_are_routed_by_path() {
        let m = Metrics::default();
        let stale = Duration::from_secs(60);
        let status = |req: &[u8]| answer(req, "n1", &m, stale).0;
        assert_eq!(
            status(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"),
            "503 Service Unavailable"
        );
        m.applied(Instant::now(), 1, &[]);
        assert_eq!(status(b"GET /readyz HTTP/1.0\r\n\r\n"), "200 OK");
        let (_, kind, body) = answer(b"GET /metrics HTTP/1.0\r\n\r\n", "n1", &m, stale);
        assert!(
            kind.contains("0.0.4") && body.contains("trellis_data_plane_applied{node=\"n1\"} 1")
        );
        assert_eq!(status(b"GET / HTTP/1.0\r\n\r\n"), "200 OK");
        assert_eq!(status(b"GET /nope HTTP/1.0\r\n\r\n"), "404 Not Found");
        assert_eq!(status(b""), "200 OK");
    }
}
