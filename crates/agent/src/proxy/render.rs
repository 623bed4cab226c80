//! From a planned table ([`trellis_proxy::Table`]) to nftables objects: sets and maps with
//! their elements, chains with their rules. Pure: the reconciler compares what this gives
//! with what the kernel holds.

use crate::nft_table::{RenderedChain, RenderedRule, RenderedSet, RenderedTable};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use trellis_dataplane::nftables::dsl::{self, Field};
use trellis_dataplane::nftables::{
    BaseChain, ChainKind, CmpOp, CtState, Datum, ElemValue, Expr, FibFlags, FibResult, Hook,
    MetaKey, Policy, Reg, RouteType, SetFlags, SetSpec, Verdict, concat,
};
use trellis_dataplane::nftables::{DataType, LookupResult, NatFamily, NatKind, NumgenKind, SetRef};
use trellis_proxy::ruleset::{Condition, Frontend, FrontendKind, Role, names};
use trellis_proxy::{
    Destination, IpFamily, NodePort, Protocol, Refusal, Rule, ServiceRules, Table,
};

/// The proxy's table, in both families.
pub const TABLE: &str = "trellis-proxy";

/// The packet mark bit that asks `masquerading` to masquerade (kube-proxy's).
const MASQUERADE_MARK: u32 = 0x4000;

const FILTER_PREROUTING: &str = "filter-prerouting";
const FILTER_INPUT: &str = "filter-input";
const FILTER_FORWARD: &str = "filter-forward";
const FILTER_OUTPUT: &str = "filter-output";
const FILTER_OUTPUT_POST_DNAT: &str = "filter-output-post-dnat";
const NAT_PREROUTING: &str = "nat-prerouting";
const NAT_OUTPUT: &str = "nat-output";
const NAT_POSTROUTING: &str = "nat-postrouting";
const SERVICES: &str = "services";
const FIREWALL_CHECK: &str = "firewall-check";
const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
const CLUSTER_IPS_CHECK: &str = "cluster-ips-check";
const MARK_FOR_MASQUERADE: &str = "mark-for-masquerade";
const MASQUERADE_UNLESS_CLUSTER: &str = "masquerade-unless-cluster";
const MASQUERADING: &str = "masquerading";
const REJECT_CHAIN: &str = "reject-chain";

/// What one service port adds to its family's table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderedPort {
    /// Elements of the fixed maps and sets, by set name.
    pub elements: BTreeMap<&'static str, BTreeMap<Vec<u8>, Option<ElemValue>>>,
    /// Elements no other port can have (the endpoints of its ClusterIP: a ClusterIP
    /// belongs to one service), which need no bookkeeping of who else wants them.
    pub exclusive: BTreeMap<&'static str, BTreeMap<Vec<u8>, Option<ElemValue>>>,
    /// Its own chains.
    pub chains: BTreeMap<String, RenderedChain>,
    /// The shape chains it leads to (shared with other ports).
    pub shapes: BTreeMap<String, RenderedChain>,
    /// Its affinity sets.
    pub sets: BTreeMap<String, RenderedSet>,
}

pub use crate::nft_table::family::{Fields, nft_family};

/// The whole table: the fixed part, then every port's.
pub fn render(table: &Table) -> RenderedTable {
    let mut out = render_fixed(table);
    for rules in table.services.values() {
        let port = render_port(table.family, &table.cluster_cidrs, rules);
        merge(&mut out, port);
    }
    out
}

/// Adds a port's objects to a table. A key two ports claim keeps the first's value (the
/// planner's merge rule: ports in name order).
pub fn merge(out: &mut RenderedTable, port: RenderedPort) {
    for (set, elements) in port.elements.into_iter().chain(port.exclusive) {
        let target = out
            .sets
            .get_mut(set)
            .unwrap_or_else(|| panic!("fixed set {set} is rendered first"));
        for (k, v) in elements {
            target.elements.entry(k).or_insert(v);
        }
    }
    out.chains.extend(port.chains);
    out.chains.extend(port.shapes);
    out.sets.extend(port.sets);
}

/// The table's own chains and the fixed sets, with the node's elements.
pub fn render_fixed(table: &Table) -> RenderedTable {
    let family = table.family;
    let f = Fields::of(family);
    let dest_key = [f.daddr, Field::L4Proto, Field::ThDport];
    let port_key = [Field::L4Proto, Field::ThDport];
    let mut sets = BTreeMap::new();
    for (name, spec) in [
        (names::SERVICE_IPS, SetSpec::vmap(&dsl::key_type(&dest_key))),
        (
            names::NO_ENDPOINT_SERVICES,
            SetSpec::vmap(&dsl::key_type(&dest_key)),
        ),
        (
            names::FIREWALL_IPS,
            SetSpec::vmap(&dsl::key_type(&dest_key)),
        ),
        (
            names::SERVICE_NODEPORTS,
            SetSpec::vmap(&dsl::key_type(&port_key)),
        ),
        (
            names::NO_ENDPOINT_NODEPORTS,
            SetSpec::vmap(&dsl::key_type(&port_key)),
        ),
        (names::CLUSTER_IPS, SetSpec::set(&dsl::key_type(&[f.daddr]))),
        (
            names::NODEPORT_IPS,
            SetSpec::set(&dsl::key_type(&[f.daddr])),
        ),
        (
            names::HAIRPIN,
            SetSpec::set(&dsl::key_type(&[f.saddr, f.daddr])),
        ),
    ] {
        sets.insert(name.to_string(), RenderedSet::empty(spec));
    }
    // Endpoint maps: FRONTEND . index → address . port. The index is a `mark` (4 bytes in
    // host order, as `numgen` writes it) because nft cannot list a concatenation with a
    // plain `integer` in it.
    let endpoint = [f.daddr.data_type(), DataType::InetService];
    for role in [Role::Cluster, Role::Local] {
        for (kind, key) in [
            (FrontendKind::Address, &dest_key[..]),
            (FrontendKind::NodePort, &port_key[..]),
        ] {
            let mut key = dsl::key_type(key);
            key.push(DataType::Mark);
            sets.insert(
                names::endpoints(role, kind).to_string(),
                RenderedSet::empty(SetSpec::map(&key, &endpoint)),
            );
        }
    }
    let node_ips = sets.get_mut(names::NODEPORT_IPS).expect("just added");
    for addr in &table.node_port_addresses {
        node_ips.elements.insert(addr_bytes(*addr), None);
    }

    let base = |hook, priority, kind| {
        Some(BaseChain {
            hook,
            priority,
            kind,
            policy: Policy::Accept,
        })
    };
    let new_only = |then: &str| [dsl::ct_state(CtState::NEW), dsl::jump(then)].concat();
    let mut chains = BTreeMap::new();
    let mut chain = |name: &str, base: Option<BaseChain>, rules: Vec<Vec<Expr>>| {
        chains.insert(
            name.to_string(),
            RenderedChain {
                base,
                rules: rules.into_iter().map(RenderedRule::new).collect(),
            },
        );
    };
    // Filter chains run just around NAT (dstnat is -100): the firewall before it; after it,
    // in input and forward, what NAT left addressed to a service is refused. (Not in
    // prerouting: a reject there finds no route for its ICMP answer and drops silently.)
    chain(
        FILTER_PREROUTING,
        base(Hook::Prerouting, -110, ChainKind::Filter),
        vec![new_only(FIREWALL_CHECK)],
    );
    chain(
        FILTER_INPUT,
        base(Hook::Input, -110, ChainKind::Filter),
        vec![
            new_only(NODEPORT_ENDPOINTS_CHECK),
            new_only(SERVICE_ENDPOINTS_CHECK),
        ],
    );
    chain(
        FILTER_FORWARD,
        base(Hook::Forward, -110, ChainKind::Filter),
        vec![
            new_only(SERVICE_ENDPOINTS_CHECK),
            new_only(CLUSTER_IPS_CHECK),
        ],
    );
    chain(
        FILTER_OUTPUT,
        base(Hook::Output, -110, ChainKind::Filter),
        vec![new_only(SERVICE_ENDPOINTS_CHECK), new_only(FIREWALL_CHECK)],
    );
    chain(
        FILTER_OUTPUT_POST_DNAT,
        base(Hook::Output, -90, ChainKind::Filter),
        vec![new_only(CLUSTER_IPS_CHECK)],
    );
    chain(
        NAT_PREROUTING,
        base(Hook::Prerouting, -100, ChainKind::Nat),
        vec![dsl::jump(SERVICES)],
    );
    chain(
        NAT_OUTPUT,
        base(Hook::Output, -100, ChainKind::Nat),
        vec![dsl::jump(SERVICES)],
    );
    chain(
        NAT_POSTROUTING,
        base(Hook::Postrouting, 100, ChainKind::Nat),
        vec![dsl::jump(MASQUERADING)],
    );
    chain(
        FIREWALL_CHECK,
        None,
        vec![dsl::vmap(&dest_key, names::FIREWALL_IPS)],
    );
    chain(
        SERVICE_ENDPOINTS_CHECK,
        None,
        vec![dsl::vmap(&dest_key, names::NO_ENDPOINT_SERVICES)],
    );
    chain(
        NODEPORT_ENDPOINTS_CHECK,
        None,
        vec![
            [
                dsl::in_set(&[f.daddr], names::NODEPORT_IPS),
                dsl::vmap(&port_key, names::NO_ENDPOINT_NODEPORTS),
            ]
            .concat(),
        ],
    );
    chain(
        CLUSTER_IPS_CHECK,
        None,
        vec![[dsl::in_set(&[f.daddr], names::CLUSTER_IPS), reject(family)].concat()],
    );
    chain(
        SERVICES,
        None,
        vec![
            dsl::vmap(&dest_key, names::SERVICE_IPS),
            [
                dsl::in_set(&[f.daddr], names::NODEPORT_IPS),
                dsl::vmap(&port_key, names::SERVICE_NODEPORTS),
            ]
            .concat(),
        ],
    );
    chain(MARK_FOR_MASQUERADE, None, vec![mark_or(MASQUERADE_MARK)]);
    let mut unless_cluster: Vec<Vec<Expr>> = table
        .cluster_cidrs
        .iter()
        .map(|cidr| [dsl::ip_saddr_in(*cidr), dsl::return_()].concat())
        .collect();
    unless_cluster.push(dsl::jump(MARK_FOR_MASQUERADE));
    chain(MASQUERADE_UNLESS_CLUSTER, None, unless_cluster);
    chain(
        MASQUERADING,
        None,
        vec![
            // After DNAT, a connection from an endpoint to itself.
            [
                dsl::in_set(&[f.saddr, f.daddr], names::HAIRPIN),
                dsl::masquerade_fully_random(),
            ]
            .concat(),
            [mark_and(MASQUERADE_MARK, 0), dsl::return_()].concat(),
            mark_xor(MASQUERADE_MARK),
            dsl::masquerade_fully_random(),
        ],
    );
    chain(REJECT_CHAIN, None, vec![reject(family)]);
    RenderedTable { sets, chains }
}

/// One service port's elements, chains and sets.
pub fn render_port(
    family: IpFamily,
    cluster_cidrs: &[IpNet],
    rules: &ServiceRules,
) -> RenderedPort {
    let f = Fields::of(family);
    let mut out = RenderedPort::default();
    let goto = |chain: &String| Some(ElemValue::Verdict(Verdict::Goto(chain.clone())));
    let refuse = |r: &Refusal| {
        Some(ElemValue::Verdict(match r {
            Refusal::Reject => Verdict::Goto(REJECT_CHAIN.to_string()),
            Refusal::Drop => Verdict::Drop,
        }))
    };
    let mut add = |set: &'static str, key: Vec<u8>, value: Option<ElemValue>| {
        out.elements.entry(set).or_default().insert(key, value);
    };
    for (dest, chain) in &rules.service_ips {
        add(names::SERVICE_IPS, dest_bytes(dest), goto(chain));
    }
    for (dest, refusal) in &rules.no_endpoint_services {
        add(
            names::NO_ENDPOINT_SERVICES,
            dest_bytes(dest),
            refuse(refusal),
        );
    }
    for (dest, chain) in &rules.firewall_ips {
        add(names::FIREWALL_IPS, dest_bytes(dest), goto(chain));
    }
    for (port, chain) in &rules.node_ports {
        add(names::SERVICE_NODEPORTS, node_port_bytes(port), goto(chain));
    }
    for (port, refusal) in &rules.no_endpoint_node_ports {
        add(
            names::NO_ENDPOINT_NODEPORTS,
            node_port_bytes(port),
            refuse(refusal),
        );
    }
    for addr in &rules.cluster_ips {
        add(names::CLUSTER_IPS, addr_bytes(*addr), None);
    }
    for (frontend, roles) in &rules.frontends {
        let (key, exclusive) = match frontend {
            Frontend::Address(dest) => (dest_bytes(dest), rules.cluster_ips.contains(&dest.addr)),
            Frontend::NodePort(port) => (node_port_bytes(port), false),
        };
        for role in roles {
            let map = names::endpoints(*role, frontend.kind());
            for (index, b) in rules.pools.get(role).into_iter().flatten().enumerate() {
                let mut k = key.clone();
                k.extend(Datum::Mark(index as u32).bytes());
                let value = Some(ElemValue::Data(concat(&[
                    addr_datum(b.addr),
                    Datum::Port(b.port),
                ])));
                if exclusive {
                    out.exclusive.entry(map).or_default().insert(k, value);
                } else {
                    add(map, k, value);
                }
            }
        }
    }
    for addr in &rules.hairpin {
        add(
            names::HAIRPIN,
            concat(&[addr_datum(*addr), addr_datum(*addr)]),
            None,
        );
    }
    let protocol = rules
        .service_ips
        .keys()
        .chain(rules.no_endpoint_services.keys())
        .map(|d| d.protocol)
        .next()
        .unwrap_or(Protocol::Tcp);
    let chain = |body: &Vec<Rule>| render_chain(family, protocol, cluster_cidrs, body);
    for (name, body) in &rules.chains {
        out.chains.insert(name.clone(), chain(body));
    }
    for (name, body) in &rules.shapes {
        out.shapes.insert(name.clone(), chain(body));
    }
    for (set, timeout) in &rules.affinity_sets {
        out.sets.insert(
            set.clone(),
            RenderedSet::empty(
                SetSpec::set(&dsl::key_type(&[f.saddr]))
                    .with_flags(SetFlags::DYNAMIC)
                    .with_timeout(Duration::from_secs(u64::from(*timeout))),
            ),
        );
    }
    out
}

/// A regular chain's rules. (`protocol` only matters to rules of per-service chains.)
pub fn render_chain(
    family: IpFamily,
    protocol: Protocol,
    cluster_cidrs: &[IpNet],
    body: &[Rule],
) -> RenderedChain {
    let f = Fields::of(family);
    RenderedChain {
        base: None,
        rules: body
            .iter()
            .flat_map(|rule| render_rule(family, f, protocol, cluster_cidrs, rule))
            .map(RenderedRule::new)
            .collect(),
    }
}

/// One planned rule as nftables rules (a few plan rules take more than one).
fn render_rule(
    family: IpFamily,
    f: Fields,
    protocol: Protocol,
    cluster_cidrs: &[IpNet],
    rule: &Rule,
) -> Vec<Vec<Expr>> {
    match rule {
        Rule::MasqueradeFromOutsideCluster { addr, port } => vec![
            [
                dsl::ip_daddr(*addr),
                dsl::th_dport(*port),
                dsl::jump(MASQUERADE_UNLESS_CLUSTER),
            ]
            .concat(),
        ],
        Rule::Masquerade => vec![dsl::jump(MARK_FOR_MASQUERADE)],
        Rule::MasqueradeUnlessFromCluster => vec![dsl::jump(MASQUERADE_UNLESS_CLUSTER)],
        Rule::Pick {
            when,
            masquerade,
            role,
            frontend,
            count,
        } => {
            let mut tail = Vec::new();
            if *masquerade {
                tail.extend(mark_or(MASQUERADE_MARK));
            }
            tail.extend(pick(family, f, *role, *frontend, *count));
            match when {
                Condition::Always => vec![tail],
                Condition::FromCluster => cluster_cidrs
                    .iter()
                    .map(|cidr| [dsl::ip_saddr_in(*cidr), tail.clone()].concat())
                    .collect(),
                Condition::LocalSource => vec![[fib_saddr_local(), tail].concat()],
            }
        }
        Rule::MasqueradeIfLocalSource => {
            vec![[fib_saddr_local(), dsl::jump(MARK_FOR_MASQUERADE)].concat()]
        }
        Rule::GotoIfFromCluster(chain) => cluster_cidrs
            .iter()
            .map(|cidr| [dsl::ip_saddr_in(*cidr), dsl::goto(chain)].concat())
            .collect(),
        Rule::GotoIfLocalSource(chain) => vec![[fib_saddr_local(), dsl::goto(chain)].concat()],
        Rule::GotoIfAffine { set, chain } => {
            vec![[dsl::in_set(&[f.saddr], set), dsl::goto(chain)].concat()]
        }
        // Rule i goes to endpoint i with probability 1/(N-i), the last one always: a
        // uniform choice without a set per service. (A `numgen vmap` would need an
        // anonymous map per service, and the kernel finds a table's sets by walking a
        // list: 10,000 services took 9 s to program that way, 1.2 s this way.)
        Rule::Balance(chains) => {
            let n = chains.len() as u32;
            chains
                .iter()
                .enumerate()
                .map(|(i, chain)| {
                    let left = n - i as u32;
                    if left == 1 {
                        dsl::goto(chain)
                    } else {
                        [dsl::one_in(left), dsl::goto(chain)].concat()
                    }
                })
                .collect()
        }
        Rule::RememberClient { set } => vec![dsl::update_set(&[f.saddr], set, None)],
        Rule::Dnat { addr, port } => vec![
            [
                dsl::l4proto(protocol.number()),
                dsl::dnat_ip_port(*addr, *port),
            ]
            .concat(),
        ],
        Rule::DropUnlessSourceIn(ranges) => {
            let mut out: Vec<Vec<Expr>> = ranges
                .iter()
                .map(|r| [dsl::ip_saddr_in(*r), dsl::return_()].concat())
                .collect();
            out.push(dsl::drop());
            out
        }
        Rule::Goto(chain) => vec![dsl::goto(chain)],
        Rule::Drop => vec![dsl::drop()],
    }
}

/// `dnat to FRONTEND . numgen random mod COUNT map @ENDPOINTS`: one of the pool's
/// endpoints, uniformly. One lookup whatever the number of services, and an endpoint
/// change is a change of map elements.
fn pick(family: IpFamily, f: Fields, role: Role, frontend: FrontendKind, count: u32) -> Vec<Expr> {
    let key: &[Field] = match frontend {
        FrontendKind::Address => &[f.daddr, Field::L4Proto, Field::ThDport],
        FrontendKind::NodePort => &[Field::L4Proto, Field::ThDport],
    };
    let mut exprs = dsl::load(key);
    let mut next = Some(Reg::R1);
    for field in key {
        next = next.and_then(|r| r.after(field.data_type().width()));
    }
    let index = next.expect("a frontend key leaves registers free");
    let (nat_family, addr_len) = match family {
        IpFamily::V4 => (NatFamily::Ipv4, 4),
        IpFamily::V6 => (NatFamily::Ipv6, 16),
    };
    exprs.extend([
        Expr::Numgen {
            kind: NumgenKind::Random,
            modulus: count.max(1),
            offset: 0,
            dreg: index,
        },
        Expr::Lookup {
            sreg: Reg::R1,
            set: SetRef::Named(names::endpoints(role, frontend).into()),
            result: LookupResult::Value(Reg::R1),
        },
        Expr::Nat {
            kind: NatKind::Dnat,
            family: nat_family,
            addr: Some(Reg::R1),
            port: Reg::R1.after(addr_len),
        },
    ]);
    exprs
}

/// Port unreachable, which a TCP client sees as "connection refused". Typed by family:
/// the `icmpx` kind nft uses in `inet` tables is not handled by the `ip` and `ip6`
/// families' reject, which then just drops.
fn reject(family: IpFamily) -> Vec<Expr> {
    match family {
        IpFamily::V4 => dsl::reject_icmp(3),
        IpFamily::V6 => dsl::reject_icmpv6(4),
    }
}

/// `meta mark set meta mark | BIT`.
fn mark_or(bit: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: MetaKey::Mark,
            dreg: Reg::R1,
        },
        Expr::Bitwise {
            sreg: Reg::R1,
            dreg: Reg::R1,
            mask: (!bit).to_ne_bytes().to_vec(),
            xor: bit.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: MetaKey::Mark,
            sreg: Reg::R1,
        },
    ]
}

/// `meta mark set meta mark ^ BIT`.
fn mark_xor(bit: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: MetaKey::Mark,
            dreg: Reg::R1,
        },
        Expr::Bitwise {
            sreg: Reg::R1,
            dreg: Reg::R1,
            mask: u32::MAX.to_ne_bytes().to_vec(),
            xor: bit.to_ne_bytes().to_vec(),
        },
        Expr::MetaSet {
            key: MetaKey::Mark,
            sreg: Reg::R1,
        },
    ]
}

/// `meta mark & BIT == VALUE`.
fn mark_and(bit: u32, value: u32) -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: MetaKey::Mark,
            dreg: Reg::R1,
        },
        Expr::Bitwise {
            sreg: Reg::R1,
            dreg: Reg::R1,
            mask: bit.to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        },
        Expr::Cmp {
            sreg: Reg::R1,
            op: CmpOp::Eq,
            data: value.to_ne_bytes().to_vec(),
        },
    ]
}

/// `fib saddr type local`: the source is one of this node's addresses.
fn fib_saddr_local() -> Vec<Expr> {
    vec![
        Expr::Fib {
            flags: FibFlags::SADDR,
            result: FibResult::AddrType,
            dreg: Reg::R1,
        },
        Expr::Cmp {
            sreg: Reg::R1,
            op: CmpOp::Eq,
            data: RouteType::Local.code().to_ne_bytes().to_vec(),
        },
    ]
}

fn addr_datum(addr: IpAddr) -> Datum {
    match addr {
        IpAddr::V4(a) => Datum::Ipv4(a),
        IpAddr::V6(a) => Datum::Ipv6(a),
    }
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    concat(&[addr_datum(addr)])
}

/// `daddr . l4proto . dport` key bytes.
pub fn dest_bytes(dest: &Destination) -> Vec<u8> {
    concat(&[
        addr_datum(dest.addr),
        Datum::Proto(dest.protocol.number()),
        Datum::Port(dest.port),
    ])
}

/// `l4proto . dport` key bytes.
pub fn node_port_bytes(port: &NodePort) -> Vec<u8> {
    concat(&[Datum::Proto(port.protocol.number()), Datum::Port(port.port)])
}
