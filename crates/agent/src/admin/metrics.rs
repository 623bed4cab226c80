//! What the agent measured, registered with `prometheus-client` and rendered in the
//! OpenMetrics text format. Every sample carries the node's name (`node="a1"`); probe
//! families carry `gateway="g"` for a gateway or `path="p"` for the direct path to a peer.
//!
//! Metrics count; they decide nothing. What counts as a failover, for instance, is decided
//! by [`crate::report::transition`] and only recorded here.

use super::offload_metrics::DeviceOffloads;
use crate::leader::work::LeaderWorkCounters;
use crate::policy::metrics::PolicyMetrics;
use crate::proxy::metrics::ProxyMetrics;
use crate::report::transition::Transition;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_probe::Subject;

/// Upper bounds of the probe RTT histogram, in seconds: from a direct LAN hop to the
/// longest a round ever waits.
const RTT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
];

type Labels = Vec<(String, String)>;

/// Cheap to clone: every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    probes_sent: Family<Labels, Counter>,
    probes_answered: Family<Labels, Counter>,
    rounds_failed: Family<Labels, Counter>,
    observed_up: Family<Labels, Gauge>,
    opinion_changes: Family<Labels, Counter>,
    rtt: Family<Labels, Histogram>,
    observer_stalls: Counter,
    verdict_changes: Counter,
    gateway_changes: Counter,
    routes_repaired: Counter,
    gateways_down: Gauge,
    data_plane_applied: Gauge,
    since_failover: Gauge<f64, AtomicU64>,
    leader: Gauge,
    leader_terms: Counter,
    leader_work: LeaderWorkCounters,
    proxy: ProxyMetrics,
    policy: PolicyMetrics,
    device_offloads: DeviceOffloads,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last_failover: Option<Instant>,
    leading_epoch: Option<u64>,
    /// This node's own opinion of each subject it probes.
    opinions: BTreeMap<Subject, bool>,
}

fn labels(subject: &Subject) -> Labels {
    match subject {
        Subject::Gateway(g) => vec![("gateway".into(), g.clone())],
        Subject::Path(p) => vec![("path".into(), p.clone())],
    }
}

impl Metrics {
    pub fn new(node: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "trellis",
            [("node".into(), node.to_string().into())].into_iter(),
        );
        let rtt = Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(RTT_BUCKETS));
        let inner = Inner {
            probes_sent: Family::default(),
            probes_answered: Family::default(),
            rounds_failed: Family::default(),
            observed_up: Family::default(),
            opinion_changes: Family::default(),
            rtt,
            observer_stalls: Counter::default(),
            verdict_changes: Counter::default(),
            gateway_changes: Counter::default(),
            routes_repaired: Counter::default(),
            gateways_down: Gauge::default(),
            data_plane_applied: Gauge::default(),
            since_failover: Gauge::default(),
            leader: Gauge::default(),
            leader_terms: Counter::default(),
            leader_work: LeaderWorkCounters::default(),
            proxy: ProxyMetrics::default(),
            policy: PolicyMetrics::default(),
            device_offloads: DeviceOffloads::default(),
            state: Mutex::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "leader",
            "1 while this node holds the cluster leadership (leader-only work runs), else 0",
            inner.leader.clone(),
        );
        r.register(
            "leader_terms",
            "Terms of leadership this node has begun",
            inner.leader_terms.clone(),
        );
        inner.proxy.register(r);
        inner.policy.register(r);
        r.register_collector(Box::new(inner.device_offloads.clone()));
        let work = &inner.leader_work;
        r.register(
            "leader_pod_cidrs_allocated",
            "Pod CIDRs this node allocated while leading",
            work.allocations.clone(),
        );
        r.register(
            "leader_records_collected",
            "Records of departed nodes this node deleted while leading",
            work.collected.clone(),
        );
        r.register(
            "leader_task_failures",
            "Leader task runs that failed and were retried within the term",
            work.failures.clone(),
        );
        r.register(
            "leader_writes_fenced",
            "Leader writes the store rejected because the term was over",
            work.fenced.clone(),
        );
        r.register(
            "probes_sent",
            "Forwarding probes sent to a gateway candidate or along a direct path",
            inner.probes_sent.clone(),
        );
        r.register(
            "probes_answered",
            "Forwarding probe answers received, late or not (sent minus answered is probe loss)",
            inner.probes_answered.clone(),
        );
        r.register(
            "probe_rounds_failed",
            "Probe rounds with no answer before their deadline",
            inner.rounds_failed.clone(),
        );
        r.register(
            "gateway_observed_up",
            "This node's opinion of a gateway (1 forwarding, 0 not) or of its direct path to a peer (1 working)",
            inner.observed_up.clone(),
        );
        r.register(
            "gateway_opinion_changes",
            "Changes of this node's opinion of a gateway or a direct path",
            inner.opinion_changes.clone(),
        );
        r.register_with_unit(
            "probe_rtt",
            "Round-trip time of the first answer of each probe round",
            prometheus_client::registry::Unit::Seconds,
            inner.rtt.clone(),
        );
        r.register(
            "observer_stalls",
            "Times a probe timer of this agent fired over 50 ms late (it was not running; deadlines were extended)",
            inner.observer_stalls.clone(),
        );
        r.register(
            "gateway_verdict_changes",
            "Changes of the cluster-wide verdicts (gateway down or up) this node planned with",
            inner.verdict_changes.clone(),
        );
        r.register(
            "gateway_changes",
            "Changes of the active gateways of any location",
            inner.gateway_changes.clone(),
        );
        r.register(
            "routes_repaired",
            "Routes someone else removed (or changed) that this agent put back",
            inner.routes_repaired.clone(),
        );
        r.register(
            "gateways_down",
            "Gateway candidates the verdicts hold down now",
            inner.gateways_down.clone(),
        );
        r.register(
            "data_plane_applied",
            "1 when the last apply pass installed and verified the whole plan, else 0 (readiness adds a staleness check)",
            inner.data_plane_applied.clone(),
        );
        r.register(
            "seconds_since_last_failover",
            "Seconds since an active gateway held down was last replaced (NaN: never)",
            inner.since_failover.clone(),
        );
        Self {
            inner: Arc::new(Inner { registry, ..inner }),
        }
    }

    fn state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.inner.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn probes_sent(&self, subject: &Subject, n: usize) {
        self.inner
            .probes_sent
            .get_or_create(&labels(subject))
            .inc_by(n as u64);
    }

    /// Any echo answer, late or early.
    pub fn probe_answered(&self, subject: &Subject) {
        self.inner
            .probes_answered
            .get_or_create(&labels(subject))
            .inc();
    }

    /// The first answer of a round, which is what the RTT histogram follows.
    pub fn round_answered(&self, subject: &Subject, rtt: Duration) {
        self.inner
            .rtt
            .get_or_create(&labels(subject))
            .observe(rtt.as_secs_f64());
    }

    pub fn round_failed(&self, subject: &Subject) {
        self.inner
            .rounds_failed
            .get_or_create(&labels(subject))
            .inc();
    }

    /// This node's own opinion of the subject (`changed`: not the initial "up").
    pub fn opinion(&self, subject: &Subject, up: bool, changed: bool) {
        let l = labels(subject);
        self.inner.observed_up.get_or_create(&l).set(i64::from(up));
        let changes = self.inner.opinion_changes.get_or_create(&l);
        if changed {
            changes.inc();
        }
        self.state(|s| s.opinions.insert(subject.clone(), up));
    }

    /// The subject is no longer probed: its samples go.
    pub fn stop_watching(&self, subject: &Subject) {
        let l = labels(subject);
        let i = &self.inner;
        i.probes_sent.remove(&l);
        i.probes_answered.remove(&l);
        i.rounds_failed.remove(&l);
        i.observed_up.remove(&l);
        i.opinion_changes.remove(&l);
        i.rtt.remove(&l);
        self.state(|s| s.opinions.remove(subject));
    }

    pub fn observer_stalled(&self) {
        self.inner.observer_stalls.inc();
    }

    pub fn routes_repaired(&self, n: usize) {
        self.inner.routes_repaired.inc_by(n as u64);
    }

    pub fn data_plane_applied(&self, applied: bool) {
        self.inner.data_plane_applied.set(i64::from(applied));
    }

    /// Records what changed in the cluster's health since the last pass.
    pub fn transition(&self, now: Instant, t: &Transition) {
        self.inner.verdict_changes.inc_by(t.verdict_changes as u64);
        if t.gateways_changed {
            self.inner.gateway_changes.inc();
        }
        self.inner.gateways_down.set(t.down as i64);
        if t.failover {
            self.state(|s| s.last_failover = Some(now));
        }
    }

    /// The counters the leader's tasks update, across all of this node's terms.
    /// Export the device's offload counters from now on.
    pub fn watch_device(&self, device: Arc<dyn trellis_dataplane::wireguard::WireGuardDevice>) {
        self.inner.device_offloads.watch(device);
    }

    pub fn policy(&self) -> PolicyMetrics {
        self.inner.policy.clone()
    }

    pub fn proxy(&self) -> ProxyMetrics {
        self.inner.proxy.clone()
    }

    pub fn leader_work(&self) -> LeaderWorkCounters {
        self.inner.leader_work.clone()
    }

    /// Mirrors the leader election's role into the metrics until the campaign ends.
    pub async fn follow_role(self, mut role: tokio::sync::watch::Receiver<crate::leader::Role>) {
        loop {
            let epoch = match &*role.borrow_and_update() {
                crate::leader::Role::Leader { epoch } => Some(*epoch),
                _ => None,
            };
            let new_term = self.state(|s| {
                let new_term = epoch.is_some() && s.leading_epoch != epoch;
                s.leading_epoch = epoch;
                new_term
            });
            if new_term {
                self.inner.leader_terms.inc();
            }
            self.inner.leader.set(i64::from(epoch.is_some()));
            if role.changed().await.is_err() {
                return;
            }
        }
    }

    /// This node's opinions, by subject, for `/debug/state`.
    pub fn opinions(&self) -> BTreeMap<String, bool> {
        self.state(|s| {
            s.opinions
                .iter()
                .map(|(subject, up)| (subject.to_string(), *up))
                .collect()
        })
    }

    /// The exposition, with the time-dependent gauges brought up to `now`.
    pub fn render(&self, now: Instant) -> String {
        // NaN until the first failover: Prometheus' way of saying "no value yet".
        let since = self
            .state(|s| s.last_failover)
            .map_or(f64::NAN, |t| now.duration_since(t).as_secs_f64());
        self.inner.since_failover.set(since);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.inner.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }

    /// The value of the first sample of metric `name` (its exposition name, e.g.
    /// `trellis_policy_drift_repaired_total`), for benches and tests; 0 when it has none.
    pub fn first_sample(&self, name: &str) -> f64 {
        (self.render(Instant::now()).lines())
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(text: &'a str, name_and_labels: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
    }

    #[test]
    fn renders_probe_counters_histogram_and_failover_age() {
        let m = Metrics::new("n\"1");
        let t0 = Instant::now();
        let text = m.render(t0);
        assert_eq!(
            sample(
                &text,
                "trellis_seconds_since_last_failover{node=\"n\\\"1\"}"
            ),
            Some("NaN"),
            "{text}"
        );

        let m = Metrics::new("n1");
        let b1 = Subject::Gateway("b1".into());
        m.probes_sent(&b1, 4);
        m.probe_answered(&b1);
        m.round_answered(&b1, Duration::from_micros(1_500));
        m.round_failed(&b1);
        m.opinion(&b1, true, false);
        m.opinion(&Subject::Path("b2".into()), false, true);
        m.transition(
            t0 + Duration::from_secs(2),
            &Transition {
                verdict_changes: 1,
                gateways_changed: true,
                failover: true,
                down: 1,
            },
        );
        let text = m.render(t0 + Duration::from_millis(4_500));
        for (series, value) in [
            ("trellis_probes_sent_total{node=\"n1\",gateway=\"b1\"}", "4"),
            (
                "trellis_probes_answered_total{node=\"n1\",gateway=\"b1\"}",
                "1",
            ),
            (
                "trellis_probe_rounds_failed_total{node=\"n1\",gateway=\"b1\"}",
                "1",
            ),
            (
                "trellis_probe_rtt_seconds_bucket{node=\"n1\",le=\"0.001\",gateway=\"b1\"}",
                "0",
            ),
            (
                "trellis_probe_rtt_seconds_bucket{node=\"n1\",le=\"0.002\",gateway=\"b1\"}",
                "1",
            ),
            (
                "trellis_probe_rtt_seconds_count{node=\"n1\",gateway=\"b1\"}",
                "1",
            ),
            ("trellis_gateway_observed_up{node=\"n1\",path=\"b2\"}", "0"),
            (
                "trellis_gateway_opinion_changes_total{node=\"n1\",path=\"b2\"}",
                "1",
            ),
            ("trellis_gateway_verdict_changes_total{node=\"n1\"}", "1"),
            ("trellis_gateway_changes_total{node=\"n1\"}", "1"),
            ("trellis_gateways_down{node=\"n1\"}", "1"),
            ("trellis_seconds_since_last_failover{node=\"n1\"}", "2.5"),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        m.stop_watching(&b1);
        let text = m.render(t0);
        assert!(!text.contains("gateway=\"b1\""), "{text}");
        assert_eq!(m.opinions().get("path to b2"), Some(&false));
    }

    #[tokio::test]
    async fn leadership_is_a_gauge_and_terms_a_counter() {
        let m = Metrics::new("n1");
        let (tx, rx) = tokio::sync::watch::channel(crate::leader::Role::Candidate);
        let follow = tokio::spawn(m.clone().follow_role(rx));
        tx.send_replace(crate::leader::Role::Leader { epoch: 7 });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let text = m.render(Instant::now());
        assert_eq!(
            sample(&text, "trellis_leader{node=\"n1\"}"),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            sample(&text, "trellis_leader_terms_total{node=\"n1\"}"),
            Some("1")
        );
        drop(tx);
        follow.await.unwrap();
    }
}
