//! Connection tracking over netlink (ctnetlink), without the `conntrack` binary: list the
//! entries of a namespace's table and delete some of them.
//!
//! The service proxy needs this for UDP: a UDP "connection" to a service address stays
//! DNATed to the endpoint it first went to for as long as packets keep coming, so when that
//! endpoint goes away (or the service does, or is scaled to zero), its clients are
//! blackholed until their entries are deleted.
//!
//! - [`Conntrack`]: a connection bound to one network namespace ([`Conntrack::connect`],
//!   [`Conntrack::connect_in`], as [`crate::nftables::Nft`]); every call is bounded by a
//!   timeout ([`DEFAULT_TIMEOUT`]) and its errors name what was being done, where, and what
//!   the kernel answered.
//! - [`Conntrack::entries`]: a dump of IPv4 and IPv6 entries selected by a [`Filter`]
//!   (family, protocol, original destination address and port, reply source address and
//!   port, i.e. the endpoint after DNAT). Multi-part dumps are read to the end, interrupted
//!   ones started again, entries that a concurrent resize of the table makes the kernel
//!   list twice are listed once.
//! - [`Conntrack::delete`], [`Conntrack::delete_entries`], [`Conntrack::delete_matching`]:
//!   deletes by original tuple, zone and id, so an entry replaced in the meantime by a new
//!   one with the same addresses and ports is left alone — unless the kernel built the new
//!   one in the old one's memory: its id hashes the entry's address and original tuple, so
//!   the two then share it and cannot be told apart. An entry already gone counts as
//!   deleted. Deletes of many entries are pipelined, [`DELETE_CHUNK`] to a round trip.
//!
//! **Why hand-written.** `netlink-packet-netfilter` (rust-netlink, 0.4.0, the one release
//! that builds on this workspace's `netlink-packet-core` 0.9) has conntrack message types,
//! but not what this module is mostly made of: no socket, deadline, multi-part dump or
//! retry, no filter, no `CTA_ID` or `CTA_ZONE` (a delete without the id can remove a newer
//! entry with the same tuple), and its API broke in each of its last two releases, a week
//! apart. The two requests and the reader here are small. They speak through
//! the same NETLINK_NETFILTER socket as [`crate::nftables`] (`nfsocket`); the attribute
//! encoding is this module's own.
//!
//! **Filtering** is done here, over the dump, except the address family, which the kernel
//! filters (`nfgen_family` of the request, honoured by every kernel). The kernel's own
//! tuple filter (`CTA_FILTER`, Linux 5.8+) would save copying unwanted entries, but older
//! kernels silently ignore it (so the filter must be applied here anyway) and it has had
//! fixes in later releases (reply-tuple flags, zones); it is left for when a measurement
//! asks for it.
//!
//! The calls block, for microseconds normally and at most the timeout. From async code,
//! accept that or wrap them in `spawn_blocking`.

mod wire;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns;
use crate::nfsocket::NfSocket;

/// How long one call may wait for the kernel: for the whole of a dump, for each round trip
/// of a delete.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many deletes are sent in one datagram before their acknowledgements are collected.
pub const DELETE_CHUNK: usize = 256;

/// How often a dump the kernel reports as interrupted is started again.
const DUMP_ATTEMPTS: usize = 5;

/// The address family of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn code(self) -> u8 {
        match self {
            Family::V4 => wire::NFPROTO_IPV4,
            Family::V6 => wire::NFPROTO_IPV6,
        }
    }

    fn from_code(code: u8) -> Option<Family> {
        match code {
            wire::NFPROTO_IPV4 => Some(Family::V4),
            wire::NFPROTO_IPV6 => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// A layer-4 protocol number (`IPPROTO_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const ICMP: Protocol = Protocol(1);
    pub const TCP: Protocol = Protocol(6);
    pub const UDP: Protocol = Protocol(17);
    pub const DCCP: Protocol = Protocol(33);
    pub const GRE: Protocol = Protocol(47);
    pub const ICMPV6: Protocol = Protocol(58);
    pub const SCTP: Protocol = Protocol(132);
    pub const UDPLITE: Protocol = Protocol(136);

    /// The name `conntrack -L` prints, if it has one.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Protocol::ICMP => "icmp",
            Protocol::TCP => "tcp",
            Protocol::UDP => "udp",
            Protocol::DCCP => "dccp",
            Protocol::GRE => "gre",
            Protocol::ICMPV6 => "icmpv6",
            Protocol::SCTP => "sctp",
            Protocol::UDPLITE => "udplite",
            _ => return None,
        })
    }

    /// Whether the kernel tracks it by source and destination port (GRE's keys sit in the
    /// same place).
    fn has_ports(self) -> bool {
        matches!(
            self,
            Protocol::TCP
                | Protocol::UDP
                | Protocol::DCCP
                | Protocol::GRE
                | Protocol::SCTP
                | Protocol::UDPLITE
        )
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "proto {}", self.0),
        }
    }
}

/// One direction of a connection as the kernel tracks it.
///
/// For ICMP and ICMPv6, `sport` is the echo id and `dport` is `type << 8 | code`, where the
/// kernel's own tuple keeps them. For protocols without ports both are 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    /// The destination as a socket address.
    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dport)
    }

    /// The source as a socket address.
    pub fn src_addr(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.sport)
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src_addr(), self.dst_addr())
    }
}

/// The status bits of an entry (`IPS_*` of `nf_conntrack_common.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Status(pub u32);

impl Status {
    pub const EXPECTED: Status = Status(1 << 0);
    /// Packets were seen in both directions (`conntrack -L` prints the missing bit as
    /// `[UNREPLIED]`).
    pub const SEEN_REPLY: Status = Status(1 << 1);
    /// Not to be evicted early (`[ASSURED]`).
    pub const ASSURED: Status = Status(1 << 2);
    pub const CONFIRMED: Status = Status(1 << 3);
    pub const SRC_NAT: Status = Status(1 << 4);
    pub const DST_NAT: Status = Status(1 << 5);
    pub const SRC_NAT_DONE: Status = Status(1 << 7);
    pub const DST_NAT_DONE: Status = Status(1 << 8);
    pub const DYING: Status = Status(1 << 9);
    pub const FIXED_TIMEOUT: Status = Status(1 << 10);
    pub const OFFLOAD: Status = Status(1 << 14);

    /// Whether every bit of `bits` is set.
    pub fn contains(self, bits: Status) -> bool {
        self.0 & bits.0 == bits.0
    }
}

impl std::ops::BitOr for Status {
    type Output = Status;

    fn bitor(self, other: Status) -> Status {
        Status(self.0 | other.0)
    }
}

/// The TCP state of an entry (`enum tcp_conntrack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl TcpState {
    pub const NONE: TcpState = TcpState(0);
    pub const SYN_SENT: TcpState = TcpState(1);
    pub const SYN_RECV: TcpState = TcpState(2);
    pub const ESTABLISHED: TcpState = TcpState(3);
    pub const FIN_WAIT: TcpState = TcpState(4);
    pub const CLOSE_WAIT: TcpState = TcpState(5);
    pub const LAST_ACK: TcpState = TcpState(6);
    pub const TIME_WAIT: TcpState = TcpState(7);
    pub const CLOSE: TcpState = TcpState(8);
    pub const SYN_SENT2: TcpState = TcpState(9);

    /// The name `conntrack -L` prints.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 10] = [
            "NONE",
            "SYN_SENT",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT",
            "CLOSE_WAIT",
            "LAST_ACK",
            "TIME_WAIT",
            "CLOSE",
            "SYN_SENT2",
        ];
        NAMES.get(usize::from(self.0)).copied().unwrap_or("UNKNOWN")
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the connection tracking table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub family: Family,
    pub protocol: Protocol,
    /// The direction of the first packet, as it arrived: for a service, client → service
    /// address and port.
    pub original: Tuple,
    /// The direction of the answers, as they leave the endpoint: after DNAT, its source is
    /// the endpoint the connection was sent to.
    pub reply: Tuple,
    pub status: Status,
    /// For TCP entries.
    pub tcp_state: Option<TcpState>,
    /// Time left before the entry expires, as of the dump.
    pub timeout: Duration,
    pub mark: u32,
    /// The conntrack zone (0 is the default one).
    pub zone: u16,
    /// The kernel's id of the entry (what `conntrack -L -o id` prints).
    pub id: u32,
}

impl fmt::Display for Entry {
    /// `udp 10.0.0.2:40001 -> 10.96.0.10:53 (reply 10.1.0.7:53 -> 10.0.0.2:40001, id 123)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (reply {}",
            self.protocol, self.original, self.reply
        )?;
        if self.zone != 0 {
            write!(f, ", zone {}", self.zone)?;
        }
        write!(f, ", id {})", self.id)
    }
}

/// Which entries [`Conntrack::entries`] and [`Conntrack::delete_matching`] select: those
/// that match every field that is set. [`Filter::default`] selects all.
///
/// ```
/// use trellis_dataplane::conntrack::{Filter, Protocol};
/// // UDP entries of a service address and port whose endpoint was 10.1.0.7.
/// let stale = Filter::protocol(Protocol::UDP)
///     .original_dst("10.96.0.10:53".parse().unwrap())
///     .reply_src_ip("10.1.0.7".parse().unwrap());
/// // UDP entries of a NodePort, whatever node address they were sent to.
/// let node_port = Filter::protocol(Protocol::UDP).original_dport(30053);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub family: Option<Family>,
    pub protocol: Option<Protocol>,
    /// Destination address of the original direction: the service address.
    pub original_dst: Option<IpAddr>,
    /// Destination port of the original direction: the service port or NodePort.
    pub original_dport: Option<u16>,
    /// Source address of the reply direction: the endpoint after DNAT.
    pub reply_src: Option<IpAddr>,
    /// Source port of the reply direction: the endpoint's port after DNAT.
    pub reply_sport: Option<u16>,
}

impl Filter {
    /// Every entry.
    pub fn any() -> Filter {
        Filter::default()
    }

    /// Every entry of one protocol.
    pub fn protocol(protocol: Protocol) -> Filter {
        Filter {
            protocol: Some(protocol),
            ..Filter::default()
        }
    }

    /// Only this address family.
    pub fn family(mut self, family: Family) -> Filter {
        self.family = Some(family);
        self
    }

    /// Only entries first sent to this address and port (a service).
    pub fn original_dst(mut self, service: SocketAddr) -> Filter {
        self.original_dst = Some(service.ip());
        self.original_dport = Some(service.port());
        self
    }

    /// Only entries first sent to this address, any port.
    pub fn original_dst_ip(mut self, addr: IpAddr) -> Filter {
        self.original_dst = Some(addr);
        self
    }

    /// Only entries first sent to this port, any address (a NodePort).
    pub fn original_dport(mut self, port: u16) -> Filter {
        self.original_dport = Some(port);
        self
    }

    /// Only entries whose replies come from this address and port (an endpoint, after
    /// DNAT).
    pub fn reply_src(mut self, endpoint: SocketAddr) -> Filter {
        self.reply_src = Some(endpoint.ip());
        self.reply_sport = Some(endpoint.port());
        self
    }

    /// Only entries whose replies come from this address, any port (every entry DNATed to
    /// an endpoint's address).
    pub fn reply_src_ip(mut self, addr: IpAddr) -> Filter {
        self.reply_src = Some(addr);
        self
    }

    /// Whether the entry is selected.
    pub fn matches(&self, entry: &Entry) -> bool {
        fn ok<T: PartialEq>(want: Option<T>, have: T) -> bool {
            want.is_none_or(|want| want == have)
        }
        ok(self.family, entry.family)
            && ok(self.protocol, entry.protocol)
            && ok(self.original_dst, entry.original.dst)
            && ok(self.original_dport, entry.original.dport)
            && ok(self.reply_src, entry.reply.src)
            && ok(self.reply_sport, entry.reply.sport)
    }

    /// The one family the kernel needs to dump, if the filter implies one.
    fn dump_family(&self) -> Option<Family> {
        self.family
            .or(self.original_dst.map(Family::of))
            .or(self.reply_src.map(Family::of))
    }
}

impl fmt::Display for Filter {
    /// The `conntrack` options that select the same entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(family) = self.family {
            parts.push(format!("-f {family}"));
        }
        if let Some(protocol) = self.protocol {
            parts.push(format!("-p {protocol}"));
        }
        if let Some(addr) = self.original_dst {
            parts.push(format!("--orig-dst {addr}"));
        }
        if let Some(port) = self.original_dport {
            parts.push(format!("--orig-port-dst {port}"));
        }
        if let Some(addr) = self.reply_src {
            parts.push(format!("--reply-src {addr}"));
        }
        if let Some(port) = self.reply_sport {
            parts.push(format!("--reply-port-src {port}"));
        }
        if parts.is_empty() {
            f.write_str("all entries")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// A connection to the conntrack table of one network namespace.
///
/// Calls on one `Conntrack` are serialised; it may be shared between threads.
pub struct Conntrack {
    conn: Mutex<Conn>,
    timeout: Duration,
    /// Which namespace this speaks to, for error messages.
    scope: String,
}

struct Conn {
    socket: NfSocket,
    next_seq: u32,
    buf: Vec<u8>,
}

impl Conn {
    /// `count` consecutive sequence numbers, never 0 (what unsolicited messages carry).
    fn take_seqs(&mut self, count: u32) -> u32 {
        if self.next_seq == 0 || self.next_seq.checked_add(count).is_none() {
            self.next_seq = 1;
        }
        let first = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(count);
        first
    }
}

impl fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conntrack")
            .field("scope", &self.scope)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Conntrack {
    /// Connects in the calling thread's network namespace.
    pub fn connect() -> Result<Conntrack> {
        let socket = NfSocket::open()
            .map_err(|e| Error::io("opening a conntrack netlink socket in the current netns", e))?;
        Ok(Conntrack::with_socket(socket, "current netns".to_owned()))
    }

    /// Connects to the named network namespace: the socket is created inside it and stays
    /// bound to it, whichever thread uses it later.
    pub fn connect_in(netns_name: &str) -> Result<Conntrack> {
        let socket = netns::run_in(netns_name, NfSocket::open)?.map_err(|e| {
            Error::io(
                format!("opening a conntrack netlink socket in netns {netns_name}"),
                e,
            )
        })?;
        Ok(Conntrack::with_socket(
            socket,
            format!("netns {netns_name}"),
        ))
    }

    fn with_socket(socket: NfSocket, scope: String) -> Conntrack {
        Conntrack {
            conn: Mutex::new(Conn {
                socket,
                next_seq: 1,
                buf: vec![0; 64 * 1024],
            }),
            timeout: DEFAULT_TIMEOUT,
            scope,
        }
    }

    /// Changes how long each call may wait (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Conntrack {
        self.timeout = timeout;
        self
    }

    /// The entries the filter selects, IPv4 and IPv6, in the kernel's order.
    pub fn entries(&self, filter: &Filter) -> Result<Vec<Entry>> {
        let action = || format!("listing conntrack entries ({filter})");
        let family = filter
            .dump_family()
            .map_or(wire::NFPROTO_UNSPEC, Family::code);
        let mut entries = self.dump(family, &action)?;
        entries.retain(|entry| filter.matches(entry));
        Ok(entries)
    }

    /// Deletes one entry. `Ok(true)` if this call removed it, `Ok(false)` if it was gone
    /// already (expired, deleted by someone else, or replaced by a newer entry with the
    /// same tuple, which is left alone).
    pub fn delete(&self, entry: &Entry) -> Result<bool> {
        let mut results = self.delete_chunk(std::slice::from_ref(entry))?;
        results.pop().unwrap_or(Ok(false))
    }

    /// Deletes the entries, [`DELETE_CHUNK`] to a round trip, and returns how many this
    /// call removed (those already gone count as deleted but not as removed). One that
    /// the kernel refuses does not stop the others: they are all tried, then the refusals
    /// come back together as an [`Error::Partial`]. A timeout or socket error stops at the
    /// chunk where it happened.
    pub fn delete_entries(&self, entries: &[Entry]) -> Result<usize> {
        let mut removed = 0;
        let mut failures = Vec::new();
        for chunk in entries.chunks(DELETE_CHUNK) {
            for result in self.delete_chunk(chunk)? {
                match result {
                    Ok(true) => removed += 1,
                    Ok(false) => {}
                    Err(err) => failures.push(err.to_string()),
                }
            }
        }
        if failures.is_empty() {
            Ok(removed)
        } else {
            Err(Error::Partial {
                what: format!(
                    "{} conntrack entry deletes in {} ({removed} others removed)",
                    entries.len(),
                    self.scope
                ),
                failures,
            })
        }
    }

    /// Deletes every entry the filter selects and returns how many this call removed.
    ///
    /// The selection is a dump, then the deletes: an entry created in between is not
    /// deleted (the caller's next round will see it).
    pub fn delete_matching(&self, filter: &Filter) -> Result<usize> {
        let entries = self.entries(filter)?;
        let removed = self.delete_entries(&entries)?;
        if removed > 0 {
            tracing::debug!(
                "deleted {removed} conntrack entries ({filter}) in {}",
                self.scope
            );
        }
        Ok(removed)
    }

    // ----- plumbing -----

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        // A panic while holding the lock leaves nothing half-done that matters: answers to
        // stale sequence numbers are skipped.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the whole table (of one family, or all with `NFPROTO_UNSPEC`), started again
    /// if the kernel says it was interrupted; an entry listed twice is kept once.
    fn dump(&self, family: u8, action: &dyn Fn() -> String) -> Result<Vec<Entry>> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        for _attempt in 0..DUMP_ATTEMPTS {
            let seq = conn.take_seqs(1);
            let mut request = Vec::new();
            wire::put_dump_request(&mut request, seq, family);
            let Conn { socket, buf, .. } = &mut *conn;
            socket
                .send(&request)
                .map_err(|e| self.io_error(action, e))?;
            let mut entries = Vec::new();
            let mut seen = HashSet::new();
            let mut interrupted = false;
            'receive: loop {
                if !socket
                    .recv(buf, deadline)
                    .map_err(|e| self.io_error(action, e))?
                {
                    return Err(self.timed_out(action));
                }
                let messages = wire::messages(buf)
                    .ok_or_else(|| self.malformed(action, "malformed answer from the kernel"))?;
                for message in messages.iter().filter(|m| m.seq == seq) {
                    interrupted |= message.flags & wire::NLM_F_DUMP_INTR != 0;
                    match message.ty {
                        wire::NLMSG_DONE => {
                            let status = wire::done_status(message);
                            if status == -libc::EINTR {
                                interrupted = true;
                            } else if status < 0 {
                                return Err(Error::Kernel {
                                    action: action(),
                                    scope: self.scope.clone(),
                                    errno: status.saturating_neg(),
                                    message: None,
                                });
                            }
                            break 'receive;
                        }
                        wire::NLMSG_ERROR => {
                            let Some(ack) = wire::parse_ack(message) else {
                                return Err(self.malformed(action, "malformed error answer"));
                            };
                            if ack.errno == libc::EINTR {
                                interrupted = true;
                                break 'receive;
                            }
                            return Err(kernel_error(&ack, action(), self.scope.clone()));
                        }
                        wire::NLMSG_OVERRUN => {
                            return Err(
                                self.malformed(action, "the kernel lost part of the answer")
                            );
                        }
                        ty if ty == wire::ct_type(wire::IPCTNL_MSG_CT_NEW) => {
                            match wire::parse_entry(message.payload) {
                                Some(entry) => {
                                    let key = (entry.family, entry.zone, entry.id, entry.original);
                                    if seen.insert(key) {
                                        entries.push(entry);
                                    }
                                }
                                None => tracing::debug!(
                                    "skipping a conntrack entry without tuples in {}",
                                    self.scope
                                ),
                            }
                        }
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(entries);
            }
        }
        Err(self.malformed(
            action,
            &format!("the table kept changing while being read ({DUMP_ATTEMPTS} attempts)"),
        ))
    }

    /// Sends one delete per entry in a single datagram (the kernel handles them in turn
    /// and acknowledges each) and collects the answers: per entry `Ok(true)` removed,
    /// `Ok(false)` gone already, or the kernel's refusal. The outer error is a failure of
    /// the round trip itself.
    fn delete_chunk(&self, entries: &[Entry]) -> Result<Vec<Result<bool>>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let count = u32::try_from(entries.len())
            .ok()
            .filter(|count| *count < u32::MAX / 2)
            .ok_or_else(|| Error::invalid("delete chunk", "", "too many entries"))?;
        let doing = || match entries {
            [entry] => format!("deleting conntrack entry {entry}"),
            _ => format!("deleting {} conntrack entries", entries.len()),
        };
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        let first = conn.take_seqs(count);
        let mut request = Vec::with_capacity(128 * entries.len());
        for (entry, seq) in entries.iter().zip(first..) {
            wire::put_delete_request(&mut request, seq, entry);
        }
        let Conn { socket, buf, .. } = &mut *conn;
        socket
            .send(&request)
            .map_err(|e| self.io_error(&doing, e))?;

        let mut answers: Vec<Option<wire::Ack>> = vec![None; entries.len()];
        let mut pending = entries.len();
        while pending > 0 {
            if !socket
                .recv(buf, deadline)
                .map_err(|e| self.io_error(&doing, e))?
            {
                return Err(Error::Timeout {
                    action: format!(
                        "{} ({pending} unanswered; they may or may not have been deleted)",
                        doing()
                    ),
                    scope: self.scope.clone(),
                    after: self.timeout,
                });
            }
            let messages = wire::messages(buf)
                .ok_or_else(|| self.malformed(&doing, "malformed answer from the kernel"))?;
            for message in messages.iter().filter(|m| m.ty == wire::NLMSG_ERROR) {
                let Some(ack) = wire::parse_ack(message) else {
                    continue;
                };
                let Some(index) = ack.seq.checked_sub(first).map(|i| i as usize) else {
                    continue;
                };
                if let Some(slot) = answers.get_mut(index) {
                    if slot.is_none() {
                        pending -= 1;
                    }
                    *slot = Some(ack);
                }
            }
        }
        // Every slot is filled: the loop above ends only when none is pending.
        Ok(entries
            .iter()
            .zip(answers.into_iter().flatten())
            .map(|(entry, ack)| match ack.errno {
                0 => Ok(true),
                libc::ENOENT => Ok(false),
                _ => Err(kernel_error(
                    &ack,
                    format!("deleting conntrack entry {entry}"),
                    self.scope.clone(),
                )),
            })
            .collect())
    }

    fn io_error(&self, action: &dyn Fn() -> String, error: io::Error) -> Error {
        Error::io(format!("{} in {}", action(), self.scope), error)
    }

    fn timed_out(&self, action: &dyn Fn() -> String) -> Error {
        Error::Timeout {
            action: action(),
            scope: self.scope.clone(),
            after: self.timeout,
        }
    }

    fn malformed(&self, action: &dyn Fn() -> String, what: &str) -> Error {
        Error::Protocol {
            action: action(),
            scope: self.scope.clone(),
            what: what.to_owned(),
        }
    }
}

/// The kernel's refusal, with its errno and extended-ack message (if any).
fn kernel_error(ack: &wire::Ack, action: String, scope: String) -> Error {
    Error::Kernel {
        action,
        scope,
        errno: ack.errno,
        message: ack.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(original: (&str, u16, &str, u16), reply_src: (&str, u16)) -> Entry {
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        Entry {
            family: Family::of(ip(original.0)),
            protocol: Protocol::UDP,
            original: Tuple {
                src: ip(original.0),
                dst: ip(original.2),
                sport: original.1,
                dport: original.3,
            },
            reply: Tuple {
                src: ip(reply_src.0),
                dst: ip(original.0),
                sport: reply_src.1,
                dport: original.1,
            },
            status: Status::CONFIRMED | Status::DST_NAT,
            tcp_state: None,
            timeout: Duration::from_secs(30),
            mark: 0,
            zone: 0,
            id: 7,
        }
    }

    #[test]
    fn filters_select_by_every_field_they_set() {
        let to_service = entry(("10.0.0.2", 40000, "10.96.0.10", 53), ("10.1.0.7", 5353));
        let to_other = entry(("10.0.0.2", 40001, "10.96.0.11", 53), ("10.1.0.8", 53));
        let node_port = entry(("192.0.2.9", 40002, "10.0.0.1", 30053), ("10.1.0.7", 5353));
        let v6 = entry(("fd00::2", 40003, "fd00::a", 53), ("fd01::7", 5353));
        let all = [&to_service, &to_other, &node_port, &v6];
        let selected = |filter: &Filter| -> Vec<u32> {
            all.iter()
                .filter(|e| filter.matches(e))
                .map(|e| u32::from(e.original.sport - 40000))
                .collect()
        };

        assert_eq!(selected(&Filter::any()), vec![0, 1, 2, 3]);
        assert_eq!(selected(&Filter::protocol(Protocol::UDP)), vec![0, 1, 2, 3]);
        assert!(selected(&Filter::protocol(Protocol::TCP)).is_empty());
        let service: SocketAddr = "10.96.0.10:53".parse().unwrap();
        assert_eq!(selected(&Filter::any().original_dst(service)), vec![0]);
        assert_eq!(selected(&Filter::any().original_dport(53)), vec![0, 1, 3]);
        assert_eq!(selected(&Filter::any().original_dport(30053)), vec![2]);
        let endpoint: IpAddr = "10.1.0.7".parse().unwrap();
        assert_eq!(selected(&Filter::any().reply_src_ip(endpoint)), vec![0, 2]);
        let endpoint_port: SocketAddr = "10.1.0.7:5353".parse().unwrap();
        assert_eq!(
            selected(&Filter::any().reply_src(endpoint_port).original_dport(53)),
            vec![0]
        );
        assert_eq!(selected(&Filter::any().family(Family::V6)), vec![3]);
        assert_eq!(
            selected(&Filter::any().original_dst_ip("10.96.0.11".parse().unwrap())),
            vec![1]
        );
        // Contradictions select nothing.
        assert!(selected(&Filter::any().family(Family::V6).original_dst(service)).is_empty());
    }

    #[test]
    fn the_kernel_is_asked_for_the_one_family_a_filter_implies() {
        assert_eq!(Filter::any().dump_family(), None);
        assert_eq!(Filter::protocol(Protocol::UDP).dump_family(), None);
        let v6: SocketAddr = "[fd00::a]:53".parse().unwrap();
        assert_eq!(
            Filter::any().original_dst(v6).dump_family(),
            Some(Family::V6)
        );
        let v4: IpAddr = "10.1.0.7".parse().unwrap();
        assert_eq!(
            Filter::any().reply_src_ip(v4).dump_family(),
            Some(Family::V4)
        );
        assert_eq!(
            Filter::any()
                .family(Family::V6)
                .reply_src_ip(v4)
                .dump_family(),
            Some(Family::V6),
            "an explicit family wins (and the filter then selects nothing)"
        );
    }

    #[test]
    fn filters_and_entries_read_like_conntrack_options_and_listings() {
        let filter = Filter::protocol(Protocol::UDP)
            .original_dst("10.96.0.10:53".parse().unwrap())
            .reply_src_ip("10.1.0.7".parse().unwrap());
        assert_eq!(
            filter.to_string(),
            "-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.1.0.7"
        );
        assert_eq!(Filter::any().to_string(), "all entries");
        let entry = entry(("10.0.0.2", 40000, "10.96.0.10", 53), ("10.1.0.7", 5353));
        assert_eq!(
            entry.to_string(),
            "udp 10.0.0.2:40000 -> 10.96.0.10:53 (reply 10.1.0.7:5353 -> 10.0.0.2:40000, id 7)"
        );
        assert_eq!(Protocol(99).to_string(), "proto 99");
        assert_eq!(TcpState::TIME_WAIT.to_string(), "TIME_WAIT");
        assert!(Status(0x1ae).contains(Status::ASSURED | Status::SEEN_REPLY));
    }
}
