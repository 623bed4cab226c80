//! GRO for the write side of an offloading TUN device: planning which of a batch of decrypted
//! packets can be handed to the kernel as one TCP super-packet.
//!
//! Every write to the TUN device costs a syscall and a trip through the kernel's receive
//! path, per packet. With `IFF_VNET_HDR` the kernel accepts a TCP super-packet with a
//! virtio header saying how to cut it (as a NIC's GRO would have built it), and pushes it
//! through its stack as one skb. [`Coalescer::plan`] groups consecutive same-flow TCP segments
//! of a batch into such super-packets; each [`Group`] then says what to write: a virtio
//! header, a patched copy of the first member's headers ([`Group::head`]) and the members'
//! payloads in order ([`Group::payloads`]) — ready for one `writev` or one copy into a write
//! buffer, without touching the packets themselves.
//!
//! The merge rules are those of the kernel's TCP GRO (and of wireguard-go's), made strict
//! enough that cutting a group's super-packet with `gso_size` gives back exactly the original
//! packets (see the tests): same addresses and ports, same IP TOS/traffic class and flow
//! label, TTL/hop limit, DF bit; consecutive IPv4 IDs; same TCP header apart from sequence
//! number and PSH (ACK number, window, option bytes, urgent pointer); flags exactly ACK or
//! ACK|PSH; contiguous sequence numbers; every member as long as the first except a shorter
//! last one; PSH only on the last. Every member's checksums are verified before it is merged,
//! because the super-packet goes to the kernel as CHECKSUM_PARTIAL, which the kernel trusts:
//! merging would otherwise launder a corrupted segment.

use std::collections::HashMap;

use super::checksum::{checksum, fold, pseudo_header_v4, pseudo_header_v6, sum};
use super::segment::{PROTO_TCP, TCP_PSH};
use super::virtio::{FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, VirtioNetHdr};

/// The longest head [`Group::head`] writes: an IPv6 header (coalesced IPv4 packets have no
/// options, so 20 bytes) and a TCP header with 40 bytes of options.
pub const MAX_HEAD_LEN: usize = 40 + 60;

/// At most this many packets go into one super-packet (the kernel's GRO limit as well).
pub const MAX_MEMBERS: usize = 64;

const TCP_ACK: u8 = 0x10;

/// Plans the coalescing of batches of packets; reusable from batch to batch so that, once
/// its tables have grown to the batch size, planning allocates nothing.
///
/// Open flows are found through a `HashMap` keyed by addresses and ports (cleared, not
/// dropped, between batches, so it keeps its capacity): a batch can carry as many flows as
/// packets, and a linear scan over the open groups would make planning quadratic in that
/// case. The map's default SipHash costs tens of nanoseconds per packet, negligible next to
/// decryption, and keeps a peer from engineering collisions.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// Group slots; the first `used` are this batch's. Slots (and their member vectors) are
    /// reused across batches.
    groups: Vec<Group>,
    used: usize,
    /// The latest TCP group of each flow in this batch.
    flows: HashMap<FlowKey, u32>,
}

/// One write to the TUN device: a single packet as it is, or a TCP super-packet made of
/// several packets of one flow.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Indexes into the planned batch, increasing; the first is the head.
    members: Vec<u32>,
    /// Length of the IP packet to write (the packet itself for a single).
    len: usize,
    /// Set while this is (or may become) a TCP super-packet.
    tcp: Option<TcpState>,
}

/// Coalescing state of a TCP group.
#[derive(Debug, Clone, Copy)]
struct TcpState {
    v6: bool,
    ip_hl: u16,
    tcp_hl: u16,
    /// The head's payload length: every member but the last has exactly this much.
    seg_size: u16,
    payload_total: u32,
    next_seq: u32,
    next_id: u16,
    /// Some member has PSH (only the last can).
    psh: bool,
    /// Nothing more may join (shorter segment, PSH, or full).
    closed: bool,
    /// The head's checksums are verified lazily, when a second packet wants to join, so
    /// that packets that stay alone are not read an extra time.
    head_verified: bool,
}

/// Addresses and ports of one direction of a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    v6: bool,
    /// Source then destination; IPv4 addresses use the first 8 bytes.
    addrs: [u8; 32],
    ports: [u8; 4],
}

impl FlowKey {
    fn new(packet: &[u8], v6: bool, ip_hl: usize) -> Self {
        let mut addrs = [0; 32];
        if v6 {
            addrs.copy_from_slice(&packet[8..40]);
        } else {
            addrs[..8].copy_from_slice(&packet[12..20]);
        }
        let mut ports = [0; 4];
        ports.copy_from_slice(&packet[ip_hl..ip_hl + 4]);
        FlowKey { v6, addrs, ports }
    }
}

/// A TCP segment that may be coalesced.
struct Candidate {
    key: FlowKey,
    v6: bool,
    ip_hl: usize,
    tcp_hl: usize,
    seq: u32,
    payload_len: usize,
    psh: bool,
    id: u16,
}

enum Class {
    Candidate(Candidate),
    /// A TCP packet that is not merged but orders against its flow's packets (SYN, FIN, pure
    /// ACK, IPv4 options, ...): it closes the flow's open group.
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

fn classify(p: &[u8]) -> Class {
    let Some(&first) = p.first() else {
        return Class::Other;
    };
    let (v6, ip_hl) = match first >> 4 {
        4 => {
            if p.len() < 20 {
                return Class::Other;
            }
            let ihl = usize::from(first & 0x0f) * 4;
            // Fragments (MF or an offset) either lack the TCP header or must not be merged;
            // ordering them against the flow does not matter, reassembly comes first.
            if ihl < 20 || p[9] != PROTO_TCP || be16(p, 6) & 0x3fff != 0 {
                return Class::Other;
            }
            (false, ihl)
        }
        6 => {
            // With extension headers the ports are not at a fixed place; such packets are
            // written alone.
            if p.len() < 40 || p[6] != PROTO_TCP {
                return Class::Other;
            }
            (true, 40)
        }
        _ => return Class::Other,
    };
    if p.len() < ip_hl + 20 {
        return Class::Other;
    }
    let key = FlowKey::new(p, v6, ip_hl);
    let tcp_hl = usize::from(p[ip_hl + 12] >> 4) * 4;
    let length_ok = if v6 {
        usize::from(be16(p, 4)) == p.len() - 40
    } else {
        usize::from(be16(p, 2)) == p.len()
    };
    let flags = p[ip_hl + 13];
    if (!v6 && ip_hl != 20)
        || !length_ok
        || tcp_hl < 20
        || ip_hl + tcp_hl >= p.len()
        || flags & !TCP_PSH != TCP_ACK
    {
        return Class::FlowOnly(key);
    }
    Class::Candidate(Candidate {
        key,
        v6,
        ip_hl,
        tcp_hl,
        seq: be32(p, ip_hl + 4),
        payload_len: p.len() - ip_hl - tcp_hl,
        psh: flags & TCP_PSH != 0,
        id: be16(p, 4),
    })
}

/// Whether the IPv4 header checksum (if any) and the TCP checksum of a candidate are right.
fn checksums_valid(p: &[u8], v6: bool, ip_hl: usize) -> bool {
    let l4_len = p.len() - ip_hl;
    let pseudo = if v6 {
        pseudo_header_v6(
            p[8..24].try_into().expect("16 bytes"),
            p[24..40].try_into().expect("16 bytes"),
            PROTO_TCP,
            l4_len as u32,
        )
    } else {
        if fold(sum(&p[..ip_hl], 0)) != 0xffff {
            return false;
        }
        pseudo_header_v4(
            p[12..16].try_into().expect("4 bytes"),
            p[16..20].try_into().expect("4 bytes"),
            PROTO_TCP,
            l4_len as u16,
        )
    };
    fold(sum(&p[ip_hl..], pseudo)) == 0xffff
}

/// Whether the headers of `p` match those of the group's head `head` wherever the segments
/// of one super-packet are identical.
fn same_headers(head: &[u8], p: &[u8], st: &TcpState) -> bool {
    let ip_hl = usize::from(st.ip_hl);
    let tcp_hl = usize::from(st.tcp_hl);
    let ip_same = if st.v6 {
        // Version, traffic class, flow label; hop limit.
        head[0..4] == p[0..4] && head[7] == p[7]
    } else {
        // TOS; flags and fragment offset (DF, as neither is a fragment); TTL.
        head[1] == p[1] && head[6..8] == p[6..8] && head[8] == p[8]
    };
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
    pub fn new() -> Self {
        Self::default()
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
            match classify(p) {
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
            if let Some(st) = group.tcp.as_mut()
                && can_join(st, group.members.len(), &c)
                && same_headers(packets[group.members[0] as usize].as_ref(), p, st)
            {
                let head = packets[group.members[0] as usize].as_ref();
                if !st.head_verified && !checksums_valid(head, st.v6, usize::from(st.ip_hl)) {
                    // The head stays a packet of its own; this one starts a new group.
                    group.tcp = None;
                } else {
                    st.head_verified = true;
                    if checksums_valid(p, c.v6, c.ip_hl) {
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
        let state = TcpState {
            v6: c.v6,
            ip_hl: c.ip_hl as u16,
            tcp_hl: c.tcp_hl as u16,
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

    fn push_group(&mut self, i: u32, len: usize, tcp: Option<TcpState>) -> u32 {
        if self.used == self.groups.len() {
            self.groups.push(Group::default());
        }
        let group = &mut self.groups[self.used];
        group.members.clear();
        group.members.push(i);
        group.len = len;
        group.tcp = tcp;
        self.used += 1;
        (self.used - 1) as u32
    }
}

/// The checks of a join that need only the group's state and the candidate's summary.
fn can_join(st: &TcpState, members: usize, c: &Candidate) -> bool {
    let total_ip_len = if st.v6 {
        // The IPv6 payload length field.
        usize::from(st.tcp_hl) + st.payload_total as usize + c.payload_len
    } else {
        usize::from(st.ip_hl) + usize::from(st.tcp_hl) + st.payload_total as usize + c.payload_len
    };
    !st.closed
        && members < MAX_MEMBERS
        && c.v6 == st.v6
        && c.tcp_hl == usize::from(st.tcp_hl)
        && c.seq == st.next_seq
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
    /// checksum field at `csum_start + 16`) and TSO with the head's payload length as
    /// `gso_size`, which is how the kernel describes a GRO packet.
    pub fn virtio_header(&self) -> VirtioNetHdr {
        match self.coalesced_state() {
            None => VirtioNetHdr::NONE,
            Some(st) => VirtioNetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type: if st.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: st.ip_hl + st.tcp_hl,
                gso_size: st.seg_size,
                csum_start: st.ip_hl,
                csum_offset: 16,
            },
        }
    }

    fn coalesced_state(&self) -> Option<&TcpState> {
        self.tcp.as_ref().filter(|_| self.members.len() > 1)
    }

    /// How many bytes [`Group::head`] writes: 0 for a single packet, else the IP and TCP
    /// header length of the head (at most [`MAX_HEAD_LEN`]).
    pub fn head_len(&self) -> usize {
        self.coalesced_state()
            .map_or(0, |st| usize::from(st.ip_hl + st.tcp_hl))
    }

    /// Writes the headers that go in front of [`Group::payloads`] into `out` and returns
    /// their length ([`Group::head_len`]).
    ///
    /// A single packet is written as it is, so its head is empty and its one payload is the
    /// whole packet. A super-packet's head is the first member's IP and TCP headers with
    /// the IPv4 total length and header checksum (ID kept) or the IPv6 payload length set
    /// for the whole super-packet, PSH set if a member had it, and the TCP checksum field
    /// holding the folded, non-complemented pseudo-header sum over the super-packet's TCP
    /// length: what CHECKSUM_PARTIAL means to the kernel, which completes it (or checks
    /// nothing, as it trusts partial checksums) and uses the same value to checksum each
    /// segment if it has to cut the packet again (when forwarding).
    ///
    /// `packets` must be the batch given to [`Coalescer::plan`]. Panics if `out` is shorter
    /// than `head_len()` (any buffer of [`MAX_HEAD_LEN`] bytes will do).
    pub fn head<P: AsRef<[u8]>>(&self, packets: &[P], out: &mut [u8]) -> usize {
        let Some(st) = self.coalesced_state() else {
            return 0;
        };
        let (ip_hl, tcp_hl) = (usize::from(st.ip_hl), usize::from(st.tcp_hl));
        let hl = ip_hl + tcp_hl;
        assert!(
            out.len() >= hl,
            "head buffer of {} bytes, need {hl}",
            out.len()
        );
        let head = packets[self.members[0] as usize].as_ref();
        let out = &mut out[..hl];
        out.copy_from_slice(&head[..hl]);
        let l4_len = tcp_hl + st.payload_total as usize;
        let pseudo = if st.v6 {
            out[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            pseudo_header_v6(
                out[8..24].try_into().expect("16 bytes"),
                out[24..40].try_into().expect("16 bytes"),
                PROTO_TCP,
                l4_len as u32,
            )
        } else {
            out[2..4].copy_from_slice(&((ip_hl + l4_len) as u16).to_be_bytes());
            out[10..12].fill(0);
            let ip_csum = checksum(&out[..ip_hl], 0);
            out[10..12].copy_from_slice(&ip_csum.to_be_bytes());
            pseudo_header_v4(
                out[12..16].try_into().expect("4 bytes"),
                out[16..20].try_into().expect("4 bytes"),
                PROTO_TCP,
                l4_len as u16,
            )
        };
        if st.psh {
            out[ip_hl + 13] |= TCP_PSH;
        }
        out[ip_hl + 16..ip_hl + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        hl
    }

    /// The byte slices to write after [`Group::head`], in order: the whole packet for a
    /// single, each member's TCP payload for a super-packet. `packets` must be the batch
    /// given to [`Coalescer::plan`].
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
    use super::super::segment::testutil::{Flow, verify};
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
            assert!(written.len() <= 65535 + if hdr.gso_type == GSO_TCPV6 { 40 } else { 0 });
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
            let mut streams: Vec<(usize, Vec<Vec<u8>>)> = (0..nflows)
                .map(|f| {
                    let mut flow = Flow::new(rng.bool(), f as u8);
                    if rng.below(3) == 0 {
                        flow.options.clear();
                    }
                    let mss = [1, 100, 536, 1200, 1380, 1448, 8000][rng.below(7)];
                    let total = rng.below(if mss == 1 { 200 } else { 70_000 });
                    let psh_every = [0, 0, 3, 17][rng.below(4)];
                    (f, stream_packets(&mut rng, &flow, mss, total, psh_every))
                })
                .collect();
            for s in &mut streams {
                s.1.reverse();
            }
            // Interleave, keeping each flow's order, with some other packets in between.
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut flow_of: Vec<Option<usize>> = Vec::new();
            while streams.iter().any(|s| !s.1.is_empty()) {
                let s = &mut streams[rng.below(nflows)];
                if let Some(p) = s.1.pop() {
                    batch.push(p);
                    flow_of.push(Some(s.0));
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

    /// Plans `packets` and returns the groups as lists of member indexes.
    fn shape(packets: &[Vec<u8>]) -> Vec<Vec<u32>> {
        let mut c = Coalescer::new();
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
        let bad = |n: u32| {
            let mut p = good(n);
            let last = p.len() - 1;
            p[last] ^= 0x40;
            p
        };
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
        let mut c = Coalescer::new();
        let f = Flow::new(false, 1);
        let seed = f.tcp(1, ACK, &[5; 200], 1);
        for _ in 0..3000 {
            let batch: Vec<Vec<u8>> = (0..rng.below(10))
                .map(|_| {
                    if rng.bool() {
                        rng.bytes_below(100)
                    } else {
                        let mut p = seed.clone();
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
}
