//! nftables over netlink, without the `nft` binary: a small typed encoder of
//! nf_tables messages (NETLINK_NETFILTER, subsystem NFNL_SUBSYS_NFTABLES).
//!
//! - [`Nft`]: a connection bound to one network namespace. Every call is
//!   bounded by a timeout ([`DEFAULT_TIMEOUT`]) and every kernel error comes
//!   back naming what was being done, where (`adding rule to inet t/forward
//!   in netns X: Operation not supported (os error 95)`), as an
//!   [`Error::Kernel`] carrying the kernel's errno.
//! - [`Batch`] of [`Op`]s: tables, chains, rules, sets and maps, and set
//!   elements to add or remove, applied as one transaction: all of it or
//!   none of it ([`Nft::apply`]); or a long list of them as consecutive
//!   bounded transactions ([`Nft::apply_in_batches`]). `delete_*` ops fail
//!   on a missing object, `destroy_*` ops (Linux 6.3+) treat it as done.
//! - [`SetSpec`], [`SetElem`], [`Datum`]/[`concat`]: typed set and map
//!   types (concatenations included, as `nft list` shows them), elements
//!   with values, verdicts and timeouts, and the key bytes they compare;
//!   interval sets and maps of concatenations, whose elements are ranges
//!   ([`SetFlags::INTERVAL`], [`SetElem::range`], [`concat_interval`]).
//! - [`Expr`] and [`dsl`]: rule expressions, typed, and fragments that read
//!   like nft syntax, byte for byte what `nft --debug=netlink` shows for the
//!   same rule (lookups in sets, maps and verdict maps, anonymous sets,
//!   dynamic sets, `numgen`, `fib`, `reject`, NAT, `ct`, ...).
//! - Reads back what the kernel holds: [`Nft::tables`], [`Nft::chains`],
//!   [`Nft::sets`], [`Nft::elements`], [`Nft::rules`] and
//!   [`Nft::dump_rules`] (with each rule's expressions as the kernel's raw
//!   bytes, to fingerprint them).
//!
//! The calls block (for microseconds, normally; at most the timeout). From
//! async code, either accept that or wrap them in `spawn_blocking`.
//!
//! Why by hand: the Rust crates are `rustables` (GPL-3, which this project
//! cannot take in, self-described as having rough edges, and without
//! concatenated keys, element timeouts or the dumps a reconciler needs) and
//! `nftnl` (bindings to the C libnftnl, a build dependency a fresh machine
//! lacks). The wire format is small and stable; every encoding here is
//! checked against nft's own by the `nftables_*` tests.
//!
//! Not here yet: interval sets of a single field (ranges and prefixes of
//! one field: the kernel's rbtree, with another element encoding), stateful
//! objects (named counters, quotas, limits), flowtables, netdev base chains
//! (they need a device), rule insertion at a position or replacement by
//! handle, per-element expressions (counters in elements), and decoding
//! rule expressions back into [`Expr`] (dumps return their raw bytes).

mod batch;
pub mod dsl;
mod expr;
mod set;
mod verdict;
pub(crate) mod wire;

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use batch::{Batch, Op};
pub use expr::{
    ByteorderOp, CmpOp, CtKey, CtState, CtStatus, DynsetOp, Expr, FibFlags, FibResult, IcmpxCode,
    LookupResult, MetaKey, NatFamily, NatFlags, NatKind, NumgenKind, PayloadBase, Reg, RejectKind,
    RouteType, SetRef, Verdict,
};
pub use set::{
    AnonSet, DataType, Datum, ElemKey, ElemValue, ElementInfo, MAX_CONCAT_FIELDS, MapData, SetElem,
    SetFlags, SetInfo, SetSpec, concat, concat_interval, concat_len,
};

use crate::error::{Error, Result};
use crate::netns;
use crate::nfsocket::{self, NfSocket};
use batch::{check_name, comment_of_userdata};
use wire::{Ack, Attrs, MsgHeader};

/// How long one call may wait for the kernel before it is given up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a dump the kernel reports as interrupted (the ruleset changed
/// while it was being read) is started again.
const DUMP_ATTEMPTS: usize = 5;

/// An nftables address family (`NFPROTO_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 and IPv6.
    Inet,
    Ip,
    Ip6,
    Arp,
    Bridge,
    /// Per-device ingress/egress; its base chains need a device, which
    /// [`BaseChain`] cannot name yet.
    Netdev,
}

impl Family {
    fn code(self) -> u8 {
        match self {
            Family::Inet => 1,
            Family::Ip => 2,
            Family::Arp => 3,
            Family::Netdev => 5,
            Family::Bridge => 7,
            Family::Ip6 => 10,
        }
    }

    fn from_code(code: u8) -> Option<Family> {
        Some(match code {
            1 => Family::Inet,
            2 => Family::Ip,
            3 => Family::Arp,
            5 => Family::Netdev,
            7 => Family::Bridge,
            10 => Family::Ip6,
            _ => return None,
        })
    }

    /// The name nft uses.
    pub fn name(self) -> &'static str {
        match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Arp => "arp",
            Family::Bridge => "bridge",
            Family::Netdev => "netdev",
        }
    }

    /// The hook of a hook number in this family (the inverse of
    /// [`Family::hook_number`]).
    fn hook_of(self, number: u32) -> Option<Hook> {
        [
            Hook::Prerouting,
            Hook::Input,
            Hook::Forward,
            Hook::Output,
            Hook::Postrouting,
        ]
        .into_iter()
        .find(|hook| self.hook_number(*hook) == Some(number))
    }

    /// The kernel's hook number for `hook` in this family.
    fn hook_number(self, hook: Hook) -> Option<u32> {
        match self {
            // NF_INET_* (the bridge family's NF_BR_* are numbered alike).
            Family::Inet | Family::Ip | Family::Ip6 | Family::Bridge => Some(match hook {
                Hook::Prerouting => 0,
                Hook::Input => 1,
                Hook::Forward => 2,
                Hook::Output => 3,
                Hook::Postrouting => 4,
            }),
            // NF_ARP_*.
            Family::Arp => match hook {
                Hook::Input => Some(0),
                Hook::Output => Some(1),
                Hook::Forward => Some(2),
                Hook::Prerouting | Hook::Postrouting => None,
            },
            Family::Netdev => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where in the packet path a base chain is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// The type of a base chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChainKind {
    Filter,
    /// Sees only the first packet of each connection (needs conntrack).
    Nat,
    /// Re-routes output packets whose marks or addresses changed.
    Route,
}

impl ChainKind {
    pub fn name(self) -> &'static str {
        match self {
            ChainKind::Filter => "filter",
            ChainKind::Nat => "nat",
            ChainKind::Route => "route",
        }
    }
}

/// What happens to a packet that reaches the end of a base chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    Accept,
    Drop,
}

/// The hook part of a base chain: `{ type KIND hook HOOK priority PRIORITY;
/// policy POLICY; }`. Standard priorities: filter 0, dstnat -100, srcnat 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub hook: Hook,
    pub priority: i32,
    pub kind: ChainKind,
    pub policy: Policy,
}

/// A rule as listed by [`Nft::rules`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// The kernel's handle, for [`Batch::delete_rule`].
    pub handle: u64,
    pub comment: Option<String>,
}

/// A rule as listed by [`Nft::dump_rules`]: with its chain and its
/// expressions as the kernel returns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleDump {
    pub chain: String,
    /// The kernel's handle, for [`Batch::delete_rule`].
    pub handle: u64,
    /// The comment nft (or [`Batch::add_rule`]) stored in its userdata.
    pub comment: Option<String>,
    /// The payload of NFTA_RULE_EXPRESSIONS as the kernel dumps it: the
    /// same for the same rule, whoever added it, so it fingerprints the
    /// rule. (It is the kernel's encoding, not the request's: counters carry
    /// their current values and anonymous sets their kernel-given names, so
    /// leave those out of what is fingerprinted, or compare like with like.)
    pub exprs: Vec<u8>,
}

impl RuleDump {
    /// What the rule's first `counter` has counted: (packets, bytes). `None` when the rule
    /// has no counter.
    pub fn counted(&self) -> Option<(u64, u64)> {
        wire::attrs(&self.exprs)
            .filter(|(ty, _)| *ty == wire::NFTA_LIST_ELEM)
            .find(|(_, elem)| {
                wire::find_attr(elem, wire::NFTA_EXPR_NAME).map(wire::c_string)
                    == Some("counter".to_owned())
            })
            .and_then(|(_, elem)| {
                let data = wire::find_attr(elem, wire::NFTA_EXPR_DATA)?;
                let packets = wire::find_attr(data, wire::NFTA_COUNTER_PACKETS)?;
                let bytes = wire::find_attr(data, wire::NFTA_COUNTER_BYTES)?;
                Some((wire::be64(packets)?, wire::be64(bytes)?))
            })
    }
}

/// A chain as listed by [`Nft::chains`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    pub handle: u64,
    /// The hook of a base chain; `None` for a regular chain (and for base
    /// chains of hooks [`BaseChain`] cannot express, e.g. netdev ingress,
    /// which have `hooked` set).
    pub base: Option<BaseChain>,
    /// Whether the kernel reports a hook (a base chain).
    pub hooked: bool,
}

/// A refused batch: the error, and which op (index in the batch) and which
/// element of that op (index in its element list) the kernel refused
/// first, where known.
#[derive(Debug)]
pub struct BatchError {
    pub error: Error,
    pub op: Option<usize>,
    pub element: Option<usize>,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for BatchError {}

impl From<BatchError> for Error {
    fn from(refused: BatchError) -> Error {
        refused.error
    }
}

/// Adds a note to where an error happened ("in netns X (transaction 2 of
/// 5 ...)").
fn append_to_scope(mut error: Error, note: &str) -> Error {
    match &mut error {
        Error::Kernel { scope, .. }
        | Error::Timeout { scope, .. }
        | Error::Protocol { scope, .. }
        | Error::NotFound { scope, .. }
        | Error::AlreadyExists { scope, .. } => scope.push_str(note),
        Error::Invalid { action, .. } | Error::Io { action, .. } => action.push_str(note),
        _ => {}
    }
    error
}

/// A connection to nf_tables in one network namespace.
///
/// Calls on one `Nft` are serialised; it may be shared between threads.
pub struct Nft {
    conn: Mutex<Conn>,
    timeout: Duration,
    /// Which namespace this speaks to, for error messages.
    scope: String,
}

struct Conn {
    socket: NfSocket,
    next_seq: u32,
    /// Answers are received here.
    buf: Vec<u8>,
    /// Requests other than batches are built here.
    request: Vec<u8>,
}

impl Conn {
    /// `count` consecutive sequence numbers, never 0.
    fn take_seqs(&mut self, count: u32) -> u32 {
        if self.next_seq == 0 || self.next_seq.checked_add(count).is_none() {
            self.next_seq = 1;
        }
        let first = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(count);
        first
    }
}

impl fmt::Debug for Nft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nft")
            .field("scope", &self.scope)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Nft {
    /// Connects in the calling thread's network namespace.
    pub fn connect() -> Result<Nft> {
        let socket = NfSocket::open().map_err(|e| {
            Error::io(
                "opening an nf_tables netlink socket in the current netns",
                e,
            )
        })?;
        Ok(Nft::with_socket(socket, "current netns".to_owned()))
    }

    /// Connects to the named network namespace: the socket is created inside
    /// it and stays bound to it, whichever thread uses it later.
    pub fn connect_in(netns_name: &str) -> Result<Nft> {
        let socket = netns::run_in(netns_name, NfSocket::open)?.map_err(|e| {
            Error::io(
                format!("opening an nf_tables netlink socket in netns {netns_name}"),
                e,
            )
        })?;
        Ok(Nft::with_socket(socket, format!("netns {netns_name}")))
    }

    fn with_socket(socket: NfSocket, scope: String) -> Nft {
        Nft {
            conn: Mutex::new(Conn {
                socket,
                // Not 0, which is what unsolicited messages carry. Answers
                // are per socket, so handles need not coordinate.
                next_seq: 1,
                buf: vec![0; nfsocket::RECV_BUFFER],
                request: Vec::with_capacity(1024),
            }),
            timeout: DEFAULT_TIMEOUT,
            scope,
        }
    }

    /// Changes how long each call may take (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Nft {
        self.timeout = timeout;
        self
    }

    /// Applies the batch as one transaction. On error nothing of it is
    /// applied, and the error names the first op the kernel refused (for
    /// element ops, the element too), and how many others it refused as
    /// well, often as a consequence.
    pub fn apply(&self, batch: &Batch) -> Result<()> {
        self.apply_detailed(batch).map_err(|refused| refused.error)
    }

    /// [`Nft::apply`], telling also which op (index in the batch) and which
    /// element of it the kernel refused, so a caller can set it aside and
    /// apply the rest.
    pub fn apply_detailed(&self, batch: &Batch) -> std::result::Result<(), BatchError> {
        let encoded = batch::encode(batch.ops()).map_err(|(op, error)| BatchError {
            error: error.while_doing(|| format!("{} in {}", batch.ops()[op], self.scope)),
            op: Some(op),
            element: None,
        })?;
        self.send_batch(batch.ops(), encoded)
    }

    /// Applies a long list of changes as consecutive transactions of at most
    /// `max_weight` each ([`Batch::chunks`]; an element counts as one op),
    /// so that no single transaction holds the kernel's nf_tables lock for
    /// long. Every part is checked before the first is sent. If a part
    /// fails, the ones before it stay applied, the rest is not sent, and the
    /// error says which part it was. Returns the number of transactions.
    pub fn apply_in_batches(&self, batch: &Batch, max_weight: usize) -> Result<usize> {
        let chunks = batch::plan_chunks(batch.ops(), max_weight);
        let mut encoded = Vec::with_capacity(chunks.len());
        for chunk in &chunks {
            let part = batch::encode(chunk).map_err(|(op, error)| {
                error.while_doing(|| format!("{} in {}", chunk[op], self.scope))
            })?;
            encoded.push(part);
        }
        let total = chunks.len();
        for (i, (chunk, part)) in chunks.iter().zip(encoded).enumerate() {
            self.send_batch(chunk, part).map_err(|refused| {
                let note = format!(
                    " (transaction {} of {total}; the {i} before it were applied, \
                     nothing after it was sent)",
                    i + 1
                );
                append_to_scope(refused.error, &note)
            })?;
        }
        Ok(total)
    }

    /// Sends an encoded batch and reads the kernel's verdict on it.
    fn send_batch<O: std::borrow::Borrow<Op>>(
        &self,
        ops: &[O],
        mut encoded: batch::Encoded,
    ) -> std::result::Result<(), BatchError> {
        let plain = |error| BatchError {
            error,
            op: None,
            element: None,
        };
        let messages = encoded.message_count();
        if messages == 0 {
            return Ok(());
        }
        let count = u32::try_from(messages)
            .ok()
            .filter(|count| *count < u32::MAX / 2)
            .ok_or_else(|| {
                plain(Error::invalid(
                    "batch",
                    "",
                    format!("{messages} messages are too many"),
                ))
            })?;
        let deadline = Instant::now() + self.timeout;
        let doing = || format!("applying a batch of {} nftables ops", ops.len());
        let io_error = |e| plain(Error::io(format!("{} in {}", doing(), self.scope), e));

        let mut conn = self.lock();
        let begin = conn.take_seqs(count + 2);
        encoded.rebase(begin);
        let first = begin + 1;
        let last = begin + count;
        conn.socket.make_room(encoded.buf.len(), messages);
        conn.socket.send(&encoded.buf).map_err(io_error)?;

        // The kernel processes the batch within the send, then answers
        // each refused message, and the last message (which alone asks
        // for an acknowledgement) last of all. An error on the batch-begin
        // seq means the batch as a whole failed (e.g. its commit); after
        // it the last answer may not come.
        let mut failures: Vec<Ack> = Vec::new();
        let mut batch_error: Option<Ack> = None;
        let mut lost_answers = false;
        let Conn { socket, buf, .. } = &mut *conn;
        'receive: loop {
            let wait_until = if batch_error.is_some() || lost_answers {
                // Collect what is already queued, then stop.
                Instant::now()
            } else {
                deadline
            };
            match socket.recv(buf, wait_until) {
                Ok(true) => {}
                Ok(false) if batch_error.is_some() || lost_answers => break,
                Ok(false) => {
                    return Err(plain(Error::Timeout {
                        action: format!(
                            "{} (no final answer; the batch may or may not have been applied)",
                            doing()
                        ),
                        scope: self.scope.clone(),
                        after: self.timeout,
                    }));
                }
                // More refusals than the receive buffer holds: some were
                // dropped, but any refusal means nothing was applied.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    lost_answers = true;
                    continue;
                }
                Err(e) => return Err(io_error(e)),
            }
            let answers = wire::messages(buf).ok_or_else(|| {
                plain(Error::Protocol {
                    action: doing(),
                    scope: self.scope.clone(),
                    what: "malformed answer from the kernel".into(),
                })
            })?;
            for message in answers {
                if message.ty != wire::NLMSG_ERROR {
                    continue;
                }
                let Some(ack) = wire::parse_ack(&message) else {
                    continue;
                };
                if ack.seq == begin && ack.errno != 0 {
                    batch_error = Some(ack);
                } else if (first..=last).contains(&ack.seq) {
                    let done = ack.seq == last;
                    if ack.errno != 0 {
                        failures.push(ack);
                    }
                    if done {
                        break 'receive;
                    }
                }
            }
        }

        if let Some(ack) = failures.first() {
            let origin = &encoded.origins[(ack.seq - first) as usize];
            let element = ack.offset.and_then(|offset| origin.element_at(offset));
            let op: &Op = ops[origin.op].borrow();
            // The scope carries the note, so the message reads "OP in netns X (and ...): ".
            let mut scope = self.scope.clone();
            if failures.len() > 1 || lost_answers {
                let others = failures.len() - 1;
                let more = if lost_answers { " or more" } else { "" };
                scope.push_str(&format!(
                    " (and {others}{more} later messages of the batch failed too; nothing \
                     was applied)"
                ));
            }
            return Err(BatchError {
                error: kernel_error(ack, op.describe(element), scope),
                op: Some(origin.op),
                element,
            });
        }
        if let Some(ack) = batch_error {
            return Err(plain(kernel_error(
                &ack,
                format!("committing a batch of {} nftables ops", ops.len()),
                self.scope.clone(),
            )));
        }
        if lost_answers {
            return Err(plain(Error::Protocol {
                action: doing(),
                scope: self.scope.clone(),
                what: "the kernel refused more of the batch than could be read back; nothing \
                       was applied"
                    .into(),
            }));
        }
        Ok(())
    }

    /// Whether the table exists.
    pub fn table_exists(&self, family: Family, name: &str) -> Result<bool> {
        let action = || format!("looking up table {family} {name}");
        check_name("table name", name)
            .map_err(|e| e.while_doing(|| format!("{} in {}", action(), self.scope)))?;
        let found = self.get(wire::NFT_MSG_GETTABLE, family.code(), action, |a| {
            a.str(wire::NFTA_TABLE_NAME, name);
        })?;
        Ok(found)
    }

    /// All tables, of every family.
    pub fn tables(&self) -> Result<Vec<(Family, String)>> {
        let action = || "listing tables".to_owned();
        let mut tables = self.dump(
            wire::NFT_MSG_GETTABLE,
            0,
            action,
            |_| {},
            |family, attrs, out| {
                if let (Some(family), Some(name)) = (
                    Family::from_code(family),
                    wire::find_attr(attrs, wire::NFTA_TABLE_NAME),
                ) {
                    out.push((family, wire::c_string(name)));
                }
            },
        )?;
        tables.sort();
        Ok(tables)
    }

    /// The ruleset's generation: every committed transaction in this namespace, by anyone,
    /// moves it on. A reader that saw the ruleset right at generation G knows it is still
    /// right while the generation is G.
    pub fn generation(&self) -> Result<u32> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        self.generation_locked(&mut conn, deadline, &|| {
            "reading the ruleset generation".to_owned()
        })
    }

    /// The rules of a chain, in order. Fails if the chain does not exist.
    pub fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>> {
        Ok(self
            .dump_rules(family, table, Some(chain))?
            .into_iter()
            .map(|rule| RuleInfo {
                handle: rule.handle,
                comment: rule.comment,
            })
            .collect())
    }

    /// The chains of a table, in the kernel's order, with their hooks.
    /// Fails ([`Error::NotFound`]) if the table does not exist.
    pub fn chains(&self, family: Family, table: &str) -> Result<Vec<ChainInfo>> {
        let action = || format!("listing chains of {family} {table}");
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        self.require_table(&mut conn, deadline, family, table, &action)?;
        self.chains_locked(&mut conn, deadline, family, table, &action)
    }

    fn chains_locked(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        family: Family,
        table: &str,
        action: &dyn Fn() -> String,
    ) -> Result<Vec<ChainInfo>> {
        let fill = |a: &mut Attrs<'_>| a.str(wire::NFTA_CHAIN_TABLE, table);
        self.dump_locked(
            conn,
            deadline,
            wire::NFT_MSG_GETCHAIN,
            family.code(),
            action,
            fill,
            |_, attrs, out| {
                if let Some(chain) = parse_chain(family, table, attrs) {
                    out.push(chain);
                }
            },
        )
    }

    /// The sets and maps of a table, anonymous ones included, with their
    /// types and flags. Fails ([`Error::NotFound`]) if the table does not
    /// exist.
    pub fn sets(&self, family: Family, table: &str) -> Result<Vec<SetInfo>> {
        let action = || format!("listing sets of {family} {table}");
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        self.require_table(&mut conn, deadline, family, table, &action)?;
        self.dump_locked(
            &mut conn,
            deadline,
            wire::NFT_MSG_GETSET,
            family.code(),
            &action,
            |a| a.str(wire::NFTA_SET_TABLE, table),
            |_, attrs, out| {
                let in_table = wire::find_attr(attrs, wire::NFTA_SET_TABLE)
                    .map(wire::c_string)
                    .is_some_and(|t| t == table);
                if let Some(info) = SetInfo::parse(attrs).filter(|_| in_table) {
                    out.push(info);
                }
            },
        )
    }

    /// The elements of a set or map: keys, values or verdicts, timeouts and
    /// time left. Fails ([`Error::NotFound`]) if the set (or its table)
    /// does not exist.
    pub fn elements(&self, family: Family, table: &str, set: &str) -> Result<Vec<ElementInfo>> {
        let action = || format!("listing elements of set {family} {table}/{set}");
        check_name("table name", table)
            .and_then(|()| check_name("set name", set))
            .map_err(|e| e.while_doing(|| format!("{} in {}", action(), self.scope)))?;
        self.dump(
            wire::NFT_MSG_GETSETELEM,
            family.code(),
            action,
            |a| {
                a.str(wire::NFTA_SET_ELEM_LIST_TABLE, table);
                a.str(wire::NFTA_SET_ELEM_LIST_SET, set);
            },
            |_, attrs, out| ElementInfo::parse_list(attrs, out),
        )
        .map_err(|err| {
            // The kernel refuses the dump of a missing set outright.
            if err.has_errno(libc::ENOENT) {
                Error::NotFound {
                    action: action(),
                    what: format!("set {family} {table}/{set}"),
                    scope: self.scope.clone(),
                }
            } else {
                err
            }
        })
    }

    /// The rules of one chain, or of every chain of the table (chain by
    /// chain, in the kernel's order), with handle, comment and the kernel's
    /// bytes of their expressions. Fails ([`Error::NotFound`]) if the table
    /// (or the chain) does not exist.
    ///
    /// A whole table is read one chain at a time: the kernel's dump of a
    /// whole table restarts from its first rule for every 32 KiB part, which
    /// is quadratic (seconds at 100,000 rules), while a chain's dump goes
    /// straight to the chain. The ruleset generation is read before and
    /// after, and the listing repeated if anything was committed meanwhile,
    /// so it is one consistent state.
    pub fn dump_rules(
        &self,
        family: Family,
        table: &str,
        chain: Option<&str>,
    ) -> Result<Vec<RuleDump>> {
        let action = || match chain {
            Some(chain) => format!("listing rules of {family} {table}/{chain}"),
            None => format!("listing rules of {family} {table}"),
        };
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        if let Some(chain) = chain {
            self.require_chain(&mut conn, deadline, family, table, chain, &action)?;
            return self.chain_rules(&mut conn, deadline, family, table, chain, &action);
        }
        self.require_table(&mut conn, deadline, family, table, &action)?;
        Ok(self
            .chains_and_rules_locked(&mut conn, deadline, family, table, &action)?
            .1)
    }

    /// A table's chains and all their rules, read in one consistent pass (the ruleset
    /// generation is the same before and after): what an audit of a whole table needs,
    /// with the chains listed once. Fails ([`Error::NotFound`]) if the table does not
    /// exist.
    pub fn chains_and_rules(
        &self,
        family: Family,
        table: &str,
    ) -> Result<(Vec<ChainInfo>, Vec<RuleDump>)> {
        let action = || format!("listing chains and rules of {family} {table}");
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        self.require_table(&mut conn, deadline, family, table, &action)?;
        self.chains_and_rules_locked(&mut conn, deadline, family, table, &action)
    }

    fn chains_and_rules_locked(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        family: Family,
        table: &str,
        action: &dyn Fn() -> String,
    ) -> Result<(Vec<ChainInfo>, Vec<RuleDump>)> {
        for _attempt in 0..DUMP_ATTEMPTS {
            let before = self.generation_locked(conn, deadline, action)?;
            let chains = self.chains_locked(conn, deadline, family, table, action)?;
            let mut rules = Vec::new();
            let mut vanished = false;
            for chain in &chains {
                match self.chain_rules(conn, deadline, family, table, &chain.name, action) {
                    Ok(more) => rules.extend(more),
                    // Deleted since the chains were listed: read again.
                    Err(err) if err.has_errno(libc::ENOENT) => {
                        vanished = true;
                        break;
                    }
                    Err(err) => return Err(err),
                }
            }
            if !vanished && self.generation_locked(conn, deadline, action)? == before {
                return Ok((chains, rules));
            }
        }
        Err(self.malformed(
            action,
            &format!("the ruleset kept changing while being read ({DUMP_ATTEMPTS} attempts)"),
        ))
    }

    /// One chain's rules, without checking that it exists (a missing
    /// chain's dump is empty).
    fn chain_rules(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        family: Family,
        table: &str,
        chain: &str,
        action: &dyn Fn() -> String,
    ) -> Result<Vec<RuleDump>> {
        let fill = |a: &mut Attrs<'_>| {
            a.str(wire::NFTA_RULE_TABLE, table);
            a.str(wire::NFTA_RULE_CHAIN, chain);
        };
        self.dump_locked(
            conn,
            deadline,
            wire::NFT_MSG_GETRULE,
            family.code(),
            action,
            fill,
            |_, attrs, out| {
                if let Some(rule) = parse_rule(table, chain, attrs) {
                    out.push(rule);
                }
            },
        )
    }

    /// [`Error::NotFound`] unless the table exists: dumps of what a missing
    /// table holds are just empty, and a typo must not pass for "nothing".
    fn require_table(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        family: Family,
        table: &str,
        action: &dyn Fn() -> String,
    ) -> Result<()> {
        check_name("table name", table)
            .map_err(|e| e.while_doing(|| format!("{} in {}", action(), self.scope)))?;
        let found = self.get_locked(
            conn,
            deadline,
            wire::NFT_MSG_GETTABLE,
            family.code(),
            action,
            |a| {
                a.str(wire::NFTA_TABLE_NAME, table);
            },
        )?;
        if found.is_none() {
            return Err(Error::NotFound {
                action: action(),
                what: format!("table {family} {table}"),
                scope: self.scope.clone(),
            });
        }
        Ok(())
    }

    /// [`Error::NotFound`] unless the chain exists (see
    /// [`Nft::require_table`]).
    fn require_chain(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        family: Family,
        table: &str,
        chain: &str,
        action: &dyn Fn() -> String,
    ) -> Result<()> {
        check_name("table name", table)
            .and_then(|()| check_name("chain name", chain))
            .map_err(|e| e.while_doing(|| format!("{} in {}", action(), self.scope)))?;
        let found = self.get_locked(
            conn,
            deadline,
            wire::NFT_MSG_GETCHAIN,
            family.code(),
            action,
            |a| {
                a.str(wire::NFTA_CHAIN_TABLE, table);
                a.str(wire::NFTA_CHAIN_NAME, chain);
            },
        )?;
        if found.is_none() {
            return Err(Error::NotFound {
                action: action(),
                what: format!("chain {family} {table}/{chain}"),
                scope: self.scope.clone(),
            });
        }
        Ok(())
    }

    // ----- plumbing -----

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        // A panic while holding the lock leaves nothing half-done that
        // matters: answers to stale sequence numbers are skipped anyway.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A single-object GET (with NLM_F_ACK): `Ok(false)` if the kernel says
    /// ENOENT.
    fn get(
        &self,
        msg: u16,
        family: u8,
        action: impl Fn() -> String,
        fill: impl FnOnce(&mut Attrs<'_>),
    ) -> Result<bool> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        Ok(self
            .get_locked(&mut conn, deadline, msg, family, &action, fill)?
            .is_some())
    }

    /// [`Nft::get`] on a locked connection: the payload of the answer,
    /// `None` for ENOENT.
    fn get_locked(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        msg: u16,
        family: u8,
        action: &dyn Fn() -> String,
        fill: impl FnOnce(&mut Attrs<'_>),
    ) -> Result<Option<Vec<u8>>> {
        let seq = conn.take_seqs(1);
        let header = MsgHeader {
            ty: wire::nft_type(msg),
            flags: wire::NLM_F_REQUEST | wire::NLM_F_ACK,
            seq,
            family,
            res_id: 0,
        };
        let Conn {
            socket,
            buf,
            request,
            ..
        } = conn;
        request.clear();
        wire::put_message(request, header, fill);
        socket.send(request).map_err(|e| self.io_error(action, e))?;
        let mut found = Vec::new();
        loop {
            if !socket
                .recv(buf, deadline)
                .map_err(|e| self.io_error(action, e))?
            {
                return Err(self.timed_out(action));
            }
            let messages = wire::messages(buf)
                .ok_or_else(|| self.malformed(action, "malformed answer from the kernel"))?;
            for message in messages.iter().filter(|m| m.seq == seq) {
                if message.ty != wire::NLMSG_ERROR {
                    found = message.payload.to_vec();
                    continue;
                }
                let Some(ack) = wire::parse_ack(message) else {
                    return Err(self.malformed(action, "malformed acknowledgement"));
                };
                return match ack.errno {
                    0 => Ok(Some(found)),
                    libc::ENOENT => Ok(None),
                    _ => Err(kernel_error(&ack, action(), self.scope.clone())),
                };
            }
        }
    }

    /// The ruleset's generation: it changes with every committed
    /// transaction, so equal numbers before and after a series of dumps
    /// mean they read one consistent ruleset.
    fn generation_locked(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        action: &dyn Fn() -> String,
    ) -> Result<u32> {
        let payload = self
            .get_locked(conn, deadline, wire::NFT_MSG_GETGEN, 0, action, |_| {})?
            .unwrap_or_default();
        wire::nf_split(&payload)
            .and_then(|(_, attrs)| wire::find_attr(attrs, wire::NFTA_GEN_ID))
            .and_then(wire::be32)
            .ok_or_else(|| self.malformed(action, "no generation id in the kernel's answer"))
    }

    /// A dump, each answer's family and attributes (after the `nfgenmsg`)
    /// given to `parse`, restarted if the kernel says the ruleset changed while it
    /// was being dumped.
    fn dump<T>(
        &self,
        msg: u16,
        family: u8,
        action: impl Fn() -> String,
        fill: impl Fn(&mut Attrs<'_>),
        parse: impl FnMut(u8, &[u8], &mut Vec<T>),
    ) -> Result<Vec<T>> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        self.dump_locked(&mut conn, deadline, msg, family, &action, fill, parse)
    }

    /// [`Nft::dump`] on a locked connection.
    #[allow(clippy::too_many_arguments)]
    fn dump_locked<T>(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        msg: u16,
        family: u8,
        action: &dyn Fn() -> String,
        fill: impl Fn(&mut Attrs<'_>),
        mut parse: impl FnMut(u8, &[u8], &mut Vec<T>),
    ) -> Result<Vec<T>> {
        for _attempt in 0..DUMP_ATTEMPTS {
            let seq = conn.take_seqs(1);
            let header = MsgHeader {
                ty: wire::nft_type(msg),
                flags: wire::NLM_F_REQUEST | wire::NLM_F_DUMP,
                seq,
                family,
                res_id: 0,
            };
            let Conn {
                socket,
                buf,
                request,
                ..
            } = &mut *conn;
            request.clear();
            wire::put_message(request, header, &fill);
            socket.send(request).map_err(|e| self.io_error(action, e))?;
            let mut out = Vec::new();
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
                            // The payload is the dump's final status.
                            let status = message
                                .payload
                                .get(0..4)
                                .and_then(|b| b.try_into().ok())
                                .map_or(0, i32::from_ne_bytes);
                            if status < 0 {
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
                        _ => {
                            if let Some((family, attrs)) = wire::nf_split(message.payload) {
                                parse(family, attrs, &mut out);
                            }
                        }
                    }
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(self.malformed(
            action,
            &format!("the ruleset kept changing while being read ({DUMP_ATTEMPTS} attempts)"),
        ))
    }

    fn io_error(&self, action: impl Fn() -> String, error: io::Error) -> Error {
        Error::io(format!("{} in {}", action(), self.scope), error)
    }

    fn timed_out(&self, action: impl Fn() -> String) -> Error {
        Error::Timeout {
            action: action(),
            scope: self.scope.clone(),
            after: self.timeout,
        }
    }

    fn malformed(&self, action: impl Fn() -> String, what: &str) -> Error {
        Error::Protocol {
            action: action(),
            scope: self.scope.clone(),
            what: what.to_owned(),
        }
    }
}

/// A chain of a dump answer, if it belongs to `table` (filtered here too:
/// chain dumps of older kernels ignore the table).
fn parse_chain(family: Family, table: &str, attrs: &[u8]) -> Option<ChainInfo> {
    let field = |ty| wire::find_attr(attrs, ty);
    if field(wire::NFTA_CHAIN_TABLE).map(wire::c_string).as_deref() != Some(table) {
        return None;
    }
    let name = field(wire::NFTA_CHAIN_NAME).map(wire::c_string)?;
    let hook = field(wire::NFTA_CHAIN_HOOK);
    let base = hook.and_then(|hook| {
        let number = wire::find_attr(hook, wire::NFTA_HOOK_HOOKNUM).and_then(wire::be32)?;
        let priority = wire::find_attr(hook, wire::NFTA_HOOK_PRIORITY).and_then(wire::be32)? as i32;
        let kind = match field(wire::NFTA_CHAIN_TYPE).map(wire::c_string)?.as_str() {
            "filter" => ChainKind::Filter,
            "nat" => ChainKind::Nat,
            "route" => ChainKind::Route,
            _ => return None,
        };
        let policy = match field(wire::NFTA_CHAIN_POLICY).and_then(wire::be32) {
            Some(0) => Policy::Drop,
            _ => Policy::Accept,
        };
        Some(BaseChain {
            hook: family.hook_of(number)?,
            priority,
            kind,
            policy,
        })
    });
    Some(ChainInfo {
        name,
        handle: field(wire::NFTA_CHAIN_HANDLE)
            .and_then(wire::be64)
            .unwrap_or(0),
        base,
        hooked: hook.is_some(),
    })
}

/// A rule of a dump answer, if it belongs to `table`/`chain` (checked again
/// in case an old kernel ignores the dump's filter).
fn parse_rule(table: &str, chain: &str, attrs: &[u8]) -> Option<RuleDump> {
    let field = |ty| wire::find_attr(attrs, ty);
    if field(wire::NFTA_RULE_TABLE).map(wire::c_string).as_deref() != Some(table)
        || field(wire::NFTA_RULE_CHAIN).map(wire::c_string).as_deref() != Some(chain)
    {
        return None;
    }
    Some(RuleDump {
        chain: chain.to_owned(),
        handle: field(wire::NFTA_RULE_HANDLE).and_then(wire::be64)?,
        comment: field(wire::NFTA_RULE_USERDATA).and_then(comment_of_userdata),
        exprs: field(wire::NFTA_RULE_EXPRESSIONS)
            .unwrap_or_default()
            .to_vec(),
    })
}

/// The kernel's refusal, with its errno and extended-ack message (if any).
fn kernel_error(ack: &Ack, action: String, scope: String) -> Error {
    Error::Kernel {
        action,
        scope,
        errno: ack.errno,
        message: ack.message.clone(),
    }
}

/// Checks a batch as [`Nft::apply`] does before sending anything (for the
/// fakes, so they refuse what the real one refuses).
pub(crate) fn check_batch(batch: &Batch) -> Result<()> {
    batch::encode(batch.ops())
        .map(|_| ())
        .map_err(|(op, e)| e.while_doing(|| batch.ops()[op].to_string()))
}

/// This module's encoding of a rule's expressions (the inside of
/// NFTA_RULE_EXPRESSIONS), anonymous sets named by their position.
pub(crate) fn encode_exprs(exprs: &[Expr]) -> Vec<u8> {
    let ids: Vec<expr::AnonRef> = (1..)
        .take(exprs.len())
        .map(|id| expr::AnonRef {
            name: format!("__set{id}"),
            id,
        })
        .collect();
    let mut ids = ids.iter();
    let mut buf = Vec::new();
    wire::put_attrs(&mut buf, |list| {
        for expr in exprs {
            expr.encode(list, &mut ids);
        }
    });
    buf
}

/// What a reconciler needs of nf_tables: read tables, chains, sets, elements
/// and rules back, apply a batch atomically. [`Nft`] is the real one;
/// [`crate::fake::FakeRuleset`] an in-memory one. Blocking, as the netlink
/// socket underneath is: call it off the async threads.
pub trait Ruleset: Send + Sync {
    fn table_exists(&self, family: Family, name: &str) -> Result<bool>;
    fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>>;
    fn chains(&self, family: Family, table: &str) -> Result<Vec<ChainInfo>>;
    fn sets(&self, family: Family, table: &str) -> Result<Vec<SetInfo>>;
    fn elements(&self, family: Family, table: &str, set: &str) -> Result<Vec<ElementInfo>>;
    fn dump_rules(&self, family: Family, table: &str, chain: Option<&str>)
    -> Result<Vec<RuleDump>>;
    fn apply(&self, batch: &Batch) -> Result<()>;

    /// See [`Nft::apply_in_batches`].
    fn apply_in_batches(&self, batch: &Batch, max_weight: usize) -> Result<usize> {
        let chunks = batch.chunks(max_weight);
        for chunk in &chunks {
            self.apply(chunk)?;
        }
        Ok(chunks.len())
    }
}

impl Ruleset for Nft {
    fn table_exists(&self, family: Family, name: &str) -> Result<bool> {
        Nft::table_exists(self, family, name)
    }

    fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>> {
        Nft::rules(self, family, table, chain)
    }

    fn chains(&self, family: Family, table: &str) -> Result<Vec<ChainInfo>> {
        Nft::chains(self, family, table)
    }

    fn sets(&self, family: Family, table: &str) -> Result<Vec<SetInfo>> {
        Nft::sets(self, family, table)
    }

    fn elements(&self, family: Family, table: &str, set: &str) -> Result<Vec<ElementInfo>> {
        Nft::elements(self, family, table, set)
    }

    fn dump_rules(
        &self,
        family: Family,
        table: &str,
        chain: Option<&str>,
    ) -> Result<Vec<RuleDump>> {
        Nft::dump_rules(self, family, table, chain)
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        Nft::apply(self, batch)
    }

    fn apply_in_batches(&self, batch: &Batch, max_weight: usize) -> Result<usize> {
        Nft::apply_in_batches(self, batch, max_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use batch::comment_userdata;

    #[test]
    fn comments_are_stored_as_nft_does() {
        // What `nft --debug=netlink` shows for comment "hello world".
        let userdata = comment_userdata("hello world").unwrap();
        assert_eq!(userdata, b"\x00\x0chello world\x00");
        assert_eq!(
            comment_of_userdata(&userdata).as_deref(),
            Some("hello world")
        );
        // Other TLVs before the comment are skipped.
        let mut mixed = vec![3, 2, 0xaa, 0xbb];
        mixed.extend_from_slice(&userdata);
        assert_eq!(comment_of_userdata(&mixed).as_deref(), Some("hello world"));
        assert_eq!(comment_of_userdata(&[0, 9, b'x']), None);
        assert!(comment_userdata(&"x".repeat(129)).is_err());
    }

    #[test]
    fn batches_are_framed_by_begin_and_end() {
        let mut batch = Batch::new();
        batch.add_table(Family::Inet, "t").add_chain(
            Family::Inet,
            "t",
            "c",
            Some(BaseChain {
                hook: Hook::Input,
                priority: -5,
                kind: ChainKind::Filter,
                policy: Policy::Drop,
            }),
        );
        let mut encoded = batch::encode(batch.ops()).unwrap();
        encoded.rebase(1);
        let messages = wire::messages(&encoded.buf).unwrap();
        let types: Vec<u16> = messages.iter().map(|m| m.ty).collect();
        assert_eq!(types, vec![0x10, 0x0a00, 0x0a03, 0x11]);
        let seqs: Vec<u32> = messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        // The delimiters name the subsystem in big-endian, as nft's "00 00 00 0a".
        assert_eq!(messages[0].payload, &[0, 0, 0, 10]);
        // Only the last message asks for an acknowledgement.
        assert_eq!(messages[1].flags, wire::NLM_F_REQUEST | wire::NLM_F_CREATE);
        assert_eq!(
            messages[2].flags,
            wire::NLM_F_REQUEST | wire::NLM_F_ACK | wire::NLM_F_CREATE
        );
    }

    #[test]
    fn range_ops_are_checked_encoded_and_split_by_element() {
        let mark = DataType::Mark;
        let spec = SetSpec::map(&[mark, mark], &[mark]).with_flags(SetFlags::INTERVAL);
        let key = |a: u32, b: u32| concat_interval(&[Datum::Mark(a), Datum::Mark(b)]);
        let ranges: Vec<ElemKey> = (0..5)
            .map(|i| ElemKey::range(key(i, 0), key(i, 65535)))
            .collect();
        let mut batch = Batch::new();
        batch
            .add_table(Family::Ip, "t")
            .add_set(Family::Ip, "t", "slots", spec.clone())
            .destroy_elements(Family::Ip, "t", "slots", ranges.clone())
            // Plain keys still do, as `Vec<Vec<u8>>` always did.
            .destroy_elements(Family::Ip, "t", "slots", vec![key(9, 9)]);
        let mut encoded = batch::encode(batch.ops()).unwrap();
        encoded.rebase(1);
        let messages = wire::messages(&encoded.buf).unwrap();
        let destroy = &messages[3];
        assert_eq!(destroy.ty, wire::nft_type(wire::NFT_MSG_DESTROYSETELEM));
        let (_, attrs) = wire::nf_split(destroy.payload).unwrap();
        let list = wire::find_attr(attrs, wire::NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
        let ends: Vec<&[u8]> = wire::attrs(list)
            .filter_map(|(_, elem)| wire::find_attr(elem, wire::NFTA_SET_ELEM_KEY_END))
            .filter_map(|end| wire::find_attr(end, wire::NFTA_DATA_VALUE))
            .collect();
        assert_eq!(
            ends,
            ranges
                .iter()
                .map(|r| r.end.as_deref().unwrap())
                .collect::<Vec<_>>()
        );
        // The kernel's pointer into a range's end still names the range.
        let origin = &encoded.origins[2];
        let (_, starts) = origin.elements.as_ref().unwrap();
        assert_eq!(origin.element_at(starts[3] + 20), Some(3));
        assert_eq!(
            batch.ops()[2].describe(Some(3)),
            "destroying 5 elements of set ip t/slots (those present) (element 3, key \
             00000003 00000000 - 00000003 0000ffff)"
        );

        // A range weighs one element, and is never cut in two.
        assert_eq!(batch.weight(), 2 + 5 + 1);
        let chunks = batch.chunks(3);
        assert_eq!(chunks.len(), 3);
        let split: Vec<ElemKey> = chunks
            .iter()
            .flat_map(|c| c.ops())
            .filter_map(|op| match op {
                Op::DestroyElements { keys, .. } => Some(keys.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(split[..5], ranges[..]);
        assert_eq!(split[5], ElemKey::from(key(9, 9)));

        // Refused before sending: a range ending below its start in a set
        // added in the batch, a range in a set without intervals.
        let mut bad = Batch::new();
        bad.add_set(Family::Ip, "t", "slots", spec.clone())
            .add_elements(
                Family::Ip,
                "t",
                "slots",
                vec![SetElem::range(key(1, 9), key(1, 0)).with_value(vec![0; 4])],
            );
        let Err((1, err)) = batch::encode(bad.ops()) else {
            panic!("must be refused")
        };
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "element key end",
                    ..
                }
            ),
            "{err:?}"
        );
        let mut bad = Batch::new();
        bad.add_set(Family::Ip, "t", "plain", SetSpec::set(&[mark, mark]))
            .delete_elements(
                Family::Ip,
                "t",
                "plain",
                [ElemKey::range(key(1, 0), key(1, 9))],
            );
        let Err((1, err)) = batch::encode(bad.ops()) else {
            panic!("must be refused")
        };
        assert!(err.to_string().contains("no SetFlags::INTERVAL"), "{err}");
    }

    #[test]
    fn hooks_the_family_lacks_are_refused_before_sending() {
        let op = Op::AddChain {
            family: Family::Netdev,
            table: "t".into(),
            chain: "c".into(),
            base: Some(BaseChain {
                hook: Hook::Forward,
                priority: 0,
                kind: ChainKind::Filter,
                policy: Policy::Accept,
            }),
        };
        let Err((0, err)) = batch::encode(&[op]) else {
            panic!("must be refused")
        };
        assert!(
            matches!(&err, Error::Invalid { field: "base chain hook", value, .. } if value == "forward"),
            "{err:?}"
        );
        assert!(
            format!("{err}").contains("netdev family has no forward hook"),
            "{err}"
        );
    }
}
