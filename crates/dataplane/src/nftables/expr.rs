//! Typed nf_tables expressions and their netlink encodings.
//!
//! A rule is a list of expressions run in order on registers: loads
//! ([`Expr::Meta`], [`Expr::Payload`], [`Expr::Ct`], [`Expr::Numgen`],
//! [`Expr::Immediate`]) fill registers, [`Expr::Cmp`] stops the rule when a
//! comparison fails, [`Expr::Lookup`] consults a set or map (and can stop
//! the rule, load a value or apply a verdict), statements ([`Expr::Nat`],
//! [`Expr::CtSet`], [`Expr::Dynset`], [`Expr::Reject`], ...) act on the
//! packet or the ruleset, and [`Expr::Verdict`] decides its fate. The encodings are
//! byte for byte what `nft --debug=netlink` shows for the same rule.

use std::fmt;

use super::set::AnonSet;
pub use super::verdict::Verdict;
use super::wire::{self, Attrs};

/// A data register, in the kernel's 32-bit register numbering
/// (`NFT_REG32_00` to `NFT_REG32_15`). A value longer than 4 bytes spans
/// consecutive registers: an IPv6 address loaded into [`Reg::R1`] fills
/// 32-bit registers 0 to 3.
///
/// On the wire a register that starts one of the legacy 16-byte registers
/// is written as `NFT_REG_1` .. `NFT_REG_4`, the way nft does it, so
/// `nft --debug=netlink` shows the same `reg 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reg(u8);

impl Reg {
    /// 32-bit registers 0-3 (`reg 1` in nft's output).
    pub const R1: Reg = Reg(0);
    /// 32-bit registers 4-7 (`reg 2`).
    pub const R2: Reg = Reg(4);
    /// 32-bit registers 8-11 (`reg 3`).
    pub const R3: Reg = Reg(8);
    /// 32-bit registers 12-15 (`reg 4`).
    pub const R4: Reg = Reg(12);

    /// 32-bit register `index` (0 to 15).
    pub const fn r32(index: u8) -> Option<Reg> {
        if index < 16 { Some(Reg(index)) } else { None }
    }

    /// The first register after a value of `len` bytes stored from here on,
    /// e.g. where the second part of a concatenation goes.
    pub fn after(self, len: usize) -> Option<Reg> {
        let next = usize::from(self.0) + len.div_ceil(4);
        u8::try_from(next).ok().and_then(Reg::r32)
    }

    /// The 32-bit register index (0 to 15).
    pub fn index(self) -> u8 {
        self.0
    }

    /// The register number as written into an attribute.
    pub(crate) fn wire(self) -> u32 {
        const NFT_REG_1: u32 = 1;
        const NFT_REG32_00: u32 = 8;
        let index = u32::from(self.0);
        if index.is_multiple_of(4) {
            NFT_REG_1 + index / 4
        } else {
            NFT_REG32_00 + index
        }
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reg {}", self.wire())
    }
}

/// What a [`Expr::Meta`] load or [`Expr::MetaSet`] is about (`NFT_META_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MetaKey {
    /// Packet mark (4 bytes, host byte order).
    Mark,
    /// Input interface name (16 bytes, NUL-padded).
    IifName,
    /// Output interface name (16 bytes, NUL-padded).
    OifName,
    /// Layer 3 protocol of the hook (1 byte, `NFPROTO_*`: 2 for IPv4, 10 for IPv6).
    NfProto,
    /// Layer 4 protocol (1 byte, IP protocol number).
    L4Proto,
}

impl MetaKey {
    fn code(self) -> u32 {
        match self {
            MetaKey::Mark => 3,
            MetaKey::IifName => 6,
            MetaKey::OifName => 7,
            MetaKey::NfProto => 15,
            MetaKey::L4Proto => 16,
        }
    }

    /// How many bytes a load of this key puts into its register.
    pub fn width(self) -> usize {
        match self {
            MetaKey::Mark => 4,
            MetaKey::IifName | MetaKey::OifName => 16,
            MetaKey::NfProto | MetaKey::L4Proto => 1,
        }
    }
}

/// Which header a [`Expr::Payload`] offset counts from (`NFT_PAYLOAD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PayloadBase {
    LinkLayer,
    Network,
    Transport,
}

impl PayloadBase {
    fn code(self) -> u32 {
        match self {
            PayloadBase::LinkLayer => 0,
            PayloadBase::Network => 1,
            PayloadBase::Transport => 2,
        }
    }
}

/// Comparison of [`Expr::Cmp`] (`NFT_CMP_*`). The kernel compares bytes
/// with `memcmp`, so ordering comparisons need big-endian data (see
/// [`Expr::Byteorder`] for host-order values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
}

impl CmpOp {
    fn code(self) -> u32 {
        match self {
            CmpOp::Eq => 0,
            CmpOp::Neq => 1,
            CmpOp::Lt => 2,
            CmpOp::Lte => 3,
            CmpOp::Gt => 4,
            CmpOp::Gte => 5,
        }
    }
}

/// What a [`Expr::Ct`] load or [`Expr::CtSet`] is about (`NFT_CT_*`). All
/// three are 4 bytes in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CtKey {
    /// Bits of [`CtState`].
    State,
    /// Bits of [`CtStatus`].
    Status,
    /// Connection mark.
    Mark,
}

impl CtKey {
    fn code(self) -> u32 {
        match self {
            CtKey::State => 0,
            CtKey::Status => 2,
            CtKey::Mark => 3,
        }
    }

    pub fn width(self) -> usize {
        4
    }
}

/// Conntrack state bits as `ct state` loads them (`NF_CT_STATE_*_BIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtState(pub u32);

impl CtState {
    pub const INVALID: CtState = CtState(1 << 0);
    pub const ESTABLISHED: CtState = CtState(1 << 1);
    pub const RELATED: CtState = CtState(1 << 2);
    pub const NEW: CtState = CtState(1 << 3);
    pub const UNTRACKED: CtState = CtState(1 << 6);
}

impl std::ops::BitOr for CtState {
    type Output = CtState;
    fn bitor(self, other: CtState) -> CtState {
        CtState(self.0 | other.0)
    }
}

/// Conntrack status bits as `ct status` loads them (`IPS_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtStatus(pub u32);

impl CtStatus {
    pub const EXPECTED: CtStatus = CtStatus(1 << 0);
    pub const SEEN_REPLY: CtStatus = CtStatus(1 << 1);
    pub const ASSURED: CtStatus = CtStatus(1 << 2);
    pub const CONFIRMED: CtStatus = CtStatus(1 << 3);
    pub const SNAT: CtStatus = CtStatus(1 << 4);
    pub const DNAT: CtStatus = CtStatus(1 << 5);
}

impl std::ops::BitOr for CtStatus {
    type Output = CtStatus;
    fn bitor(self, other: CtStatus) -> CtStatus {
        CtStatus(self.0 | other.0)
    }
}

/// Direction of [`Expr::Byteorder`] (`NFT_BYTEORDER_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ByteorderOp {
    /// Network to host order.
    Ntoh,
    /// Host to network order.
    Hton,
}

/// How [`Expr::Numgen`] produces its numbers (`NFT_NG_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NumgenKind {
    /// A counter, modulo `modulus`.
    Incremental,
    /// Uniformly random in `0..modulus`.
    Random,
}

/// Source or destination NAT (`NFT_NAT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatKind {
    Snat,
    Dnat,
}

/// The address family a NAT rewrites (`NFPROTO_IPV4` / `NFPROTO_IPV6`);
/// in an `inet` table it must be given explicitly, as `dnat ip to` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatFamily {
    Ipv4,
    Ipv6,
}

impl NatFamily {
    fn code(self) -> u32 {
        match self {
            NatFamily::Ipv4 => 2,
            NatFamily::Ipv6 => 10,
        }
    }

    fn addr_len(self) -> usize {
        match self {
            NatFamily::Ipv4 => 4,
            NatFamily::Ipv6 => 16,
        }
    }
}

/// Which set a [`Expr::Lookup`] consults.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SetRef {
    /// A named set of the rule's table (`@name`), existing or added earlier
    /// in the same batch.
    Named(String),
    /// An anonymous set written into the rule (`{ 0 : goto a, ... }`): it is
    /// created in the same transaction just before the rule and goes away
    /// with it.
    Anonymous(Box<AnonSet>),
}

/// What a [`Expr::Lookup`] does with what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LookupResult {
    /// `KEY @set`: the rule goes on only if the key is in the set.
    Present,
    /// `KEY != @set`: only if it is not.
    Absent,
    /// `KEY map @m`: the key's value goes into the register (the rule stops
    /// if the key is not in the map).
    Value(Reg),
    /// `KEY vmap @m`: the key's verdict is applied (nothing happens if the
    /// key is not in the map).
    Verdict,
}

/// What a [`Expr::Dynset`] does to the set (`NFT_DYNSET_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DynsetOp {
    /// `add @set { KEY }`: adds the key if it is missing; an existing
    /// element keeps its expiry.
    Add,
    /// `update @set { KEY }`: adds the key or restarts its timeout.
    Update,
    /// `delete @set { KEY }`.
    Delete,
}

/// What a [`Expr::Fib`] looks up (`NFTA_FIB_FLAGS` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FibFlags(pub u32);

impl FibFlags {
    pub const SADDR: FibFlags = FibFlags(1 << 0);
    pub const DADDR: FibFlags = FibFlags(1 << 1);
    pub const MARK: FibFlags = FibFlags(1 << 2);
    pub const IIF: FibFlags = FibFlags(1 << 3);
    pub const OIF: FibFlags = FibFlags(1 << 4);
}

impl std::ops::BitOr for FibFlags {
    type Output = FibFlags;
    fn bitor(self, other: FibFlags) -> FibFlags {
        FibFlags(self.0 | other.0)
    }
}

/// What a [`Expr::Fib`] stores (`NFT_FIB_RESULT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FibResult {
    /// Output interface index (4 bytes, host order).
    Oif,
    /// Output interface name (16 bytes).
    OifName,
    /// Route type of the address (`RTN_*`, 4 bytes, host order: 2 local,
    /// see [`RouteType`]).
    AddrType,
}

impl FibResult {
    fn code(self) -> u32 {
        match self {
            FibResult::Oif => 1,
            FibResult::OifName => 2,
            FibResult::AddrType => 3,
        }
    }

    fn width(self) -> usize {
        match self {
            FibResult::OifName => 16,
            FibResult::Oif | FibResult::AddrType => 4,
        }
    }
}

/// Route types as `fib ... type` yields them (`RTN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteType {
    Unicast,
    Local,
    Broadcast,
    Anycast,
    Multicast,
    Blackhole,
    Unreachable,
    Prohibit,
}

impl RouteType {
    pub fn code(self) -> u32 {
        match self {
            RouteType::Unicast => 1,
            RouteType::Local => 2,
            RouteType::Broadcast => 3,
            RouteType::Anycast => 4,
            RouteType::Multicast => 5,
            RouteType::Blackhole => 6,
            RouteType::Unreachable => 7,
            RouteType::Prohibit => 8,
        }
    }
}

/// How [`Expr::Reject`] answers (`NFT_REJECT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// An ICMP (for IPv4 packets) or ICMPv6 (for IPv6) destination
    /// unreachable with the family's own code: 3 is port unreachable for
    /// ICMP, 4 for ICMPv6.
    IcmpUnreach,
    /// A TCP reset (only for TCP packets).
    TcpReset,
    /// A destination unreachable for either family, with a code of
    /// [`IcmpxCode`].
    IcmpxUnreach,
}

/// Family-independent reject codes (`NFT_REJECT_ICMPX_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IcmpxCode {
    NoRoute,
    PortUnreachable,
    HostUnreachable,
    AdminProhibited,
}

impl IcmpxCode {
    pub fn code(self) -> u8 {
        match self {
            IcmpxCode::NoRoute => 0,
            IcmpxCode::PortUnreachable => 1,
            IcmpxCode::HostUnreachable => 2,
            IcmpxCode::AdminProhibited => 3,
        }
    }
}

/// Flags of NAT statements (`NF_NAT_RANGE_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFlags(pub u32);

impl NatFlags {
    pub const NONE: NatFlags = NatFlags(0);
    /// `random`: source ports picked at random.
    pub const RANDOM: NatFlags = NatFlags(0x4);
    /// `persistent`: the same address for a client every time.
    pub const PERSISTENT: NatFlags = NatFlags(0x8);
    /// `fully-random`: source ports from a full PRNG (avoids the port
    /// clashes of hash-based choice under many connections).
    pub const FULLY_RANDOM: NatFlags = NatFlags(0x10);
}

impl std::ops::BitOr for NatFlags {
    type Output = NatFlags;
    fn bitor(self, other: NatFlags) -> NatFlags {
        NatFlags(self.0 | other.0)
    }
}

/// One nf_tables expression.
///
/// Byte strings (`data`, `mask`, ...) are in the byte order of what they
/// are compared with: network order for packet payload, host order for
/// marks, conntrack bits and numgen results.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Expr {
    /// `meta load KEY => dreg`.
    Meta { key: MetaKey, dreg: Reg },
    /// `meta set KEY with sreg`.
    MetaSet { key: MetaKey, sreg: Reg },
    /// `payload load LEN @ BASE + OFFSET => dreg`.
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: Reg,
    },
    /// Compares `data.len()` bytes of `sreg`; the rule stops when false.
    Cmp { sreg: Reg, op: CmpOp, data: Vec<u8> },
    /// `dreg = (sreg & mask) ^ xor` over `mask.len()` bytes (`xor` must
    /// have the same length).
    Bitwise {
        sreg: Reg,
        dreg: Reg,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// Converts `len` bytes of `size`-byte words between byte orders.
    Byteorder {
        sreg: Reg,
        dreg: Reg,
        op: ByteorderOp,
        len: u32,
        size: u32,
    },
    /// `ct load KEY => dreg`.
    Ct { key: CtKey, dreg: Reg },
    /// `ct set KEY with sreg`.
    CtSet { key: CtKey, sreg: Reg },
    /// Loads a constant into `dreg`.
    Immediate { dreg: Reg, data: Vec<u8> },
    /// A verdict (an immediate into the verdict register).
    Verdict(Verdict),
    /// Counts packets and bytes that reach it.
    Counter,
    /// Source or destination NAT to the address in `addr` (4 or 16 bytes,
    /// by `family`) and, optionally, the port in `port` (2 bytes, network
    /// order). Without `addr` only the port changes.
    Nat {
        kind: NatKind,
        family: NatFamily,
        addr: Option<Reg>,
        port: Option<Reg>,
    },
    /// Source NAT to the address of the output interface (`masquerade
    /// [fully-random]`).
    Masquerade { flags: NatFlags },
    /// `numgen reg = KIND mod MODULUS offset OFFSET` (host byte order).
    Numgen {
        kind: NumgenKind,
        modulus: u32,
        offset: u32,
        dreg: Reg,
    },
    /// Looks the key in `sreg` (and the registers after it, for a
    /// concatenation) up in a set or map.
    Lookup {
        sreg: Reg,
        set: SetRef,
        result: LookupResult,
    },
    /// Adds, updates or deletes the key in `key` in a named set with
    /// [`super::SetFlags::DYNAMIC`] from the packet path, e.g. `update
    /// @affinity { ip saddr timeout 3h }`. `data`: the value for a map.
    Dynset {
        op: DynsetOp,
        set: String,
        key: Reg,
        data: Option<Reg>,
        /// The element's timeout (the set's default without one).
        timeout: Option<std::time::Duration>,
    },
    /// A routing lookup: `fib daddr type => dreg`.
    Fib {
        flags: FibFlags,
        result: FibResult,
        dreg: Reg,
    },
    /// Refuses the packet with an answer to its sender (a terminal
    /// statement, like drop).
    Reject { kind: RejectKind, code: u8 },
}

impl Expr {
    /// The name the kernel knows this expression type by.
    pub fn kind(&self) -> &'static str {
        match self {
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Byteorder { .. } => "byteorder",
            Expr::Ct { .. } | Expr::CtSet { .. } => "ct",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Counter => "counter",
            Expr::Nat { .. } => "nat",
            Expr::Masquerade { .. } => "masq",
            Expr::Numgen { .. } => "numgen",
            Expr::Lookup { .. } => "lookup",
            Expr::Dynset { .. } => "dynset",
            Expr::Fib { .. } => "fib",
            Expr::Reject { .. } => "reject",
        }
    }

    /// Writes this expression as one `NFTA_LIST_ELEM`. `anon` yields the
    /// names and transaction ids of the anonymous sets of the rule, in
    /// order; the sets themselves are sent before the rule (see `batch.rs`).
    pub(crate) fn encode(&self, attrs: &mut Attrs<'_>, anon: &mut std::slice::Iter<'_, AnonRef>) {
        attrs.nested(wire::NFTA_LIST_ELEM, |elem| {
            elem.str(wire::NFTA_EXPR_NAME, self.kind());
            elem.nested(wire::NFTA_EXPR_DATA, |data| self.encode_data(data, anon));
        });
    }

    /// The anonymous set of this expression, if it has one.
    pub(crate) fn anonymous_set(&self) -> Option<&AnonSet> {
        match self {
            Expr::Lookup {
                set: SetRef::Anonymous(set),
                ..
            } => Some(set),
            _ => None,
        }
    }

    fn encode_data(&self, a: &mut Attrs<'_>, anon: &mut std::slice::Iter<'_, AnonRef>) {
        use wire::*;
        match self {
            Expr::Meta { key, dreg } => {
                a.u32_be(NFTA_META_DREG, dreg.wire());
                a.u32_be(NFTA_META_KEY, key.code());
            }
            Expr::MetaSet { key, sreg } => {
                a.u32_be(NFTA_META_KEY, key.code());
                a.u32_be(NFTA_META_SREG, sreg.wire());
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                a.u32_be(NFTA_PAYLOAD_DREG, dreg.wire());
                a.u32_be(NFTA_PAYLOAD_BASE, base.code());
                a.u32_be(NFTA_PAYLOAD_OFFSET, *offset);
                a.u32_be(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Cmp { sreg, op, data } => {
                a.u32_be(NFTA_CMP_SREG, sreg.wire());
                a.u32_be(NFTA_CMP_OP, op.code());
                a.nested(NFTA_CMP_DATA, |d| d.bytes(NFTA_DATA_VALUE, data));
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                a.u32_be(NFTA_BITWISE_SREG, sreg.wire());
                a.u32_be(NFTA_BITWISE_DREG, dreg.wire());
                a.u32_be(NFTA_BITWISE_LEN, wire_len(mask.len()));
                a.nested(NFTA_BITWISE_MASK, |d| d.bytes(NFTA_DATA_VALUE, mask));
                a.nested(NFTA_BITWISE_XOR, |d| d.bytes(NFTA_DATA_VALUE, xor));
            }
            Expr::Byteorder {
                sreg,
                dreg,
                op,
                len,
                size,
            } => {
                a.u32_be(NFTA_BYTEORDER_SREG, sreg.wire());
                a.u32_be(NFTA_BYTEORDER_DREG, dreg.wire());
                let op = match op {
                    ByteorderOp::Ntoh => 0,
                    ByteorderOp::Hton => 1,
                };
                a.u32_be(NFTA_BYTEORDER_OP, op);
                a.u32_be(NFTA_BYTEORDER_LEN, *len);
                a.u32_be(NFTA_BYTEORDER_SIZE, *size);
            }
            Expr::Ct { key, dreg } => {
                a.u32_be(NFTA_CT_DREG, dreg.wire());
                a.u32_be(NFTA_CT_KEY, key.code());
            }
            Expr::CtSet { key, sreg } => {
                a.u32_be(NFTA_CT_KEY, key.code());
                a.u32_be(NFTA_CT_SREG, sreg.wire());
            }
            Expr::Immediate { dreg, data } => {
                a.u32_be(NFTA_IMMEDIATE_DREG, dreg.wire());
                a.nested(NFTA_IMMEDIATE_DATA, |d| d.bytes(NFTA_DATA_VALUE, data));
            }
            Expr::Verdict(verdict) => {
                a.u32_be(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                a.nested(NFTA_IMMEDIATE_DATA, |d| verdict.encode_data(d));
            }
            Expr::Counter => {
                a.u64_be(NFTA_COUNTER_BYTES, 0);
                a.u64_be(NFTA_COUNTER_PACKETS, 0);
            }
            Expr::Nat {
                kind,
                family,
                addr,
                port,
            } => {
                let kind = match kind {
                    NatKind::Snat => 0,
                    NatKind::Dnat => 1,
                };
                a.u32_be(NFTA_NAT_TYPE, kind);
                a.u32_be(NFTA_NAT_FAMILY, family.code());
                if let Some(addr) = addr {
                    a.u32_be(NFTA_NAT_REG_ADDR_MIN, addr.wire());
                }
                if let Some(port) = port {
                    a.u32_be(NFTA_NAT_REG_PROTO_MIN, port.wire());
                    // Implied by the register, but nft sends it: so do we.
                    a.u32_be(NFTA_NAT_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
                }
            }
            Expr::Masquerade { flags } => {
                // nft leaves the attribute out when there are no flags.
                if flags.0 != 0 {
                    a.u32_be(NFTA_MASQ_FLAGS, flags.0);
                }
            }
            Expr::Numgen {
                kind,
                modulus,
                offset,
                dreg,
            } => {
                a.u32_be(NFTA_NG_DREG, dreg.wire());
                a.u32_be(NFTA_NG_MODULUS, *modulus);
                let kind = match kind {
                    NumgenKind::Incremental => 0,
                    NumgenKind::Random => 1,
                };
                a.u32_be(NFTA_NG_TYPE, kind);
                a.u32_be(NFTA_NG_OFFSET, *offset);
            }
            Expr::Lookup { sreg, set, result } => {
                a.u32_be(NFTA_LOOKUP_SREG, sreg.wire());
                match result {
                    LookupResult::Value(dreg) => a.u32_be(NFTA_LOOKUP_DREG, dreg.wire()),
                    LookupResult::Verdict => a.u32_be(NFTA_LOOKUP_DREG, NFT_REG_VERDICT),
                    LookupResult::Present | LookupResult::Absent => {}
                }
                match set {
                    SetRef::Named(name) => a.str(NFTA_LOOKUP_SET, name),
                    SetRef::Anonymous(_) => {
                        let (name, id) = anon
                            .next()
                            .map_or(("", 0), |anon| (anon.name.as_str(), anon.id));
                        a.str(NFTA_LOOKUP_SET, name);
                        a.u32_be(NFTA_LOOKUP_SET_ID, id);
                    }
                }
                if *result == LookupResult::Absent {
                    a.u32_be(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
                }
            }
            Expr::Dynset {
                op,
                set,
                key,
                data,
                timeout,
            } => {
                a.u32_be(NFTA_DYNSET_SREG_KEY, key.wire());
                if let Some(data) = data {
                    a.u32_be(NFTA_DYNSET_SREG_DATA, data.wire());
                }
                let op = match op {
                    DynsetOp::Add => 0,
                    DynsetOp::Update => 1,
                    DynsetOp::Delete => 2,
                };
                a.u32_be(NFTA_DYNSET_OP, op);
                if let Some(timeout) = timeout {
                    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                    a.u64_be(NFTA_DYNSET_TIMEOUT, ms);
                }
                a.str(NFTA_DYNSET_SET_NAME, set);
            }
            Expr::Fib {
                flags,
                result,
                dreg,
            } => {
                a.u32_be(NFTA_FIB_FLAGS, flags.0);
                a.u32_be(NFTA_FIB_RESULT, result.code());
                a.u32_be(NFTA_FIB_DREG, dreg.wire());
            }
            Expr::Reject { kind, code } => {
                let kind = match kind {
                    RejectKind::IcmpUnreach => 0,
                    RejectKind::TcpReset => 1,
                    RejectKind::IcmpxUnreach => 2,
                };
                a.u32_be(NFTA_REJECT_TYPE, kind);
                a.u8(NFTA_REJECT_ICMP_CODE, *code);
            }
        }
    }
}

/// The name and transaction id an anonymous set is created with.
#[derive(Clone, Debug)]
pub(crate) struct AnonRef {
    pub name: String,
    pub id: u32,
}

impl AnonRef {
    /// A fresh anonymous set: `__set` or `__map` and 16 hex digits that no
    /// other set of the table has. nft leaves the naming to the kernel
    /// (`__set%d`), which then scans every set of the table for a free
    /// number: quadratic in the number of anonymous sets, seconds at ten
    /// thousand services. The name is random (a per-process random base
    /// plus a counter), and a clash is refused (`EEXIST`), never shared.
    pub fn new(set: &AnonSet, id: u32) -> AnonRef {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static BASE: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = *BASE.get_or_init(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            hasher.finish()
        });
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let kind = if set.data.is_some() { "map" } else { "set" };
        AnonRef {
            name: format!("__{kind}{:016x}", base.wrapping_add(n)),
            id,
        }
    }
}

fn wire_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Largest value the kernel accepts in one data attribute
/// (`NFT_DATA_VALUE_MAXLEN`, the size of all registers together).
const DATA_MAXLEN: usize = 64;

/// Checks what the kernel would not: that every register read holds at
/// least as many bytes as the read wants, as far as this rule's own loads
/// tell (a read of a register the rule never loaded is left to the
/// kernel). Catches, e.g., an interface name longer than 15 bytes compared
/// with a 16-byte `iifname`, which the kernel would accept and compare
/// against whatever follows in the next register.
pub(crate) fn check_rule(exprs: &[Expr]) -> Result<(), String> {
    let mut loaded: [Option<usize>; 16] = [None; 16];
    let position = |i: usize, expr: &Expr| format!("expression {} ({})", i + 1, expr.kind());
    for (i, expr) in exprs.iter().enumerate() {
        let read = |reg: &Reg, len: usize, what: &str| -> Result<(), String> {
            if len == 0 || len > DATA_MAXLEN {
                return Err(format!(
                    "{}: {what} of {len} bytes (1 to {DATA_MAXLEN} allowed)",
                    position(i, expr)
                ));
            }
            match loaded[usize::from(reg.0)] {
                Some(have) if have < len => Err(format!(
                    "{}: {what} of {len} bytes from {reg}, which holds only {have}",
                    position(i, expr)
                )),
                _ => Ok(()),
            }
        };
        let written = match expr {
            Expr::Meta { key, dreg } => Some((*dreg, key.width())),
            Expr::MetaSet { key, sreg } => {
                read(sreg, key.width(), "meta set")?;
                None
            }
            Expr::Payload { len, dreg, .. } => Some((*dreg, *len as usize)),
            Expr::Cmp { sreg, data, .. } => {
                read(sreg, data.len(), "comparison")?;
                None
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
            } => {
                if mask.len() != xor.len() {
                    return Err(format!(
                        "{}: mask has {} bytes but xor has {}",
                        position(i, expr),
                        mask.len(),
                        xor.len()
                    ));
                }
                read(sreg, mask.len(), "bitwise operation")?;
                Some((*dreg, mask.len()))
            }
            Expr::Byteorder {
                sreg, dreg, len, ..
            } => {
                read(sreg, *len as usize, "byte order conversion")?;
                Some((*dreg, *len as usize))
            }
            Expr::Ct { key, dreg } => Some((*dreg, key.width())),
            Expr::CtSet { key, sreg } => {
                read(sreg, key.width(), "ct set")?;
                None
            }
            Expr::Immediate { dreg, data } => {
                if data.is_empty() || data.len() > DATA_MAXLEN {
                    return Err(format!(
                        "{}: immediate of {} bytes (1 to {DATA_MAXLEN} allowed)",
                        position(i, expr),
                        data.len()
                    ));
                }
                Some((*dreg, data.len()))
            }
            Expr::Nat {
                family, addr, port, ..
            } => {
                if let Some(addr) = addr {
                    read(addr, family.addr_len(), "NAT address")?;
                }
                if let Some(port) = port {
                    read(port, 2, "NAT port")?;
                }
                None
            }
            Expr::Numgen { dreg, .. } => Some((*dreg, 4)),
            Expr::Lookup { sreg, set, result } => {
                let mut value_len = None;
                if let SetRef::Anonymous(anon) = set {
                    anon.check()
                        .map_err(|e| format!("{}: {e}", position(i, expr)))?;
                    read(sreg, super::set::concat_len(&anon.key), "set lookup")?;
                    if let Some(super::set::MapData::Value(fields)) = &anon.data {
                        value_len = Some(super::set::concat_len(fields));
                    }
                }
                match (result, &set) {
                    (LookupResult::Value(_), SetRef::Anonymous(anon))
                        if !matches!(anon.data, Some(super::set::MapData::Value(_))) =>
                    {
                        return Err(format!(
                            "{}: a value lookup needs a map of values",
                            position(i, expr)
                        ));
                    }
                    (LookupResult::Verdict, SetRef::Anonymous(anon))
                        if anon.data != Some(super::set::MapData::Verdict) =>
                    {
                        return Err(format!(
                            "{}: a verdict lookup needs a verdict map",
                            position(i, expr)
                        ));
                    }
                    _ => {}
                }
                if let SetRef::Named(name) = set {
                    check_set_name(name).map_err(|e| format!("{}: {e}", position(i, expr)))?;
                }
                match result {
                    // A value of unknown length (a named map) may span every
                    // register from `dreg` on: they count as not loaded by this
                    // rule.
                    LookupResult::Value(dreg) => match value_len {
                        Some(len) => Some((*dreg, len)),
                        None => {
                            for slot in loaded.iter_mut().skip(usize::from(dreg.0)) {
                                *slot = None;
                            }
                            None
                        }
                    },
                    _ => None,
                }
            }
            Expr::Dynset { set, timeout, .. } => {
                check_set_name(set).map_err(|e| format!("{}: {e}", position(i, expr)))?;
                if let Some(timeout) = timeout {
                    super::set::timeout_ms("dynset timeout", *timeout)
                        .map_err(|e| format!("{}: {e}", position(i, expr)))?;
                }
                None
            }
            Expr::Fib { result, dreg, .. } => Some((*dreg, result.width())),
            Expr::Reject { kind, code } => {
                if *kind == RejectKind::IcmpxUnreach && *code > IcmpxCode::AdminProhibited.code() {
                    return Err(format!(
                        "{}: icmpx code {code} (0 to 3 allowed)",
                        position(i, expr)
                    ));
                }
                None
            }
            Expr::Verdict(verdict) => {
                verdict
                    .check()
                    .map_err(|e| format!("{}: {e}", position(i, expr)))?;
                None
            }
            Expr::Counter | Expr::Masquerade { .. } => None,
        };
        if let Some((reg, len)) = written {
            let start = usize::from(reg.0);
            if start * 4 + len > DATA_MAXLEN {
                return Err(format!(
                    "{}: {len} bytes do not fit from {reg} on",
                    position(i, expr)
                ));
            }
            // A load overwrites the registers it spans; reads that start in
            // the middle of it are not checked.
            for slot in loaded.iter_mut().skip(start).take(len.div_ceil(4)) {
                *slot = None;
            }
            loaded[start] = Some(len);
        }
    }
    Ok(())
}

fn check_set_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= wire::NFT_NAME_MAXLEN || name.contains('\0') {
        return Err(format!(
            "set name {name:?}: 1 to {} bytes, no NUL",
            wire::NFT_NAME_MAXLEN - 1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_numbered_like_nft() {
        assert_eq!(Reg::R1.wire(), 1);
        assert_eq!(Reg::R2.wire(), 2);
        assert_eq!(Reg::R4.wire(), 4);
        // NFT_REG32_01 is 9: what nft shows for the second part of a concatenation.
        assert_eq!(Reg::R1.after(4), Reg::r32(1));
        assert_eq!(Reg::r32(1).map(Reg::wire), Some(9));
        assert_eq!(Reg::R1.after(16), Some(Reg::R2));
        assert_eq!(Reg::R4.after(16), None);
        assert_eq!(Reg::r32(16), None);
    }

    #[test]
    fn reads_longer_than_the_load_are_refused() {
        let exprs = vec![
            Expr::Meta {
                key: MetaKey::IifName,
                dreg: Reg::R1,
            },
            Expr::Cmp {
                sreg: Reg::R1,
                op: CmpOp::Eq,
                data: b"a-very-long-interface\0".to_vec(),
            },
        ];
        let err = check_rule(&exprs).unwrap_err();
        assert!(err.contains("expression 2 (cmp)"), "{err}");
        assert!(err.contains("holds only 16"), "{err}");

        let fine = vec![
            Expr::Meta {
                key: MetaKey::L4Proto,
                dreg: Reg::R1,
            },
            Expr::Cmp {
                sreg: Reg::R1,
                op: CmpOp::Eq,
                data: vec![17],
            },
        ];
        assert_eq!(check_rule(&fine), Ok(()));
    }

    #[test]
    fn bitwise_wants_mask_and_xor_of_one_length() {
        let exprs = vec![Expr::Bitwise {
            sreg: Reg::R1,
            dreg: Reg::R1,
            mask: vec![0xff; 4],
            xor: vec![0; 2],
        }];
        assert!(check_rule(&exprs).is_err());
    }
}
