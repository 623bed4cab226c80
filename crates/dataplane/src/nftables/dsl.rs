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
//! Fragments use registers [`Reg::R1`] and [`Reg::R2`] only, freely, so a
//! fragment never depends on what an earlier one left in a register.
//!
//! Not re-exported at the module root on purpose: [`drop`] would shadow
//! `std::mem::drop` under a glob import.

use std::net::IpAddr;

use ipnet::IpNet;

use super::expr::{
    ByteorderOp, CmpOp, CtKey, CtState, CtStatus, Expr, MetaKey, NatFamily, NatKind, NumgenKind,
    PayloadBase, Reg, Verdict,
};

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_ICMP: u8 = 1;
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

/// `masquerade`.
pub fn masquerade() -> Vec<Expr> {
    vec![Expr::Masquerade]
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
    fn nat_with_port_uses_the_second_register() {
        let exprs = dnat_ip_port("10.0.0.2".parse().unwrap(), 6666);
        assert_eq!(exprs[1], immediate(Reg::R2, vec![0x1a, 0x0a]));
        assert_eq!(check_rule(&exprs), Ok(()));
    }
}
