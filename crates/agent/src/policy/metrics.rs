//! Network policy's metrics, registered with the agent's (`trellis_policy_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// From half a millisecond to a minute.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 10.0, 60.0,
];

type Labels = Vec<(String, String)>;

#[derive(Clone, Debug)]
pub struct PolicyMetrics {
    pub programming_latency: Histogram,
    pub audit_duration: Histogram,
    pub policies: Gauge,
    pub pods_selected: Gauge,
    pub drift_repaired: Counter,
    pub failures: Counter,
    pub rejected_records: Gauge,
    /// Packets dropped because the policy isolates the pod and none of its rules admits them,
    /// by policy (`namespace/name`) and direction: a drop at a pod several policies isolate
    /// counts for each.
    pub dropped: Family<Labels, Counter>,
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        PolicyMetrics {
            programming_latency: Histogram::new(SECONDS_BUCKETS),
            audit_duration: Histogram::new(SECONDS_BUCKETS),
            policies: Gauge::default(),
            pods_selected: Gauge::default(),
            drift_repaired: Counter::default(),
            failures: Counter::default(),
            rejected_records: Gauge::default(),
            dropped: Family::default(),
        }
    }
}

impl PolicyMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "policy_programming_latency",
            "From a change of policies, pods or namespaces reaching the agent to its rules in the kernel",
            Unit::Seconds,
            self.programming_latency.clone(),
        );
        r.register_with_unit(
            "policy_audit_duration",
            "Time to read the policy tables back from the kernel and repair them",
            Unit::Seconds,
            self.audit_duration.clone(),
        );
        r.register(
            "policy_policies",
            "NetworkPolicies known",
            self.policies.clone(),
        );
        r.register(
            "policy_pods_selected",
            "Addresses of this node's pods that a policy isolates in at least one direction",
            self.pods_selected.clone(),
        );
        r.register(
            "policy_drift_repaired",
            "Differences between the kernel and the plan the audit found and repaired (chains, sets, elements)",
            self.drift_repaired.clone(),
        );
        r.register(
            "policy_failures",
            "Units of changes the kernel refused (each retried by the next audit)",
            self.failures.clone(),
        );
        r.register(
            "policy_rejected_records",
            "NetworkPolicy, pod and namespace records left out because they are invalid",
            self.rejected_records.clone(),
        );
        r.register(
            "policy_dropped_packets",
            "Packets dropped at this node's pods, by isolating policy and direction",
            self.dropped.clone(),
        );
    }
}
