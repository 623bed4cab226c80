//! ICMP echo ids: one fresh id per probe, in the range that routes it where it must go.
//!
//! The id is the only thing a gateway's relay table can route on: it DNATs each probe to
//! one of the nodes behind it by id range. A fresh id every time makes every probe a new
//! conntrack flow, so a gateway that still forwards established flows but no new ones
//! (the seed-000 fault) fails its probes like any dead gateway. Ids of one subject repeat
//! only after [`ID_RANGE_SIZE`] probes to the same range (minutes at ten rounds a
//! second), long after ICMP conntrack entries expire (30 s).
//!
//! Direct paths use the one range no gateway relays, so the peer answers them itself —
//! and a gateway and a path to the same node, which share its probe address, are told
//! apart by the range of the answer's id.

use crate::config::PROBES_PER_ROUND;
use trellis_plan::health::{ID_RANGE_SIZE, UNRELAYED_ID_RANGE, id_range};

/// Whether an echo id belongs to a direct path's probes (else to a gateway's).
pub(crate) fn is_path_id(id: u16) -> bool {
    usize::from(id / ID_RANGE_SIZE) == UNRELAYED_ID_RANGE
}

/// Hands out one subject's ids.
#[derive(Clone, Debug, Default)]
pub(crate) struct IdAllocator {
    /// Probes handed out so far, per range (wrapping within the range).
    next: [u16; UNRELAYED_ID_RANGE + 1],
}

impl IdAllocator {
    /// The ids of the next round: [`PROBES_PER_ROUND`] probes (at least one per relay
    /// target), spread over the relay targets' ranges so that a round fails only if every
    /// target is unreachable; `relays == 0` is a direct path.
    pub(crate) fn round(&mut self, relays: usize) -> Vec<u16> {
        let relays = relays.min(UNRELAYED_ID_RANGE);
        (0..PROBES_PER_ROUND.max(relays))
            .map(|i| {
                let range = if relays == 0 {
                    UNRELAYED_ID_RANGE
                } else {
                    i % relays
                };
                let nth = self.next[range];
                self.next[range] = (nth + 1) % ID_RANGE_SIZE;
                id_range(range).0 + nth
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_probe_is_a_new_flow_in_its_targets_range() {
        let mut ids = IdAllocator::default();
        let mut seen = BTreeSet::new();
        for _ in 0..1_000 {
            let round = ids.round(3);
            assert_eq!(round.len(), PROBES_PER_ROUND);
            let ranges: BTreeSet<u16> = round.iter().map(|id| id / ID_RANGE_SIZE).collect();
            assert_eq!(
                ranges,
                BTreeSet::from([0, 1, 2]),
                "spread over all relay targets"
            );
            for id in round {
                assert!(!is_path_id(id));
                assert!(seen.insert(id), "id {id} reused");
            }
        }
    }

    #[test]
    fn paths_use_the_unrelayed_range_and_gateways_never_do() {
        let mut ids = IdAllocator::default();
        let path = ids.round(0);
        assert_eq!(path.len(), PROBES_PER_ROUND);
        assert!(path.iter().all(|id| is_path_id(*id)));
        for relays in 1..=5 {
            assert!(ids.round(relays).iter().all(|id| !is_path_id(*id)));
        }
    }

    #[test]
    fn ids_wrap_within_their_range() {
        let mut ids = IdAllocator::default();
        for _ in 0..(ID_RANGE_SIZE / PROBES_PER_ROUND as u16) {
            ids.round(0);
        }
        assert_eq!(ids.round(0)[0], id_range(UNRELAYED_ID_RANGE).0);
    }
}
