use std::time::Duration;
use trellis_store::embedded::{EmbeddedStore, WATCH_BUFFER};
use trellis_store::{Compare, Event, KeyValue, Op, Store, StoreError, Watch};

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        lease: None,
    }
}

fn put_leased(key: &str, value: &str, lease: u64) -> Op {
    Op::Put {
        key: key.to_string(),
        value: value.as_bytes().to_vec(),
        lease: Some(lease),
    }
}

fn delete(key: &str) -> Op {
    Op::Delete {
        key: key.to_string(),
    }
}

async fn revision(store: &EmbeddedStore) -> u64 {
    store.list("").await.expect("list").1
}

async fn must_get(store: &EmbeddedStore, key: &str) -> KeyValue {
    store
        .get(key)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("{key} should exist"))
}

/// The next event, failing the test instead of hanging if none comes.
async fn next_event(watch: &mut Watch) -> Event {
    match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn summary(event: &Event) -> (String, &'static str, u64) {
    let kind = match event {
        Event::Put(_) => "put",
        Event::Delete { .. } => "delete",
    };
    (event.key().to_string(), kind, event.revision())
}

#[tokio::test]
async fn revisions_follow_puts_updates_deletes_and_recreation() {
    let store = EmbeddedStore::new();
    assert_eq!(revision(&store).await, 1, "an empty store is at revision 1");

    assert_eq!(store.put("a", b"1".to_vec()).await.unwrap(), 2);
    let created = must_get(&store, "a").await;
    assert_eq!((created.create_revision, created.mod_revision), (2, 2));
    assert_eq!(created.value, b"1");
    assert_eq!(created.lease, None);

    assert_eq!(store.put("a", b"2".to_vec()).await.unwrap(), 3);
    let updated = must_get(&store, "a").await;
    assert_eq!((updated.create_revision, updated.mod_revision), (2, 3));

    assert_eq!(store.delete("a").await.unwrap(), 4);
    assert_eq!(store.get("a").await.unwrap(), None);

    // Deleting what is not there changes nothing, so it is no new revision.
    assert_eq!(store.delete("a").await.unwrap(), 4);
    assert_eq!(revision(&store).await, 4);

    assert_eq!(store.put("a", b"3".to_vec()).await.unwrap(), 5);
    let recreated = must_get(&store, "a").await;
    assert_eq!((recreated.create_revision, recreated.mod_revision), (5, 5));
}

#[tokio::test]
async fn a_multi_op_txn_is_one_revision() {
    let store = EmbeddedStore::new();
    store.put("gone", b"x".to_vec()).await.unwrap();
    let mut watch = store.watch("", 2).await.unwrap();

    let result = store
        .txn(vec![], vec![put("a", "1"), put("b", "2"), delete("gone")])
        .await
        .unwrap();
    assert!(result.succeeded);
    assert_eq!(result.revision, 3);
    assert_eq!(must_get(&store, "a").await.mod_revision, 3);
    assert_eq!(must_get(&store, "b").await.mod_revision, 3);
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

#[tokio::test]
async fn a_txn_with_an_unknown_lease_applies_nothing() {
    let store = EmbeddedStore::new();
    store.put("kept", b"old".to_vec()).await.unwrap();
    let before = revision(&store).await;

    let error = store
        .txn(
            vec![],
            vec![
                put("kept", "new"),
                put_leased("other", "x", 999),
                delete("kept"),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::LeaseNotFound(999)), "{error:?}");
    assert_eq!(must_get(&store, "kept").await.value, b"old");
    assert_eq!(store.get("other").await.unwrap(), None);
    assert_eq!(revision(&store).await, before);
}

#[tokio::test]
async fn every_compare_kind_gates_the_txn() {
    let store = EmbeddedStore::new();
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
        let before = revision(&store).await;
        let result = store
            .txn(
                vec![compare.clone()],
                vec![put("marker", "x"), delete("marker")],
            )
            .await
            .unwrap();
        assert_eq!(result.succeeded, holds, "{compare:?}");
        let expected = if holds { before + 1 } else { before };
        assert_eq!(result.revision, expected, "{compare:?}");
        assert_eq!(revision(&store).await, expected, "{compare:?}");
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

#[tokio::test]
async fn list_is_sorted_and_filtered_by_prefix() {
    let store = EmbeddedStore::new();
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

#[tokio::test]
async fn watch_replays_history_then_streams_live_events() {
    let store = EmbeddedStore::new();
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
async fn a_watcher_that_never_reads_is_cut_off_without_blocking_writers() {
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
async fn revoking_a_lease_deletes_its_keys_in_one_revision() {
    let store = EmbeddedStore::new();
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
    assert_eq!(revision(&store).await, 3);
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

#[tokio::test]
async fn reputting_a_key_without_its_lease_detaches_it() {
    let store = EmbeddedStore::new();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    store
        .txn(vec![], vec![put_leased("k", "1", lease)])
        .await
        .unwrap();
    store.put("k", b"2".to_vec()).await.unwrap();
    assert_eq!(must_get(&store, "k").await.lease, None);

    store.revoke_lease(lease).await.unwrap();
    assert_eq!(must_get(&store, "k").await.value, b"2");
}

#[tokio::test]
async fn lease_ids_are_fresh() {
    let store = EmbeddedStore::new();
    let first = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store.revoke_lease(first).await.unwrap();
    let second = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    assert_ne!(first, second);
}
