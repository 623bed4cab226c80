//! The programming part: the enforcement loop's cold start and its latency per change,
//! against a full reload of the same ruleset with `nft -f` (see the module above).

use super::synth::{BENCH_NODE, MAX_CHANGES, Synth};
use super::{AbortOnDrop, PolicyArgs, dur, file_in, netns_name, path_arg, ratio, step};
use crate::bench::percentile;
use crate::bench::proxy::measure::{self, Measured};
use crate::bench::proxy::monitor::CommitMonitor;
use anyhow::{Context, bail};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_agent::admin::Metrics;
use trellis_agent::nft_table::kernel;
use trellis_agent::policy::render::scope;
use trellis_agent::policy::run::{PolicyConfig, run as enforce};
use trellis_dataplane::netns;
use trellis_dataplane::nftables::Nft;
use trellis_proxy::IpFamily;
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;

/// How long the loop's first pass may take.
const COLD_START_LIMIT: Duration = Duration::from_secs(900);
/// How long a change may take to reach the kernel before it counts as missed.
const CHANGE_LIMIT: Duration = Duration::from_secs(30);
/// Commits this close after the first belong to the same change (an apply split into
/// several transactions); the change's time runs to the last.
const QUIET: Duration = Duration::from_millis(150);
/// Between the end of one change and the next store write.
const PACING: Duration = Duration::from_millis(50);
/// Listing the tables with `nft` (outside the timing).
const LIST_LIMIT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    ColdStart,
    RemotePod,
    Policy,
    LocalPod,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::ColdStart => "cold start (store listed → both tables in the kernel)",
            Case::RemotePod => "pod added on another node",
            Case::Policy => "policy added or changed",
            Case::LocalPod => "pod added on the bench's node",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub case: Case,
    pub policies: usize,
    pub pods: usize,
    /// The whole cold start, or the median of the changes (ms).
    pub trellis_ms: Option<f64>,
    pub trellis_p90_ms: Option<f64>,
    pub trellis_max_ms: Option<f64>,
    pub peer_ms: Option<f64>,
    pub peer_p90_ms: Option<f64>,
    pub peer_max_ms: Option<f64>,
    /// "ok", or why there is no peer number.
    pub peer_status: String,
    /// Peer / Trellis, of the medians.
    pub ratio: Option<f64>,
    pub samples: usize,
    /// Each change's time, in the order measured (ms).
    pub trellis_samples_ms: Vec<f64>,
    pub peer_samples_ms: Vec<f64>,
    pub notes: Vec<String>,
}

impl Row {
    fn new(case: Case, synth: &Synth, peer: bool) -> Row {
        Row {
            case,
            policies: synth.policies,
            pods: synth.pods,
            trellis_ms: None,
            trellis_p90_ms: None,
            trellis_max_ms: None,
            peer_ms: None,
            peer_p90_ms: None,
            peer_max_ms: None,
            peer_status: if peer {
                "not run".into()
            } else {
                "not run (--no-peer)".into()
            },
            ratio: None,
            samples: 0,
            trellis_samples_ms: Vec::new(),
            peer_samples_ms: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Fills the medians, p90s, maxima and ratio from the samples.
    fn summarize(&mut self) {
        let stats = |samples: &[f64]| {
            let mut sorted = samples.to_vec();
            sorted.sort_by(f64::total_cmp);
            if sorted.is_empty() {
                return (None, None, None);
            }
            (
                Some(percentile(&sorted, 0.5)),
                Some(percentile(&sorted, 0.9)),
                sorted.last().copied(),
            )
        };
        (self.trellis_ms, self.trellis_p90_ms, self.trellis_max_ms) =
            stats(&self.trellis_samples_ms);
        (self.peer_ms, self.peer_p90_ms, self.peer_max_ms) = stats(&self.peer_samples_ms);
        self.samples = self.trellis_samples_ms.len();
        self.ratio = ratio(self.peer_ms, self.trellis_ms);
    }
}

pub async fn run(args: &PolicyArgs, dir: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    if args.changes > MAX_CHANGES {
        bail!("--changes must be at most {MAX_CHANGES}");
    }
    let synth = Synth::new(args.pods, args.policies)?;
    step(&format!(
        "programming: {} pods on {} nodes, {} policies",
        synth.pods,
        synth.nodes(),
        synth.policies
    ));
    let store = EmbeddedStore::new();
    for (key, value) in synth.records() {
        store.put(&key, serde_json::to_vec(&value)?).await?;
    }
    let ns = netns_name(args, "t");
    netns::create(&ns)?;
    let peer_ns = netns_name(args, "peer");
    if args.peer {
        netns::create(&peer_ns)?;
    }
    // Opened in the loop's namespace before it starts: it hears that namespace's commits.
    let mut monitor =
        netns::run_in(&ns, CommitMonitor::open)?.context("listening for nftables commits")?;

    // ---- cold start ----
    let mut row = Row::new(Case::ColdStart, &synth, args.peer);
    let metrics = Metrics::new(BENCH_NODE);
    let started = Instant::now();
    let _enforcer = AbortOnDrop(tokio::spawn(enforce(
        store.clone() as Arc<dyn Store>,
        Arc::new(Nft::connect_in(&ns)?),
        PolicyConfig {
            node: BENCH_NODE.into(),
            // No audit during the changes: each is timed alone.
            audit_interval: Duration::from_secs(3600),
            cni_allocations: None,
            publish_pods: false,
            programmed_file: None,
        },
        metrics.policy(),
    )));
    while metrics.first_sample("trellis_policy_audit_duration_seconds_count") < 1.0 {
        if started.elapsed() > COLD_START_LIMIT {
            bail!(
                "the loop's first pass did not end within {} s",
                COLD_START_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cold = ms(started.elapsed());
    row.trellis_ms = Some(cold);
    row.samples = 1;
    let failures = metrics.first_sample("trellis_policy_failures_total");
    if failures > 0.0 {
        bail!("the kernel refused {failures} unit(s) of the first pass");
    }
    let counts = {
        let ns = ns.clone();
        tokio::task::spawn_blocking(move || count(&ns)).await??
    };
    row.notes.push(format!(
        "{} policies known, {} of the node's pod addresses isolated; the IPv4 table: {counts}; the pass's own audit (read back, diff, apply) took {}",
        metrics.first_sample("trellis_policy_policies"),
        metrics.first_sample("trellis_policy_pods_selected"),
        dur(Some(
            metrics.first_sample("trellis_policy_audit_duration_seconds_sum") * 1000.0
        )),
    ));
    eprintln!("  Trellis: {}; {counts}", dur(Some(cold)));
    let listing = file_in(dir, "trellis.nft");
    let reload = file_in(dir, "peer.nft");
    let mut peer_ok = args.peer;
    if args.peer {
        list(&ns, &listing).await?;
        write_reload(&listing, &reload)?;
        let size = std::fs::metadata(&reload).map_or(0, |m| m.len());
        let m = nft_f(&peer_ns, &reload, args.peer_timeout).await?;
        row.notes.push(format!(
            "the peer loads {:.1} MB of nft text, {:.0} MB peak",
            size as f64 / 1e6,
            m.rss_mb()
        ));
        if m.ok() {
            row.peer_ms = Some(m.wall_ms());
            row.peer_status = "ok".into();
            row.ratio = ratio(row.peer_ms, row.trellis_ms);
            eprintln!("  peer: {} ({:.1} MB)", dur(row.peer_ms), size as f64 / 1e6);
        } else {
            row.peer_status = m.failure();
            peer_ok = false;
            eprintln!("  peer: {}", row.peer_status);
        }
    }
    rows.push(row);

    // ---- changes ----
    for case in [Case::RemotePod, Case::Policy, Case::LocalPod] {
        step(&format!("programming: {} × {}", args.changes, case.name()));
        let mut row = Row::new(case, &synth, args.peer);
        if args.peer && !peer_ok {
            row.peer_status = "not run: its table did not load".into();
        }
        let mut missed = 0;
        let mut absent = Vec::new();
        for c in 0..args.changes {
            let (key, value, expect) = match case {
                Case::RemotePod => {
                    let (k, v, ip) = synth.remote_pod(c);
                    (k, v, vec![ip.to_string()])
                }
                Case::LocalPod => {
                    let (k, v, ip) = synth.local_pod(c);
                    (k, v, vec![format!("{ip} : jump check-")])
                }
                Case::Policy | Case::ColdStart => {
                    let (k, v, name) = synth.policy_change(c);
                    (
                        k,
                        v,
                        vec![format!("{name} rule 0"), format!("tcp dport {}", 7000 + c)],
                    )
                }
            };
            tokio::time::sleep(PACING).await;
            monitor.drain();
            let t0 = Instant::now();
            store.put(&key, serde_json::to_vec(&value)?).await?;
            let last = tokio::task::block_in_place(|| last_commit(&mut monitor))?;
            match last {
                Some(t1) => row.trellis_samples_ms.push(ms(t1 - t0)),
                None => {
                    missed += 1;
                    continue;
                }
            }
            // Outside the timing: what the kernel holds now, read by `nft`.
            list(&ns, &listing).await?;
            let text = std::fs::read_to_string(&listing)?;
            if let Some(e) = expect.iter().find(|e| !text.contains(e.as_str())) {
                absent.push(format!("change {c}: {e:?}"));
            }
            drop(text);
            if peer_ok {
                write_reload(&listing, &reload)?;
                let m = nft_f(&peer_ns, &reload, args.peer_timeout).await?;
                if m.ok() {
                    row.peer_samples_ms.push(m.wall_ms());
                } else {
                    row.peer_status = format!("change {c}: {}", m.failure());
                    peer_ok = false;
                }
            }
        }
        row.summarize();
        if !row.peer_samples_ms.is_empty() && peer_ok {
            row.peer_status = "ok".into();
        }
        if missed > 0 {
            row.notes.push(format!(
                "{missed} change(s) saw no commit within {} s",
                CHANGE_LIMIT.as_secs()
            ));
        }
        if !absent.is_empty() {
            row.notes.push(format!(
                "not in the kernel's table after the change: {}",
                absent.join(", ")
            ));
        }
        eprintln!(
            "  Trellis: p50 {}, p90 {}, max {}; peer: p50 {}, max {}",
            dur(row.trellis_ms),
            dur(row.trellis_p90_ms),
            dur(row.trellis_max_ms),
            dur(row.peer_ms),
            dur(row.peer_max_ms)
        );
        rows.push(row);
    }
    let count = metrics.first_sample("trellis_policy_programming_latency_seconds_count");
    let sum = metrics.first_sample("trellis_policy_programming_latency_seconds_sum");
    let failures = metrics.first_sample("trellis_policy_failures_total");
    if let Some(last) = rows.last_mut() {
        last.notes.push(format!(
            "the loop's own programming-latency histogram over all changes: {count} observations, mean {} (from the batch reaching the loop to the apply's return); units refused: {failures}",
            dur((count > 0.0).then(|| sum / count * 1000.0))
        ));
    }
    netns::delete(&ns)?;
    if args.peer {
        netns::delete(&peer_ns)?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The time of the last commit of one change: the first within [`CHANGE_LIMIT`], then any
/// that follow within [`QUIET`] of the one before.
fn last_commit(monitor: &mut CommitMonitor) -> anyhow::Result<Option<Instant>> {
    let Some(mut last) = monitor.wait_commit(CHANGE_LIMIT)? else {
        return Ok(None);
    };
    while let Some(t) = monitor.wait_commit(QUIET)? {
        last = t;
    }
    Ok(Some(last))
}

/// `nft list ruleset` of `ns` into `out`.
async fn list(ns: &str, out: &Path) -> anyhow::Result<()> {
    let (ns, out) = (ns.to_string(), out.to_path_buf());
    tokio::task::spawn_blocking(move || {
        super::nft_to_file(&ns, &["list", "ruleset"], &out, LIST_LIMIT)
    })
    .await?
}

/// The peer's file: one transaction that deletes both tables (declaring them first, so
/// that the delete also works on the first load) and defines them as listed.
fn write_reload(listing: &Path, reload: &Path) -> anyhow::Result<()> {
    let mut text = String::new();
    for family in ["ip", "ip6"] {
        let _ = writeln!(text, "table {family} trellis-policy {{}}");
        let _ = writeln!(text, "delete table {family} trellis-policy");
    }
    text.push_str(&std::fs::read_to_string(listing)?);
    std::fs::write(reload, text).with_context(|| format!("writing {}", reload.display()))
}

/// `nft -f FILE` in `ns`, measured (spawn to exit).
async fn nft_f(ns: &str, file: &Path, timeout: Duration) -> anyhow::Result<Measured> {
    let (ns, args) = (ns.to_string(), vec!["-f".to_string(), path_arg(file)]);
    tokio::task::spawn_blocking(move || measure::run_in(&ns, Path::new("nft"), &args, &[], timeout))
        .await?
        .context("running nft (apt-get install nftables)")
}

/// What the IPv4 table holds, read back over netlink.
fn count(ns: &str) -> anyhow::Result<String> {
    let nft = Nft::connect_in(ns)?;
    let table = kernel::read(&nft, scope(IpFamily::V4))?;
    let rules: usize = table.chains.values().map(|c| c.comments.len()).sum();
    let elements: usize = table.sets.values().map(|s| s.elements.len()).sum();
    Ok(format!(
        "{} chains, {rules} rules, {} sets and maps, {elements} elements",
        table.chains.len(),
        table.sets.len()
    ))
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| case | policies, pods | Trellis | peer (`nft -f` of the whole ruleset) | peer / Trellis |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let trellis = match r.case {
            Case::ColdStart => dur(r.trellis_ms),
            _ => format!(
                "p50 {}, p90 {}, max {}",
                dur(r.trellis_ms),
                dur(r.trellis_p90_ms),
                dur(r.trellis_max_ms)
            ),
        };
        let peer = if r.peer_status != "ok" {
            r.peer_status.clone()
        } else {
            match r.case {
                Case::ColdStart => dur(r.peer_ms),
                _ => format!(
                    "p50 {}, p90 {}, max {}",
                    dur(r.peer_ms),
                    dur(r.peer_p90_ms),
                    dur(r.peer_max_ms)
                ),
            }
        };
        let _ = writeln!(
            out,
            "| {} | {}, {} | {trellis} | {peer} | {} |",
            r.case.name(),
            r.policies,
            r.pods,
            r.ratio.map_or("–".into(), |x| if x >= 10.0 {
                format!("{x:.0}×")
            } else {
                format!("{x:.2}×")
            })
        );
    }
    out.push('\n');
    for r in rows {
        let _ = write!(out, "- {}:", r.case.name());
        if r.case != Case::ColdStart && !r.trellis_samples_ms.is_empty() {
            let _ = write!(
                out,
                " Trellis (ms, in order) {};",
                super::joined(&r.trellis_samples_ms, 1)
            );
        }
        if !r.peer_samples_ms.is_empty() {
            let _ = write!(out, " peer (ms) {};", super::joined(&r.peer_samples_ms, 0));
        }
        for n in &r.notes {
            let _ = write!(out, " {n};");
        }
        out.push('\n');
    }
    out
}
