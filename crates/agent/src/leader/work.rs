//! Trellis's own leader-only work: pod CIDRs for nodes that have none, and garbage
//! collection of records of nodes that have been gone for a while. The decisions are the
//! planner's pure functions (`trellis_plan::leader_work`); this edge feeds them the
//! cluster state and writes their result, every write fenced by the term's epoch.
//!
//! Each task runs on its own inside the term, so one failing never stops the other, and a
//! failure is retried with backoff within the same term (the gap Skupper issue 2466
//! describes: a task that failed once was never retried until the next election).

use super::{FencedError, LeaderWork, Term};
use crate::backoff::Backoff;
use crate::state::ClusterState;
use prometheus_client::metrics::counter::Counter;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_model::{PodCidrAllocation, keys};
use trellis_plan::leader_work::{allocate_pod_cidrs, collectable, track_gone};
use trellis_store::{Compare, Op, Store};

/// How often each task runs when nothing wakes it earlier.
const PERIOD: Duration = Duration::from_secs(5);

/// Most deletions in one transaction (etcd allows 128 operations by default).
const DELETES_PER_TXN: usize = 64;

/// Counters for leader-only work, handed to the leader tasks.
#[derive(Clone, Debug, Default)]
pub struct LeaderWorkCounters {
    pub allocations: Counter,
    pub collected: Counter,
    pub failures: Counter,
    pub fenced: Counter,
}

pub struct ClusterWork {
    pub store: Arc<dyn Store>,
    pub state: watch::Receiver<Arc<ClusterState>>,
    /// Counts terms and task failures, for metrics and tests.
    pub stats: LeaderWorkCounters,
}

#[async_trait::async_trait]
impl LeaderWork for ClusterWork {
    async fn lead(&self, term: Term) {
        let allocate = run_in_term(&term, "pod CIDR allocation", &self.stats, || {
            self.allocate_once(&term)
        });
        let mut gone_since = BTreeMap::new();
        let started = Instant::now();
        let collect = run_in_term(&term, "garbage collection", &self.stats, || {
            let now_ms = started.elapsed().as_millis() as u64;
            let state = self.state.borrow().clone();
            let live = state.status.keys().cloned().collect();
            track_gone(
                &mut gone_since,
                state.nodes.keys().map(String::as_str),
                &live,
                now_ms,
            );
            let gone = gone_since.clone();
            self.collect_once(&term, gone, now_ms)
        });
        tokio::join!(allocate, collect);
    }
}

/// Runs `once` every period until the term ends, retrying failures with backoff.
async fn run_in_term<F, Fut>(term: &Term, name: &str, stats: &LeaderWorkCounters, mut once: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), PERIOD * 6);
    while term.is_current() {
        let result = tokio::select! {
            r = once() => r,
            _ = term.ended() => return,
        };
        let pause = match result {
            Ok(()) => {
                backoff.reset();
                PERIOD
            }
            Err(e) => {
                if matches!(e.downcast_ref(), Some(FencedError::TermOver(_))) {
                    stats.fenced.inc();
                    tracing::warn!(epoch = term.epoch, "{name}: fenced off: {e}");
                    return;
                }
                stats.failures.inc();
                let delay = backoff.next_delay();
                tracing::warn!(epoch = term.epoch, retry_in = ?delay, "{name}: {e:#}");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = term.ended() => return,
        }
    }
}

impl ClusterWork {
    async fn allocate_once(&self, term: &Term) -> anyhow::Result<()> {
        let state = self.state.borrow().clone();
        let Some(pool) = state.settings.as_ref().and_then(|s| s.pod_cidr_pool) else {
            return Ok(());
        };
        let needing = state
            .nodes
            .values()
            .filter(|n| n.pod_cidrs.is_empty() && !state.pod_cidrs.contains_key(&n.name))
            .map(|n| n.name.as_str());
        let taken = state
            .nodes
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .chain(state.pod_cidrs.values().map(|a| a.cidr));
        for (node, cidr) in allocate_pod_cidrs(&pool, needing, taken) {
            let key = keys::pod_cidr(&node);
            let record = PodCidrAllocation {
                node: node.clone(),
                cidr,
                epoch: term.epoch,
            };
            let written = term
                .txn(
                    self.store.as_ref(),
                    vec![Compare::Absent(key.clone())],
                    vec![Op::Put {
                        key,
                        value: serde_json::to_vec(&record)?,
                        lease: None,
                    }],
                )
                .await?;
            if written {
                self.stats.allocations.inc();
                tracing::info!(node, %cidr, epoch = term.epoch, "pod CIDR allocated");
            }
        }
        Ok(())
    }

    async fn collect_once(
        &self,
        term: &Term,
        gone_since_ms: BTreeMap<String, u64>,
        now_ms: u64,
    ) -> anyhow::Result<()> {
        let state = self.state.borrow().clone();
        let gc_after = state
            .settings
            .as_ref()
            .map_or(trellis_model::DEFAULT_GC_AFTER_SECONDS, |s| {
                s.gc_after_seconds
            });
        if gone_since_ms.is_empty() {
            return Ok(());
        }
        let (records, _) = self.store.list("").await?;
        // A pod's record names its node in its value.
        let pod_nodes: Vec<Option<String>> = (records.iter())
            .map(|kv| {
                kv.key.starts_with(keys::PODS).then(|| {
                    serde_json::from_slice::<trellis_model::Pod>(&kv.value)
                        .ok()
                        .map(|p| p.node)
                })?
            })
            .collect();
        let garbage = collectable(
            (records.iter().zip(&pod_nodes)).map(|(kv, node)| (kv.key.as_str(), node.as_deref())),
            &gone_since_ms,
            now_ms,
            gc_after.saturating_mul(1000),
        );
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for g in garbage {
            by_node.entry(g.node).or_default().push(g.key);
        }
        for (node, keys_of_node) in by_node {
            for chunk in keys_of_node.chunks(DELETES_PER_TXN) {
                // Only while the node is still gone: an agent that just came back keeps
                // everything.
                let deleted = term
                    .txn(
                        self.store.as_ref(),
                        vec![Compare::Absent(keys::status(&node))],
                        chunk
                            .iter()
                            .map(|key| Op::Delete { key: key.clone() })
                            .collect(),
                    )
                    .await?;
                if deleted {
                    self.stats.collected.inc_by(chunk.len() as u64);
                    tracing::info!(
                        node,
                        records = chunk.len(),
                        epoch = term.epoch,
                        "collected records of a departed node"
                    );
                }
            }
        }
        Ok(())
    }
}
