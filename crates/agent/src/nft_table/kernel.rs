//! The edge to nftables for a table Trellis owns: reads it back ([`read`]) and applies units of
//! operations in bounded transactions ([`apply`]), setting aside a unit the kernel refuses
//! so that the rest still lands.

use super::units::{KernelChain, KernelSet, KernelTable, Scope, Unit};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use trellis_dataplane::Error;
use trellis_dataplane::nftables::{Batch, Nft, SetFlags};

/// At most this much weight (ops, elements counted one by one) per transaction: the
/// kernel holds the nf_tables commit lock for the whole of one, and a cold start at 50,000
/// services must not freeze every other nftables user (kubernetes issue 139328).
pub const MAX_TRANSACTION_WEIGHT: usize = 10_000;

/// Reads the scope's table: chains with their rules' comments, named sets with the
/// elements of those Trellis fills.
pub fn read(nft: &Nft, scope: Scope) -> Result<KernelTable, Error> {
    let (fam, name) = (scope.family, scope.table);
    if !nft.table_exists(fam, name)? {
        return Ok(KernelTable::default());
    }
    let mut table = KernelTable {
        exists: true,
        ..KernelTable::default()
    };
    // Chains and rules in one consistent pass, the chains listed once (the kernel's chain
    // listing is quadratic in their number).
    let (chains, rules) = nft.chains_and_rules(fam, name)?;
    for chain in chains {
        table.chains.insert(
            chain.name,
            KernelChain {
                base: chain.base,
                ..KernelChain::default()
            },
        );
    }
    for rule in rules {
        let counted = rule.counted();
        let chain = table.chains.entry(rule.chain).or_default();
        chain.comments.push(rule.comment);
        chain.counted.push(counted);
    }
    for set in nft.sets(fam, name)? {
        if set.anonymous {
            continue;
        }
        let elements = if set.spec.flags.contains(SetFlags::DYNAMIC) {
            BTreeMap::new()
        } else {
            nft.elements(fam, name, &set.name)?
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect()
        };
        table.sets.insert(
            set.name,
            KernelSet {
                spec: set.spec,
                elements,
            },
        );
    }
    Ok(table)
}

/// What became of applying units.
#[derive(Debug, Default)]
pub struct Applied {
    pub transactions: usize,
    pub ops: usize,
    /// Units the kernel refused, with why; the rest were applied.
    pub refused: Vec<(String, String)>,
    /// The longest single transaction, from encoding to the kernel's answer: an upper
    /// bound on how long it held the nf_tables commit lock.
    pub longest_transaction: Duration,
    /// The heaviest transaction sent ([`Unit::weight`] summed), at most
    /// [`MAX_TRANSACTION_WEIGHT`] unless one unit alone weighs more.
    pub heaviest_transaction: usize,
}

impl Applied {
    /// Logs each refused unit as a change of `table` (the next audit retries it); true when
    /// the kernel took everything.
    pub fn log_refused(&self, table: &str) -> bool {
        for (what, why) in &self.refused {
            tracing::warn!(
                what,
                "the kernel refused a {table} change (retried by the next audit): {why}"
            );
        }
        self.refused.is_empty()
    }
}

/// Applies `units` in order, packed into transactions of at most
/// [`MAX_TRANSACTION_WEIGHT`]. When the kernel refuses a transaction, the unit holding the
/// refused op is set aside and the transaction retried without it, so one bad element
/// never holds up the others.
pub fn apply(nft: &Nft, units: Vec<Unit>) -> Applied {
    let mut applied = Applied::default();
    let mut pending = units.into_iter().peekable();
    while pending.peek().is_some() {
        let mut group: Vec<Unit> = Vec::new();
        let mut weight = 0;
        while let Some(next) = pending.peek() {
            let w = next.weight();
            if !group.is_empty() && weight + w > MAX_TRANSACTION_WEIGHT {
                break;
            }
            weight += w;
            group.push(pending.next().expect("peeked"));
        }
        while !group.is_empty() {
            let mut batch = Batch::new();
            let mut owner = Vec::new();
            for (i, unit) in group.iter().enumerate() {
                for op in &unit.ops {
                    batch.push(op.clone());
                    owner.push(i);
                }
            }
            let sent = Instant::now();
            let result = nft.apply_detailed(&batch);
            applied.longest_transaction = applied.longest_transaction.max(sent.elapsed());
            applied.heaviest_transaction = applied.heaviest_transaction.max(batch.weight());
            match result {
                Ok(()) => {
                    applied.transactions += 1;
                    applied.ops += batch.len();
                    break;
                }
                Err(refused) => {
                    let culprit = refused.op.and_then(|op| owner.get(op).copied());
                    match culprit {
                        Some(i) => {
                            let unit = group.remove(i);
                            applied.refused.push((unit.what, refused.error.to_string()));
                        }
                        None => {
                            // The kernel did not say which: give up on the whole group
                            // rather than guess; the next audit retries it.
                            let why = refused.error.to_string();
                            for unit in group.drain(..) {
                                applied.refused.push((unit.what, why.clone()));
                            }
                        }
                    }
                }
            }
        }
    }
    applied
}
