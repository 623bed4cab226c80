//! Which nodes serve as a location's gateways, and which gateway serves which node.

use std::collections::BTreeSet;
use trellis_model::Node;

/// Whether `m` may serve its location (`members`): eligible, and public unless no eligible
/// member is public.
pub fn qualifies_as_gateway(members: &[&Node], m: &Node) -> bool {
    qualifies(any_public_eligible(members), m)
}

/// Whether any of a location's members is eligible and public.
pub(crate) fn any_public_eligible(members: &[&Node]) -> bool {
    members.iter().any(|n| n.gateway.eligible && n.is_public())
}

/// [`qualifies_as_gateway`], given [`any_public_eligible`] of the location (computed once
/// per location rather than once per member).
pub(crate) fn qualifies(any_public_eligible: bool, m: &Node) -> bool {
    m.gateway.eligible && (m.is_public() || !any_public_eligible)
}

/// A location's gateway slots: each slot holds a gateway or is vacant. Nodes are spread
/// over slots (not over gateway names) by rendezvous hashing, so a replacement that takes a
/// failed gateway's slot takes over exactly that gateway's share, and nobody else moves.
pub type Slots = Vec<Option<String>>;

/// Fill `wanted` gateway slots among a location's members.
///
/// A gateway must be reachable from other locations, so only eligible nodes with a public
/// endpoint qualify; only a location with none of those falls back to its eligible private
/// nodes (useful where internal networks are routed between locations).
///
/// Sticky: a gateway from `previous` that still qualifies keeps its slot, so a node that
/// qualifies later never displaces one (Kilo issue 39). Nodes in `down` (measured not to
/// forward) lose their slot. Vacant slots are filled by higher priority, then name, so every
/// node fills them the same way.
pub fn choose_gateways(
    members: &[&Node],
    previous: &[Option<String>],
    wanted: usize,
    down: &BTreeSet<String>,
) -> Slots {
    let any_public = any_public_eligible(members);
    let qualifies = |m: &Node| qualifies(any_public, m) && !down.contains(&m.name);
    let keeps = |name: &str| members.iter().any(|m| m.name == name && qualifies(m));
    let mut slots: Slots = Vec::with_capacity(wanted);
    for i in 0..wanted {
        let kept = previous
            .get(i)
            .cloned()
            .flatten()
            .filter(|name| keeps(name) && !slots.iter().flatten().any(|s| s == name));
        slots.push(kept);
    }
    let mut candidates: Vec<&&Node> = members
        .iter()
        .filter(|m| qualifies(m) && !slots.iter().flatten().any(|s| *s == m.name))
        .collect();
    candidates.sort_by(|a, b| (b.gateway.priority, &a.name).cmp(&(a.gateway.priority, &b.name)));
    let mut candidates = candidates.into_iter();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match candidates.next() {
            Some(m) => *slot = Some(m.name.clone()),
            None => break,
        }
    }
    slots
}

/// The filled slots' gateways, in slot order.
pub fn active(slots: &[Option<String>]) -> Vec<String> {
    slots.iter().flatten().cloned().collect()
}

/// The gateway serving `node`: rendezvous over the filled slots, keyed by slot number.
pub fn serving_slot<'a>(node: &str, slots: &'a [Option<String>]) -> Option<&'a str> {
    let slot_hashes: Vec<u64> = (0..slots.len())
        .map(|i| name_hash(&format!("slot-{i}")))
        .collect();
    serving_slot_hashed(name_hash(node), slots, &slot_hashes)
}

/// [`serving_slot`] from the [`name_hash`] of the node and of each slot's name
/// (`slot-{i}`), hashed once for a whole location.
pub(crate) fn serving_slot_hashed<'a>(
    node: u64,
    slots: &'a [Option<String>],
    slot_hashes: &[u64],
) -> Option<&'a str> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_deref().map(|g| (i, g)))
        .max_by_key(|(i, _)| (combine(node, slot_hashes[*i]), std::cmp::Reverse(*i)))
        .map(|(_, g)| g)
}

/// Rendezvous (highest random weight) choice of one gateway for a node: each node ranks
/// every gateway by a hash of the pair and takes the best. Removing a gateway moves only
/// the nodes it served; adding one takes over only the nodes that now rank it best.
pub fn rendezvous_choice<'a>(node: &str, gateways: &'a [String]) -> Option<&'a str> {
    gateways
        .iter()
        .max_by_key(|g| (pair_weight(node, g), std::cmp::Reverse(g.as_str())))
        .map(String::as_str)
}

/// A stable 64-bit weight of a (node, gateway) pair. Each name is hashed (FNV-1a) and
/// mixed (SplitMix64) on its own before the two are combined and mixed again: names that
/// differ in one character ("a1", "a2") must still get independent weights. Stable across
/// versions and architectures, because every node must compute the same assignment.
pub(crate) fn pair_weight(node: &str, gateway: &str) -> u64 {
    combine(name_hash(node), name_hash(gateway))
}

/// One name's share of [`pair_weight`], to hash a name once and pair it with many.
pub(crate) fn name_hash(name: &str) -> u64 {
    mix(fnv1a(name))
}

/// [`pair_weight`] from the two names' [`name_hash`]es.
pub(crate) fn combine(node: u64, gateway: u64) -> u64 {
    combine_rotated(node, gateway.rotate_left(29))
}

/// [`combine`] with the second hash already rotated, for a loop that pairs one name with
/// many.
pub(crate) fn combine_rotated(node: u64, gateway_rotated: u64) -> u64 {
    mix(node ^ gateway_rotated)
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn mix(mut h: u64) -> u64 {
    h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_weight_is_pinned() {
        // Every node of a cluster must agree; a change here would split a running mesh
        // during a rolling upgrade, so values are pinned.
        assert_eq!(pair_weight("a1", "a2"), 17_886_312_406_756_659_542);
        assert_ne!(pair_weight("a1", "a2"), pair_weight("a2", "a1"));
    }

    #[test]
    fn a_replacement_in_the_same_slot_takes_exactly_the_failed_share() {
        let before: Slots = vec![Some("g0".into()), Some("g1".into()), Some("g2".into())];
        let replaced: Slots = vec![Some("g0".into()), Some("g9".into()), Some("g2".into())];
        let vacant: Slots = vec![Some("g0".into()), None, Some("g2".into())];
        for i in 0..300 {
            let n = format!("n{i}");
            let b = serving_slot(&n, &before).unwrap();
            let r = serving_slot(&n, &replaced).unwrap();
            let v = serving_slot(&n, &vacant).unwrap();
            if b == "g1" {
                assert_eq!(r, "g9");
                assert_ne!(v, "g1");
            } else {
                assert_eq!((b, b), (r, v), "{n} moved although its gateway stayed");
            }
        }
    }

    #[test]
    fn removing_a_gateway_moves_only_its_share() {
        let gws: Vec<String> = (0..5).map(|i| format!("g{i}")).collect();
        let fewer: Vec<String> = gws.iter().filter(|g| *g != "g2").cloned().collect();
        let mut moved = 0;
        for i in 0..500 {
            let n = format!("n{i}");
            let before = rendezvous_choice(&n, &gws).unwrap();
            let after = rendezvous_choice(&n, &fewer).unwrap();
            if before != "g2" {
                assert_eq!(before, after, "{n} moved although its gateway stayed");
            } else {
                moved += 1;
            }
        }
        // roughly a fifth of the nodes were g2's
        assert!((60..=140).contains(&moved), "{moved}");
    }

    #[test]
    fn similar_names_spread_evenly() {
        let gws = ["a1".to_string(), "a2".to_string()];
        let on_a1 = (0..400)
            .filter(|i| rendezvous_choice(&format!("a{}", i + 3), &gws) == Some("a1"))
            .count();
        assert!((160..=240).contains(&on_a1), "{on_a1} of 400 on a1");
    }
}
