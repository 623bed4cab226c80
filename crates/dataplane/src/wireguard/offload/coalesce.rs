//! GRO for the write side of an offloading TUN device: planning which of a batch of decrypted
//! packets can be handed to the kernel as one TCP or UDP super-packet.
//!
//! Every write to the TUN device costs a syscall and a trip through the kernel's receive
//! path, per packet. With `IFF_VNET_HDR` the kernel accepts a TCP super-packet (TSO) or a
//! UDP one (USO, `GSO_UDP_L4`, kernels since 6.2 on a device granted `TUN_F_USO4/6`) with a
//! virtio header saying how to cut it (as a NIC's GRO would have built it), and pushes it
//! through its stack as one skb. [`Coalescer::plan`] groups consecutive same-flow TCP segments
//! (and, when enabled with [`Coalescer::with_udp`], same-flow UDP datagrams) of a batch into
//! such super-packets; each [`Group`] then says what to write: a virtio header, a patched
//! copy of the first member's headers ([`Group::head`]) and the members' payloads in order
//! ([`Group::payloads`]) — ready for one `writev` or one copy into a write buffer, without
//! touching the packets themselves.
//!
//! The merge rules are those of the kernel's TCP and UDP GRO (and of wireguard-go's), made
//! strict enough that cutting a group's super-packet with `gso_size` gives back exactly the
//! original packets (see the tests): same addresses and ports, same IP TOS/traffic class and
//! flow label, TTL/hop limit, DF bit; consecutive IPv4 IDs; every member as long as the first
//! except a shorter last one. For TCP also: same TCP header apart from sequence number and
//! PSH (ACK number, window, option bytes, urgent pointer); flags exactly ACK or ACK|PSH;
//! contiguous sequence numbers; PSH only on the last. For UDP also: a non-zero checksum
//! (IPv4's "no checksum" could not survive the kernel computing the super-packet's) and a
//! non-empty payload. Every member's checksums are verified before it is merged, because the
//! super-packet goes to the kernel as CHECKSUM_PARTIAL, which the kernel trusts: merging
//! would otherwise launder a corrupted packet.

use std::collections::HashMap;

use super::checksum::{checksum, fold, pseudo_header, sum};
use super::segment::{PROTO_TCP, PROTO_UDP, TCP_PSH};
use super::virtio::{FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VirtioNetHdr};

/// The longest head [`Group::head`] writes: an IPv6 header (coalesced IPv4 packets have no
/// options, so 20 bytes) and a TCP header with 40 bytes of options (a UDP head is shorter).
pub const MAX_HEAD_LEN: usize = 40 + 60;

/// At most this many packets go into one super-packet (the kernel's GRO limit as well, and
/// no more than the `UDP_MAX_SEGMENTS` a USO packet from a virtio header may carry).
pub const MAX_MEMBERS: usize = 64;

const TCP_ACK: u8 = 0x10;
const UDP_HL: usize = 8;

/// Plans the coalescing of batches of packets; reusable from batch to batch so that, once
/// its tables have grown to the batch size, planning allocates nothing.
///
/// Open flows are found through a `HashMap` keyed by protocol, addresses and ports (cleared,
/// not dropped, between batches, so it keeps its capacity): a batch can carry as many flows
/// as packets, and a linear scan over the open groups would make planning quadratic in that
/// case. The map's default SipHash costs tens of nanoseconds per packet, negligible next to
/// decryption, and keeps a peer from engineering collisions.
///
/// [`Coalescer::new`] (and `Default`) merges TCP only; [`Coalescer::with_udp`] merges UDP
/// as well, for a device the kernel granted USO.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Group slots; the first `used` are this batch's. Slots (and their member vectors) are
    /// reused across batches.
    groups: Vec<Group>,
    used: usize,
    /// The latest TCP or UDP group of each flow in this batch.
    flows: HashMap<FlowKey, u32>,
    /// Whether UDP datagrams are merged (into `GSO_UDP_L4` super-packets).
    udp: bool,
}

/// One write to the TUN device: a single packet as it is, or a TCP or UDP super-packet made
/// of several packets of one flow.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Indexes into the planned batch, increasing; the first is the head.
    members: Vec<u32>,
    /// Length of the IP packet to write (the packet itself for a single).
    len: usize,
    /// Set while this is (or may become) a super-packet.
    merge: Option<MergeState>,
}

/// Coalescing state of a TCP or UDP group.
#[derive(Debug, Clone, Copy)]
struct MergeState {
    v6: bool,
    /// A UDP group (`GSO_UDP_L4`) rather than a TCP one.
    udp: bool,
    ip_hl: u16,
    /// TCP header length, or 8 for UDP.
    l4_hl: u16,
    /// The head's payload length: every member but the last has exactly this much.
    seg_size: u16,
    payload_total: u32,
    /// TCP only: the sequence number the next member must have.
    next_seq: u32,
    next_id: u16,
    /// Some member has PSH (only the last can; never for UDP).
    psh: bool,
    /// Nothing more may join (shorter segment, PSH, or full).
    closed: bool,
    /// The head's checksums are verified lazily, when a second packet wants to join, so
    /// that packets that stay alone are not read an extra time.
    head_verified: bool,
}

impl MergeState {
    fn protocol(&self) -> u8 {
        if self.udp { PROTO_UDP } else { PROTO_TCP }
    }
}

/// Protocol, addresses and ports of one direction of a TCP connection or UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    v6: bool,
    udp: bool,
    /// Source then destination; IPv4 addresses use the first 8 bytes.
    addrs: [u8; 32],
    ports: [u8; 4],
}

impl FlowKey {
    fn new(packet: &[u8], v6: bool, udp: bool, ip_hl: usize) -> Self {
        let mut addrs = [0; 32];
        if v6 {
            addrs.copy_from_slice(&packet[8..40]);
        } else {
            addrs[..8].copy_from_slice(&packet[12..20]);
        }
        let mut ports = [0; 4];
        ports.copy_from_slice(&packet[ip_hl..ip_hl + 4]);
        FlowKey {
            v6,
            udp,
            addrs,
            ports,
        }
    }
}

/// A TCP segment or UDP datagram that may be coalesced.
struct Candidate {
    key: FlowKey,
    v6: bool,
    udp: bool,
    ip_hl: usize,
    l4_hl: usize,
    /// TCP only.
    seq: u32,
    payload_len: usize,
    psh: bool,
    id: u16,
}

enum Class {
    Candidate(Candidate),
    /// A TCP or UDP packet that is not merged but orders against its flow's packets (SYN,
    /// FIN, pure ACK, empty or checksum-less datagram, IPv4 options, ...): it closes the
    /// flow's open group.
    FlowOnly(FlowKey),
    /// Anything else; written alone.
    Other,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Sorts a packet; UDP is only a candidate (or a flow) when `udp` is set.
fn classify(p: &[u8], udp: bool) -> Class {
    let Some(&first) = p.first() else {
        return Class::Other;
    };
    let wanted = |protocol: u8| protocol == PROTO_TCP || (udp && protocol == PROTO_UDP);
    let (v6, ip_hl, protocol) = match first >> 4 {
        4 => {
            if p.len() < 20 {
                return Class::Other;
            }
            let ihl = usize::from(first & 0x0f) * 4;
            // Fragments (MF or an offset) either lack the transport header or must not be
            // merged; ordering them against the flow does not matter, reassembly comes first.
            if ihl < 20 || !wanted(p[9]) || be16(p, 6) & 0x3fff != 0 {
                return Class::Other;
            }
            (false, ihl, p[9])
        }
        6 => {
            // With extension headers the ports are not at a fixed place; such packets are
            // written alone.
            if p.len() < 40 || !wanted(p[6]) {
                return Class::Other;
            }
            (true, 40, p[6])
        }
        _ => return Class::Other,
    };
    let is_udp = protocol == PROTO_UDP;
    if p.len() < ip_hl + if is_udp { UDP_HL } else { 20 } {
        return Class::Other;
    }
    let key = FlowKey::new(p, v6, is_udp, ip_hl);
    let length_ok = if v6 {
        usize::from(be16(p, 4)) == p.len() - 40
    } else {
        usize::from(be16(p, 2)) == p.len()
    };
    if (!v6 && ip_hl != 20) || !length_ok {
        return Class::FlowOnly(key);
    }
    let l4 = &p[ip_hl..];
    let (l4_hl, seq, psh) = if is_udp {
        // The UDP length must agree with the IP length (cutting rewrites it from the IP
        // length); an empty payload cannot be a segment; checksum 0 ("none", IPv4 only) would
        // come back from the kernel's CHECKSUM_PARTIAL completion as a real checksum.
        if usize::from(be16(l4, 4)) != l4.len() || l4.len() == UDP_HL || be16(l4, 6) == 0 {
            return Class::FlowOnly(key);
        }
        (UDP_HL, 0, false)
    } else {
        let tcp_hl = usize::from(l4[12] >> 4) * 4;
        let flags = l4[13];
        if tcp_hl < 20 || tcp_hl >= l4.len() || flags & !TCP_PSH != TCP_ACK {
            return Class::FlowOnly(key);
        }
        (tcp_hl, be32(l4, 4), flags & TCP_PSH != 0)
    };
    Class::Candidate(Candidate {
        key,
        v6,
        udp: is_udp,
        ip_hl,
        l4_hl,
        seq,
        payload_len: l4.len() - l4_hl,
        psh,
        id: be16(p, 4),
    })
}

/// Whether the IPv4 header checksum (if any) and the TCP or UDP checksum of a candidate are
/// right.
fn checksums_valid(p: &[u8], v6: bool, ip_hl: usize, protocol: u8) -> bool {
    if !v6 && fold(sum(&p[..ip_hl], 0)) != 0xffff {
        return false;
    }
    let pseudo = pseudo_header(p, v6, protocol, p.len() - ip_hl);
    fold(sum(&p[ip_hl..], pseudo)) == 0xffff
}

/// Whether the headers of `p` match those of the group's head `head` wherever the segments
/// of one super-packet are identical.
fn same_headers(head: &[u8], p: &[u8], st: &MergeState) -> bool {
    let ip_hl = usize::from(st.ip_hl);
    let ip_same = if st.v6 {
        // Version, traffic class, flow label; hop limit.
        head[0..4] == p[0..4] && head[7] == p[7]
    } else {
        // TOS; flags and fragment offset (DF, as neither is a fragment); TTL.
        head[1] == p[1] && head[6..8] == p[6..8] && head[8] == p[8]
    };
    if st.udp {
        // Ports are in the flow key; length and checksum are per segment.
        return ip_same;
    }
    let tcp_hl = usize::from(st.l4_hl);
    let (h, t) = (&head[ip_hl..ip_hl + tcp_hl], &p[ip_hl..ip_hl + tcp_hl]);
    ip_same
        // ACK number, data offset and reserved bits.
        && h[8..13] == t[8..13]
        && (h[13] & !TCP_PSH) == (t[13] & !TCP_PSH)
        // Window; urgent pointer; options.
        && h[14..16] == t[14..16]
        && h[18..] == t[18..]
}

impl Coalescer {
    /// A coalescer that merges TCP segments only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A coalescer that merges TCP segments and, if `udp`, UDP datagrams too (into
    /// `GSO_UDP_L4` super-packets, which only a device granted `TUN_F_USO4 | TUN_F_USO6`
    /// accepts). `with_udp(false)` is [`Coalescer::new`].
    pub fn with_udp(udp: bool) -> Self {
        Coalescer {
            udp,
            ..Self::default()
        }
    }

    /// Groups `packets` (IP packets, in batch order): every packet ends up in exactly one
    /// group, members of a group are in batch order, and groups are returned in the order of
    /// their first packet. A packet that is not merged closes its flow's open group, so
    /// writing the groups in order keeps every flow's packets in order.
    ///
    /// Indexes are `u32`: a batch must have fewer than 2^32 packets.
    pub fn plan<P: AsRef<[u8]>>(&mut self, packets: &[P]) -> &[Group] {
        self.used = 0;
        self.flows.clear();
        for (i, packet) in packets.iter().enumerate() {
            let p = packet.as_ref();
            let i = i as u32;
            match classify(p, self.udp) {
                Class::Other => {
                    self.push_group(i, p.len(), None);
                }
                Class::FlowOnly(key) => {
                    self.flows.remove(&key);
                    self.push_group(i, p.len(), None);
                }
                Class::Candidate(c) => self.add_candidate(packets, i, p, c),
            }
        }
        &self.groups[..self.used]
    }

    fn add_candidate<P: AsRef<[u8]>>(&mut self, packets: &[P], i: u32, p: &[u8], c: Candidate) {
        if let Some(&g) = self.flows.get(&c.key) {
            let group = &mut self.groups[g as usize];
            if let Some(st) = group.merge.as_mut()
                && can_join(st, group.members.len(), &c)
                && same_headers(packets[group.members[0] as usize].as_ref(), p, st)
            {
                let head = packets[group.members[0] as usize].as_ref();
                let protocol = st.protocol();
                if !st.head_verified
                    && !checksums_valid(head, st.v6, usize::from(st.ip_hl), protocol)
                {
                    // The head stays a packet of its own; this one starts a new group.
                    group.merge = None;
                } else {
                    st.head_verified = true;
                    if checksums_valid(p, c.v6, c.ip_hl, protocol) {
                        let len = c.payload_len as u32;
                        st.payload_total += len;
                        st.next_seq = st.next_seq.wrapping_add(len);
                        st.next_id = st.next_id.wrapping_add(1);
                        st.psh |= c.psh;
                        group.members.push(i);
                        group.len += c.payload_len;
                        st.closed = c.psh
                            || c.payload_len < usize::from(st.seg_size)
                            || group.members.len() >= MAX_MEMBERS;
                        return;
                    }
                    // A bad checksum: written alone (for the kernel to drop), and the flow's
                    // group cannot continue past it.
                    self.flows.remove(&c.key);
                    self.push_group(i, p.len(), None);
                    return;
                }
            }
        }
        let state = MergeState {
            v6: c.v6,
            udp: c.udp,
            ip_hl: c.ip_hl as u16,
            l4_hl: c.l4_hl as u16,
            seg_size: c.payload_len.min(usize::from(u16::MAX)) as u16,
            payload_total: c.payload_len as u32,
            next_seq: c.seq.wrapping_add(c.payload_len as u32),
            next_id: c.id.wrapping_add(1),
            psh: c.psh,
            closed: c.psh,
            head_verified: false,
        };
        let g = self.push_group(i, p.len(), Some(state));
        self.flows.insert(c.key, g);
    }

    fn push_group(&mut self, i: u32, len: usize, merge: Option<MergeState>) -> u32 {
        if self.used == self.groups.len() {
            self.groups.push(Group::default());
        }
        let group = &mut self.groups[self.used];
        group.members.clear();
        group.members.push(i);
        group.len = len;
        group.merge = merge;
        self.used += 1;
        (self.used - 1) as u32
    }
}

/// The checks of a join that need only the group's state and the candidate's summary.
fn can_join(st: &MergeState, members: usize, c: &Candidate) -> bool {
    let l4_len = usize::from(st.l4_hl) + st.payload_total as usize + c.payload_len;
    // The IPv6 payload length field, or the IPv4 total length.
    let total_ip_len = if st.v6 {
        l4_len
    } else {
        usize::from(st.ip_hl) + l4_len
    };
    !st.closed
        && members < MAX_MEMBERS
        && c.v6 == st.v6
        && c.udp == st.udp
        && c.l4_hl == usize::from(st.l4_hl)
        && (st.udp || c.seq == st.next_seq)
        && c.payload_len <= usize::from(st.seg_size)
        && (st.v6 || c.id == st.next_id)
        && total_ip_len <= usize::from(u16::MAX)
}

impl Group {
    /// Indexes of the member packets in the planned batch, in order; the first is the head.
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    /// Whether this group is a super-packet of several packets.
    pub fn is_coalesced(&self) -> bool {
        self.members.len() > 1
    }

    /// Length of the IP packet this group writes (without the virtio header): `head_len()`
    /// plus the lengths of all `payloads()`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a group has at least one member (this exists for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The virtio header to write in front of this group: [`VirtioNetHdr::NONE`] for a
    /// single packet; for a super-packet, CHECKSUM_PARTIAL (`FLAG_NEEDS_CSUM` with the TCP
    /// checksum field at `csum_start + 16`, the UDP one at `csum_start + 6`) and TSO or USO
    /// (`GSO_UDP_L4`) with the head's payload length as `gso_size`, which is how the kernel
    /// describes a GRO packet.
    pub fn virtio_header(&self) -> VirtioNetHdr {
        match self.coalesced_state() {
            None => VirtioNetHdr::NONE,
            Some(st) => VirtioNetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type: match (st.udp, st.v6) {
                    (true, _) => GSO_UDP_L4,
                    (false, false) => GSO_TCPV4,
                    (false, true) => GSO_TCPV6,
                },
                hdr_len: st.ip_hl + st.l4_hl,
                gso_size: st.seg_size,
                csum_start: st.ip_hl,
                csum_offset: if st.udp { 6 } else { 16 },
            },
        }
    }

    fn coalesced_state(&self) -> Option<&MergeState> {
        self.merge.as_ref().filter(|_| self.members.len() > 1)
    }

    /// How many bytes [`Group::head`] writes: 0 for a single packet, else the IP and TCP or
    /// UDP header length of the head (at most [`MAX_HEAD_LEN`]).
    pub fn head_len(&self) -> usize {
        self.coalesced_state()
            .map_or(0, |st| usize::from(st.ip_hl + st.l4_hl))
    }

    /// Writes the headers that go in front of [`Group::payloads`] into `out` and returns
    /// their length ([`Group::head_len`]).
    ///
    /// A single packet is written as it is, so its head is empty and its one payload is the
    /// whole packet. A super-packet's head is the first member's IP and TCP or UDP headers
    /// with the IPv4 total length and header checksum (ID kept) or the IPv6 payload length
    /// set for the whole super-packet; for TCP, PSH set if a member had it; for UDP, the UDP
    /// length set for the whole super-packet; and the TCP or UDP checksum field holding the
    /// folded, non-complemented pseudo-header sum over the super-packet's transport length:
    /// what CHECKSUM_PARTIAL means to the kernel, which completes it (or checks nothing, as
    /// it trusts partial checksums) and uses the same value to checksum each segment if it
    /// has to cut the packet again (when forwarding, or for a UDP socket without `UDP_GRO`).
    ///
    /// `packets` must be the batch given to [`Coalescer::plan`]. Panics if `out` is shorter
    /// than `head_len()` (any buffer of [`MAX_HEAD_LEN`] bytes will do).
    pub fn head<P: AsRef<[u8]>>(&self, packets: &[P], out: &mut [u8]) -> usize {
        let Some(st) = self.coalesced_state() else {
            return 0;
        };
        let (ip_hl, l4_hl) = (usize::from(st.ip_hl), usize::from(st.l4_hl));
        let hl = ip_hl + l4_hl;
        assert!(
            out.len() >= hl,
            "head buffer of {} bytes, need {hl}",
            out.len()
        );
        let head = packets[self.members[0] as usize].as_ref();
        let out = &mut out[..hl];
        out.copy_from_slice(&head[..hl]);
        let l4_len = l4_hl + st.payload_total as usize;
        if st.v6 {
            out[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            out[2..4].copy_from_slice(&((ip_hl + l4_len) as u16).to_be_bytes());
            out[10..12].fill(0);
            let ip_csum = checksum(&out[..ip_hl], 0);
            out[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        }
        let pseudo = pseudo_header(out, st.v6, st.protocol(), l4_len);
        let csum_field = if st.udp {
            out[ip_hl + 4..ip_hl + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            ip_hl + 6
        } else {
            if st.psh {
                out[ip_hl + 13] |= TCP_PSH;
            }
            ip_hl + 16
        };
        out[csum_field..csum_field + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        hl
    }

    /// The byte slices to write after [`Group::head`], in order: the whole packet for a
    /// single, each member's TCP or UDP payload for a super-packet. `packets` must be the
    /// batch given to [`Coalescer::plan`].
    pub fn payloads<'a, P: AsRef<[u8]>>(
        &'a self,
        packets: &'a [P],
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let skip = self.head_len();
        self.members
            .iter()
            .map(move |&i| &packets[i as usize].as_ref()[skip..])
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::test_rng::Rng;
    use super::super::segment::segment;
    use super::super::segment::testutil::{Flow, l4_offset, partial_pseudo, verify};
    use super::super::virtio::GSO_NONE;
    use super::*;

    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;

    /// What the group writes, as one buffer.
    fn build(group: &Group, packets: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0; MAX_HEAD_LEN];
        let n = group.head(packets, &mut out);
        assert_eq!(n, group.head_len());
        out.truncate(n);
        for p in group.payloads(packets) {
            out.extend_from_slice(p);
        }
        assert_eq!(out.len(), group.len());
        out
    }

    /// Cuts every group's write back into packets with `segment` and checks that they are
    /// the members, byte for byte; also completes the partial checksum of each super-packet
    /// as the kernel would and checks the result.
    fn check_round_trip(groups: &[Group], packets: &[Vec<u8>]) {
        let mut seen = vec![false; packets.len()];
        let mut last_first = None;
        for group in groups {
            let members = group.members();
            assert!(!members.is_empty());
            assert!(members.windows(2).all(|w| w[0] < w[1]));
            assert!(
                last_first < Some(members[0]),
                "groups in order of first packet"
            );
            last_first = Some(members[0]);
            for &m in members {
                assert!(!std::mem::replace(&mut seen[m as usize], true));
            }
            let hdr = group.virtio_header();
            let mut written = build(group, packets);
            if members.len() == 1 {
                assert_eq!(hdr, VirtioNetHdr::NONE);
                assert_eq!(written, packets[members[0] as usize]);
                continue;
            }
            let head = &packets[members[0] as usize];
            let v6 = head[0] >> 4 == 6;
            let protocol = head[if v6 { 6 } else { 9 }];
            let udp = protocol == PROTO_UDP;
            let l4 = l4_offset(head);
            assert!(written.len() <= 65535 + if v6 { 40 } else { 0 });
            assert_eq!(
                hdr,
                VirtioNetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    gso_type: match (udp, v6) {
                        (true, _) => GSO_UDP_L4,
                        (false, false) => GSO_TCPV4,
                        (false, true) => GSO_TCPV6,
                    },
                    hdr_len: group.head_len() as u16,
                    gso_size: (head.len() - group.head_len()) as u16,
                    csum_start: l4 as u16,
                    csum_offset: if udp { 6 } else { 16 },
                }
            );
            if udp {
                assert_eq!(group.head_len(), l4 + 8);
            }
            // The partial checksum: the folded pseudo-header sum over the whole super-packet.
            let field = l4 + usize::from(hdr.csum_offset);
            assert_eq!(
                written[field..field + 2],
                partial_pseudo(&written, protocol).to_be_bytes()
            );
            let mut out = Vec::new();
            let mut copy = written.clone();
            let n = segment(&hdr, &mut copy, |h, p| {
                let mut v = h.to_vec();
                v.extend_from_slice(p);
                out.push(v);
            })
            .unwrap();
            assert_eq!(n, members.len());
            for (got, &m) in out.iter().zip(members) {
                assert_eq!(got, &packets[m as usize], "member {m}");
            }
            // The kernel's view: CHECKSUM_PARTIAL completed over the whole super-packet.
            let partial = VirtioNetHdr {
                gso_type: GSO_NONE,
                ..hdr
            };
            segment(&partial, &mut written, |_, _| {}).unwrap();
            verify(&written).unwrap();
        }
        assert!(seen.iter().all(|&s| s), "every packet in a group");
    }

    fn stream_packets(
        rng: &mut Rng,
        flow: &Flow,
        mss: usize,
        total: usize,
        psh_every: usize,
    ) -> Vec<Vec<u8>> {
        let data = rng.bytes(total);
        let mut seq = rng.u32();
        let mut id = rng.u16();
        let mut out = Vec::new();
        for (n, chunk) in data.chunks(mss).enumerate() {
            let psh = psh_every != 0 && n % psh_every == psh_every - 1;
            out.push(flow.tcp(seq, ACK | if psh { PSH } else { 0 }, chunk, id));
            seq = seq.wrapping_add(chunk.len() as u32);
            id = id.wrapping_add(1);
        }
        out
    }

    #[test]
    fn random_batches_round_trip_through_segment() {
        let mut rng = Rng::new(20);
        let mut coalescer = Coalescer::new();
        let mut merged_groups = 0;
        for round in 0..300 {
            let nflows = 1 + rng.below(4);
            let streams: Vec<Vec<Vec<u8>>> = (0..nflows)
                .map(|f| {
                    let mut flow = Flow::new(rng.bool(), f as u8);
                    if rng.below(3) == 0 {
                        flow.options.clear();
                    }
                    let mss = [1, 100, 536, 1200, 1380, 1448, 8000][rng.below(7)];
                    let total = rng.below(if mss == 1 { 200 } else { 70_000 });
                    let psh_every = [0, 0, 3, 17][rng.below(4)];
                    stream_packets(&mut rng, &flow, mss, total, psh_every)
                })
                .collect();
            let (batch, flow_of) = interleave(&mut rng, streams);
            let groups = coalescer.plan(&batch);
            check_round_trip(groups, &batch);
            merged_groups += groups.iter().filter(|g| g.is_coalesced()).count();
            // Per-flow order in write order.
            let order: Vec<u32> = groups.iter().flat_map(|g| g.members().to_vec()).collect();
            for f in 0..nflows {
                let of_flow: Vec<u32> = order
                    .iter()
                    .copied()
                    .filter(|&i| flow_of[i as usize] == Some(f))
                    .collect();
                assert!(of_flow.windows(2).all(|w| w[0] < w[1]), "round {round}");
            }
        }
        assert!(merged_groups > 300, "only {merged_groups} super-packets");
    }

    #[test]
    fn an_in_order_stream_coalesces_up_to_the_limits() {
        let mut rng = Rng::new(21);
        let mut c = Coalescer::new();
        for v6 in [false, true] {
            let flow = Flow::new(v6, 1);
            // 1448-byte segments: 45 fit in 65535 bytes of IP packet.
            let packets = stream_packets(&mut rng, &flow, 1448, 1448 * 100, 0);
            let groups = c.plan(&packets);
            let sizes: Vec<usize> = groups.iter().map(|g| g.members().len()).collect();
            assert_eq!(sizes, [45, 45, 10]);
            assert!(
                groups
                    .iter()
                    .all(|g| g.len() <= 65535 + 40 * usize::from(v6))
            );
            check_round_trip(groups, &packets);
            // 64 members at most.
            let packets = stream_packets(&mut rng, &flow, 100, 100 * 130, 0);
            let groups = c.plan(&packets);
            let sizes: Vec<usize> = groups.iter().map(|g| g.members().len()).collect();
            assert_eq!(sizes, [64, 64, 2]);
            check_round_trip(groups, &packets);
            let hdr = groups[0].virtio_header();
            let ip_hl = if v6 { 40 } else { 20 };
            assert_eq!(
                hdr,
                VirtioNetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                    hdr_len: ip_hl + 32,
                    gso_size: 100,
                    csum_start: ip_hl,
                    csum_offset: 16,
                }
            );
        }
    }

    /// Plans `packets` (TCP only) and returns the groups as lists of member indexes.
    /// The streams' packets interleaved at random, each stream's order kept, with some
    /// other packets (a stray UDP datagram, garbage, a pure ACK) in between; and for each
    /// packet of the batch, the index of the stream it came from.
    fn interleave(
        rng: &mut Rng,
        mut streams: Vec<Vec<Vec<u8>>>,
    ) -> (Vec<Vec<u8>>, Vec<Option<usize>>) {
        for s in &mut streams {
            s.reverse();
        }
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut flow_of: Vec<Option<usize>> = Vec::new();
        while streams.iter().any(|s| !s.is_empty()) {
            let f = rng.below(streams.len());
            if let Some(p) = streams[f].pop() {
                batch.push(p);
                flow_of.push(Some(f));
            }
            if rng.below(20) == 0 {
                let other = match rng.below(3) {
                    0 => Flow::new(rng.bool(), 99).udp(&rng.bytes(300), 1),
                    1 => rng.bytes_below(80),
                    _ => Flow::new(false, 0).tcp(1, ACK, &[], 1), // a pure ACK
                };
                batch.push(other);
                flow_of.push(None);
            }
        }
        (batch, flow_of)
    }

    /// The packet with one payload bit flipped: its transport checksum no longer holds.
    fn corrupted(mut packet: Vec<u8>) -> Vec<u8> {
        let last = packet.len() - 1;
        packet[last] ^= 0x40;
        packet
    }

    fn shape(packets: &[Vec<u8>]) -> Vec<Vec<u32>> {
        shape_with(false, packets)
    }

    /// Plans `packets`, merging UDP if `udp`, and returns the groups as lists of member
    /// indexes.
    fn shape_with(udp: bool, packets: &[Vec<u8>]) -> Vec<Vec<u32>> {
        let mut c = Coalescer::with_udp(udp);
        let groups = c.plan(packets);
        check_round_trip(groups, packets);
        groups.iter().map(|g| g.members().to_vec()).collect()
    }

    #[test]
    fn packets_that_must_not_merge_do_not() {
        let f = Flow::new(false, 1);
        let d = [7u8; 1000];
        let s = 5000u32;
        let full = |seq: u32, id: u16| f.tcp(seq, ACK, &d, id);
        let base = shape(&[full(s, 1), full(s + 1000, 2), full(s + 2000, 3)]);
        assert_eq!(base, [vec![0, 1, 2]]);

        // Sequence gap.
        assert_eq!(shape(&[full(s, 1), full(s + 1001, 2)]), [vec![0], vec![1]]);
        // Retransmission (same sequence).
        assert_eq!(shape(&[full(s, 1), full(s, 2)]), [vec![0], vec![1]]);
        // Different ACK number.
        let mut g = f.clone();
        g.ack += 1;
        assert_eq!(
            shape(&[full(s, 1), g.tcp(s + 1000, ACK, &d, 2)]),
            [vec![0], vec![1]]
        );
        // Different option bytes (timestamp), same length.
        let mut g = f.clone();
        g.options[11] ^= 1;
        assert_eq!(
            shape(&[full(s, 1), g.tcp(s + 1000, ACK, &d, 2)]),
            [vec![0], vec![1]]
        );
        // Different window, TOS, TTL, DF, urgent pointer.
        for tweak in 0..5 {
            let mut g = f.clone();
            match tweak {
                0 => g.window += 1,
                1 => g.tos = 4,
                2 => g.ttl -= 1,
                3 => g.urgent = 1,
                _ => g.df = false,
            }
            assert_eq!(
                shape(&[full(s, 1), g.tcp(s + 1000, ACK, &d, 2)]),
                [vec![0], vec![1]],
                "tweak {tweak}"
            );
        }
        // IPv4 IDs not consecutive.
        assert_eq!(shape(&[full(s, 1), full(s + 1000, 3)]), [vec![0], vec![1]]);
        // SYN, FIN, RST, URG, ECE, CWR, no ACK: alone, and they close the open group.
        for flags in [
            0x02,
            0x01 | ACK,
            0x04 | ACK,
            0x20 | ACK,
            0x40 | ACK,
            0x80 | ACK,
            0,
        ] {
            assert_eq!(
                shape(&[
                    full(s, 1),
                    full(s + 1000, 2),
                    f.tcp(s + 2000, flags, &d, 3),
                    full(s + 3000, 4),
                    full(s + 4000, 5),
                ]),
                [vec![0, 1], vec![2], vec![3, 4]],
                "flags {flags:#x}"
            );
        }
        // A pure ACK (no payload) of the same flow closes the group too.
        assert_eq!(
            shape(&[full(s, 1), f.tcp(s + 1000, ACK, &[], 2), full(s + 1000, 3)]),
            [vec![0], vec![1], vec![2]]
        );
        // PSH closes the group after it.
        assert_eq!(
            shape(&[
                full(s, 1),
                f.tcp(s + 1000, ACK | PSH, &d, 2),
                full(s + 2000, 3),
                full(s + 3000, 4),
            ]),
            [vec![0, 1], vec![2, 3]]
        );
        // A PSH head takes nobody.
        assert_eq!(
            shape(&[f.tcp(s, ACK | PSH, &d, 1), full(s + 1000, 2)]),
            [vec![0], vec![1]]
        );
        // A shorter segment ends the group; a larger one never follows a smaller one.
        assert_eq!(
            shape(&[
                full(s, 1),
                f.tcp(s + 1000, ACK, &d[..500], 2),
                full(s + 1500, 3),
                full(s + 2500, 4),
            ]),
            [vec![0, 1], vec![2, 3]]
        );
        assert_eq!(
            shape(&[f.tcp(s, ACK, &d[..500], 1), full(s + 500, 2)]),
            [vec![0], vec![1]]
        );
        // IPv4 options or a fragment: alone.
        let mut with_options = full(s + 1000, 2);
        with_options.splice(20..20, [1, 1, 1, 0]); // NOPs and an end of options list
        with_options[0] = 0x46;
        with_options[2..4].copy_from_slice(&1056u16.to_be_bytes());
        assert_eq!(
            shape(&[full(s, 1), with_options, full(s + 1000, 3)]),
            [vec![0], vec![1], vec![2]]
        );
        // Different flows interleaved: each merges with its own.
        let g = Flow::new(false, 2);
        assert_eq!(
            shape(&[
                full(s, 1),
                g.tcp(9, ACK, &d, 50),
                full(s + 1000, 2),
                g.tcp(1009, ACK, &d, 51),
            ]),
            [vec![0, 2], vec![1, 3]]
        );
    }

    #[test]
    fn bad_checksums_are_never_merged() {
        let f = Flow::new(true, 1);
        let d = [3u8; 1200];
        let s = 77u32;
        let good = |n: u32| f.tcp(s + n * 1200, ACK, &d, 0);
        let bad = |n: u32| corrupted(good(n));
        // A bad member is written alone and ends its flow's group.
        assert_eq!(
            shape(&[good(0), good(1), bad(2), good(3), good(4)]),
            [vec![0, 1], vec![2], vec![3, 4]]
        );
        // A bad head stays alone; the next packet starts the group.
        assert_eq!(shape(&[bad(0), good(1), good(2)]), [vec![0], vec![1, 2]]);
        // A bad IPv4 header checksum.
        let f4 = Flow::new(false, 1);
        let mut p = f4.tcp(s + 1200, ACK, &d, 2);
        p[8] ^= 1; // TTL changed without fixing the header checksum...
        let mut q = f4.clone();
        q.ttl ^= 1; // ...so the head's TTL must match for the join to be tried.
        assert_eq!(shape(&[q.tcp(s, ACK, &d, 1), p]), [vec![0], vec![1]]);
    }

    #[test]
    fn garbage_is_written_alone_and_never_panics() {
        let mut rng = Rng::new(22);
        let mut coalescers = [Coalescer::new(), Coalescer::with_udp(true)];
        let f = Flow::new(false, 1);
        let seeds = [
            f.tcp(1, ACK, &[5; 200], 1),
            f.udp(&[5; 200], 1),
            Flow::new(true, 1).udp(&[5; 200], 1),
        ];
        for round in 0..6000 {
            let c = &mut coalescers[round % 2];
            let batch: Vec<Vec<u8>> = (0..rng.below(10))
                .map(|_| {
                    if rng.bool() {
                        rng.bytes_below(100)
                    } else {
                        let mut p = seeds[rng.below(seeds.len())].clone();
                        p.truncate(rng.below(p.len() + 1));
                        if !p.is_empty() {
                            let i = rng.below(p.len().min(60));
                            p[i] = rng.u8();
                        }
                        p
                    }
                })
                .collect();
            let groups = c.plan(&batch);
            check_round_trip(groups, &batch);
        }
    }

    #[test]
    fn planning_reuses_its_storage() {
        let mut rng = Rng::new(23);
        let mut c = Coalescer::new();
        let flows: Vec<Flow> = (0..8).map(|n| Flow::new(n % 2 == 0, n)).collect();
        let batch: Vec<Vec<u8>> = flows
            .iter()
            .flat_map(|f| stream_packets(&mut rng, f, 1000, 16_000, 0))
            .collect();
        c.plan(&batch);
        let caps: Vec<usize> = c.groups.iter().map(|g| g.members.capacity()).collect();
        let (groups_cap, flows_cap) = (c.groups.capacity(), c.flows.capacity());
        for _ in 0..3 {
            let n = c.plan(&batch).len();
            assert_eq!(n, 8);
        }
        assert_eq!(c.groups.capacity(), groups_cap);
        assert_eq!(c.flows.capacity(), flows_cap);
        let caps_after: Vec<usize> = c.groups.iter().map(|g| g.members.capacity()).collect();
        assert_eq!(caps, caps_after);
    }

    /// Datagrams of one UDP flow with the given payload lengths and consecutive IPv4 IDs
    /// from a random first one.
    fn datagrams(rng: &mut Rng, flow: &Flow, lens: &[usize]) -> Vec<Vec<u8>> {
        let mut id = rng.u16();
        lens.iter()
            .map(|&len| {
                id = id.wrapping_add(1);
                flow.udp(&rng.bytes(len), id)
            })
            .collect()
    }

    /// How many members the groups of a UDP flow with these payload lengths must have when
    /// nothing else interferes: joined while they fit (64 members, 65535 bytes of IP packet
    /// or IPv6 payload), a shorter one closing its group.
    fn expected_udp_groups(v6: bool, lens: &[usize]) -> Vec<usize> {
        let max_payload = 65535 - 8 - if v6 { 0 } else { 20 };
        let mut out = Vec::new();
        let (mut n, mut total, mut seg, mut closed) = (0, 0, 0, true);
        for &len in lens {
            if closed || n == MAX_MEMBERS || len > seg || total + len > max_payload {
                if n > 0 {
                    out.push(n);
                }
                (n, total, seg) = (0, 0, len);
            }
            n += 1;
            total += len;
            closed = len < seg;
        }
        if n > 0 {
            out.push(n);
        }
        out
    }

    fn is_udp(p: &[u8]) -> bool {
        p.len() >= 40 && p[if p[0] >> 4 == 6 { 6 } else { 9 }] == PROTO_UDP
    }

    #[test]
    fn random_udp_batches_round_trip_through_segment() {
        let mut rng = Rng::new(24);
        let mut with_udp = Coalescer::with_udp(true);
        let mut tcp_only = Coalescer::new();
        let mut merged_udp_groups = 0;
        for round in 0..300 {
            let nudp = 1 + rng.below(4);
            let ntcp = rng.below(3);
            let mut expected = Vec::new();
            let mut streams: Vec<Vec<Vec<u8>>> = Vec::new();
            for f in 0..nudp {
                let v6 = rng.bool();
                let flow = Flow::new(v6, f as u8);
                let seg = 1 + rng.below(1472);
                let mut lens = vec![seg; rng.below(if seg < 100 { 150 } else { 100 })];
                if rng.bool() {
                    lens.push(rng.below(seg) + 1);
                }
                expected.push(expected_udp_groups(v6, &lens));
                streams.push(datagrams(&mut rng, &flow, &lens));
            }
            // TCP flows with the same addresses and ports as the UDP flows of the same number.
            for f in 0..ntcp {
                let flow = Flow::new(rng.bool(), f as u8);
                let total = rng.below(20_000);
                streams.push(stream_packets(&mut rng, &flow, 1000, total, 0));
            }
            let (batch, flow_of) = interleave(&mut rng, streams);
            let groups = with_udp.plan(&batch);
            check_round_trip(groups, &batch);
            let order: Vec<u32> = groups.iter().flat_map(|g| g.members().to_vec()).collect();
            for (f, want) in expected.iter().enumerate() {
                // Per-flow order in write order, and the groups each UDP flow must make.
                let of_flow: Vec<u32> = order
                    .iter()
                    .copied()
                    .filter(|&i| flow_of[i as usize] == Some(f))
                    .collect();
                assert!(of_flow.windows(2).all(|w| w[0] < w[1]), "round {round}");
                let sizes: Vec<usize> = groups
                    .iter()
                    .filter(|g| flow_of[g.members()[0] as usize] == Some(f))
                    .map(|g| g.members().len())
                    .collect();
                assert_eq!(&sizes, want, "round {round} flow {f}");
                merged_udp_groups += sizes.iter().filter(|&&n| n > 1).count();
            }
            for f in nudp..nudp + ntcp {
                let of_flow: Vec<u32> = order
                    .iter()
                    .copied()
                    .filter(|&i| flow_of[i as usize] == Some(f))
                    .collect();
                assert!(of_flow.windows(2).all(|w| w[0] < w[1]), "round {round}");
            }
            // Without UDP, no UDP packet is merged.
            let groups = tcp_only.plan(&batch);
            check_round_trip(groups, &batch);
            for g in groups {
                if g.is_coalesced() {
                    assert!(
                        g.members().iter().all(|&m| !is_udp(&batch[m as usize])),
                        "round {round}"
                    );
                }
            }
        }
        assert!(
            merged_udp_groups > 300,
            "only {merged_udp_groups} super-packets"
        );
    }

    #[test]
    fn a_udp_flow_coalesces_up_to_the_limits() {
        let mut rng = Rng::new(25);
        let mut c = Coalescer::with_udp(true);
        for v6 in [false, true] {
            let flow = Flow::new(v6, 1);
            let ip_hl = if v6 { 40 } else { 20 };
            // 1472-byte datagrams: 44 fit in 65535 bytes of IP packet (or IPv6 payload).
            let packets = datagrams(&mut rng, &flow, &[1472; 100]);
            let groups = c.plan(&packets);
            let sizes: Vec<usize> = groups.iter().map(|g| g.members().len()).collect();
            assert_eq!(sizes, [44, 44, 12]);
            check_round_trip(groups, &packets);
            // 64 members at most.
            let packets = datagrams(&mut rng, &flow, &[100; 130]);
            let groups = c.plan(&packets);
            let sizes: Vec<usize> = groups.iter().map(|g| g.members().len()).collect();
            assert_eq!(sizes, [64, 64, 2]);
            check_round_trip(groups, &packets);
            assert_eq!(
                groups[0].virtio_header(),
                VirtioNetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    gso_type: GSO_UDP_L4,
                    hdr_len: ip_hl + 8,
                    gso_size: 100,
                    csum_start: ip_hl,
                    csum_offset: 6,
                }
            );
            // The head: lengths for the whole super-packet, the partial checksum.
            let mut head = [0; MAX_HEAD_LEN];
            let n = groups[0].head(&packets, &mut head);
            assert_eq!(n, usize::from(ip_hl) + 8);
            let l4_len = 8 + 64 * 100;
            let hl = usize::from(ip_hl);
            assert_eq!(be16(&head, hl + 4), l4_len as u16);
            if v6 {
                assert_eq!(be16(&head, 4), l4_len as u16);
            } else {
                assert_eq!(be16(&head, 2), (20 + l4_len) as u16);
                assert_eq!(head[4..6], packets[0][4..6], "the head's ID");
            }
            // A shorter datagram closes the group; the next starts one.
            let packets = datagrams(&mut rng, &flow, &[1000, 1000, 1000, 300, 1000, 1000]);
            let groups = c.plan(&packets);
            let shape: Vec<Vec<u32>> = groups.iter().map(|g| g.members().to_vec()).collect();
            assert_eq!(shape, [vec![0, 1, 2, 3], vec![4, 5]]);
            check_round_trip(groups, &packets);
        }
    }

    #[test]
    fn udp_packets_that_must_not_merge_do_not() {
        let f = Flow::new(false, 1);
        let d = [7u8; 1000];
        let full = |id: u16| f.udp(&d, id);
        let udp = |p: &[Vec<u8>]| shape_with(true, p);
        assert_eq!(udp(&[full(1), full(2), full(3)]), [vec![0, 1, 2]]);
        // Not without UDP enabled.
        assert_eq!(
            shape(&[full(1), full(2), full(3)]),
            [vec![0], vec![1], vec![2]]
        );

        // IPv4 checksum 0 ("no checksum"): alone, and it closes the open group; as a head it
        // takes nobody.
        let no_csum = |id: u16| {
            let mut p = full(id);
            p[26..28].fill(0);
            p
        };
        assert_eq!(
            udp(&[full(1), full(2), no_csum(3), full(4), full(5)]),
            [vec![0, 1], vec![2], vec![3, 4]]
        );
        assert_eq!(udp(&[no_csum(1), full(2), full(3)]), [vec![0], vec![1, 2]]);
        // A datagram whose checksum comes out 0 is sent as 0xffff and merges (cutting writes
        // 0xffff again); sent as 0 it passes the sum check as well, but must not merge.
        let mut z = d.to_vec();
        z[998..].fill(0);
        let c = be16(&f.udp(&z, 0), 26);
        z[998..].copy_from_slice(&c.to_be_bytes());
        let ffff = f.udp(&z, 3);
        assert_eq!(ffff[26..28], [0xff, 0xff]);
        assert!(checksums_valid(&ffff, false, 20, PROTO_UDP));
        assert_eq!(
            udp(&[full(1), full(2), ffff.clone(), full(4)]),
            [vec![0, 1, 2, 3]]
        );
        let mut zero = ffff;
        zero[26..28].fill(0);
        assert!(checksums_valid(&zero, false, 20, PROTO_UDP));
        assert_eq!(
            udp(&[full(1), full(2), zero.clone(), full(4), full(5)]),
            [vec![0, 1], vec![2], vec![3, 4]]
        );
        assert_eq!(udp(&[zero, full(4), full(5)]), [vec![0], vec![1, 2]]);
        // A bad checksum, as a member or as the head.
        let bad = |id: u16| corrupted(full(id));
        assert_eq!(
            udp(&[full(1), full(2), bad(3), full(4), full(5)]),
            [vec![0, 1], vec![2], vec![3, 4]]
        );
        assert_eq!(udp(&[bad(1), full(2), full(3)]), [vec![0], vec![1, 2]]);
        // Different TTL, TOS, DF, ports.
        for tweak in 0..5 {
            let mut g = f.clone();
            match tweak {
                0 => g.ttl -= 1,
                1 => g.tos = 4,
                2 => g.df = false,
                3 => g.sport += 1,
                _ => g.dport += 1,
            }
            assert_eq!(
                udp(&[full(1), g.udp(&d, 2)]),
                [vec![0], vec![1]],
                "tweak {tweak}"
            );
        }
        // IPv6: different hop limit, traffic class, flow label.
        let f6 = Flow::new(true, 1);
        assert_eq!(udp(&[f6.udp(&d, 0), f6.udp(&d, 0)]), [vec![0, 1]]);
        for tweak in 0..3 {
            let mut g = f6.clone();
            match tweak {
                0 => g.ttl -= 1,
                1 => g.tos = 4,
                _ => g.flow_label += 1,
            }
            assert_eq!(
                udp(&[f6.udp(&d, 0), g.udp(&d, 0)]),
                [vec![0], vec![1]],
                "v6 tweak {tweak}"
            );
        }
        // IPv4 IDs not consecutive.
        assert_eq!(udp(&[full(1), full(3)]), [vec![0], vec![1]]);
        assert_eq!(udp(&[full(2), full(1)]), [vec![0], vec![1]]);
        // A longer datagram never follows a shorter one, which closes the group.
        assert_eq!(
            udp(&[full(1), f.udp(&d[..500], 2), full(3), full(4)]),
            [vec![0, 1], vec![2, 3]]
        );
        assert_eq!(udp(&[f.udp(&d[..500], 1), full(2)]), [vec![0], vec![1]]);
        // An empty datagram: alone, and it closes the group.
        assert_eq!(
            udp(&[full(1), f.udp(&[], 2), full(3), full(4)]),
            [vec![0], vec![1], vec![2, 3]]
        );
        assert_eq!(udp(&[f.udp(&[], 1), f.udp(&[], 2)]), [vec![0], vec![1]]);
        // IPv4 options: alone, and it closes the group.
        let mut with_options = full(2);
        with_options.splice(20..20, [1, 1, 1, 0]);
        with_options[0] = 0x46;
        with_options[2..4].copy_from_slice(&1032u16.to_be_bytes());
        assert_eq!(
            udp(&[full(1), with_options, full(3), full(4)]),
            [vec![0], vec![1], vec![2, 3]]
        );
        // A fragment: alone (it cannot be told from its flow's other packets).
        let mut fragment = full(2);
        fragment[6] |= 0x20;
        assert_eq!(
            udp(&[full(1), fragment, full(3)]),
            [vec![0], vec![1], vec![2]]
        );
        // A UDP length that disagrees with the IP length.
        let mut short_udp_len = full(2);
        short_udp_len[24..26].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(
            udp(&[full(1), short_udp_len, full(3), full(4)]),
            [vec![0], vec![1], vec![2, 3]]
        );
        // TCP and UDP with the same addresses and ports are different flows; other UDP
        // flows interleaved merge with their own.
        let g = Flow::new(false, 2);
        assert_eq!(
            udp(&[
                full(1),
                f.tcp(5, ACK, &d, 60),
                g.udp(&d, 50),
                full(2),
                f.tcp(1005, ACK, &d, 61),
                g.udp(&d, 51),
                full(3),
            ]),
            [vec![0, 3, 6], vec![1, 4], vec![2, 5]]
        );
    }
}
