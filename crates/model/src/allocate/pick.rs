//! Choosing a free value in a range, the way the API server's allocators do: from a
//! pseudo-random start, in the upper part of the range first. The lower part (a sixteenth of
//! an address range, a thirty-second of a port range, within bounds) is where people pick
//! values by hand, so allocation avoids it until the upper part is full (KEP-3070,
//! KEP-3668). A start that depends on the Service's name and the attempt means concurrent
//! writers rarely try the same value, and a retry after a lost race tries another.

/// Size of the part of a range left to hand-picked values, as the API server computes it.
pub fn static_band(len: u128, step: u128, max: u128) -> u128 {
    const MIN: u128 = 16;
    if len <= MIN {
        0
    } else {
        (len / step).clamp(MIN, max)
    }
}

/// A free offset in `0..len`, or `None` when every offset is taken. `taken` counts the
/// values held, so that the scan stops: among `taken + 1` candidates one is free.
pub fn free_offset(
    len: u128,
    band: u128,
    seed: u64,
    taken: usize,
    is_free: impl Fn(u128) -> bool,
) -> Option<u128> {
    let band = band.min(len);
    let bands = [(band, len - band), (0, band)];
    bands
        .into_iter()
        .filter(|(_, size)| *size > 0)
        .find_map(|(start, size)| {
            let first = u128::from(seed) % size;
            let tries = size.min(taken as u128 + 1);
            (0..tries)
                .map(|i| start + (first + i) % size)
                .find(|offset| is_free(*offset))
        })
}

/// A well-mixed 64-bit seed from a name and a salt (FNV-1a, then splitmix64).
pub fn seed(name: &str, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h, salt)
}

/// Another seed from `seed` for the `n`th value one Service needs, unrelated to the others
/// so that its values are spread like those of different Services.
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_follow_the_api_server() {
        assert_eq!(static_band(14, 16, 256), 0, "a /28 has no static band");
        assert_eq!(static_band(254, 16, 256), 16);
        assert_eq!(static_band((1 << 20) - 2, 16, 256), 256);
        assert_eq!(
            static_band(2768, 32, 128),
            86,
            "the default node port range"
        );
    }

    #[test]
    fn upper_band_first_then_lower() {
        let got = free_offset(100, 20, 7, 0, |_| true).unwrap();
        assert!((20..100).contains(&got), "{got}");
        let got = free_offset(100, 20, 7, 80, |o| o < 20).unwrap();
        assert!(got < 20, "falls back to the static band: {got}");
        assert_eq!(free_offset(100, 20, 7, 100, |_| false), None);
        assert_eq!(free_offset(3, 0, 9, 2, |o| o == 1), Some(1));
    }
}
