//! A small nftables interpreter over rendered tables, for tests: the expressions network
//! policy renders (meta, payload, bitwise, cmp, ct state, fib, lookups in named sets and
//! verdict maps, counter, verdicts), run the way the kernel runs them, so that a packet can
//! be put through a node's table and the rendering held equal to the plan on random
//! clusters. Not a model of the kernel beyond that: an expression it does not know fails
//! the test rather than guessing.

use crate::nft_table::RenderedTable;
use std::net::IpAddr;
use trellis_dataplane::nftables::{
    CmpOp, CtKey, CtState, ElemValue, Expr, LookupResult, MetaKey, PayloadBase, Reg, RouteType,
    SetRef, Verdict,
};

/// A packet as one hook of one node sees it.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub l4proto: u8,
    pub dport: u16,
    pub iif: &'a str,
    pub oif: &'a str,
    /// Part of a connection conntrack has seen both ways (`ct state established`).
    pub established: bool,
    /// The source is one of this node's addresses (`fib saddr type local`).
    pub saddr_local: bool,
}

/// What the base chain's rules decided (its policy is accept: falling through accepts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accept,
    Drop,
}

pub fn run(table: &RenderedTable, base: &str, packet: &Packet<'_>) -> Outcome {
    match chain(table, base, packet, 0) {
        Flow::Drop => Outcome::Drop,
        Flow::Accept | Flow::Next => Outcome::Accept,
    }
}

enum Flow {
    /// Fell off the end, or `return`.
    Next,
    Accept,
    Drop,
}

fn chain(table: &RenderedTable, name: &str, packet: &Packet<'_>, depth: usize) -> Flow {
    assert!(depth < 16, "jumps nest too deep at {name}");
    let chain = (table.chains.get(name)).unwrap_or_else(|| panic!("no chain {name}"));
    for rule in &chain.rules {
        let Some(verdict) = rule_verdict(table, &rule.exprs, packet) else {
            continue;
        };
        match verdict {
            Verdict::Accept => return Flow::Accept,
            Verdict::Drop => return Flow::Drop,
            Verdict::Return => return Flow::Next,
            Verdict::Continue => {}
            Verdict::Jump(to) => match self::chain(table, &to, packet, depth + 1) {
                Flow::Next => {}
                decided => return decided,
            },
            Verdict::Goto(to) => return self::chain(table, &to, packet, depth + 1),
        }
    }
    Flow::Next
}

/// The rule's verdict when every expression matches (`Continue` for one without), `None`
/// when one does not.
fn rule_verdict(table: &RenderedTable, exprs: &[Expr], packet: &Packet<'_>) -> Option<Verdict> {
    let mut regs = Registers([0; 64]);
    for expr in exprs {
        match expr {
            Expr::Meta { key, dreg } => regs.set(*dreg, &meta(*key, packet)),
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                let header = header(*base, packet);
                let (from, to) = (*offset as usize, (*offset + *len) as usize);
                regs.set(*dreg, &header[from..to]);
            }
            Expr::Cmp { sreg, op, data } => {
                let have = regs.get(*sreg, data.len());
                let ordering = have.as_slice().cmp(data.as_slice());
                let holds = match op {
                    CmpOp::Eq => ordering.is_eq(),
                    CmpOp::Neq => ordering.is_ne(),
                    CmpOp::Lt => ordering.is_lt(),
                    CmpOp::Lte => ordering.is_le(),
                    CmpOp::Gt => ordering.is_gt(),
                    CmpOp::Gte => ordering.is_ge(),
                };
                if !holds {
                    return None;
                }
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                let value = regs.get(*sreg, mask.len());
                let out: Vec<u8> = (0..mask.len())
                    .map(|i| (value[i] & mask[i]) ^ xor[i])
                    .collect();
                regs.set(*dreg, &out);
            }
            Expr::Ct {
                key: CtKey::State,
                dreg,
            } => {
                let state = if packet.established {
                    CtState::ESTABLISHED
                } else {
                    CtState::NEW
                };
                regs.set(*dreg, &state.0.to_ne_bytes());
            }
            Expr::Fib { dreg, .. } => {
                let kind = if packet.saddr_local {
                    RouteType::Local
                } else {
                    RouteType::Unicast
                };
                regs.set(*dreg, &kind.code().to_ne_bytes());
            }
            Expr::Counter => {}
            Expr::Lookup {
                sreg,
                set: SetRef::Named(name),
                result,
            } => {
                let set = (table.sets.get(name)).unwrap_or_else(|| panic!("no set {name}"));
                let len: usize = (set.spec.key.iter())
                    .map(|t| t.width().div_ceil(4) * 4)
                    .sum();
                let found = set.elements.get(&regs.get(*sreg, len));
                match result {
                    LookupResult::Present if found.is_none() => return None,
                    LookupResult::Absent if found.is_some() => return None,
                    LookupResult::Present | LookupResult::Absent => {}
                    LookupResult::Verdict => match found {
                        Some(Some(ElemValue::Verdict(v))) => return Some(v.clone()),
                        // A key the map does not hold ends the rule.
                        _ => return None,
                    },
                    other => panic!("lookup {other:?} is not interpreted"),
                }
            }
            Expr::Verdict(v) => return Some(v.clone()),
            other => panic!("{other:?} is not interpreted"),
        }
    }
    Some(Verdict::Continue)
}

/// Sixteen 32-bit registers, addressed as the kernel does (`reg 1` is the first four).
struct Registers([u8; 64]);

impl Registers {
    fn set(&mut self, reg: Reg, bytes: &[u8]) {
        let at = usize::from(reg.index()) * 4;
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        // The kernel zeroes the rest of the last 32-bit register a load touches.
        let end = at + bytes.len().div_ceil(4) * 4;
        self.0[at + bytes.len()..end].fill(0);
    }

    fn get(&self, reg: Reg, len: usize) -> Vec<u8> {
        let at = usize::from(reg.index()) * 4;
        self.0[at..at + len].to_vec()
    }
}

fn meta(key: MetaKey, packet: &Packet<'_>) -> Vec<u8> {
    let ifname = |name: &str| {
        let mut bytes = name.as_bytes().to_vec();
        bytes.resize(16, 0);
        bytes
    };
    match key {
        MetaKey::NfProto => vec![if packet.saddr.is_ipv4() { 2 } else { 10 }],
        MetaKey::L4Proto => vec![packet.l4proto],
        MetaKey::IifName => ifname(packet.iif),
        MetaKey::OifName => ifname(packet.oif),
        MetaKey::Mark => vec![0; 4],
        other => panic!("meta {other:?} is not interpreted"),
    }
}

/// The network header (addresses where IPv4 and IPv6 keep them) or the transport header
/// (ports first, as TCP, UDP and SCTP have them).
fn header(base: PayloadBase, packet: &Packet<'_>) -> Vec<u8> {
    match (base, packet.saddr, packet.daddr) {
        (PayloadBase::Network, IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0; 20];
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            h
        }
        (PayloadBase::Network, IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0; 40];
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h
        }
        (PayloadBase::Transport, ..) => {
            let mut h = vec![0; 8];
            h[2..4].copy_from_slice(&packet.dport.to_be_bytes());
            h
        }
        other => panic!("no header for {other:?}"),
    }
}
