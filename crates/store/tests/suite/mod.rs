//! The `Store` conformance suite: one set of behaviour tests that every backend must pass
//! alike. Each test file names its backend with `conformance_tests!(Backend)`: the embedded
//! store directly (tests/embedded.rs), `EtcdStore` on our etcd server over a Unix socket
//! (tests/served.rs), and `EtcdStore` on a real etcd (tests/etcd.rs).
//!
//! Revisions are asserted exactly: every backend starts empty at revision 1 and moves one
//! revision per write, as etcd does.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_store::embedded::WATCH_BUFFER;
use trellis_store::{Compare, Event, KeyValue, Op, Revision, Store, StoreError, Watch};

/// A store under test.
pub trait Backend: Sized {
    /// A fresh, empty store.
    async fn start() -> Self;
    /// A client of it: a new one each call where the backend has clients.
    fn store(&self) -> Arc<dyn Store>;
    /// Compacts the store's history at `revision`, as etcd's `compact` does.
    async fn compact(&self, revision: Revision);
}

/// One `#[tokio::test]` per suite test, on the given backend.
macro_rules! conformance_tests {
    ($backend:ty) => {
        $crate::suite::conformance_tests!(@each $backend;
            revisions_follow_puts_updates_deletes_and_recreation,
            a_multi_op_txn_is_one_revision,
            a_txn_with_an_unknown_lease_applies_nothing,
            every_compare_kind_gates_the_txn,
            list_is_sorted_and_filtered_by_prefix,
            watch_replays_history_then_streams_live_events,
            watching_from_before_a_compaction_is_compacted,
            a_watcher_that_never_reads_is_cut_off_without_blocking_writers,
            leases_expire_keep_alive_extends_and_expiry_deletes_keys,
            revoking_a_lease_deletes_its_keys_in_one_revision,
            reputting_a_key_without_its_lease_detaches_it,
            lease_ids_are_fresh,
        );
    };
    (@each $backend:ty; $($name:ident),* $(,)?) => {
        mod conformance {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = <$backend as $crate::suite::Backend>::start().await;
                    $crate::suite::$name(&backend).await;
                }
            )*
        }
    };
}
pub(crate) use conformance_tests;

pub fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        lease: None,
    }
}

pub fn put_leased(key: &str, value: &str, lease: u64) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        lease: Some(lease),
    }
}

pub fn delete(key: &str) -> Op {
    Op::Delete {
        key: key.to_string(),
    }
}

pub async fn revision(store: &dyn Store) -> u64 {
    store.list("").await.expect("list").1
}

pub async fn must_get(store: &dyn Store, key: &str) -> KeyValue {
    store
        .get(key)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} should exist"))
}

/// The next event, failing the test instead of hanging if none comes.
pub async fn next_event(watch: &mut Watch) -> Event {
    match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

pub fn summary(event: &Event) -> (String, &'static str, u64) {
    let kind = match event {
        Event::Put(_) => "put",
        Event::Delete { .. } => "delete",
    };
    (event.key().to_string(), kind, event.revision())
}

/// The error of a watch that must fail: from the call, or as the stream's first item
/// (etcd confirms a watch before it cancels it; the trait allows either).
pub async fn watch_error(store: &dyn Store, prefix: &str, after: Revision) -> StoreError {
    match store.watch(prefix, after).await {
        Err(e) => e,
        Ok(mut watch) => match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Err(e))) => e,
            other => panic!("watch after {after}: expected an error, got {other:?}"),
        },
    }
}

pub async fn revisions_follow_puts_updates_deletes_and_recreation<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    assert_eq!(revision(store).await, 1, "an empty store is at revision 1");

    assert_eq!(store.put("a", b"1".to_vec()).await.unwrap(), 2);
    let created = must_get(store, "a").await;
    assert_eq!((created.create_revision, created.mod_revision), (2, 2));
    assert_eq!(created.value, b"1");
    assert_eq!(created.lease, None);

    assert_eq!(store.put("a", b"2".to_vec()).await.unwrap(), 3);
    let updated = must_get(store, "a").await;
    assert_eq!((updated.create_revision, updated.mod_revision), (2, 3));

    assert_eq!(store.delete("a").await.unwrap(), 4);
    assert_eq!(store.get("a").await.unwrap(), None);

    // Deleting what is not there changes nothing, so it is no new revision.
    assert_eq!(store.delete("a").await.unwrap(), 4);
    assert_eq!(revision(store).await, 4);

    assert_eq!(store.put("a", b"3".to_vec()).await.unwrap(), 5);
    let recreated = must_get(store, "a").await;
    assert_eq!((recreated.create_revision, recreated.mod_revision), (5, 5));
}

pub async fn a_multi_op_txn_is_one_revision<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    store.put("gone", b"x".to_vec()).await.unwrap();
    let mut watch = store.watch("", 2).await.unwrap();

    let result = store
        .txn(vec![], vec![put("a", "1"), put("b", "2"), delete("gone")])
        .await
        .unwrap();
    assert!(result.succeeded);
    assert_eq!(result.revision, 3);
    assert_eq!(must_get(store, "a").await.mod_revision, 3);
    assert_eq!(must_get(store, "b").await.mod_revision, 3);
    assert_eq!(store.get("gone").await.unwrap(), None);

    let events = [
        next_event(&mut watch).await,
        next_event(&mut watch).await,
        next_event(&mut watch).await,
    ];
    let summaries: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        summaries,
        vec![
            ("a".to_string(), "put", 3),
            ("b".to_string(), "put", 3),
            ("gone".to_string(), "delete", 3)
        ]
    );
}

pub async fn a_txn_with_an_unknown_lease_applies_nothing<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    store.put("kept", b"old".to_vec()).await.unwrap();
    store.put("doomed", b"old".to_vec()).await.unwrap();
    let before = store.list("").await.unwrap();

    let error = store
        .txn(
            vec![],
            vec![
                put("kept", "new"),
                put_leased("other", "x", 0x1234_5678),
                delete("doomed"),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::LeaseNotFound(0x1234_5678)),
        "{error:?}"
    );
    assert_eq!(store.list("").await.unwrap(), before, "nothing applied");
}

pub async fn every_compare_kind_gates_the_txn<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    store.put("k", b"v".to_vec()).await.unwrap(); // create 2, mod 2
    store.put("k", b"w".to_vec()).await.unwrap(); // mod 3

    let cases = [
        (Compare::Absent("missing".into()), true),
        (Compare::Absent("k".into()), false),
        (Compare::ModRevision("k".into(), 3), true),
        (Compare::ModRevision("k".into(), 2), false),
        (Compare::ModRevision("missing".into(), 0), false),
        (Compare::CreateRevision("k".into(), 2), true),
        (Compare::CreateRevision("k".into(), 3), false),
        (Compare::CreateRevision("missing".into(), 0), false),
        (Compare::Value("k".into(), b"w".to_vec()), true),
        (Compare::Value("k".into(), b"v".to_vec()), false),
        (Compare::Value("missing".into(), vec![]), false),
    ];
    for (compare, holds) in cases {
        let before = revision(store).await;
        let result = store
            .txn(vec![compare.clone()], vec![put("marker", "x")])
            .await
            .unwrap();
        assert_eq!(result.succeeded, holds, "{compare:?}");
        let expected = if holds { before + 1 } else { before };
        assert_eq!(result.revision, expected, "{compare:?}");
        assert_eq!(revision(store).await, expected, "{compare:?}");
    }

    // All compares must hold: one false one blocks the rest.
    let result = store
        .txn(
            vec![
                Compare::Absent("missing".into()),
                Compare::Absent("k".into()),
            ],
            vec![put("blocked", "x")],
        )
        .await
        .unwrap();
    assert!(!result.succeeded);
    assert_eq!(store.get("blocked").await.unwrap(), None);
}

pub async fn list_is_sorted_and_filtered_by_prefix<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    for key in ["nodes/b", "other", "nodes/a", "nodesX", "nodes/c/x"] {
        store.put(key, key.as_bytes().to_vec()).await.unwrap();
    }
    let keys = |kvs: Vec<KeyValue>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();

    let (nodes, rev) = store.list("nodes/").await.unwrap();
    assert_eq!(keys(nodes), ["nodes/a", "nodes/b", "nodes/c/x"]);
    assert_eq!(rev, 6);

    let (all, _) = store.list("").await.unwrap();
    assert_eq!(
        keys(all),
        ["nodes/a", "nodes/b", "nodes/c/x", "nodesX", "other"]
    );
    assert!(store.list("zzz").await.unwrap().0.is_empty());
}

pub async fn watch_replays_history_then_streams_live_events<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    store.put("a/1", b"x".to_vec()).await.unwrap(); // 2
    store.put("a/2", b"x".to_vec()).await.unwrap(); // 3
    store.put("b/1", b"x".to_vec()).await.unwrap(); // 4
    store.delete("a/1").await.unwrap(); // 5

    let mut watch = store.watch("a/", 2).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut watch).await),
        ("a/2".into(), "put", 3)
    );
    assert_eq!(
        summary(&next_event(&mut watch).await),
        ("a/1".into(), "delete", 5)
    );

    store.put("b/2", b"x".to_vec()).await.unwrap(); // 6, other prefix
    store.put("a/3", b"x".to_vec()).await.unwrap(); // 7
    assert_eq!(
        summary(&next_event(&mut watch).await),
        ("a/3".into(), "put", 7)
    );

    // Watching from the current revision gives only what happens next.
    let mut fresh = store.watch("", 7).await.unwrap();
    store.put("c", b"x".to_vec()).await.unwrap(); // 8
    assert_eq!(
        summary(&next_event(&mut fresh).await),
        ("c".into(), "put", 8)
    );

    // A second client resumes from a revision and sees the same events.
    let other = backend.store();
    let mut resumed = other.watch("", 6).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut resumed).await),
        ("a/3".into(), "put", 7)
    );
    assert_eq!(
        summary(&next_event(&mut resumed).await),
        ("c".into(), "put", 8)
    );
}

pub async fn watching_from_before_a_compaction_is_compacted<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    for i in 0..6 {
        store.put(&format!("k{i}"), b"x".to_vec()).await.unwrap(); // revisions 2..=7
    }
    backend.compact(4).await;
    // Watches may start at the compaction revision: after 3 or later.
    let mut watch = store.watch("", 3).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), 4);

    for after in [0, 2] {
        match watch_error(store, "", after).await {
            StoreError::Compacted { requested, oldest } => {
                assert_eq!((requested, oldest), (after, 4), "watch after {after}");
            }
            other => panic!("watch after {after}: expected Compacted, got {other:?}"),
        }
    }
    let mut live = store.watch("", 7).await.unwrap();
    store.put("after", b"x".to_vec()).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut live).await),
        ("after".into(), "put", 8)
    );
}

pub async fn a_watcher_that_never_reads_is_cut_off_without_blocking_writers<B: Backend>(
    backend: &B,
) {
    let store = backend.store();
    let store = store.as_ref();
    let mut idle = store.watch("", 1).await.unwrap();

    // 2000 events in 20 revisions (etcd takes at most 128 ops per txn).
    let writes = async {
        for batch in 0..20 {
            let ops = (0..100)
                .map(|i| put(&format!("k{batch:02}-{i:03}"), "x"))
                .collect();
            store.txn(vec![], ops).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), writes)
        .await
        .expect("writers must not wait for a slow watcher");
    assert_eq!(revision(store).await, 21);

    let mut delivered = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), idle.next()).await {
            Ok(Some(Ok(_))) => delivered += 1,
            Ok(Some(Err(StoreError::WatchLagged))) => break,
            other => panic!("expected WatchLagged after {delivered} events, got {other:?}"),
        }
    }
    assert!(
        delivered > 0 && delivered <= WATCH_BUFFER,
        "{delivered} events before the cut"
    );
    let end = tokio::time::timeout(Duration::from_secs(10), idle.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "the stream ends after the error: {end:?}"
    );
    // The store itself is fine.
    store.put("still", b"ok".to_vec()).await.unwrap();
}

/// In real time, so that it holds for servers too (etcd checks expiry every 500 ms).
pub async fn leases_expire_keep_alive_extends_and_expiry_deletes_keys<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    store
        .txn(vec![], vec![put_leased("alive", "1", lease)])
        .await
        .unwrap();
    assert_eq!(must_get(store, "alive").await.lease, Some(lease));
    let mut watch = store.watch("", revision(store).await).await.unwrap();
    // Kept alive past several TTLs.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        store.keep_alive(lease).await.unwrap();
    }
    assert!(store.get("alive").await.unwrap().is_some(), "renewed lease");

    // Left alone, it expires, and a watch sees the key go without anyone calling.
    let asked = Instant::now();
    let event = next_event(&mut watch).await;
    assert_eq!(summary(&event).0, "alive");
    assert_eq!(summary(&event).1, "delete");
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(store.get("alive").await.unwrap(), None);
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
    assert!(matches!(
        store
            .txn(vec![], vec![put_leased("late", "1", lease)])
            .await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

pub async fn revoking_a_lease_deletes_its_keys_in_one_revision<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(
            vec![],
            vec![
                put_leased("a", "1", lease),
                put_leased("b", "1", lease),
                put("c", "1"),
            ],
        )
        .await
        .unwrap(); // 2
    let mut watch = store.watch("", 2).await.unwrap();

    store.revoke_lease(lease).await.unwrap();
    let deletions = [next_event(&mut watch).await, next_event(&mut watch).await];
    let summaries: Vec<_> = deletions.iter().map(summary).collect();
    assert_eq!(
        summaries,
        vec![("a".into(), "delete", 3), ("b".into(), "delete", 3)]
    );
    assert_eq!(revision(store).await, 3);
    assert!(store.get("c").await.unwrap().is_some());
    assert!(matches!(
        store.revoke_lease(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.txn(vec![], vec![put_leased("d", "1", lease)]).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

pub async fn reputting_a_key_without_its_lease_detaches_it<B: Backend>(backend: &B) {
    let store = backend.store();
    let store = store.as_ref();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(vec![], vec![put_leased("k", "1", lease)])
        .await
        .unwrap();
    store.put("k", b"2".to_vec()).await.unwrap();
    assert_eq!(must_get(store, "k").await.lease, None);

    store.revoke_lease(lease).await.unwrap();
    assert_eq!(must_get(store, "k").await.value, b"2");
}

pub async fn lease_ids_are_fresh<B: Backend>(backend: &B) {
    let store = backend.store();
    let first = store.grant_lease(Duration::from_secs(5)).await.unwrap();
    store.revoke_lease(first).await.unwrap();
    let second = store.grant_lease(Duration::from_secs(5)).await.unwrap();
    assert_ne!(first, second);
}
