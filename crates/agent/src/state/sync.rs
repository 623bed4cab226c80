//! Keeping a cluster state current: list, then watch, forever, through store outages.

use super::ClusterState;
use super::cache::StateCache;
use crate::backoff::Backoff;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_store::{Event, KeyValue, Revision, Store, StoreError};

/// Keep `tx` current forever: list, then watch from the listing's revision; after any
/// failure wait (jittered backoff) and resume the watch from the last revision seen, so a
/// reconnect does not re-list unless the store compacted that revision away. While the
/// store is unreachable the last state stays published: the data plane keeps running on it.
///
/// With a `cache`, the records are also kept on disk (at most once a second), and when the
/// first listing fails or has not answered within [`CACHE_GRACE`] the cached state is
/// published meanwhile, so an agent started during an outage plans from what it last knew
/// at once, not after a store call's whole timeout (seed 003: a cold boot with the store
/// down). The store is listed afresh once it answers.
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
            None => {
                match first_listing(store.as_ref(), cache.as_ref(), &tx, &mut cache_tried).await {
                    Ok((mut kvs, revision)) => {
                        kvs.retain(|kv| !is_workload_state(&kv.key));
                        let s = Synced::from_list(kvs, revision);
                        tx.send_replace(Arc::new(s.state.clone()));
                        synced = Some(s);
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            Some(s) => follow(store.as_ref(), s, &tx, &mut backoff, cache.as_ref()).await,
        };
        if let Err(e) = result {
            if let StoreError::Compacted { .. } = e {
                tracing::info!("store history compacted past our revision; re-listing");
                synced = None;
            }
            if synced.is_none() && !cache_tried {
                cache_tried = true;
                publish_cached(cache.as_ref(), &tx);
            }
            let delay = backoff.next_delay();
            tracing::warn!(retry_in = ?delay, "cluster state sync: {e}");
            tokio::time::sleep(delay).await;
        }
    }
}

/// How long the first listing may take before the cached state is published meanwhile: a
/// store that answers at all answers well within it.
pub const CACHE_GRACE: Duration = Duration::from_millis(500);

/// The store's listing; if it takes longer than [`CACHE_GRACE`], the cache is published
/// while it goes on.
async fn first_listing(
    store: &dyn Store,
    cache: Option<&StateCache>,
    tx: &watch::Sender<Arc<ClusterState>>,
    cache_tried: &mut bool,
) -> Result<(Vec<KeyValue>, Revision), StoreError> {
    let listing = store.list("");
    tokio::pin!(listing);
    if *cache_tried || cache.is_none() {
        return listing.await;
    }
    tokio::select! {
        done = &mut listing => done,
        _ = tokio::time::sleep(CACHE_GRACE) => {
            *cache_tried = true;
            publish_cached(cache, tx);
            listing.await
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

/// Services and their endpoints, policies and pods change far more often than the mesh and
/// mean nothing to it: the service proxy (and the policy enforcer) follow them on their own
/// watches.
fn is_workload_state(key: &str) -> bool {
    trellis_model::keys::Key::parse(key).is_some_and(|k| k.is_workload_state())
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

/// Publications of the state are at least this far apart. A change after a quiet spell
/// is published at once (a verdict must not wait); the events of a busy spell (every
/// agent rewriting its status after one change of a 10,000-node cluster) are published
/// together, each publication costing every consumer a copy and a comparison of the state.
const MIN_PUBLISH_GAP: Duration = Duration::from_millis(20);

async fn follow(
    store: &dyn Store,
    synced: &mut Synced,
    tx: &watch::Sender<Arc<ClusterState>>,
    backoff: &mut Backoff,
    cache: Option<&StateCache>,
) -> Result<(), StoreError> {
    use tokio::time::{Instant, sleep_until};
    const SAVE_EVERY: Duration = Duration::from_secs(1);
    let mut watch = store.watch("", synced.state.revision).await?;
    backoff.reset();
    // A fresh listing or a resumed watch may have changed things: save once at the start.
    let mut unsaved = true;
    let mut last_save: Option<Instant> = None;
    let mut last_publish: Option<Instant> = None;
    let mut unpublished = false;
    let ended = loop {
        let save_at = last_save.map_or_else(Instant::now, |t| t + SAVE_EVERY);
        let publish_at = last_publish.map_or_else(Instant::now, |t| t + MIN_PUBLISH_GAP);
        let event = tokio::select! {
            biased;
            _ = sleep_until(publish_at), if unpublished => {
                tx.send_replace(Arc::new(synced.state.clone()));
                unpublished = false;
                last_publish = Some(Instant::now());
                continue;
            }
            event = watch.next() => event,
            _ = sleep_until(save_at), if unsaved && cache.is_some() => {
                save(cache, synced).await;
                unsaved = false;
                last_save = Some(Instant::now());
                continue;
            }
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => break e,
            None => break StoreError::Unavailable("the watch ended".into()),
        };
        if is_workload_state(event.key()) {
            continue;
        }
        synced.apply(&event);
        // Coalesce a burst of events into one publication.
        let mut broken = None;
        while let Some(more) = watch.try_next() {
            match more {
                Ok(more) if is_workload_state(more.key()) => {}
                Ok(more) => synced.apply(&more),
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        unsaved = true;
        let quiet = last_publish.is_none_or(|t| t.elapsed() >= MIN_PUBLISH_GAP);
        if quiet || broken.is_some() {
            tx.send_replace(Arc::new(synced.state.clone()));
            unpublished = false;
            last_publish = Some(Instant::now());
        } else {
            unpublished = true;
        }
        if let Some(e) = broken {
            break e;
        }
    };
    if unpublished {
        tx.send_replace(Arc::new(synced.state.clone()));
    }
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
    use crate::state::tests::kv;

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
        let store = Arc::new(trellis_testkit::Unreachable);
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

    /// A store that takes its time (frozen, as after a cold boot with the API server down)
    /// does not hold the cached state back for a whole call timeout; its listing, once it
    /// answers, replaces the cache.
    #[tokio::test(start_paused = true)]
    async fn a_silent_store_at_start_publishes_the_cache_after_the_grace() {
        use trellis_store::embedded::EmbeddedStore;
        let dir = std::env::temp_dir().join(format!("trellis-sync-grace-{}", std::process::id()));
        let cache = StateCache::new(dir.join("state.json"));
        let records: BTreeMap<String, KeyValue> =
            [("x/cached".to_string(), kv("x/cached", "1", 40))].into();
        cache.save(&records, 42).unwrap();
        let inner = EmbeddedStore::new();
        let revision = inner.put("x/live", b"1".to_vec()).await.unwrap();
        let store = trellis_testkit::Freezable::new(inner);
        store.freeze();
        let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
        let started = tokio::time::Instant::now();
        let sync = tokio::spawn(sync_forever(store.clone(), tx, Some(cache)));
        rx.wait_for(|s| s.revision == 42).await.unwrap();
        assert!(
            started.elapsed() <= CACHE_GRACE + Duration::from_millis(10),
            "cache published after {:?}",
            started.elapsed()
        );
        store.thaw();
        rx.wait_for(|s| s.revision == revision).await.unwrap();
        sync.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A change after a quiet spell is published at once; the events of a busy spell are
    /// published in batches at most MIN_PUBLISH_GAP apart, and the last one is never lost.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_change_is_published_at_once_and_a_busy_spell_in_batches() {
        use trellis_store::embedded::EmbeddedStore;
        let store = EmbeddedStore::new();
        let (tx, mut rx) = watch::channel(Arc::new(ClusterState::default()));
        let sync = tokio::spawn(sync_forever(store.clone(), tx, None));
        store.put("x/0", b"0".to_vec()).await.unwrap();
        rx.wait_for(|s| s.revision >= 1).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;

        let asked = tokio::time::Instant::now();
        let revision = store.put("x/quiet", b"1".to_vec()).await.unwrap();
        rx.wait_for(|s| s.revision == revision).await.unwrap();
        assert!(
            asked.elapsed() < Duration::from_millis(5),
            "{:?}",
            asked.elapsed()
        );

        let mut counted = rx.clone();
        let counter = tokio::spawn(async move {
            let mut publications = 0;
            while counted.changed().await.is_ok() {
                publications += 1;
            }
            publications
        });
        let mut last = 0;
        for i in 0..200 {
            last = store.put(&format!("x/{i}"), b"2".to_vec()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rx.wait_for(|s| s.revision == last).await.unwrap();
        sync.abort();
        let _ = sync.await;
        drop(rx);
        let publications = counter.await.unwrap();
        assert!(
            (2..=15).contains(&publications),
            "200 changes over 200 ms published {publications} times"
        );
    }
}
