//! [`Op`]s, [`Batch`]es of them, and their encoding into one nf_tables
//! transaction (a BATCH_BEGIN, the ops' messages, a BATCH_END).

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;
use std::fmt;

use super::expr::{self, AnonRef, Expr};
use super::set::{self, ElemKey, SetElem, SetSpec};
use super::wire::{self, Attrs, MsgHeader};
use super::{BaseChain, Family, Policy};
use crate::error::{Error, Result};

/// One change of a [`Batch`], readable so that tests and in-memory fakes can
/// follow what a batch does without a kernel.
///
/// `Delete*` ops fail (and with them the batch) when the object is missing;
/// `Destroy*` ops (Linux 6.3 and later) treat "already gone" as done, as
/// long as what holds the object (its table; for elements, their set) is
/// there.
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
    DestroyTable {
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
    DeleteChain {
        family: Family,
        table: String,
        chain: String,
    },
    DestroyChain {
        family: Family,
        table: String,
        chain: String,
    },
    FlushChain {
        family: Family,
        table: String,
        chain: String,
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
    DestroyRule {
        family: Family,
        table: String,
        chain: String,
        handle: u64,
    },
    AddSet {
        family: Family,
        table: String,
        name: String,
        spec: SetSpec,
    },
    DeleteSet {
        family: Family,
        table: String,
        name: String,
    },
    DestroySet {
        family: Family,
        table: String,
        name: String,
    },
    FlushSet {
        family: Family,
        table: String,
        name: String,
    },
    AddElements {
        family: Family,
        table: String,
        set: String,
        elements: Vec<SetElem>,
    },
    DeleteElements {
        family: Family,
        table: String,
        set: String,
        keys: Vec<ElemKey>,
    },
    DestroyElements {
        family: Family,
        table: String,
        set: String,
        keys: Vec<ElemKey>,
    },
}

impl fmt::Display for Op {
    /// What the op does, for error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |n: usize| {
            if n == 1 {
                "1 element".to_owned()
            } else {
                format!("{n} elements")
            }
        };
        match self {
            Op::AddTable { family, name } => write!(f, "adding table {family} {name}"),
            Op::DeleteTable { family, name } => write!(f, "deleting table {family} {name}"),
            Op::DestroyTable { family, name } => {
                write!(f, "destroying table {family} {name} (if present)")
            }
            Op::FlushTable { family, name } => write!(f, "flushing table {family} {name}"),
            Op::AddChain {
                family,
                table,
                chain,
                ..
            } => write!(f, "adding chain {family} {table}/{chain}"),
            Op::DeleteChain {
                family,
                table,
                chain,
            } => write!(f, "deleting chain {family} {table}/{chain}"),
            Op::DestroyChain {
                family,
                table,
                chain,
            } => write!(f, "destroying chain {family} {table}/{chain} (if present)"),
            Op::FlushChain {
                family,
                table,
                chain,
            } => write!(f, "flushing chain {family} {table}/{chain}"),
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
            Op::DestroyRule {
                family,
                table,
                chain,
                handle,
            } => write!(
                f,
                "destroying rule {handle} of {family} {table}/{chain} (if present)"
            ),
            Op::AddSet {
                family,
                table,
                name,
                spec,
            } => write!(f, "adding {} {family} {table}/{name}", spec.noun()),
            Op::DeleteSet {
                family,
                table,
                name,
            } => write!(f, "deleting set {family} {table}/{name}"),
            Op::DestroySet {
                family,
                table,
                name,
            } => write!(f, "destroying set {family} {table}/{name} (if present)"),
            Op::FlushSet {
                family,
                table,
                name,
            } => write!(f, "flushing set {family} {table}/{name}"),
            Op::AddElements {
                family,
                table,
                set,
                elements,
            } => write!(
                f,
                "adding {} to set {family} {table}/{set}",
                count(elements.len())
            ),
            Op::DeleteElements {
                family,
                table,
                set,
                keys,
            } => write!(
                f,
                "deleting {} from set {family} {table}/{set}",
                count(keys.len())
            ),
            Op::DestroyElements {
                family,
                table,
                set,
                keys,
            } => write!(
                f,
                "destroying {} of set {family} {table}/{set} (those present)",
                count(keys.len())
            ),
        }
    }
}

impl Op {
    /// How much of a transaction's bound the op takes: one per element for
    /// element ops (and anonymous sets), one for anything else.
    pub fn weight(&self) -> usize {
        match self {
            Op::AddElements { elements, .. } => elements.len().max(1),
            Op::DeleteElements { keys, .. } | Op::DestroyElements { keys, .. } => keys.len().max(1),
            Op::AddRule { exprs, .. } => {
                1 + exprs
                    .iter()
                    .filter_map(Expr::anonymous_set)
                    .map(|set| set.elements.len())
                    .sum::<usize>()
            }
            _ => 1,
        }
    }

    /// Whether the op carries a list of elements (and can be split).
    fn is_element_op(&self) -> bool {
        matches!(
            self,
            Op::AddElements { .. } | Op::DeleteElements { .. } | Op::DestroyElements { .. }
        )
    }

    /// Keeps the first `first` elements of an element op and returns an op
    /// with the rest (`None` for other ops, or nothing left over).
    fn split_off_elements(&mut self, first: usize) -> Option<Op> {
        match self {
            Op::AddElements {
                family,
                table,
                set,
                elements,
            } if first < elements.len() => Some(Op::AddElements {
                family: *family,
                table: table.clone(),
                set: set.clone(),
                elements: elements.split_off(first),
            }),
            Op::DeleteElements {
                family,
                table,
                set,
                keys,
            } if first < keys.len() => Some(Op::DeleteElements {
                family: *family,
                table: table.clone(),
                set: set.clone(),
                keys: keys.split_off(first),
            }),
            Op::DestroyElements {
                family,
                table,
                set,
                keys,
            } if first < keys.len() => Some(Op::DestroyElements {
                family: *family,
                table: table.clone(),
                set: set.clone(),
                keys: keys.split_off(first),
            }),
            _ => None,
        }
    }

    /// The key (and range end) of element `index` of an element op, for
    /// error messages.
    fn element_key(&self, index: usize) -> Option<ElemKey> {
        match self {
            Op::AddElements { elements, .. } => elements.get(index).map(ElemKey::from),
            Op::DeleteElements { keys, .. } | Op::DestroyElements { keys, .. } => {
                keys.get(index).cloned()
            }
            _ => None,
        }
    }

    /// What the op does, naming element `element` if the kernel blamed one
    /// (a range as `START - END`).
    pub(crate) fn describe(&self, element: Option<usize>) -> String {
        match element.and_then(|i| self.element_key(i).map(|key| (i, key))) {
            Some((i, key)) => format!("{self} (element {i}, key {key})"),
            None => self.to_string(),
        }
    }
}

/// [`Batch::chunks`] without copying ops that need no splitting.
pub(crate) fn plan_chunks(ops: &[Op], max_weight: usize) -> Vec<Vec<Cow<'_, Op>>> {
    let max_weight = max_weight.max(1);
    let mut chunks = Vec::new();
    let mut current: Vec<Cow<'_, Op>> = Vec::new();
    let mut room = max_weight;
    for op in ops {
        let mut op = Cow::Borrowed(op);
        loop {
            let weight = op.weight();
            if weight <= room {
                room -= weight;
                current.push(op);
                break;
            }
            if op.is_element_op() && room > 0 {
                // Fill the room with the first elements, go on with the rest.
                let mut head = op.into_owned();
                let tail = head.split_off_elements(room);
                current.push(Cow::Owned(head));
                match tail {
                    Some(tail) => op = Cow::Owned(tail),
                    None => break,
                }
            } else if room == max_weight {
                // Heavier than a whole transaction and not splittable.
                current.push(op);
                chunks.push(std::mem::take(&mut current));
                break;
            }
            chunks.push(std::mem::take(&mut current));
            room = max_weight;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A transaction: ops that the kernel applies all together or not at all,
/// in the order they were added.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl From<Vec<Op>> for Batch {
    fn from(ops: Vec<Op>) -> Batch {
        Batch { ops }
    }
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

    /// The changes, in the order the kernel applies them.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    /// Appends any op.
    pub fn push(&mut self, op: Op) -> &mut Batch {
        self.ops.push(op);
        self
    }

    /// Appends the ops of another batch.
    pub fn extend(&mut self, other: Batch) -> &mut Batch {
        self.ops.extend(other.ops);
        self
    }

    /// Total [`Op::weight`].
    pub fn weight(&self) -> usize {
        self.ops.iter().map(Op::weight).sum()
    }

    /// Splits the batch into consecutive batches of at most `max_weight`
    /// each (see [`Op::weight`]; element ops are split as needed, an op
    /// heavier than the bound on its own gets a batch of its own). Applied
    /// in order, they do what the batch does, but each is its own
    /// transaction: see [`super::Nft::apply_in_batches`].
    pub fn chunks(&self, max_weight: usize) -> Vec<Batch> {
        plan_chunks(&self.ops, max_weight)
            .into_iter()
            .map(|ops| Batch {
                ops: ops.into_iter().map(Cow::into_owned).collect(),
            })
            .collect()
    }

    /// `add table FAMILY NAME`: creates the table; an existing one is left
    /// as it is.
    pub fn add_table(&mut self, family: Family, name: &str) -> &mut Batch {
        self.push(Op::AddTable {
            family,
            name: name.to_owned(),
        })
    }

    /// `delete table FAMILY NAME`, with its chains, rules and sets. Fails
    /// (and with it the batch) if there is no such table.
    pub fn delete_table(&mut self, family: Family, name: &str) -> &mut Batch {
        self.push(Op::DeleteTable {
            family,
            name: name.to_owned(),
        })
    }

    /// `destroy table FAMILY NAME`: like [`Batch::delete_table`], but a
    /// missing table is fine.
    pub fn destroy_table(&mut self, family: Family, name: &str) -> &mut Batch {
        self.push(Op::DestroyTable {
            family,
            name: name.to_owned(),
        })
    }

    /// `flush table FAMILY NAME`: removes every rule, keeps the chains (and
    /// sets with their elements).
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

    /// `delete chain FAMILY TABLE CHAIN`, with its rules. Fails if there is
    /// no such chain, or while a rule or map element still jumps to it
    /// (`EBUSY`): remove those first, in the same batch or before.
    pub fn delete_chain(&mut self, family: Family, table: &str, chain: &str) -> &mut Batch {
        self.push(Op::DeleteChain {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
        })
    }

    /// `destroy chain FAMILY TABLE CHAIN`: like [`Batch::delete_chain`],
    /// but a missing chain is fine (the table must exist).
    pub fn destroy_chain(&mut self, family: Family, table: &str, chain: &str) -> &mut Batch {
        self.push(Op::DestroyChain {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
        })
    }

    /// `flush chain FAMILY TABLE CHAIN`: removes its rules, keeps it.
    pub fn flush_chain(&mut self, family: Family, table: &str, chain: &str) -> &mut Batch {
        self.push(Op::FlushChain {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
        })
    }

    /// `add rule FAMILY TABLE CHAIN EXPRS [comment "COMMENT"]`: appends a
    /// rule. The comment (at most 128 bytes) is stored the way nft stores
    /// it, so `nft list` shows it. Anonymous sets in the expressions
    /// ([`super::SetRef::Anonymous`]) are created with the rule.
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

    /// `delete rule FAMILY TABLE CHAIN handle HANDLE` (see
    /// [`super::Nft::rules`]). Fails if there is no such rule.
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

    /// `destroy rule FAMILY TABLE CHAIN handle HANDLE`: a missing rule is
    /// fine (the table must exist).
    pub fn destroy_rule(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        handle: u64,
    ) -> &mut Batch {
        self.push(Op::DestroyRule {
            family,
            table: table.to_owned(),
            chain: chain.to_owned(),
            handle,
        })
    }

    /// `add set|map FAMILY TABLE NAME { SPEC }`. An existing set of the same
    /// spec is left as it is, elements included; one of another type is an
    /// error (`EEXIST`).
    pub fn add_set(
        &mut self,
        family: Family,
        table: &str,
        name: &str,
        spec: SetSpec,
    ) -> &mut Batch {
        self.push(Op::AddSet {
            family,
            table: table.to_owned(),
            name: name.to_owned(),
            spec,
        })
    }

    /// `delete set FAMILY TABLE NAME` (maps too). Fails if it is missing or
    /// a rule still uses it (`EBUSY`).
    pub fn delete_set(&mut self, family: Family, table: &str, name: &str) -> &mut Batch {
        self.push(Op::DeleteSet {
            family,
            table: table.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `destroy set FAMILY TABLE NAME`: a missing set is fine (the table
    /// must exist).
    pub fn destroy_set(&mut self, family: Family, table: &str, name: &str) -> &mut Batch {
        self.push(Op::DestroySet {
            family,
            table: table.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `flush set FAMILY TABLE NAME`: removes every element.
    pub fn flush_set(&mut self, family: Family, table: &str, name: &str) -> &mut Batch {
        self.push(Op::FlushSet {
            family,
            table: table.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `add element FAMILY TABLE SET { ELEMENTS }`. An element whose key is
    /// there already is left as it is (its timeout restarted) if its value
    /// is the same, and is an error (`EEXIST`) if the value differs: to
    /// change a value, delete (or destroy) the key and add it again in the
    /// same batch. Any number of elements: they are sent in as many
    /// messages as needed, still in one transaction.
    pub fn add_elements(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        elements: Vec<SetElem>,
    ) -> &mut Batch {
        self.push(Op::AddElements {
            family,
            table: table.to_owned(),
            set: set.to_owned(),
            elements,
        })
    }

    /// `delete element FAMILY TABLE SET { KEYS }`. Fails if a key is
    /// missing. Keys are plain keys (`Vec<u8>`) or [`ElemKey`]s; a range of
    /// an interval set is named by both its ends ([`ElemKey::range`]), as
    /// nft names it, though the kernel deletes whichever range holds the
    /// first key (see [`ElemKey`]).
    pub fn delete_elements(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        keys: impl IntoIterator<Item = impl Into<ElemKey>>,
    ) -> &mut Batch {
        self.push(Op::DeleteElements {
            family,
            table: table.to_owned(),
            set: set.to_owned(),
            keys: keys.into_iter().map(Into::into).collect(),
        })
    }

    /// `destroy element FAMILY TABLE SET { KEYS }`: missing keys are fine
    /// (a missing set is not: the kernel needs its type to read the keys).
    /// Keys as for [`Batch::delete_elements`].
    pub fn destroy_elements(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        keys: impl IntoIterator<Item = impl Into<ElemKey>>,
    ) -> &mut Batch {
        self.push(Op::DestroyElements {
            family,
            table: table.to_owned(),
            set: set.to_owned(),
            keys: keys.into_iter().map(Into::into).collect(),
        })
    }
}

// ----- encoding -----

/// A batch as bytes, ready to send once its sequence numbers are set.
pub(crate) struct Encoded {
    pub buf: Vec<u8>,
    /// For each message between BATCH_BEGIN and BATCH_END, in order: the op
    /// it came from.
    pub origins: Vec<Origin>,
}

/// Which op (and for element lists, which elements) a message carries.
pub(crate) struct Origin {
    pub op: usize,
    /// Index in the op of the first element of the message, and where each
    /// element starts in the message, to read the kernel's pointer to a
    /// refused element back as an element.
    pub elements: Option<(usize, Vec<u32>)>,
}

impl Origin {
    /// The element whose attribute contains `offset`.
    pub fn element_at(&self, offset: u32) -> Option<usize> {
        let (first, starts) = self.elements.as_ref()?;
        let i = starts.partition_point(|start| *start <= offset);
        i.checked_sub(1).map(|i| first + i)
    }
}

impl Encoded {
    /// Sequence numbers relative to 0: BATCH_BEGIN is 0, message `i` is
    /// `i + 1`, BATCH_END is `origins.len() + 1`.
    pub fn message_count(&self) -> usize {
        self.origins.len()
    }

    /// Adds `base` to every sequence number (done under the connection's
    /// lock, so encoding itself needs none).
    pub fn rebase(&mut self, base: u32) {
        let mut at = 0;
        while at + wire::NLMSG_HDRLEN <= self.buf.len() {
            let len = u32::from_ne_bytes(self.buf[at..at + 4].try_into().unwrap_or([0; 4]));
            let seq = u32::from_ne_bytes(self.buf[at + 8..at + 12].try_into().unwrap_or([0; 4]));
            self.buf[at + 8..at + 12].copy_from_slice(&seq.wrapping_add(base).to_ne_bytes());
            at += (len as usize).next_multiple_of(4).max(wire::NLMSG_HDRLEN);
        }
    }
}

/// Longest element list put in one message: its nest length is a u16.
const ELEMENT_LIST_BUDGET: usize = 60_000;

/// Encodes a batch (see [`Encoded`]). A refusal names the op's index.
pub(crate) fn encode<O: Borrow<Op>>(ops: &[O]) -> std::result::Result<Encoded, (usize, Error)> {
    let mut encoder = Encoder {
        buf: Vec::with_capacity(ops.len() * 160 + 64),
        origins: Vec::with_capacity(ops.len()),
        next_set_id: 1,
        sets: HashMap::new(),
        last_start: None,
    };
    put_delimiter(&mut encoder.buf, wire::NFNL_MSG_BATCH_BEGIN, 0);
    for (index, op) in ops.iter().enumerate() {
        encoder.op(index, op.borrow()).map_err(|e| (index, e))?;
    }
    // Only the last message asks for an acknowledgement: the kernel answers
    // every refused message anyway, and the last answer (sent once the
    // whole batch is committed or aborted) tells that the batch is done.
    // An acknowledgement per message would cost one socket buffer each.
    if let Some(start) = encoder.last_start {
        let flags_at = start + 6;
        let flags = u16::from_ne_bytes([encoder.buf[flags_at], encoder.buf[flags_at + 1]]);
        encoder.buf[flags_at..flags_at + 2]
            .copy_from_slice(&(flags | wire::NLM_F_ACK).to_ne_bytes());
    }
    let end = u32::try_from(encoder.origins.len() + 1).unwrap_or(u32::MAX);
    put_delimiter(&mut encoder.buf, wire::NFNL_MSG_BATCH_END, end);
    Ok(Encoded {
        buf: encoder.buf,
        origins: encoder.origins,
    })
}

struct Encoder<'a> {
    buf: Vec<u8>,
    origins: Vec<Origin>,
    /// Transaction ids for anonymous sets (unique within the batch).
    next_set_id: u32,
    /// Sets added earlier in the batch, to check elements against.
    sets: HashMap<(Family, &'a str, &'a str), &'a SetSpec>,
    last_start: Option<usize>,
}

impl<'a> Encoder<'a> {
    /// Starts a message of `op`; returns its sequence number.
    fn header(&mut self, op: usize, msg: u16, flags: u16, family: Family) -> MsgHeader {
        self.last_start = Some(self.buf.len());
        self.origins.push(Origin { op, elements: None });
        MsgHeader {
            ty: wire::nft_type(msg),
            flags: wire::NLM_F_REQUEST | flags,
            seq: u32::try_from(self.origins.len()).unwrap_or(u32::MAX),
            family: family.code(),
            res_id: 0,
        }
    }

    fn message(
        &mut self,
        op: usize,
        msg: u16,
        flags: u16,
        family: Family,
        fill: impl FnOnce(&mut Attrs<'_>),
    ) {
        let header = self.header(op, msg, flags, family);
        wire::put_message(&mut self.buf, header, fill);
    }

    fn op(&mut self, index: usize, op: &'a Op) -> Result<()> {
        use wire::*;
        match op {
            Op::AddTable { family, name } => {
                check_name("table name", name)?;
                // NLM_F_CREATE without NLM_F_EXCL: an existing table is fine
                // (`nft add table`).
                self.message(index, NFT_MSG_NEWTABLE, NLM_F_CREATE, *family, |a| {
                    a.str(NFTA_TABLE_NAME, name);
                    a.u32_be(NFTA_TABLE_FLAGS, 0);
                });
            }
            Op::DeleteTable { family, name } | Op::DestroyTable { family, name } => {
                check_name("table name", name)?;
                let msg = if matches!(op, Op::DeleteTable { .. }) {
                    NFT_MSG_DELTABLE
                } else {
                    NFT_MSG_DESTROYTABLE
                };
                self.message(index, msg, 0, *family, |a| a.str(NFTA_TABLE_NAME, name));
                self.sets.retain(|(f, t, _), _| !(f == family && t == name));
            }
            Op::FlushTable { family, name } => {
                check_name("table name", name)?;
                // What `nft flush table` sends: delete the rules of every
                // chain of the table.
                self.message(index, NFT_MSG_DELRULE, 0, *family, |a| {
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
                self.message(index, NFT_MSG_NEWCHAIN, NLM_F_CREATE, *family, |a| {
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
            Op::DeleteChain {
                family,
                table,
                chain,
            }
            | Op::DestroyChain {
                family,
                table,
                chain,
            } => {
                check_name("table name", table)?;
                check_name("chain name", chain)?;
                let msg = if matches!(op, Op::DeleteChain { .. }) {
                    NFT_MSG_DELCHAIN
                } else {
                    NFT_MSG_DESTROYCHAIN
                };
                self.message(index, msg, 0, *family, |a| {
                    a.str(NFTA_CHAIN_TABLE, table);
                    a.str(NFTA_CHAIN_NAME, chain);
                });
            }
            Op::FlushChain {
                family,
                table,
                chain,
            } => {
                check_name("table name", table)?;
                check_name("chain name", chain)?;
                self.message(index, NFT_MSG_DELRULE, 0, *family, |a| {
                    a.str(NFTA_RULE_TABLE, table);
                    a.str(NFTA_RULE_CHAIN, chain);
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
                // Anonymous sets first, as nft sends them: the rule finds
                // each by its id in this transaction.
                let mut anon_refs = Vec::new();
                for anon in exprs.iter().filter_map(Expr::anonymous_set) {
                    let anon_ref = AnonRef::new(anon, self.next_set_id);
                    self.next_set_id += 1;
                    let spec = anon.spec();
                    // EXCL: a name clash must fail, not bind another set.
                    let flags = NLM_F_CREATE | NLM_F_EXCL;
                    self.message(index, NFT_MSG_NEWSET, flags, *family, |a| {
                        let name = &anon_ref.name;
                        set::encode_set(a, table, name, &spec, NFT_SET_ANONYMOUS, anon_ref.id);
                    });
                    // By id alone: the kernel looks a name up by walking
                    // every set of the table, an id in this transaction's
                    // newest entries.
                    self.elements(
                        index,
                        NFT_MSG_NEWSETELEM,
                        NLM_F_CREATE,
                        (*family, table, SetName::Id(anon_ref.id)),
                        &anon.elements,
                        SetElem::encoded_size_bound,
                        |elem, list| elem.encode(list),
                        false,
                    );
                    anon_refs.push(anon_ref);
                }
                let flags = NLM_F_CREATE | NLM_F_APPEND;
                self.message(index, NFT_MSG_NEWRULE, flags, *family, |a| {
                    a.str(NFTA_RULE_TABLE, table);
                    a.str(NFTA_RULE_CHAIN, chain);
                    let mut anon_refs = anon_refs.iter();
                    a.nested(NFTA_RULE_EXPRESSIONS, |list| {
                        for expr in exprs {
                            expr.encode(list, &mut anon_refs);
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
            }
            | Op::DestroyRule {
                family,
                table,
                chain,
                handle,
            } => {
                check_name("table name", table)?;
                check_name("chain name", chain)?;
                let msg = if matches!(op, Op::DeleteRule { .. }) {
                    NFT_MSG_DELRULE
                } else {
                    NFT_MSG_DESTROYRULE
                };
                self.message(index, msg, 0, *family, |a| {
                    a.str(NFTA_RULE_TABLE, table);
                    a.str(NFTA_RULE_CHAIN, chain);
                    a.u64_be(NFTA_RULE_HANDLE, *handle);
                });
            }
            Op::AddSet {
                family,
                table,
                name,
                spec,
            } => {
                check_name("table name", table)?;
                check_set_name(name)?;
                spec.check()?;
                // The kernel wants a transaction id for every new set.
                let id = self.next_set_id;
                self.next_set_id += 1;
                self.message(index, NFT_MSG_NEWSET, NLM_F_CREATE, *family, |a| {
                    set::encode_set(a, table, name, spec, 0, id);
                });
                self.sets.insert((*family, table, name), spec);
            }
            Op::DeleteSet {
                family,
                table,
                name,
            }
            | Op::DestroySet {
                family,
                table,
                name,
            }
            | Op::FlushSet {
                family,
                table,
                name,
            } => {
                check_name("table name", table)?;
                check_set_name(name)?;
                let msg = match op {
                    Op::DeleteSet { .. } => NFT_MSG_DELSET,
                    Op::DestroySet { .. } => NFT_MSG_DESTROYSET,
                    // A DELSETELEM without elements empties the set.
                    _ => NFT_MSG_DELSETELEM,
                };
                let (table_attr, name_attr) = if msg == NFT_MSG_DELSETELEM {
                    (NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET)
                } else {
                    (NFTA_SET_TABLE, NFTA_SET_NAME)
                };
                self.message(index, msg, 0, *family, |a| {
                    a.str(table_attr, table);
                    a.str(name_attr, name);
                });
                if msg != NFT_MSG_DELSETELEM {
                    self.sets.remove(&(*family, table.as_str(), name.as_str()));
                }
            }
            Op::AddElements {
                family,
                table,
                set,
                elements,
            } => {
                check_name("table name", table)?;
                check_set_name(set)?;
                let spec = self
                    .sets
                    .get(&(*family, table.as_str(), set.as_str()))
                    .copied();
                for (i, elem) in elements.iter().enumerate() {
                    elem.check(i)?;
                    if let Some(spec) = spec {
                        spec.check_element(i, elem)?;
                    }
                }
                self.elements(
                    index,
                    NFT_MSG_NEWSETELEM,
                    NLM_F_CREATE,
                    (*family, table, SetName::Name(set)),
                    elements,
                    SetElem::encoded_size_bound,
                    |elem, list| elem.encode(list),
                    true,
                );
            }
            Op::DeleteElements {
                family,
                table,
                set,
                keys,
            }
            | Op::DestroyElements {
                family,
                table,
                set,
                keys,
            } => {
                check_name("table name", table)?;
                check_set_name(set)?;
                let spec = self
                    .sets
                    .get(&(*family, table.as_str(), set.as_str()))
                    .copied();
                for (i, key) in keys.iter().enumerate() {
                    key.check(i)?;
                    if let Some(spec) = spec {
                        key.check_against(i, spec)?;
                    }
                }
                let msg = if matches!(op, Op::DeleteElements { .. }) {
                    NFT_MSG_DELSETELEM
                } else {
                    NFT_MSG_DESTROYSETELEM
                };
                self.elements(
                    index,
                    msg,
                    0,
                    (*family, table, SetName::Name(set)),
                    keys,
                    ElemKey::encoded_size_bound,
                    |key, list| key.encode(list),
                    true,
                );
            }
        }
        Ok(())
    }

    /// Element list messages: as many as needed to keep each list under
    /// 64 KiB. An empty list sends nothing (an empty DELSETELEM would
    /// flush the set).
    #[allow(clippy::too_many_arguments)]
    fn elements<T>(
        &mut self,
        op: usize,
        msg: u16,
        flags: u16,
        (family, table, set): (Family, &str, SetName<'_>),
        items: &[T],
        size: impl Fn(&T) -> usize,
        encode: impl Fn(&T, &mut Attrs<'_>),
        locate: bool,
    ) {
        use wire::*;
        let mut start = 0;
        while start < items.len() {
            let mut end = start;
            let mut budget = 0;
            while end < items.len()
                && (end == start || budget + size(&items[end]) <= ELEMENT_LIST_BUDGET)
            {
                budget += size(&items[end]);
                end += 1;
            }
            let msg_start = self.buf.len();
            let header = self.header(op, msg, flags, family);
            let mut starts = Vec::with_capacity(if locate { end - start } else { 0 });
            wire::put_message(&mut self.buf, header, |a| {
                a.str(NFTA_SET_ELEM_LIST_TABLE, table);
                match set {
                    SetName::Name(name) => a.str(NFTA_SET_ELEM_LIST_SET, name),
                    SetName::Id(id) => a.u32_be(NFTA_SET_ELEM_LIST_SET_ID, id),
                }
                a.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                    for item in &items[start..end] {
                        if locate {
                            starts.push((list.position() - msg_start) as u32);
                        }
                        encode(item, list);
                    }
                });
            });
            if locate && let Some(origin) = self.origins.last_mut() {
                origin.elements = Some((start, starts));
            }
            start = end;
        }
    }
}

/// How an element list names its set.
#[derive(Clone, Copy)]
enum SetName<'a> {
    Name(&'a str),
    /// A set created earlier in the same transaction.
    Id(u32),
}

/// NFNL_MSG_BATCH_BEGIN / _END: family AF_UNSPEC, resource id the subsystem.
pub(crate) fn put_delimiter(buf: &mut Vec<u8>, ty: u16, seq: u32) {
    let header = MsgHeader {
        ty,
        flags: wire::NLM_F_REQUEST,
        seq,
        family: 0,
        res_id: wire::NFNL_SUBSYS_NFTABLES,
    };
    wire::put_message(buf, header, |_| {});
}

pub(crate) fn check_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= wire::NFT_NAME_MAXLEN || name.contains('\0') {
        return Err(Error::invalid(
            field,
            name,
            format!("1 to {} bytes, no NUL", wire::NFT_NAME_MAXLEN - 1),
        ));
    }
    Ok(())
}

/// A set name: also no `%`, with which the kernel would number the name
/// (that is for anonymous sets).
fn check_set_name(name: &str) -> Result<()> {
    check_name("set name", name)?;
    if name.contains('%') {
        return Err(Error::invalid(
            "set name",
            name,
            "no % (the kernel would replace %d by a number)",
        ));
    }
    Ok(())
}

/// A rule comment as libnftnl stores it in NFTA_RULE_USERDATA: a TLV of
/// type NFTNL_UDATA_RULE_COMMENT holding the NUL-terminated string.
pub(crate) fn comment_userdata(comment: &str) -> Result<Vec<u8>> {
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
pub(crate) fn comment_of_userdata(mut userdata: &[u8]) -> Option<String> {
    while let [ty, len, rest @ ..] = userdata {
        let value = rest.get(..usize::from(*len))?;
        if *ty == wire::UDATA_RULE_COMMENT {
            return Some(wire::c_string(value));
        }
        userdata = &rest[usize::from(*len)..];
    }
    None
}
