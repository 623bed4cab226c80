//! `lab bench proxy`: the service proxy against kube-proxy's text path, measured in the
//! same run on this machine. Every side runs in namespaces of its own (`tl-<name>-…`,
//! removed at the end, also when interrupted) and as a process of its own, so its wall
//! time, peak memory and CPU are its alone (`wait4`):
//!
//! - **full sync** of N services × M endpoints from nothing: Trellis (a worker process:
//!   plan, render, netlink, as the proxy loop's first pass does it) against `nft -f` of
//!   the same services in kube-proxy's nftables shape, in another fresh namespace;
//! - **audit** of the whole table: Trellis reads it back over netlink and compares it
//!   with the plan (finding nothing to do); the peer `nft -j list table ip kube-proxy`;
//! - **endpoint change**: the real proxy loop with an in-process store, an EndpointSlice
//!   rewritten (an endpoint added, then removed), timed from the store write until the
//!   kernel announces the commit; the peer `nft -f` of the same change against its table;
//! - **cold start** at a larger N: total time, transactions and the longest one;
//! - **connection setup** through the proxy's node to a ClusterIP, with 10 and with N
//!   services programmed.
//!
//! Trellis programs exactly the table the proxy renders (`Desired::rendered`): endpoints
//! are elements of maps, picked by chains shared by every port of the same policy and
//! endpoint count (`shape-…`, see `trellis_proxy::ruleset`). The peer keeps kube-proxy's
//! own shape, a chain per service and per endpoint: that is the point of comparison.

pub mod connect;
pub(crate) mod measure;
pub(crate) mod monitor;
pub mod synth;
pub mod worker;

pub use worker::{WorkerArgs, main as worker_main};

use crate::{build, built};
use anyhow::{Context, bail};
use measure::Measured;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;
use synth::Synth;
use trellis_dataplane::netns;
use worker::WorkerReport;

/// How long a Trellis worker may take before it is killed (the cold start included).
const WORKER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Untimed connections before the timed ones of each round.
const WARMUP_CONNECTIONS: usize = 100;
/// Rounds of the connection case, alternating 10 and N services.
const CONNECT_ROUNDS: usize = 6;
/// Pause between programming and timing connections.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    FullSync,
    EndpointChange,
    Audit,
    ColdStart,
    Connect,
}

impl Case {
    pub const ALL: [Case; 5] = [
        Case::FullSync,
        Case::EndpointChange,
        Case::Audit,
        Case::ColdStart,
        Case::Connect,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::FullSync => "full sync",
            Case::EndpointChange => "one endpoint added or removed",
            Case::Audit => "audit of the whole table",
            Case::ColdStart => "cold start",
            Case::Connect => "connection setup to a ClusterIP",
        }
    }
}

pub struct ProxyArgs {
    pub name: String,
    pub services: usize,
    pub endpoints: usize,
    pub cold_start_services: usize,
    pub cases: Vec<Case>,
    pub changes: usize,
    pub connections: usize,
    pub peer: bool,
    pub peer_timeout: Duration,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub case: Option<Case>,
    pub services: usize,
    pub endpoints: usize,
    /// The headline: the whole operation, or the median of the samples.
    pub trellis_ms: Option<f64>,
    pub trellis_p99_ms: Option<f64>,
    pub trellis_max_ms: Option<f64>,
    pub trellis_rss_mb: Option<f64>,
    pub trellis_cpu_user_ms: Option<f64>,
    pub trellis_cpu_sys_ms: Option<f64>,
    pub peer_ms: Option<f64>,
    pub peer_max_ms: Option<f64>,
    pub peer_rss_mb: Option<f64>,
    pub peer_cpu_user_ms: Option<f64>,
    pub peer_cpu_sys_ms: Option<f64>,
    /// "ok", or why there is no peer number.
    pub peer_status: String,
    pub samples: Option<usize>,
    pub transactions: Option<usize>,
    pub max_transaction_ms: Option<f64>,
    pub heaviest_transaction: Option<usize>,
    pub target: Option<String>,
    pub met: Option<bool>,
    /// Where Trellis's time went, by phase (ms).
    pub phases_ms: BTreeMap<String, f64>,
    /// Peak memory after each phase (MB).
    pub peak_rss_after_mb: BTreeMap<String, f64>,
    pub notes: Vec<String>,
}

/// What the bench measured, and what stopped it early if anything did: the rows measured
/// before that are kept.
pub struct ProxyOutcome {
    pub rows: Vec<Row>,
    pub stopped: Option<anyhow::Error>,
}

pub async fn proxy(args: &ProxyArgs) -> ProxyOutcome {
    let mut rows = Vec::new();
    let _ = build::teardown(&args.name);
    built::building(&args.name);
    let stopped = Bench::new(args).run(&mut rows).await.err();
    // Big tables go with their namespaces; the kernel frees them in the background.
    if let Err(e) = build::teardown(&args.name) {
        eprintln!("removing the bench's namespaces: {e:#}");
    }
    rows.sort_by_key(|r| r.case);
    ProxyOutcome { rows, stopped }
}

struct Bench<'a> {
    args: &'a ProxyArgs,
    dir: PathBuf,
    /// The namespace holding Trellis's full table at N services, once it loaded.
    synced: Option<String>,
    /// The peer's namespace, once its table loaded.
    peer_loaded: Option<String>,
    /// Why the peer has no table, if it has none.
    peer_missing: String,
}

impl<'a> Bench<'a> {
    fn new(args: &'a ProxyArgs) -> Bench<'a> {
        Bench {
            args,
            dir: crate::state::dir(&args.name),
            synced: None,
            peer_loaded: None,
            peer_missing: "not run".into(),
        }
    }

    fn netns(&self, suffix: &str) -> String {
        format!("tl-{}-{suffix}", self.args.name)
    }

    fn wants(&self, case: Case) -> bool {
        self.args.cases.contains(&case)
    }

    async fn run(&mut self, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        // The quietest first: nothing big exists yet in the kernel.
        if self.wants(Case::Connect) {
            step("connection setup");
            rows.extend(self.connect().await?);
        }
        let needs_tables = [Case::FullSync, Case::Audit, Case::EndpointChange]
            .iter()
            .any(|c| self.wants(*c));
        if needs_tables {
            step("full sync");
            let full = self.full_sync().await?;
            if self.wants(Case::FullSync) {
                rows.push(full);
            }
        }
        if self.wants(Case::Audit) {
            step("audit");
            rows.push(self.audit().await?);
        }
        if self.wants(Case::EndpointChange) {
            step("endpoint changes");
            rows.push(self.endpoint_change().await?);
        }
        if self.wants(Case::ColdStart) {
            step("cold start");
            rows.push(self.cold_start().await?);
        }
        Ok(())
    }

    fn synth(&self, services: usize) -> anyhow::Result<Synth> {
        Synth::new(services, self.args.endpoints, None)
    }

    fn row(&self, case: Case, services: usize) -> Row {
        Row {
            case: Some(case),
            services,
            endpoints: self.args.endpoints,
            peer_status: if self.args.peer {
                "not run".into()
            } else {
                "not run (--no-peer)".into()
            },
            ..Row::default()
        }
    }

    // ---- full sync ----

    async fn full_sync(&mut self) -> anyhow::Result<Row> {
        let n = self.args.services;
        let ns = self.netns("t");
        netns::create(&ns)?;
        let mut row = self.row(Case::FullSync, n);
        row.target = Some("≤ 2000 ms and ≤ 100 MB".into());
        let (report, m) = run_worker(&ns, &worker_args("sync", n, self.args.endpoints)).await?;
        fill_trellis(&mut row, &m, report.as_ref());
        if let Some(r) = &report {
            eprintln!(
                "  Trellis: {:.0} ms, {:.1} MB peak, {} transactions",
                r.total_ms,
                m.rss_mb(),
                r.transactions
            );
            if r.refused == 0 {
                self.synced = Some(ns);
            }
            row.met = Some(r.refused == 0 && r.total_ms <= 2000.0 && m.rss_mb() <= 100.0);
        }
        if self.args.peer {
            let ns = self.netns("peer");
            netns::create(&ns)?;
            let synth = self.synth(n)?;
            let file = self.dir.join("peer-full-sync.nft");
            let text = synth.peer_ruleset();
            std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
            eprintln!(
                "  peer: nft -f of {:.1} MB of kube-proxy's nftables text (deadline {} s)",
                text.len() as f64 / 1e6,
                self.args.peer_timeout.as_secs()
            );
            drop(text);
            let m = nft(&ns, &["-f".into(), path_arg(&file)], self.args.peer_timeout).await?;
            eprintln!("  peer: {}", summary(&m));
            if m.ok() {
                self.peer_loaded = Some(ns);
            } else {
                self.peer_missing = format!("its table did not load ({})", m.failure());
            }
            fill_peer(&mut row, &m);
        }
        Ok(row)
    }

    // ---- audit ----

    async fn audit(&mut self) -> anyhow::Result<Row> {
        let n = self.args.services;
        let peer = match (&self.peer_loaded, self.args.peer) {
            (Some(ns), true) => {
                let m = nft(
                    ns,
                    &[
                        "-j".into(),
                        "list".into(),
                        "table".into(),
                        "ip".into(),
                        "kube-proxy".into(),
                    ],
                    self.args.peer_timeout,
                )
                .await?;
                eprintln!("  peer: nft -j list table: {}", summary(&m));
                Some(m)
            }
            _ => None,
        };
        let mut row = self.row(Case::Audit, n);
        row.target = Some("≤ 1000 ms".into());
        if let Some(ns) = &self.synced {
            let mut wargs = worker_args("audit", n, self.args.endpoints);
            wargs.extend(["--reps".into(), "3".into()]);
            let (report, m) = run_worker(ns, &wargs).await?;
            fill_trellis(&mut row, &m, report.as_ref());
            if let Some(r) = &report {
                row.samples = Some(r.samples_ms.len());
                row.trellis_max_ms = r.samples_ms.iter().copied().reduce(f64::max);
                row.notes.push(format!(
                    "read {} chains with {} rules; differences found: {}, units to apply: {}",
                    r.chains, r.rules, r.drift, r.units
                ));
                row.met = Some(r.total_ms <= 1000.0 && r.drift == 0 && r.units == 0);
                eprintln!(
                    "  Trellis: median {:.0} ms of {:?}, {:.1} MB peak, drift {}",
                    r.total_ms,
                    r.samples_ms.iter().map(|v| v.round()).collect::<Vec<_>>(),
                    m.rss_mb(),
                    r.drift
                );
            }
        } else {
            row.notes
                .push("not measured: Trellis's table did not load in the full sync".into());
        }
        match &peer {
            Some(m) => {
                fill_peer(&mut row, m);
                if m.ok() {
                    row.notes.push(format!(
                        "the peer printed {:.1} MB of JSON",
                        m.stdout_bytes as f64 / 1e6
                    ));
                }
            }
            None if self.args.peer => row.peer_status = format!("not run: {}", self.peer_missing),
            None => {}
        }
        Ok(row)
    }

    // ---- one endpoint added or removed ----

    async fn endpoint_change(&mut self) -> anyhow::Result<Row> {
        let n = self.args.services;
        let mut row = self.row(Case::EndpointChange, n);
        row.target = Some("≤ 5 ms (every change)".into());
        // The loop starts on the table the full sync programmed, as it would have left it.
        let ns = match &self.synced {
            Some(ns) => ns.clone(),
            None => {
                let ns = self.netns("events");
                netns::create(&ns)?;
                row.notes.push(
                    "the loop's first pass programmed the table from nothing (the full sync's table did not load)"
                        .into(),
                );
                ns
            }
        };
        let mut wargs = worker_args("events", n, self.args.endpoints);
        wargs.extend(["--changes".into(), self.args.changes.to_string()]);
        let (report, m) = run_worker(&ns, &wargs).await?;
        fill_trellis(&mut row, &m, report.as_ref());
        if let Some(r) = &report {
            let mut sorted = r.samples_ms.clone();
            sorted.sort_by(f64::total_cmp);
            row.samples = Some(sorted.len());
            row.trellis_max_ms = sorted.last().copied();
            row.trellis_p99_ms = Some(super::percentile(&sorted, 0.99));
            row.met = Some(
                r.refused == 0
                    && sorted.len() == self.args.changes
                    && sorted.last().is_some_and(|v| *v <= 5.0),
            );
            row.notes.push(format!(
                "Trellis latencies (ms), in the order measured: {}",
                r.samples_ms
                    .iter()
                    .map(|v| format!("{v:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            eprintln!(
                "  Trellis: median {:.2} ms, max {:.2} ms over {} changes",
                r.total_ms,
                row.trellis_max_ms.unwrap_or(0.0),
                sorted.len()
            );
        }
        if !self.args.peer {
            return Ok(row);
        }
        let Some(peer_ns) = self.peer_loaded.clone() else {
            row.peer_status = format!("not run: {}", self.peer_missing);
            return Ok(row);
        };
        let synth = self.synth(n)?;
        let mut walls = Vec::new();
        let mut worst: Option<Measured> = None;
        let mut failed = None;
        for c in 0..self.args.changes {
            let (i, add) = synth::change_target(c, n);
            let file = self.dir.join("peer-change.nft");
            std::fs::write(&file, synth.peer_change(i, add))?;
            let m = nft(
                &peer_ns,
                &["-f".into(), path_arg(&file)],
                self.args.peer_timeout,
            )
            .await?;
            if !m.ok() {
                failed = Some(m.failure());
                break;
            }
            walls.push(m.wall_ms());
            if worst.as_ref().is_none_or(|w| w.max_rss_kb < m.max_rss_kb) {
                worst = Some(m);
            }
        }
        walls.sort_by(f64::total_cmp);
        if let Some(why) = failed {
            row.peer_status = format!("failed after {} changes: {why}", walls.len());
        } else if let Some(w) = &worst {
            row.peer_status = "ok".into();
            row.peer_ms = Some(super::percentile(&walls, 0.5));
            row.peer_max_ms = walls.last().copied();
            row.peer_rss_mb = Some(w.rss_mb());
            row.peer_cpu_user_ms = Some(w.user.as_secs_f64() * 1000.0);
            row.peer_cpu_sys_ms = Some(w.sys.as_secs_f64() * 1000.0);
            row.notes.push(format!(
                "peer latencies (ms): {}",
                walls
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            eprintln!(
                "  peer: median {:.0} ms, max {:.0} ms, {:.0} MB peak",
                row.peer_ms.unwrap_or(0.0),
                row.peer_max_ms.unwrap_or(0.0),
                w.rss_mb()
            );
        }
        Ok(row)
    }

    // ---- cold start ----

    async fn cold_start(&mut self) -> anyhow::Result<Row> {
        let n = self.args.cold_start_services;
        let ns = self.netns("cold");
        netns::create(&ns)?;
        let mut row = self.row(Case::ColdStart, n);
        row.peer_status = "not run (kube-proxy issue 139513: 44k services took 16m44s)".into();
        row.target = Some(format!(
            "report it; every transaction ≤ {} ops",
            trellis_agent::nft_table::kernel::MAX_TRANSACTION_WEIGHT
        ));
        let (report, m) = run_worker(&ns, &worker_args("sync", n, self.args.endpoints)).await?;
        fill_trellis(&mut row, &m, report.as_ref());
        if let Some(r) = &report {
            row.met = Some(
                r.refused == 0
                    && r.heaviest_transaction
                        <= trellis_agent::nft_table::kernel::MAX_TRANSACTION_WEIGHT,
            );
            eprintln!(
                "  Trellis: {:.0} ms, {} transactions, longest {:.0} ms, heaviest {} ops, {:.1} MB peak",
                r.total_ms,
                r.transactions,
                r.longest_transaction_ms,
                r.heaviest_transaction,
                m.rss_mb()
            );
        }
        // Its table is not needed again: free the kernel's memory for what follows.
        let _ = netns::delete(&ns);
        Ok(row)
    }

    // ---- connection setup ----

    async fn connect(&mut self) -> anyhow::Result<Vec<Row>> {
        let line = connect::Line {
            client: self.netns("cli"),
            node: self.netns("node"),
            backend: self.netns("be"),
        };
        connect::build(&line, self.args.endpoints).await?;
        let _backend = connect::Backend::start(&line.backend)?;
        let to = SocketAddrV4::new(Synth::cluster_ip(0), synth::SERVICE_PORT);
        let mut next_port = connect::FIRST_SOURCE_PORT;
        let mut sizes = vec![10.min(self.args.services), self.args.services];
        sizes.dedup();
        // Rounds alternate the sizes, so that drift in the machine's load spreads over both.
        let per_round = (self.args.connections / CONNECT_ROUNDS).max(1);
        type Pool = (Vec<f64>, usize, Vec<f64>, BTreeMap<String, usize>);
        let mut pooled: BTreeMap<usize, Pool> = BTreeMap::new();
        for round in 0..CONNECT_ROUNDS {
            // 10, N, N, 10, …: drift in the machine's load weighs on both alike.
            let order: Vec<usize> = if round % 2 == 0 {
                sizes.clone()
            } else {
                sizes.iter().rev().copied().collect()
            };
            for n in order {
                let mut wargs = worker_args("sync", n, self.args.endpoints);
                wargs.extend(["--backend".into(), connect::BACKEND.to_string()]);
                let (report, m) = run_worker(&line.node, &wargs).await?;
                if report.as_ref().is_none_or(|r| r.refused > 0) {
                    bail!(
                        "programming {n} services for the connection case failed: {}",
                        m.failure()
                    );
                }
                // The kernel frees what a big commit replaced after a grace period: let
                // that pass before timing.
                tokio::time::sleep(SETTLE).await;
                let client = line.client.clone();
                let (lat, port) = tokio::task::spawn_blocking(move || {
                    let mut port = next_port;
                    connect::measure(&client, to, &mut port, WARMUP_CONNECTIONS, per_round)
                        .map(|lat| (lat, port))
                })
                .await??;
                next_port = port;
                eprintln!(
                    "  round {}, {n} services: p50 {:.0} µs, p99 {:.0} µs, {} failed {:?}",
                    round + 1,
                    lat.percentile(0.5),
                    lat.percentile(0.99),
                    lat.failed,
                    lat.errors
                );
                let entry = pooled.entry(n).or_default();
                entry.2.push(lat.percentile(0.5));
                entry.0.extend(lat.micros);
                entry.1 += lat.failed;
                for (why, count) in lat.errors {
                    *entry.3.entry(why).or_insert(0) += count;
                }
            }
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut base_rounds: Vec<f64> = Vec::new();
        for n in sizes {
            let (mut micros, failed, round_p50s, errors) = pooled.remove(&n).unwrap_or_default();
            micros.sort_by(f64::total_cmp);
            let lat = connect::Latencies {
                micros,
                failed,
                errors,
            };
            if lat.micros.is_empty() {
                bail!("no connection to {to} succeeded with {n} services programmed");
            }
            let mut row = self.row(Case::Connect, n);
            row.peer_status = "not run (the data path is the kernel's in both)".into();
            row.trellis_ms = Some(lat.percentile(0.5) / 1000.0);
            row.trellis_p99_ms = Some(lat.percentile(0.99) / 1000.0);
            row.trellis_max_ms = lat.micros.last().map(|v| v / 1000.0);
            row.samples = Some(lat.micros.len());
            row.target = Some(
                "the same as with 10 services, within noise (the 10-service rounds' spread)".into(),
            );
            row.notes.push(format!(
                "p50 per round (µs): {}",
                round_p50s
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            if lat.failed > 0 {
                row.notes.push(format!(
                    "{} connections failed ({})",
                    lat.failed,
                    lat.errors
                        .iter()
                        .map(|(why, n)| format!("{n}× {why}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if let Some(first) = rows.first() {
                let ratio = row.trellis_ms.unwrap_or(0.0) / first.trellis_ms.unwrap_or(f64::NAN);
                let p99 =
                    row.trellis_p99_ms.unwrap_or(0.0) / first.trellis_p99_ms.unwrap_or(f64::NAN);
                row.notes.push(format!(
                    "p50 {ratio:.2}×, p99 {p99:.2}× the 10-service figures"
                ));
                // Within noise: inside the spread of the 10-service rounds' medians (±10 %).
                let p50_us = row.trellis_ms.unwrap_or(0.0) * 1000.0;
                let (lo, hi) = (
                    base_rounds.iter().copied().fold(f64::INFINITY, f64::min),
                    base_rounds.iter().copied().fold(0.0, f64::max),
                );
                row.met = Some(lat.failed == 0 && p50_us >= lo * 0.9 && p50_us <= hi * 1.1);
            } else {
                base_rounds = round_p50s.clone();
            }
            rows.push(row);
        }
        for ns in [&line.client, &line.node, &line.backend] {
            let _ = netns::delete(ns);
        }
        Ok(rows)
    }
}

fn step(what: &str) {
    eprintln!("proxy bench: {what}");
}

fn worker_args(task: &str, services: usize, endpoints: usize) -> Vec<String> {
    vec![
        "--task".into(),
        task.into(),
        "--services".into(),
        services.to_string(),
        "--endpoints".into(),
        endpoints.to_string(),
    ]
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Runs a Trellis worker in `ns`; its report, if it finished.
async fn run_worker(ns: &str, args: &[String]) -> anyhow::Result<(Option<WorkerReport>, Measured)> {
    let exe = std::env::current_exe().context("locating the trellis executable")?;
    let mut full: Vec<String> = ["lab", "bench", "proxy-worker"].map(String::from).to_vec();
    full.extend_from_slice(args);
    let ns = ns.to_string();
    let level = std::env::var("TRELLIS_LOG").unwrap_or_else(|_| "warn".into());
    let m = tokio::task::spawn_blocking(move || {
        measure::run_in(&ns, &exe, &full, &[("TRELLIS_LOG", level)], WORKER_TIMEOUT)
    })
    .await??;
    let report = if m.ok() {
        let text = String::from_utf8_lossy(&m.stdout);
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or("");
        Some(
            serde_json::from_str(line)
                .with_context(|| format!("reading the worker's report {line:?}"))?,
        )
    } else {
        eprintln!("  Trellis worker {}", m.failure());
        None
    };
    Ok((report, m))
}

/// Runs `nft ARGS` in `ns`.
async fn nft(ns: &str, args: &[String], timeout: Duration) -> anyhow::Result<Measured> {
    let ns = ns.to_string();
    let args = args.to_vec();
    tokio::task::spawn_blocking(move || measure::run_in(&ns, Path::new("nft"), &args, &[], timeout))
        .await?
        .context("running nft (apt-get install nftables)")
}

fn summary(m: &Measured) -> String {
    if m.ok() {
        format!(
            "{:.0} ms, {:.0} MB peak, {:.0} ms user + {:.0} ms system CPU",
            m.wall_ms(),
            m.rss_mb(),
            m.user.as_secs_f64() * 1000.0,
            m.sys.as_secs_f64() * 1000.0
        )
    } else {
        m.failure()
    }
}

fn fill_trellis(row: &mut Row, m: &Measured, report: Option<&WorkerReport>) {
    row.trellis_rss_mb = Some(m.rss_mb());
    row.trellis_cpu_user_ms = Some(m.user.as_secs_f64() * 1000.0);
    row.trellis_cpu_sys_ms = Some(m.sys.as_secs_f64() * 1000.0);
    let Some(r) = report else {
        row.notes.push(format!("Trellis worker {}", m.failure()));
        row.met = Some(false);
        return;
    };
    row.trellis_ms = Some(r.total_ms);
    row.phases_ms = r.phases.clone();
    row.peak_rss_after_mb = r.peak_rss_mb.clone();
    if r.transactions > 0 {
        row.transactions = Some(r.transactions);
        row.max_transaction_ms = Some(r.longest_transaction_ms);
        row.heaviest_transaction = Some(r.heaviest_transaction);
    }
    if r.refused > 0 {
        row.notes.push(format!(
            "the kernel refused {} unit(s); first: {}",
            r.refused,
            r.first_refusal.as_deref().unwrap_or("?")
        ));
    }
    if r.chains > 0 && row.case != Some(Case::Audit) {
        row.notes.push(format!(
            "{} chains with {} rules planned",
            r.chains, r.rules
        ));
    }
    row.notes.extend(r.notes.iter().cloned());
}

fn fill_peer(row: &mut Row, m: &Measured) {
    row.peer_rss_mb = Some(m.rss_mb());
    row.peer_cpu_user_ms = Some(m.user.as_secs_f64() * 1000.0);
    row.peer_cpu_sys_ms = Some(m.sys.as_secs_f64() * 1000.0);
    if m.ok() {
        row.peer_ms = Some(m.wall_ms());
        row.peer_status = "ok".into();
    } else {
        row.peer_status = m.failure();
        if m.timed_out {
            // What is known: it took at least this long.
            row.peer_ms = Some(m.wall_ms());
        }
    }
}

/// The rows as a Markdown table, with where Trellis's time went under it.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| case | services × endpoints | Trellis | Trellis peak RSS | peer (`nft`) | peer peak RSS | target | met |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let case = r.case.map_or("?", Case::name);
        let trellis = match r.case {
            Some(Case::Connect) => format!(
                "p50 {:.0} µs, p99 {:.0} µs",
                r.trellis_ms.unwrap_or(0.0) * 1000.0,
                r.trellis_p99_ms.unwrap_or(0.0) * 1000.0
            ),
            Some(Case::EndpointChange) => {
                format!("p50 {}, max {}", dur(r.trellis_ms), dur(r.trellis_max_ms))
            }
            Some(Case::ColdStart) => format!(
                "{} in {} transactions (longest {})",
                dur(r.trellis_ms),
                r.transactions.unwrap_or(0),
                dur(r.max_transaction_ms)
            ),
            _ => dur(r.trellis_ms),
        };
        let peer = if r.peer_status == "ok" {
            match r.case {
                Some(Case::EndpointChange) => {
                    format!("p50 {}, max {}", dur(r.peer_ms), dur(r.peer_max_ms))
                }
                _ => dur(r.peer_ms),
            }
        } else {
            r.peer_status.clone()
        };
        let _ = writeln!(
            out,
            "| {case} | {} × {} | {trellis} | {} | {peer} | {} | {} | {} |",
            r.services,
            r.endpoints,
            mb(r.trellis_rss_mb),
            if r.peer_status == "ok" {
                mb(r.peer_rss_mb)
            } else {
                "–".into()
            },
            r.target.as_deref().unwrap_or(""),
            match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            }
        );
    }
    out.push('\n');
    for r in rows
        .iter()
        .filter(|r| !r.phases_ms.is_empty() || !r.notes.is_empty())
    {
        let _ = write!(
            out,
            "- {} ({} × {}):",
            r.case.map_or("?", Case::name),
            r.services,
            r.endpoints
        );
        let phases: Vec<String> = r
            .phases_ms
            .iter()
            .map(|(k, v)| format!("{k} {}", dur(Some(*v))))
            .collect();
        if !phases.is_empty() {
            let _ = write!(out, " {};", phases.join(", "));
        }
        if let (Some(u), Some(s)) = (r.trellis_cpu_user_ms, r.trellis_cpu_sys_ms) {
            let _ = write!(out, " Trellis CPU {u:.0} ms user + {s:.0} ms system;");
        }
        if let (Some(u), Some(s)) = (r.peer_cpu_user_ms, r.peer_cpu_sys_ms) {
            let _ = write!(out, " peer CPU {u:.0} ms user + {s:.0} ms system;");
        }
        for n in &r.notes {
            let _ = write!(out, " {n};");
        }
        out.push('\n');
    }
    out
}

pub(crate) fn dur(ms: Option<f64>) -> String {
    match ms {
        None => "–".into(),
        Some(v) if v >= 10_000.0 => format!("{:.1} s", v / 1000.0),
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v >= 10.0 => format!("{v:.1} ms"),
        Some(v) if v >= 0.1 => format!("{v:.2} ms"),
        Some(v) => format!("{:.0} µs", v * 1000.0),
    }
}

fn mb(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0} MB"))
}
