//! Which Leases are live, judged as the node lifecycle controller judges the kubelet's:
//! by when *this* process last saw the Lease renewed, on its own monotonic clock, never by
//! comparing the `renewTime` written by another machine with its own wall clock (clock
//! skew between nodes would make leases expire early or never).
//!
//! While the watch on Leases is broken nothing can be seen renewed, so nothing expires:
//! the clock of every Lease stops, and starts again with a whole period when the watch is
//! back. That keeps an agent's view of its peers through an API outage, as etcd extends
//! its leases after an outage, and lets a leader resume its kept Lease.

use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Debug, PartialEq)]
struct Seen {
    holder: String,
    renewed: String,
    duration: Duration,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct Liveness {
    seen: HashMap<String, Seen>,
    /// Since when the watch on Leases has been broken.
    blind_since: Option<Instant>,
}

impl Liveness {
    /// A Lease as it is now (listed or watched) at `now`.
    pub fn observe(&mut self, lease: &Value, now: Instant) {
        let name = lease["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &lease["spec"];
        let holder = spec["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let renewed = spec["renewTime"].as_str().unwrap_or_default().to_string();
        let duration = Duration::from_secs(spec["leaseDurationSeconds"].as_u64().unwrap_or(15));
        match self.seen.get_mut(name) {
            Some(s) if s.holder == holder && s.renewed == renewed => s.duration = duration,
            _ => {
                self.seen.insert(
                    name.to_string(),
                    Seen {
                        holder,
                        renewed,
                        duration,
                        at: now,
                    },
                );
            }
        }
    }

    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
    }

    /// Keeps only the Leases named (after a fresh listing).
    pub fn retain(&mut self, names: &std::collections::HashSet<String>) {
        self.seen.retain(|n, _| names.contains(n));
    }

    /// The watch on Leases broke (`blind`) or is back.
    pub fn set_blind(&mut self, blind: bool, now: Instant) {
        match (blind, self.blind_since) {
            (true, None) => self.blind_since = Some(now),
            (false, Some(since)) => {
                let stopped = now.saturating_duration_since(since);
                for s in self.seen.values_mut() {
                    s.at += stopped;
                }
                self.blind_since = None;
            }
            _ => {}
        }
    }

    /// Whether the Lease has a holder and was seen renewed within its duration.
    pub fn is_live(&self, name: &str, now: Instant) -> bool {
        let now = self.blind_since.map_or(now, |since| since.min(now));
        self.seen
            .get(name)
            .is_some_and(|s| !s.holder.is_empty() && now < s.at + s.duration)
    }

    /// The holder of a live Lease.
    pub fn holder(&self, name: &str, now: Instant) -> Option<&str> {
        self.is_live(name, now)
            .then(|| self.seen.get(name).map(|s| s.holder.as_str()))
            .flatten()
    }

    /// When the next Lease would expire if not renewed: when to look again.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        if self.blind_since.is_some() {
            return None;
        }
        self.seen
            .values()
            .map(|s| s.at + s.duration)
            .filter(|at| *at > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lease(holder: &str, renewed: &str) -> Value {
        json!({"metadata": {"name": "node.a1"},
            "spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 10}})
    }

    #[test]
    fn a_lease_lives_for_its_duration_from_when_it_was_seen_renewed() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::default();
        l.observe(&lease("a1", "r1"), t0);
        assert!(l.is_live("node.a1", t0 + s(9)));
        // The same renewal seen again (a relist, an unrelated annotation) is no renewal.
        l.observe(&lease("a1", "r1"), t0 + s(8));
        assert!(!l.is_live("node.a1", t0 + s(10)));
        l.observe(&lease("a1", "r2"), t0 + s(11));
        assert!(l.is_live("node.a1", t0 + s(20)));
        assert_eq!(l.holder("node.a1", t0 + s(20)), Some("a1"));
        assert!(!l.is_live("node.b1", t0), "never seen");
        l.observe(&lease("", "r3"), t0 + s(12));
        assert!(!l.is_live("node.a1", t0 + s(12)), "released");
    }

    #[test]
    fn nothing_expires_while_renewals_cannot_be_seen() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = Liveness::default();
        l.observe(&lease("a1", "r1"), t0);
        l.set_blind(true, t0 + s(5));
        assert!(l.is_live("node.a1", t0 + s(60)), "blind: the clock stopped");
        assert_eq!(l.next_expiry(t0 + s(60)), None);
        l.set_blind(false, t0 + s(60));
        // Five seconds of the period were left when the watch broke; they are left now.
        assert!(l.is_live("node.a1", t0 + s(64)));
        assert!(!l.is_live("node.a1", t0 + s(65)));
    }
}
