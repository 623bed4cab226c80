//! Gateway health from measured forwarding, as pure functions.
//!
//! Every gateway candidate (active or standby) is watched by a few observers. An observer
//! sends probes to the candidate's probe address; the candidate's kernel relays each probe to
//! a node behind it (DNAT) and the answer back (SNAT), so a probe crosses the candidate's
//! forwarding path in both directions, as a new flow every time. Each observer runs a
//! [`Detector`] (fast down, slow up, damped flapping) and publishes only its stable opinion.
//! [`verdict`] combines the observers' opinions: a majority must agree before a gateway is
//! declared down, so one observer whose own link broke cannot demote a healthy gateway.
//!
//! Probe load is candidates × observers, not nodes²: observers are few and chosen
//! deterministically, from other locations first.

use crate::by_location;
use crate::gateways::{any_public_eligible, combine, combine_rotated, name_hash, qualifies};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use trellis_model::Node;

/// Observers per gateway candidate, when that many exist.
pub const OBSERVERS_PER_GATEWAY: usize = 3;
/// Nodes behind a candidate that its probes are relayed to; a round succeeds if any answers.
pub const TARGETS_PER_GATEWAY: usize = 3;
/// ICMP echo ids are split into this many equal ranges, one per relay target.
pub const ID_RANGES: u16 = 4;
pub const ID_RANGE_SIZE: u16 = u16::MAX / ID_RANGES + 1;
/// The id range no gateway relays (there are fewer relay targets than ranges): probes of
/// a direct path use it, so the peer answers them itself.
pub const UNRELAYED_ID_RANGE: usize = ID_RANGES as usize - 1;

/// Nodes that can serve as gateway of their location and take part in probing. Probed
/// whether they serve now or stand by, so a replacement is chosen on measured health.
pub fn candidates<'a>(nodes: impl IntoIterator<Item = &'a Node> + Clone) -> Vec<&'a Node> {
    candidates_in(&by_location(nodes)).collect()
}

/// [`candidates`] from the nodes grouped by location (see [`by_location`]).
pub(crate) fn candidates_in<'a, 'b>(
    by_location: &'b [(&'a str, Vec<&'a Node>)],
) -> impl Iterator<Item = &'a Node> + 'b {
    by_location.iter().flat_map(|(_, members)| {
        let any_public = any_public_eligible(members);
        members
            .iter()
            .filter(move |m| m.probe_ip.is_some() && qualifies(any_public, m))
            .copied()
    })
}

/// Up to `k` observers of `gateway`: nodes with a probe address that can reach it (same
/// location, or both public), nodes of other locations before its own, spread over as many
/// locations as possible, ranked within a location by a hash of the pair. Deterministic.
///
/// To choose the observers of many gateways, build an [`ObserverPool`] once instead.
pub fn observers_for<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    gateway: &Node,
    k: usize,
) -> Vec<String> {
    ObserverPool::new(nodes).observers_for(gateway, k)
}

/// A node with the [`name_hash`] of its name.
type Hashed<'a> = (u64, &'a Node);

/// The nodes observers are chosen from, grouped by location once, so that choosing the
/// observers of every candidate costs a pass over the locations each, not over all nodes.
pub struct ObserverPool<'a> {
    /// Nodes with a probe address, by location (in name order), in the order given, each
    /// with its name's hash.
    by_location: Vec<(&'a str, Vec<Hashed<'a>>)>,
    /// The public ones among them, for each location that has one.
    public: Vec<(&'a str, Vec<Hashed<'a>>)>,
    /// Those locations' name hashes, rotated for [`combine_rotated`]: what ranking the
    /// locations for every candidate reads, kept apart so that the loop reads little.
    public_hashes: Vec<u64>,
}

impl<'a> ObserverPool<'a> {
    pub fn new(nodes: impl IntoIterator<Item = &'a Node>) -> Self {
        Self::from_groups(&by_location(nodes))
    }

    /// From the nodes grouped by location (see [`by_location`]).
    pub(crate) fn from_groups(groups: &[(&'a str, Vec<&'a Node>)]) -> Self {
        let by_location: Vec<(&str, Vec<Hashed>)> = (groups.iter())
            .map(|(location, members)| {
                let probing = members.iter().filter(|n| n.probe_ip.is_some());
                let hashed = probing.map(|n| (name_hash(&n.name), *n));
                (*location, hashed.collect::<Vec<_>>())
            })
            .filter(|(_, members)| !members.is_empty())
            .collect();
        let public: Vec<(&str, Vec<Hashed>)> = (by_location.iter())
            .filter_map(|(location, members)| {
                let public: Vec<Hashed> = members
                    .iter()
                    .filter(|(_, n)| n.is_public())
                    .copied()
                    .collect();
                (!public.is_empty()).then_some((*location, public))
            })
            .collect();
        let public_hashes = (public.iter())
            .map(|(location, _)| name_hash(location).rotate_left(29))
            .collect();
        Self {
            by_location,
            public,
            public_hashes,
        }
    }

    /// [`observers_for`] from this pool.
    pub fn observers_for(&self, gateway: &Node, k: usize) -> Vec<String> {
        let g = name_hash(&gateway.name);
        let not_itself = |(_, n): &&Hashed| n.name != gateway.name;
        // Within a location, members rank by the hash of the pair, then name (descending).
        let rank = |&(h, n): &Hashed<'a>| Reverse((combine(g, h), n.name.as_str()));
        // Other locations (those the gateway reaches: both ends public), best first by the
        // pair hash of gateway and location, then name. Round-robin over them fills `k`
        // from the best `k` alone, so only those are kept: one pass over the locations.
        let mut best: Vec<(Reverse<u64>, &str, &[Hashed])> = Vec::with_capacity(k + 1);
        if gateway.is_public() && k > 0 {
            // Weights below it cannot make the best `k` (none, until there are `k`).
            let mut floor = 0;
            for (i, hash) in self.public_hashes.iter().enumerate() {
                let weight = combine_rotated(g, *hash);
                if weight < floor {
                    continue; // the common case, decided without comparing names
                }
                let (location, members) = &self.public[i];
                let rank = (Reverse(weight), *location);
                if best.len() == k && rank >= (best[k - 1].0, best[k - 1].1) {
                    continue;
                }
                if *location == gateway.location || !members.iter().any(|m| not_itself(&m)) {
                    continue;
                }
                let at = best.partition_point(|(w, l, _)| (*w, *l) < rank);
                best.insert(at, (rank.0, rank.1, members));
                best.truncate(k);
                if best.len() == k {
                    floor = best[k - 1].0.0;
                }
            }
        }
        if best.len() == k {
            // The first round fills `k`: the best member of each of those locations (the
            // first of equals, as the stable sort below would rank them).
            return (best.iter())
                .filter_map(|(_, _, members)| {
                    members.iter().filter(not_itself).min_by_key(|m| rank(m))
                })
                .map(|(_, n)| n.name.clone())
                .collect();
        }
        let ranked = |members: &[Hashed<'a>]| -> Vec<&'a Node> {
            let mut ranked: Vec<&Hashed<'a>> = members.iter().filter(not_itself).collect();
            ranked.sort_by_key(|m| rank(m));
            ranked.into_iter().map(|(_, n)| *n).collect()
        };
        let mut groups: Vec<Vec<&Node>> = best.iter().map(|(_, _, m)| ranked(m)).collect();
        // The gateway's own location comes last, so it takes part only when the others
        // cannot fill `k` in the first round.
        if let Ok(i) =
            (self.by_location).binary_search_by(|(l, _)| (*l).cmp(gateway.location.as_str()))
        {
            let own = ranked(&self.by_location[i].1);
            if !own.is_empty() {
                groups.push(own);
            }
        }
        let mut chosen = Vec::with_capacity(k);
        let mut round = 0;
        while chosen.len() < k {
            let mut progressed = false;
            for members in &groups {
                if chosen.len() == k {
                    break;
                }
                if let Some(n) = members.get(round) {
                    chosen.push(n.name.clone());
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
            round += 1;
        }
        chosen
    }
}

/// The nodes behind `gateway` that its probes are relayed to: up to `k` of its location's
/// other members, ranked by a hash of the pair. Empty for a location of one.
pub fn relay_targets<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    gateway: &Node,
    k: usize,
) -> Vec<(String, IpAddr)> {
    let g = name_hash(&gateway.name);
    let mut mates: Vec<&'a Node> = nodes
        .into_iter()
        .filter(|n| n.location == gateway.location && n.name != gateway.name)
        .collect();
    mates.sort_by_cached_key(|n: &&'a Node| {
        let n: &'a Node = n;
        Reverse((combine(g, name_hash(&n.name)), n.name.as_str()))
    });
    mates
        .into_iter()
        .take(k.min(UNRELAYED_ID_RANGE))
        .map(|n| (n.name.clone(), n.internal_ip.addr()))
        .collect()
}

/// The ICMP echo ids that a gateway relays to its `index`-th target.
pub fn id_range(index: usize) -> (u16, u16) {
    let lo = ID_RANGE_SIZE * index as u16;
    (lo, lo + (ID_RANGE_SIZE - 1))
}

/// The combined opinion of a gateway's observers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Up,
    Down,
    /// No observer has reported: treated as up (a new cluster must not start without
    /// gateways), and shown as unknown.
    Unknown,
}

/// A gateway is down when more than half of its reporting observers say so, and at least
/// two agree whenever two or more report. One observer alone decides only when it is the
/// only one there is.
pub fn verdict(reports: impl IntoIterator<Item = bool>) -> Verdict {
    let (mut up, mut down) = (0usize, 0usize);
    for r in reports {
        if r { up += 1 } else { down += 1 }
    }
    let total = up + down;
    if total == 0 {
        Verdict::Unknown
    } else if down * 2 > total && (down >= 2 || total == 1) {
        Verdict::Down
    } else {
        Verdict::Up
    }
}

/// Verdicts for every candidate from the published observations
/// (`reports[gateway][observer] = up`), counting only the observers currently assigned.
pub fn verdicts<'a>(
    nodes: impl IntoIterator<Item = &'a Node> + Clone,
    reports: &BTreeMap<String, BTreeMap<String, bool>>,
) -> BTreeMap<String, Verdict> {
    let groups = by_location(nodes);
    let pool = ObserverPool::from_groups(&groups);
    candidates_in(&groups)
        .map(|g| {
            let observers: BTreeSet<String> = pool
                .observers_for(g, OBSERVERS_PER_GATEWAY)
                .into_iter()
                .collect();
            let opinions = reports
                .get(&g.name)
                .into_iter()
                .flatten()
                .filter(|(o, _)| observers.contains(*o))
                .map(|(_, up)| *up);
            (g.name.clone(), verdict(opinions))
        })
        .collect()
}

/// How an observer turns probe rounds into a stable opinion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Consecutive failed rounds before "down" (BFD's detection multiplier).
    pub multiplier: u32,
    /// How long a gateway must answer every round before it counts as up again.
    pub hold_down_ms: u64,
    /// Penalty added per down transition; above `suppress` the gateway stays down until the
    /// penalty decays below `reuse` (RFC 2439 route flap damping, on gateways).
    pub flap_penalty: u32,
    pub suppress: u32,
    pub reuse: u32,
    pub half_life_ms: u64,
    /// Failures do not count until the first answer or until this long after the detector
    /// was created: a path still being set up (routes programmed, handshakes in flight) is
    /// not a failed path. A gateway that never answers is declared down after it.
    pub startup_grace_ms: u64,
}

/// WireGuard retries a handshake that got no answer after REKEY_TIMEOUT (5 s) plus up to
/// a third of a second of jitter. The first initiation between two agents is lost whenever
/// the observer configures the peer before the gateway does (the gateway drops initiations
/// from keys it does not know yet), so a new path may stay silent this long for nothing.
pub const HANDSHAKE_RETRY_MS: u64 = 5_000 + 334;

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            multiplier: 3,
            hold_down_ms: 5_000,
            flap_penalty: 1_000,
            suppress: 2_500,
            reuse: 800,
            half_life_ms: 30_000,
            // One lost handshake initiation, its retry and a round trip, with room: seen
            // in the lab as a lone false "down" 5.3 s after start with a 5 s grace.
            startup_grace_ms: 7_000,
        }
    }
}

/// One observer's view of one gateway. Time comes in as milliseconds from the caller, so
/// the state machine is deterministic and tested without clocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Detector {
    config: DetectorConfig,
    up: bool,
    failures: u32,
    healthy_since: Option<u64>,
    penalty: f64,
    penalty_at: u64,
    created_at: u64,
    armed: bool,
}

impl Detector {
    /// A new detector starts out "up": a gateway is innocent until probes say otherwise.
    pub fn new(config: DetectorConfig, now_ms: u64) -> Self {
        Self {
            config,
            up: true,
            failures: 0,
            healthy_since: Some(now_ms),
            penalty: 0.0,
            penalty_at: now_ms,
            created_at: now_ms,
            armed: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn penalty(&self, now_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(self.penalty_at) as f64;
        self.penalty * 0.5f64.powf(elapsed / self.config.half_life_ms.max(1) as f64)
    }

    /// Feed one probe round. Returns the new opinion when it changed.
    pub fn observe(&mut self, now_ms: u64, success: bool) -> Option<bool> {
        if success {
            self.armed = true;
            self.failures = 0;
            let since = *self.healthy_since.get_or_insert(now_ms);
            let held = now_ms.saturating_sub(since) >= self.config.hold_down_ms;
            let damped =
                self.penalty(now_ms) > f64::from(self.config.reuse) && self.suppressed(now_ms);
            if !self.up && held && !damped {
                self.up = true;
                return Some(true);
            }
            None
        } else {
            if !self.armed {
                if now_ms.saturating_sub(self.created_at) < self.config.startup_grace_ms {
                    return None;
                }
                self.armed = true;
            }
            self.healthy_since = None;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.config.multiplier {
                self.up = false;
                self.penalty = self.penalty(now_ms) + f64::from(self.config.flap_penalty);
                self.penalty_at = now_ms;
                return Some(false);
            }
            None
        }
    }

    /// Suppressed once the penalty crossed `suppress`, until it decays below `reuse`.
    fn suppressed(&self, now_ms: u64) -> bool {
        // The penalty only grows at down transitions, so it peaked at `penalty_at`.
        self.penalty >= f64::from(self.config.suppress)
            && self.penalty(now_ms) > f64::from(self.config.reuse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_needs_a_majority_of_at_least_two() {
        assert_eq!(verdict([]), Verdict::Unknown);
        assert_eq!(verdict([false]), Verdict::Down, "a lone observer decides");
        assert_eq!(verdict([true]), Verdict::Up);
        assert_eq!(
            verdict([false, true]),
            Verdict::Up,
            "one of two cannot demote"
        );
        assert_eq!(verdict([false, false]), Verdict::Down);
        assert_eq!(
            verdict([false, true, true]),
            Verdict::Up,
            "one broken observer of three"
        );
        assert_eq!(verdict([false, false, true]), Verdict::Down);
        assert_eq!(
            verdict([false, false, true, true]),
            Verdict::Up,
            "a split is not a majority"
        );
    }

    #[test]
    fn partial_partitions() {
        // An observer whose own link broke sees every gateway it probes as down; each of
        // those gateways still has two observers that see it forward.
        for _gateway in ["a1", "a2", "b1"] {
            assert_eq!(verdict([false, true, true]), Verdict::Up);
        }
        // A gateway cut off from the other locations but not from its own: the two
        // observers from elsewhere see it fail, its location-mate does not. Traffic from
        // other locations cannot get through it, so it must go.
        assert_eq!(verdict([false, false, true]), Verdict::Down);
        // Two observers left after a third went away, and they disagree: no majority.
        assert_eq!(verdict([false, true]), Verdict::Up);
        // Both observers of a location cut off from a gateway in a two-node world.
        assert_eq!(verdict([false, false]), Verdict::Down);
    }

    /// A detector that has seen the path work once, as every one in the tests below.
    fn detector() -> Detector {
        let mut d = Detector::new(DetectorConfig::default(), 0);
        d.observe(0, true);
        d
    }

    #[test]
    fn failures_while_the_path_is_set_up_do_not_count() {
        let config = DetectorConfig::default();
        let grace = config.startup_grace_ms;
        assert!(
            grace >= HANDSHAKE_RETRY_MS + 1_000,
            "a path whose first handshake initiation was lost answers after the retry"
        );
        let mut d = Detector::new(config, 0);
        for t in (100..grace).step_by(100) {
            assert_eq!(d.observe(t, false), None, "grace at {t}");
        }
        assert!(d.is_up());
        // a path that never answered is declared down once the grace is over
        d.observe(grace, false);
        d.observe(grace + 100, false);
        assert_eq!(d.observe(grace + 200, false), Some(false));
        // and a path that answered once is judged at once
        let mut d = Detector::new(DetectorConfig::default(), 0);
        d.observe(100, true);
        d.observe(200, false);
        d.observe(300, false);
        assert_eq!(d.observe(400, false), Some(false));
    }

    #[test]
    fn goes_down_after_multiplier_failures_and_not_before() {
        let mut d = detector();
        assert_eq!(d.observe(100, false), None);
        assert_eq!(d.observe(200, false), None);
        assert_eq!(d.observe(300, true), None, "a success resets the count");
        assert_eq!(d.observe(400, false), None);
        assert_eq!(d.observe(500, false), None);
        assert_eq!(d.observe(600, false), Some(false));
        assert_eq!(d.observe(700, false), None, "reported once");
    }

    #[test]
    fn comes_back_only_after_the_hold_down() {
        let mut d = detector();
        for t in [100, 200, 300] {
            d.observe(t, false);
        }
        assert!(!d.is_up());
        for t in (400..5_400).step_by(100) {
            assert_eq!(d.observe(t, true), None, "still holding at {t}");
        }
        assert_eq!(d.observe(5_400, true), Some(true));
        // a single failure during hold-down restarts it
        let mut d = detector();
        for t in [100, 200, 300] {
            d.observe(t, false);
        }
        d.observe(400, true);
        d.observe(3_000, false);
        assert_eq!(d.observe(3_100, true), None);
        assert_eq!(d.observe(5_400, true), None, "hold-down restarted at 3.1 s");
        assert_eq!(d.observe(8_100, true), Some(true));
    }

    #[test]
    fn a_flapping_gateway_is_damped_until_the_penalty_decays() {
        let config = DetectorConfig::default();
        let mut d = Detector::new(config, 0);
        d.observe(0, true);
        let mut t = 0;
        // flap three times: down, held up, down...
        for _ in 0..3 {
            for _ in 0..3 {
                t += 100;
                d.observe(t, false);
            }
            assert!(!d.is_up());
            t += 100;
            d.observe(t, true);
            t += config.hold_down_ms;
            d.observe(t, true);
        }
        // after the third down the penalty (~3000 minus decay) exceeds suppress (2500):
        assert!(
            !d.is_up(),
            "third recovery suppressed, penalty {}",
            d.penalty(t)
        );
        // it comes back once the penalty has decayed below reuse (800): about 2 half-lives
        let mut back_at = None;
        while back_at.is_none() && t < 300_000 {
            t += 1_000;
            if d.observe(t, true) == Some(true) {
                back_at = Some(t);
            }
        }
        let back_at = back_at.expect("damping must end");
        assert!(d.penalty(back_at) <= f64::from(config.reuse) + 1.0);
        assert!(back_at > 40_000, "came back after {back_at} ms");
    }

    #[test]
    fn probe_id_ranges_tile_the_id_space() {
        assert_eq!(id_range(0), (0, 0x3fff));
        assert_eq!(id_range(3), (0xc000, 0xffff));
    }
}
