//! `lab check`: ICMP echo between every pair of pods, sent from inside each pod's
//! namespace over raw sockets, so it needs no `ping` binary and tests exactly the path a
//! pod's own traffic takes.

use crate::spec::LabSpec;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use trellis_dataplane::icmp::IcmpSocket;

#[derive(Clone, Debug, Serialize)]
pub struct PairResult {
    pub from: String,
    pub to: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub pods: Vec<String>,
    pub results: Vec<PairResult>,
}

/// Ping every other pod from every pod, `attempts` rounds of `wait` each, only re-sending
/// to pods that have not answered.
pub async fn all_pairs(
    spec: &LabSpec,
    attempts: usize,
    wait: Duration,
) -> anyhow::Result<CheckReport> {
    let pods: Vec<(String, String, Ipv4Addr)> = spec
        .all_pods()
        .map(|(_, p)| (p.name.clone(), p.netns.clone(), p.ip.addr()))
        .collect();
    let mut tasks = Vec::new();
    for (i, (name, ns, _)) in pods.iter().enumerate() {
        let targets: Vec<(String, Ipv4Addr)> = pods
            .iter()
            .filter(|(other, _, _)| other != name)
            .map(|(n, _, ip)| (n.clone(), *ip))
            .collect();
        let socket = IcmpSocket::open_in(ns).with_context(|| format!("ICMP socket in {ns}"))?;
        let id = (std::process::id() as u16) ^ (i as u16).wrapping_mul(0x9e37);
        let from = name.clone();
        tasks.push(tokio::spawn(async move {
            ping_all(socket, id, &targets, attempts, wait)
                .await
                .into_iter()
                .map(|(to, rtt)| PairResult {
                    from: from.clone(),
                    to,
                    ok: rtt.is_some(),
                    rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await?);
    }
    Ok(CheckReport {
        ok: results.iter().all(|r| r.ok),
        pods: pods.into_iter().map(|(n, _, _)| n).collect(),
        results,
    })
}

async fn ping_all(
    socket: IcmpSocket,
    id: u16,
    targets: &[(String, Ipv4Addr)],
    attempts: usize,
    wait: Duration,
) -> Vec<(String, Option<Duration>)> {
    let mut answered: BTreeMap<usize, Duration> = BTreeMap::new();
    for attempt in 0..attempts.max(1) {
        let mut sent_at: BTreeMap<usize, Instant> = BTreeMap::new();
        for (i, (_, ip)) in targets.iter().enumerate() {
            if answered.contains_key(&i) {
                continue;
            }
            let seq = (attempt * targets.len() + i) as u16;
            if socket.send_echo(*ip, id, seq).is_ok() {
                sent_at.insert(i, Instant::now());
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while answered.len() < targets.len() {
            let Ok(Ok(reply)) = tokio::time::timeout_at(deadline, socket.recv_reply()).await else {
                break;
            };
            if reply.id != id {
                continue; // another pod's ping
            }
            let target = usize::from(reply.seq) % targets.len().max(1);
            if targets.get(target).is_some_and(|(_, ip)| *ip == reply.from)
                && let Some(at) = sent_at.get(&target)
            {
                answered.entry(target).or_insert_with(|| at.elapsed());
            }
        }
        if answered.len() == targets.len() {
            break;
        }
    }
    targets
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), answered.get(&i).copied()))
        .collect()
}

/// The matrix people read: one row per source pod, `.` reached, `X` not.
pub fn matrix(report: &CheckReport) -> String {
    let ok: BTreeMap<(&str, &str), bool> = report
        .results
        .iter()
        .map(|r| ((r.from.as_str(), r.to.as_str()), r.ok))
        .collect();
    let width = report
        .pods
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(4)
        .max(4)
        + 1;
    let mut out = format!("{:width$} ", "from\\to");
    for p in &report.pods {
        out.push_str(&format!("{:>width$}", p));
    }
    out.push('\n');
    for from in &report.pods {
        out.push_str(&format!("{from:width$} "));
        for to in &report.pods {
            let cell = if from == to {
                "-"
            } else if ok.get(&(from.as_str(), to.as_str())) == Some(&true) {
                "."
            } else {
                "X"
            };
            out.push_str(&format!("{cell:>width$}"));
        }
        out.push('\n');
    }
    let failed = report.results.iter().filter(|r| !r.ok).count();
    out.push_str(&format!(
        "{} of {} pairs reachable{}\n",
        report.results.len() - failed,
        report.results.len(),
        if failed > 0 { " — FAILED" } else { "" }
    ));
    out
}
