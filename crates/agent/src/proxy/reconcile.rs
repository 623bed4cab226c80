//! What to change in the kernel, as units of nftables operations: the event path (one
//! service port's rules replaced: [`Desired::set_port`], O(what changed)) and the audit
//! (the whole desired table against what the kernel holds: [`repair`]). Pure: the
//! operations are applied by [`super::kernel`].
//!
//! A unit is what must land in one transaction (a chain's flush and its new rules; an
//! element's delete and re-add with a new value), so that a packet never sees a chain half
//! written. Units are ordered so each transaction is valid on its own: new sets and chains
//! first, then rules, then elements, then chains and sets nothing refers to any more.

use super::render::{
    RenderedChain, RenderedRule, RenderedSet, RenderedTable, TABLE, merge, nft_family,
    render_chain, render_fixed, render_port,
};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use trellis_dataplane::nftables::{BaseChain, ElemKey, ElemValue, Family, Op, SetElem, SetSpec};
use trellis_proxy::Protocol;
use trellis_proxy::shape::Shape;
use trellis_proxy::{IpFamily, ServicePortName, ServiceRules, Table};

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
/// Rules, the referred-to chains' first (see [`rank`]): endpoint chains, then service
/// chains, then external ones, then the table's own.
const PHASE_RULES: u8 = 2;
const PHASE_ELEMENTS: u8 = 6;
/// Chains nothing refers to any more, referrers first.
const PHASE_DESTROY_CHAINS: u8 = 7;
const PHASE_DESTROY_SETS: u8 = 11;

/// How deep a chain sits in the chain of jumps: element maps and base chains lead to
/// external and firewall chains, which lead to service chains, which lead to endpoint
/// chains. 0 for endpoint chains, 3 for the table's own.
fn rank(chain: &str) -> u8 {
    if chain.starts_with("endpoint-") {
        0
    } else if chain.starts_with("service-")
        || chain.starts_with("local-")
        || chain.starts_with("shape-")
    {
        1
    } else if chain.starts_with("external-") || chain.starts_with("firewall-") {
        2
    } else {
        3
    }
}

/// Elements go in units of at most this many, so that a big change is spread over
/// transactions that each hold the kernel's lock briefly.
const ELEMENTS_PER_UNIT: usize = 2000;

/// An element of a fixed set: the set's name and the key's bytes.
type ElementKey = (&'static str, Vec<u8>);
/// The ports that want an element, with the value each wants.
/// Kept sorted by name; nearly always one entry, so a vector (a map would allocate a
/// whole tree node per element: most of the memory at 100,000 endpoints).
type Claimants = Vec<(Arc<ServicePortName>, Option<ElemValue>)>;

/// The proxy's desired table in one family, kept per service port.
pub struct Desired {
    family: IpFamily,
    nft: Family,
    cluster_cidrs: Vec<IpNet>,
    fixed: RenderedTable,
    ports: BTreeMap<ServicePortName, ServiceRules>,
    /// Who claims each element of a fixed set: the first claimant by port name wins.
    claims: HashMap<ElementKey, Claimants>,
    /// Shape chains programmed, with how many ports lead to each. One nobody uses stays
    /// until the next full audit ([`Desired::prune_shapes`]): endpoint counts that come
    /// and go then reuse it rather than creating it again.
    shapes: BTreeMap<String, (RenderedChain, usize)>,
}

impl Desired {
    /// The table with the node's own part and no services: `node` is a planned table
    /// whose services are ignored.
    pub fn new(node: &Table) -> Desired {
        let mut empty = node.clone();
        empty.services.clear();
        Desired {
            family: node.family,
            nft: nft_family(node.family),
            cluster_cidrs: node.cluster_cidrs.clone(),
            fixed: render_fixed(&empty),
            ports: BTreeMap::new(),
            claims: HashMap::new(),
            shapes: BTreeMap::new(),
        }
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// Replaces one port's rules (`None`: the port is gone) and returns the units that
    /// take the kernel from the old rules to the new.
    pub fn set_port(&mut self, name: &ServicePortName, rules: Option<ServiceRules>) -> Vec<Unit> {
        let rules = rules.filter(|r| !r.is_empty());
        let old = self.ports.get(name);
        if old == rules.as_ref() {
            return Vec::new();
        }
        let before = old
            .map(|r| render_port(self.family, &self.cluster_cidrs, r))
            .unwrap_or_default();
        let after = rules
            .as_ref()
            .map(|r| render_port(self.family, &self.cluster_cidrs, r))
            .unwrap_or_default();
        let mut units = Vec::new();
        let nft = self.nft;

        // Sets of the port (affinity).
        for (set, spec) in &after.sets {
            if !before.sets.contains_key(set) {
                units.extend(add_set_units(nft, set, spec.clone()));
            }
        }
        for set in before.sets.keys() {
            if !after.sets.contains_key(set) {
                units.push(destroy_set_unit(nft, set));
            }
        }
        // Shape chains: shared, created when first wanted.
        for name in before.shapes.keys() {
            if let Some((_, users)) = self.shapes.get_mut(name) {
                *users = users.saturating_sub(1);
            }
        }
        for (name, body) in &after.shapes {
            match self.shapes.get_mut(name) {
                Some((_, users)) => *users += 1,
                None => {
                    self.shapes.insert(name.clone(), (body.clone(), 1));
                    units.extend(add_shape_units(nft, name, body));
                }
            }
        }
        // Chains.
        for (chain, body) in &after.chains {
            match before.chains.get(chain) {
                None => units.extend(add_chain_units(nft, chain, body)),
                Some(old) if old.rules != body.rules => {
                    units.push(rewrite_chain_unit(nft, chain, &body.rules))
                }
                Some(_) => {}
            }
        }
        for chain in before.chains.keys() {
            if !after.chains.contains_key(chain) {
                units.push(destroy_chain_unit(nft, chain));
            }
        }
        // Elements, as the merged view sees them.
        let mut touched: BTreeSet<ElementKey> = BTreeSet::new();
        for (set, elements) in before.elements.iter().chain(&after.elements) {
            for key in elements.keys() {
                touched.insert((set, key.clone()));
            }
        }
        let mut changes: BTreeMap<&'static str, Vec<ElementChange>> = BTreeMap::new();
        let shared_name = Arc::new(name.clone());
        for (set, key) in touched {
            let claim_key = (set, key.clone());
            let was = self.effective(&claim_key);
            let claimants = self.claims.entry(claim_key.clone()).or_default();
            claimants.retain(|(n, _)| **n != *name);
            if let Some(value) = after.elements.get(set).and_then(|e| e.get(&key)) {
                let at = claimants.partition_point(|(n, _)| **n < *name);
                claimants.insert(at, (shared_name.clone(), value.clone()));
            }
            if claimants.is_empty() {
                self.claims.remove(&claim_key);
            }
            let now = self.effective(&claim_key);
            if was != now {
                changes
                    .entry(set)
                    .or_default()
                    .push(ElementChange { key, was, now });
            }
        }
        // A port's own elements: compared directly.
        let mut own: BTreeSet<ElementKey> = BTreeSet::new();
        for (set, elements) in before.exclusive.iter().chain(&after.exclusive) {
            for key in elements.keys() {
                own.insert((set, key.clone()));
            }
        }
        for (set, key) in own {
            let value = |r: &super::render::RenderedPort| {
                r.exclusive.get(set).and_then(|e| e.get(&key)).cloned()
            };
            let (was, now) = (value(&before), value(&after));
            if was != now {
                changes
                    .entry(set)
                    .or_default()
                    .push(ElementChange { key, was, now });
            }
        }
        for (set, list) in changes {
            units.extend(element_units(nft, set, list));
        }

        match rules {
            Some(rules) => self.ports.insert(name.clone(), rules),
            None => self.ports.remove(name),
        };
        units
    }

    fn effective(&self, key: &ElementKey) -> Option<Option<ElemValue>> {
        self.claims.get(key)?.first().map(|(_, v)| v.clone())
    }

    /// Forgets the shape chains no port leads to, so that the audit that follows removes
    /// them, and adds those one endpoint away from the ones in use, so that it creates
    /// them: the next endpoint event then finds its shape ready and changes map elements
    /// only (creating a chain costs the kernel a walk of the endpoint map it binds, and a
    /// validation of the table).
    pub fn prune_shapes(&mut self) {
        self.shapes.retain(|_, (_, users)| *users > 0);
        let spares: Vec<Shape> = self
            .shapes
            .keys()
            .filter_map(|name| Shape::parse(name))
            .flat_map(|shape| shape.neighbours())
            .collect();
        let from_cluster = !self.cluster_cidrs.is_empty();
        for shape in spares {
            self.shapes.entry(shape.name()).or_insert_with(|| {
                let body = shape.rules(from_cluster);
                (
                    render_chain(self.family, Protocol::Tcp, &self.cluster_cidrs, &body),
                    0,
                )
            });
        }
    }

    /// The whole table as it should be, for the audit.
    pub fn rendered(&self) -> RenderedTable {
        let mut out = self.fixed.clone();
        for (name, (chain, _)) in &self.shapes {
            out.chains.insert(name.clone(), chain.clone());
        }
        for rules in self.ports.values() {
            merge(
                &mut out,
                render_port(self.family, &self.cluster_cidrs, rules),
            );
        }
        out
    }

    /// The planned table (for judging conntrack entries).
    pub fn table(&self, node: &trellis_proxy::NodeView) -> Table {
        let mut table = trellis_proxy::plan::node_table(self.family, node);
        table.services = self.ports.clone();
        table
    }

    /// Every port currently desired.
    pub fn ports(&self) -> impl Iterator<Item = &ServicePortName> {
        self.ports.keys()
    }
}

/// One element whose effective value changes.
struct ElementChange {
    key: Vec<u8>,
    was: Option<Option<ElemValue>>,
    now: Option<Option<ElemValue>>,
}

fn element_units(nft: Family, set: &str, changes: Vec<ElementChange>) -> Vec<Unit> {
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
                family: nft,
                table: TABLE.into(),
                set: set.into(),
                keys: deletes,
            });
        }
        if !adds.is_empty() {
            ops.push(Op::AddElements {
                family: nft,
                table: TABLE.into(),
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
fn add_set_units(nft: Family, name: &str, set: RenderedSet) -> Vec<Unit> {
    let dynamic = set.is_dynamic();
    let mut units = vec![Unit {
        what: format!("add set {name}"),
        ops: vec![Op::AddSet {
            family: nft,
            table: TABLE.into(),
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
        units.extend(element_units(nft, name, changes));
    }
    units
}

fn destroy_set_unit(nft: Family, name: &str) -> Unit {
    Unit {
        what: format!("remove set {name}"),
        ops: vec![Op::DestroySet {
            family: nft,
            table: TABLE.into(),
            name: name.into(),
        }],
        phase: PHASE_DESTROY_SETS,
    }
}

fn add_rules(nft: Family, chain: &str, rules: &[RenderedRule], ops: &mut Vec<Op>) {
    for rule in rules {
        ops.push(Op::AddRule {
            family: nft,
            table: TABLE.into(),
            chain: chain.into(),
            exprs: rule.exprs.clone(),
            comment: Some(rule.comment.clone()),
        });
    }
}

/// A new chain: created empty first, its rules added once what they refer to exists.
fn add_chain_units(nft: Family, name: &str, chain: &RenderedChain) -> [Unit; 2] {
    let create = Unit {
        what: format!("add chain {name}"),
        ops: vec![Op::AddChain {
            family: nft,
            table: TABLE.into(),
            chain: name.into(),
            base: chain.base,
        }],
        phase: PHASE_CREATE,
    };
    let mut ops = Vec::new();
    add_rules(nft, name, &chain.rules, &mut ops);
    let rules = Unit {
        what: format!("fill chain {name}"),
        ops,
        phase: PHASE_RULES + rank(name),
    };
    [create, rules]
}

/// A shape chain: created if missing, then its rules written whole (it may be there
/// already, left over from an earlier run and not yet pruned).
fn add_shape_units(nft: Family, name: &str, chain: &RenderedChain) -> [Unit; 2] {
    let [create, _] = add_chain_units(nft, name, chain);
    [create, rewrite_chain_unit(nft, name, &chain.rules)]
}

fn rewrite_chain_unit(nft: Family, name: &str, rules: &[RenderedRule]) -> Unit {
    let mut ops = vec![Op::FlushChain {
        family: nft,
        table: TABLE.into(),
        chain: name.into(),
    }];
    add_rules(nft, name, rules, &mut ops);
    Unit {
        what: format!("rewrite chain {name}"),
        ops,
        phase: PHASE_RULES + rank(name),
    }
}

fn rebase_chain_unit(nft: Family, name: &str, chain: &RenderedChain) -> Unit {
    let mut ops = vec![Op::DestroyChain {
        family: nft,
        table: TABLE.into(),
        chain: name.into(),
    }];
    for unit in add_chain_units(nft, name, chain) {
        ops.extend(unit.ops);
    }
    Unit {
        what: format!("re-hook chain {name}"),
        ops,
        phase: PHASE_RULES + rank(name),
    }
}

fn destroy_chain_unit(nft: Family, name: &str) -> Unit {
    Unit {
        what: format!("remove chain {name}"),
        ops: vec![Op::DestroyChain {
            family: nft,
            table: TABLE.into(),
            chain: name.into(),
        }],
        // Referrers before the referred: a chain can only go once nothing jumps to it.
        phase: PHASE_DESTROY_CHAINS + (3 - rank(name)),
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

#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelChain {
    pub base: Option<BaseChain>,
    /// The comments of its rules, in order (`None`: a rule without one).
    pub comments: Vec<Option<String>>,
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
pub fn repair(
    family: IpFamily,
    desired: RenderedTable,
    kernel: &KernelTable,
) -> (Vec<Unit>, Drift) {
    let nft = nft_family(family);
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
                what: format!("rebuild table {} {TABLE}", nft.name()),
                ops: vec![Op::DestroyTable {
                    family: nft,
                    name: TABLE.into(),
                }],
                phase: PHASE_TABLE,
            });
        } else {
            drift.missing_table = true;
        }
        units.push(Unit {
            what: format!("add table {} {TABLE}", nft.name()),
            ops: vec![Op::AddTable {
                family: nft,
                name: TABLE.into(),
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
            units.push(destroy_set_unit(nft, name));
        }
    }
    for (name, set) in desired.sets {
        match kernel.sets.get(&name) {
            None => {
                drift.sets_missing += 1;
                drift.elements_missing += set.elements.len();
                units.extend(add_set_units(nft, &name, set));
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
                units.extend(element_units(nft, &name, changes));
            }
        }
    }
    for (name, chain) in &desired.chains {
        match kernel.chains.get(name) {
            None => {
                drift.chains_missing += 1;
                units.extend(add_chain_units(nft, name, chain));
            }
            Some(have) if have.base != chain.base => {
                drift.chains_rewritten += 1;
                units.push(rebase_chain_unit(nft, name, chain));
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
                    units.push(rewrite_chain_unit(nft, name, &chain.rules));
                }
            }
        }
    }
    for name in kernel.chains.keys() {
        if !desired.chains.contains_key(name) {
            drift.chains_extra += 1;
            units.push(destroy_chain_unit(nft, name));
        }
    }
    (ordered(units), drift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_dataplane::nftables::Verdict;
    use trellis_proxy::{Endpoint, NodeView, Protocol, ServicePort, plan};

    fn node() -> NodeView {
        NodeView {
            name: "a".into(),
            node_port_addresses: vec!["172.20.0.1".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        }
    }

    fn port(name: &str, cluster_ip: &str) -> ServicePort {
        ServicePort::cluster_ip(
            ServicePortName {
                namespace: "ns".into(),
                name: name.into(),
                port: "p".into(),
                protocol: Protocol::Tcp,
            },
            cluster_ip.parse().unwrap(),
            80,
        )
    }

    fn rules(port: &ServicePort, endpoints: &[&str]) -> ServiceRules {
        let endpoints: Vec<Endpoint> = endpoints
            .iter()
            .map(|a| Endpoint::ready(a.parse().unwrap(), 8080, "b"))
            .collect();
        plan::plan_port(port, &endpoints, &node(), IpFamily::V4)
    }

    fn desired() -> Desired {
        Desired::new(&plan::node_table(IpFamily::V4, &node()))
    }

    fn describe(units: &[Unit]) -> Vec<String> {
        ordered(units.to_vec())
            .iter()
            .map(|u| u.what.clone())
            .collect()
    }

    #[test]
    fn a_new_port_creates_its_shape_before_the_elements_that_lead_to_it() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        let units = d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        assert_eq!(
            describe(&units),
            [
                "add chain shape-clusterip-cluster-1",
                "rewrite chain shape-clusterip-cluster-1",
                "1 element(s) of cluster-endpoints",
                "1 element(s) of cluster-ips",
                "1 element(s) of service-ips",
            ]
        );
        assert!(
            d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])))
                .is_empty(),
            "the same rules again change nothing"
        );
        let api = port("api", "10.96.0.11");
        assert_eq!(
            describe(&d.set_port(&api.name, Some(rules(&api, &["10.244.1.6"])))),
            [
                "1 element(s) of cluster-endpoints",
                "1 element(s) of cluster-ips",
                "1 element(s) of service-ips",
            ],
            "a second port of the same shape shares its chain"
        );
    }

    #[test]
    fn an_endpoint_change_changes_elements_and_no_rule() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        let units = d.set_port(&web.name, Some(rules(&web, &["10.244.1.5", "10.244.1.6"])));
        assert_eq!(
            describe(&units),
            [
                "add chain shape-clusterip-cluster-2",
                "rewrite chain shape-clusterip-cluster-2",
                "1 element(s) of cluster-endpoints",
                "1 element(s) of service-ips",
            ],
            "a new endpoint count is a shape met for the first time"
        );
        let units = d.set_port(&web.name, Some(rules(&web, &["10.244.1.6", "10.244.1.7"])));
        assert_eq!(
            describe(&units),
            ["2 element(s) of cluster-endpoints"],
            "an endpoint replaced: the endpoint map only"
        );
        let units = d.set_port(&web.name, Some(rules(&web, &["10.244.1.6"])));
        assert_eq!(
            describe(&units),
            [
                "1 element(s) of cluster-endpoints",
                "1 element(s) of service-ips"
            ],
            "the shape of one endpoint is still there: no chain is touched"
        );
        d.set_port(
            &web.name,
            Some(rules(&web, &["10.244.1.6", "10.244.1.7", "10.244.1.8"])),
        );
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.6"])));
        d.prune_shapes();
        let chains = d.rendered().chains;
        assert!(
            !chains.contains_key("shape-clusterip-cluster-3"),
            "a shape no port uses goes at the next full audit"
        );
        assert!(
            chains.contains_key("shape-clusterip-cluster-2"),
            "but one endpoint away from a shape in use, it stays ready"
        );
        let units = d.set_port(&web.name, Some(rules(&web, &["10.244.1.6", "10.244.1.7"])));
        assert_eq!(
            describe(&units),
            [
                "1 element(s) of cluster-endpoints",
                "1 element(s) of service-ips"
            ],
        );
    }

    #[test]
    fn a_port_with_no_endpoints_left_swaps_its_map_entry_for_a_reject() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        let units = d.set_port(&web.name, Some(rules(&web, &[])));
        assert_eq!(
            describe(&units),
            [
                "1 element(s) of cluster-endpoints",
                "1 element(s) of no-endpoint-services",
                "1 element(s) of service-ips",
            ]
        );
    }

    #[test]
    fn a_port_with_affinity_keeps_chains_of_its_own() {
        let mut d = desired();
        let mut web = port("web", "10.96.0.10");
        web.affinity_seconds = Some(60);
        let units = d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        assert_eq!(
            describe(&units),
            [
                "add set affinity-ns/web/tcp/p__10.244.1.5/8080",
                "add chain endpoint-ns/web/tcp/p__10.244.1.5/8080",
                "add chain service-ns/web/tcp/p",
                "fill chain endpoint-ns/web/tcp/p__10.244.1.5/8080",
                "fill chain service-ns/web/tcp/p",
                "1 element(s) of cluster-ips",
                "1 element(s) of service-ips",
            ]
        );
    }

    #[test]
    fn a_key_two_ports_claim_passes_to_the_other_when_the_first_goes() {
        let mut d = desired();
        let mut a = port("a", "10.96.0.10");
        let mut b = port("b", "10.96.0.11");
        a.external_ips = vec!["203.0.113.1".parse().unwrap()];
        b.external_ips = vec!["203.0.113.1".parse().unwrap()];
        d.set_port(&a.name, Some(rules(&a, &["10.244.1.5"])));
        d.set_port(&b.name, Some(rules(&b, &["10.244.1.6", "10.244.1.7"])));
        let key = super::super::render::dest_bytes(&trellis_proxy::Destination {
            addr: "203.0.113.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        });
        let owner = |d: &Desired| d.rendered().sets["service-ips"].elements[&key].clone();
        assert_eq!(
            owner(&d),
            Some(ElemValue::Verdict(Verdict::Goto(
                "shape-external-cluster-1".into()
            )))
        );
        let units = d.set_port(&a.name, None);
        let handover = units
            .iter()
            .find(|u| {
                u.ops
                    .iter()
                    .any(|op| matches!(op, Op::AddElements { set, .. } if set == "service-ips"))
            })
            .expect("the key is re-added");
        assert!(
            matches!(&handover.ops[0], Op::DestroyElements { keys, .. }
                if keys.contains(&ElemKey::from(key.clone()))),
            "delete and re-add in one unit: the key is never missing"
        );
        assert_eq!(
            owner(&d),
            Some(ElemValue::Verdict(Verdict::Goto(
                "shape-external-cluster-2".into()
            )))
        );
    }

    fn kernel_holding(table: &RenderedTable) -> KernelTable {
        KernelTable {
            exists: true,
            chains: table
                .chains
                .iter()
                .map(|(name, c)| {
                    (
                        name.clone(),
                        KernelChain {
                            base: c.base,
                            comments: c.rules.iter().map(|r| Some(r.comment.clone())).collect(),
                        },
                    )
                })
                .collect(),
            sets: table
                .sets
                .iter()
                .map(|(name, s)| {
                    (
                        name.clone(),
                        KernelSet {
                            spec: s.spec.clone(),
                            elements: s.elements.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn the_audit_finds_nothing_to_do_when_the_kernel_holds_the_plan() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        let wanted = d.rendered();
        let (units, drift) = repair(IpFamily::V4, wanted.clone(), &kernel_holding(&wanted));
        assert!(units.is_empty(), "{:?}", describe(&units));
        assert_eq!(drift.total(), 0);
    }

    #[test]
    fn the_audit_repairs_what_others_changed_and_nothing_else() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        let wanted = d.rendered();
        let mut kernel = kernel_holding(&wanted);
        // Tampering: a chain flushed, a map entry gone, a stray entry to a dead pod's chain,
        // a chain nobody wants.
        kernel
            .chains
            .get_mut("shape-clusterip-cluster-1")
            .unwrap()
            .comments
            .clear();
        kernel.sets.get_mut("service-ips").unwrap().elements.clear();
        kernel
            .sets
            .get_mut("no-endpoint-services")
            .unwrap()
            .elements
            .insert(vec![1, 2, 3], Some(ElemValue::Verdict(Verdict::Drop)));
        kernel.chains.insert("stray".into(), KernelChain::default());
        let (units, drift) = repair(IpFamily::V4, wanted.clone(), &kernel);
        assert_eq!(
            describe(&units),
            [
                "rewrite chain shape-clusterip-cluster-1",
                "1 element(s) of no-endpoint-services",
                "1 element(s) of service-ips",
                "remove chain stray",
            ]
        );
        assert_eq!(
            (
                drift.chains_rewritten,
                drift.elements_missing,
                drift.elements_extra,
                drift.chains_extra
            ),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn a_missing_table_is_built_whole_and_an_incompatible_one_rebuilt() {
        let d = desired();
        let wanted = d.rendered();
        let (units, drift) = repair(IpFamily::V4, wanted.clone(), &KernelTable::default());
        assert!(drift.missing_table);
        assert_eq!(units[0].what, "add table ip trellis-proxy");
        assert_eq!(drift.chains_missing, wanted.chains.len());

        let mut kernel = kernel_holding(&wanted);
        kernel.sets.get_mut("cluster-ips").unwrap().spec =
            SetSpec::set(&[trellis_dataplane::nftables::DataType::Ipv6Addr]);
        let (units, drift) = repair(IpFamily::V4, wanted.clone(), &kernel);
        assert_eq!(drift.sets_incompatible, 1);
        assert_eq!(
            describe(&units)[..2],
            [
                "rebuild table ip trellis-proxy",
                "add table ip trellis-proxy"
            ]
        );
    }
}
