//! What to change in the kernel, as units of nftables operations, and the audit that
//! compares a whole desired table with what the kernel holds ([`repair`]).
//!
//! A unit is what must land in one transaction (a chain's flush and its new rules; an
//! element's delete and re-add with a new value), so that a packet never sees a chain half
//! written. Units are ordered so each transaction is valid on its own: new sets and chains
//! first, then rules (chains jumped to before the chains that jump: [`Scope::depth`]), then
//! elements, then chains and sets nothing refers to any more.

use super::rendered::{RenderedChain, RenderedRule, RenderedSet, RenderedTable};
use std::collections::BTreeMap;
use trellis_dataplane::nftables::{BaseChain, ElemKey, ElemValue, Family, Op, SetElem, SetSpec};

/// The table units are for, and how its chains nest.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    pub family: Family,
    pub table: &'static str,
    /// How far a chain sits from the chains nothing else jumps to: 0 for those, at most
    /// [`MAX_DEPTH`] for base chains. Rules are written deepest-referred first.
    pub depth: fn(&str) -> u8,
}

/// The deepest a [`Scope::depth`] may say.
pub const MAX_DEPTH: u8 = 3;

/// Operations that go into one transaction, with what they do for reports.
#[derive(Clone, Debug)]
pub struct Unit {
    pub what: String,
    pub ops: Vec<Op>,
    /// Ordering phase: lower goes first.
    phase: u8,
}

impl Unit {
    pub fn weight(&self) -> usize {
        self.ops.iter().map(Op::weight).sum()
    }
}

const PHASE_TABLE: u8 = 0;
/// Sets and empty chains: nothing refers to them yet.
const PHASE_CREATE: u8 = 1;
/// Rules, the referred-to chains' first ([`Scope::depth`]).
const PHASE_RULES: u8 = 2;
const PHASE_ELEMENTS: u8 = PHASE_RULES + MAX_DEPTH + 1;
/// Chains nothing refers to any more, referrers first.
const PHASE_DESTROY_CHAINS: u8 = PHASE_ELEMENTS + 1;
const PHASE_DESTROY_SETS: u8 = PHASE_DESTROY_CHAINS + MAX_DEPTH + 1;

/// Elements go in units of at most this many, so that a big change is spread over
/// transactions that each hold the kernel's lock briefly.
const ELEMENTS_PER_UNIT: usize = 2000;

/// One element whose effective value changes.
pub struct ElementChange {
    pub key: Vec<u8>,
    pub was: Option<Option<ElemValue>>,
    pub now: Option<Option<ElemValue>>,
}

pub fn element_units(scope: Scope, set: &str, changes: Vec<ElementChange>) -> Vec<Unit> {
    let mut units = Vec::new();
    let mut changes = changes.into_iter().peekable();
    // Keys and values are moved into the operations, not copied: a full sync holds the
    // whole table once, not twice.
    while changes.peek().is_some() {
        let mut deletes: Vec<ElemKey> = Vec::new();
        let mut adds: Vec<SetElem> = Vec::new();
        let mut count = 0;
        for change in changes.by_ref().take(ELEMENTS_PER_UNIT) {
            count += 1;
            match (change.was.is_some(), change.now) {
                (true, Some(value)) => {
                    deletes.push(ElemKey::from(change.key.clone()));
                    adds.push(element(change.key, value));
                }
                (true, None) => deletes.push(ElemKey::from(change.key)),
                (false, Some(value)) => adds.push(element(change.key, value)),
                (false, None) => {}
            }
        }
        let mut ops = Vec::new();
        if !deletes.is_empty() {
            ops.push(Op::DestroyElements {
                family: scope.family,
                table: scope.table.into(),
                set: set.into(),
                keys: deletes,
            });
        }
        if !adds.is_empty() {
            ops.push(Op::AddElements {
                family: scope.family,
                table: scope.table.into(),
                set: set.into(),
                elements: adds,
            });
        }
        units.push(Unit {
            what: format!("{count} element(s) of {set}"),
            ops,
            phase: PHASE_ELEMENTS,
        });
    }
    units
}

fn element(key: Vec<u8>, value: Option<ElemValue>) -> SetElem {
    SetElem {
        key,
        key_end: None,
        value,
        timeout: None,
    }
}

/// A new set, empty: its elements may lead to chains that do not exist yet, so they come
/// with the other elements.
pub fn add_set_units(scope: Scope, name: &str, set: RenderedSet) -> Vec<Unit> {
    let dynamic = set.is_dynamic();
    let mut units = vec![Unit {
        what: format!("add set {name}"),
        ops: vec![Op::AddSet {
            family: scope.family,
            table: scope.table.into(),
            name: name.into(),
            spec: set.spec,
        }],
        phase: PHASE_CREATE,
    }];
    if !dynamic {
        let changes = set
            .elements
            .into_iter()
            .map(|(key, value)| ElementChange {
                key,
                was: None,
                now: Some(value),
            })
            .collect();
        units.extend(element_units(scope, name, changes));
    }
    units
}

pub fn destroy_set_unit(scope: Scope, name: &str) -> Unit {
    Unit {
        what: format!("remove set {name}"),
        ops: vec![Op::DestroySet {
            family: scope.family,
            table: scope.table.into(),
            name: name.into(),
        }],
        phase: PHASE_DESTROY_SETS,
    }
}

fn add_rules(scope: Scope, chain: &str, rules: &[RenderedRule], ops: &mut Vec<Op>) {
    for rule in rules {
        ops.push(Op::AddRule {
            family: scope.family,
            table: scope.table.into(),
            chain: chain.into(),
            exprs: rule.exprs.clone(),
            comment: Some(rule.comment.clone()),
        });
    }
}

/// A new chain: created empty first, its rules added once what they refer to exists.
pub fn add_chain_units(scope: Scope, name: &str, chain: &RenderedChain) -> [Unit; 2] {
    let create = Unit {
        what: format!("add chain {name}"),
        ops: vec![Op::AddChain {
            family: scope.family,
            table: scope.table.into(),
            chain: name.into(),
            base: chain.base,
        }],
        phase: PHASE_CREATE,
    };
    let mut ops = Vec::new();
    add_rules(scope, name, &chain.rules, &mut ops);
    let rules = Unit {
        what: format!("fill chain {name}"),
        ops,
        phase: PHASE_RULES + (scope.depth)(name).min(MAX_DEPTH),
    };
    [create, rules]
}

/// A chain created if missing, then its rules written whole (it may be there already,
/// left over from an earlier run).
pub fn ensure_chain_units(scope: Scope, name: &str, chain: &RenderedChain) -> [Unit; 2] {
    let [create, _] = add_chain_units(scope, name, chain);
    [create, rewrite_chain_unit(scope, name, &chain.rules)]
}

pub fn rewrite_chain_unit(scope: Scope, name: &str, rules: &[RenderedRule]) -> Unit {
    let mut ops = vec![Op::FlushChain {
        family: scope.family,
        table: scope.table.into(),
        chain: name.into(),
    }];
    add_rules(scope, name, rules, &mut ops);
    Unit {
        what: format!("rewrite chain {name}"),
        ops,
        phase: PHASE_RULES + (scope.depth)(name).min(MAX_DEPTH),
    }
}

pub fn rebase_chain_unit(scope: Scope, name: &str, chain: &RenderedChain) -> Unit {
    let mut ops = vec![Op::DestroyChain {
        family: scope.family,
        table: scope.table.into(),
        chain: name.into(),
    }];
    for unit in add_chain_units(scope, name, chain) {
        ops.extend(unit.ops);
    }
    Unit {
        what: format!("re-hook chain {name}"),
        ops,
        phase: PHASE_RULES + (scope.depth)(name).min(MAX_DEPTH),
    }
}

pub fn destroy_chain_unit(scope: Scope, name: &str) -> Unit {
    Unit {
        what: format!("remove chain {name}"),
        ops: vec![Op::DestroyChain {
            family: scope.family,
            table: scope.table.into(),
            chain: name.into(),
        }],
        // Referrers before the referred: a chain can only go once nothing jumps to it.
        phase: PHASE_DESTROY_CHAINS + (MAX_DEPTH - (scope.depth)(name).min(MAX_DEPTH)),
    }
}

/// Orders units so that each transaction is valid when applied in turn.
pub fn ordered(mut units: Vec<Unit>) -> Vec<Unit> {
    units.sort_by_key(|u| u.phase);
    units
}

/// What the kernel holds of the proxy's table in one family, as the audit reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTable {
    pub exists: bool,
    pub chains: BTreeMap<String, KernelChain>,
    /// Named sets; elements are read only for sets the proxy fills.
    pub sets: BTreeMap<String, KernelSet>,
}

impl KernelTable {
    /// What the kernel holds once it holds `table` exactly: what the event path diffs a new
    /// plan against, without reading the kernel back.
    pub fn holding(table: &RenderedTable) -> KernelTable {
        let chains = (table.chains.iter())
            .map(|(name, c)| {
                let chain = KernelChain {
                    base: c.base,
                    comments: c.rules.iter().map(|r| Some(r.comment.clone())).collect(),
                    counted: Vec::new(),
                };
                (name.clone(), chain)
            })
            .collect();
        let sets = (table.sets.iter())
            .map(|(name, s)| {
                let set = KernelSet {
                    spec: s.spec.clone(),
                    elements: s.elements.clone(),
                };
                (name.clone(), set)
            })
            .collect();
        KernelTable {
            exists: true,
            chains,
            sets,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelChain {
    pub base: Option<BaseChain>,
    /// The comments of its rules, in order (`None`: a rule without one).
    pub comments: Vec<Option<String>>,
    /// What each rule's counter has counted, in order (`None`: a rule without one).
    pub counted: Vec<Option<(u64, u64)>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct KernelSet {
    pub spec: SetSpec,
    pub elements: BTreeMap<Vec<u8>, Option<ElemValue>>,
}

/// The differences the audit found, by kind, for metrics and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    pub missing_table: bool,
    pub chains_missing: usize,
    pub chains_rewritten: usize,
    pub chains_extra: usize,
    pub sets_missing: usize,
    pub sets_extra: usize,
    pub sets_incompatible: usize,
    pub elements_missing: usize,
    pub elements_wrong: usize,
    pub elements_extra: usize,
}

impl Drift {
    pub fn total(&self) -> usize {
        usize::from(self.missing_table)
            + self.chains_missing
            + self.chains_rewritten
            + self.chains_extra
            + self.sets_missing
            + self.sets_extra
            + self.sets_incompatible
            + self.elements_missing
            + self.elements_wrong
            + self.elements_extra
    }
}

/// Whether two set layouts are the same for our purposes (the kernel may add a size).
fn same_layout(a: &SetSpec, b: &SetSpec) -> bool {
    a.key == b.key && a.data == b.data && a.flags == b.flags && a.timeout == b.timeout
}

/// The units that make the kernel's table what `desired` says, and what differed.
pub fn repair(scope: Scope, desired: RenderedTable, kernel: &KernelTable) -> (Vec<Unit>, Drift) {
    let mut drift = Drift::default();
    let mut units = Vec::new();
    let incompatible = desired.sets.iter().any(|(name, set)| {
        kernel
            .sets
            .get(name)
            .is_some_and(|k| !same_layout(&k.spec, &set.spec))
    });
    let kernel = if !kernel.exists || incompatible {
        if incompatible {
            // A set's key or flags changed (a new version's layout, or tampering): sets
            // cannot be altered in place, and rules refer to them, so the table is rebuilt
            // in one transaction.
            drift.sets_incompatible += 1;
            units.push(Unit {
                what: format!("rebuild table {} {}", scope.family.name(), scope.table),
                ops: vec![Op::DestroyTable {
                    family: scope.family,
                    name: scope.table.into(),
                }],
                phase: PHASE_TABLE,
            });
        } else {
            drift.missing_table = true;
        }
        units.push(Unit {
            what: format!("add table {} {}", scope.family.name(), scope.table),
            ops: vec![Op::AddTable {
                family: scope.family,
                name: scope.table.into(),
            }],
            phase: PHASE_TABLE,
        });
        &KernelTable::default()
    } else {
        kernel
    };

    for name in kernel.sets.keys() {
        if !desired.sets.contains_key(name) {
            drift.sets_extra += 1;
            units.push(destroy_set_unit(scope, name));
        }
    }
    for (name, set) in desired.sets {
        match kernel.sets.get(&name) {
            None => {
                drift.sets_missing += 1;
                drift.elements_missing += set.elements.len();
                units.extend(add_set_units(scope, &name, set));
            }
            Some(_) if set.is_dynamic() => {}
            Some(have) => {
                let mut changes = Vec::new();
                for (key, value) in &have.elements {
                    if !set.elements.contains_key(key) {
                        drift.elements_extra += 1;
                        changes.push(ElementChange {
                            key: key.clone(),
                            was: Some(value.clone()),
                            now: None,
                        });
                    }
                }
                for (key, value) in set.elements {
                    match have.elements.get(&key) {
                        None => {
                            drift.elements_missing += 1;
                            changes.push(ElementChange {
                                key,
                                was: None,
                                now: Some(value),
                            });
                        }
                        Some(v) if *v != value => {
                            drift.elements_wrong += 1;
                            changes.push(ElementChange {
                                key,
                                was: Some(v.clone()),
                                now: Some(value),
                            });
                        }
                        Some(_) => {}
                    }
                }
                units.extend(element_units(scope, &name, changes));
            }
        }
    }
    for (name, chain) in &desired.chains {
        match kernel.chains.get(name) {
            None => {
                drift.chains_missing += 1;
                units.extend(add_chain_units(scope, name, chain));
            }
            Some(have) if have.base != chain.base => {
                drift.chains_rewritten += 1;
                units.push(rebase_chain_unit(scope, name, chain));
            }
            Some(have) => {
                let same = have.comments.len() == chain.rules.len()
                    && have
                        .comments
                        .iter()
                        .zip(&chain.rules)
                        .all(|(c, r)| c.as_deref() == Some(r.comment.as_str()));
                if !same {
                    drift.chains_rewritten += 1;
                    units.push(rewrite_chain_unit(scope, name, &chain.rules));
                }
            }
        }
    }
    for name in kernel.chains.keys() {
        if !desired.chains.contains_key(name) {
            drift.chains_extra += 1;
            units.push(destroy_chain_unit(scope, name));
        }
    }
    (ordered(units), drift)
}
