//! Network policy's loop: store → view → plan for this node's pods → render per family →
//! the units that take the kernel from what it was last made to hold to the new tables,
//! then the audit (read back, repair, count drops) on a timer and after any failure.
//!
//! Nothing is programmed until policies, pods and namespaces have all been listed (a
//! partial view would allow or deny what nobody meant), and a restart does not flush: the
//! first pass is an audit, which changes only what differs from the plan. The plan is
//! computed whole on each batch of changes (a burst is one batch): it is a pure function of
//! the view, and the diff against the last applied tables keeps the kernel's share of the
//! work to what changed.

use super::local;
use super::metrics::PolicyMetrics;
use super::render::{Guard, RenderedPolicy, render, scope};
use super::view::{PREFIXES, PolicyView};
use crate::backoff::Backoff;
use crate::nft_table::kernel::{self, Applied};
use crate::nft_table::{KernelTable, repair};
use crate::proxy::source;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use trellis_dataplane::nftables::Nft;
use trellis_policy::plan::plan;
use trellis_proxy::IpFamily;
use trellis_store::Store;

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub node: String,
    /// Read the tables back and repair them at least this often.
    pub audit_interval: Duration,
    /// The CNI plugin's allocation file: this node's pods from their ADD on (`None`: from
    /// the store only).
    pub cni_allocations: Option<PathBuf>,
    /// Write this node's pods to the store (stores Trellis owns). Off on Kubernetes, whose
    /// API server has the pods, and where their labels must come from it.
    pub publish_pods: bool,
    /// Where to tell the CNI plugin which attachments' rules are in place (its ADD waits
    /// for them; `None`: not told).
    pub programmed_file: Option<PathBuf>,
}

/// Runs network policy forever.
pub async fn run(
    store: Arc<dyn Store>,
    nft: Arc<Nft>,
    config: PolicyConfig,
    metrics: PolicyMetrics,
) {
    let (tx, mut rx) = mpsc::channel(64);
    for prefix in PREFIXES {
        tokio::spawn(source::follow(store.clone(), prefix, tx.clone()));
    }
    drop(tx);
    let (local_tx, mut local_rx) = watch::channel(None);
    let view = match &config.cni_allocations {
        Some(path) => {
            tokio::spawn(local::follow(path.clone(), config.node.clone(), local_tx));
            if config.publish_pods {
                tokio::spawn(local::publish(
                    store.clone(),
                    config.node.clone(),
                    local_rx.clone(),
                ));
            }
            PolicyView::with_local_pods(&config.node, !config.publish_pods)
        }
        None => PolicyView::default(),
    };
    let mut local_open = config.cni_allocations.is_some();
    let mut enforcer = Enforcer {
        node: config.node.clone(),
        view,
        applied: None,
        nft,
        metrics,
        drop_counts: BTreeMap::new(),
        guard: config.cni_allocations.is_some(),
        local: None,
        planned_local: BTreeSet::new(),
        programmed_file: config.programmed_file.clone(),
        programmed: None,
    };
    if let Some(path) = &config.programmed_file {
        // A file from an earlier run would answer for rules this run has not written.
        let _ = std::fs::remove_file(path);
    }
    let mut next_audit = tokio::time::Instant::now() + config.audit_interval;
    let mut backoff = Backoff::new(Duration::from_millis(500), config.audit_interval);
    loop {
        let received;
        let mut changed = false;
        tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else { break };
                received = Instant::now();
                changed |= enforcer.view.apply(update);
            }
            open = local_rx.changed(), if local_open => {
                received = Instant::now();
                local_open = open.is_ok();
            }
            _ = tokio::time::sleep_until(next_audit), if enforcer.applied.is_some() => {
                let wanted = enforcer.replan();
                let ok = enforcer.audit(wanted).await;
                next_audit = tokio::time::Instant::now() + backoff.next_pass(ok, config.audit_interval);
                continue;
            }
        }
        // Whatever else is waiting goes into the same pass.
        while let Ok(more) = rx.try_recv() {
            changed |= enforcer.view.apply(more);
        }
        if let Some(local) = local_rx.borrow_and_update().clone() {
            changed |= enforcer.view.set_local(local.pods.clone());
            enforcer.local = Some(local);
        }
        enforcer
            .metrics
            .rejected_records
            .set(enforcer.view.rejected().len() as i64);
        if !enforcer.view.is_synced() || (!changed && enforcer.applied.is_some()) {
            continue;
        }
        let wanted = enforcer.replan();
        let ok = if enforcer.applied.is_none() {
            enforcer.audit(wanted).await
        } else {
            let ok = enforcer.apply(wanted).await;
            enforcer
                .metrics
                .programming_latency
                .observe(received.elapsed().as_secs_f64());
            ok
        };
        next_audit = tokio::time::Instant::now() + backoff.next_pass(ok, config.audit_interval);
    }
}

type Tables = [(IpFamily, RenderedPolicy); 2];

struct Enforcer {
    node: String,
    view: PolicyView,
    /// What the kernel was last made to hold (by an apply that went through, or an audit).
    applied: Option<Tables>,
    nft: Arc<Nft>,
    metrics: PolicyMetrics,
    /// Per check chain, the packets its drop rule had counted at the last audit.
    drop_counts: BTreeMap<(IpFamily, String), u64>,
    /// Refuse traffic of this node's pods' interfaces from and to unknown addresses.
    guard: bool,
    /// This node's pods as the CNI plugin made them, and those the last plan covered.
    local: Option<super::local::LocalState>,
    planned_local: BTreeSet<String>,
    programmed_file: Option<PathBuf>,
    /// What the programmed file last said.
    programmed: Option<Vec<String>>,
}

impl Enforcer {
    /// The tables the view asks for now.
    fn replan(&mut self) -> Tables {
        let (cluster, pods) = self.view.cluster();
        self.planned_local = (pods.iter())
            .filter(|p| p.node == self.node)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let mut node_plan = plan(&cluster, &pods, &self.node, []);
        // Unnamed attachments: known to the guard, isolated by nothing.
        for ip in (self.local.iter()).flat_map(|l| l.unnamed.values().flatten()) {
            node_plan.ingress.entry(*ip).or_insert(None);
            node_plan.egress.entry(*ip).or_insert(None);
        }
        let selected = (node_plan.ingress.iter().chain(&node_plan.egress))
            .filter(|(_, check)| check.is_some())
            .map(|(ip, _)| *ip)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        self.metrics.policies.set(self.view.policy_count() as i64);
        self.metrics.pods_selected.set(selected as i64);
        // The guard refuses addresses the agent has not programmed while any policy is in
        // force. With none, nothing could isolate a pod, and a pod made while this agent is
        // down (its rules cannot be written) keeps its traffic, as without network policy.
        let guard = (self.guard && self.view.policy_count() > 0).then_some(Guard {
            prefix: trellis_cni::node::HOST_IFNAME_PREFIX,
        });
        IpFamily::BOTH.map(|family| (family, render(&node_plan, family, guard)))
    }

    /// Applies the difference between the last applied tables and `wanted`.
    async fn apply(&mut self, wanted: Tables) -> bool {
        let applied = self
            .applied
            .take()
            .expect("applied before any event is applied");
        let mut units = Vec::new();
        for ((family, want), (_, had)) in wanted.iter().zip(&applied) {
            let (more, _) = repair(
                scope(*family),
                want.table.clone(),
                &KernelTable::holding(&had.table),
            );
            units.extend(more);
        }
        let units = crate::nft_table::units::ordered(units);
        let nft = self.nft.clone();
        let result = tokio::task::spawn_blocking(move || kernel::apply(&nft, units)).await;
        let ok = match result {
            Ok(done) => self.record(&done),
            Err(e) => self.record(&Applied {
                refused: vec![("applying changes".into(), e.to_string())],
                ..Applied::default()
            }),
        };
        // A refused unit leaves the kernel somewhere between the two: the audit that
        // follows soon (with backoff) reads it back.
        self.applied = Some(wanted);
        ok
    }

    /// Reads both tables back, repairs every difference and counts drops; true when
    /// nothing was refused.
    async fn audit(&mut self, wanted: Tables) -> bool {
        let started = Instant::now();
        let nft = self.nft.clone();
        let tables = wanted.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut drift = 0;
            let mut applied = Applied::default();
            let mut counted = BTreeMap::new();
            for (family, want) in tables {
                match kernel::read(&nft, scope(family)) {
                    Ok(have) => {
                        for chain in want.drops.keys() {
                            let packets = (have.chains.get(chain))
                                .and_then(|c| c.counted.last().copied().flatten())
                                .map_or(0, |(packets, _)| packets);
                            counted.insert((family, chain.clone()), packets);
                        }
                        let (units, found) = repair(scope(family), want.table, &have);
                        if found.total() > 0 {
                            tracing::info!(%family, ?found, "network policy audit: repairing drift");
                        }
                        drift += found.total();
                        let a = kernel::apply(&nft, units);
                        applied.ops += a.ops;
                        applied.transactions += a.transactions;
                        applied.refused.extend(a.refused);
                    }
                    Err(e) => applied
                        .refused
                        .push((format!("reading the {family} table back"), e.to_string())),
                }
            }
            (drift, applied, counted)
        })
        .await;
        let ok = match result {
            Ok((drift, applied, counted)) => {
                self.metrics.drift_repaired.inc_by(drift as u64);
                self.count_drops(&wanted, counted);
                self.record(&applied)
            }
            Err(e) => {
                tracing::warn!("network policy audit: {e}");
                false
            }
        };
        self.applied = Some(wanted);
        self.metrics
            .audit_duration
            .observe(started.elapsed().as_secs_f64());
        ok
    }

    /// Adds what each drop rule counted since the last audit to its policies. A chain made
    /// anew starts from zero, so a count lower than the last is all new.
    fn count_drops(&mut self, wanted: &Tables, counted: BTreeMap<(IpFamily, String), u64>) {
        let mut now = BTreeMap::new();
        for ((family, chain), packets) in counted {
            let before = (self.drop_counts.get(&(family, chain.clone())))
                .copied()
                .unwrap_or(0);
            let new = if packets >= before {
                packets - before
            } else {
                packets
            };
            now.insert((family, chain.clone()), packets);
            if new == 0 {
                continue;
            }
            let Some((direction, policies)) = (wanted.iter())
                .find(|(f, _)| *f == family)
                .and_then(|(_, t)| t.drops.get(&chain))
            else {
                continue;
            };
            for policy in policies {
                self.metrics
                    .dropped
                    .get_or_create(&vec![
                        (
                            "policy".to_string(),
                            format!("{}/{}", policy.namespace, policy.name),
                        ),
                        ("direction".to_string(), direction.name().to_string()),
                    ])
                    .inc_by(new);
            }
        }
        self.drop_counts = now;
    }

    /// Tells the plugin which attachments' rules are in the kernel, once they are.
    fn report_programmed(&mut self) {
        let (Some(path), Some(local)) = (&self.programmed_file, &self.local) else {
            return;
        };
        let ids: Vec<String> = (local.attachments.iter())
            .filter(|(pod, _)| self.planned_local.contains(*pod))
            .flat_map(|(_, ids)| ids.iter().cloned())
            .chain(local.unnamed.keys().cloned())
            .collect();
        if self.programmed.as_ref() == Some(&ids) {
            return;
        }
        match super::local::write_programmed(path, &ids) {
            Ok(()) => self.programmed = Some(ids),
            Err(e) => {
                tracing::warn!(path = %path.display(), "network policy: telling the CNI plugin what is programmed: {e}")
            }
        }
    }

    fn record(&mut self, applied: &Applied) -> bool {
        self.metrics.failures.inc_by(applied.refused.len() as u64);
        let ok = applied.log_refused("network policy");
        if ok {
            self.report_programmed();
        }
        ok
    }
}
