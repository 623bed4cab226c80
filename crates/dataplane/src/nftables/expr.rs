//! Typed nf_tables expressions and their netlink encodings.
//!
//! A rule is a list of expressions run in order on registers: loads
//! ([`Expr::Meta`], [`Expr::Payload`], [`Expr::Ct`], [`Expr::Numgen`],
//! [`Expr::Immediate`]) fill registers, [`Expr::Cmp`] stops the rule when a
//! comparison fails, statements ([`Expr::Nat`], [`Expr::CtSet`], ...) act on
//! the packet, and [`Expr::Verdict`] decides its fate. The encodings are
//! byte for byte what `nft --debug=netlink` shows for the same rule.

use std::fmt;

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

/// A verdict: what happens to the packet (or where evaluation continues).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    /// Go on with the next rule (what a rule does without a verdict).
    Continue,
    /// Back to the chain that jumped here (for a base chain: its policy).
    Return,
    /// Evaluate a (regular) chain, then come back.
    Jump(String),
    /// Evaluate a (regular) chain instead of the rest of this one.
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Continue => -1,
            Verdict::Jump(_) => -3,
            Verdict::Goto(_) => -4,
            Verdict::Return => -5,
        }
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
    /// Source NAT to the address of the output interface.
    Masquerade,
    /// `numgen reg = KIND mod MODULUS offset OFFSET` (host byte order).
    Numgen {
        kind: NumgenKind,
        modulus: u32,
        offset: u32,
        dreg: Reg,
    },
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
            Expr::Masquerade => "masq",
            Expr::Numgen { .. } => "numgen",
        }
    }

    /// Writes this expression as one `NFTA_LIST_ELEM`.
    pub(crate) fn encode(&self, attrs: &mut Attrs<'_>) {
        attrs.nested(wire::NFTA_LIST_ELEM, |elem| {
            elem.str(wire::NFTA_EXPR_NAME, self.kind());
            elem.nested(wire::NFTA_EXPR_DATA, |data| self.encode_data(data));
        });
    }

    fn encode_data(&self, a: &mut Attrs<'_>) {
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
                a.nested(NFTA_IMMEDIATE_DATA, |d| {
                    d.nested(NFTA_DATA_VERDICT, |v| {
                        v.u32_be(NFTA_VERDICT_CODE, verdict.code() as u32);
                        if let Verdict::Jump(chain) | Verdict::Goto(chain) = verdict {
                            v.str(NFTA_VERDICT_CHAIN, chain);
                        }
                    });
                });
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
            Expr::Masquerade => {}
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
            Expr::Verdict(_) | Expr::Counter | Expr::Masquerade => None,
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
