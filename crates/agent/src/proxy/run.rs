//! The service proxy's loop: store → view → plan (per touched service port) → units →
//! kernel, then the audit (read back, repair) on a timer and after any failure, the
//! conntrack sweep after changes to UDP services, and the health-check ports.
//!
//! Nothing is programmed until both Services and EndpointSlices have been listed (an
//! endpoint-less view would program rejects), and a restart does not flush: the first
//! pass is an audit, which changes only what differs from the plan.

use super::health;
use super::metrics::ProxyMetrics;
use super::reconcile::{Desired, scope};
use super::source;
use super::view::{ServiceKey, ServiceView};
use crate::backoff::Backoff;
use crate::nft_table::kernel::{self, Applied};
use crate::nft_table::{Unit, repair};
use crate::state::ClusterState;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use trellis_dataplane::conntrack::{self, Conntrack};
use trellis_dataplane::nftables::Nft;
use trellis_proxy::conntrack::{Flow, FlowJudge};
use trellis_proxy::{HealthCheck, IpFamily, NodeView, Protocol, ServicePortName, plan};
use trellis_store::Store;

/// How long one nftables call of the proxy may take: reading back a table of 50,000
/// services (550,000 chains) takes seconds, longer than the module's default allows.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(60);

/// The kernel interfaces the proxy programs.
pub struct ProxyKernel {
    pub nft: Nft,
    /// `None`: stale UDP entries are not swept (no conntrack access).
    pub conntrack: Option<Conntrack>,
}

impl ProxyKernel {
    /// nftables and conntrack in the current network namespace.
    pub fn connect() -> Result<ProxyKernel, trellis_dataplane::Error> {
        let conntrack = match Conntrack::connect() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("conntrack unavailable, stale UDP entries will not be swept: {e}");
                None
            }
        };
        Ok(ProxyKernel {
            nft: Nft::connect()?.with_timeout(NFT_TIMEOUT),
            conntrack,
        })
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub node: String,
    /// Where NodePorts and health-check ports answer.
    pub node_port_addresses: Vec<IpAddr>,
    /// Read the tables back and repair them at least this often.
    pub audit_interval: Duration,
    /// Health checks answer 503 once the last successful sync is older than this.
    pub stale_after: Duration,
}

/// Runs the proxy forever. `state` supplies the cluster's pod networks (for masquerade
/// decisions); everything else comes from the store.
pub async fn run(
    store: Arc<dyn Store>,
    kernel: Arc<ProxyKernel>,
    config: ProxyConfig,
    mut state: watch::Receiver<Arc<ClusterState>>,
    metrics: ProxyMetrics,
) {
    let (tx, mut rx) = mpsc::channel(64);
    for prefix in source::PREFIXES {
        tokio::spawn(source::follow(store.clone(), prefix, tx.clone()));
    }
    drop(tx);
    let (health_tx, health_rx) = watch::channel(BTreeMap::new());
    let (healthy_tx, healthy_rx) = watch::channel(false);
    tokio::spawn(health::serve(
        config.node_port_addresses.clone(),
        health_rx,
        healthy_rx,
    ));

    let mut proxy = Proxy::new(&config, cluster_cidrs(&state.borrow()), kernel, metrics);
    let mut pending: BTreeSet<ServiceKey> = BTreeSet::new();
    let mut next_audit = tokio::time::Instant::now() + config.audit_interval;
    let mut audit_backoff = Backoff::new(Duration::from_millis(500), config.audit_interval);
    let mut health_tick = tokio::time::interval(Duration::from_secs(1));
    let mut state_open = true;
    loop {
        tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else { break };
                let received = Instant::now();
                pending.extend(proxy.view.apply(update));
                while let Ok(more) = rx.try_recv() {
                    pending.extend(proxy.view.apply(more));
                }
                proxy.metrics.rejected_records.set(proxy.view.rejected().len() as i64);
                if !proxy.view.is_synced() {
                    continue;
                }
                let first = !proxy.programmed;
                // The first pass plans every service, which covers whatever piled up
                // before the view was complete.
                let piled_up = std::mem::take(&mut pending);
                let touched: Vec<ServiceKey> = if first {
                    proxy.view.service_keys().cloned().collect()
                } else {
                    piled_up.into_iter().collect()
                };
                let (units, udp_changed) = proxy.replan(&touched);
                let ok = if first {
                    // Whatever the kernel holds from before (a restart): change only what
                    // differs.
                    proxy.programmed = true;
                    proxy.audit().await
                } else {
                    let ok = proxy.apply(units).await;
                    proxy.metrics.programming_latency.observe(received.elapsed().as_secs_f64());
                    ok
                };
                proxy.metrics.sync_duration.observe(received.elapsed().as_secs_f64());
                if udp_changed || first {
                    proxy.sweep_conntrack().await;
                }
                health_tx.send_replace(proxy.health_checks());
                next_audit = tokio::time::Instant::now() + audit_backoff.next_pass(ok, config.audit_interval);
            }
            _ = tokio::time::sleep_until(next_audit), if proxy.programmed => {
                let ok = proxy.audit().await;
                proxy.sweep_conntrack().await;
                next_audit = tokio::time::Instant::now() + audit_backoff.next_pass(ok, config.audit_interval);
            }
            changed = state.changed(), if state_open => {
                if changed.is_err() {
                    // The state's owner is gone: keep the cluster networks as they are.
                    state_open = false;
                    continue;
                }
                let cidrs = cluster_cidrs(&state.borrow_and_update());
                if cidrs != proxy.cluster_cidrs && proxy.programmed {
                    tracing::info!(?cidrs, "cluster networks changed: replanning every service");
                    proxy.rebuild(cidrs);
                    let ok = proxy.audit().await;
                    next_audit = tokio::time::Instant::now() + audit_backoff.next_pass(ok, config.audit_interval);
                } else {
                    proxy.cluster_cidrs_pending(cidrs);
                }
            }
            _ = health_tick.tick() => {
                let fresh = proxy.last_ok.is_some_and(|t| t.elapsed() < config.stale_after);
                healthy_tx.send_if_modified(|h| std::mem::replace(h, fresh) != fresh);
            }
        }
    }
}

/// The pod networks: the pool the leader allocates from, else the nodes' own.
fn cluster_cidrs(state: &ClusterState) -> Vec<IpNet> {
    let pool = (state.settings.as_ref())
        .and_then(|s| s.pod_cidr_pool)
        .map(|p| p.cidr);
    let cidrs = (state.nodes.values())
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .chain(state.pod_cidrs.values().map(|a| a.cidr));
    pod_networks(pool, cidrs)
}

/// The pod networks from the leader's pool and the nodes' CIDRs: in the pool's family the
/// pool (it holds every CIDR the leader gives out), in the other family the nodes' own —
/// a dual-stack cluster's IPv6 pod CIDRs beside an IPv4 pool, which otherwise would all
/// be masqueraded as if from outside the cluster.
fn pod_networks(pool: Option<IpNet>, cidrs: impl Iterator<Item = IpNet>) -> Vec<IpNet> {
    let pool_family = pool.map(|p| p.addr().is_ipv4());
    let all: Vec<IpNet> = pool
        .into_iter()
        .chain(cidrs.filter(|c| pool_family != Some(c.addr().is_ipv4())))
        .collect();
    IpNet::aggregate(&all)
}

struct Proxy {
    node: NodeView,
    cluster_cidrs: Vec<IpNet>,
    view: ServiceView,
    desired: [Desired; 2],
    /// The ports each service had in the plan, to remove the ones it lost.
    ports_of: BTreeMap<ServiceKey, BTreeSet<ServicePortName>>,
    health: BTreeMap<ServiceKey, (u16, HealthCheck)>,
    kernel: Arc<ProxyKernel>,
    metrics: ProxyMetrics,
    programmed: bool,
    last_ok: Option<Instant>,
    stale_after: Duration,
    /// The ruleset generation at which the kernel was last known to hold the plan: while
    /// the generation stays there, nobody has committed anything, and an audit has
    /// nothing to read.
    verified: Option<u32>,
    /// Audits since the last full read, which happens at least every [`FULL_READ_EVERY`].
    audits_since_read: u32,
}

/// However still the ruleset looks, read it whole at least this often (in audits).
const FULL_READ_EVERY: u32 = 10;

impl Proxy {
    fn new(
        config: &ProxyConfig,
        cluster_cidrs: Vec<IpNet>,
        kernel: Arc<ProxyKernel>,
        metrics: ProxyMetrics,
    ) -> Proxy {
        let node = NodeView {
            name: config.node.clone(),
            node_port_addresses: config.node_port_addresses.clone(),
            cluster_cidrs: cluster_cidrs.clone(),
        };
        Proxy {
            desired: desired_tables(&node),
            node,
            cluster_cidrs,
            view: ServiceView::default(),
            ports_of: BTreeMap::new(),
            health: BTreeMap::new(),
            kernel,
            metrics,
            programmed: false,
            last_ok: None,
            stale_after: config.stale_after,
            verified: None,
            audits_since_read: 0,
        }
    }

    /// Remembers new cluster networks before the first programming (nothing to redo).
    fn cluster_cidrs_pending(&mut self, cidrs: Vec<IpNet>) {
        if !self.programmed && cidrs != self.cluster_cidrs {
            self.rebuild(cidrs);
        }
    }

    /// Replans every service for new cluster networks.
    fn rebuild(&mut self, cidrs: Vec<IpNet>) {
        self.node.cluster_cidrs = cidrs.clone();
        self.cluster_cidrs = cidrs;
        self.desired = desired_tables(&self.node);
        self.ports_of.clear();
        let all: Vec<ServiceKey> = self.view.service_keys().cloned().collect();
        self.replan(&all);
        // The plan changed and nothing was applied: the next audit must read and repair,
        // whatever the ruleset generation says.
        self.verified = None;
    }

    /// Replans the given services; returns the units to apply and whether a UDP port was
    /// among them.
    fn replan(&mut self, services: &[ServiceKey]) -> (Vec<Unit>, bool) {
        let mut units = Vec::new();
        let mut udp = false;
        for key in services {
            let ports = self.view.ports_of(key);
            let now: BTreeSet<ServicePortName> =
                ports.iter().map(|(p, _)| p.name.clone()).collect();
            let before = self.ports_of.remove(key).unwrap_or_default();
            for gone in before.difference(&now) {
                udp |= gone.protocol == Protocol::Udp;
                for d in &mut self.desired {
                    units.extend(d.set_port(gone, None));
                }
            }
            for (port, endpoints) in &ports {
                udp |= port.name.protocol == Protocol::Udp;
                for d in &mut self.desired {
                    let rules = plan::plan_port(port, endpoints, &self.node, d.family());
                    units.extend(d.set_port(&port.name, Some(rules)));
                }
            }
            let check = ports
                .iter()
                .find_map(|(port, endpoints)| plan::health_check(port, endpoints, &self.node));
            match check {
                Some(check) => self.health.insert(key.clone(), check),
                None => self.health.remove(key),
            };
            if !now.is_empty() {
                self.ports_of.insert(key.clone(), now);
            }
        }
        self.metrics.service_ports.set(
            self.desired
                .iter()
                .map(Desired::port_count)
                .max()
                .unwrap_or(0) as i64,
        );
        (crate::nft_table::units::ordered(units), udp)
    }

    fn synced(&mut self) {
        let now = Instant::now();
        self.last_ok = Some(now);
        self.metrics.last_sync.synced(now, self.stale_after);
    }

    fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        self.health.values().cloned().collect()
    }

    /// Applies units off the async threads; true when the kernel took all of them.
    async fn apply(&mut self, units: Vec<Unit>) -> bool {
        if units.is_empty() {
            return true;
        }
        let kernel = self.kernel.clone();
        let result = tokio::task::spawn_blocking(move || {
            let before = kernel.nft.generation().ok();
            let applied = kernel::apply(&kernel.nft, units);
            let after = kernel.nft.generation().ok();
            (applied, before, after)
        })
        .await;
        match result {
            Ok((applied, before, after)) => {
                let ok = self.record(&applied);
                self.verified = if ok {
                    still_verified(self.verified, before, after, applied.transactions)
                } else {
                    None
                };
                ok
            }
            Err(e) => {
                self.verified = None;
                self.record(&Applied {
                    refused: vec![("applying changes".into(), e.to_string())],
                    ..Applied::default()
                })
            }
        }
    }

    fn record(&mut self, applied: &Applied) -> bool {
        self.metrics.operations.inc_by(applied.ops as u64);
        self.metrics
            .transactions
            .inc_by(applied.transactions as u64);
        self.metrics.failures.inc_by(applied.refused.len() as u64);
        let ok = applied.log_refused("proxy");
        if ok {
            self.synced();
        }
        ok
    }

    /// Reads both tables back and repairs every difference; true when nothing was refused.
    /// When the ruleset generation shows that nobody committed anything since the kernel
    /// was last known to hold the plan, there is nothing to read (but a full read happens
    /// at least every [`FULL_READ_EVERY`] audits regardless).
    async fn audit(&mut self) -> bool {
        let started = Instant::now();
        self.audits_since_read += 1;
        // A commit that was not ours since the tables were verified (someone tampered
        // with them) means a full read now, not at the next periodic one.
        let generation = {
            let kernel = self.kernel.clone();
            tokio::task::spawn_blocking(move || kernel.nft.generation().ok())
                .await
                .ok()
                .flatten()
        };
        let full = self.verified.is_none()
            || generation.is_none()
            || generation != self.verified
            || self.audits_since_read >= FULL_READ_EVERY;
        let wanted: Vec<_> = if full {
            self.desired
                .iter_mut()
                .map(|d| {
                    d.prune_shapes();
                    (d.family(), d.rendered())
                })
                .collect()
        } else {
            Vec::new()
        };
        let verified = self.verified;
        let kernel = self.kernel.clone();
        let result = tokio::task::spawn_blocking(move || {
            let before = kernel.nft.generation().ok();
            if !full && before.is_some() && before == verified {
                return (0, Applied::default(), before, before, false);
            }
            if !full {
                // A commit slipped in since the generation was read: nothing was rendered
                // to compare with, so nothing is verified; the next audit reads in full.
                return (0, Applied::default(), before, None, true);
            }
            let mut drift_total = 0;
            let mut applied = Applied::default();
            for (family, rendered) in wanted {
                match kernel::read(&kernel.nft, scope(family)) {
                    Ok(have) => {
                        let (units, drift) = repair(scope(family), rendered, &have);
                        if drift.total() > 0 {
                            tracing::info!(%family, ?drift, "proxy audit: repairing drift");
                        }
                        drift_total += drift.total();
                        let a = kernel::apply(&kernel.nft, units);
                        applied.ops += a.ops;
                        applied.transactions += a.transactions;
                        applied.refused.extend(a.refused);
                    }
                    Err(e) => applied
                        .refused
                        .push((format!("reading the {family} table back"), e.to_string())),
                }
            }
            let after = kernel.nft.generation().ok();
            (drift_total, applied, before, after, true)
        })
        .await;
        let ok = match result {
            Ok((_, _, _, _, false)) => {
                self.metrics.audits_unchanged.inc();
                self.synced();
                true
            }
            Ok((drift, applied, before, after, true)) => {
                self.audits_since_read = 0;
                self.metrics.drift_repaired.inc_by(drift as u64);
                let ok = self.record(&applied);
                // Read at `before`, and every commit since was ours: the kernel holds the
                // plan at `after`.
                self.verified = if ok {
                    still_verified(before, before, after, applied.transactions)
                } else {
                    None
                };
                ok
            }
            Err(e) => {
                tracing::warn!("proxy audit: {e}");
                self.verified = None;
                false
            }
        };
        self.metrics
            .audit_duration
            .observe(started.elapsed().as_secs_f64());
        ok
    }

    /// Deletes UDP conntrack entries the plan makes stale.
    async fn sweep_conntrack(&mut self) {
        if self.kernel.conntrack.is_none() {
            return;
        }
        let judges: Vec<(IpFamily, FlowJudge)> = self
            .desired
            .iter()
            .map(|d| (d.family(), FlowJudge::new(&d.table(&self.node))))
            .collect();
        let kernel = self.kernel.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let ct = kernel.conntrack.as_ref().expect("checked");
            let entries = ct.entries(&conntrack::Filter::protocol(conntrack::Protocol::UDP))?;
            let stale: Vec<_> = entries
                .into_iter()
                .filter(|e| {
                    let flow = Flow {
                        protocol: Protocol::Udp,
                        original_dst: e.original.dst,
                        original_dport: e.original.dport,
                        reply_src: e.reply.src,
                        reply_sport: e.reply.sport,
                    };
                    let family = IpFamily::of(e.original.dst);
                    judges
                        .iter()
                        .any(|(f, judge)| *f == family && judge.is_stale(&flow))
                })
                .collect();
            ct.delete_entries(&stale)
        })
        .await;
        match swept {
            Ok(Ok(removed)) => {
                if removed > 0 {
                    tracing::info!(removed, "stale UDP conntrack entries deleted");
                }
                self.metrics.conntrack_removed.inc_by(removed as u64);
            }
            Ok(Err(e)) => tracing::warn!("conntrack sweep: {e}"),
            Err(e) => tracing::warn!("conntrack sweep: {e}"),
        }
    }
}

/// The generation at which the kernel still holds the plan after `transactions` commits of
/// ours between readings `before` and `after`: known only if it held it at `before`
/// (`verified`) and nobody else committed in between.
fn still_verified(
    verified: Option<u32>,
    before: Option<u32>,
    after: Option<u32>,
    transactions: usize,
) -> Option<u32> {
    let (verified, before, after) = (verified?, before?, after?);
    (verified == before && after == before.wrapping_add(transactions as u32)).then_some(after)
}

fn desired_tables(node: &NodeView) -> [Desired; 2] {
    IpFamily::BOTH.map(|family| Desired::new(&plan::node_table(family, node)))
}

#[cfg(test)]
mod tests {
    use super::{pod_networks, still_verified};
    use ipnet::IpNet;

    #[test]
    fn the_pod_networks_are_the_pool_in_its_family_and_the_nodes_cidrs_in_the_other() {
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().map(|n| n.parse().unwrap()).collect() };
        let nodes = nets(&[
            "10.244.0.0/24",
            "10.244.1.0/24",
            "fd00:10:244::/64",
            "fd00:10:244:1::/64",
        ]);
        assert_eq!(
            pod_networks(Some(nets(&["10.244.0.0/16"])[0]), nodes.iter().copied()),
            nets(&["10.244.0.0/16", "fd00:10:244::/63"])
        );
        assert_eq!(
            pod_networks(None, nodes.iter().copied()),
            nets(&["10.244.0.0/23", "fd00:10:244::/63"])
        );
        assert_eq!(
            pod_networks(
                Some(nets(&["10.244.0.0/16"])[0]),
                nodes[..2].iter().copied()
            ),
            nets(&["10.244.0.0/16"]),
            "a single-stack cluster with a pool: the pool, as before"
        );
    }

    #[test]
    fn the_kernel_is_still_known_right_only_when_every_commit_between_was_ours() {
        assert_eq!(still_verified(Some(7), Some(7), Some(9), 2), Some(9));
        assert_eq!(still_verified(Some(7), Some(7), Some(7), 0), Some(7));
        assert_eq!(
            still_verified(Some(7), Some(7), Some(10), 2),
            None,
            "someone else committed"
        );
        assert_eq!(
            still_verified(Some(6), Some(7), Some(8), 1),
            None,
            "changed before we began"
        );
        assert_eq!(
            still_verified(None, Some(7), Some(8), 1),
            None,
            "never verified"
        );
        assert_eq!(
            still_verified(Some(7), None, Some(8), 1),
            None,
            "generation unreadable"
        );
        assert_eq!(
            still_verified(Some(u32::MAX), Some(u32::MAX), Some(0), 1),
            Some(0)
        );
    }
}
