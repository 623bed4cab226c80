//! The `struct virtio_net_hdr` that prefixes every read and write on a TUN device opened with
//! `IFF_VNET_HDR`, and the error type of the offload code.
//!
//! The legacy 10-byte layout (`include/uapi/linux/virtio_net.h`) is used: the TUN device
//! keeps its default `TUNSETVNETHDRSZ` of 10, and the 12-byte `num_buffers` variant is only
//! for mergeable receive buffers, which TUN never uses. Multi-byte fields are in the
//! device's byte order; TUN without `TUNSETVNETLE`/`TUNSETVNETBE` uses native endianness,
//! and every Linux target Trellis runs on is little-endian, so they are encoded as
//! little-endian here (fixed, rather than `to_ne_bytes`, so the wire format is the same in
//! tests on any host).

use std::fmt;

/// One `virtio_net_hdr` (legacy layout, 10 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    /// [`FLAG_NEEDS_CSUM`] and/or [`FLAG_DATA_VALID`].
    pub flags: u8,
    /// One of the `GSO_*` constants, possibly with [`GSO_ECN`] or-ed in.
    pub gso_type: u8,
    /// Length of the headers before the payload to segment. From the kernel this is only a
    /// hint (it is the skb's linear length, which may include payload); the segmenter derives
    /// the real header length from the packet.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Offset of the first byte the checksum covers (the transport header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start` (16 for TCP, 6 for UDP).
    pub csum_offset: u16,
}

/// The checksum is partial: the field at `csum_start + csum_offset` holds the pseudo-header
/// sum and the rest must be summed from `csum_start` to the end.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// The checksum has already been verified.
pub const FLAG_DATA_VALID: u8 = 2;

/// Not a GSO packet.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4 segmentation (TSO).
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (UFO): not enabled on the device and refused.
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6 segmentation (TSO).
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation offload (USO), IPv4 or IPv6.
pub const GSO_UDP_L4: u8 = 5;
/// Flag bit: the TCP stream uses ECN, so CWR goes on the first segment only.
pub const GSO_ECN: u8 = 0x80;

impl VirtioNetHdr {
    /// Encoded length in bytes.
    pub const LEN: usize = 10;

    /// The header of a plain packet: no checksum to complete, no segmentation.
    pub const NONE: Self = VirtioNetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads a header from the first [`Self::LEN`] bytes of `bytes`.
    ///
    /// Only the length is checked: whether the values make sense for the packet behind them
    /// is for [`super::segment::segment`] to decide, which has the packet at hand.
    pub fn decode(bytes: &[u8]) -> Result<Self, OffloadError> {
        let Some(b) = bytes.get(..Self::LEN) else {
            return Err(OffloadError::ShortVirtioHeader { len: bytes.len() });
        };
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_le_bytes([b[2], b[3]]),
            gso_size: u16::from_le_bytes([b[4], b[5]]),
            csum_start: u16::from_le_bytes([b[6], b[7]]),
            csum_offset: u16::from_le_bytes([b[8], b[9]]),
        })
    }

    /// The 10 bytes to put in front of a packet written to the TUN device.
    pub fn encode(&self) -> [u8; 10] {
        let mut b = [0; Self::LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// A name for a `gso_type` value in messages.
pub(super) fn gso_type_name(gso_type: u8) -> &'static str {
    match gso_type & !GSO_ECN {
        GSO_NONE => "NONE",
        GSO_TCPV4 => "TCPV4",
        GSO_UDP => "UFO",
        GSO_TCPV6 => "TCPV6",
        GSO_UDP_L4 => "USO",
        _ => "unknown",
    }
}

/// Why a packet read from the TUN device cannot be checksummed or segmented.
///
/// Every variant carries the offending values so a log line says what the kernel handed us.
/// All of them mean "drop this packet"; none is fatal for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffloadError {
    /// The read was shorter than the virtio header.
    ShortVirtioHeader { len: usize },
    /// A `gso_type` this code does not segment (UFO, or a value it does not know).
    UnsupportedGsoType { gso_type: u8 },
    /// A GSO type with `gso_size` 0.
    ZeroGsoSize { gso_type: u8 },
    /// The IP version nibble does not fit the GSO type (or is neither 4 nor 6).
    IpVersionMismatch { version: u8, gso_type: u8 },
    /// The packet is shorter than the header length the virtio header announces.
    ShorterThanHdrLen { len: usize, hdr_len: u16 },
    /// The packet ends inside a header.
    Truncated {
        what: &'static str,
        len: usize,
        needed: usize,
    },
    /// A header field has a value that cannot be right.
    BadHeader { what: &'static str, value: usize },
    /// `csum_start` (plus the checksum field at `csum_offset`) lies outside the packet, or
    /// (for IPv4) is not where the IP header ends.
    BadCsumStart {
        csum_start: u16,
        csum_offset: u16,
        len: usize,
    },
    /// The transport protocol is not the one the GSO type says.
    WrongProtocol { protocol: u8, gso_type: u8 },
    /// The IP and transport headers together are longer than a segment header may be.
    HeadersTooLong { len: usize, max: usize },
    /// A segment (headers plus `gso_size` payload bytes) would not fit the IP length field.
    SegmentTooLong { len: usize },
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OffloadError::ShortVirtioHeader { len } => write!(
                f,
                "read of {len} bytes is shorter than the {}-byte virtio header",
                VirtioNetHdr::LEN
            ),
            OffloadError::UnsupportedGsoType { gso_type } => write!(
                f,
                "virtio header gso_type {gso_type} ({}) is not supported",
                gso_type_name(gso_type)
            ),
            OffloadError::ZeroGsoSize { gso_type } => write!(
                f,
                "virtio header gso_type {gso_type} ({}) has gso_size 0",
                gso_type_name(gso_type)
            ),
            OffloadError::IpVersionMismatch { version, gso_type } => write!(
                f,
                "IP version {version} does not match virtio header gso_type {gso_type} ({})",
                gso_type_name(gso_type)
            ),
            OffloadError::ShorterThanHdrLen { len, hdr_len } => write!(
                f,
                "packet of {len} bytes is shorter than the virtio header's hdr_len {hdr_len}"
            ),
            OffloadError::Truncated { what, len, needed } => write!(
                f,
                "packet of {len} bytes is truncated: the {what} needs {needed} bytes"
            ),
            OffloadError::BadHeader { what, value } => write!(f, "invalid {what} {value}"),
            OffloadError::BadCsumStart {
                csum_start,
                csum_offset,
                len,
            } => write!(
                f,
                "virtio header csum_start {csum_start} csum_offset {csum_offset} does not fit a \
                 packet of {len} bytes"
            ),
            OffloadError::WrongProtocol { protocol, gso_type } => write!(
                f,
                "transport protocol {protocol} does not match virtio header gso_type {gso_type} \
                 ({})",
                gso_type_name(gso_type)
            ),
            OffloadError::HeadersTooLong { len, max } => write!(
                f,
                "packet headers of {len} bytes are longer than the supported {max}"
            ),
            OffloadError::SegmentTooLong { len } => {
                write!(f, "segment of {len} bytes does not fit the IP length field")
            }
        }
    }
}

impl std::error::Error for OffloadError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_little_endian() {
        let hdr = VirtioNetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
        };
        let bytes = hdr.encode();
        assert_eq!(bytes, [1, 0x81, 2, 1, 4, 3, 6, 5, 8, 7]);
        assert_eq!(VirtioNetHdr::decode(&bytes), Ok(hdr));
        // Trailing bytes (the packet) are ignored.
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0x45; 30]);
        assert_eq!(VirtioNetHdr::decode(&long), Ok(hdr));
        assert_eq!(VirtioNetHdr::NONE.encode(), [0; 10]);
        assert_eq!(VirtioNetHdr::NONE, VirtioNetHdr::default());
    }

    #[test]
    fn short_input_is_an_error() {
        for len in 0..VirtioNetHdr::LEN {
            assert_eq!(
                VirtioNetHdr::decode(&vec![0; len]),
                Err(OffloadError::ShortVirtioHeader { len })
            );
        }
    }

    #[test]
    fn messages_name_field_and_value() {
        assert_eq!(
            OffloadError::UnsupportedGsoType { gso_type: 3 }.to_string(),
            "virtio header gso_type 3 (UFO) is not supported"
        );
        assert_eq!(
            OffloadError::ShorterThanHdrLen {
                len: 40,
                hdr_len: 54
            }
            .to_string(),
            "packet of 40 bytes is shorter than the virtio header's hdr_len 54"
        );
        assert_eq!(
            OffloadError::ZeroGsoSize { gso_type: 0x84 }.to_string(),
            "virtio header gso_type 132 (TCPV6) has gso_size 0"
        );
    }
}
