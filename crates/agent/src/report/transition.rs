//! What changed in the cluster's health between two passes: verdicts that flipped, whether
//! any location's active gateways changed, and whether that change was a failover (an
//! active gateway held down left its slot). A pure function, so what the metrics and logs
//! call a failover is decided here, once, and tested.

use std::collections::{BTreeMap, BTreeSet};

/// The verdicts and active gateways one pass planned with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Gateway candidates held down.
    pub down: BTreeSet<String>,
    /// Active gateways per location.
    pub gateways: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    /// Candidates whose verdict flipped (down → up or up → down).
    pub verdict_changes: usize,
    /// Some location's active gateways differ.
    pub gateways_changed: bool,
    /// An active gateway held down was replaced (left the active set).
    pub failover: bool,
    /// Candidates held down now.
    pub down: usize,
}

/// The change from `before` (`None`: the first pass, which changes nothing) to `after`.
pub fn between(before: Option<&Health>, after: &Health) -> Transition {
    let Some(before) = before else {
        return Transition {
            down: after.down.len(),
            ..Transition::default()
        };
    };
    let active_after: BTreeSet<&String> = after.gateways.values().flatten().collect();
    let gateways_changed = before.gateways != after.gateways;
    Transition {
        verdict_changes: before.down.symmetric_difference(&after.down).count(),
        gateways_changed,
        failover: gateways_changed
            && before
                .gateways
                .values()
                .flatten()
                .any(|g| after.down.contains(g) && !active_after.contains(g)),
        down: after.down.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(down: &[&str], gateways: &[&str]) -> Health {
        Health {
            down: down.iter().map(|s| s.to_string()).collect(),
            gateways: [(
                "a".to_string(),
                gateways.iter().map(|s| s.to_string()).collect(),
            )]
            .into(),
        }
    }

    #[test]
    fn a_gateway_held_down_and_replaced_is_a_failover() {
        let t = between(
            Some(&health(&[], &["a1", "a2"])),
            &health(&["a1"], &["a3", "a2"]),
        );
        assert_eq!(
            t,
            Transition {
                verdict_changes: 1,
                gateways_changed: true,
                failover: true,
                down: 1
            }
        );
    }

    #[test]
    fn other_changes_are_not_failovers() {
        // a gateway joins: a change, no failover
        let t = between(Some(&health(&[], &["a1"])), &health(&[], &["a1", "a2"]));
        assert!(t.gateways_changed && !t.failover && t.verdict_changes == 0);
        // a verdict flips for a standby: no change of gateways at all
        let t = between(Some(&health(&[], &["a1"])), &health(&["a9"], &["a1"]));
        assert!(!t.gateways_changed && !t.failover && t.verdict_changes == 1);
        // recovery: the down gateway comes back
        let t = between(Some(&health(&["a1"], &["a2"])), &health(&[], &["a1", "a2"]));
        assert!(t.gateways_changed && !t.failover && t.verdict_changes == 1);
        // the first pass changes nothing, whatever it sees
        assert_eq!(between(None, &health(&["a1"], &["a2"])).down, 1);
        assert!(!between(None, &health(&["a1"], &["a2"])).failover);
    }
}
