//! The connection case's network: a client namespace, the proxy's node and a backend
//! namespace, in a line, all in the pod network so nothing is masqueraded:
//!
//! ```text
//!  client c0 10.244.1.2 ── p0 10.244.1.1 :node: p1 10.244.2.1 ── b0 10.244.2.2… :backend
//! ```
//!
//! The backend owns one address per endpoint of service 0 and listens on the target port
//! of all of them; the client opens connections to service 0's ClusterIP one after
//! another and times each `connect()` (SYN to SYN-ACK, through the node's DNAT).

use super::synth::TARGET_PORT;
use anyhow::Context;
use ipnet::IpNet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;
use trellis_dataplane::netlink::{Netlink, RouteSpec};
use trellis_dataplane::{netns, sysctl};

pub const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
const CLIENT: &str = "10.244.1.2/24";
const NODE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const NODE_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 1);
/// RTPROT_STATIC.
const STATIC: u8 = 4;

pub struct Line {
    pub client: String,
    pub node: String,
    pub backend: String,
}

/// Builds the three namespaces and their links; `endpoints` addresses on the backend.
pub async fn build(line: &Line, endpoints: usize) -> anyhow::Result<()> {
    for ns in [&line.client, &line.node, &line.backend] {
        netns::create(ns)?;
        Netlink::connect_in(ns)?.set_up("lo").await?;
    }
    let client = Netlink::connect_in(&line.client)?;
    let node = Netlink::connect_in(&line.node)?;
    let backend = Netlink::connect_in(&line.backend)?;
    let node_fd = netns::open(&line.node)?;
    client.create_veth("c0", "p0").await?;
    client.move_link_to_netns("p0", &node_fd).await?;
    backend.create_veth("b0", "p1").await?;
    backend.move_link_to_netns("p1", &node_fd).await?;

    client.add_address("c0", CLIENT.parse()?).await?;
    client.set_up("c0").await?;
    client.add_route(&default_via(NODE_CLIENT_SIDE)).await?;
    node.add_address("p0", IpNet::new(NODE_CLIENT_SIDE.into(), 24)?)
        .await?;
    node.set_up("p0").await?;
    node.add_address("p1", IpNet::new(NODE_BACKEND_SIDE.into(), 24)?)
        .await?;
    node.set_up("p1").await?;
    for e in 0..endpoints {
        let addr = Ipv4Addr::from(u32::from(BACKEND) + e as u32);
        backend
            .add_address("b0", IpNet::new(addr.into(), 24)?)
            .await?;
    }
    backend.set_up("b0").await?;
    backend.add_route(&default_via(NODE_BACKEND_SIDE)).await?;
    netns::run_in(&line.node, || sysctl::set("net.ipv4.ip_forward", "1"))??;
    Ok(())
}

fn default_via(gateway: Ipv4Addr) -> RouteSpec {
    RouteSpec {
        dst: "0.0.0.0/0".parse().expect("literal"),
        via: Some(gateway.into()),
        dev: None,
        src: None,
        protocol: STATIC,
    }
}

/// A listener on the target port of every backend address, accepting and closing, until
/// dropped.
pub struct Backend {
    listener: std::sync::Arc<TcpListener>,
}

impl Backend {
    pub fn start(netns_name: &str) -> anyhow::Result<Backend> {
        let listener = netns::run_in(netns_name, || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, TARGET_PORT))
        })??;
        // std listens with a backlog of 128: connections set up every 15 µs fill that in
        // 2 ms whenever the accepting thread is not scheduled, and a full queue drops the
        // SYN (a 1 s retransmission). Listening again raises it.
        // SAFETY: listen(2) on the live listening descriptor.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let listener = std::sync::Arc::new(listener);
        let accepting = listener.clone();
        std::thread::spawn(move || {
            pin_to_cpu(1);
            // Ends when the listener is shut down.
            for conn in accepting.incoming() {
                if conn.is_err() {
                    break;
                }
            }
        });
        Ok(Backend { listener })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on a descriptor this Arc keeps open; it ends the accept loop.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// What `count` connections (after `warmup` untimed ones) from the client saw.
#[derive(Default)]
pub struct Latencies {
    /// Sorted, µs.
    pub micros: Vec<f64>,
    pub failed: usize,
    /// Why the failed ones failed, with how many each.
    pub errors: std::collections::BTreeMap<String, usize>,
}

/// Opens connections one after another from the client namespace and times each
/// `connect()`. Each comes from a source port of its own (counting up from
/// [`FIRST_SOURCE_PORT`] through the whole run) and ends with a reset: a 4-tuple used
/// again while conntrack still holds its closed predecessor may have its SYN dropped
/// (conntrack kills the old entry and drops the packet if that races), which costs a 1 s
/// retransmission that has nothing to do with the proxy.
pub fn measure(
    client_ns: &str,
    to: SocketAddrV4,
    next_port: &mut u16,
    warmup: usize,
    count: usize,
) -> anyhow::Result<Latencies> {
    let first = *next_port;
    let lat = netns::run_in(client_ns, move || {
        pin_to_cpu(0);
        let mut port = first;
        let mut micros = Vec::with_capacity(count);
        let mut failed = 0;
        let mut errors = std::collections::BTreeMap::new();
        for n in 0..warmup + count {
            port = if port >= LAST_SOURCE_PORT {
                FIRST_SOURCE_PORT
            } else {
                port + 1
            };
            let t = Instant::now();
            let result = connect_from(port, to);
            let took = t.elapsed();
            match result {
                Ok(fd) => {
                    if n >= warmup {
                        micros.push(took.as_secs_f64() * 1e6);
                    }
                    drop(fd);
                }
                Err(e) if n >= warmup => {
                    failed += 1;
                    *errors
                        .entry(format!(
                            "{} after {:.0} ms",
                            e.kind(),
                            took.as_secs_f64() * 1e3
                        ))
                        .or_insert(0) += 1;
                }
                Err(_) => {}
            }
        }
        micros.sort_by(f64::total_cmp);
        (
            Latencies {
                micros,
                failed,
                errors,
            },
            port,
        )
    })
    .context("entering the client's namespace")?;
    *next_port = lat.1;
    Ok(lat.0)
}

/// Keeps the calling thread on one CPU (if the machine has it): the client on one, the
/// backend on the other, so every round runs in the same placement (left to the
/// scheduler, rounds came out at 13 or at 21 µs depending on where the threads landed).
fn pin_to_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        return;
    }
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub const FIRST_SOURCE_PORT: u16 = 20_000;
const LAST_SOURCE_PORT: u16 = 60_999;

/// A blocking `connect()` from `port` to `to`, bounded by 1 s (`SO_SNDTIMEO`); the socket
/// closes with a reset when dropped (`SO_LINGER` 0), so no end keeps it in TIME_WAIT.
fn connect_from(port: u16, to: SocketAddrV4) -> std::io::Result<OwnedFd> {
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let one: libc::c_int = 1;
    // SAFETY: each setsockopt reads a value of the size given; bind and connect read a
    // sockaddr_in of the size given; all on the live descriptor above.
    unsafe {
        check(libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        check(libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        ))?;
        check(libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        check(libc::bind(
            raw,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ))?;
        let remote = sockaddr(to);
        let rc = libc::connect(
            raw,
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // A connect cut short by SO_SNDTIMEO reports EINPROGRESS.
            return Err(if e.raw_os_error() == Some(libc::EINPROGRESS) {
                std::io::Error::from(std::io::ErrorKind::TimedOut)
            } else {
                e
            });
        }
    }
    Ok(fd)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

impl Latencies {
    pub fn percentile(&self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let rank = ((p * self.micros.len() as f64).ceil() as usize).clamp(1, self.micros.len());
        self.micros[rank - 1]
    }
}
