//! The Trellis side of the proxy bench, run as a child process inside a bench namespace
//! (`trellis lab bench proxy-worker`), so that its peak memory and CPU are its own. It
//! prints one JSON [`WorkerReport`] on stdout.
//!
//! - `sync`: what the proxy loop does on its first pass (`agent::proxy::run`): every
//!   service port planned and set into the desired tables (the loop's `replan`), then the
//!   audit — the whole table rendered as the proxy renders it (`Desired::rendered`), the
//!   kernel's read back, repaired, applied in bounded transactions. From nothing this programs everything; on a table that already holds
//!   some services it adds the rest.
//! - `audit`: the desired tables built, then the audit alone, timed: rendering, the read
//!   back over netlink and the comparison (which must find nothing to do).
//! - `events`: the real proxy loop against an in-process embedded store holding the
//!   services; once its first pass is done, EndpointSlices are rewritten (an endpoint
//!   added, then removed again) and each is timed from the store write until the kernel
//!   announces the committed transaction.

use super::measure::own_rss_mb;
use super::monitor::CommitMonitor;
use super::synth::{CLUSTER_CIDR, Synth};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_agent::admin::Metrics;
use trellis_agent::nft_table::RenderedTable;
use trellis_agent::nft_table::kernel::{self, Applied};
use trellis_agent::nft_table::repair;
use trellis_agent::proxy::reconcile::{Desired, scope};
use trellis_agent::proxy::run::{ProxyConfig, ProxyKernel, run};
use trellis_agent::state::ClusterState;
use trellis_dataplane::nftables::Nft;
use trellis_model::PodCidrAllocation;
use trellis_proxy::{IpFamily, NodeView, PortWithEndpoints, plan};
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    pub task: Task,
    #[arg(long)]
    pub services: usize,
    #[arg(long)]
    pub endpoints: usize,
    /// Service 0's endpoints are this address and the next ones.
    #[arg(long)]
    pub backend: Option<Ipv4Addr>,
    /// `events`: how many EndpointSlice rewrites to time.
    #[arg(long, default_value_t = 20)]
    pub changes: usize,
    /// `audit`: how many audits to time.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    Sync,
    Audit,
    Events,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The measured work (ms); for `audit` the median of the repetitions, for `events`
    /// the median latency.
    pub total_ms: f64,
    /// Where the time went (ms), by phase.
    pub phases: BTreeMap<String, f64>,
    /// Peak resident memory (MB) after each phase, the first time it ends.
    pub peak_rss_mb: BTreeMap<String, f64>,
    pub transactions: usize,
    pub ops: usize,
    pub refused: usize,
    pub first_refusal: Option<String>,
    pub longest_transaction_ms: f64,
    pub heaviest_transaction: usize,
    /// Differences the audit found (must be 0 once programmed).
    pub drift: usize,
    /// Units of work the audit would apply (0: nothing to do).
    pub units: usize,
    pub chains: usize,
    pub rules: usize,
    /// `audit`: each repetition (ms); `events`: each change's latency (ms).
    pub samples_ms: Vec<f64>,
    pub notes: Vec<String>,
}

impl WorkerReport {
    fn phase(&mut self, name: &str, d: Duration) {
        *self.phases.entry(name.to_string()).or_default() += ms(d);
        // The first time: the IPv4 table, which holds every service here.
        self.peak_rss_mb
            .entry(name.to_string())
            .or_insert_with(|| own_rss_mb().0);
    }

    fn applied(&mut self, a: &Applied) {
        self.transactions += a.transactions;
        self.ops += a.ops;
        self.refused += a.refused.len();
        if self.first_refusal.is_none() {
            self.first_refusal = a
                .refused
                .first()
                .map(|(what, why)| format!("{what}: {why}"));
        }
        self.longest_transaction_ms = self.longest_transaction_ms.max(ms(a.longest_transaction));
        self.heaviest_transaction = self.heaviest_transaction.max(a.heaviest_transaction);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs one task and prints its report.
pub fn main(args: WorkerArgs) -> anyhow::Result<()> {
    let report = match args.task {
        Task::Sync => sync(&args)?,
        Task::Audit => audit(&args)?,
        Task::Events => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(events(&args))?
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The node the bench's proxy runs on: no NodePort addresses (no NodePorts are used),
/// the bench's pod network.
fn node_view() -> NodeView {
    NodeView {
        name: "bench".into(),
        node_port_addresses: Vec::new(),
        cluster_cidrs: Synth::cluster_cidrs(),
    }
}

fn inputs(args: &WorkerArgs, r: &mut WorkerReport) -> anyhow::Result<Vec<PortWithEndpoints>> {
    let synth = Synth::new(args.services, args.endpoints, args.backend)?;
    let t = Instant::now();
    let ports = synth.ports()?;
    r.phase("input (not counted)", t.elapsed());
    Ok(ports)
}

/// The loop's `replan` of every service: each port planned and set into both families'
/// desired tables, the health checks planned per service.
fn replan(ports: &[PortWithEndpoints], r: &mut WorkerReport) -> [Desired; 2] {
    let node = node_view();
    let mut desired = [
        Desired::new(&plan::node_table(IpFamily::V4, &node)),
        Desired::new(&plan::node_table(IpFamily::V6, &node)),
    ];
    let (mut planning, mut setting, mut health) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for pw in ports {
        let (port, endpoints) = pw;
        for d in &mut desired {
            let t = Instant::now();
            let rules = plan::plan_port(port, endpoints, &node, d.family());
            planning += t.elapsed();
            let t = Instant::now();
            // The first pass drops these units: the audit that follows programs.
            drop(d.set_port(&port.name, Some(rules)));
            setting += t.elapsed();
        }
        let t = Instant::now();
        drop(plan::plan(std::slice::from_ref(pw), &node).health_checks);
        health += t.elapsed();
    }
    r.phase("plan (plan_port)", planning);
    r.phase("set_port (render per port, element claims)", setting);
    r.phase("plan again for health checks", health);
    desired
}

/// The whole desired table of one family, as the proxy renders it.
fn rendered(d: &Desired, r: &mut WorkerReport) -> RenderedTable {
    let t = Instant::now();
    let table = d.rendered();
    r.phase("render whole table", t.elapsed());
    table
}

fn sync(args: &WorkerArgs) -> anyhow::Result<WorkerReport> {
    let mut r = WorkerReport::default();
    let ports = inputs(args, &mut r)?;
    let nft = Nft::connect()?;
    let started = Instant::now();
    let desired = replan(&ports, &mut r);
    for d in &desired {
        let want = rendered(d, &mut r);
        r.chains += want.chains.len();
        r.rules += want.chains.values().map(|c| c.rules.len()).sum::<usize>();
        let t = Instant::now();
        let have = kernel::read(&nft, scope(d.family()))
            .with_context(|| format!("reading the {} table back", d.family()))?;
        r.phase("read kernel table", t.elapsed());
        let t = Instant::now();
        let (units, drift) = repair(scope(d.family()), want, &have);
        r.phase("repair (diff)", t.elapsed());
        r.drift += drift.total();
        r.units += units.len();
        let t = Instant::now();
        let applied = kernel::apply(&nft, units);
        r.phase("apply (encode + kernel commit)", t.elapsed());
        r.applied(&applied);
    }
    r.total_ms = ms(started.elapsed());
    r.peak_rss_mb.insert("end".into(), own_rss_mb().0);
    Ok(r)
}

fn audit(args: &WorkerArgs) -> anyhow::Result<WorkerReport> {
    let mut setup = WorkerReport::default();
    let ports = inputs(args, &mut setup)?;
    let desired = replan(&ports, &mut setup);
    drop(ports);
    let nft = Nft::connect()?;
    let mut r = WorkerReport::default();
    let mut totals = Vec::new();
    for _ in 0..args.reps.max(1) {
        let mut rep = WorkerReport::default();
        let started = Instant::now();
        for d in &desired {
            let want = rendered(d, &mut rep);
            let t = Instant::now();
            let have = kernel::read(&nft, scope(d.family()))
                .with_context(|| format!("reading the {} table back", d.family()))?;
            rep.phase("read kernel table", t.elapsed());
            let t = Instant::now();
            let (units, drift) = repair(scope(d.family()), want, &have);
            rep.phase("repair (diff)", t.elapsed());
            rep.drift += drift.total();
            rep.units += units.len();
            rep.chains += have.chains.len();
            rep.rules += have
                .chains
                .values()
                .map(|c| c.comments.len())
                .sum::<usize>();
        }
        let total = ms(started.elapsed());
        totals.push(total);
        rep.total_ms = total;
        r = rep;
    }
    let mut sorted = totals.clone();
    sorted.sort_by(f64::total_cmp);
    r.total_ms = sorted[sorted.len() / 2];
    r.samples_ms = totals;
    // What the loop's periodic audit costs when the ruleset generation shows that nothing
    // but the proxy committed since it last verified the tables: this one round trip.
    let t = Instant::now();
    nft.generation().context("reading the ruleset generation")?;
    r.phase(
        "generation check (a periodic audit with nothing to read)",
        t.elapsed(),
    );
    r.notes.push(format!(
        "the phases are the last repetition's; setting up the desired tables took {:.0} ms",
        setup.phases.values().sum::<f64>()
    ));
    r.peak_rss_mb.insert("end".into(), own_rss_mb().0);
    Ok(r)
}

async fn events(args: &WorkerArgs) -> anyhow::Result<WorkerReport> {
    let synth = Synth::new(args.services, args.endpoints, args.backend)?;
    let mut r = WorkerReport::default();
    let store = EmbeddedStore::new();
    let t = Instant::now();
    for i in 0..synth.services {
        store
            .put(
                &Synth::service_key(i),
                serde_json::to_vec(&Synth::service_json(i))?,
            )
            .await?;
        store
            .put(
                &Synth::slice_key(i),
                serde_json::to_vec(&synth.slice_json(i, false))?,
            )
            .await?;
    }
    r.phase("store filled (not counted)", t.elapsed());

    let kernel = Arc::new(ProxyKernel {
        nft: Nft::connect()?,
        conntrack: None,
    });
    let metrics = Metrics::new("bench");
    // The pod network comes to the proxy from cluster state: one allocation covers it.
    let mut state = ClusterState::default();
    state.pod_cidrs.insert(
        "bench".into(),
        PodCidrAllocation {
            node: "bench".into(),
            cidr: CLUSTER_CIDR.parse()?,
            epoch: 1,
        },
    );
    let (_state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(state));
    let started = Instant::now();
    let proxy = tokio::spawn(run(
        store.clone() as Arc<dyn Store>,
        kernel,
        ProxyConfig {
            node: "bench".into(),
            node_port_addresses: Vec::new(),
            // No audit during the changes: each is timed alone.
            audit_interval: Duration::from_secs(3600),
            stale_after: Duration::from_secs(3600),
        },
        state_rx,
        metrics.proxy(),
    ));
    while metrics.first_sample("trellis_proxy_sync_duration_seconds_count") < 1.0 {
        if started.elapsed() > Duration::from_secs(900) {
            proxy.abort();
            bail!("the proxy loop's first pass did not end within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.phase(
        "first pass of the loop (list, plan, audit of the table present)",
        started.elapsed(),
    );
    r.drift = metrics.first_sample("trellis_proxy_drift_repaired_total") as usize;

    let mut monitor = CommitMonitor::open().context("listening for nftables commits")?;
    let mut latencies = Vec::new();
    let mut missed = 0;
    for c in 0..args.changes {
        let (i, add) = super::synth::change_target(c, synth.services);
        let value = serde_json::to_vec(&synth.slice_json(i, add))?;
        // Each change comes 50 ms after the loop finished the last (or its first pass),
        // with its metrics and health published.
        tokio::time::sleep(Duration::from_millis(50)).await;
        monitor.drain();
        let t0 = Instant::now();
        store.put(&Synth::slice_key(i), value).await?;
        let seen = tokio::task::block_in_place(|| monitor.wait_commit(Duration::from_secs(10)))?;
        match seen {
            Some(t1) => latencies.push(ms(t1 - t0)),
            None => missed += 1,
        }
    }
    let count = metrics.first_sample("trellis_proxy_programming_latency_seconds_count");
    let sum = metrics.first_sample("trellis_proxy_programming_latency_seconds_sum");
    let failures = metrics.first_sample("trellis_proxy_failures_total");
    proxy.abort();
    if missed > 0 {
        r.notes
            .push(format!("{missed} change(s) saw no commit within 10 s"));
    }
    r.refused = failures as usize;
    r.notes.push(format!(
        "the loop's programming-latency histogram: {count} observations, mean {:.2} ms (from the batch reaching the loop to the apply's return)",
        if count > 0.0 { sum / count * 1000.0 } else { 0.0 }
    ));
    r.phases.insert(
        "programming latency histogram mean".into(),
        if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        },
    );
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    r.total_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    r.samples_ms = latencies;
    r.peak_rss_mb.insert("end".into(), own_rss_mb().0);
    Ok(r)
}
