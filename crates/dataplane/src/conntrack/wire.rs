//! The ctnetlink wire format (NETLINK_NETFILTER, subsystem NFNL_SUBSYS_CTNETLINK): the
//! constants of `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nfnetlink_conntrack.h` that this module needs, the two requests it sends
//! (a dump, a delete) and the reader of entries; messages, acknowledgements and attributes
//! are read with nf_tables' reader ([`crate::nftables::wire`]).
//!
//! Layout reminders: a message is a `nlmsghdr` (host byte order), a 4-byte `nfgenmsg`
//! (family, version, big-endian resource id), then attributes: `u16 len, u16 type` (host
//! order), padded to 4 bytes. ctnetlink's numbers are big-endian, protocol numbers and ICMP
//! type and code single bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::{Entry, Family, Protocol, Status, TcpState, Tuple};

// ----- netlink -----

// The framing and the reader of answers are nfnetlink's, shared with nf_tables.
pub(super) use crate::nftables::wire::{
    Ack, Message, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_OVERRUN, be32, find_attr, messages, parse_ack,
};

const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;

// ----- nfnetlink / ctnetlink -----

const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;

pub(super) const IPCTNL_MSG_CT_NEW: u16 = 0;
pub(super) const IPCTNL_MSG_CT_GET: u16 = 1;
pub(super) const IPCTNL_MSG_CT_DELETE: u16 = 2;

/// The netlink message type of a ctnetlink message.
pub(super) const fn ct_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

/// `nfgen_family` values (`NFPROTO_*`, equal to the `AF_*` numbers).
pub(super) const NFPROTO_UNSPEC: u8 = 0;
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFPROTO_IPV6: u8 = 10;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;

// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

// enum ctattr_protoinfo, enum ctattr_protoinfo_tcp
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

// ----- writing -----

/// What goes into the `nlmsghdr` and `nfgenmsg` of a request.
#[derive(Clone, Copy, Debug)]
pub(super) struct MsgHeader {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub family: u8,
}

/// Appends one message; its attributes are written through the [`Attrs`] handed to `fill`,
/// the length is patched in at the end.
pub(super) fn put_message(buf: &mut Vec<u8>, header: MsgHeader, fill: impl FnOnce(&mut Attrs<'_>)) {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    buf.extend_from_slice(&header.ty.to_ne_bytes());
    buf.extend_from_slice(&header.flags.to_ne_bytes());
    buf.extend_from_slice(&header.seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's is 0
    buf.push(header.family);
    buf.push(NFNETLINK_V0);
    buf.extend_from_slice(&0u16.to_be_bytes()); // resource id
    fill(&mut Attrs { buf });
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Writes attributes at the end of a message under construction.
pub(super) struct Attrs<'a> {
    buf: &'a mut Vec<u8>,
}

impl Attrs<'_> {
    pub fn bytes(&mut self, ty: u16, value: &[u8]) {
        let len = u16::try_from(NLA_HDRLEN + value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn u8(&mut self, ty: u16, value: u8) {
        self.bytes(ty, &[value]);
    }

    pub fn be16(&mut self, ty: u16, value: u16) {
        self.bytes(ty, &value.to_be_bytes());
    }

    pub fn be32(&mut self, ty: u16, value: u32) {
        self.bytes(ty, &value.to_be_bytes());
    }

    /// A nested attribute, flagged `NLA_F_NESTED` as libnetfilter_conntrack does.
    pub fn nested(&mut self, ty: u16, fill: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        fill(&mut Attrs { buf: self.buf });
        let len = u16::try_from(self.buf.len() - start).unwrap_or(u16::MAX);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// `conntrack -L`: a dump of the table, of one family (`NFPROTO_IPV4`, `NFPROTO_IPV6`; the
/// kernel filters) or of all (`NFPROTO_UNSPEC`).
pub(super) fn put_dump_request(buf: &mut Vec<u8>, seq: u32, family: u8) {
    let header = MsgHeader {
        ty: ct_type(IPCTNL_MSG_CT_GET),
        flags: NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
    };
    put_message(buf, header, |_| {});
}

/// `conntrack -D` of one entry: its original tuple (always: a delete without a tuple
/// flushes the whole table), its zone if not the default one, and its id, so that an entry
/// that has since been replaced by a new one with the same tuple is left alone (the kernel
/// answers ENOENT).
pub(super) fn put_delete_request(buf: &mut Vec<u8>, seq: u32, entry: &Entry) {
    let header = MsgHeader {
        ty: ct_type(IPCTNL_MSG_CT_DELETE),
        flags: NLM_F_REQUEST | NLM_F_ACK,
        seq,
        family: entry.family.code(),
    };
    put_message(buf, header, |a| {
        put_tuple(a, CTA_TUPLE_ORIG, entry.protocol, &entry.original);
        if entry.zone != 0 {
            a.be16(CTA_ZONE, entry.zone);
        }
        a.be32(CTA_ID, entry.id);
    });
}

fn put_tuple(a: &mut Attrs<'_>, ty: u16, protocol: Protocol, tuple: &Tuple) {
    a.nested(ty, |t| {
        t.nested(CTA_TUPLE_IP, |ip| match (tuple.src, tuple.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                ip.bytes(CTA_IP_V4_SRC, &src.octets());
                ip.bytes(CTA_IP_V4_DST, &dst.octets());
            }
            (src, dst) => {
                ip.bytes(CTA_IP_V6_SRC, &v6(src).octets());
                ip.bytes(CTA_IP_V6_DST, &v6(dst).octets());
            }
        });
        t.nested(CTA_TUPLE_PROTO, |p| {
            p.u8(CTA_PROTO_NUM, protocol.0);
            // The kernel's tuple keeps an ICMP echo id where other protocols keep the
            // source port, type and code where they keep the destination port.
            let [icmp_type, icmp_code] = tuple.dport.to_be_bytes();
            match protocol {
                Protocol::ICMP => {
                    p.be16(CTA_PROTO_ICMP_ID, tuple.sport);
                    p.u8(CTA_PROTO_ICMP_TYPE, icmp_type);
                    p.u8(CTA_PROTO_ICMP_CODE, icmp_code);
                }
                Protocol::ICMPV6 => {
                    p.be16(CTA_PROTO_ICMPV6_ID, tuple.sport);
                    p.u8(CTA_PROTO_ICMPV6_TYPE, icmp_type);
                    p.u8(CTA_PROTO_ICMPV6_CODE, icmp_code);
                }
                _ if protocol.has_ports() => {
                    p.be16(CTA_PROTO_SRC_PORT, tuple.sport);
                    p.be16(CTA_PROTO_DST_PORT, tuple.dport);
                }
                // Other protocols are tracked by addresses alone.
                _ => {}
            }
        });
    });
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

// ----- reading -----

/// The final status of a dump (the payload of its NLMSG_DONE): 0 or a negative errno.
pub(super) fn done_status(message: &Message<'_>) -> i32 {
    message
        .payload
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_ne_bytes)
}

fn be16(value: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(value.get(0..2)?.try_into().ok()?))
}

/// An entry from the payload of an `IPCTNL_MSG_CT_NEW` message (what a dump answers with).
/// `None` if it lacks what every entry has: a known family, both tuples, a protocol.
pub(super) fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let family = Family::from_code(*payload.first()?)?;
    let body = payload.get(4..)?;
    let (protocol, original) = parse_tuple(find_attr(body, CTA_TUPLE_ORIG)?)?;
    let (_, reply) = parse_tuple(find_attr(body, CTA_TUPLE_REPLY)?)?;
    let tcp_state = find_attr(body, CTA_PROTOINFO)
        .and_then(|info| find_attr(info, CTA_PROTOINFO_TCP))
        .and_then(|tcp| find_attr(tcp, CTA_PROTOINFO_TCP_STATE))
        .and_then(|state| state.first().copied())
        .map(TcpState);
    let number = |ty| find_attr(body, ty).and_then(be32);
    Some(Entry {
        family,
        protocol,
        original,
        reply,
        status: Status(number(CTA_STATUS).unwrap_or(0)),
        tcp_state,
        timeout: Duration::from_secs(number(CTA_TIMEOUT).unwrap_or(0).into()),
        mark: number(CTA_MARK).unwrap_or(0),
        zone: find_attr(body, CTA_ZONE).and_then(be16).unwrap_or(0),
        id: number(CTA_ID).unwrap_or(0),
    })
}

fn parse_tuple(tuple: &[u8]) -> Option<(Protocol, Tuple)> {
    let ip = find_attr(tuple, CTA_TUPLE_IP)?;
    let address = |v4, v6| -> Option<IpAddr> {
        if let Some(value) = find_attr(ip, v4) {
            let octets: [u8; 4] = value.get(0..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        } else {
            let octets: [u8; 16] = find_attr(ip, v6)?.get(0..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
    };
    let src = address(CTA_IP_V4_SRC, CTA_IP_V6_SRC)?;
    let dst = address(CTA_IP_V4_DST, CTA_IP_V6_DST)?;
    let proto = find_attr(tuple, CTA_TUPLE_PROTO)?;
    let protocol = Protocol(*find_attr(proto, CTA_PROTO_NUM)?.first()?);
    let field16 = |ty| find_attr(proto, ty).and_then(be16).unwrap_or(0);
    let field8 = |ty| {
        find_attr(proto, ty)
            .and_then(|v| v.first().copied())
            .unwrap_or(0)
    };
    let (sport, dport) = match protocol {
        Protocol::ICMP => (
            field16(CTA_PROTO_ICMP_ID),
            u16::from_be_bytes([field8(CTA_PROTO_ICMP_TYPE), field8(CTA_PROTO_ICMP_CODE)]),
        ),
        Protocol::ICMPV6 => (
            field16(CTA_PROTO_ICMPV6_ID),
            u16::from_be_bytes([field8(CTA_PROTO_ICMPV6_TYPE), field8(CTA_PROTO_ICMPV6_CODE)]),
        ),
        _ => (field16(CTA_PROTO_SRC_PORT), field16(CTA_PROTO_DST_PORT)),
    };
    Some((
        protocol,
        Tuple {
            src,
            dst,
            sport,
            dport,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::wire::{NLM_F_ACK_TLVS, NLM_F_CAPPED, NLMSG_HDRLEN, NLMSGERR_ATTR_MSG};

    /// One attribute as the kernel lays it out: length, type, value, padding.
    fn nla(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn nest(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(ty | NLA_F_NESTED, &parts.concat())
    }

    fn udp_entry() -> Entry {
        Entry {
            family: Family::V4,
            protocol: Protocol::UDP,
            original: Tuple {
                src: "10.0.0.2".parse().unwrap(),
                dst: "10.96.0.10".parse().unwrap(),
                sport: 40001,
                dport: 53,
            },
            reply: Tuple {
                src: "10.1.0.7".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                sport: 5353,
                dport: 40001,
            },
            status: Status(Status::CONFIRMED.0 | Status::DST_NAT.0),
            tcp_state: None,
            timeout: Duration::from_secs(30),
            mark: 0,
            zone: 0,
            id: 0xdead_beef,
        }
    }

    #[test]
    fn a_delete_carries_the_original_tuple_and_the_id_in_kernel_layout() {
        let mut buf = Vec::new();
        put_delete_request(&mut buf, 9, &udp_entry());
        let messages = messages(&buf).unwrap();
        assert_eq!(messages.len(), 1);
        let message = messages[0];
        assert_eq!(
            message.ty, 0x0102,
            "NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE"
        );
        assert_eq!(message.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(message.seq, 9);
        // nfgenmsg: AF_INET, version 0, resource id 0.
        assert_eq!(&message.payload[..4], &[2, 0, 0, 0]);
        // The bytes libnetfilter_conntrack sends for the same entry.
        let expected = [
            nest(
                CTA_TUPLE_ORIG,
                &[
                    nest(
                        CTA_TUPLE_IP,
                        &[nla(1, &[10, 0, 0, 2]), nla(2, &[10, 96, 0, 10])],
                    ),
                    nest(
                        CTA_TUPLE_PROTO,
                        &[nla(1, &[17]), nla(2, &[0x9c, 0x41]), nla(3, &[0, 53])],
                    ),
                ],
            ),
            nla(CTA_ID, &[0xde, 0xad, 0xbe, 0xef]),
        ]
        .concat();
        assert_eq!(&message.payload[4..], &expected[..]);
    }

    #[test]
    fn a_delete_names_a_non_default_zone_and_ipv6_addresses() {
        let mut entry = udp_entry();
        entry.family = Family::V6;
        entry.original.src = "fd00::2".parse().unwrap();
        entry.original.dst = "fd00::a".parse().unwrap();
        entry.zone = 7;
        let mut buf = Vec::new();
        put_delete_request(&mut buf, 1, &entry);
        let message = messages(&buf).unwrap()[0];
        assert_eq!(message.payload[0], 10, "AF_INET6");
        let body = &message.payload[4..];
        let ip = find_attr(find_attr(body, CTA_TUPLE_ORIG).unwrap(), CTA_TUPLE_IP).unwrap();
        assert_eq!(
            find_attr(ip, CTA_IP_V6_DST).unwrap(),
            &"fd00::a".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert!(find_attr(ip, CTA_IP_V4_DST).is_none());
        assert_eq!(find_attr(body, CTA_ZONE).unwrap(), &[0, 7]);
    }

    #[test]
    fn icmp_tuples_carry_id_type_and_code_where_the_kernel_keeps_them() {
        let mut entry = udp_entry();
        entry.protocol = Protocol::ICMP;
        entry.original.sport = 0x1234; // echo id
        entry.original.dport = 8 << 8; // echo request, code 0
        let mut buf = Vec::new();
        put_delete_request(&mut buf, 1, &entry);
        let message = messages(&buf).unwrap()[0];
        let orig = find_attr(&message.payload[4..], CTA_TUPLE_ORIG).unwrap();
        let proto = find_attr(orig, CTA_TUPLE_PROTO).unwrap();
        assert_eq!(find_attr(proto, CTA_PROTO_ICMP_ID).unwrap(), &[0x12, 0x34]);
        assert_eq!(find_attr(proto, CTA_PROTO_ICMP_TYPE).unwrap(), &[8]);
        assert_eq!(find_attr(proto, CTA_PROTO_ICMP_CODE).unwrap(), &[0]);
        assert!(find_attr(proto, CTA_PROTO_SRC_PORT).is_none());
        // And it reads back the same.
        let (protocol, tuple) = parse_tuple(orig).unwrap();
        assert_eq!(protocol, Protocol::ICMP);
        assert_eq!(tuple, entry.original);
    }

    #[test]
    fn a_dump_request_is_a_bare_get_with_the_dump_flags() {
        let mut buf = Vec::new();
        put_dump_request(&mut buf, 3, NFPROTO_UNSPEC);
        assert_eq!(buf.len(), NLMSG_HDRLEN + 4);
        let message = messages(&buf).unwrap()[0];
        assert_eq!(message.ty, 0x0101);
        assert_eq!(message.flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(message.payload, &[0, 0, 0, 0]);
    }

    #[test]
    fn a_dumped_entry_is_read_with_every_field() {
        // What the kernel sends for a DNATed, assured TCP connection in zone 3 (attributes
        // it adds that this module ignores, such as CTA_USE, are included).
        let tuple = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            vec![
                nest(CTA_TUPLE_IP, &[nla(1, &src), nla(2, &dst)]),
                nest(
                    CTA_TUPLE_PROTO,
                    &[
                        nla(1, &[6]),
                        nla(2, &sport.to_be_bytes()),
                        nla(3, &dport.to_be_bytes()),
                    ],
                ),
                nla(3, &[0, 3]), // CTA_TUPLE_ZONE
            ]
        };
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(
            [
                nest(
                    CTA_TUPLE_ORIG,
                    &tuple([10, 0, 0, 2], [10, 96, 0, 1], 40000, 80),
                ),
                nest(
                    CTA_TUPLE_REPLY,
                    &tuple([10, 1, 0, 9], [10, 0, 0, 2], 8080, 40000),
                ),
                nla(CTA_STATUS, &0x1aeu32.to_be_bytes()),
                nla(CTA_TIMEOUT, &431_999u32.to_be_bytes()),
                nla(CTA_MARK, &0x4000u32.to_be_bytes()),
                nest(
                    CTA_PROTOINFO,
                    &[nest(
                        CTA_PROTOINFO_TCP,
                        &[nla(CTA_PROTOINFO_TCP_STATE, &[3])],
                    )],
                ),
                nla(11, &1u32.to_be_bytes()), // CTA_USE
                nla(CTA_ID, &77u32.to_be_bytes()),
                nla(CTA_ZONE, &3u16.to_be_bytes()),
            ]
            .concat(),
        );
        let entry = parse_entry(&payload).unwrap();
        assert_eq!(entry.family, Family::V4);
        assert_eq!(entry.protocol, Protocol::TCP);
        assert_eq!(entry.original.to_string(), "10.0.0.2:40000 -> 10.96.0.1:80");
        assert_eq!(entry.reply.to_string(), "10.1.0.9:8080 -> 10.0.0.2:40000");
        assert!(entry.status.contains(Status::ASSURED | Status::DST_NAT));
        assert!(!entry.status.contains(Status::SRC_NAT));
        assert_eq!(entry.tcp_state, Some(TcpState::ESTABLISHED));
        assert_eq!(entry.timeout, Duration::from_secs(431_999));
        assert_eq!((entry.mark, entry.zone, entry.id), (0x4000, 3, 77));

        // Written back as a delete, the tuple is the one that was read.
        let mut buf = Vec::new();
        put_delete_request(&mut buf, 1, &entry);
        let message = messages(&buf).unwrap()[0];
        let orig = find_attr(&message.payload[4..], CTA_TUPLE_ORIG).unwrap();
        assert_eq!(parse_tuple(orig).unwrap(), (Protocol::TCP, entry.original));
    }

    #[test]
    fn entries_without_tuples_or_of_unknown_families_are_not_entries() {
        assert!(parse_entry(&[2, 0, 0, 0]).is_none());
        let orig = nest(
            CTA_TUPLE_ORIG,
            &[
                nest(
                    CTA_TUPLE_IP,
                    &[nla(1, &[1, 2, 3, 4]), nla(2, &[5, 6, 7, 8])],
                ),
                nest(CTA_TUPLE_PROTO, &[nla(1, &[17])]),
            ],
        );
        let mut payload = vec![7, 0, 0, 0]; // NFPROTO_BRIDGE
        payload.extend_from_slice(&orig);
        assert!(parse_entry(&payload).is_none());
        payload[0] = 2;
        assert!(parse_entry(&payload).is_none(), "no reply tuple");
    }

    #[test]
    fn acks_and_errors_name_the_request_they_answer() {
        // NLMSG_ERROR with ENOENT for request seq 42, header only (capped), and an
        // extended-ack message.
        let mut buf = Vec::new();
        let mut payload = (-libc::ENOENT).to_ne_bytes().to_vec();
        let mut echoed = vec![0u8; NLMSG_HDRLEN];
        echoed[8..12].copy_from_slice(&42u32.to_ne_bytes());
        payload.extend_from_slice(&echoed);
        payload.extend_from_slice(&nla(NLMSGERR_ATTR_MSG, b"gone\0"));
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        buf.extend_from_slice(&len.to_ne_bytes());
        buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        buf.extend_from_slice(&42u32.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&payload);
        let message = messages(&buf).unwrap()[0];
        let ack = parse_ack(&message).unwrap();
        assert_eq!((ack.seq, ack.errno), (42, libc::ENOENT));
        assert_eq!(ack.message.as_deref(), Some("gone"));
        assert!(messages(&buf[..buf.len() - 4]).is_none(), "truncated");
    }
}
