//! `lab check`: ICMP echo between every pair of pods, sent from inside each pod's
//! namespace over raw sockets, so it needs no `ping` binary and tests exactly the path a
//! pod's own traffic takes. In a dual-stack lab every pair is checked in both families:
//! ICMPv6 echo between the pods' IPv6 addresses, across the mesh as IPv4 goes.

use crate::spec::LabSpec;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use trellis_dataplane::icmp::{Icmp6Socket, IcmpSocket};

/// Which address family a pair was checked in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }

    fn label(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PairResult {
    pub from: String,
    pub to: String,
    pub family: Family,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

/// How many pairs of one family were checked, and how many reached each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FamilyTally {
    pub pairs: usize,
    pub reachable: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub pods: Vec<String>,
    /// Every pair in every family its two pods have addresses of.
    pub results: Vec<PairResult>,
    /// Per family checked (`ipv4`, and `ipv6` in a dual-stack lab).
    pub families: BTreeMap<Family, FamilyTally>,
}

/// A raw echo socket of either family.
enum EchoSocket {
    V4(IcmpSocket),
    V6(Icmp6Socket),
}

impl EchoSocket {
    fn open_in(family: Family, netns: &str) -> anyhow::Result<Self> {
        Ok(match family {
            Family::Ipv4 => EchoSocket::V4(
                IcmpSocket::open_in(netns).with_context(|| format!("ICMP socket in {netns}"))?,
            ),
            Family::Ipv6 => EchoSocket::V6(
                Icmp6Socket::open_in(netns).with_context(|| format!("ICMPv6 socket in {netns}"))?,
            ),
        })
    }

    fn send(&self, to: IpAddr, id: u16, seq: u16) -> std::io::Result<()> {
        match (self, to) {
            (EchoSocket::V4(s), IpAddr::V4(to)) => s.send_echo(to, id, seq),
            (EchoSocket::V6(s), IpAddr::V6(to)) => s.send_echo(to, id, seq),
            _ => Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
        }
    }

    /// The next echo reply: who answered, with which id and sequence number.
    async fn recv(&self) -> std::io::Result<(IpAddr, u16, u16)> {
        Ok(match self {
            EchoSocket::V4(s) => {
                let r = s.recv_reply().await?;
                (IpAddr::V4(r.from), r.id, r.seq)
            }
            EchoSocket::V6(s) => {
                let r = s.recv_reply().await?;
                (IpAddr::V6(r.from), r.id, r.seq)
            }
        })
    }
}

/// Ping every other pod from every pod, in every family both have an address of,
/// `attempts` rounds of `wait` each, only re-sending to pods that have not answered.
pub async fn all_pairs(
    spec: &LabSpec,
    attempts: usize,
    wait: Duration,
) -> anyhow::Result<CheckReport> {
    let pods: Vec<(String, String, Vec<IpAddr>)> = spec
        .all_pods()
        .map(|(_, p)| {
            let ips = std::iter::once(IpAddr::V4(p.ip.addr()))
                .chain(p.ip6.map(|a| IpAddr::V6(a.addr())))
                .collect();
            (p.name.clone(), p.netns.clone(), ips)
        })
        .collect();
    let mut tasks = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        // the pods with an address of this family, and that address
        let members: Vec<(&str, &str, IpAddr)> = (pods.iter())
            .filter_map(|(name, ns, ips)| {
                let ip = ips.iter().find(|ip| Family::of(**ip) == family)?;
                Some((name.as_str(), ns.as_str(), *ip))
            })
            .collect();
        for (i, (name, ns, _)) in members.iter().enumerate() {
            let targets: Vec<(String, IpAddr)> = (members.iter())
                .filter(|(other, _, _)| other != name)
                .map(|(n, _, ip)| (n.to_string(), *ip))
                .collect();
            if targets.is_empty() {
                continue;
            }
            let socket = EchoSocket::open_in(family, ns)?;
            let id = (std::process::id() as u16) ^ (i as u16).wrapping_mul(0x9e37);
            let from = name.to_string();
            tasks.push(tokio::spawn(async move {
                ping_all(socket, id, &targets, attempts, wait)
                    .await
                    .into_iter()
                    .map(|(to, rtt)| PairResult {
                        from: from.clone(),
                        to,
                        family,
                        ok: rtt.is_some(),
                        rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
                    })
                    .collect::<Vec<_>>()
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await?);
    }
    let mut families: BTreeMap<Family, FamilyTally> = BTreeMap::new();
    for r in &results {
        let tally = families.entry(r.family).or_default();
        tally.pairs += 1;
        tally.reachable += usize::from(r.ok);
    }
    Ok(CheckReport {
        ok: results.iter().all(|r| r.ok),
        pods: pods.into_iter().map(|(n, _, _)| n).collect(),
        results,
        families,
    })
}

async fn ping_all(
    socket: EchoSocket,
    id: u16,
    targets: &[(String, IpAddr)],
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
            if socket.send(*ip, id, seq).is_ok() {
                sent_at.insert(i, Instant::now());
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while answered.len() < targets.len() {
            let Ok(Ok((from, reply_id, seq))) =
                tokio::time::timeout_at(deadline, socket.recv()).await
            else {
                break;
            };
            if reply_id != id {
                continue; // another pod's ping
            }
            let target = usize::from(seq) % targets.len().max(1);
            if targets.get(target).is_some_and(|(_, ip)| *ip == from)
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

/// The matrix people read: one row per source pod, `.` reached, `X` not; in a dual-stack
/// lab one matrix per family, and a summary line with each family's count.
pub fn matrix(report: &CheckReport) -> String {
    let dual = report.families.contains_key(&Family::Ipv6);
    let mut out = String::new();
    for family in report.families.keys() {
        if dual {
            out.push_str(&format!("{}:\n", family.label()));
        }
        out.push_str(&family_matrix(report, *family));
    }
    let failed = report.results.iter().filter(|r| !r.ok).count();
    let per_family = if dual {
        let parts: Vec<String> = (report.families.iter())
            .map(|(f, t)| format!("{} {} of {}", f.label(), t.reachable, t.pairs))
            .collect();
        format!(" ({})", parts.join(", "))
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{} of {} pairs reachable{per_family}{}\n",
        report.results.len() - failed,
        report.results.len(),
        if failed > 0 { " — FAILED" } else { "" }
    ));
    out
}

fn family_matrix(report: &CheckReport, family: Family) -> String {
    let ok: BTreeMap<(&str, &str), bool> = (report.results.iter())
        .filter(|r| r.family == family)
        .map(|r| ((r.from.as_str(), r.to.as_str()), r.ok))
        .collect();
    // only the pods with an address of this family
    let pods: Vec<&String> = (report.pods.iter())
        .filter(|p| ok.keys().any(|(from, to)| from == p || to == p))
        .collect();
    let width = pods.iter().map(|p| p.len()).max().unwrap_or(4).max(4) + 1;
    let mut out = format!("{:width$} ", "from\\to");
    for p in &pods {
        out.push_str(&format!("{:>width$}", p));
    }
    out.push('\n');
    for from in &pods {
        out.push_str(&format!("{from:width$} "));
        for to in &pods {
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(from: &str, to: &str, family: Family, ok: bool) -> PairResult {
        PairResult {
            from: from.into(),
            to: to.into(),
            family,
            ok,
            rtt_ms: ok.then_some(0.1),
        }
    }

    fn report(results: Vec<PairResult>) -> CheckReport {
        let mut families: BTreeMap<Family, FamilyTally> = BTreeMap::new();
        for r in &results {
            let t = families.entry(r.family).or_default();
            t.pairs += 1;
            t.reachable += usize::from(r.ok);
        }
        CheckReport {
            ok: results.iter().all(|r| r.ok),
            pods: vec!["a1-p0".into(), "b1-p0".into()],
            results,
            families,
        }
    }

    #[test]
    fn a_single_stack_matrix_reads_as_it_always_did() {
        use Family::Ipv4;
        let text = matrix(&report(vec![
            pair("a1-p0", "b1-p0", Ipv4, true),
            pair("b1-p0", "a1-p0", Ipv4, false),
        ]));
        assert_eq!(
            text,
            "from\\to  a1-p0 b1-p0\n\
             a1-p0       -     .\n\
             b1-p0       X     -\n\
             1 of 2 pairs reachable — FAILED\n"
        );
    }

    #[test]
    fn a_dual_stack_matrix_shows_each_family_and_counts_ipv6_pairs() {
        use Family::{Ipv4, Ipv6};
        let r = report(vec![
            pair("a1-p0", "b1-p0", Ipv4, true),
            pair("b1-p0", "a1-p0", Ipv4, true),
            pair("a1-p0", "b1-p0", Ipv6, true),
            pair("b1-p0", "a1-p0", Ipv6, false),
        ]);
        let text = matrix(&r);
        assert!(text.starts_with("IPv4:\n"), "{text}");
        assert!(text.contains("\nIPv6:\n"), "{text}");
        assert!(
            text.ends_with("3 of 4 pairs reachable (IPv4 2 of 2, IPv6 1 of 2) — FAILED\n"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["families"]["ipv6"]["reachable"], 1);
        assert_eq!(json["results"][2]["family"], "ipv6");
    }
}
