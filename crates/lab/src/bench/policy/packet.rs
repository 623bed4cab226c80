//! The per-packet part: what enforcement costs traffic through the node, with Trellis's
//! table at N policies, with no table, and with a linear chain of N rules (see the module
//! above). The network is the proxy bench's line ([`connect`]):
//!
//! ```text
//!  A c0 10.244.1.2 ── p0 10.244.1.1 :R: p1 10.244.2.1 ── b0 10.244.2.2 :B
//! ```
//!
//! R is the node (`node-r`) whose pod B is (`bench/b`, `app: b`); A is a pod of another
//! node (`bench/a`, `app: a`). The N policies ([`records`]): the last (`zz-admit`) admits
//! A to B on the connection port and iperf3's; four more isolate B and admit other
//! sources (ipBlocks); the rest isolate 100 other pods of R (addresses that carry no
//! traffic here) and admit 100 pods of other nodes or ipBlocks. So B's own check is the
//! same at 100 and at 1,000 policies, and everything else grows.

use super::{AbortOnDrop, PolicyArgs, netns_name, ratio, step};
use crate::bench::proxy::connect::{self, Latencies};
use crate::bench::proxy::measure;
use crate::bench::proxy::synth::TARGET_PORT;
use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_agent::admin::Metrics;
use trellis_agent::policy::run::{PolicyConfig, run as enforce};
use trellis_dataplane::nftables::Nft;
use trellis_dataplane::{netns, sysctl};
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;

/// A's address (the client end of [`connect::build`]'s line).
const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const B: Ipv4Addr = connect::BACKEND;
const IPERF_PORT: u16 = 5201;
/// A port of B nothing listens on: refused when B is open, dropped when it is isolated.
const CLOSED_PORT: u16 = 9;
const NODE: &str = "node-r";
const NAMESPACE: &str = "bench";
/// Other pods of R, which the other policies isolate.
const OTHER_LOCAL: usize = 100;
/// Untimed connections before each round's timed ones.
const WARMUP: usize = 100;
/// Between programming and timing (the kernel frees what a big commit replaced after a
/// grace period).
const SETTLE: Duration = Duration::from_secs(1);
const PROGRAM_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcer {
    /// No table in R.
    None,
    /// Trellis's tables, programmed by the enforcement loop.
    Trellis,
    /// One chain, a rule per policy.
    Linear,
}

impl Enforcer {
    fn name(self) -> &'static str {
        match self {
            Enforcer::None => "no table",
            Enforcer::Trellis => "Trellis",
            Enforcer::Linear => "linear chain (peer)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub enforcer: Enforcer,
    pub policies: usize,
    /// Connection setup (µs) over every round's connections.
    pub setup_p50_us: Option<f64>,
    pub setup_p99_us: Option<f64>,
    pub connections: usize,
    pub failed: usize,
    /// Each round's median connection setup (µs).
    pub setup_round_p50s_us: Vec<f64>,
    /// The median of the rounds' iperf3 throughput, and each round's (Gbit/s).
    pub throughput_gbps: Option<f64>,
    pub throughput_rounds_gbps: Vec<f64>,
    /// This row's setup p50 and throughput / those with no table.
    pub setup_vs_none: Option<f64>,
    pub throughput_vs_none: Option<f64>,
    pub notes: Vec<String>,
}

/// The store's records for `n` policies.
pub fn records(n: usize) -> Vec<(String, Value)> {
    let mut out = vec![(
        format!("namespaces/{NAMESPACE}"),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )];
    let mut pod = |name: String, app: String, ip: Ipv4Addr, node: &str| {
        out.push((
            format!("pods/{NAMESPACE}/{name}"),
            json!({"namespace": NAMESPACE, "name": name, "labels": {"app": app},
                   "ips": [ip.to_string()], "node": node}),
        ));
    };
    pod("b".into(), "b".into(), B, NODE);
    pod("a".into(), "a".into(), A, "node-a");
    for i in 0..OTHER_LOCAL {
        pod(format!("d{i}"), format!("d{i}"), other_local(i), NODE);
        pod(
            format!("r{i}"),
            format!("r{}", i % 10),
            Ipv4Addr::new(10, 94, 0, 2 + i as u8),
            "node-x",
        );
    }
    let app = |a: &str| json!({"matchLabels": {"app": a}});
    let tcp = |port: u16| json!({"protocol": "TCP", "port": port});
    for j in 0..n.saturating_sub(1) {
        let spec = if j < 4 {
            json!({"podSelector": app("b"),
                   "ingress": [{"from": [{"ipBlock": {"cidr": decoy_source(j).to_string() + "/32"}}],
                                "ports": [tcp(TARGET_PORT)]}]})
        } else if j.is_multiple_of(2) {
            json!({"podSelector": app(&format!("d{}", j % OTHER_LOCAL)),
                   "ingress": [{"from": [{"podSelector": app(&format!("r{}", j % 10))}],
                                "ports": [tcp(decoy_port(j))]}]})
        } else {
            json!({"podSelector": app(&format!("d{}", j % OTHER_LOCAL)),
                   "ingress": [{"from": [{"ipBlock": {"cidr": decoy_source(j).to_string() + "/32"}}],
                                "ports": [tcp(decoy_port(j))]}]})
        };
        let name = format!("p{j:05}");
        out.push((
            format!("networkpolicies/{NAMESPACE}/{name}"),
            super::synth::policy_json(NAMESPACE, &name, spec),
        ));
    }
    if n > 0 {
        let spec = json!({"podSelector": app("b"),
                          "ingress": [{"from": [{"podSelector": app("a")}],
                                       "ports": [tcp(TARGET_PORT), tcp(IPERF_PORT)]}]});
        out.push((
            format!("networkpolicies/{NAMESPACE}/zz-admit"),
            super::synth::policy_json(NAMESPACE, "zz-admit", spec),
        ));
    }
    out
}

fn other_local(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 93, 0, 2 + i as u8)
}

/// Where decoy policy `j` admits from: never A.
fn decoy_source(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (j / 250) as u8, (j % 250) as u8 + 1)
}

fn decoy_port(j: usize) -> u16 {
    8000 + (j % 100) as u16
}

/// The linear peer for `n` policies: a rule per policy in one chain, the admitting ones
/// last, then a drop (no rule, no drop, for none).
pub fn linear(n: usize) -> String {
    let mut out = String::from(
        "table ip trellis-peer {}\ndelete table ip trellis-peer\ntable ip trellis-peer {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n    ct state established,related accept\n",
    );
    for j in 0..n.saturating_sub(1) {
        let (to, port) = if j < 4 {
            (B, TARGET_PORT)
        } else {
            (other_local(j % OTHER_LOCAL), decoy_port(j))
        };
        let _ = writeln!(
            out,
            "    ip saddr {} ip daddr {to} tcp dport {port} accept",
            decoy_source(j)
        );
    }
    if n > 0 {
        for port in [TARGET_PORT, IPERF_PORT] {
            let _ = writeln!(out, "    ip saddr {A} ip daddr {B} tcp dport {port} accept");
        }
        out.push_str("    drop\n");
    }
    out.push_str("  }\n}\n");
    out
}

/// An iperf3 server in B for the whole part.
struct IperfServer(Child);

impl IperfServer {
    fn start(ns: &str) -> anyhow::Result<IperfServer> {
        let target = netns::open(ns)?;
        let fd = target.as_raw_fd();
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only setns, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || netns::enter_fd(fd));
        }
        Ok(IperfServer(cmd.spawn().context("starting iperf3 -s")?))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Pool {
    micros: Vec<f64>,
    failed: usize,
    errors: BTreeMap<String, usize>,
    round_p50s: Vec<f64>,
    gbps: Vec<f64>,
    notes: Vec<String>,
}

pub async fn run(args: &PolicyArgs, dir: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    if which("iperf3").is_none() {
        bail!(
            "the per-packet part needs iperf3 (apt-get install iperf3), or run only `--parts programming`"
        );
    }
    let mut sizes = args.packet_policies.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.iter().any(|n| *n > 20_000) {
        bail!("--packet-policies: at most 20000");
    }
    let mut configs = vec![(Enforcer::None, 0)];
    for n in &sizes {
        configs.push((Enforcer::Trellis, *n));
        if args.peer {
            configs.push((Enforcer::Linear, *n));
        }
    }
    step(&format!(
        "per packet: {} configurations × {} rounds ({} connections and {} s of iperf3 each)",
        configs.len(),
        args.rounds,
        args.connections,
        args.iperf_seconds
    ));
    let line = connect::Line {
        client: netns_name(args, "a"),
        node: netns_name(args, "r"),
        backend: netns_name(args, "b"),
    };
    connect::build(&line, 1).await?;
    // The timed connections bind source ports from 20000 up; iperf3's client takes
    // ephemeral ones: keep those above, so that neither finds the other's port taken.
    netns::run_in(&line.client, || {
        sysctl::set("net.ipv4.ip_local_port_range", "61000 65535")
    })??;
    let _backend = connect::Backend::start(&line.backend)?;
    let _iperf = IperfServer::start(&line.backend)?;
    let to = SocketAddrV4::new(B, TARGET_PORT);
    let mut next_port = connect::FIRST_SOURCE_PORT;
    let mut pools: BTreeMap<(Enforcer, usize), Pool> = BTreeMap::new();
    for round in 0..args.rounds.max(1) {
        let order: Vec<(Enforcer, usize)> = if round % 2 == 0 {
            configs.clone()
        } else {
            configs.iter().rev().copied().collect()
        };
        for (enforcer, n) in order {
            program(&line.node, enforcer, n, dir).await?;
            let isolated = enforcer != Enforcer::None && n > 0;
            check(&line.client, isolated).await.with_context(|| {
                format!("{} with {n} policies does not enforce", enforcer.name())
            })?;
            tokio::time::sleep(SETTLE).await;
            let client = line.client.clone();
            let count = args.connections;
            let (lat, port) = tokio::task::spawn_blocking(move || {
                let mut port = next_port;
                connect::measure(&client, to, &mut port, WARMUP, count).map(|lat| (lat, port))
            })
            .await??;
            next_port = port;
            let gbps = iperf(&line.client, args.iperf_seconds).await;
            let pool = pools.entry((enforcer, n)).or_default();
            eprintln!(
                "  round {}, {} at {n}: setup p50 {:.0} µs, p99 {:.0} µs, {} failed; {}",
                round + 1,
                enforcer.name(),
                lat.percentile(0.5),
                lat.percentile(0.99),
                lat.failed,
                match &gbps {
                    Ok(g) => format!("{g:.1} Gbit/s"),
                    Err(e) => format!("iperf3: {e:#}"),
                }
            );
            pool.round_p50s.push(lat.percentile(0.5));
            pool.micros.extend(lat.micros);
            pool.failed += lat.failed;
            for (why, count) in lat.errors {
                *pool.errors.entry(why).or_insert(0) += count;
            }
            match gbps {
                Ok(g) => pool.gbps.push(g),
                Err(e) => pool
                    .notes
                    .push(format!("round {}: iperf3: {e:#}", round + 1)),
            }
        }
    }
    let mut out: Vec<Row> = Vec::new();
    for ((enforcer, n), mut pool) in pools {
        pool.micros.sort_by(f64::total_cmp);
        let lat = Latencies {
            micros: pool.micros,
            failed: pool.failed,
            errors: pool.errors,
        };
        let mut gbps = pool.gbps.clone();
        gbps.sort_by(f64::total_cmp);
        let mut row = Row {
            enforcer,
            policies: n,
            setup_p50_us: (!lat.micros.is_empty()).then(|| lat.percentile(0.5)),
            setup_p99_us: (!lat.micros.is_empty()).then(|| lat.percentile(0.99)),
            connections: lat.micros.len(),
            failed: lat.failed,
            setup_round_p50s_us: pool.round_p50s,
            throughput_gbps: (!gbps.is_empty()).then(|| gbps[gbps.len() / 2]),
            throughput_rounds_gbps: pool.gbps,
            setup_vs_none: None,
            throughput_vs_none: None,
            notes: pool.notes,
        };
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
        out.push(row);
    }
    let none = out.iter().find(|r| r.enforcer == Enforcer::None).cloned();
    if let Some(none) = none {
        for r in &mut out {
            r.setup_vs_none = ratio(r.setup_p50_us, none.setup_p50_us);
            r.throughput_vs_none = ratio(r.throughput_gbps, none.throughput_gbps);
        }
    }
    rows.extend(out);
    for ns in [&line.client, &line.node, &line.backend] {
        let _ = netns::delete(ns);
    }
    Ok(())
}

/// Empties R's ruleset, then programs `enforcer` at `n` policies.
async fn program(node: &str, enforcer: Enforcer, n: usize, dir: &Path) -> anyhow::Result<()> {
    let flush = nft(node, &["flush".into(), "ruleset".into()]).await?;
    if !flush.ok() {
        bail!("nft flush ruleset in {node}: {}", flush.failure());
    }
    match enforcer {
        Enforcer::None => Ok(()),
        Enforcer::Linear => {
            let file = dir.join("linear.nft");
            std::fs::write(&file, linear(n))?;
            let m = nft(node, &["-f".into(), super::path_arg(&file)]).await?;
            if !m.ok() {
                bail!("loading the linear chain of {n} rules: {}", m.failure());
            }
            Ok(())
        }
        Enforcer::Trellis => {
            let store = EmbeddedStore::new();
            for (key, value) in records(n) {
                store.put(&key, serde_json::to_vec(&value)?).await?;
            }
            let metrics = Metrics::new(NODE);
            let _loop = AbortOnDrop(tokio::spawn(enforce(
                store.clone() as Arc<dyn Store>,
                Arc::new(Nft::connect_in(node)?),
                PolicyConfig {
                    node: NODE.into(),
                    audit_interval: Duration::from_secs(3600),
                    cni_allocations: None,
                    publish_pods: false,
                    programmed_file: None,
                },
                metrics.policy(),
            )));
            let started = Instant::now();
            while metrics.first_sample("trellis_policy_audit_duration_seconds_count") < 1.0 {
                if started.elapsed() > PROGRAM_LIMIT {
                    bail!("Trellis did not program {n} policies within {PROGRAM_LIMIT:?}");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let failures = metrics.first_sample("trellis_policy_failures_total");
            if failures > 0.0 {
                bail!("the kernel refused {failures} unit(s) of {n} policies");
            }
            // The loop stops here; its tables stay.
            Ok(())
        }
    }
}

/// A reaches B's server; a closed port of B is dropped when B is isolated, refused when
/// it is not.
async fn check(client: &str, isolated: bool) -> anyhow::Result<()> {
    let client = client.to_string();
    tokio::task::spawn_blocking(move || {
        netns::run_in(&client, move || {
            let attempt = |port: u16| {
                TcpStream::connect_timeout(
                    &SocketAddr::V4(SocketAddrV4::new(B, port)),
                    Duration::from_millis(300),
                )
                .map(drop)
                .map_err(|e| e.kind())
            };
            attempt(TARGET_PORT)
                .map_err(|e| anyhow::anyhow!("A → B:{TARGET_PORT} is not admitted: {e}"))?;
            let closed = attempt(CLOSED_PORT);
            let expected = if isolated {
                std::io::ErrorKind::TimedOut
            } else {
                std::io::ErrorKind::ConnectionRefused
            };
            if closed != Err(expected) {
                bail!("A → B:{CLOSED_PORT}: {closed:?}, expected {expected}");
            }
            Ok(())
        })?
    })
    .await?
}

/// One iperf3 run from A to B; Gbit/s received.
async fn iperf(client: &str, seconds: u64) -> anyhow::Result<f64> {
    let client = client.to_string();
    let args: Vec<String> = [
        "-c",
        &B.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]
    .map(String::from)
    .to_vec();
    let m = tokio::task::spawn_blocking(move || {
        measure::run_in(
            &client,
            Path::new("iperf3"),
            &args,
            &[],
            Duration::from_secs(seconds + 20),
        )
    })
    .await??;
    if !m.ok() {
        bail!("{}", m.failure());
    }
    let report: Value =
        serde_json::from_slice(&m.stdout).context("reading iperf3's JSON report")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| anyhow::anyhow!("iperf3's report has no end.sum_received: {report}"))
}

/// `nft ARGS` in `ns`.
async fn nft(ns: &str, args: &[String]) -> anyhow::Result<measure::Measured> {
    let (ns, args) = (ns.to_string(), args.to_vec());
    tokio::task::spawn_blocking(move || {
        measure::run_in(&ns, Path::new("nft"), &args, &[], Duration::from_secs(60))
    })
    .await?
    .context("running nft (apt-get install nftables)")
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| enforcement | policies | connection setup p50 / p99 | vs no table | iperf3 A → B | vs no table |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} µs | {} | {} | {} |",
            r.enforcer.name(),
            if r.enforcer == Enforcer::None {
                "–".to_string()
            } else {
                r.policies.to_string()
            },
            r.setup_p50_us.map_or("–".into(), |v| format!("{v:.0}")),
            r.setup_p99_us.map_or("–".into(), |v| format!("{v:.0}")),
            r.setup_vs_none.map_or("–".into(), |v| format!("{v:.2}×")),
            r.throughput_gbps
                .map_or("–".into(), |v| format!("{v:.1} Gbit/s")),
            r.throughput_vs_none
                .map_or("–".into(), |v| format!("{v:.2}×")),
        );
    }
    out.push('\n');
    for r in rows {
        let _ = write!(
            out,
            "- {} at {}: setup p50 per round (µs) {}; Gbit/s per round {}; {} connections timed",
            r.enforcer.name(),
            r.policies,
            super::joined(&r.setup_round_p50s_us, 0),
            super::joined(&r.throughput_rounds_gbps, 1),
            r.connections
        );
        for n in &r.notes {
            let _ = write!(out, "; {n}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_model::{NamespaceObject, NetworkPolicy, Pod};
    use trellis_policy::Cluster;
    use trellis_policy::plan::plan;

    fn node_plan(n: usize) -> trellis_policy::plan::NodePolicy {
        let (mut namespaces, mut pods, mut policies) = (Vec::new(), Vec::new(), Vec::new());
        for (key, value) in records(n) {
            let bytes = serde_json::to_vec(&value).unwrap();
            match key.split('/').next() {
                Some("namespaces") => {
                    let object = trellis_model::decode::<NamespaceObject>("ns", &bytes).unwrap();
                    namespaces.push(object.namespace())
                }
                Some("pods") => pods.push(trellis_model::decode::<Pod>("pod", &bytes).unwrap()),
                _ => {
                    policies.push(trellis_model::decode::<NetworkPolicy>("policy", &bytes).unwrap())
                }
            }
        }
        plan(&Cluster::new(namespaces, policies), &pods, NODE, [])
    }

    /// B's check is the same at 100 and 1,000 policies (what makes Trellis flat), and
    /// admits A on both ports last; the rest of the table grows.
    #[test]
    fn b_is_isolated_alike_at_every_size_and_the_peer_has_a_rule_per_policy() {
        assert!(node_plan(0).ingress.values().all(Option::is_none));
        let small = node_plan(100);
        let large = node_plan(1000);
        let b = std::net::IpAddr::V4(B);
        let (small_b, large_b) = (
            small.ingress[&b].as_ref().unwrap(),
            large.ingress[&b].as_ref().unwrap(),
        );
        assert_eq!(small_b, large_b);
        assert_eq!(small_b.isolated_by.len(), 5);
        assert_eq!(small_b.allows.last().unwrap().by.name, "zz-admit");
        let isolated = |p: &trellis_policy::plan::NodePolicy| {
            p.ingress.values().filter(|c| c.is_some()).count()
        };
        assert_eq!(isolated(&large), 1 + OTHER_LOCAL);
        let checks = |p: &trellis_policy::plan::NodePolicy| {
            (p.ingress.values().flatten())
                .map(|c| c.allows.len())
                .sum::<usize>()
        };
        assert!(checks(&large) > 5 * checks(&small));

        let rules = |n| linear(n).lines().filter(|l| l.ends_with(" accept")).count();
        // The established rule, a rule per policy and a second admitting port.
        assert_eq!(rules(1000), 1 + 1000 + 1);
        assert_eq!(rules(0), 1);
        assert!(!linear(0).contains("drop"));
    }
}
