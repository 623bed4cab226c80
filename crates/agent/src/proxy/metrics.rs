//! The service proxy's metrics, registered with the agent's (`trellis_proxy_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// From half a millisecond to a minute: an endpoint change at one end, a cold start of
/// 50,000 services at the other.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 10.0, 60.0,
];

#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub programming_latency: Histogram,
    pub sync_duration: Histogram,
    pub audit_duration: Histogram,
    pub operations: Counter,
    pub transactions: Counter,
    pub failures: Counter,
    pub drift_repaired: Counter,
    pub audits_unchanged: Counter,
    pub conntrack_removed: Counter,
    pub service_ports: Gauge,
    pub rejected_records: Gauge,
    /// When the kernel last took every change the proxy sent (or an audit found nothing to
    /// do), for `/healthz/proxy`.
    pub last_sync: SyncHealth,
}

/// The proxy's health as kube-proxy's `/healthz` reports it: healthy while its last
/// successful sync is recent. Readiness of the node stays the mesh's alone.
#[derive(Clone, Debug, Default)]
pub struct SyncHealth {
    inner: Arc<Mutex<SyncState>>,
}

#[derive(Debug, Default)]
struct SyncState {
    last_ok: Option<Instant>,
    stale_after: Option<Duration>,
}

impl SyncHealth {
    /// Records a successful sync; `stale_after` is how old one may get.
    pub fn synced(&self, at: Instant, stale_after: Duration) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.last_ok = Some(at);
        s.stale_after = Some(stale_after);
    }

    /// `Ok` with why while the last successful sync is recent, `Err` with why otherwise.
    pub fn judge(&self, now: Instant) -> Result<String, String> {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match (s.last_ok, s.stale_after) {
            (Some(at), Some(limit)) => {
                let age = now.saturating_duration_since(at);
                if age <= limit {
                    Ok(format!(
                        "last successful sync {:.1} s ago",
                        age.as_secs_f64()
                    ))
                } else {
                    Err(format!(
                        "last successful sync {:.1} s ago, more than {:.0} s",
                        age.as_secs_f64(),
                        limit.as_secs_f64()
                    ))
                }
            }
            _ => Err("the service proxy has not synced yet (or does not run)".into()),
        }
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            programming_latency: Histogram::new(SECONDS_BUCKETS),
            sync_duration: Histogram::new(SECONDS_BUCKETS),
            audit_duration: Histogram::new(SECONDS_BUCKETS),
            operations: Counter::default(),
            transactions: Counter::default(),
            failures: Counter::default(),
            drift_repaired: Counter::default(),
            audits_unchanged: Counter::default(),
            conntrack_removed: Counter::default(),
            service_ports: Gauge::default(),
            rejected_records: Gauge::default(),
            last_sync: SyncHealth::default(),
        }
    }
}

impl ProxyMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "proxy_programming_latency",
            "From a store change of Services or EndpointSlices reaching the proxy to its rules in the kernel",
            Unit::Seconds,
            self.programming_latency.clone(),
        );
        r.register_with_unit(
            "proxy_sync_duration",
            "Time to bring the kernel up to date after one batch of changes",
            Unit::Seconds,
            self.sync_duration.clone(),
        );
        r.register_with_unit(
            "proxy_audit_duration",
            "Time to read the proxy's tables back from the kernel and repair them",
            Unit::Seconds,
            self.audit_duration.clone(),
        );
        r.register(
            "proxy_operations",
            "nftables operations (elements counted one by one) the proxy applied",
            self.operations.clone(),
        );
        r.register(
            "proxy_transactions",
            "nftables transactions the proxy committed",
            self.transactions.clone(),
        );
        r.register(
            "proxy_failures",
            "Units of changes the kernel refused (each retried by the next audit)",
            self.failures.clone(),
        );
        r.register(
            "proxy_drift_repaired",
            "Differences between the kernel and the plan the audit found and repaired (chains, sets, elements)",
            self.drift_repaired.clone(),
        );
        r.register(
            "proxy_audits_unchanged",
            "Audits that found the ruleset generation where the proxy last verified its tables, so had nothing to read",
            self.audits_unchanged.clone(),
        );
        r.register(
            "proxy_conntrack_removed",
            "Stale UDP conntrack entries deleted",
            self.conntrack_removed.clone(),
        );
        r.register(
            "proxy_service_ports",
            "Service ports the proxy programs",
            self.service_ports.clone(),
        );
        r.register(
            "proxy_rejected_records",
            "Service and EndpointSlice records left out because they are invalid",
            self.rejected_records.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_is_healthy_while_its_last_sync_is_recent() {
        let health = SyncHealth::default();
        let t0 = Instant::now();
        assert!(health.judge(t0).is_err(), "never synced");
        health.synced(t0, Duration::from_secs(60));
        assert!(health.judge(t0 + Duration::from_secs(59)).is_ok());
        let stale = health.judge(t0 + Duration::from_secs(61)).unwrap_err();
        assert!(stale.contains("more than 60 s"), "{stale}");
    }
}
