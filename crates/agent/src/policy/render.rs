//! From what a node enforces ([`trellis_policy::plan::NodePolicy`]) to its nftables table,
//! one per family. Pure: the reconciler compares what this gives with what the kernel
//! holds.
//!
//! ```text
//! table ip trellis-policy
//!   chain forward  (hook forward, filter priority)
//!     ct state established,related accept          replies and admitted flows
//!     ip saddr vmap @egress                         local pod → its egress check
//!     iifname "tp*" ip saddr != @pods counter drop  a pod not programmed yet
//!     ip daddr vmap @ingress                        → local pod's ingress check
//!     oifname "tp*" ip daddr != @pods counter drop
//!   chain input    (hook input)
//!     ct state established,related accept
//!     ip saddr vmap @egress                         a pod reaching its own node
//!     iifname "tp*" ip saddr != @pods counter drop
//!   chain check-<hash>                             one per distinct check, shared by pods
//!     <peer> <ports> return   # ns/policy rule N   what the isolating policies admit
//!     counter drop            # ns/a, ns/b         counted against the isolating policies
//!   set peers-<ns/policy/in0/1>                    addresses a selector picks
//!   set ports-<ns/policy/out0/named>               address . protocol . port (named ports)
//! ```
//!
//! The node's own traffic to its pods is never refused (Kubernetes: pods cannot block their
//! resident node) without a rule for it: it leaves through the output hook, which the table
//! does not hook.
//!
//! Maps are keyed by the pod's address, so a packet costs one lookup plus its own pod's
//! rules, however many policies and pods the cluster has. A pod that no policy isolates in
//! a direction has no element in that map. Pods with the same check share its chain: a new
//! pod like others is one map element.
//!
//! With the CNI plugin's pods and any policy in force ([`Guard`]), traffic through a pod's
//! host end (`tp…`) from or to an address that is not one of this node's known pods is
//! dropped: a pod whose rules are not in place yet is neither unprotected nor let through
//! (the plugin's ADD waits for its rules, so a workload does not start before them); a pod
//! sending from an address that is not its own gets nowhere.

use crate::nft_table::family::{Fields, nft_family};
use crate::nft_table::rendered::Fnv;
use crate::nft_table::{RenderedChain, RenderedRule, RenderedSet, RenderedTable, Scope};
use std::collections::BTreeMap;
use std::net::IpAddr;
use trellis_dataplane::nftables::dsl::{self, Field};
use trellis_dataplane::nftables::{
    BaseChain, ChainKind, CtState, Datum, ElemValue, Expr, Hook, Policy, SetSpec, Verdict, concat,
};
use trellis_model::{IpNet, Protocol};
use trellis_policy::PolicyRef;
use trellis_policy::plan::{Allow, Check, NodePolicy, PeerMatch, PortSpan};
use trellis_proxy::IpFamily;

/// Network policy's table, in both families.
pub const TABLE: &str = "trellis-policy";

const FORWARD: &str = "forward";
const INPUT: &str = "input";
const INGRESS: &str = "ingress";
const EGRESS: &str = "egress";
const PODS: &str = "pods";
const CHECK_PREFIX: &str = "check-";
const PEERS_PREFIX: &str = "peers-";
const PORTS_PREFIX: &str = "ports-";
/// The kernel's limit on table object names, with room for the NUL.
const MAX_NAME: usize = 255;

/// The policy table in `family`: check chains are jumped to from the maps of the base
/// chains.
pub fn scope(family: IpFamily) -> Scope {
    Scope {
        family: nft_family(family),
        table: TABLE,
        depth: |chain| {
            if chain.starts_with(CHECK_PREFIX) {
                0
            } else {
                1
            }
        },
    }
}

/// A family's table and, per check chain, the direction and policies its drops count
/// against.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderedPolicy {
    pub table: RenderedTable,
    pub drops: BTreeMap<String, (Direction, Vec<PolicyRef>)>,
}

/// The interfaces whose traffic is refused unless it is from or to a known pod: this
/// node's pods' host ends, named with `prefix` (the CNI plugin's).
#[derive(Clone, Copy, Debug)]
pub struct Guard<'a> {
    pub prefix: &'a str,
}

/// The rules that count unknown pods' packets end with this note.
pub const UNKNOWN_POD_NOTE: &str = "drop: not a programmed pod";

/// The table `plan` asks for in `family`.
pub fn render(plan: &NodePolicy, family: IpFamily, guard: Option<Guard<'_>>) -> RenderedPolicy {
    let f = Fields::of(family);
    let mut out = RenderedPolicy::default();
    let tables = &mut out.table;
    let mut pods = RenderedSet::empty(SetSpec::set(&dsl::key_type(&[f.saddr])));
    for ip in
        (plan.ingress.keys().chain(plan.egress.keys())).filter(|ip| IpFamily::of(**ip) == family)
    {
        pods.elements.insert(concat(&[addr_datum(*ip)]), None);
    }
    tables.sets.insert(PODS.into(), pods);
    for (name, members) in &plan.sets {
        let mut set = RenderedSet::empty(SetSpec::set(&dsl::key_type(&[f.saddr])));
        for ip in members.iter().filter(|ip| IpFamily::of(**ip) == family) {
            set.elements.insert(concat(&[addr_datum(*ip)]), None);
        }
        tables.sets.insert(object_name(PEERS_PREFIX, name), set);
    }
    for (name, members) in &plan.port_sets {
        let key = [f.daddr, Field::L4Proto, Field::ThDport];
        let mut set = RenderedSet::empty(SetSpec::set(&dsl::key_type(&key)));
        for (ip, protocol, port) in members.iter().filter(|m| IpFamily::of(m.0) == family) {
            let bytes = concat(&[
                addr_datum(*ip),
                Datum::Proto(protocol_number(*protocol)),
                Datum::Port(*port),
            ]);
            set.elements.insert(bytes, None);
        }
        tables.sets.insert(object_name(PORTS_PREFIX, name), set);
    }
    let mut maps = BTreeMap::new();
    for (map, direction, checks) in [
        (INGRESS, Direction::Ingress, &plan.ingress),
        (EGRESS, Direction::Egress, &plan.egress),
    ] {
        let mut vmap = RenderedSet::empty(SetSpec::vmap(&dsl::key_type(&[f.saddr])));
        for (ip, check) in checks {
            let Some(check) = check else { continue };
            if IpFamily::of(*ip) != family {
                continue;
            }
            let chain = check_chain(check, direction, family);
            let name = chain_name(&chain);
            vmap.elements.insert(
                concat(&[addr_datum(*ip)]),
                Some(ElemValue::Verdict(Verdict::Jump(name.clone()))),
            );
            out.drops
                .insert(name.clone(), (direction, check.isolated_by.clone()));
            tables.chains.insert(name, chain);
        }
        maps.insert(map, vmap);
    }
    for (name, map) in maps {
        tables.sets.insert(name.to_string(), map);
    }
    let base = |hook| {
        Some(BaseChain {
            hook,
            priority: 0,
            kind: ChainKind::Filter,
            policy: Policy::Accept,
        })
    };
    let settled = [
        dsl::ct_state(CtState::ESTABLISHED | CtState::RELATED),
        dsl::accept(),
    ]
    .concat();
    let rule = |exprs: Vec<Expr>| {
        if exprs.contains(&Expr::Counter) {
            RenderedRule::noted(exprs, UNKNOWN_POD_NOTE)
        } else {
            RenderedRule::new(exprs)
        }
    };
    let unknown_from = |g: Guard<'_>| {
        [
            dsl::iifname_prefix(g.prefix),
            dsl::not_in_set(&[f.saddr], PODS),
            dsl::counter(),
            dsl::drop(),
        ]
        .concat()
    };
    let unknown_to = |g: Guard<'_>| {
        [
            dsl::oifname_prefix(g.prefix),
            dsl::not_in_set(&[f.daddr], PODS),
            dsl::counter(),
            dsl::drop(),
        ]
        .concat()
    };
    let mut forward = vec![settled.clone(), dsl::vmap(&[f.saddr], EGRESS)];
    forward.extend(guard.map(unknown_from));
    forward.push(dsl::vmap(&[f.daddr], INGRESS));
    forward.extend(guard.map(unknown_to));
    let mut input = vec![settled];
    if family == IpFamily::V6 {
        // Neighbour discovery with the node is what any address needs to work at all.
        input.push([dsl::icmpv6_type_range(133, 137), dsl::accept()].concat());
    }
    input.push(dsl::vmap(&[f.saddr], EGRESS));
    input.extend(guard.map(unknown_from));
    for (name, hook, rules) in [
        (FORWARD, Hook::Forward, forward),
        (INPUT, Hook::Input, input),
    ] {
        let chain = RenderedChain {
            base: base(hook),
            rules: rules.into_iter().map(rule).collect(),
        };
        tables.chains.insert(name.into(), chain);
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// One check as a chain: a `return` per thing admitted, then a counted drop.
fn check_chain(check: &Check, direction: Direction, family: IpFamily) -> RenderedChain {
    let f = Fields::of(family);
    let other_end = match direction {
        Direction::Ingress => f.saddr,
        Direction::Egress => f.daddr,
    };
    let mut rules = Vec::new();
    for allow in &check.allows {
        let Some(peer) = peer_match(allow, other_end, family) else {
            continue;
        };
        let note = rule_note(&allow.by);
        if allow.ports.is_empty() || matches!(allow.peer, PeerMatch::PortSet(_)) {
            rules.push(RenderedRule::noted([peer, dsl::return_()].concat(), &note));
            continue;
        }
        for span in &allow.ports {
            rules.push(RenderedRule::noted(
                [peer.clone(), port_match(span), dsl::return_()].concat(),
                &note,
            ));
        }
    }
    let against: Vec<String> = check.isolated_by.iter().map(policy_name).collect();
    rules.push(RenderedRule::noted(
        [dsl::counter(), dsl::drop()].concat(),
        &format!("drop {}: {}", direction.name(), against.join(", ")),
    ));
    RenderedChain { base: None, rules }
}

/// The peer part of a rule; `None` when the peer cannot match in this family.
fn peer_match(allow: &Allow, other_end: Field, family: IpFamily) -> Option<Vec<Expr>> {
    Some(match &allow.peer {
        PeerMatch::Anywhere => Vec::new(),
        PeerMatch::Set(name) => dsl::in_set(&[other_end], &object_name(PEERS_PREFIX, name)),
        PeerMatch::PortSet(name) => {
            let key = [Fields::of(family).daddr, Field::L4Proto, Field::ThDport];
            dsl::in_set(&key, &object_name(PORTS_PREFIX, name))
        }
        PeerMatch::Block { cidr, except } => {
            if IpFamily::of_net(cidr) != family {
                return None;
            }
            let mut exprs = Vec::new();
            for hole in except.iter().filter(|e| IpFamily::of_net(e) == family) {
                exprs.extend(addr_not_in(other_end, *hole));
            }
            exprs.extend(addr_in(other_end, *cidr));
            exprs
        }
    })
}

/// `meta l4proto P th dport A-B`.
fn port_match(span: &PortSpan) -> Vec<Expr> {
    let mut exprs = dsl::l4proto(protocol_number(span.protocol));
    if span.first == span.last {
        exprs.extend(dsl::th_dport(span.first));
    } else if (span.first, span.last) != (1, u16::MAX) {
        exprs.extend(dsl::th_dport_range(span.first, span.last));
    }
    exprs
}

fn addr_in(field: Field, net: IpNet) -> Vec<Expr> {
    match field {
        Field::IpSaddr | Field::Ip6Saddr => dsl::ip_saddr_in(net),
        _ => dsl::ip_daddr_in(net),
    }
}

fn addr_not_in(field: Field, net: IpNet) -> Vec<Expr> {
    match field {
        Field::IpSaddr | Field::Ip6Saddr => dsl::ip_saddr_not_in(net),
        _ => dsl::ip_daddr_not_in(net),
    }
}

/// A check chain is named after its rules, so pods with the same check share it and a
/// changed check is a new chain (the map element swaps to it in one step).
fn chain_name(chain: &RenderedChain) -> String {
    let mut hash = Fnv::new();
    for rule in &chain.rules {
        hash.write(rule.comment.as_bytes());
    }
    format!("{CHECK_PREFIX}{:016x}", hash.0)
}

/// A set's name as nft can read it back (`nft list` output must parse with `nft -f`):
/// the plan's name with every character nft's identifiers do not allow (`=`, `,`, `:`,
/// spaces, parentheses, ...) made `_`, and then — since that is lossy, and two selectors
/// must never share a set — a hash of the plan's name appended; cut to the kernel's length
/// limit the same way.
fn object_name(prefix: &str, name: &str) -> String {
    let clean: String = (name.chars())
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' | '.' | '/' => c,
            _ => '_',
        })
        .collect();
    let full = format!("{prefix}{clean}");
    if clean == name && full.len() <= MAX_NAME {
        return full;
    }
    let mut hash = Fnv::new();
    hash.write(prefix.as_bytes());
    hash.write(name.as_bytes());
    let tail = format!(".{:016x}", hash.0);
    let cut = full.len().min(MAX_NAME - tail.len());
    format!("{}{tail}", &full[..cut])
}

fn policy_name(p: &PolicyRef) -> String {
    format!("{}/{}", p.namespace, p.name)
}

fn rule_note(p: &PolicyRef) -> String {
    match p.rule {
        Some(rule) => format!("{} rule {rule}", policy_name(p)),
        None => policy_name(p),
    }
}

fn addr_datum(addr: IpAddr) -> Datum {
    match addr {
        IpAddr::V4(a) => Datum::Ipv4(a),
        IpAddr::V6(a) => Datum::Ipv6(a),
    }
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

#[cfg(test)]
mod interpret;
#[cfg(test)]
mod tests;
