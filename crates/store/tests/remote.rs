use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use trellis_store::embedded::EmbeddedStore;
use trellis_store::remote::{RemoteStore, serve};
use trellis_store::{
    Compare, Event, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch,
};

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A unique socket path, removed when dropped.
struct SocketPath(PathBuf);

impl SocketPath {
    fn new(name: &str) -> SocketPath {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let unique = format!(
            "trellis-store-{name}-{}-{nanos}-{}.sock",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        SocketPath(std::env::temp_dir().join(unique))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn serve_embedded(store: &Arc<EmbeddedStore>, socket: &SocketPath) -> JoinHandle<()> {
    let shared: Arc<dyn Store> = store.clone();
    serve(shared, socket.path()).await.expect("serve")
}

async fn stop(server: JoinHandle<()>, socket: &SocketPath) {
    server.abort();
    let _ = server.await;
    let _ = std::fs::remove_file(socket.path());
}

async fn next_item(watch: &mut Watch) -> Option<Result<Event>> {
    tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("watch should yield within 5 s")
}

async fn next_event(watch: &mut Watch) -> Event {
    match next_item(watch).await {
        Some(Ok(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn put_leased(key: &str, lease: LeaseId) -> Op {
    Op::Put {
        key: key.to_string(),
        value: b"leased".to_vec(),
        lease: Some(lease),
    }
}

#[tokio::test]
async fn the_store_api_round_trips_through_the_socket() {
    let socket = SocketPath::new("roundtrip");
    let store = EmbeddedStore::new();
    let server = serve_embedded(&store, &socket).await;
    let client = RemoteStore::connect(socket.path(), CALL_TIMEOUT);

    assert_eq!(client.put("nodes/b", b"B".to_vec()).await.unwrap(), 2);
    assert_eq!(client.put("nodes/a", vec![0, 255, 10]).await.unwrap(), 3);
    let a = client.get("nodes/a").await.unwrap().expect("nodes/a");
    assert_eq!(a.value, vec![0, 255, 10], "bytes survive the JSON wire");
    assert_eq!((a.create_revision, a.mod_revision), (3, 3));
    assert_eq!(client.get("missing").await.unwrap(), None);

    let (kvs, revision) = client.list("nodes/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!((keys, revision), (vec!["nodes/a", "nodes/b"], 3));

    let refused = client
        .txn(vec![Compare::Absent("nodes/a".into())], vec![])
        .await
        .unwrap();
    assert_eq!(
        refused,
        TxnResult {
            succeeded: false,
            revision: 3
        }
    );
    let applied = client
        .txn(
            vec![Compare::ModRevision("nodes/a".into(), 3)],
            vec![Op::Delete {
                key: "nodes/a".into(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        applied,
        TxnResult {
            succeeded: true,
            revision: 4
        }
    );

    let mut watch = client.watch("nodes/", 2).await.unwrap();
    assert_eq!(next_event(&mut watch).await.key(), "nodes/a"); // put at 3
    assert!(matches!(
        next_event(&mut watch).await,
        Event::Delete { revision: 4, .. }
    ));

    let lease = client.grant_lease(Duration::from_secs(60)).await.unwrap();
    client.keep_alive(lease).await.unwrap();
    client
        .txn(vec![], vec![put_leased("nodes/c", lease)])
        .await
        .unwrap();
    assert_eq!(next_event(&mut watch).await.key(), "nodes/c");
    client.revoke_lease(lease).await.unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        Event::Delete { ref key, revision: 6 } if key == "nodes/c"
    ));

    // Errors arrive as the same variant the store returned.
    assert!(matches!(
        client.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
    assert!(matches!(
        client.txn(vec![], vec![put_leased("x", 4242)]).await,
        Err(StoreError::LeaseNotFound(4242))
    ));
    stop(server, &socket).await;
}

#[tokio::test]
async fn compaction_reaches_the_client_as_compacted() {
    let socket = SocketPath::new("compacted");
    let store = EmbeddedStore::with_history(2);
    let server = serve_embedded(&store, &socket).await;
    let client = RemoteStore::connect(socket.path(), CALL_TIMEOUT);
    for i in 0..4 {
        client.put(&format!("k{i}"), vec![]).await.unwrap(); // revisions 2..=5
    }
    assert!(matches!(
        client.watch("", 1).await,
        Err(StoreError::Compacted {
            requested: 1,
            oldest: 4
        })
    ));
    // The connection stays usable after an error reply.
    assert!(client.watch("", 3).await.is_ok());
    stop(server, &socket).await;
}

/// Holds every `get` until released, to prove that calls on one connection overlap.
struct GatedGets {
    inner: Arc<EmbeddedStore>,
    gate: Notify,
}

#[async_trait]
impl Store for GatedGets {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.gate.notified().await;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        self.inner.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        self.inner.watch(prefix, after).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

#[tokio::test]
async fn calls_on_one_client_run_concurrently() {
    let socket = SocketPath::new("concurrent");
    let gated = Arc::new(GatedGets {
        inner: EmbeddedStore::new(),
        gate: Notify::new(),
    });
    let server = serve(gated.clone(), socket.path()).await.expect("serve");
    let client = Arc::new(RemoteStore::connect(socket.path(), CALL_TIMEOUT));

    let blocked_get = tokio::spawn({
        let client = client.clone();
        async move { client.get("k").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await; // let the get reach the server

    // Answered while the get is still waiting on the same connection.
    client.put("k", b"v".to_vec()).await.unwrap();
    assert!(!blocked_get.is_finished());

    gated.gate.notify_one();
    let got = blocked_get.await.unwrap().unwrap().expect("k");
    assert_eq!(got.value, b"v");
    stop(server, &socket).await;
}

#[tokio::test]
async fn a_client_survives_a_server_restart_and_resumes_its_watch() {
    let socket = SocketPath::new("restart");
    let store = EmbeddedStore::new();
    let server = serve_embedded(&store, &socket).await;
    let client = RemoteStore::connect(socket.path(), Duration::from_secs(5));

    let mut watch = client.watch("", 1).await.unwrap();
    client.put("before", vec![]).await.unwrap();
    let last_seen = next_event(&mut watch).await.revision();

    stop(server, &socket).await;
    assert!(matches!(
        next_item(&mut watch).await,
        Some(Err(StoreError::Unavailable(_)))
    ));
    assert!(
        next_item(&mut watch).await.is_none(),
        "the broken watch ends"
    );

    let started = Instant::now();
    assert!(matches!(
        client.get("before").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a dead server is reported at once, not after the call timeout"
    );

    // Written while the server is down; the store itself lives on.
    store.put("during-1", vec![]).await.unwrap();
    store.put("during-2", vec![]).await.unwrap();

    let server = serve_embedded(&store, &socket).await;
    assert!(client.get("during-1").await.unwrap().is_some());
    let mut resumed = client.watch("", last_seen).await.unwrap();
    assert_eq!(next_event(&mut resumed).await.key(), "during-1");
    assert_eq!(next_event(&mut resumed).await.key(), "during-2");
    stop(server, &socket).await;
}

#[tokio::test]
async fn a_missing_socket_is_unavailable_and_names_the_path() {
    let socket = SocketPath::new("missing");
    let client = RemoteStore::connect(socket.path(), CALL_TIMEOUT);
    match client.get("k").await {
        Err(StoreError::Unavailable(message)) => {
            assert!(
                message.contains(&socket.path().display().to_string()),
                "{message}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // A watch on it fails the same way instead of returning a dead stream.
    assert!(matches!(
        client.watch("", 1).await,
        Err(StoreError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let socket = SocketPath::new("silent");
    let listener = UnixListener::bind(socket.path()).unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream); // keep it open, never reply
        }
    });
    let timeout = Duration::from_millis(300);
    let client = RemoteStore::connect(socket.path(), timeout);

    let started = Instant::now();
    assert!(matches!(client.get("k").await, Err(StoreError::Timeout(t)) if t == timeout));
    assert!(matches!(
        client.watch("", 1).await,
        Err(StoreError::Timeout(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(3));
    silent.abort();
}

async fn read_until_closed(stream: &mut UnixStream) -> bool {
    let mut sink = vec![0; 64 * 1024];
    let closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .is_ok()
}

#[tokio::test]
async fn a_misbehaving_client_is_cut_off_without_affecting_others() {
    let socket = SocketPath::new("misbehaving");
    let store = EmbeddedStore::new();
    let server = serve_embedded(&store, &socket).await;
    let good = RemoteStore::connect(socket.path(), CALL_TIMEOUT);
    let mut watch = good.watch("", 1).await.unwrap();

    let mut garbage = UnixStream::connect(socket.path()).await.unwrap();
    garbage.write_all(b"{not json\n").await.unwrap();
    assert!(
        read_until_closed(&mut garbage).await,
        "bad JSON closes the connection"
    );

    let mut flood = UnixStream::connect(socket.path()).await.unwrap();
    let huge = vec![b'x'; 5 * 1024 * 1024];
    // The server may hang up before all of it is written: that is the point.
    let _ = flood.write_all(&huge).await;
    assert!(
        read_until_closed(&mut flood).await,
        "a huge line closes the connection"
    );

    good.put("still-fine", vec![]).await.unwrap();
    assert_eq!(next_event(&mut watch).await.key(), "still-fine");
    stop(server, &socket).await;
}

#[tokio::test]
async fn a_remote_watcher_that_never_reads_is_cut_off() {
    let socket = SocketPath::new("lagged");
    let store = EmbeddedStore::new();
    let server = serve_embedded(&store, &socket).await;
    let client = RemoteStore::connect(socket.path(), CALL_TIMEOUT);
    let mut idle = client.watch("", 1).await.unwrap();

    let writes = async {
        for i in 0..5000 {
            store.put(&format!("k{i:05}"), vec![]).await.unwrap();
            if i % 100 == 0 {
                tokio::task::yield_now().await; // let the server forward what it can
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), writes)
        .await
        .expect("writers must not wait for a slow remote watcher");

    let mut delivered = 0;
    loop {
        match next_item(&mut idle).await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(StoreError::WatchLagged)) => break,
            other => panic!("expected WatchLagged after {delivered} events, got {other:?}"),
        }
    }
    assert!(delivered < 5000);
    assert!(next_item(&mut idle).await.is_none());
    // The connection itself is fine.
    assert!(client.get("k00000").await.unwrap().is_some());
    stop(server, &socket).await;
}

#[tokio::test]
async fn serving_refuses_a_path_held_by_a_live_server_or_a_regular_file() {
    let socket = SocketPath::new("busy");
    let store = EmbeddedStore::new();
    let server = serve_embedded(&store, &socket).await;
    let shared: Arc<dyn Store> = store.clone();
    let error = serve(shared.clone(), socket.path()).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    stop(server, &socket).await;

    std::fs::write(socket.path(), b"not a socket").unwrap();
    let error = serve(shared, socket.path()).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists, "{error}");
}
