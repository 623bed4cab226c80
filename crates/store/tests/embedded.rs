//! The embedded store: the conformance suite, and what only it has (a bounded history
//! instead of compaction, paused time, an exact lag bound).

mod suite;

use std::sync::Arc;
use std::time::Duration;
use suite::{Backend, next_event, put, put_leased, summary};
use trellis_store::embedded::{EmbeddedStore, WATCH_BUFFER};
use trellis_store::{Op, Revision, Store, StoreError};

struct Embedded(Arc<EmbeddedStore>);

impl Backend for Embedded {
    async fn start() -> Self {
        Embedded(EmbeddedStore::new())
    }
    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
    async fn compact(&self, revision: Revision) {
        self.0.compact(revision).expect("compact");
    }
}

suite::conformance_tests!(Embedded);

async fn revision(store: &EmbeddedStore) -> u64 {
    store.list("").await.expect("list").1
}

async fn must_get(store: &EmbeddedStore, key: &str) -> trellis_store::KeyValue {
    suite::must_get(store, key).await
}

#[tokio::test]
async fn watching_from_before_the_kept_history_is_compacted() {
    let store = EmbeddedStore::with_history(4);
    for i in 0..6 {
        store.put(&format!("k{i}"), b"x".to_vec()).await.unwrap(); // revisions 2..=7
    }
    // Kept: revisions 4..=7, so a watch may start after 3 or later.
    let mut watch = store.watch("", 3).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), 4);

    for after in [0, 2] {
        match store.watch("", after).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (after, 4));
            }
            Err(other) => panic!("watch after {after}: expected Compacted, got {other:?}"),
            Ok(_) => panic!("watch after {after}: expected Compacted, got a watch"),
        }
    }
    assert!(store.watch("", 7).await.is_ok());
}

#[tokio::test]
async fn a_revision_partly_dropped_from_history_is_compacted() {
    let store = EmbeddedStore::with_history(4);
    store
        .txn(vec![], vec![put("a", "1"), put("b", "1"), put("c", "1")])
        .await
        .unwrap(); // revision 2: three events
    store.put("d", b"1".to_vec()).await.unwrap(); // 3
    store.put("e", b"1".to_vec()).await.unwrap(); // 4, pushes out one event of revision 2

    assert!(matches!(
        store.watch("", 1).await,
        Err(StoreError::Compacted { .. })
    ));
    let mut watch = store.watch("", 2).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut watch).await),
        ("d".into(), "put", 3)
    );
}

#[tokio::test]
async fn a_watcher_is_cut_off_after_exactly_the_watch_buffer() {
    let store = EmbeddedStore::new();
    let mut idle = store.watch("", 1).await.unwrap();

    let writes = async {
        for i in 0..5000 {
            store.put(&format!("k{i:05}"), b"x".to_vec()).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), writes)
        .await
        .expect("writers must not wait for a slow watcher");
    assert_eq!(revision(&store).await, 5001);

    let mut delivered = 0;
    loop {
        match idle.next().await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(StoreError::WatchLagged)) => break,
            other => panic!("expected WatchLagged after {delivered} events, got {other:?}"),
        }
    }
    assert_eq!(delivered, WATCH_BUFFER);
    assert!(
        idle.next().await.is_none(),
        "the stream ends after the error"
    );
}

#[tokio::test(start_paused = true)]
async fn leased_keys_vanish_after_the_ttl_and_keep_alive_extends_it() {
    let store = EmbeddedStore::new();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store
        .txn(vec![], vec![put_leased("node", "up", lease)])
        .await
        .unwrap();
    assert_eq!(must_get(&store, "node").await.lease, Some(lease));
    let mut watch = store.watch("", revision(&store).await).await.unwrap();

    tokio::time::advance(Duration::from_secs(9)).await;
    store.keep_alive(lease).await.unwrap();
    tokio::time::advance(Duration::from_secs(9)).await; // 18 s in, 9 s after renewal
    assert!(store.get("node").await.unwrap().is_some(), "renewed lease");

    tokio::time::advance(Duration::from_secs(2)).await;
    // No call to the store here: the expiry task alone must delete the key.
    let event = next_event(&mut watch).await;
    assert_eq!(summary(&event), ("node".into(), "delete", 3));
    assert_eq!(store.get("node").await.unwrap(), None);
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
}

#[tokio::test]
async fn compacting_twice_or_into_the_future_is_refused() {
    let store = EmbeddedStore::new();
    store.put("a", b"1".to_vec()).await.unwrap(); // 2
    store.put("a", b"2".to_vec()).await.unwrap(); // 3
    store.compact(3).unwrap();
    assert!(matches!(
        store.compact(3),
        Err(StoreError::Compacted { requested: 3, .. })
    ));
    assert!(matches!(store.compact(9), Err(StoreError::Protocol(_))));
    let mut watch = store.watch("", 2).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut watch).await),
        ("a".into(), "put", 3)
    );
}

#[tokio::test]
async fn one_txn_may_write_a_key_twice_the_last_write_wins() {
    // etcd refuses this ("duplicate key"); the embedded store applies the ops in order.
    let store = EmbeddedStore::new();
    let ops = vec![put("k", "1"), Op::Delete { key: "k".into() }, put("k", "2")];
    assert_eq!(store.txn(vec![], ops).await.unwrap().revision, 2);
    assert_eq!(must_get(&store, "k").await.value, b"2");
    assert_eq!(must_get(&store, "k").await.create_revision, 2);
}
