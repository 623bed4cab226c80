//! `lab bench policy`: NetworkPolicy enforcement (issue 12), measured against peers in the
//! same run on this machine. Everything runs in namespaces of the bench's own
//! (`tl-<name>-…`, removed at the end, also when interrupted).
//!
//! **Programming** ([`programming`]): the real enforcement loop
//! (`trellis_agent::policy::run::run`) on a fresh namespace, fed by an in-process embedded
//! store preloaded with a synthetic cluster ([`synth`]: by default 10,000 pods on 100
//! nodes, 20 namespaces, 1,000 policies mixing podSelector, namespaceSelector, ipBlock and
//! ports, each pod of the bench's node isolated by five of them). Timed:
//!
//! - the cold start, from the loop's start (the store already holding everything) until its
//!   first pass has put both tables in the kernel;
//! - per change (`--changes` of each kind, one every 50 ms after the last is done): a pod
//!   added on another node (its address joins selector sets), a policy added or changed
//!   (new check chains, map elements swapped), a pod added on the bench's node (its map
//!   elements and set memberships), each from the store write until the kernel announces
//!   the last nftables commit it caused (a netlink socket in the nf_tables multicast group
//!   of that namespace, as `nft monitor` listens: no polling, no sampling delay). After
//!   each change the tables are listed with `nft` and must hold what it asked for.
//!
//! The peer is a full reload of the same ruleset: after each change, the text of both
//! tables as `nft list ruleset` prints them from Trellis's namespace, loaded with `nft -f`
//! into another fresh namespace as one transaction that deletes the old tables and
//! defines the new ones. That is how controllers that rewrite everything on each change
//! program the kernel (kube-router's `iptables-restore` of whole tables is that shape);
//! only the load is timed, not the generation of the text, which favours the peer.
//!
//! **Per-packet cost** ([`packet`]): A — R — B namespaces, R forwarding and enforcing for B
//! (a pod of R's), a TCP server in B. With N policies (`--packet-policies`), of which the
//! last admits A → B, and other local pods' and remote pods' policies around it: the time
//! of TCP connection setup from A to B (`connect()`, SYN to SYN-ACK through R) and iperf3
//! throughput A → B, (a) with Trellis's table at each N, programmed by the same loop; (b)
//! with no table at all; (c) with a linear peer: one `ip saddr X ip daddr Y tcp dport P
//! accept` rule per policy in one chain, the admitting rules last, then a drop — the
//! shape of a ruleset without maps or sets, where a new connection walks every rule. Both
//! accept established flows first (`ct state established,related`), as every stateful
//! policy implementation does. The configurations run in rounds, the order reversed every
//! round, so that drift in the machine's load weighs on all alike.

pub mod packet;
pub mod programming;
pub mod synth;

use super::proxy::dur;
use crate::{build, built};
use anyhow::Context;
use serde::Serialize;
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trellis_dataplane::netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// Cold start and the three kinds of change, against `nft -f` of the whole ruleset.
    Programming,
    /// Connection setup and throughput through the node, against no table and a linear
    /// chain.
    Packet,
}

pub struct PolicyArgs {
    pub name: String,
    pub parts: Vec<Part>,
    pub policies: usize,
    pub pods: usize,
    pub changes: usize,
    pub packet_policies: Vec<usize>,
    pub rounds: usize,
    pub connections: usize,
    pub iperf_seconds: u64,
    pub peer: bool,
    pub peer_timeout: Duration,
}

/// What the bench measured, and what stopped it early if anything did: what was measured
/// before that is kept.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub programming: Vec<programming::Row>,
    pub packet: Vec<packet::Row>,
    #[serde(skip)]
    pub stopped: Option<anyhow::Error>,
}

pub async fn policy(args: &PolicyArgs) -> Report {
    let mut report = Report::default();
    let _ = build::teardown(&args.name);
    built::building(&args.name);
    let result = run(args, &mut report).await;
    if let Err(e) = build::teardown(&args.name) {
        eprintln!("removing the bench's namespaces: {e:#}");
    }
    report.stopped = result.err();
    report
}

async fn run(args: &PolicyArgs, report: &mut Report) -> anyhow::Result<()> {
    let dir = crate::state::dir(&args.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // The quiet part first: nothing big is in the kernel yet.
    if args.parts.contains(&Part::Packet) {
        packet::run(args, &dir, &mut report.packet).await?;
    }
    if args.parts.contains(&Part::Programming) {
        programming::run(args, &dir, &mut report.programming).await?;
    }
    Ok(())
}

fn netns_name(args: &PolicyArgs, suffix: &str) -> String {
    format!("tl-{}-{suffix}", args.name)
}

fn step(what: &str) {
    eprintln!("policy bench: {what}");
}

/// Runs `nft ARGS` in `ns` with its standard output written to `out`, killed after
/// `timeout`; its standard error if it failed.
fn nft_to_file(ns: &str, args: &[&str], out: &Path, timeout: Duration) -> anyhow::Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let target = netns::open(ns)?;
    let fd = target.as_raw_fd();
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only setns, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || netns::enter_fd(fd));
    }
    let mut child = cmd
        .spawn()
        .context("running nft (apt-get install nftables)")?;
    drop(target);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            anyhow::bail!("nft {} in {ns}: {status}: {}", args.join(" "), err.trim());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "nft {} in {ns}: killed after {} s",
                args.join(" "),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Aborts a spawned task when dropped, so that a bench stopped by an error does not leave
/// a loop running against namespaces about to go.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

fn file_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Both parts' tables, in Markdown.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    if !report.programming.is_empty() {
        out.push_str(&programming::table(&report.programming));
    }
    if !report.packet.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&packet::table(&report.packet));
    }
    out
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn joined(values: &[f64], digits: usize) -> String {
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{v:.digits$}");
    }
    out
}
