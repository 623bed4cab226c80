//! Cluster state as read from the store: decoded, validated records and the revision they
//! reflect. The agent keeps one current with a list-then-watch loop that survives store
//! outages; commands take a single snapshot.

use crate::backoff::Backoff;
use crate::state_cache::StateCache;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_model::{
    AgentStatus, ClusterSettings, ExternalPeer, GatewaySet, Node, Observation, PathReport, decode,
    keys,
};
use trellis_plan::{Settings, Topology};
use trellis_store::{Event, KeyValue, Revision, Store, StoreError};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub revision: Revision,
    pub nodes: BTreeMap<String, Node>,
    pub peers: BTreeMap<String, ExternalPeer>,
    /// Stored gateway choice per location, with the record's mod revision for updates.
    pub gateways: BTreeMap<String, (GatewaySet, Revision)>,
    pub settings: Option<ClusterSettings>,
    pub status: BTreeMap<String, AgentStatus>,
    /// `observations[gateway][observer] = up`.
    pub observations: BTreeMap<String, BTreeMap<String, bool>>,
    /// `paths[(from, to)] = up`: direct tunnels as measured from one end.
    pub paths: BTreeMap<(String, String), bool>,
    /// Pod CIDRs the leader gave nodes that registered without one.
    pub pod_cidrs: BTreeMap<String, trellis_model::PodCidrAllocation>,
}

/// The part of the state a plan depends on; the agent re-plans only when it changes.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInputs {
    pub nodes: BTreeMap<String, Node>,
    pub peers: BTreeMap<String, ExternalPeer>,
    pub gateways: BTreeMap<String, trellis_plan::Slots>,
    pub settings: Settings,
    pub observations: BTreeMap<String, BTreeMap<String, bool>>,
    /// In liveness mode only: the nodes whose agent holds a status lease.
    pub live_agents: Option<std::collections::BTreeSet<String>>,
    /// Direct paths either end reports broken (forwarding mode only).
    pub broken_paths: std::collections::BTreeSet<(String, String)>,
}

impl ClusterState {
    pub fn from_list(kvs: &[KeyValue], revision: Revision) -> Self {
        let mut state = ClusterState {
            revision,
            ..Default::default()
        };
        for kv in kvs {
            state.put(kv);
        }
        state
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Put(kv) => self.put(kv),
            Event::Delete { key, .. } => self.delete(key),
        }
        self.revision = self.revision.max(event.revision());
    }

    /// Decode one record. A record that fails validation is dropped with a warning that
    /// names it: one bad write by someone else must not stop the mesh.
    fn put(&mut self, kv: &KeyValue) {
        let key = kv.key.as_str();
        let result = if let Some(name) = key.strip_prefix(keys::NODES) {
            decode::<Node>(&format!("node {name}"), &kv.value)
                .and_then(|n| same_name(key, name, &n.name).map(|_| n))
                .map(|n| {
                    self.nodes.insert(name.to_string(), n);
                })
        } else if let Some(name) = key.strip_prefix(keys::PEERS) {
            decode::<ExternalPeer>(&format!("peer {name}"), &kv.value)
                .and_then(|p| same_name(key, name, &p.name).map(|_| p))
                .map(|p| {
                    self.peers.insert(name.to_string(), p);
                })
        } else if let Some(location) = key.strip_prefix(keys::GATEWAYS) {
            decode::<GatewaySet>(&format!("gateways of {location}"), &kv.value).map(|g| {
                self.gateways
                    .insert(location.to_string(), (g, kv.mod_revision));
            })
        } else if let Some(name) = key.strip_prefix(keys::STATUS) {
            decode::<AgentStatus>(&format!("status of {name}"), &kv.value).map(|s| {
                self.status.insert(name.to_string(), s);
            })
        } else if let Some(pair) = key.strip_prefix(keys::OBSERVATIONS) {
            decode::<Observation>(&format!("observation {pair}"), &kv.value).and_then(|o| {
                if pair != format!("{}/{}", o.gateway, o.observer) {
                    return Err(trellis_model::InvalidField::new(
                        "observation",
                        pair,
                        "does not match its key",
                    ));
                }
                self.observations
                    .entry(o.gateway)
                    .or_default()
                    .insert(o.observer, o.up);
                Ok(())
            })
        } else if let Some(pair) = key.strip_prefix(keys::PATHS) {
            decode::<PathReport>(&format!("path {pair}"), &kv.value).and_then(|p| {
                if pair != format!("{}/{}", p.from, p.to) {
                    return Err(trellis_model::InvalidField::new(
                        "path",
                        pair,
                        "does not match its key",
                    ));
                }
                self.paths.insert((p.from, p.to), p.up);
                Ok(())
            })
        } else if let Some(name) = key.strip_prefix(keys::POD_CIDRS) {
            decode::<trellis_model::PodCidrAllocation>(&format!("pod CIDR of {name}"), &kv.value)
                .and_then(|a| same_name(key, name, &a.node).map(|_| a))
                .map(|a| {
                    self.pod_cidrs.insert(name.to_string(), a);
                })
        } else if key == keys::SETTINGS {
            decode::<ClusterSettings>("cluster settings", &kv.value).map(|s| {
                self.settings = Some(s);
            })
        } else {
            Ok(())
        };
        if let Err(e) = result {
            tracing::warn!(
                key,
                revision = kv.mod_revision,
                "ignoring invalid record: {e}"
            );
            self.delete(key);
        }
    }

    fn delete(&mut self, key: &str) {
        if let Some(name) = key.strip_prefix(keys::NODES) {
            self.nodes.remove(name);
        } else if let Some(name) = key.strip_prefix(keys::PEERS) {
            self.peers.remove(name);
        } else if let Some(location) = key.strip_prefix(keys::GATEWAYS) {
            self.gateways.remove(location);
        } else if let Some(name) = key.strip_prefix(keys::STATUS) {
            self.status.remove(name);
        } else if let Some((gateway, observer)) = key
            .strip_prefix(keys::OBSERVATIONS)
            .and_then(|p| p.split_once('/'))
        {
            if let Some(seen) = self.observations.get_mut(gateway) {
                seen.remove(observer);
                if seen.is_empty() {
                    self.observations.remove(gateway);
                }
            }
        } else if let Some((from, to)) = key
            .strip_prefix(keys::PATHS)
            .and_then(|p| p.split_once('/'))
        {
            self.paths.remove(&(from.to_string(), to.to_string()));
        } else if let Some(name) = key.strip_prefix(keys::POD_CIDRS) {
            self.pod_cidrs.remove(name);
        } else if key == keys::SETTINGS {
            self.settings = None;
        }
    }

    /// The planner settings: the stored ones, else `defaults`.
    pub fn plan_settings(&self, defaults: &Settings) -> Settings {
        match &self.settings {
            Some(s) => Settings {
                granularity: s.granularity,
                gateways_per_location: s.gateways_per_location,
                persistent_keepalive: s.persistent_keepalive,
            },
            None => defaults.clone(),
        }
    }

    pub fn plan_inputs(&self, defaults: &Settings) -> PlanInputs {
        let liveness = matches!(
            self.settings.as_ref().map(|s| s.gateway_health),
            Some(trellis_model::GatewayHealth::Liveness)
        );
        PlanInputs {
            broken_paths: if liveness {
                Default::default()
            } else {
                self.paths
                    .iter()
                    .filter(|(_, up)| !**up)
                    .map(|((from, to), _)| (from.clone(), to.clone()))
                    .collect()
            },
            nodes: self.nodes_with_allocations(),
            peers: self.peers.clone(),
            gateways: self
                .gateways
                .iter()
                .map(|(loc, (g, _))| (loc.clone(), g.slots.clone()))
                .collect(),
            settings: self.plan_settings(defaults),
            observations: self.observations.clone(),
            live_agents: liveness.then(|| self.status.keys().cloned().collect()),
        }
    }
}

impl ClusterState {
    /// The nodes, each without a pod CIDR of its own given the one the leader allocated,
    /// if that still makes a valid node.
    fn nodes_with_allocations(&self) -> BTreeMap<String, Node> {
        let mut nodes = self.nodes.clone();
        for (name, node) in nodes.iter_mut() {
            let Some(allocation) = self.pod_cidrs.get(name) else {
                continue;
            };
            if !node.pod_cidrs.is_empty() {
                continue;
            }
            let mut with = node.clone();
            with.pod_cidrs = vec![allocation.cidr];
            match trellis_model::Validate::validate(&with) {
                Ok(()) => *node = with,
                Err(e) => tracing::warn!(node = %name, "ignoring allocated pod CIDR: {e}"),
            }
        }
        nodes
    }
}

impl PlanInputs {
    /// The gateway candidates that a majority of their observers measure down (or, in
    /// liveness mode, whose agent's lease has expired).
    pub fn measured_down(&self) -> std::collections::BTreeSet<String> {
        if let Some(live) = &self.live_agents {
            return trellis_plan::health::candidates(self.nodes.values())
                .into_iter()
                .filter(|n| !live.contains(&n.name))
                .map(|n| n.name.clone())
                .collect();
        }
        trellis_plan::health::verdicts(self.nodes.values(), &self.observations)
            .into_iter()
            .filter(|(_, v)| *v == trellis_plan::health::Verdict::Down)
            .map(|(g, _)| g)
            .collect()
    }

    pub fn topology(&self) -> Topology {
        Topology::build_with_health(
            self.settings.clone(),
            self.nodes.values().cloned(),
            self.peers.values().cloned(),
            &self.gateways,
            &self.measured_down(),
        )
        .with_broken_paths(
            self.broken_paths
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str())),
        )
    }
}

fn same_name(
    key: &str,
    from_key: &str,
    in_record: &str,
) -> Result<(), trellis_model::InvalidField> {
    if from_key == in_record {
        Ok(())
    } else {
        Err(trellis_model::InvalidField::new(
            "name",
            in_record,
            format!("does not match its key {key:?}"),
        ))
    }
}

/// One consistent snapshot of the cluster.
pub async fn load(store: &dyn Store) -> anyhow::Result<ClusterState> {
    let (kvs, revision) = store.list("").await?;
    Ok(ClusterState::from_list(&kvs, revision))
}

/// Keep `tx` current forever: list, then watch from the listing's revision; after any
/// failure wait (jittered backoff) and resume the watch from the last revision seen, so a
/// reconnect does not re-list unless the store compacted that revision away. While the
/// store is unreachable the last state stays published: the data plane keeps running on it.
///
/// With a `cache`, the records are also kept on disk (at most once a second), and when the
/// first listing fails the cached state is published meanwhile, so an agent started during
/// an outage plans from what it last knew. The store is listed afresh once it answers.
pub async fn sync_forever(
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<ClusterState>>,
    cache: Option<StateCache>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut synced: Option<Synced> = None;
    let mut cache_tried = false;
    loop {
        let result = match synced.as_mut() {
            None => match store.list("").await {
                Ok((kvs, revision)) => {
                    let s = Synced::from_list(kvs, revision);
                    tx.send_replace(Arc::new(s.state.clone()));
                    synced = Some(s);
                    continue;
                }
                Err(e) => Err(anyhow::Error::from(e)),
            },
            Some(s) => follow(store.as_ref(), s, &tx, &mut backoff, cache.as_ref()).await,
        };
        if let Err(e) = result {
            if let Some(StoreError::Compacted { .. }) = e.downcast_ref::<StoreError>() {
                tracing::info!("store history compacted past our revision; re-listing");
                synced = None;
            }
            if synced.is_none() && !cache_tried {
                cache_tried = true;
                publish_cached(cache.as_ref(), &tx);
            }
            let delay = backoff.next_delay();
            tracing::warn!(retry_in = ?delay, "cluster state sync: {e:#}");
            tokio::time::sleep(delay).await;
        }
    }
}

/// The state and the raw records it was decoded from (what the cache keeps).
struct Synced {
    state: ClusterState,
    records: BTreeMap<String, KeyValue>,
}

impl Synced {
    fn from_list(kvs: Vec<KeyValue>, revision: Revision) -> Self {
        Self {
            state: ClusterState::from_list(&kvs, revision),
            records: kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
        }
    }

    fn apply(&mut self, event: &Event) {
        self.state.apply(event);
        match event {
            Event::Put(kv) => {
                self.records.insert(kv.key.clone(), kv.clone());
            }
            Event::Delete { key, .. } => {
                self.records.remove(key);
            }
        }
    }
}

/// Publishes the cached state, if there is one and nothing was read from the store yet.
fn publish_cached(cache: Option<&StateCache>, tx: &watch::Sender<Arc<ClusterState>>) {
    let Some(cache) = cache else { return };
    match cache.load() {
        Ok(Some((kvs, revision))) if tx.borrow().revision == 0 => {
            let state = ClusterState::from_list(&kvs, revision);
            tracing::warn!(
                revision,
                nodes = state.nodes.len(),
                cache = %cache.path().display(),
                "store unreachable at start: planning from the last known state"
            );
            tx.send_replace(Arc::new(state));
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("state cache not used: {e:#}"),
    }
}

async fn follow(
    store: &dyn Store,
    synced: &mut Synced,
    tx: &watch::Sender<Arc<ClusterState>>,
    backoff: &mut Backoff,
    cache: Option<&StateCache>,
) -> anyhow::Result<()> {
    const SAVE_EVERY: Duration = Duration::from_secs(1);
    let mut watch = store.watch("", synced.state.revision).await?;
    backoff.reset();
    // A fresh listing or a resumed watch may have changed things: save once at the start.
    let mut unsaved = true;
    let mut last_save: Option<tokio::time::Instant> = None;
    let ended = loop {
        let save_at = last_save.map_or_else(tokio::time::Instant::now, |t| t + SAVE_EVERY);
        let event = tokio::select! {
            event = watch.next() => event,
            _ = tokio::time::sleep_until(save_at), if unsaved && cache.is_some() => {
                save(cache, synced).await;
                unsaved = false;
                last_save = Some(tokio::time::Instant::now());
                continue;
            }
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => break anyhow::Error::from(e),
            None => break anyhow::anyhow!("watch ended"),
        };
        synced.apply(&event);
        // Coalesce a burst of events into one publication.
        let mut broken = None;
        while let Ok(Some(more)) = tokio::time::timeout(Duration::ZERO, watch.next()).await {
            match more {
                Ok(more) => synced.apply(&more),
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        tx.send_replace(Arc::new(synced.state.clone()));
        unsaved = true;
        if let Some(e) = broken {
            break anyhow::Error::from(e);
        }
    };
    // The store just went away, which is when the latest state matters most.
    if unsaved {
        save(cache, synced).await;
    }
    Err(ended)
}

/// Writes the cache off the async threads; a failure is logged, never fatal, and a disk
/// that hangs costs the sync loop a few seconds, not its life.
async fn save(cache: Option<&StateCache>, synced: &Synced) {
    const SAVE_TIMEOUT: Duration = Duration::from_secs(5);
    let Some(cache) = cache.cloned() else { return };
    let (records, revision) = (synced.records.clone(), synced.state.revision);
    let saving = tokio::task::spawn_blocking(move || cache.save(&records, revision));
    match tokio::time::timeout(SAVE_TIMEOUT, saving).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!("saving the state cache: {e:#}"),
        Ok(Err(e)) => tracing::warn!("saving the state cache: {e}"),
        Err(_) => tracing::warn!(
            "saving the state cache: no answer from the disk within {SAVE_TIMEOUT:?}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, rev: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: None,
        }
    }

    #[test]
    fn invalid_records_are_dropped_not_fatal() {
        let good = r#"{"name":"a1","location":"site-a","internal_ip":"172.20.0.2/24","listen_port":51820,"overlay_ip":"100.64.0.1"}"#;
        let renamed = good.replace("\"a1\"", "\"zz\"");
        let mut state = ClusterState::from_list(
            &[
                kv("nodes/a1", good, 2),
                kv("nodes/a2", &renamed, 3),
                kv("nodes/a3", "{not json", 4),
                kv(
                    "settings",
                    r#"{"granularity":"mesh","gateways_per_location":1}"#,
                    5,
                ),
            ],
            5,
        );
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), ["a1"]);
        assert!(state.settings.is_none());
        // a later invalid update removes the previously valid record instead of keeping
        // stale data that its owner no longer stands behind
        state.apply(&Event::Put(kv("nodes/a1", "{}", 6)));
        assert!(state.nodes.is_empty());
        assert_eq!(state.revision, 6);
    }

    #[test]
    fn path_reports_break_pairs_only_when_valid_and_in_forwarding_mode() {
        let report = |from: &str, to: &str, up: bool| {
            format!(r#"{{"from":"{from}","to":"{to}","up":{up}}}"#)
        };
        let mut state = ClusterState::from_list(
            &[
                kv("paths/a1/b1", &report("a1", "b1", false), 1),
                kv("paths/a2/b2", &report("a2", "b2", true), 2),
                kv("paths/a3/b3", &report("a9", "b3", false), 3), // key and record disagree
                kv("paths/a4/a4", &report("a4", "a4", false), 4), // not a path
            ],
            4,
        );
        let defaults = Settings {
            granularity: trellis_model::Granularity::Full,
            gateways_per_location: 2,
            persistent_keepalive: None,
        };
        let broken = |s: &ClusterState| s.plan_inputs(&defaults).broken_paths;
        assert_eq!(
            broken(&state),
            [("a1".to_string(), "b1".to_string())].into()
        );
        state.apply(&Event::Delete {
            key: "paths/a1/b1".into(),
            revision: 5,
        });
        assert!(broken(&state).is_empty(), "an expired lease heals the path");
        state.apply(&Event::Put(kv(
            "paths/b1/a1",
            &report("b1", "a1", false),
            6,
        )));
        state.apply(&Event::Put(kv(
            "settings",
            r#"{"granularity":"full","gateways_per_location":2,"gateway_health":"liveness"}"#,
            7,
        )));
        assert!(
            broken(&state).is_empty(),
            "the liveness baseline measures nothing"
        );
    }

    /// An agent started during a store outage plans from its cache; records in the cache
    /// go through the same validation as records from the store.
    #[tokio::test]
    async fn an_unreachable_store_at_start_publishes_the_cached_state() {
        let good = r#"{"name":"a1","location":"site-a","internal_ip":"172.20.0.2/24","listen_port":51820,"overlay_ip":"100.64.0.1"}"#;
        let dir = std::env::temp_dir().join(format!("trellis-sync-cache-{}", std::process::id()));
        let cache = StateCache::new(dir.join("state.json"));
        let records: BTreeMap<String, KeyValue> = [
            ("nodes/a1".to_string(), kv("nodes/a1", good, 40)),
            ("nodes/a2".to_string(), kv("nodes/a2", "{damaged", 41)),
        ]
        .into();
        cache.save(&records, 42).unwrap();
        let store = Arc::new(trellis_store::remote::RemoteStore::connect(
            dir.join("no-store.sock"),
            Duration::from_millis(200),
        ));
        let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
        let sync = tokio::spawn(sync_forever(store, tx, Some(cache)));
        let state = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.revision == 42))
            .await
            .expect("the cached state is published")
            .unwrap()
            .clone();
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), ["a1"]);
        sync.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
