//! The Internet checksum (RFC 1071) as the offload code needs it: an unfolded one's-complement
//! sum that can be carried from one buffer to the next, a fold to 16 bits, and the
//! pseudo-header sums TCP and UDP start from.
//!
//! Sums are kept unfolded in a `u64` so that the pseudo-header, the transport header and the
//! payload (which live in different buffers when a super-packet is split) can be added up
//! without folding in between. Folding happens once, at the end, with [`fold`].
//!
//! Every sum treats its input as a sequence of big-endian 16-bit words starting at an even
//! offset of the checksummed region, with an odd trailing byte padded with a zero byte (as
//! RFC 1071 says). Summing two buffers one after the other is therefore only the same as
//! summing their concatenation when the first has an even length; the callers only split at
//! even offsets (IP and transport header lengths are multiples of 4).

/// Adds `data` to the one's-complement accumulator `initial` and returns the new, unfolded
/// accumulator.
///
/// Eight bytes are read at a time as one big-endian `u64` with end-around carry. That is the
/// same one's-complement sum as adding 16-bit words: 2^16 ≡ 1 modulo 2^16 − 1, and
/// 2^64 − 1 is a multiple of 2^16 − 1, so a carry out of bit 63 wrapped back to bit 0 keeps
/// the value modulo 2^16 − 1, which is all [`fold`] looks at.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_be_bytes([
            chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
        ]);
        acc = add_carry(acc, word);
    }
    let mut rest = chunks.remainder();
    if rest.len() >= 4 {
        acc = add_carry(
            acc,
            u64::from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]])),
        );
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        acc = add_carry(acc, u64::from(u16::from_be_bytes([rest[0], rest[1]])));
        rest = &rest[2..];
    }
    if let Some(&last) = rest.first() {
        // An odd trailing byte is the high byte of a word whose low byte is zero.
        acc = add_carry(acc, u64::from(last) << 8);
    }
    acc
}

/// 64-bit addition with the carry wrapped around to bit 0 (one's-complement addition).
#[inline]
fn add_carry(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// Folds an unfolded accumulator to 16 bits (end-around carries included), not complemented.
///
/// The result is the one's-complement sum itself; the checksum field of a finished packet
/// holds its complement (see [`checksum`]), while a CHECKSUM_PARTIAL packet handed to the
/// kernel holds the folded pseudo-header sum as is.
pub fn fold(sum: u64) -> u16 {
    let mut s = (sum >> 32) + (sum & 0xffff_ffff);
    s = (s >> 32) + (s & 0xffff_ffff);
    s = (s >> 16) + (s & 0xffff);
    s = (s >> 16) + (s & 0xffff);
    s = (s >> 16) + (s & 0xffff);
    s as u16
}

/// The checksum field value for `data` summed on top of `initial`: the complement of the
/// folded sum.
pub fn checksum(data: &[u8], initial: u64) -> u16 {
    !fold(sum(data, initial))
}

/// The unfolded sum of the IPv4 pseudo-header (RFC 793 / RFC 768): source, destination, zero,
/// protocol and the transport length (header plus payload).
pub fn pseudo_header_v4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u64 {
    u64::from(u32::from_be_bytes(src))
        + u64::from(u32::from_be_bytes(dst))
        + u64::from(protocol)
        + u64::from(l4_len)
}

/// The unfolded sum of the IPv6 pseudo-header (RFC 8200 section 8.1): source, destination,
/// the 32-bit upper-layer length and the next header value of the transport protocol.
pub fn pseudo_header_v6(src: [u8; 16], dst: [u8; 16], protocol: u8, l4_len: u32) -> u64 {
    // Two 64-bit words per address; the initial value leaves room for the carries.
    let mut acc = u64::from(protocol) + u64::from(l4_len);
    for addr in [src, dst] {
        let (hi, lo) = addr.split_at(8);
        acc = add_carry(acc, u64::from_be_bytes(hi.try_into().expect("8 bytes")));
        acc = add_carry(acc, u64::from_be_bytes(lo.try_into().expect("8 bytes")));
    }
    acc
}

/// A small deterministic generator for the randomized tests of the offload modules, so the
/// tests need no extra dev-dependency and a failure reproduces with the printed seed.
/// The unfolded pseudo-header sum of a packet whose (IPv4 or IPv6, no extension headers)
/// header `ip` is followed by `l4_len` bytes of `protocol`.
pub fn pseudo_header(ip: &[u8], v6: bool, protocol: u8, l4_len: usize) -> u64 {
    if v6 {
        pseudo_header_v6(
            ip[8..24].try_into().expect("16 bytes"),
            ip[24..40].try_into().expect("16 bytes"),
            protocol,
            l4_len as u32,
        )
    } else {
        pseudo_header_v4(
            ip[12..16].try_into().expect("4 bytes"),
            ip[16..20].try_into().expect("4 bytes"),
            protocol,
            l4_len as u16,
        )
    }
}

#[cfg(test)]
pub(super) mod test_rng {
    /// SplitMix64.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `0..n` (n > 0); the modulo bias does not matter for tests.
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub fn bool(&mut self) -> bool {
            self.next_u64() & 1 == 1
        }

        pub fn u8(&mut self) -> u8 {
            self.next_u64() as u8
        }

        pub fn u16(&mut self) -> u16 {
            self.next_u64() as u16
        }

        pub fn u32(&mut self) -> u32 {
            self.next_u64() as u32
        }

        pub fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.u8();
            }
        }

        pub fn bytes(&mut self, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.fill(&mut v);
            v
        }

        /// Random bytes, fewer than `max` of them.
        pub fn bytes_below(&mut self, max: usize) -> Vec<u8> {
            let len = self.below(max);
            self.bytes(len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_rng::Rng;
    use super::*;

    /// RFC 1071 done the slow, obvious way: 16-bit big-endian words into a u32, folded.
    fn naive_sum(data: &[u8], initial: u32) -> u16 {
        let mut acc = initial;
        let mut i = 0;
        while i < data.len() {
            let hi = u32::from(data[i]);
            let lo = data.get(i + 1).copied().map_or(0, u32::from);
            acc += (hi << 8) | lo;
            while acc > 0xffff {
                acc = (acc >> 16) + (acc & 0xffff);
            }
            i += 2;
        }
        acc as u16
    }

    /// Both folded values stand for the same one's-complement number (0 and 0xffff are the
    /// two zeros) — how the fast and the naive sum are allowed to differ.
    fn same_ones_complement(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }

    #[test]
    fn sum_matches_naive_reference_on_random_inputs() {
        let mut rng = Rng::new(1);
        for round in 0..4000 {
            let len = if round < 200 { round } else { rng.below(3000) };
            let data = rng.bytes(len);
            let initial = u32::from(rng.u16());
            let fast = fold(sum(&data, u64::from(initial)));
            let naive = naive_sum(&data, initial);
            assert!(
                same_ones_complement(fast, naive),
                "len {len}: fast {fast:#06x} naive {naive:#06x}"
            );
            // Without an initial value a non-empty sum never differs at all.
            assert_eq!(fold(sum(&data, 0)), naive_sum(&data, 0), "len {len}");
        }
    }

    #[test]
    fn sum_of_all_ones_does_not_lose_carries() {
        for len in [0usize, 1, 2, 7, 8, 9, 64, 65535, 200_000] {
            let data = vec![0xff; len];
            assert_eq!(fold(sum(&data, u64::MAX - 3)), naive_sum(&data, 0xffff - 3));
            assert_eq!(fold(sum(&data, 0)), naive_sum(&data, 0), "len {len}");
        }
    }

    #[test]
    fn sums_chain_across_even_splits() {
        let mut rng = Rng::new(2);
        for _ in 0..500 {
            let len = rng.below(2000) + 2;
            let data = rng.bytes(len);
            let split = rng.below(data.len() / 2) * 2;
            let whole = fold(sum(&data, 0));
            let chained = fold(sum(&data[split..], sum(&data[..split], 0)));
            assert_eq!(whole, chained);
        }
    }

    #[test]
    fn known_values() {
        // RFC 1071 section 3 example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data, 0), !0xddf2);
        // A classic IPv4 header (checksum field zeroed) whose checksum is b861.
        let ip = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&ip, 0), 0xb861);
    }

    #[test]
    fn pseudo_headers_match_their_byte_layout() {
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let mut src4 = [0; 4];
            let mut dst4 = [0; 4];
            rng.fill(&mut src4);
            rng.fill(&mut dst4);
            let (proto, len16) = (rng.u8(), rng.u16());
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&src4);
            bytes.extend_from_slice(&dst4);
            bytes.extend_from_slice(&[0, proto]);
            bytes.extend_from_slice(&len16.to_be_bytes());
            assert_eq!(
                fold(pseudo_header_v4(src4, dst4, proto, len16)),
                naive_sum(&bytes, 0)
            );

            let mut src6 = [0; 16];
            let mut dst6 = [0; 16];
            rng.fill(&mut src6);
            rng.fill(&mut dst6);
            let len32 = rng.u32();
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&src6);
            bytes.extend_from_slice(&dst6);
            bytes.extend_from_slice(&len32.to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, proto]);
            assert_eq!(
                fold(pseudo_header_v6(src6, dst6, proto, len32)),
                naive_sum(&bytes, 0)
            );
        }
        let ones6 = [0xff; 16];
        assert_eq!(
            fold(pseudo_header_v6(ones6, ones6, 0xff, u32::MAX)),
            naive_sum(&[[0xff; 36].as_slice(), &[0, 0, 0, 0xff]].concat(), 0)
        );
    }
}
