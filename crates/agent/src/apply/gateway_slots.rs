//! Keeping each location's gateway choice sticky: the slots the planner chose are written
//! back to the store when they differ from the stored record. Every node of the location
//! computes the same slots and the write is a compare-and-set on the record's revision, so
//! concurrent writers are harmless and a stale writer loses.

use trellis_model::{GatewaySet, keys};
use trellis_plan::Slots;
use trellis_store::{Compare, Revision};

/// The write that records `chosen` for `location`, given the stored record and its mod
/// revision; `None` when the store already holds it.
pub fn write(
    location: &str,
    stored: Option<&(GatewaySet, Revision)>,
    chosen: &Slots,
) -> Option<(Compare, GatewaySet)> {
    let key = keys::gateways(location);
    let compare = match stored {
        Some((set, _)) if &set.slots == chosen => return None,
        Some((_, revision)) => Compare::ModRevision(key, *revision),
        None => Compare::Absent(key),
    };
    Some((
        compare,
        GatewaySet {
            location: location.to_string(),
            slots: chosen.clone(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(names: &[Option<&str>]) -> Slots {
        names.iter().map(|n| n.map(str::to_string)).collect()
    }

    #[test]
    fn writes_only_a_changed_choice_and_only_over_what_it_read() {
        let chosen = slots(&[Some("a1"), Some("a2")]);
        let (compare, record) = write("site-a", None, &chosen).unwrap();
        assert_eq!(compare, Compare::Absent("gateways/site-a".into()));
        assert_eq!(record.slots, chosen);

        let stored = GatewaySet {
            location: "site-a".into(),
            slots: chosen.clone(),
        };
        assert_eq!(write("site-a", Some(&(stored.clone(), 7)), &chosen), None);

        let replaced = slots(&[Some("a1"), Some("a3")]);
        let (compare, record) = write("site-a", Some(&(stored, 7)), &replaced).unwrap();
        assert_eq!(compare, Compare::ModRevision("gateways/site-a".into(), 7));
        assert_eq!(record.slots, replaced);
    }
}
