//! Rule fragments that read like nft syntax. Each returns the expressions
//! nft itself generates for the same words (`nft --debug=netlink` is the
//! reference), dependencies included, so a rule is their concatenation:
//!
//! ```
//! use trellis_dataplane::nftables::dsl as nft;
//!
//! // iifname "int0" udp dport 53 counter drop
//! let rule = [nft::iifname("int0"), nft::udp_dport(53), nft::counter(), nft::drop()].concat();
//! assert_eq!(rule.len(), 8);
//! ```
//!
//! Every fragment works in `inet`, `ip` and `ip6` tables: address and ICMP
//! matches carry a `meta nfproto` check as nft adds in `inet` tables (in an
//! `ip` table it is always true; nft lists it there as `meta nfproto ipv4`).
//! Fragments use registers from [`Reg::R1`] on (a concatenated key spans
//! consecutive 32-bit registers, see [`load`]), freely, so a fragment never
//! depends on what an earlier one left in a register.
//!
//! Sets and maps: [`in_set`], [`not_in_set`], [`vmap`], [`dnat_map`] look
//! keys of [`Field`]s up in named sets (whose key type is [`key_type`] of
//! the same fields); [`in_anonymous_set`], [`anonymous_vmap`] and
//! [`numgen_vmap`] carry their own; [`update_set`] and [`add_to_set`] fill
//! dynamic sets from the packet path. For many services prefer [`one_in`]
//! rules to a map per service (see there why).
//!
//! Not re-exported at the module root on purpose: [`drop`] would shadow
//! `std::mem::drop` under a glob import.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::expr::{
    ByteorderOp, CmpOp, CtKey, CtState, CtStatus, DynsetOp, Expr, FibFlags, FibResult, IcmpxCode,
    LookupResult, MetaKey, NatFamily, NatFlags, NatKind, NumgenKind, PayloadBase, Reg, RejectKind,
    RouteType, SetRef, Verdict,
};
use super::set::{AnonSet, DataType, Datum, MapData, SetElem};

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// IFNAMSIZ: interface names are compared as 16 NUL-padded bytes.
const IFNAMSIZ: usize = 16;

/// `iifname "NAME"`. A name longer than 15 bytes makes the rule fail when
/// its batch is applied (no interface can have it).
pub fn iifname(name: &str) -> Vec<Expr> {
    ifname(MetaKey::IifName, name)
}

/// `oifname "NAME"` (see [`iifname`]).
pub fn oifname(name: &str) -> Vec<Expr> {
    ifname(MetaKey::OifName, name)
}

/// `iifname "PREFIX*"`: the input interface's name starts with `prefix`.
pub fn iifname_prefix(prefix: &str) -> Vec<Expr> {
    vec![
        meta(MetaKey::IifName),
        cmp(CmpOp::Eq, prefix.as_bytes().to_vec()),
    ]
}

/// `oifname "PREFIX*"` (see [`iifname_prefix`]).
pub fn oifname_prefix(prefix: &str) -> Vec<Expr> {
    vec![
        meta(MetaKey::OifName),
        cmp(CmpOp::Eq, prefix.as_bytes().to_vec()),
    ]
}

fn ifname(key: MetaKey, name: &str) -> Vec<Expr> {
    let mut data = name.as_bytes().to_vec();
    // At least one NUL, so "eth1" does not match "eth10" (too-long names
    // end up longer than the load and are refused before sending).
    data.resize((name.len() + 1).max(IFNAMSIZ), 0);
    vec![meta(key), cmp(CmpOp::Eq, data)]
}

/// `meta l4proto PROTO` (IP protocol number: 6 tcp, 17 udp, 1 icmp).
pub fn l4proto(proto: u8) -> Vec<Expr> {
    vec![meta(MetaKey::L4Proto), cmp(CmpOp::Eq, vec![proto])]
}

/// `meta nfproto ipv4`.
pub fn nfproto_ipv4() -> Vec<Expr> {
    vec![meta(MetaKey::NfProto), cmp(CmpOp::Eq, vec![NFPROTO_IPV4])]
}

/// `meta nfproto ipv6`.
pub fn nfproto_ipv6() -> Vec<Expr> {
    vec![meta(MetaKey::NfProto), cmp(CmpOp::Eq, vec![NFPROTO_IPV6])]
}

/// `ip saddr NET` / `ip6 saddr NET` (host bits of `net` are ignored).
pub fn ip_saddr_in(net: IpNet) -> Vec<Expr> {
    let (v4_offset, v6_offset) = (12, 8);
    addr_in(net, v4_offset, v6_offset)
}

/// `ip daddr NET` / `ip6 daddr NET`.
pub fn ip_daddr_in(net: IpNet) -> Vec<Expr> {
    let (v4_offset, v6_offset) = (16, 24);
    addr_in(net, v4_offset, v6_offset)
}

/// `ip saddr != NET` / `ip6 saddr != NET`.
pub fn ip_saddr_not_in(net: IpNet) -> Vec<Expr> {
    negated(ip_saddr_in(net))
}

/// `ip daddr != NET` / `ip6 daddr != NET`.
pub fn ip_daddr_not_in(net: IpNet) -> Vec<Expr> {
    negated(ip_daddr_in(net))
}

/// The same match with its last comparison inverted.
fn negated(mut exprs: Vec<Expr>) -> Vec<Expr> {
    if let Some(Expr::Cmp { op, .. }) = exprs.last_mut() {
        *op = CmpOp::Neq;
    }
    exprs
}

/// `ip saddr ADDR` / `ip6 saddr ADDR`.
pub fn ip_saddr(addr: IpAddr) -> Vec<Expr> {
    ip_saddr_in(IpNet::from(addr))
}

/// `ip daddr ADDR` / `ip6 daddr ADDR`.
pub fn ip_daddr(addr: IpAddr) -> Vec<Expr> {
    ip_daddr_in(IpNet::from(addr))
}

/// Like nft: a byte-aligned prefix loads and compares just its bytes, any
/// other prefix loads the whole address and masks it; `/0` only checks the
/// family.
fn addr_in(net: IpNet, v4_offset: u32, v6_offset: u32) -> Vec<Expr> {
    let net = net.trunc();
    let (mut exprs, offset, bytes) = match net {
        IpNet::V4(v4) => (nfproto_ipv4(), v4_offset, v4.addr().octets().to_vec()),
        IpNet::V6(v6) => (nfproto_ipv6(), v6_offset, v6.addr().octets().to_vec()),
    };
    let prefix = usize::from(net.prefix_len());
    if prefix == 0 {
        return exprs;
    }
    if prefix.is_multiple_of(8) {
        let len = prefix / 8;
        exprs.push(payload(PayloadBase::Network, offset, len as u32));
        exprs.push(cmp(CmpOp::Eq, bytes[..len].to_vec()));
    } else {
        let mask: Vec<u8> = match net {
            IpNet::V4(v4) => v4.netmask().octets().to_vec(),
            IpNet::V6(v6) => v6.netmask().octets().to_vec(),
        };
        exprs.push(payload(PayloadBase::Network, offset, bytes.len() as u32));
        exprs.push(Expr::Bitwise {
            sreg: Reg::R1,
            dreg: Reg::R1,
            xor: vec![0; mask.len()],
            mask,
        });
        exprs.push(cmp(CmpOp::Eq, bytes));
    }
    exprs
}

/// `icmpv6 type LO-HI` (133-137: neighbour discovery).
pub fn icmpv6_type_range(lo: u8, hi: u8) -> Vec<Expr> {
    let mut exprs = [nfproto_ipv6(), l4proto(IPPROTO_ICMPV6)].concat();
    exprs.push(payload(PayloadBase::Transport, 0, 1));
    exprs.push(cmp(CmpOp::Gte, vec![lo]));
    exprs.push(cmp(CmpOp::Lte, vec![hi]));
    exprs
}

/// `th dport LO-HI` (see [`th_dport`]).
pub fn th_dport_range(lo: u16, hi: u16) -> Vec<Expr> {
    vec![
        payload(PayloadBase::Transport, 2, 2),
        cmp(CmpOp::Gte, lo.to_be_bytes().to_vec()),
        cmp(CmpOp::Lte, hi.to_be_bytes().to_vec()),
    ]
}

/// `icmp type TYPE` (8 echo-request, 0 echo-reply).
pub fn icmp_type(icmp_type: u8) -> Vec<Expr> {
    let mut exprs = icmp();
    exprs.push(payload(PayloadBase::Transport, 0, 1));
    exprs.push(cmp(CmpOp::Eq, vec![icmp_type]));
    exprs
}

/// `icmp type TYPE icmp id LO-HI`: an ICMP echo (8 request, 0 reply) whose identifier is in
/// `lo..=hi`. One exact type, because `nft list` aborts on the bitwise trick that would
/// match both types without a set.
pub fn icmp_id_range(icmp_type: u8, lo: u16, hi: u16) -> Vec<Expr> {
    let mut exprs = self::icmp_type(icmp_type);
    exprs.push(payload(PayloadBase::Transport, 4, 2));
    exprs.push(cmp(CmpOp::Gte, lo.to_be_bytes().to_vec()));
    exprs.push(cmp(CmpOp::Lte, hi.to_be_bytes().to_vec()));
    exprs
}

fn icmp() -> Vec<Expr> {
    [nfproto_ipv4(), l4proto(IPPROTO_ICMP)].concat()
}

/// `udp dport PORT`.
pub fn udp_dport(port: u16) -> Vec<Expr> {
    transport_port(IPPROTO_UDP, 2, port)
}

/// `udp sport PORT`.
pub fn udp_sport(port: u16) -> Vec<Expr> {
    transport_port(IPPROTO_UDP, 0, port)
}

/// `tcp dport PORT`.
pub fn tcp_dport(port: u16) -> Vec<Expr> {
    transport_port(IPPROTO_TCP, 2, port)
}

/// `tcp sport PORT`.
pub fn tcp_sport(port: u16) -> Vec<Expr> {
    transport_port(IPPROTO_TCP, 0, port)
}

fn transport_port(proto: u8, offset: u32, port: u16) -> Vec<Expr> {
    let mut exprs = l4proto(proto);
    exprs.push(payload(PayloadBase::Transport, offset, 2));
    exprs.push(cmp(CmpOp::Eq, port.to_be_bytes().to_vec()));
    exprs
}

/// `ct state STATES`: true if the connection is in any of them, e.g.
/// `ct_state(CtState::ESTABLISHED | CtState::RELATED)`.
pub fn ct_state(states: CtState) -> Vec<Expr> {
    ct_bits(CtKey::State, states.0)
}

/// `ct status BITS`: true if any of them is set.
pub fn ct_status(bits: CtStatus) -> Vec<Expr> {
    ct_bits(CtKey::Status, bits.0)
}

fn ct_bits(key: CtKey, bits: u32) -> Vec<Expr> {
    vec![
        Expr::Ct { key, dreg: Reg::R1 },
        Expr::Bitwise {
            sreg: Reg::R1,
            dreg: Reg::R1,
            mask: bits.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        },
        cmp(CmpOp::Neq, vec![0; 4]),
    ]
}

/// `ct mark MARK`.
pub fn ct_mark(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Ct {
            key: CtKey::Mark,
            dreg: Reg::R1,
        },
        cmp(CmpOp::Eq, mark.to_ne_bytes().to_vec()),
    ]
}

/// `ct mark set MARK`.
pub fn set_ct_mark(mark: u32) -> Vec<Expr> {
    vec![
        immediate(Reg::R1, mark.to_ne_bytes().to_vec()),
        Expr::CtSet {
            key: CtKey::Mark,
            sreg: Reg::R1,
        },
    ]
}

/// `meta mark MARK`.
pub fn meta_mark(mark: u32) -> Vec<Expr> {
    vec![
        meta(MetaKey::Mark),
        cmp(CmpOp::Eq, mark.to_ne_bytes().to_vec()),
    ]
}

/// `meta mark set MARK`.
pub fn set_meta_mark(mark: u32) -> Vec<Expr> {
    vec![
        immediate(Reg::R1, mark.to_ne_bytes().to_vec()),
        Expr::MetaSet {
            key: MetaKey::Mark,
            sreg: Reg::R1,
        },
    ]
}

/// `numgen random mod MODULUS < BELOW`: true with probability
/// `below / modulus`. The host-order random number is turned into network
/// order first, as nft does, because the kernel compares bytes.
pub fn numgen_random_below(modulus: u32, below: u32) -> Vec<Expr> {
    vec![
        Expr::Numgen {
            kind: NumgenKind::Random,
            modulus,
            offset: 0,
            dreg: Reg::R1,
        },
        Expr::Byteorder {
            sreg: Reg::R1,
            dreg: Reg::R1,
            op: ByteorderOp::Hton,
            len: 4,
            size: 4,
        },
        cmp(CmpOp::Lt, below.to_be_bytes().to_vec()),
    ]
}

/// `dnat ip to ADDR` / `dnat ip6 to ADDR`.
pub fn dnat_ip(addr: IpAddr) -> Vec<Expr> {
    nat(NatKind::Dnat, addr, None)
}

/// `dnat ip to ADDR:PORT` (the rule must match a transport protocol first,
/// e.g. with [`udp_dport`]).
pub fn dnat_ip_port(addr: IpAddr, port: u16) -> Vec<Expr> {
    nat(NatKind::Dnat, addr, Some(port))
}

/// `snat ip to ADDR` / `snat ip6 to ADDR`.
pub fn snat_ip(addr: IpAddr) -> Vec<Expr> {
    nat(NatKind::Snat, addr, None)
}

fn nat(kind: NatKind, addr: IpAddr, port: Option<u16>) -> Vec<Expr> {
    let (family, bytes) = match addr {
        IpAddr::V4(v4) => (NatFamily::Ipv4, v4.octets().to_vec()),
        IpAddr::V6(v6) => (NatFamily::Ipv6, v6.octets().to_vec()),
    };
    let mut exprs = vec![immediate(Reg::R1, bytes)];
    if let Some(port) = port {
        exprs.push(immediate(Reg::R2, port.to_be_bytes().to_vec()));
    }
    exprs.push(Expr::Nat {
        kind,
        family,
        addr: Some(Reg::R1),
        port: port.map(|_| Reg::R2),
    });
    exprs
}

/// `th dport PORT`: the destination port of any transport header with
/// ports at the usual place (TCP, UDP, SCTP, ...), without a protocol
/// check: match the protocol first (or key on `meta l4proto` too).
pub fn th_dport(port: u16) -> Vec<Expr> {
    vec![
        payload(PayloadBase::Transport, 2, 2),
        cmp(CmpOp::Eq, port.to_be_bytes().to_vec()),
    ]
}

/// `th sport PORT` (see [`th_dport`]).
pub fn th_sport(port: u16) -> Vec<Expr> {
    vec![
        payload(PayloadBase::Transport, 0, 2),
        cmp(CmpOp::Eq, port.to_be_bytes().to_vec()),
    ]
}

/// A packet field that can be a set key or part of a concatenated one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// `ip saddr` (with its `meta nfproto ipv4` check).
    IpSaddr,
    /// `ip daddr`.
    IpDaddr,
    /// `ip6 saddr` (with its `meta nfproto ipv6` check).
    Ip6Saddr,
    /// `ip6 daddr`.
    Ip6Daddr,
    /// `meta l4proto`.
    L4Proto,
    /// `th sport`.
    ThSport,
    /// `th dport`.
    ThDport,
    /// `meta mark`.
    Mark,
    /// `iifname`.
    IifName,
    /// `oifname`.
    OifName,
}

impl Field {
    /// The set key type of the field, for [`super::SetSpec`].
    pub fn data_type(self) -> DataType {
        match self {
            Field::IpSaddr | Field::IpDaddr => DataType::Ipv4Addr,
            Field::Ip6Saddr | Field::Ip6Daddr => DataType::Ipv6Addr,
            Field::L4Proto => DataType::InetProto,
            Field::ThSport | Field::ThDport => DataType::InetService,
            Field::Mark => DataType::Mark,
            Field::IifName | Field::OifName => DataType::IfName,
        }
    }

    fn load(self, dreg: Reg) -> Expr {
        let payload = |base, offset, len| Expr::Payload {
            base,
            offset,
            len,
            dreg,
        };
        let meta = |key| Expr::Meta { key, dreg };
        match self {
            Field::IpSaddr => payload(PayloadBase::Network, 12, 4),
            Field::IpDaddr => payload(PayloadBase::Network, 16, 4),
            Field::Ip6Saddr => payload(PayloadBase::Network, 8, 16),
            Field::Ip6Daddr => payload(PayloadBase::Network, 24, 16),
            Field::L4Proto => meta(MetaKey::L4Proto),
            Field::ThSport => payload(PayloadBase::Transport, 0, 2),
            Field::ThDport => payload(PayloadBase::Transport, 2, 2),
            Field::Mark => meta(MetaKey::Mark),
            Field::IifName => meta(MetaKey::IifName),
            Field::OifName => meta(MetaKey::OifName),
        }
    }
}

/// The key type of a set keyed by these fields: `SetSpec::vmap(&key_type(&[Field::IpDaddr,
/// Field::L4Proto, Field::ThDport]))` is `type ipv4_addr . inet_proto . inet_service :
/// verdict`.
pub fn key_type(fields: &[Field]) -> Vec<DataType> {
    fields.iter().map(|f| f.data_type()).collect()
}

/// Loads `FIELD . FIELD ...` into [`Reg::R1`] and the 32-bit registers
/// after it, as nft does for a concatenation (`ip daddr . meta l4proto . th
/// dport` goes to registers 1, 9 and 10), after the address family checks
/// the fields need. Fields whose registers would run past the last one are
/// left out, and the rule is then refused before sending (its lookup reads
/// more than was loaded).
pub fn load(fields: &[Field]) -> Vec<Expr> {
    let mut exprs = Vec::new();
    let v4 = fields
        .iter()
        .any(|f| matches!(f, Field::IpSaddr | Field::IpDaddr));
    let v6 = fields
        .iter()
        .any(|f| matches!(f, Field::Ip6Saddr | Field::Ip6Daddr));
    if v4 {
        exprs.extend(nfproto_ipv4());
    }
    if v6 {
        exprs.extend(nfproto_ipv6());
    }
    let mut reg = Some(Reg::R1);
    for field in fields {
        let Some(dreg) = reg else { break };
        exprs.push(field.load(dreg));
        reg = dreg.after(field.data_type().width());
    }
    exprs
}

/// `FIELDS @set`: the rule goes on only if the key is in the named set.
pub fn in_set(fields: &[Field], set: &str) -> Vec<Expr> {
    lookup(fields, SetRef::Named(set.to_owned()), LookupResult::Present)
}

/// `FIELDS != @set`: the rule goes on only if the key is not in the set.
pub fn not_in_set(fields: &[Field], set: &str) -> Vec<Expr> {
    lookup(fields, SetRef::Named(set.to_owned()), LookupResult::Absent)
}

/// `FIELDS vmap @map`: applies the verdict the key maps to (the rule does
/// nothing for a key that is not in the map).
pub fn vmap(fields: &[Field], map: &str) -> Vec<Expr> {
    lookup(fields, SetRef::Named(map.to_owned()), LookupResult::Verdict)
}

/// `FIELDS { KEY, ... }`: the key is one of these (an anonymous set, e.g.
/// `meta l4proto { tcp, udp }`); each key built with [`super::concat`].
pub fn in_anonymous_set(fields: &[Field], keys: Vec<Vec<u8>>) -> Vec<Expr> {
    let set = AnonSet {
        key: key_type(fields),
        data: None,
        elements: keys.into_iter().map(SetElem::key).collect(),
    };
    lookup(
        fields,
        SetRef::Anonymous(Box::new(set)),
        LookupResult::Present,
    )
}

/// `FIELDS vmap { KEY : VERDICT, ... }` with an anonymous verdict map.
pub fn anonymous_vmap(fields: &[Field], entries: Vec<(Vec<u8>, Verdict)>) -> Vec<Expr> {
    let set = AnonSet {
        key: key_type(fields),
        data: Some(MapData::Verdict),
        elements: entries
            .into_iter()
            .map(|(key, verdict)| SetElem::verdict(key, verdict))
            .collect(),
    };
    lookup(
        fields,
        SetRef::Anonymous(Box::new(set)),
        LookupResult::Verdict,
    )
}

fn lookup(fields: &[Field], set: SetRef, result: LookupResult) -> Vec<Expr> {
    let mut exprs = load(fields);
    exprs.push(Expr::Lookup {
        sreg: Reg::R1,
        set,
        result,
    });
    exprs
}

/// `numgen random mod N vmap { 0 : V0, 1 : V1, ... }` with N the number of
/// verdicts: one of them, uniformly at random, e.g. `goto` one of a
/// service's endpoint chains. The map is anonymous: created with the rule,
/// deleted with it. Each anonymous map is a set of the table, which the
/// kernel searches by name in a list: fine for hundreds, quadratic for
/// tens of thousands (about 9 s for 10,000 services here); see [`one_in`].
pub fn numgen_vmap(kind: NumgenKind, verdicts: Vec<Verdict>) -> Vec<Expr> {
    let modulus = u32::try_from(verdicts.len()).unwrap_or(u32::MAX);
    let set = AnonSet {
        key: vec![DataType::Integer],
        data: Some(MapData::Verdict),
        elements: (0..)
            .zip(verdicts)
            .map(|(i, verdict)| SetElem::verdict(Datum::Integer(i).bytes(), verdict))
            .collect(),
    };
    vec![
        Expr::Numgen {
            kind,
            modulus,
            offset: 0,
            dreg: Reg::R1,
        },
        Expr::Lookup {
            sreg: Reg::R1,
            set: SetRef::Anonymous(Box::new(set)),
            result: LookupResult::Verdict,
        },
    ]
}

/// `numgen random mod N 0` (equal to 0): true with probability 1/N, a
/// fresh draw in every rule. A uniform choice among N endpoints without a
/// set: rule `i` (from 0) is `one_in(N - i)` then `goto` endpoint `i`, the
/// last rule a plain `goto` (what kube-proxy's iptables mode does with
/// `statistic`). Zero is zero in either byte order, so unlike
/// [`numgen_random_below`] it needs no conversion: three expressions.
///
/// Prefer it to [`numgen_vmap`] for thousands of services: the kernel
/// keeps a table's sets in a list searched by name, so a map per service
/// costs time quadratic in the number of services (seconds at ten
/// thousand), and a verdict map shared by all services is walked whole, at
/// every commit, for each rule that uses it.
pub fn one_in(n: u32) -> Vec<Expr> {
    vec![
        Expr::Numgen {
            kind: NumgenKind::Random,
            modulus: n,
            offset: 0,
            dreg: Reg::R1,
        },
        cmp(CmpOp::Eq, vec![0; 4]),
    ]
}

/// `update @set { FIELDS [timeout T] }`: adds the key to a dynamic set, or
/// restarts its timeout (`None`: the set's default). With [`in_set`] on
/// the same set this is ClientIP session affinity: `update @aff { ip saddr
/// timeout 3h }` where the choice is made, `ip saddr @aff goto ...` before.
pub fn update_set(fields: &[Field], set: &str, timeout: Option<Duration>) -> Vec<Expr> {
    dynset(DynsetOp::Update, fields, set, timeout)
}

/// `add @set { FIELDS [timeout T] }`: adds the key unless it is there.
pub fn add_to_set(fields: &[Field], set: &str, timeout: Option<Duration>) -> Vec<Expr> {
    dynset(DynsetOp::Add, fields, set, timeout)
}

fn dynset(op: DynsetOp, fields: &[Field], set: &str, timeout: Option<Duration>) -> Vec<Expr> {
    let mut exprs = load(fields);
    exprs.push(Expr::Dynset {
        op,
        set: set.to_owned(),
        key: Reg::R1,
        data: None,
        timeout,
    });
    exprs
}

/// `dnat ip to FIELDS map @map` / `dnat ip6 to ...`: destination NAT to the
/// address (and port, if `with_port`) the key maps to; the map's values are
/// `ipv4_addr [. inet_service]` (or `ipv6_addr ...`). With a port, the rule
/// must match a transport protocol first.
pub fn dnat_map(fields: &[Field], map: &str, family: NatFamily, with_port: bool) -> Vec<Expr> {
    let mut exprs = lookup(
        fields,
        SetRef::Named(map.to_owned()),
        LookupResult::Value(Reg::R1),
    );
    let addr_len = match family {
        NatFamily::Ipv4 => 4,
        NatFamily::Ipv6 => 16,
    };
    exprs.push(Expr::Nat {
        kind: NatKind::Dnat,
        family,
        addr: Some(Reg::R1),
        port: if with_port {
            Reg::R1.after(addr_len)
        } else {
            None
        },
    });
    exprs
}

/// `fib daddr type TYPE`: the destination address is of this route type
/// (`local`: one of this host's addresses).
pub fn fib_daddr_type(route_type: RouteType) -> Vec<Expr> {
    vec![
        Expr::Fib {
            flags: FibFlags::DADDR,
            result: FibResult::AddrType,
            dreg: Reg::R1,
        },
        cmp(CmpOp::Eq, route_type.code().to_ne_bytes().to_vec()),
    ]
}

/// `reject`: as nft's default in an `inet` table, ICMP or ICMPv6 port
/// unreachable by the packet's family (`reject with icmpx type
/// port-unreachable`).
pub fn reject() -> Vec<Expr> {
    reject_icmpx(IcmpxCode::PortUnreachable)
}

/// `reject with icmpx type CODE`.
pub fn reject_icmpx(code: IcmpxCode) -> Vec<Expr> {
    vec![Expr::Reject {
        kind: RejectKind::IcmpxUnreach,
        code: code.code(),
    }]
}

/// `reject with icmp type CODE` for IPv4 packets (3: port-unreachable).
pub fn reject_icmp(code: u8) -> Vec<Expr> {
    let mut exprs = nfproto_ipv4();
    exprs.push(Expr::Reject {
        kind: RejectKind::IcmpUnreach,
        code,
    });
    exprs
}

/// `reject with icmpv6 type CODE` for IPv6 packets (4: port-unreachable).
pub fn reject_icmpv6(code: u8) -> Vec<Expr> {
    let mut exprs = nfproto_ipv6();
    exprs.push(Expr::Reject {
        kind: RejectKind::IcmpUnreach,
        code,
    });
    exprs
}

/// `reject with tcp reset` (TCP packets only, which it checks).
pub fn reject_tcp_reset() -> Vec<Expr> {
    let mut exprs = l4proto(IPPROTO_TCP);
    exprs.push(Expr::Reject {
        kind: RejectKind::TcpReset,
        code: 0,
    });
    exprs
}

/// `masquerade fully-random`: source ports from a full PRNG, so many
/// clients behind one address do not clash.
pub fn masquerade_fully_random() -> Vec<Expr> {
    vec![Expr::Masquerade {
        flags: NatFlags::FULLY_RANDOM,
    }]
}

/// `masquerade`.
pub fn masquerade() -> Vec<Expr> {
    vec![Expr::Masquerade {
        flags: NatFlags::NONE,
    }]
}

/// `counter`.
pub fn counter() -> Vec<Expr> {
    vec![Expr::Counter]
}

/// `accept`.
pub fn accept() -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Accept)]
}

/// `drop`.
pub fn drop() -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Drop)]
}

/// `return`.
pub fn return_() -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Return)]
}

/// `jump CHAIN` (a regular chain of the same table).
pub fn jump(chain: &str) -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Jump(chain.to_owned()))]
}

/// `goto CHAIN` (a regular chain of the same table).
pub fn goto(chain: &str) -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Goto(chain.to_owned()))]
}

fn meta(key: MetaKey) -> Expr {
    Expr::Meta { key, dreg: Reg::R1 }
}

fn payload(base: PayloadBase, offset: u32, len: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg: Reg::R1,
    }
}

fn cmp(op: CmpOp, data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: Reg::R1,
        op,
        data,
    }
}

fn immediate(dreg: Reg, data: Vec<u8>) -> Expr {
    Expr::Immediate { dreg, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::expr::check_rule;

    #[test]
    fn interface_names_are_nul_padded_to_16_bytes() {
        let exprs = iifname("int0");
        let Expr::Cmp { data, .. } = &exprs[1] else {
            panic!("{exprs:?}")
        };
        assert_eq!(data.len(), 16);
        assert_eq!(&data[..5], b"int0\0");
        assert_eq!(check_rule(&exprs), Ok(()));
        assert!(check_rule(&iifname("sixteen-bytes-xx")).is_err());
        assert_eq!(check_rule(&iifname("fifteen-bytes-x")), Ok(()));
    }

    #[test]
    fn byte_aligned_prefixes_load_only_their_bytes() {
        // ip saddr 10.1.2.0/24: payload load 3b @ network header + 12, cmp eq 0a0102
        let exprs = ip_saddr_in("10.1.2.77/24".parse().unwrap());
        assert_eq!(exprs.len(), 4);
        assert_eq!(
            exprs[2],
            Expr::Payload {
                base: PayloadBase::Network,
                offset: 12,
                len: 3,
                dreg: Reg::R1
            }
        );
        assert_eq!(exprs[3], cmp(CmpOp::Eq, vec![10, 1, 2]));
        // ip saddr 10.1.0.0/20: whole address, masked.
        let exprs = ip_saddr_in("10.1.0.0/20".parse().unwrap());
        assert_eq!(exprs.len(), 5);
        assert!(matches!(&exprs[3], Expr::Bitwise { mask, .. } if mask == &vec![255, 255, 240, 0]));
        // ip6 daddr fd00::1: 16 bytes at network header + 24.
        let exprs = ip_daddr("fd00::1".parse().unwrap());
        assert!(matches!(
            exprs[2],
            Expr::Payload {
                offset: 24,
                len: 16,
                ..
            }
        ));
        assert_eq!(exprs[1], cmp(CmpOp::Eq, vec![NFPROTO_IPV6]));
    }

    #[test]
    fn numgen_comparison_is_in_network_order() {
        let exprs = numgen_random_below(100, 50);
        assert_eq!(exprs[2], cmp(CmpOp::Lt, vec![0, 0, 0, 50]));
        assert_eq!(check_rule(&exprs), Ok(()));
    }

    #[test]
    fn concatenations_load_into_consecutive_32_bit_registers() {
        // nft: meta load nfproto => reg 1, cmp, payload ... => reg 1,
        // meta load l4proto => reg 9, payload ... => reg 10, lookup dreg 0.
        let exprs = vmap(&[Field::IpDaddr, Field::L4Proto, Field::ThDport], "m");
        let regs: Vec<u32> = exprs
            .iter()
            .filter_map(|e| match e {
                Expr::Payload { dreg, .. } | Expr::Meta { dreg, .. } => Some(dreg.wire()),
                _ => None,
            })
            .collect();
        assert_eq!(regs, vec![1, 1, 9, 10]);
        // IPv6: reg 1 (16 bytes), reg 2, reg 13.
        let exprs = load(&[Field::Ip6Daddr, Field::L4Proto, Field::ThDport]);
        let regs: Vec<u32> = exprs
            .iter()
            .skip(2)
            .filter_map(|e| match e {
                Expr::Payload { dreg, .. } | Expr::Meta { dreg, .. } => Some(dreg.wire()),
                _ => None,
            })
            .collect();
        assert_eq!(regs, vec![1, 2, 13]);
        assert_eq!(check_rule(&exprs), Ok(()));
    }

    #[test]
    fn numgen_vmap_keys_are_host_order_integers() {
        let exprs = numgen_vmap(
            NumgenKind::Random,
            vec![Verdict::Goto("a".into()), Verdict::Goto("b".into())],
        );
        let Expr::Lookup {
            set: SetRef::Anonymous(set),
            ..
        } = &exprs[1]
        else {
            panic!("{exprs:?}")
        };
        assert_eq!(set.elements[1].key, 1u32.to_ne_bytes());
        assert_eq!(check_rule(&exprs), Ok(()));
        // An empty map is refused before sending.
        assert!(check_rule(&numgen_vmap(NumgenKind::Random, vec![])).is_err());
    }

    #[test]
    fn nat_with_port_uses_the_second_register() {
        let exprs = dnat_ip_port("10.0.0.2".parse().unwrap(), 6666);
        assert_eq!(exprs[1], immediate(Reg::R2, vec![0x1a, 0x0a]));
        assert_eq!(check_rule(&exprs), Ok(()));
    }
}
