//! `lab check`: ICMP echo between every pair of pods, sent from inside each pod's
//! namespace over raw sockets, so it needs no `ping` binary and tests exactly the path a
//! pod's own traffic takes.

use super::spec::LabSpec;
use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use trellis_dataplane::netns;

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
        let socket = open_icmp_socket(ns).with_context(|| format!("ICMP socket in {ns}"))?;
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

fn open_icmp_socket(ns: &str) -> anyhow::Result<AsyncFd<OwnedFd>> {
    let fd = netns::run_in(ns, || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: fd is a fresh, valid descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    })??;
    // SAFETY: the descriptor is owned by the AsyncFd from here on and registered once.
    unsafe { AsyncFd::register(fd) }.map_err(|e| anyhow::anyhow!("registering ICMP socket: {e}"))
}

fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8; // echo request
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

async fn ping_all(
    socket: AsyncFd<OwnedFd>,
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
            if send_to(&socket, &echo_request(id, seq), *ip).is_ok() {
                sent_at.insert(i, Instant::now());
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while answered.len() < targets.len() {
            let Ok(guard) = tokio::time::timeout_at(deadline, socket.readable()).await else {
                break;
            };
            let Ok(mut guard) = guard else { break };
            let mut buf = [0u8; 1500];
            // SAFETY: reading into a local buffer from our own descriptor.
            let n = unsafe {
                libc::recv(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                guard.clear_ready();
                continue;
            }
            let packet = &buf[..n as usize];
            let header = usize::from(packet[0] & 0x0f) * 4;
            let Some(icmp) = packet.get(header..header + 8) else {
                continue;
            };
            if icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != id {
                continue; // not an echo reply to us
            }
            let seq = usize::from(u16::from_be_bytes([icmp[6], icmp[7]]));
            let target = seq % targets.len().max(1);
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            if targets.get(target).is_some_and(|(_, ip)| *ip == src)
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

fn send_to(socket: &AsyncFd<OwnedFd>, packet: &[u8], ip: Ipv4Addr) -> std::io::Result<()> {
    let addr = SocketAddr::V4(SocketAddrV4::new(ip, 0));
    let SocketAddr::V4(v4) = addr else {
        unreachable!()
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto(2) with a valid buffer and a sockaddr_in of the right size.
    let n = unsafe {
        libc::sendto(
            socket.get_ref().as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(0x1234, 7);
        assert_eq!(
            checksum(&p),
            0,
            "a packet including its checksum sums to zero"
        );
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }
}
