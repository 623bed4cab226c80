//! What the cluster's leader does, as pure functions of state: which node gets which pod
//! CIDR, and which records of departed nodes may go. The leader's edge runs them and
//! writes the result fenced by its epoch; being pure, they are idempotent, so a new leader
//! that redoes its predecessor's half-finished work reaches the same result.

use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use trellis_model::PodCidrPool;

/// Pod CIDRs for the nodes in `needing`, in name order: each gets the lowest block of the
/// pool that overlaps nothing in `taken` and nothing handed out before it. Nodes left over
/// when the pool runs dry are left out (and logged by the caller).
pub fn allocate_pod_cidrs<'a>(
    pool: &PodCidrPool,
    needing: impl IntoIterator<Item = &'a str>,
    taken: impl IntoIterator<Item = IpNet>,
) -> Vec<(String, IpNet)> {
    let mut taken: Vec<IpNet> = taken.into_iter().collect();
    let needing: BTreeSet<&str> = needing.into_iter().collect();
    let Ok(mut blocks) = pool.cidr.subnets(pool.node_prefix) else {
        return Vec::new(); // an invalid pool: validation rejects it before this
    };
    let mut out = Vec::new();
    for node in needing {
        let Some(block) = blocks
            .by_ref()
            .find(|b| !taken.iter().any(|t| overlaps(t, b)))
        else {
            break;
        };
        taken.push(block);
        out.push((node.to_string(), block));
    }
    out
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A key the collector may delete, and the node it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Garbage {
    pub node: String,
    pub key: String,
}

/// The records of nodes whose agent has been gone (no status) for at least `gc_after_ms`:
/// keys that name a gone node anywhere in their path (`nodes/x`, `podcidrs/x`,
/// `observations/x/y`, `observations/y/x`, `paths/x/y`, `paths/y/x`), and records whose
/// value names it (a pod's node: left behind, its address would stay in other nodes'
/// selector sets once the node's pod CIDR serves a new node's pods).
///
/// Each record comes as its key and the node its value names, if any. `gone_since_ms`
/// holds, per node without status, when the leader first saw it so; time is the caller's
/// clock in milliseconds, so this function reads none.
pub fn collectable<'a>(
    records: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    gone_since_ms: &BTreeMap<String, u64>,
    now_ms: u64,
    gc_after_ms: u64,
) -> Vec<Garbage> {
    let expired: BTreeSet<&str> = gone_since_ms
        .iter()
        .filter(|(_, since)| now_ms.saturating_sub(**since) >= gc_after_ms)
        .map(|(node, _)| node.as_str())
        .collect();
    if expired.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<Garbage> = records
        .into_iter()
        .filter_map(|(key, named)| {
            let parsed = trellis_model::keys::Key::parse(key)?;
            let node = (parsed.owners().into_iter())
                .chain(named)
                .find(|owner| expired.contains(owner))?
                .to_string();
            Some(Garbage {
                node,
                key: key.to_string(),
            })
        })
        .collect();
    out.sort();
    out
}

/// Updates the leader's record of when each node was first seen without an agent: nodes
/// that came back are forgotten, newly gone ones start counting now.
pub fn track_gone<'a>(
    gone_since_ms: &mut BTreeMap<String, u64>,
    registered: impl IntoIterator<Item = &'a str>,
    live: &BTreeSet<String>,
    now_ms: u64,
) {
    let gone: BTreeSet<&str> = registered
        .into_iter()
        .filter(|n| !live.contains(*n))
        .collect();
    gone_since_ms.retain(|node, _| gone.contains(node.as_str()));
    for node in gone {
        gone_since_ms.entry(node.to_string()).or_insert(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str, node_prefix: u8) -> PodCidrPool {
        PodCidrPool {
            cidr: cidr.parse().unwrap(),
            node_prefix,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allocation_skips_taken_blocks_and_is_stable_by_name() {
        let got = allocate_pod_cidrs(
            &pool("10.244.0.0/16", 24),
            ["c", "a", "b"],
            [net("10.244.0.0/24"), net("10.244.2.0/23")],
        );
        assert_eq!(
            got,
            [
                ("a".to_string(), net("10.244.1.0/24")),
                ("b".to_string(), net("10.244.4.0/24")),
                ("c".to_string(), net("10.244.5.0/24")),
            ]
        );
        // A larger block taken inside the pool, and one that contains the whole pool.
        assert_eq!(
            allocate_pod_cidrs(&pool("10.0.0.0/30", 31), ["x"], [net("10.0.0.0/8")]),
            []
        );
    }

    #[test]
    fn allocation_stops_when_the_pool_runs_dry() {
        let got = allocate_pod_cidrs(&pool("10.0.0.0/30", 31), ["a", "b", "c"], []);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], ("b".to_string(), net("10.0.0.2/31")));
    }

    #[test]
    fn allocation_never_overlaps_for_any_taken_set() {
        // Exhaustive over every subset of 8 taken /27s and /26s in a /24 with /27 blocks.
        let candidates: Vec<IpNet> = [
            "10.0.0.0/27",
            "10.0.0.32/27",
            "10.0.0.64/26",
            "10.0.0.128/27",
            "10.0.0.160/27",
            "10.0.0.192/26",
            "10.0.0.0/26",
            "10.0.0.224/27",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        for mask in 0u32..(1 << candidates.len()) {
            let taken: Vec<IpNet> = (0..candidates.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| candidates[i])
                .collect();
            let got = allocate_pod_cidrs(
                &pool("10.0.0.0/24", 27),
                ["a", "b", "c", "d", "e", "f", "g", "h"],
                taken.clone(),
            );
            let mut all = taken.clone();
            for (_, block) in &got {
                assert!(
                    !all.iter().any(|t| overlaps(t, block)),
                    "{block} overlaps in {all:?}"
                );
                all.push(*block);
            }
            let free = 8
                - (0..8u8)
                    .filter(|i| {
                        let b = net(&format!("10.0.0.{}/27", i * 32));
                        taken.iter().any(|t| overlaps(t, &b))
                    })
                    .count();
            assert_eq!(got.len(), free, "every free block is used: {taken:?}");
        }
    }

    #[test]
    fn only_records_of_nodes_gone_long_enough_are_collected() {
        let keys = [
            "nodes/a1",
            "nodes/b1",
            "nodes/b10",
            "podcidrs/b1",
            "observations/a1/b1",
            "observations/b1/a2",
            "paths/a2/b1",
            "paths/a2/a3",
            "status/b1",
            "settings",
        ];
        let gone = BTreeMap::from([("b1".to_string(), 1_000), ("a1".to_string(), 5_000)]);
        let records = (keys.iter().map(|k| (*k, None)))
            .chain([("pods/shop/web", Some("b1")), ("pods/shop/db", Some("a2"))]);
        let got: Vec<String> = collectable(records.clone(), &gone, 11_000, 10_000)
            .into_iter()
            .map(|g| g.key)
            .collect();
        assert_eq!(
            got,
            [
                "nodes/b1",
                "observations/a1/b1",
                "observations/b1/a2",
                "paths/a2/b1",
                "podcidrs/b1",
                "pods/shop/web",
            ]
        );
        assert!(collectable(records, &gone, 10_999, 10_000).is_empty());
    }

    #[test]
    fn gone_tracking_restarts_when_a_node_comes_back() {
        let mut gone = BTreeMap::new();
        let live = BTreeSet::from(["a".to_string()]);
        track_gone(&mut gone, ["a", "b"], &live, 100);
        track_gone(&mut gone, ["a", "b"], &live, 200);
        assert_eq!(gone, BTreeMap::from([("b".to_string(), 100)]));
        let both = BTreeSet::from(["a".to_string(), "b".to_string()]);
        track_gone(&mut gone, ["a", "b"], &both, 300);
        assert!(gone.is_empty());
        track_gone(&mut gone, ["a", "b"], &live, 400);
        assert_eq!(gone["b"], 400);
    }
}
