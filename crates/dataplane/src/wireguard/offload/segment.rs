//! Turning one read from an offloading TUN device into the packets it stands for.
//!
//! With `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6)` the
//! kernel hands us what it would hand a NIC: packets whose transport checksum is left to us
//! (`FLAG_NEEDS_CSUM`, CHECKSUM_PARTIAL in the kernel) and TCP or UDP super-packets of up to
//! 64 KB that we must cut into `gso_size`-byte segments, as the NIC's TSO/USO engine would,
//! before each segment is encrypted and sent to a peer. [`segment`] does both, without
//! allocating: every segment's headers are rebuilt in a stack buffer and handed to the caller
//! together with a slice of the original payload, so the caller can copy both straight into
//! the buffer it encrypts from.

use super::checksum::{checksum, fold, pseudo_header, sum};
use super::virtio::{
    FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, OffloadError,
    VirtioNetHdr,
};

/// The longest IP plus transport header a segment may have. Real headers are at most
/// 60 + 60 bytes for IPv4/TCP; IPv6 extension headers can make them longer, and anything
/// past this bound is refused rather than supported with a bigger stack buffer.
pub const MAX_HEADER_LEN: usize = 256;

pub(super) const PROTO_TCP: u8 = 6;
pub(super) const PROTO_UDP: u8 = 17;

pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_PSH: u8 = 0x08;
pub(super) const TCP_CWR: u8 = 0x80;

/// Produces the packets a TUN read stands for, calling `emit(headers, payload)` once per
/// packet, in order; the packet is `headers` followed by `payload` (which is empty when the
/// whole packet is in `headers`). Returns how many packets were emitted.
///
/// `packet` is the IP packet after the virtio header `hdr`.
///
/// - `GSO_NONE`: with `FLAG_NEEDS_CSUM` the transport checksum is completed in place, the way
///   the kernel's `skb_checksum_help` does it: the field at `csum_start + csum_offset` holds
///   the folded pseudo-header sum, so the checksum is the complement of the sum over
///   `packet[csum_start..]`, and a result of 0 is written as 0xffff (required for UDP, where
///   0 means "no checksum"; the same number in one's complement for everything else). Then
///   the packet is emitted whole.
/// - `GSO_TCPV4`/`GSO_TCPV6` (with or without `GSO_ECN`): the payload after the IP and TCP
///   headers is cut into `gso_size`-byte chunks (the last may be shorter). Each segment gets
///   the IPv4 total length, ID (first ID + segment index) and header checksum, or the IPv6
///   payload length; the TCP sequence number advanced by the chunk's offset; FIN and PSH
///   only on the last segment and CWR only on the first (as the kernel's `tcp_gso_segment`);
///   and a TCP checksum computed in full, whatever partial value the kernel left in the
///   field.
/// - `GSO_UDP_L4`: the same with a UDP header per segment (length and full checksum).
///
/// The header length is derived from the packet (IPv4 IHL, `csum_start` for IPv6, TCP data
/// offset), not taken from `hdr.hdr_len`: the kernel fills `hdr_len` with the skb's linear
/// length, which may include payload. `hdr_len` is only checked not to exceed the packet.
/// Likewise `csum_offset` is not needed for GSO packets: the checksum field of TCP and UDP
/// is at a fixed place.
///
/// Everything is validated before the first `emit`, so on `Err` nothing has been emitted
/// (and `packet` is unchanged). No input makes this panic.
pub fn segment(
    hdr: &VirtioNetHdr,
    packet: &mut [u8],
    mut emit: impl FnMut(&[u8], &[u8]),
) -> Result<usize, OffloadError> {
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & FLAG_NEEDS_CSUM != 0 {
                complete_checksum(hdr, packet)?;
            }
            emit(packet, &[]);
            Ok(1)
        }
        GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => split(hdr, packet, emit),
        _ => Err(OffloadError::UnsupportedGsoType {
            gso_type: hdr.gso_type,
        }),
    }
}

/// Completes a CHECKSUM_PARTIAL packet in place (see [`segment`]).
fn complete_checksum(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if field + 2 > packet.len() {
        return Err(OffloadError::BadCsumStart {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
            len: packet.len(),
        });
    }
    let value = match checksum(&packet[start..], 0) {
        0 => 0xffff,
        c => c,
    };
    packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
    Ok(())
}

/// What [`split`] learned from validating the headers of a GSO packet.
struct Layout {
    v6: bool,
    tcp: bool,
    /// Offset of the transport header (= IPv4 header length, or IPv6 header plus extension
    /// headers).
    l4: usize,
    /// Offset of the payload (= all headers).
    hl: usize,
}

fn layout(hdr: &VirtioNetHdr, packet: &[u8]) -> Result<Layout, OffloadError> {
    let base = hdr.gso_type & !GSO_ECN;
    if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize {
            gso_type: hdr.gso_type,
        });
    }
    let len = packet.len();
    if len < usize::from(hdr.hdr_len) {
        return Err(OffloadError::ShorterThanHdrLen {
            len,
            hdr_len: hdr.hdr_len,
        });
    }
    let Some(&first) = packet.first() else {
        return Err(OffloadError::Truncated {
            what: "IP header",
            len,
            needed: 1,
        });
    };
    let version = first >> 4;
    let v6 = match (base, version) {
        (GSO_TCPV4 | GSO_UDP_L4, 4) => false,
        (GSO_TCPV6 | GSO_UDP_L4, 6) => true,
        _ => {
            return Err(OffloadError::IpVersionMismatch {
                version,
                gso_type: hdr.gso_type,
            });
        }
    };
    let tcp = base != GSO_UDP_L4;
    let protocol = if tcp { PROTO_TCP } else { PROTO_UDP };
    let l4 = usize::from(hdr.csum_start);
    let bad_csum_start = || OffloadError::BadCsumStart {
        csum_start: hdr.csum_start,
        csum_offset: hdr.csum_offset,
        len,
    };
    if v6 {
        if len < 40 {
            return Err(OffloadError::Truncated {
                what: "IPv6 header",
                len,
                needed: 40,
            });
        }
        // Extension headers (if any) sit between the fixed header and csum_start; the kernel
        // put csum_start at the transport header, so it is trusted as long as it is past the
        // fixed header. Without extension headers the next header must be the transport.
        if l4 < 40 {
            return Err(bad_csum_start());
        }
        if l4 == 40 && packet[6] != protocol {
            return Err(OffloadError::WrongProtocol {
                protocol: packet[6],
                gso_type: hdr.gso_type,
            });
        }
    } else {
        if len < 20 {
            return Err(OffloadError::Truncated {
                what: "IPv4 header",
                len,
                needed: 20,
            });
        }
        let ihl = usize::from(first & 0x0f) * 4;
        if ihl < 20 {
            return Err(OffloadError::BadHeader {
                what: "IPv4 header length",
                value: ihl,
            });
        }
        if len < ihl {
            return Err(OffloadError::Truncated {
                what: "IPv4 header",
                len,
                needed: ihl,
            });
        }
        if l4 != ihl {
            return Err(bad_csum_start());
        }
        if packet[9] != protocol {
            return Err(OffloadError::WrongProtocol {
                protocol: packet[9],
                gso_type: hdr.gso_type,
            });
        }
        let frag = u16::from_be_bytes([packet[6], packet[7]]);
        if frag & 0x3fff != 0 {
            // More-fragments or a fragment offset: there is no transport header to segment.
            return Err(OffloadError::BadHeader {
                what: "IPv4 fragment field",
                value: usize::from(frag),
            });
        }
    }
    let l4_hdr_len = if tcp {
        if len < l4 + 20 {
            return Err(OffloadError::Truncated {
                what: "TCP header",
                len,
                needed: l4 + 20,
            });
        }
        let doff = usize::from(packet[l4 + 12] >> 4) * 4;
        if doff < 20 {
            return Err(OffloadError::BadHeader {
                what: "TCP data offset",
                value: doff,
            });
        }
        doff
    } else {
        8
    };
    let hl = l4 + l4_hdr_len;
    if len < hl {
        return Err(OffloadError::Truncated {
            what: if tcp { "TCP header" } else { "UDP header" },
            len,
            needed: hl,
        });
    }
    if hl > MAX_HEADER_LEN {
        return Err(OffloadError::HeadersTooLong {
            len: hl,
            max: MAX_HEADER_LEN,
        });
    }
    // The biggest segment must fit the IPv4 total length or the IPv6 payload length (the
    // UDP length is then implied: it is shorter than either).
    let biggest = hl + usize::from(hdr.gso_size).min(len - hl);
    let length_field = if v6 { biggest - 40 } else { biggest };
    if length_field > usize::from(u16::MAX) {
        return Err(OffloadError::SegmentTooLong { len: biggest });
    }
    Ok(Layout { v6, tcp, l4, hl })
}

/// Segments a TSO/USO super-packet (see [`segment`]).
fn split(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    mut emit: impl FnMut(&[u8], &[u8]),
) -> Result<usize, OffloadError> {
    let Layout { v6, tcp, l4, hl } = layout(hdr, packet)?;
    let (headers, payload) = packet.split_at(hl);
    let gso_size = usize::from(hdr.gso_size);
    let protocol = if tcp { PROTO_TCP } else { PROTO_UDP };
    let csum_field = l4 + if tcp { 16 } else { 6 };
    let first_id = u16::from_be_bytes([headers[4], headers[5]]);
    let (first_seq, tcp_flags) = if tcp {
        let seq = &headers[l4 + 4..l4 + 8];
        (
            u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]),
            headers[l4 + 13],
        )
    } else {
        (0, 0)
    };

    let mut buf = [0u8; MAX_HEADER_LEN];
    let h = &mut buf[..hl];
    h.copy_from_slice(headers);

    let mut count = 0usize;
    let mut offset = 0usize;
    loop {
        let end = payload.len().min(offset + gso_size);
        let chunk = &payload[offset..end];
        let last = end == payload.len();
        let seg_len = hl + chunk.len();
        let l4_len = seg_len - l4;

        if v6 {
            h[4..6].copy_from_slice(&((seg_len - 40) as u16).to_be_bytes());
        } else {
            h[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            h[4..6].copy_from_slice(&first_id.wrapping_add(count as u16).to_be_bytes());
            h[10..12].fill(0);
            let ip_csum = checksum(&h[..l4], 0);
            h[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        }
        let pseudo = pseudo_header(h, v6, protocol, l4_len);

        if tcp {
            let seq = first_seq.wrapping_add(offset as u32);
            h[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut flags = tcp_flags;
            if !last {
                flags &= !(TCP_FIN | TCP_PSH);
            }
            if count > 0 {
                flags &= !TCP_CWR;
            }
            h[l4 + 13] = flags;
        } else {
            h[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }

        h[csum_field..csum_field + 2].fill(0);
        // The transport header length is a multiple of 4, so the payload sum continues at an
        // even offset.
        let mut l4_csum = !fold(sum(chunk, sum(&h[l4..], pseudo)));
        if !tcp && l4_csum == 0 {
            l4_csum = 0xffff;
        }
        h[csum_field..csum_field + 2].copy_from_slice(&l4_csum.to_be_bytes());

        emit(h, chunk);
        count += 1;
        offset = end;
        if last {
            return Ok(count);
        }
    }
}

/// Packet builders and an independent checksum verifier, shared with the coalescer's tests.
#[cfg(test)]
pub(super) mod testutil {
    use super::{PROTO_TCP, PROTO_UDP};

    /// RFC 1071 the slow way, independent of `checksum.rs`.
    pub fn naive_sum(chunks: &[&[u8]]) -> u16 {
        let mut acc: u64 = 0;
        for data in chunks {
            assert!(data.len() % 2 == 0 || std::ptr::eq(*data, *chunks.last().unwrap()));
            for pair in data.chunks(2) {
                let word = (u64::from(pair[0]) << 8) | pair.get(1).copied().map_or(0, u64::from);
                acc += word;
            }
        }
        while acc > 0xffff {
            acc = (acc >> 16) + (acc & 0xffff);
        }
        acc as u16
    }

    fn pseudo_bytes(packet: &[u8], l4: usize, protocol: u8) -> Vec<u8> {
        let l4_len = packet.len() - l4;
        let mut p = Vec::new();
        if packet[0] >> 4 == 4 {
            p.extend_from_slice(&packet[12..20]);
            p.extend_from_slice(&[0, protocol]);
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            p.extend_from_slice(&packet[8..40]);
            p.extend_from_slice(&(l4_len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, protocol]);
        }
        p
    }

    /// The transport offset of a packet without IPv4 options' surprises or IPv6 extension
    /// headers (what the builders make).
    pub fn l4_offset(packet: &[u8]) -> usize {
        if packet[0] >> 4 == 4 {
            usize::from(packet[0] & 0xf) * 4
        } else {
            40
        }
    }

    /// Checks the IPv4 header checksum, the length fields and the TCP/UDP checksum.
    pub fn verify(packet: &[u8]) -> Result<(), String> {
        let l4 = l4_offset(packet);
        let protocol = if packet[0] >> 4 == 4 {
            if naive_sum(&[&packet[..l4]]) != 0xffff {
                return Err("bad IPv4 header checksum".into());
            }
            if usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len() {
                return Err("bad IPv4 total length".into());
            }
            packet[9]
        } else {
            if usize::from(u16::from_be_bytes([packet[4], packet[5]])) != packet.len() - 40 {
                return Err("bad IPv6 payload length".into());
            }
            packet[6]
        };
        if protocol == PROTO_UDP {
            if usize::from(u16::from_be_bytes([packet[l4 + 4], packet[l4 + 5]]))
                != packet.len() - l4
            {
                return Err("bad UDP length".into());
            }
            if packet[l4 + 6..l4 + 8] == [0, 0] {
                return Err("UDP checksum 0".into());
            }
        }
        let pseudo = pseudo_bytes(packet, l4, protocol);
        if naive_sum(&[&pseudo, &packet[l4..]]) != 0xffff {
            return Err(format!("bad transport checksum (protocol {protocol})"));
        }
        Ok(())
    }

    /// Fills in the transport checksum of a packet whose field is zero, the way a sender
    /// does (0 becomes 0xffff for UDP).
    fn fill_l4_checksum(packet: &mut [u8], protocol: u8) {
        let l4 = l4_offset(packet);
        let field = l4 + if protocol == PROTO_TCP { 16 } else { 6 };
        packet[field..field + 2].fill(0);
        let pseudo = pseudo_bytes(packet, l4, protocol);
        let mut c = !naive_sum(&[&pseudo, &packet[l4..]]);
        if protocol == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        packet[field..field + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// The folded, non-complemented pseudo-header sum (what the kernel leaves in the
    /// checksum field of a CHECKSUM_PARTIAL packet).
    pub fn partial_pseudo(packet: &[u8], protocol: u8) -> u16 {
        let l4 = l4_offset(packet);
        naive_sum(&[&pseudo_bytes(packet, l4, protocol)])
    }

    /// The IP-level description of one flow direction.
    #[derive(Clone, Debug)]
    pub struct Flow {
        pub v6: bool,
        pub src: [u8; 16],
        pub dst: [u8; 16],
        pub sport: u16,
        pub dport: u16,
        pub tos: u8,
        pub ttl: u8,
        pub df: bool,
        pub flow_label: u32,
        pub ack: u32,
        pub window: u16,
        /// The urgent pointer (meaningless without URG, but still part of the header).
        pub urgent: u16,
        /// TCP options (length a multiple of 4, at most 40).
        pub options: Vec<u8>,
    }

    impl Flow {
        pub fn new(v6: bool, n: u8) -> Self {
            let mut src = [0; 16];
            let mut dst = [0; 16];
            src[0] = 10;
            src[3] = n;
            src[15] = n;
            dst[0] = 10;
            dst[3] = 200;
            dst[15] = 1;
            Flow {
                v6,
                src,
                dst,
                sport: 40000 + u16::from(n),
                dport: 443,
                tos: 0,
                ttl: 64,
                df: true,
                flow_label: 0x12345 + u32::from(n),
                ack: 0x1000_0000 + u32::from(n),
                window: 502,
                urgent: 0,
                // NOP NOP Timestamps(10): like Linux's usual data segment options.
                options: vec![1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78],
            }
        }

        fn ip_header(&self, protocol: u8, l4_len: usize, id: u16) -> Vec<u8> {
            if self.v6 {
                let mut h = vec![0u8; 40];
                let first = (6u32 << 28) | (u32::from(self.tos) << 20) | self.flow_label;
                h[0..4].copy_from_slice(&first.to_be_bytes());
                h[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                h[6] = protocol;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&self.src);
                h[24..40].copy_from_slice(&self.dst);
                h
            } else {
                let mut h = vec![0u8; 20];
                h[0] = 0x45;
                h[1] = self.tos;
                h[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&id.to_be_bytes());
                h[6] = if self.df { 0x40 } else { 0 };
                h[8] = self.ttl;
                h[9] = protocol;
                h[12..16].copy_from_slice(&self.src[..4]);
                h[16..20].copy_from_slice(&self.dst[..4]);
                let c = !naive_sum(&[&h]);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h
            }
        }

        /// A TCP packet with correct checksums.
        pub fn tcp(&self, seq: u32, flags: u8, payload: &[u8], id: u16) -> Vec<u8> {
            let tcp_hl = 20 + self.options.len();
            let mut p = self.ip_header(PROTO_TCP, tcp_hl + payload.len(), id);
            let l4 = p.len();
            p.resize(l4 + tcp_hl, 0);
            p[l4..l4 + 2].copy_from_slice(&self.sport.to_be_bytes());
            p[l4 + 2..l4 + 4].copy_from_slice(&self.dport.to_be_bytes());
            p[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            p[l4 + 8..l4 + 12].copy_from_slice(&self.ack.to_be_bytes());
            p[l4 + 12] = ((tcp_hl / 4) as u8) << 4;
            p[l4 + 13] = flags;
            p[l4 + 14..l4 + 16].copy_from_slice(&self.window.to_be_bytes());
            p[l4 + 18..l4 + 20].copy_from_slice(&self.urgent.to_be_bytes());
            p[l4 + 20..].copy_from_slice(&self.options);
            p.extend_from_slice(payload);
            fill_l4_checksum(&mut p, PROTO_TCP);
            p
        }

        /// A UDP packet with correct checksums.
        pub fn udp(&self, payload: &[u8], id: u16) -> Vec<u8> {
            let mut p = self.ip_header(PROTO_UDP, 8 + payload.len(), id);
            let l4 = p.len();
            p.resize(l4 + 8, 0);
            p[l4..l4 + 2].copy_from_slice(&self.sport.to_be_bytes());
            p[l4 + 2..l4 + 4].copy_from_slice(&self.dport.to_be_bytes());
            p[l4 + 4..l4 + 6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(payload);
            fill_l4_checksum(&mut p, PROTO_UDP);
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::checksum::test_rng::Rng;
    use super::super::virtio::{FLAG_DATA_VALID, GSO_UDP};
    use super::testutil::*;
    use super::*;

    const ACK: u8 = 0x10;

    fn run(hdr: &VirtioNetHdr, packet: &mut [u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut out = Vec::new();
        let n = segment(hdr, packet, |h, p| {
            let mut v = h.to_vec();
            v.extend_from_slice(p);
            out.push(v);
        })?;
        assert_eq!(n, out.len());
        Ok(out)
    }

    fn random_flow(rng: &mut Rng, v6: bool) -> Flow {
        let mut f = Flow::new(v6, rng.u8());
        rng.fill(&mut f.src);
        rng.fill(&mut f.dst);
        f.tos = rng.u8();
        f.ttl = rng.u8();
        f.flow_label = rng.u32() & 0xfffff;
        f.ack = rng.u32();
        f.window = rng.u16();
        f.urgent = rng.u16();
        let opt_words = rng.below(11);
        f.options = rng.bytes(opt_words * 4);
        f
    }

    /// A TSO super-packet as the kernel hands it over: valid IP header, the TCP checksum
    /// field holding the pseudo-header sum over the whole length (or garbage), and hdr_len
    /// possibly larger than the headers (skb_headlen).
    fn tso_packet(
        rng: &mut Rng,
        flow: &Flow,
        seq: u32,
        flags: u8,
        payload: &[u8],
        id: u16,
        gso_size: u16,
    ) -> (VirtioNetHdr, Vec<u8>) {
        let mut p = flow.tcp(seq, flags, payload, id);
        let l4 = l4_offset(&p);
        let hl = l4 + 20 + flow.options.len();
        let partial = if rng.bool() {
            partial_pseudo(&p, PROTO_TCP)
        } else {
            rng.u16()
        };
        p[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: if flow.v6 { GSO_TCPV6 } else { GSO_TCPV4 }
                | if rng.bool() { GSO_ECN } else { 0 },
            hdr_len: (hl + rng.below(p.len() - hl + 1)).min(65535) as u16,
            gso_size,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        (hdr, p)
    }

    #[test]
    fn tso_segments_are_exactly_what_the_sender_would_have_sent() {
        let mut rng = Rng::new(10);
        for round in 0..600 {
            let v6 = round % 2 == 1;
            let flow = random_flow(&mut rng, v6);
            let hl = l4_offset(&flow.tcp(0, 0, &[], 0)) + 20 + flow.options.len();
            let gso_size = (1 + rng.below(if round % 7 == 0 { 40 } else { 1500 })) as u16;
            let max_payload = 65535 - hl.min(65535) + if v6 { 40 } else { 0 };
            let payload_len = match round % 5 {
                0 => rng.below(max_payload + 1),
                1 => usize::from(gso_size) * (1 + rng.below(20)),
                _ => rng.below(20_000),
            }
            .min(max_payload);
            let payload = rng.bytes(payload_len);
            let seq = rng.u32();
            let id = rng.u16();
            let flags = ACK | (rng.u8() & (TCP_FIN | TCP_PSH | TCP_CWR));
            let (hdr, mut packet) = tso_packet(&mut rng, &flow, seq, flags, &payload, id, gso_size);
            let segments = run(&hdr, &mut packet).unwrap();

            let expected_n = payload_len.div_ceil(usize::from(gso_size)).max(1);
            assert_eq!(segments.len(), expected_n, "round {round}");
            let mut joined = Vec::new();
            for (i, seg) in segments.iter().enumerate() {
                verify(seg).unwrap_or_else(|e| panic!("round {round} segment {i}: {e}"));
                let off = i * usize::from(gso_size);
                let chunk = &payload[off..payload_len.min(off + usize::from(gso_size))];
                let mut f = flags;
                if i + 1 != expected_n {
                    f &= !(TCP_FIN | TCP_PSH);
                }
                if i != 0 {
                    f &= !TCP_CWR;
                }
                let want = flow.tcp(
                    seq.wrapping_add(off as u32),
                    f,
                    chunk,
                    id.wrapping_add(i as u16),
                );
                assert_eq!(seg, &want, "round {round} segment {i}");
                joined.extend_from_slice(&seg[hl..]);
            }
            assert_eq!(joined, payload, "round {round}");
        }
    }

    #[test]
    fn uso_segments_are_exactly_what_the_sender_would_have_sent() {
        let mut rng = Rng::new(11);
        for round in 0..400 {
            let v6 = round % 2 == 1;
            let flow = random_flow(&mut rng, v6);
            let l4 = if v6 { 40 } else { 20 };
            let gso_size = (1 + rng.below(1472)) as u16;
            let payload = rng.bytes_below(if round % 9 == 0 { 65000 } else { 9000 });
            let id = rng.u16();
            let mut packet = flow.udp(&payload, id);
            let partial = partial_pseudo(&packet, PROTO_UDP);
            packet[l4 + 6..l4 + 8].copy_from_slice(&partial.to_be_bytes());
            let hdr = VirtioNetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type: GSO_UDP_L4,
                hdr_len: (l4 + 8) as u16,
                gso_size,
                csum_start: l4 as u16,
                csum_offset: 6,
            };
            let segments = run(&hdr, &mut packet).unwrap();
            let n = payload.len().div_ceil(usize::from(gso_size)).max(1);
            assert_eq!(segments.len(), n);
            for (i, seg) in segments.iter().enumerate() {
                verify(seg).unwrap_or_else(|e| panic!("round {round} segment {i}: {e}"));
                let off = i * usize::from(gso_size);
                let chunk = &payload[off..payload.len().min(off + usize::from(gso_size))];
                assert_eq!(seg, &flow.udp(chunk, id.wrapping_add(i as u16)));
            }
        }
    }

    #[test]
    fn uso_checksum_zero_is_sent_as_ffff() {
        // Choose the last payload word so that the checksum of the one segment comes out 0.
        let flow = Flow::new(false, 1);
        let mut payload = vec![7u8; 100];
        payload[98..].fill(0);
        let p = flow.udp(&payload, 0);
        let c = u16::from_be_bytes([p[26], p[27]]);
        // Adding the word (checksum with the word zero) makes the sum 0xffff: checksum 0.
        payload[98..].copy_from_slice(&c.to_be_bytes());
        let mut packet = flow.udp(&payload, 0);
        assert_eq!(packet[26..28], [0xff, 0xff]);
        let partial = partial_pseudo(&packet, PROTO_UDP);
        packet[26..28].copy_from_slice(&partial.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 6,
        };
        let segments = run(&hdr, &mut packet).unwrap();
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0][26..28], [0xff, 0xff]);
        verify(&segments[0]).unwrap();
    }

    #[test]
    fn needs_csum_is_completed_in_place() {
        let mut rng = Rng::new(12);
        for round in 0..500 {
            let flow = random_flow(&mut rng, round % 2 == 0);
            let payload = rng.bytes_below(3000);
            let udp = round % 3 == 0;
            let (want, proto, off) = if udp {
                (flow.udp(&payload, rng.u16()), PROTO_UDP, 6)
            } else {
                (flow.tcp(rng.u32(), ACK, &payload, rng.u16()), PROTO_TCP, 16)
            };
            let l4 = l4_offset(&want);
            let mut packet = want.clone();
            let partial = partial_pseudo(&packet, proto);
            packet[l4 + off..l4 + off + 2].copy_from_slice(&partial.to_be_bytes());
            let hdr = VirtioNetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type: GSO_NONE,
                hdr_len: 0,
                gso_size: 0,
                csum_start: l4 as u16,
                csum_offset: off as u16,
            };
            let out = run(&hdr, &mut packet).unwrap();
            assert_eq!(out, vec![want.clone()]);
            assert_eq!(packet, want, "completed in place");
            verify(&packet).unwrap();
        }
    }

    #[test]
    fn plain_packets_pass_through_untouched() {
        let mut packet = vec![1, 2, 3, 4, 5];
        for flags in [0, FLAG_DATA_VALID] {
            let hdr = VirtioNetHdr {
                flags,
                ..VirtioNetHdr::NONE
            };
            assert_eq!(run(&hdr, &mut packet).unwrap(), vec![vec![1, 2, 3, 4, 5]]);
        }
    }

    #[test]
    fn malformed_input_is_refused_with_a_named_reason() {
        let v4 = Flow::new(false, 1);
        let v6 = Flow::new(true, 1);
        let tcp4 = v4.tcp(1, ACK, &[9; 3000], 1);
        let tcp6 = v6.tcp(1, ACK, &[9; 3000], 1);
        let udp4 = v4.udp(&[9; 3000], 1);
        let tso4 = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let tso6 = VirtioNetHdr {
            gso_type: GSO_TCPV6,
            hdr_len: 72,
            csum_start: 40,
            ..tso4
        };
        let uso4 = VirtioNetHdr {
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            csum_offset: 6,
            ..tso4
        };
        let with = |p: &[u8], at: usize, v: u8| {
            let mut p = p.to_vec();
            p[at] = v;
            p
        };
        type Case = (&'static str, VirtioNetHdr, Vec<u8>, OffloadError);
        let cases: Vec<Case> = vec![
            (
                "UFO",
                VirtioNetHdr {
                    gso_type: GSO_UDP,
                    ..uso4
                },
                udp4.clone(),
                OffloadError::UnsupportedGsoType { gso_type: 3 },
            ),
            (
                "unknown type",
                VirtioNetHdr {
                    gso_type: 9,
                    ..tso4
                },
                tcp4.clone(),
                OffloadError::UnsupportedGsoType { gso_type: 9 },
            ),
            (
                "gso_size 0",
                VirtioNetHdr {
                    gso_size: 0,
                    ..tso4
                },
                tcp4.clone(),
                OffloadError::ZeroGsoSize {
                    gso_type: GSO_TCPV4,
                },
            ),
            (
                "v6 packet, v4 type",
                VirtioNetHdr { hdr_len: 0, ..tso4 },
                tcp6.clone(),
                OffloadError::IpVersionMismatch {
                    version: 6,
                    gso_type: GSO_TCPV4,
                },
            ),
            (
                "v4 packet, v6 type",
                tso6,
                tcp4.clone(),
                OffloadError::IpVersionMismatch {
                    version: 4,
                    gso_type: GSO_TCPV6,
                },
            ),
            (
                "hdr_len past the end",
                VirtioNetHdr {
                    hdr_len: 54,
                    ..tso4
                },
                tcp4[..40].to_vec(),
                OffloadError::ShorterThanHdrLen {
                    len: 40,
                    hdr_len: 54,
                },
            ),
            (
                "empty",
                VirtioNetHdr { hdr_len: 0, ..tso4 },
                vec![],
                OffloadError::Truncated {
                    what: "IP header",
                    len: 0,
                    needed: 1,
                },
            ),
            (
                "short IPv4 header",
                VirtioNetHdr { hdr_len: 0, ..tso4 },
                tcp4[..19].to_vec(),
                OffloadError::Truncated {
                    what: "IPv4 header",
                    len: 19,
                    needed: 20,
                },
            ),
            (
                "IHL 4",
                tso4,
                with(&tcp4, 0, 0x44),
                OffloadError::BadHeader {
                    what: "IPv4 header length",
                    value: 16,
                },
            ),
            (
                "csum_start is not the IHL",
                VirtioNetHdr {
                    csum_start: 24,
                    ..tso4
                },
                tcp4.clone(),
                OffloadError::BadCsumStart {
                    csum_start: 24,
                    csum_offset: 16,
                    len: tcp4.len(),
                },
            ),
            (
                "UDP under a TCP type",
                tso4,
                udp4.clone(),
                OffloadError::WrongProtocol {
                    protocol: PROTO_UDP,
                    gso_type: GSO_TCPV4,
                },
            ),
            (
                "TCP under USO",
                uso4,
                tcp4.clone(),
                OffloadError::WrongProtocol {
                    protocol: PROTO_TCP,
                    gso_type: GSO_UDP_L4,
                },
            ),
            (
                "v6 next header not TCP",
                tso6,
                with(&tcp6, 6, PROTO_UDP),
                OffloadError::WrongProtocol {
                    protocol: PROTO_UDP,
                    gso_type: GSO_TCPV6,
                },
            ),
            (
                "v6 csum_start inside the fixed header",
                VirtioNetHdr {
                    csum_start: 20,
                    ..tso6
                },
                tcp6.clone(),
                OffloadError::BadCsumStart {
                    csum_start: 20,
                    csum_offset: 16,
                    len: tcp6.len(),
                },
            ),
            (
                "v6 csum_start past the end",
                VirtioNetHdr {
                    csum_start: 9000,
                    ..tso6
                },
                tcp6.clone(),
                OffloadError::Truncated {
                    what: "TCP header",
                    len: tcp6.len(),
                    needed: 9020,
                },
            ),
            (
                "fragment",
                tso4,
                with(&tcp4, 6, 0x20),
                OffloadError::BadHeader {
                    what: "IPv4 fragment field",
                    value: 0x2000,
                },
            ),
            (
                "TCP data offset 16",
                tso4,
                with(&tcp4, 32, 0x40),
                OffloadError::BadHeader {
                    what: "TCP data offset",
                    value: 16,
                },
            ),
            (
                "TCP header cut short",
                VirtioNetHdr { hdr_len: 0, ..tso4 },
                tcp4[..50].to_vec(),
                OffloadError::Truncated {
                    what: "TCP header",
                    len: 50,
                    needed: 52,
                },
            ),
            (
                "headers longer than 256 bytes",
                VirtioNetHdr {
                    hdr_len: 0,
                    csum_start: 240,
                    ..tso6
                },
                {
                    let mut p = with(&tcp6, 6, 0);
                    p[240 + 12] = 0xf0;
                    p
                },
                OffloadError::HeadersTooLong { len: 300, max: 256 },
            ),
            (
                "segment longer than the length field",
                VirtioNetHdr {
                    gso_size: 65535,
                    ..tso4
                },
                {
                    let mut p = tcp4.clone();
                    p.resize(65536, 0);
                    p
                },
                OffloadError::SegmentTooLong { len: 65536 },
            ),
            (
                "needs_csum field past the end",
                VirtioNetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    csum_start: 40,
                    csum_offset: 16,
                    ..VirtioNetHdr::NONE
                },
                tcp4[..57].to_vec(),
                OffloadError::BadCsumStart {
                    csum_start: 40,
                    csum_offset: 16,
                    len: 57,
                },
            ),
        ];
        for (name, hdr, mut packet, want) in cases {
            let before = packet.clone();
            let mut emitted = 0;
            let got = segment(&hdr, &mut packet, |_, _| emitted += 1);
            assert_eq!(got, Err(want), "{name}");
            assert_eq!(emitted, 0, "{name}: nothing emitted on error");
            assert_eq!(packet, before, "{name}: packet unchanged on error");
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng::new(13);
        let v4 = Flow::new(false, 2);
        let v6 = Flow::new(true, 2);
        let seeds = [
            v4.tcp(5, ACK, &[1; 4000], 3),
            v6.tcp(5, ACK, &[1; 4000], 3),
            v4.udp(&[1; 4000], 3),
            v6.udp(&[1; 4000], 3),
        ];
        for round in 0..60_000 {
            let hdr = if rng.below(3) == 0 {
                VirtioNetHdr::decode(&rng.bytes(10)).unwrap()
            } else {
                // Plausible values, so the deeper checks are reached too.
                let gso_type =
                    [GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_UDP, 0x81, 7][rng.below(7)];
                VirtioNetHdr {
                    flags: rng.u8() & 3,
                    gso_type,
                    hdr_len: rng.below(120) as u16,
                    gso_size: rng.below(3000) as u16,
                    csum_start: [20, 40, rng.below(300) as u16, rng.u16()][rng.below(4)],
                    csum_offset: [6, 16, rng.below(100) as u16, rng.u16()][rng.below(4)],
                }
            };
            let mut packet = if round % 2 == 0 {
                let mut p = seeds[rng.below(4)].clone();
                p.truncate(rng.below(p.len() + 1));
                for _ in 0..rng.below(4) {
                    if !p.is_empty() {
                        let i = rng.below(p.len().min(100));
                        p[i] = rng.u8();
                    }
                }
                p
            } else {
                rng.bytes_below(400)
            };
            let len = packet.len();
            let mut total = 0;
            if let Ok(n) = segment(&hdr, &mut packet, |h, p| {
                assert!(h.len() <= MAX_HEADER_LEN.max(len));
                total += p.len();
            }) {
                assert!(n >= 1);
                assert!(total <= len);
            }
        }
    }
}
