//! What to change in the kernel, as units of nftables operations: the event path (one
//! service port's rules replaced: [`Desired::set_port`], O(what changed)) and the audit
//! (the whole desired table against what the kernel holds: [`crate::nft_table::repair`]).
//! Pure: the operations are applied by [`crate::nft_table::kernel`].

use super::render::{TABLE, merge, nft_family, render_chain, render_fixed, render_port};
use crate::nft_table::units::{
    ElementChange, Scope, Unit, add_chain_units, add_set_units, destroy_chain_unit,
    destroy_set_unit, element_units, ensure_chain_units, rewrite_chain_unit,
};
use crate::nft_table::{RenderedChain, RenderedTable};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use trellis_dataplane::nftables::ElemValue;
use trellis_proxy::Protocol;
use trellis_proxy::shape::Shape;
use trellis_proxy::{IpFamily, ServicePortName, ServiceRules, Table};

/// How deep a chain sits in the chain of jumps: element maps and base chains lead to
/// external and firewall chains, which lead to service chains, which lead to endpoint
/// chains. 0 for endpoint chains, 3 for the table's own.
fn depth(chain: &str) -> u8 {
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

/// The proxy's table in `family`.
pub fn scope(family: IpFamily) -> Scope {
    Scope {
        family: nft_family(family),
        table: TABLE,
        depth,
    }
}

/// An element of a fixed set: the set's name and the key's bytes.
type ElementKey = (&'static str, Vec<u8>);
/// The ports that want an element, with the value each wants.
/// Kept sorted by name; nearly always one entry, so a vector (a map would allocate a
/// whole tree node per element: most of the memory at 100,000 endpoints).
type Claimants = Vec<(Arc<ServicePortName>, Option<ElemValue>)>;

/// The proxy's desired table in one family, kept per service port.
pub struct Desired {
    family: IpFamily,
    scope: Scope,
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
            scope: scope(node.family),
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
        let scope = self.scope;

        // Sets of the port (affinity).
        for (set, spec) in &after.sets {
            if !before.sets.contains_key(set) {
                units.extend(add_set_units(scope, set, spec.clone()));
            }
        }
        for set in before.sets.keys() {
            if !after.sets.contains_key(set) {
                units.push(destroy_set_unit(scope, set));
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
                    units.extend(ensure_chain_units(scope, name, body));
                }
            }
        }
        // Chains.
        for (chain, body) in &after.chains {
            match before.chains.get(chain) {
                None => units.extend(add_chain_units(scope, chain, body)),
                Some(old) if old.rules != body.rules => {
                    units.push(rewrite_chain_unit(scope, chain, &body.rules))
                }
                Some(_) => {}
            }
        }
        for chain in before.chains.keys() {
            if !after.chains.contains_key(chain) {
                units.push(destroy_chain_unit(scope, chain));
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
            units.extend(element_units(scope, set, list));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft_table::repair;
    use crate::nft_table::units::{KernelChain, KernelTable, ordered};
    use trellis_dataplane::nftables::Verdict;
    use trellis_dataplane::nftables::{ElemKey, Op, SetSpec};
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

    #[test]
    fn the_audit_finds_nothing_to_do_when_the_kernel_holds_the_plan() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        let wanted = d.rendered();
        let (units, drift) = repair(
            scope(IpFamily::V4),
            wanted.clone(),
            &KernelTable::holding(&wanted),
        );
        assert!(units.is_empty(), "{:?}", describe(&units));
        assert_eq!(drift.total(), 0);
    }

    #[test]
    fn the_audit_repairs_what_others_changed_and_nothing_else() {
        let mut d = desired();
        let web = port("web", "10.96.0.10");
        d.set_port(&web.name, Some(rules(&web, &["10.244.1.5"])));
        let wanted = d.rendered();
        let mut kernel = KernelTable::holding(&wanted);
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
        let (units, drift) = repair(scope(IpFamily::V4), wanted.clone(), &kernel);
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
        let (units, drift) = repair(scope(IpFamily::V4), wanted.clone(), &KernelTable::default());
        assert!(drift.missing_table);
        assert_eq!(units[0].what, "add table ip trellis-proxy");
        assert_eq!(drift.chains_missing, wanted.chains.len());

        let mut kernel = KernelTable::holding(&wanted);
        kernel.sets.get_mut("cluster-ips").unwrap().spec =
            SetSpec::set(&[trellis_dataplane::nftables::DataType::Ipv6Addr]);
        let (units, drift) = repair(scope(IpFamily::V4), wanted.clone(), &kernel);
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
