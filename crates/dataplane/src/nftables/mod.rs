//! nftables over netlink, without the `nft` binary: a small typed encoder of
//! nf_tables messages (NETLINK_NETFILTER, subsystem NFNL_SUBSYS_NFTABLES).
//!
//! - [`Nft`]: a connection bound to one network namespace. Every call is
//!   bounded by a timeout ([`DEFAULT_TIMEOUT`]) and every kernel error comes
//!   back naming what was being done, where (`adding rule to inet t/forward
//!   in netns X: Operation not supported (os error 95)`), as an
//!   [`Error::Kernel`] carrying the kernel's errno.
//! - [`Batch`]: tables, chains and rules to add or remove, applied as one
//!   transaction: all of it or none of it.
//! - [`Expr`] and [`dsl`]: rule expressions, typed, and fragments that read
//!   like nft syntax.
//!
//! The calls block (for microseconds, normally; at most the timeout). From
//! async code, either accept that or wrap them in `spawn_blocking`.
//!
//! Not here yet: sets and maps, chain deletion, listing chains or rule
//! contents (read them with `nft -j list ruleset` when debugging).

pub mod dsl;
mod expr;
mod socket;
mod wire;

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use expr::{
    ByteorderOp, CmpOp, CtKey, CtState, CtStatus, Expr, MetaKey, NatFamily, NatKind, NumgenKind,
    PayloadBase, Reg, Verdict,
};

use crate::error::{Error, Result};
use crate::netns;
use socket::NfSocket;
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

/// One change of a [`Batch`], readable so that tests and in-memory fakes can follow what
/// a batch does without a kernel.
#[derive(Clone, Debug)]
pub enum Op {
    AddTable {
        family: Family,
        name: String,
    },
    DeleteTable {
        family: Family,
        name: String,
    },
    FlushTable {
        family: Family,
        name: String,
    },
    AddChain {
        family: Family,
        table: String,
        chain: String,
        base: Option<BaseChain>,
    },
    AddRule {
        family: Family,
        table: String,
        chain: String,
        exprs: Vec<Expr>,
        comment: Option<String>,
    },
    DeleteRule {
        family: Family,
        table: String,
        chain: String,
        handle: u64,
    },
}

impl fmt::Display for Op {
    /// What the op does, for error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddTable { family, name } => write!(f, "adding table {family} {name}"),
            Op::DeleteTable { family, name } => write!(f, "deleting table {family} {name}"),
            Op::FlushTable { family, name } => write!(f, "flushing table {family} {name}"),
            Op::AddChain {
                family,
                table,
                chain,
                ..
            } => write!(f, "adding chain {family} {table}/{chain}"),
            Op::AddRule {
                family,
                table,
                chain,
                ..
            } => write!(f, "adding rule to {family} {table}/{chain}"),
            Op::DeleteRule {
                family,
                table,
                chain,
                handle,
            } => write!(f, "deleting rule {handle} from {family} {table}/{chain}"),
        }
    }
}

impl Op {
    /// Appends the op's message to a batch being built. Refuses ([`Error::Invalid`]) what
    /// the kernel would refuse or misread.
    fn encode(&self, buf: &mut Vec<u8>, seq: u32) -> Result<()> {
        use wire::*;
        let header = |msg: u16, flags: u16, family: Family| MsgHeader {
            ty: nft_type(msg),
            flags: NLM_F_REQUEST | NLM_F_ACK | flags,
            seq,
            family: family.code(),
            res_id: 0,
        };
        match self {
            Op::AddTable { family, name } => {
                check_name("table name", name)?;
                // NLM_F_CREATE without NLM_F_EXCL: an existing table is fine
                // (`nft add table`).
                put_message(buf, header(NFT_MSG_NEWTABLE, NLM_F_CREATE, *family), |a| {
                    a.str(NFTA_TABLE_NAME, name);
                    a.u32_be(NFTA_TABLE_FLAGS, 0);
                });
            }
            Op::DeleteTable { family, name } => {
                check_name("table name", name)?;
                put_message(buf, header(NFT_MSG_DELTABLE, 0, *family), |a| {
                    a.str(NFTA_TABLE_NAME, name);
                });
            }
            Op::FlushTable { family, name } => {
                check_name("table name", name)?;
                // What `nft flush table` sends: delete the rules of every
                // chain of the table.
                put_message(buf, header(NFT_MSG_DELRULE, 0, *family), |a| {
                    a.str(NFTA_RULE_TABLE, name);
                });
            }
            Op::AddChain {
                family,
                table,
                chain,
                base,
            } => {
                check_name("table name", table)?;
                check_name("chain name", chain)?;
                let hook = match base {
                    Some(base) => Some(family.hook_number(base.hook).ok_or_else(|| {
                        Error::invalid(
                            "base chain hook",
                            base.hook.name(),
                            format!(
                                "the {family} family has no {} hook that this module can \
                                 attach to",
                                base.hook.name()
                            ),
                        )
                    })?),
                    None => None,
                };
                put_message(buf, header(NFT_MSG_NEWCHAIN, NLM_F_CREATE, *family), |a| {
                    a.str(NFTA_CHAIN_TABLE, table);
                    a.str(NFTA_CHAIN_NAME, chain);
                    if let (Some(base), Some(hook)) = (base, hook) {
                        a.str(NFTA_CHAIN_TYPE, base.kind.name());
                        let policy = match base.policy {
                            Policy::Drop => 0,
                            Policy::Accept => 1,
                        };
                        a.u32_be(NFTA_CHAIN_POLICY, policy);
                        a.nested(NFTA_CHAIN_HOOK, |h| {
                            h.u32_be(NFTA_HOOK_HOOKNUM, hook);
                            h.u32_be(NFTA_HOOK_PRIORITY, base.priority as u32);
                        });
                    }
                });
            }
            Op::AddRule {
                family,
                table,
                chain,
                exprs,
                comment,
            } => {
                check_name("table name", table)?;
                check_name("chain name", chain)?;
                expr::check_rule(exprs).map_err(|err| Error::invalid("rule", "", err))?;
                let userdata = comment.as_deref().map(comment_userdata).transpose()?;
                let flags = NLM_F_CREATE | NLM_F_APPEND;
                put_message(buf, header(NFT_MSG_NEWRULE, flags, *family), |a| {
                    a.str(NFTA_RULE_TABLE, table);
                    a.str(NFTA_RULE_CHAIN, chain);
                    a.nested(NFTA_RULE_EXPRESSIONS, |list| {
                        for expr in exprs {
                            expr.encode(list);
                        }
                    });
                    if let Some(userdata) = &userdata {
                        a.bytes(NFTA_RULE_USERDATA, userdata);
                    }
                });
            }
            Op::DeleteRule {
                family,
                table,
                chain,
                handle,
            } => {
                check_name("table name", table)?;
                check_name("chain name", chain)?;
                put_message(buf, header(NFT_MSG_DELRULE, 0, *family), |a| {
                    a.str(NFTA_RULE_TABLE, table);
                    a.str(NFTA_RULE_CHAIN, chain);
                    a.u64_be(NFTA_RULE_HANDLE, *handle);
                });
            }
        }
        Ok(())
    }
}

/// A transaction: ops that the kernel applies all together or not at all,
/// in the order they were added.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of ops.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// `add table FAMILY NAME`: creates the table; an existing one is left
    /// as it is.
    pub fn add_table(&mut self, family: Family, name: &str) -> &mut Batch {
        self.push(Op::AddTable {
            family,
            name: name.to_owned(),
        })
    }

    /// `delete table FAMILY NAME`, with its chains and rules. Fails (and
    /// with it the batch) if there is no such table.
    pub fn delete_table(&mut self, family: Family, name: &str) -> &mut Batch {
        self.push(Op::DeleteTable {
            family,
            name: name.to_owned(),
        })
    }

    /// `flush table FAMILY NAME`: removes every rule, keeps the chains.
    pub fn flush_table(&mut self, family: Family, name: &str) -> &mut Batch {
        self.push(Op::FlushTable {
            family,
            name: name.to_owned(),
        })
    }

    /// `add chain FAMILY TABLE CHAIN [{ BASE }]`: a regular chain (a target
    /// for jumps) without `base`, else a base chain attached to a hook. An
    /// existing chain is left as it is (a base chain gets the new policy).
    pub fn add_chain(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        base: Option<BaseChain>,
    ) -> &mut Batch {
        self.push(Op::AddChain {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
            base,
        })
    }

    /// `add rule FAMILY TABLE CHAIN EXPRS [comment "COMMENT"]`: appends a
    /// rule. The comment (at most 128 bytes) is stored the way nft stores
    /// it, so `nft list` shows it.
    pub fn add_rule(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        exprs: Vec<Expr>,
        comment: Option<&str>,
    ) -> &mut Batch {
        self.push(Op::AddRule {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
            exprs,
            comment: comment.map(str::to_owned),
        })
    }

    /// `delete rule FAMILY TABLE CHAIN handle HANDLE` (see [`Nft::rules`]).
    pub fn delete_rule(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        handle: u64,
    ) -> &mut Batch {
        self.push(Op::DeleteRule {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
            handle,
        })
    }

    /// The changes, in the order the kernel applies them.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    fn push(&mut self, op: Op) -> &mut Batch {
        self.ops.push(op);
        self
    }
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
    buf: Vec<u8>,
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
                buf: vec![0; 64 * 1024],
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
    /// applied, and the error names the first op the kernel refused (and
    /// how many others it refused as well, often as a consequence).
    pub fn apply(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let ops = u32::try_from(batch.ops.len())
            .ok()
            .filter(|ops| *ops < u32::MAX - 2)
            .ok_or_else(|| {
                Error::invalid("batch", "", format!("{} ops are too many", batch.ops.len()))
            })?;
        let mut conn = self.lock();
        let begin = conn.take_seqs(ops + 2);
        let first_op = begin + 1;
        let end = first_op + ops;

        let mut request = Vec::with_capacity(256 * batch.ops.len());
        put_delimiter(&mut request, wire::NFNL_MSG_BATCH_BEGIN, begin);
        for (op, seq) in batch.ops.iter().zip(first_op..) {
            op.encode(&mut request, seq)
                .map_err(|e| e.while_doing(|| format!("{op} in {}", self.scope)))?;
        }
        put_delimiter(&mut request, wire::NFNL_MSG_BATCH_END, end);

        let doing = || format!("applying a batch of {ops} nftables ops");
        let io_error = |e| Error::io(format!("{} in {}", doing(), self.scope), e);
        conn.socket.make_room(request.len(), batch.ops.len());
        conn.socket.send(&request).map_err(io_error)?;

        // Every op carries NLM_F_ACK, so each gets an answer (errors and
        // successes alike arrive once the kernel is done with the batch).
        // An error on the batch-begin seq means the batch as a whole failed
        // (e.g. its commit); after it nothing more may come.
        let mut answers: Vec<Option<Ack>> = vec![None; batch.ops.len()];
        let mut batch_error: Option<Ack> = None;
        let mut pending = batch.ops.len();
        let Conn { socket, buf, .. } = &mut *conn;
        while pending > 0 {
            let wait_until = if batch_error.is_some() {
                // Collect what is already queued, then stop.
                Instant::now()
            } else {
                deadline
            };
            if !socket.recv(buf, wait_until).map_err(io_error)? {
                if batch_error.is_some() {
                    break;
                }
                return Err(Error::Timeout {
                    action: format!(
                        "{} ({pending} of them unanswered; the batch may or may not have \
                         been applied)",
                        doing()
                    ),
                    scope: self.scope.clone(),
                    after: self.timeout,
                });
            }
            let messages = wire::messages(buf).ok_or_else(|| Error::Protocol {
                action: doing(),
                scope: self.scope.clone(),
                what: "malformed answer from the kernel".into(),
            })?;
            for message in messages {
                if message.ty != wire::NLMSG_ERROR {
                    continue;
                }
                let Some(ack) = wire::parse_ack(&message) else {
                    continue;
                };
                if ack.seq == begin && ack.errno != 0 {
                    batch_error = Some(ack);
                } else if (first_op..end).contains(&ack.seq) {
                    let slot = &mut answers[(ack.seq - first_op) as usize];
                    if slot.is_none() {
                        pending -= 1;
                    }
                    *slot = Some(ack);
                }
            }
        }

        let failures: Vec<(&Op, &Ack)> = batch
            .ops
            .iter()
            .zip(&answers)
            .filter_map(|(op, ack)| {
                ack.as_ref()
                    .filter(|ack| ack.errno != 0)
                    .map(|ack| (op, ack))
            })
            .collect();
        if let Some((op, ack)) = failures.first() {
            // The scope carries the note, so the message reads "OP in netns X (and ...): ".
            let mut scope = self.scope.clone();
            if failures.len() > 1 {
                scope.push_str(&format!(
                    " (and {} later ops of the batch failed too; nothing was applied)",
                    failures.len() - 1
                ));
            }
            return Err(kernel_error(ack, op.to_string(), scope));
        }
        if let Some(ack) = batch_error {
            return Err(kernel_error(
                &ack,
                format!("committing a batch of {ops} nftables ops"),
                self.scope.clone(),
            ));
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
        let messages = self.dump(wire::NFT_MSG_GETTABLE, 0, action, |_| {})?;
        let mut tables = Vec::new();
        for message in &messages {
            let Some((family, attrs)) = wire::nf_split(message) else {
                continue;
            };
            let (Some(family), Some(name)) = (
                Family::from_code(family),
                wire::find_attr(attrs, wire::NFTA_TABLE_NAME),
            ) else {
                continue;
            };
            tables.push((family, wire::c_string(name)));
        }
        tables.sort();
        Ok(tables)
    }

    /// The rules of a chain, in order. Fails if the chain does not exist.
    pub fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>> {
        let action = || format!("listing rules of {family} {table}/{chain}");
        check_name("table name", table)
            .and_then(|()| check_name("chain name", chain))
            .map_err(|e| e.while_doing(|| format!("{} in {}", action(), self.scope)))?;
        // A rule dump of a missing chain is just empty: ask for the chain
        // first so a typo does not pass for "no rules".
        let chain_exists = self.get(wire::NFT_MSG_GETCHAIN, family.code(), action, |a| {
            a.str(wire::NFTA_CHAIN_TABLE, table);
            a.str(wire::NFTA_CHAIN_NAME, chain);
        })?;
        if !chain_exists {
            return Err(Error::NotFound {
                action: action(),
                what: format!("chain {family} {table}/{chain}"),
                scope: self.scope.clone(),
            });
        }
        let messages = self.dump(wire::NFT_MSG_GETRULE, family.code(), action, |a| {
            a.str(wire::NFTA_RULE_TABLE, table);
            a.str(wire::NFTA_RULE_CHAIN, chain);
        })?;
        let mut rules = Vec::new();
        for message in &messages {
            let Some((_, attrs)) = wire::nf_split(message) else {
                continue;
            };
            let field = |ty| wire::find_attr(attrs, ty);
            // The kernel filters by table and chain; checked again in case
            // an old one ignores the filter.
            if field(wire::NFTA_RULE_TABLE).map(wire::c_string).as_deref() != Some(table)
                || field(wire::NFTA_RULE_CHAIN).map(wire::c_string).as_deref() != Some(chain)
            {
                continue;
            }
            let Some(handle) = field(wire::NFTA_RULE_HANDLE).and_then(wire::be64) else {
                continue;
            };
            let comment = field(wire::NFTA_RULE_USERDATA).and_then(comment_of_userdata);
            rules.push(RuleInfo { handle, comment });
        }
        Ok(rules)
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
        let seq = conn.take_seqs(1);
        let mut request = Vec::new();
        let header = MsgHeader {
            ty: wire::nft_type(msg),
            flags: wire::NLM_F_REQUEST | wire::NLM_F_ACK,
            seq,
            family,
            res_id: 0,
        };
        wire::put_message(&mut request, header, fill);
        let Conn { socket, buf, .. } = &mut *conn;
        socket
            .send(&request)
            .map_err(|e| self.io_error(&action, e))?;
        let mut found = false;
        loop {
            if !socket
                .recv(buf, deadline)
                .map_err(|e| self.io_error(&action, e))?
            {
                return Err(self.timed_out(&action));
            }
            let messages = wire::messages(buf)
                .ok_or_else(|| self.malformed(&action, "malformed answer from the kernel"))?;
            for message in messages.iter().filter(|m| m.seq == seq) {
                if message.ty != wire::NLMSG_ERROR {
                    found = true;
                    continue;
                }
                let Some(ack) = wire::parse_ack(message) else {
                    return Err(self.malformed(&action, "malformed acknowledgement"));
                };
                return match ack.errno {
                    0 => Ok(found),
                    libc::ENOENT => Ok(false),
                    _ => Err(kernel_error(&ack, action(), self.scope.clone())),
                };
            }
        }
    }

    /// A dump: the payloads of all answers, restarted if the kernel says the
    /// ruleset changed while it was being dumped.
    fn dump(
        &self,
        msg: u16,
        family: u8,
        action: impl Fn() -> String,
        fill: impl Fn(&mut Attrs<'_>),
    ) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.lock();
        for _attempt in 0..DUMP_ATTEMPTS {
            let seq = conn.take_seqs(1);
            let mut request = Vec::new();
            let header = MsgHeader {
                ty: wire::nft_type(msg),
                flags: wire::NLM_F_REQUEST | wire::NLM_F_DUMP,
                seq,
                family,
                res_id: 0,
            };
            wire::put_message(&mut request, header, &fill);
            let Conn { socket, buf, .. } = &mut *conn;
            socket
                .send(&request)
                .map_err(|e| self.io_error(&action, e))?;
            let mut payloads = Vec::new();
            let mut interrupted = false;
            'receive: loop {
                if !socket
                    .recv(buf, deadline)
                    .map_err(|e| self.io_error(&action, e))?
                {
                    return Err(self.timed_out(&action));
                }
                let messages = wire::messages(buf)
                    .ok_or_else(|| self.malformed(&action, "malformed answer from the kernel"))?;
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
                                return Err(self.malformed(&action, "malformed error answer"));
                            };
                            if ack.errno == libc::EINTR {
                                interrupted = true;
                                break 'receive;
                            }
                            return Err(kernel_error(&ack, action(), self.scope.clone()));
                        }
                        wire::NLMSG_OVERRUN => {
                            return Err(
                                self.malformed(&action, "the kernel lost part of the answer")
                            );
                        }
                        _ => payloads.push(message.payload.to_vec()),
                    }
                }
            }
            if !interrupted {
                return Ok(payloads);
            }
        }
        Err(self.malformed(
            &action,
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

/// NFNL_MSG_BATCH_BEGIN / _END: family AF_UNSPEC, resource id the subsystem.
fn put_delimiter(buf: &mut Vec<u8>, ty: u16, seq: u32) {
    let header = MsgHeader {
        ty,
        flags: wire::NLM_F_REQUEST,
        seq,
        family: 0,
        res_id: wire::NFNL_SUBSYS_NFTABLES,
    };
    wire::put_message(buf, header, |_| {});
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

fn check_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= wire::NFT_NAME_MAXLEN || name.contains('\0') {
        return Err(Error::invalid(
            field,
            name,
            format!("1 to {} bytes, no NUL", wire::NFT_NAME_MAXLEN - 1),
        ));
    }
    Ok(())
}

/// A rule comment as libnftnl stores it in NFTA_RULE_USERDATA: a TLV of
/// type NFTNL_UDATA_RULE_COMMENT holding the NUL-terminated string.
fn comment_userdata(comment: &str) -> Result<Vec<u8>> {
    if comment.len() > wire::UDATA_COMMENT_MAXLEN || comment.contains('\0') {
        return Err(Error::invalid(
            "rule comment",
            comment,
            format!("at most {} bytes, no NUL", wire::UDATA_COMMENT_MAXLEN),
        ));
    }
    let mut userdata = vec![wire::UDATA_RULE_COMMENT, (comment.len() + 1) as u8];
    userdata.extend_from_slice(comment.as_bytes());
    userdata.push(0);
    Ok(userdata)
}

/// The comment TLV of a rule's userdata, if there is one.
fn comment_of_userdata(mut userdata: &[u8]) -> Option<String> {
    while let [ty, len, rest @ ..] = userdata {
        let value = rest.get(..usize::from(*len))?;
        if *ty == wire::UDATA_RULE_COMMENT {
            return Some(wire::c_string(value));
        }
        userdata = &rest[usize::from(*len)..];
    }
    None
}

/// What a reconciler needs of nf_tables: read tables and rules back, apply a batch
/// atomically. [`Nft`] is the real one; [`crate::fake::FakeRuleset`] an in-memory one.
/// Blocking, as the netlink socket underneath is: call it off the async threads.
pub trait Ruleset: Send + Sync {
    fn table_exists(&self, family: Family, name: &str) -> Result<bool>;
    fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>>;
    fn apply(&self, batch: &Batch) -> Result<()>;
}

impl Ruleset for Nft {
    fn table_exists(&self, family: Family, name: &str) -> Result<bool> {
        Nft::table_exists(self, family, name)
    }

    fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>> {
        Nft::rules(self, family, table, chain)
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        Nft::apply(self, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut buf = Vec::new();
        put_delimiter(&mut buf, wire::NFNL_MSG_BATCH_BEGIN, 1);
        for (op, seq) in batch.ops.iter().zip(2..) {
            op.encode(&mut buf, seq).unwrap();
        }
        put_delimiter(&mut buf, wire::NFNL_MSG_BATCH_END, 4);
        let messages = wire::messages(&buf).unwrap();
        let types: Vec<u16> = messages.iter().map(|m| m.ty).collect();
        assert_eq!(types, vec![0x10, 0x0a00, 0x0a03, 0x11]);
        // The delimiters name the subsystem in big-endian, as nft's "00 00 00 0a".
        assert_eq!(messages[0].payload, &[0, 0, 0, 10]);
        let flags = messages[2].flags;
        assert_eq!(
            flags,
            wire::NLM_F_REQUEST | wire::NLM_F_ACK | wire::NLM_F_CREATE
        );
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
        let err = op.encode(&mut Vec::new(), 1).unwrap_err();
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
