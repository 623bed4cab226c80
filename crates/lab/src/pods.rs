//! What lab pods serve, and clients that tell which pod answered.
//!
//! Every pod answers TCP and UDP echo on [`ECHO_PORT`] (as Kubernetes' `serve-hostname`
//! test image does) and on [`SECOND_PORT`] (so a network policy can admit one port and not
//! the other), each answer prefixed with the pod's name: a line `hello` sent over TCP
//! comes back as `a1-p0 hello`, a datagram `hello` as `a1-p0 hello`. So a client of a
//! Service can tell which backend it reached. One `lab serve-pods` process per lab (in the
//! fabric namespace, started by `lab up`) holds the sockets of every pod, each bound inside
//! its pod's own namespace; no external tool runs in a pod.

use crate::processes;
use crate::spec::{self, LabSpec};
use crate::state::{self, LabState};
use anyhow::{Context, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use trellis_dataplane::netns;

/// Where every pod answers TCP and UDP echo.
pub const ECHO_PORT: u16 = 9376;
/// Where every pod answers too, for policies that admit one port and not another.
pub const SECOND_PORT: u16 = 9377;
/// A TCP connection that sends nothing for this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// What clients send; the answer is the pod's name, a space, and this.
const HELLO: &str = "hello";

/// Starts the lab's pod server in the fabric namespace; returns its pid.
pub fn start(spec: &LabSpec) -> anyhow::Result<i32> {
    processes::spawn_in(
        &spec::fabric_netns(&spec.name),
        &[
            "lab".into(),
            "serve-pods".into(),
            format!("--name={}", spec.name),
        ],
        &state::log_path(&spec.name, "pods"),
    )
}

/// `lab serve-pods`: TCP and UDP echo in every pod of the lab, until killed. Pods come
/// and go (`lab pod add|del`, a cold boot re-creates them in new sandboxes): the lab's
/// state is re-read every [`RESCAN`] and each sandbox served once.
pub async fn serve(lab: &str) -> anyhow::Result<()> {
    // A client that goes away must not end the server by SIGPIPE.
    // SAFETY: signal(2) sets one signal's disposition; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let mut served: BTreeMap<(String, String), tokio::task::JoinSet<()>> = BTreeMap::new();
    loop {
        if let Ok(state) = LabState::load(lab) {
            let wanted: BTreeMap<(String, String), &spec::PodSpec> = state
                .spec
                .all_pods()
                .map(|(_, p)| ((p.netns.clone(), p.container_id.clone()), p))
                .collect();
            // A sandbox that went: its tasks end (dropping a JoinSet aborts them).
            served.retain(|key, _| wanted.contains_key(key));
            for (key, pod) in wanted {
                if served.contains_key(&key) || !netns::exists(&pod.netns) {
                    continue;
                }
                match serve_pod(pod) {
                    Ok(tasks) => {
                        tracing::info!(pod = %pod.name, port = ECHO_PORT, "serving TCP and UDP echo");
                        served.insert(key, tasks);
                    }
                    Err(e) => tracing::warn!(pod = %pod.name, "not serving yet: {e:#}"),
                }
            }
        }
        tokio::time::sleep(RESCAN).await;
    }
}

/// How often the pod server looks for new and removed pods.
const RESCAN: Duration = Duration::from_millis(250);

fn serve_pod(pod: &spec::PodSpec) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let name: Arc<str> = pod.name.as_str().into();
    let mut tasks = tokio::task::JoinSet::new();
    for port in [ECHO_PORT, SECOND_PORT] {
        let (tcp, udp) = netns::run_in(&pod.netns, move || {
            let any = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
            // One socket per protocol for both families (IPv4 as mapped addresses).
            let tcp = std::net::TcpListener::bind(any)?;
            tcp.set_nonblocking(true)?;
            let udp = std::net::UdpSocket::bind(any)?;
            udp.set_nonblocking(true)?;
            io::Result::Ok((tcp, udp))
        })?
        .with_context(|| format!("binding port {port} in pod {}", pod.name))?;
        tasks.spawn(serve_tcp(
            name.clone(),
            tokio::net::TcpListener::from_std(tcp)?,
        ));
        tasks.spawn(serve_udp(
            name.clone(),
            tokio::net::UdpSocket::from_std(udp)?,
        ));
    }
    Ok(tasks)
}

async fn serve_tcp(pod: Arc<str>, listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer_tcp(pod.clone(), stream));
            }
            // Out of descriptors for a moment: wait rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Each line comes back prefixed with the pod's name, until the client closes.
async fn answer_tcp(pod: Arc<str>, stream: tokio::net::TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(IDLE, lines.next_line()).await {
        if write
            .write_all(format!("{pod} {line}\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
}

async fn serve_udp(pod: Arc<str>, socket: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut answer = format!("{pod} ").into_bytes();
        answer.extend_from_slice(&buf[..len]);
        let _ = socket.send_to(&answer, from).await;
    }
}

/// A pod dies, as far as the network can tell: its interface is deleted (with the veth's
/// other end on the node's bridge), so its address answers nothing any more and a
/// connection to it times out. The pod's sockets stay in the echo server, unreachable.
pub async fn cut(lab: &str, pod: &str) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    let Some((_, spec)) = state.spec.all_pods().find(|(_, p)| p.name == pod) else {
        bail!("lab {lab} has no pod {pod:?}");
    };
    let nl = trellis_dataplane::netlink::Netlink::connect_in(&spec.netns)?;
    nl.delete_link("eth0")
        .await
        .with_context(|| format!("deleting the interface of pod {pod}"))
}

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// Why an exchange got no answer, as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// Connection refused (TCP RST, or ICMP port unreachable: a REJECT).
    Refused,
    /// No answer in time (a DROP, or a dead address).
    Timeout,
    /// ICMP host or network unreachable.
    Unreachable,
    /// Connected, then reset or closed before the answer.
    Reset,
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => f.write_str("refused"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Unreachable => f.write_str("unreachable"),
            Failure::Reset => f.write_str("reset"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

fn failure(e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Failure::Unreachable,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => Failure::Reset,
        io::ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// One exchange from inside `netns_name` to `target` over a new socket (a new source port,
/// so a new flow for the proxy): the name of the pod that answered.
pub async fn echo(
    netns_name: &str,
    target: SocketAddr,
    protocol: L4,
    timeout: Duration,
) -> Result<String, Failure> {
    let exchange = async {
        match protocol {
            L4::Tcp => echo_tcp(netns_name, target).await,
            L4::Udp => echo_udp(netns_name, target).await,
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout),
    }
}

async fn echo_tcp(netns_name: &str, target: SocketAddr) -> Result<String, Failure> {
    let v4 = target.is_ipv4();
    let socket = netns::run_in(netns_name, move || {
        if v4 {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    })
    .map_err(|e| Failure::Other(e.to_string()))?
    .map_err(|e| failure(&e))?;
    let stream = socket.connect(target).await.map_err(|e| failure(&e))?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{HELLO}\n").as_bytes())
        .await
        .map_err(|e| failure(&e))?;
    let mut line = String::new();
    let n = BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(|e| failure(&e))?;
    if n == 0 {
        return Err(Failure::Reset);
    }
    answered_by(line.trim_end())
}

async fn echo_udp(netns_name: &str, target: SocketAddr) -> Result<String, Failure> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = netns::run_in(netns_name, move || {
        let s = std::net::UdpSocket::bind(any)?;
        s.set_nonblocking(true)?;
        io::Result::Ok(s)
    })
    .map_err(|e| Failure::Other(e.to_string()))?
    .map_err(|e| failure(&e))?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| failure(&e))?;
    // Connected, so that an ICMP port unreachable (a REJECT) comes back as an error.
    socket.connect(target).await.map_err(|e| failure(&e))?;
    socket
        .send(HELLO.as_bytes())
        .await
        .map_err(|e| failure(&e))?;
    let mut buf = vec![0u8; 2048];
    let len = socket.recv(&mut buf).await.map_err(|e| failure(&e))?;
    answered_by(String::from_utf8_lossy(&buf[..len]).trim_end())
}

/// The pod's name from an answer `POD hello`.
fn answered_by(answer: &str) -> Result<String, Failure> {
    match answer.split_once(' ') {
        Some((pod, rest)) if rest == HELLO && !pod.is_empty() => Ok(pod.to_string()),
        _ => Err(Failure::Other(format!("unexpected answer {answer:?}"))),
    }
}

/// The namespace a client runs in: a pod (`a1-p0`), a node (`a1`) or a host (`laptop`).
pub fn client_netns(spec: &LabSpec, from: &str) -> anyhow::Result<String> {
    if let Some((_, pod)) = spec.all_pods().find(|(_, p)| p.name == from) {
        return Ok(pod.netns.clone());
    }
    if let Some(node) = spec.nodes.iter().find(|n| n.name == from) {
        return Ok(node.netns.clone());
    }
    if let Some(host) = spec.hosts.iter().find(|h| h.name == from) {
        return Ok(host.netns.clone());
    }
    let pods: Vec<&str> = spec.all_pods().map(|(_, p)| p.name.as_str()).collect();
    let hosts: Vec<&str> = spec.hosts.iter().map(|h| h.name.as_str()).collect();
    bail!(
        "invalid FROM {from:?}: lab {} has no pod, node or host of that name (pods: {}; hosts: {})",
        spec.name,
        pods.join(", "),
        if hosts.is_empty() {
            "none, see `lab host add`".to_string()
        } else {
            hosts.join(", ")
        }
    )
}

/// What `lab connect` saw: who answered how often, and the failures by kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tally {
    pub from: String,
    pub target: String,
    pub protocol: String,
    pub attempts: usize,
    /// Pod name → answers.
    pub answers: BTreeMap<String, usize>,
    /// Failure kind (refused, timeout, unreachable, reset, …) → count.
    pub failures: BTreeMap<String, usize>,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "{} -> {}/{}: {} exchanges; answered by: {}",
            self.from,
            self.target,
            self.protocol,
            self.attempts,
            if self.answers.is_empty() {
                "nobody".to_string()
            } else {
                list(&self.answers)
            }
        )?;
        if !self.failures.is_empty() {
            write!(f, "; failed: {}", list(&self.failures))?;
        }
        Ok(())
    }
}

/// `lab connect`: `count` exchanges, one after the other, each on a new socket, from `from`
/// (a pod, node or host) to `target`.
pub async fn connect(
    lab: &str,
    from: &str,
    target: SocketAddr,
    protocol: L4,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Tally> {
    let state = LabState::load(lab)?;
    let netns_name = client_netns(&state.spec, from)?;
    let mut tally = Tally {
        from: from.to_string(),
        target: target.to_string(),
        protocol: protocol.name().to_string(),
        ..Tally::default()
    };
    for _ in 0..count {
        tally.attempts += 1;
        match echo(&netns_name, target, protocol, timeout).await {
            Ok(pod) => *tally.answers.entry(pod).or_default() += 1,
            Err(f) => *tally.failures.entry(f.to_string()).or_default() += 1,
        }
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_the_pod() {
        assert_eq!(answered_by("a1-p0 hello"), Ok("a1-p0".into()));
        assert!(answered_by("hello").is_err());
        assert!(answered_by("a1-p0 bye").is_err());
    }

    #[test]
    fn failures_are_named_as_clients_see_them() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            failure(&e(io::ErrorKind::ConnectionRefused)),
            Failure::Refused
        );
        assert_eq!(
            failure(&e(io::ErrorKind::HostUnreachable)),
            Failure::Unreachable
        );
        assert_eq!(Failure::Refused.to_string(), "refused");
    }
}
