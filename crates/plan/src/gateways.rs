//! Which nodes serve as a location's gateways, and which gateway serves which node.

use trellis_model::Node;

/// Choose up to `wanted` gateways among a location's members.
///
/// A gateway must be reachable from other locations, so only eligible nodes with a public
/// endpoint qualify; only a location with none of those falls back to its eligible private
/// nodes (useful where internal networks are routed between locations).
///
/// Sticky: gateways from `previous` that still qualify keep their place, in their order, so
/// a node that qualifies later never displaces one (Kilo issue 39). Vacancies are filled by
/// higher priority, then name, so every node fills them the same way.
pub fn choose_gateways(members: &[&Node], previous: &[String], wanted: usize) -> Vec<String> {
    let any_public = members.iter().any(|m| m.gateway.eligible && m.is_public());
    let qualifies = |m: &Node| m.gateway.eligible && (m.is_public() || !any_public);
    let eligible = |name: &str| members.iter().any(|m| m.name == name && qualifies(m));
    let mut chosen: Vec<String> = Vec::with_capacity(wanted);
    for name in previous {
        if chosen.len() < wanted && eligible(name) && !chosen.contains(name) {
            chosen.push(name.clone());
        }
    }
    let mut candidates: Vec<&&Node> = members
        .iter()
        .filter(|m| qualifies(m) && !chosen.contains(&m.name))
        .collect();
    candidates.sort_by(|a, b| (b.gateway.priority, &a.name).cmp(&(a.gateway.priority, &b.name)));
    for m in candidates {
        if chosen.len() == wanted {
            break;
        }
        chosen.push(m.name.clone());
    }
    chosen
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
fn pair_weight(node: &str, gateway: &str) -> u64 {
    mix(mix(fnv1a(node)) ^ mix(fnv1a(gateway)).rotate_left(29))
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
