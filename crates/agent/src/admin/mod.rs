//! What the agent serves to operators on `--metrics-addr`, over HTTP/1 (hyper):
//!
//! - `/metrics`: what it measured, in the OpenMetrics text format ([`Metrics`]);
//! - `/readyz`: whether this node's data plane is in place ([`readiness`]): a plan applied
//!   and verified by a recent pass, blind to the store and to leadership;
//! - `/healthz`: whether the agent's main loop still runs;
//! - `/healthz/proxy`: whether the service proxy's last successful sync is recent (as
//!   kube-proxy's `/healthz`);
//! - `/debug/state`: the last plan, each observer's opinions, the verdicts and this node's
//!   own opinions, as JSON ([`DebugState`]).
//!
//! The handlers are plain functions of the shared [`Admin`] state, tested without sockets.

mod metrics;
mod offload_metrics;
pub mod readiness;
mod server;

pub use metrics::Metrics;
pub use server::serve;

use readiness::ApplyPass;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_plan::Plan;

/// Everything the endpoint shows, shared by the main loop, the prober and the server.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Metrics,
    node: String,
    /// A pass runs at least every resync; one far older than that means a stuck loop.
    stale_after: Duration,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    last_pass: Option<ApplyPass>,
    debug: Option<DebugState>,
}

/// What `/debug/state` shows: the inputs and result of the last pass.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DebugState {
    /// The store revision at which the plan inputs last changed.
    pub revision: u64,
    /// "forwarding" (probes) or "liveness" (the baseline).
    pub health: &'static str,
    pub plan: Option<Plan>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Active gateways per location.
    pub gateways: BTreeMap<String, Vec<String>>,
    /// Gateway candidates the verdicts hold down.
    pub down: BTreeSet<String>,
    /// Each gateway candidate's verdict: "up", "down" or "unknown".
    pub verdicts: BTreeMap<String, &'static str>,
    /// `observations[gateway][observer] = up`, as the store holds them.
    pub observations: BTreeMap<String, BTreeMap<String, bool>>,
    /// Direct paths held broken (relayed).
    pub broken_paths: BTreeSet<(String, String)>,
}

impl Admin {
    pub fn new(node: &str, stale_after: Duration) -> Self {
        Self {
            metrics: Metrics::new(node),
            node: node.to_string(),
            stale_after,
            shared: Arc::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        f(&mut self.shared.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records one apply pass: what readiness is judged on, and what `/debug/state` shows.
    pub fn pass(&self, at: Instant, debug: DebugState) {
        self.metrics.data_plane_applied(debug.errors.is_empty());
        self.with(|s| {
            s.last_pass = Some(ApplyPass {
                at,
                revision: debug.revision,
                errors: debug.errors.clone(),
            });
            s.debug = Some(debug);
        });
    }

    pub fn readiness(&self, now: Instant) -> Result<String, String> {
        self.with(|s| readiness::judge(s.last_pass.as_ref(), now, self.stale_after))
    }

    /// Alive: the main loop completed a pass recently, failed or not.
    pub fn liveness(&self, now: Instant) -> Result<String, String> {
        self.with(|s| readiness::alive(s.last_pass.as_ref(), now, self.stale_after))
    }

    /// `/debug/state`: the last pass, plus this node's own opinions of what it probes.
    pub fn debug_json(&self) -> String {
        let debug = self.with(|s| s.debug.clone());
        let body = serde_json::json!({
            "node": self.node,
            "last_pass": debug,
            "opinions": self.metrics.opinions(),
        });
        serde_json::to_string_pretty(&body).unwrap_or_default() + "\n"
    }
}
