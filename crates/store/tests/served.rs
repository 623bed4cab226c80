//! The embedded store served over etcd's protocol (`etcd::server`): the conformance suite
//! through `EtcdStore` on a Unix socket, real `etcdctl` 3.4 against it, the protocol's
//! finer points over raw gRPC, and the server's own lifecycle and bounds.
//!
//! etcdctl 3.4 reaches a Unix socket only as `unix://NAME` run from the socket's directory:
//! with `unix:///abs/path` grpc-go sends the path as the HTTP/2 `:authority`, which the
//! server's HTTP/2 stack rejects as malformed (PROTOCOL_ERROR). For the same reason the
//! commands that dial an endpoint directly (`endpoint status`, `snapshot`) fail on any
//! Unix endpoint, and on TCP need the endpoint without its scheme (`127.0.0.1:PORT`);
//! `endpoint status` is checked here over TCP.

mod suite;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use suite::{Backend, next_event, summary};
use trellis_store::embedded::EmbeddedStore;
use trellis_store::etcd::proto::etcdserverpb as pb;
use trellis_store::etcd::proto::etcdserverpb::kv_client::KvClient;
use trellis_store::etcd::proto::etcdserverpb::watch_client::WatchClient;
use trellis_store::etcd::server::{StoreServer, serve_tcp, serve_unix};
use trellis_store::etcd::{Credentials, EtcdConfig, EtcdStore};
use trellis_store::{Revision, Store, StoreError};

/// A private temporary directory for a socket, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "trt-served-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(endpoint: &str, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        prefix: prefix.to_string(),
        tls: None,
        credentials: None,
        call_timeout: Duration::from_secs(2),
        dialer: None,
    }
}

/// An embedded store served on `store.sock` in a temporary directory.
struct Served {
    store: Arc<EmbeddedStore>,
    server: Option<StoreServer>,
    dir: TempDir,
}

impl Served {
    async fn serving(store: Arc<EmbeddedStore>) -> Served {
        let dir = TempDir::new();
        let server = serve_unix(store.clone(), dir.0.join("store.sock"))
            .await
            .expect("serving the store");
        Served {
            store,
            server: Some(server),
            dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.0.join("store.sock")
    }

    fn endpoint(&self) -> String {
        self.server
            .as_ref()
            .expect("serving")
            .endpoint()
            .to_string()
    }

    fn client(&self, prefix: &str) -> Arc<EtcdStore> {
        EtcdStore::new(config(&self.endpoint(), prefix)).expect("valid config")
    }

    /// etcdctl as it reaches a Unix socket: from the socket's directory.
    fn etcdctl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("etcdctl");
        command
            .current_dir(&self.dir.0)
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints=unix://store.sock",
                "--dial-timeout=3s",
                "--command-timeout=5s",
            ])
            .args(args);
        command
    }

    fn etcdctl_output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .etcdctl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running etcdctl (apt-get install etcd-client)");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("etcdctl stdin");
        }
        drop(input);
        child.wait_with_output().expect("etcdctl output")
    }

    /// Runs etcdctl; panics with its output when it fails.
    fn etcdctl(&self, args: &[&str]) -> String {
        self.etcdctl_with_input(args, None)
    }

    fn etcdctl_with_input(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.etcdctl_output(args, stdin);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A long-running etcdctl (watch, elect) whose output lines arrive on a channel.
    fn etcdctl_running(&self, args: &[&str]) -> Running {
        let mut child = self
            .etcdctl_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("running etcdctl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }
}

impl Backend for Served {
    async fn start() -> Self {
        Served::serving(EmbeddedStore::new()).await
    }
    fn store(&self) -> Arc<dyn Store> {
        self.client("/t/")
    }
    async fn compact(&self, revision: Revision) {
        let out = self.etcdctl(&["compact", &revision.to_string()]);
        assert!(
            out.contains(&format!("compacted revision {revision}")),
            "{out}"
        );
    }
}

suite::conformance_tests!(Served);

/// A child etcdctl, killed when dropped.
struct Running {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    /// Lines until one satisfies `wanted` (included); panics after `within`.
    fn wait_for(&self, within: Duration, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = wanted(&line);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no wanted line within {within:?}; saw {seen:?}"),
            }
        }
    }

    /// The lines printed within `period`.
    fn lines_within(&self, period: Duration) -> Vec<String> {
        let deadline = Instant::now() + period;
        let mut seen = Vec::new();
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            seen.push(line);
        }
        seen
    }

    fn interrupt(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    }

    fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn kv_client(endpoint: &str) -> KvClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connecting over TCP");
    KvClient::new(channel)
}

fn range(key: &str, range_end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.as_bytes().to_vec(),
        range_end: range_end.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn keys(response: &pb::RangeResponse) -> Vec<String> {
    response
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

// --- etcdctl ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_reads_writes_and_deletes_the_same_keys_as_etcd_store() {
    let served = Served::start().await;
    let store = served.client("/trellis/");
    store.put("nodes/a1", b"up".to_vec()).await.unwrap();

    let listed = served.etcdctl(&["get", "--prefix", "/trellis/"]);
    assert_eq!(listed, "/trellis/nodes/a1\nup\n");
    assert_eq!(
        served.etcdctl(&["put", "/trellis/nodes/b1", "down"]),
        "OK\n"
    );
    assert_eq!(store.get("nodes/b1").await.unwrap().unwrap().value, b"down");
    // The served key space is the embedded store's own: one source of truth.
    assert!(
        served
            .store
            .get("/trellis/nodes/b1")
            .await
            .unwrap()
            .is_some()
    );

    let json = served.etcdctl(&["get", "/trellis/nodes/a1", "-w", "json"]);
    for field in [
        "\"cluster_id\":",
        "\"member_id\":",
        "\"revision\":3",
        "\"raft_term\":1",
        "\"version\":1",
    ] {
        assert!(json.contains(field), "{field} in {json}");
    }
    let keys_only = served.etcdctl(&["get", "--prefix", "/trellis/", "--keys-only"]);
    assert_eq!(keys_only, "/trellis/nodes/a1\n\n/trellis/nodes/b1\n\n");
    let newest = served.etcdctl(&[
        "get",
        "--prefix",
        "/trellis/",
        "--sort-by=MODIFY",
        "--order=DESCEND",
        "--limit=1",
    ]);
    assert_eq!(newest, "/trellis/nodes/b1\ndown\n");
    assert_eq!(
        served.etcdctl(&["del", "--prefix", "/trellis/nodes/"]),
        "2\n"
    );
    assert!(store.list("").await.unwrap().0.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_sees_a_put_made_through_etcd_store() {
    let served = Served::start().await;
    let store = served.client("/t/");
    // From the next revision, so that the put cannot slip in before the watch exists.
    let next = store.list("").await.unwrap().1 + 1;
    let watch = served.etcdctl_running(&["watch", "--prefix", "/t/", &format!("--rev={next}")]);
    store.put("nodes/a1", b"hello".to_vec()).await.unwrap();
    store.delete("nodes/a1").await.unwrap();
    let lines = watch.wait_for(Duration::from_secs(10), |l| l == "DELETE");
    assert_eq!(lines, ["PUT", "/t/nodes/a1", "hello", "DELETE"]);
    let lines = watch.wait_for(Duration::from_secs(10), |l| l == "/t/nodes/a1");
    assert_eq!(lines, ["/t/nodes/a1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_grants_keeps_alive_inspects_and_revokes_leases() {
    let served = Served::start().await;
    let store = served.client("/t/");
    let granted = served.etcdctl(&["lease", "grant", "30"]);
    // "lease 0000000000000001 granted with TTL(30s)"
    let id = granted
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert!(granted.contains("granted with TTL(30s)"), "{granted}");
    served.etcdctl(&["put", "/t/leased", "x", &format!("--lease={id}")]);
    let lease = u64::from_str_radix(&id, 16).unwrap();
    assert_eq!(
        store.get("leased").await.unwrap().unwrap().lease,
        Some(lease)
    );

    let kept = served.etcdctl(&["lease", "keep-alive", "--once", &id]);
    assert!(kept.contains("keepalived with TTL(30)"), "{kept}");
    let ttl = served.etcdctl(&["lease", "timetolive", "--keys", &id]);
    assert!(ttl.contains("granted with TTL(30s)"), "{ttl}");
    assert!(ttl.contains("attached keys([/t/leased])"), "{ttl}");
    assert!(served.etcdctl(&["lease", "list"]).contains(&id));
    // A lease granted by EtcdStore is the same kind of lease.
    let other = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    assert!(
        served
            .etcdctl(&["lease", "list"])
            .contains(&format!("{other:016x}"))
    );

    assert!(
        served
            .etcdctl(&["lease", "revoke", &id])
            .contains("revoked")
    );
    assert_eq!(store.get("leased").await.unwrap(), None);
    let gone = served.etcdctl(&["lease", "timetolive", &id]);
    assert!(gone.contains("already expired"), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_txn_takes_the_branch_its_compares_choose() {
    let served = Served::start().await;
    served.etcdctl(&["put", "k", "v1"]); // revision 2, version 1
    let txn = |input: &str| served.etcdctl_with_input(&["txn"], Some(input));

    let taken = txn(
        "val(\"k\") = \"v1\"\nver(\"k\") = \"1\"\nc(\"k\") = \"2\"\n\nput k v2\nput other yes\n\nput k never\n\n",
    );
    assert!(taken.starts_with("SUCCESS"), "{taken}");
    assert_eq!(served.etcdctl(&["get", "k", "--print-value-only"]), "v2\n");
    let failed = txn("mod(\"k\") < \"3\"\n\nput k never\n\nget other\n\n");
    assert!(failed.starts_with("FAILURE"), "{failed}");
    assert!(
        failed.contains("other\nyes"),
        "the failure branch's get: {failed}"
    );
    let missing = txn("val(\"missing\") != \"x\"\n\nput k never\n\n\n");
    assert!(
        missing.starts_with("FAILURE"),
        "a value compare on a missing key fails: {missing}"
    );
    // etcd refuses writing one key twice in a txn; so does the server.
    let out = served.etcdctl_output(&["txn"], Some("\nput d 1\ndel d\n\n\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("duplicate key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_fails_over_between_candidates() {
    // Campaigning is txn + range (sorted, filtered by create revision) + watch + lease.
    let served = Served::start().await;
    let first = served.etcdctl_running(&["elect", "trellis-election", "p1"]);
    let lines = first.wait_for(Duration::from_secs(10), |l| l == "p1");
    assert!(lines[0].starts_with("trellis-election/"), "{lines:?}");
    let mut second = served.etcdctl_running(&["elect", "trellis-election", "p2"]);
    let observer = served.etcdctl_running(&["elect", "-l", "trellis-election"]);
    observer.wait_for(Duration::from_secs(10), |l| l == "p1");
    assert!(
        second.lines_within(Duration::from_millis(800)).is_empty(),
        "the second candidate waits while the first leads"
    );

    // An interrupted candidate resigns (revokes its session's lease).
    let mut first = first;
    first.interrupt();
    assert!(first.wait_exit(Duration::from_secs(10)), "p1 resigned");
    second.wait_for(Duration::from_secs(10), |l| l == "p2");
    observer.wait_for(Duration::from_secs(10), |l| l == "p2");
    second.interrupt();
    assert!(second.wait_exit(Duration::from_secs(10)));
    let left = served.etcdctl(&["get", "--prefix", "trellis-election"]);
    assert_eq!(left, "", "resigned candidates leave no keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_health_and_members_over_unix_and_status_over_tcp() {
    let served = Served::start().await;
    // etcdctl 3.4 reports health on stderr.
    let out = served.etcdctl_output(&["endpoint", "health"], None);
    let health = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{health}");
    assert!(health.contains("unix://store.sock is healthy"), "{health}");
    let members = served.etcdctl(&["member", "list"]);
    assert!(members.contains("trellis-embedded"), "{members}");
    assert!(members.contains(&served.endpoint()), "{members}");

    let tcp = serve_tcp(served.store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Without a scheme: etcdctl's direct dial would send "http://…" as the authority.
    let address = tcp.endpoint().trim_start_matches("http://").to_string();
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={address}"))
        .args(["endpoint", "status", "-w", "json"])
        .output()
        .expect("etcdctl");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{status}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for field in ["\"version\":\"3.4.0\"", "\"leader\":", "\"raftTerm\":1"] {
        assert!(status.contains(field), "{field} in {status}");
    }
    tcp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_served_answers_unimplemented_and_says_so() {
    let served = Served::start().await;
    let out = served.etcdctl_output(&["user", "list"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Unimplemented") && stderr.contains("etcdserverpb.Auth"),
        "{stderr}"
    );
    // EtcdStore with credentials authenticates first: a clear error, not a hang.
    let mut with_user = config(&served.endpoint(), "/t/");
    with_user.credentials = Some(Credentials {
        user: "u".into(),
        password: "p".into(),
    });
    let error = EtcdStore::new(with_user)
        .unwrap()
        .get("k")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("not implemented"), "{error}");
}

// --- The protocol over raw gRPC --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_follow_etcd() {
    let store = EmbeddedStore::new();
    let server = serve_tcp(store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut kv = kv_client(server.endpoint()).await;
    for (key, value) in [("b", "2"), ("a", "3"), ("c", "1"), ("d", "0")] {
        store.put(key, value.as_bytes().to_vec()).await.unwrap(); // revisions 2..=5
    }
    store.put("a", b"33".to_vec()).await.unwrap(); // 6: a is version 2

    let get = |request: pb::RangeRequest| {
        let mut kv = kv.clone();
        async move { kv.range(request).await.map(|r| r.into_inner()) }
    };
    let one = get(range("a", "")).await.unwrap();
    assert_eq!(
        (keys(&one), one.count, one.kvs[0].version),
        (vec!["a".into()], 1, 2)
    );
    assert_eq!(one.header.as_ref().unwrap().revision, 6);
    assert_eq!(keys(&get(range("b", "d")).await.unwrap()), ["b", "c"]);
    assert_eq!(keys(&get(range("b", "\0")).await.unwrap()), ["b", "c", "d"]);
    assert!(get(range("d", "b")).await.unwrap().kvs.is_empty());

    let limited = get(pb::RangeRequest {
        limit: 2,
        ..range("a", "\0")
    })
    .await
    .unwrap();
    assert_eq!(
        (keys(&limited), limited.more, limited.count),
        (vec!["a".into(), "b".into()], true, 4)
    );
    let counted = get(pb::RangeRequest {
        count_only: true,
        ..range("a", "\0")
    })
    .await
    .unwrap();
    assert_eq!((counted.kvs.len(), counted.count), (0, 4));
    let keys_only = get(pb::RangeRequest {
        keys_only: true,
        ..range("a", "")
    })
    .await
    .unwrap();
    assert!(keys_only.kvs[0].value.is_empty());
    use pb::range_request::{SortOrder, SortTarget};
    let by_value = get(pb::RangeRequest {
        sort_target: SortTarget::Value as i32,
        sort_order: SortOrder::Descend as i32,
        ..range("a", "\0")
    })
    .await
    .unwrap();
    assert_eq!(keys(&by_value), ["a", "b", "c", "d"]); // "33" > "2" > "1" > "0"
    let oldest_created = get(pb::RangeRequest {
        sort_target: SortTarget::Create as i32,
        limit: 1,
        ..range("a", "\0")
    })
    .await
    .unwrap();
    assert_eq!(
        keys(&oldest_created),
        ["b"],
        "ascending by default for a target"
    );
    let filtered = get(pb::RangeRequest {
        max_create_revision: 3,
        min_mod_revision: 3,
        ..range("a", "\0")
    })
    .await
    .unwrap();
    assert_eq!(
        keys(&filtered),
        ["a"],
        "created by 3, modified at 3 or later"
    );

    // Past revisions: served when nothing in the range changed since, refused otherwise.
    let unchanged = get(pb::RangeRequest {
        revision: 5,
        ..range("b", "")
    })
    .await
    .unwrap();
    assert_eq!(keys(&unchanged), ["b"]);
    let changed = get(pb::RangeRequest {
        revision: 5,
        ..range("a", "")
    })
    .await
    .unwrap_err();
    assert_eq!(changed.code(), tonic::Code::Unimplemented, "{changed:?}");
    let future = get(pb::RangeRequest {
        revision: 99,
        ..range("a", "")
    })
    .await
    .unwrap_err();
    assert_eq!(future.code(), tonic::Code::OutOfRange);
    assert!(future.message().contains("future revision"), "{future:?}");
    let empty = get(range("", "")).await.unwrap_err();
    assert!(empty.message().contains("key is not provided"), "{empty:?}");
    // Keys need not be UTF-8; the Store view shows them lossily.
    kv.put(pb::PutRequest {
        key: b"bin\xff".to_vec(),
        value: b"x".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(store.list("bin").await.unwrap().0[0].key, "bin\u{fffd}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txns_compare_ranges_nest_and_refuse_duplicate_writes() {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    use pb::request_op::Request;
    let store = EmbeddedStore::new();
    let server = serve_tcp(store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut kv = kv_client(server.endpoint()).await;
    store.put("n/a", b"1".to_vec()).await.unwrap(); // 2
    store.put("n/b", b"1".to_vec()).await.unwrap(); // 3

    let compare = |key: &str, end: &str, result: CompareResult, union: TargetUnion| {
        let target = match union {
            TargetUnion::Version(_) => CompareTarget::Version,
            TargetUnion::CreateRevision(_) => CompareTarget::Create,
            TargetUnion::ModRevision(_) => CompareTarget::Mod,
            TargetUnion::Value(_) => CompareTarget::Value,
            TargetUnion::Lease(_) => CompareTarget::Lease,
        };
        pb::Compare {
            result: result as i32,
            target: target as i32,
            key: key.into(),
            range_end: end.into(),
            target_union: Some(union),
        }
    };
    let put = |key: &str| pb::RequestOp {
        request: Some(Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: b"x".to_vec(),
            prev_kv: true,
            ..Default::default()
        })),
    };
    let delete = |key: &str| pb::RequestOp {
        request: Some(Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    };

    // A compare over a range holds only if it holds for every key in it.
    let every_value_is_1 = compare(
        "n/",
        "n0",
        CompareResult::Equal,
        TargetUnion::Value(b"1".to_vec()),
    );
    let all_created_after_1 = compare(
        "n/",
        "n0",
        CompareResult::Greater,
        TargetUnion::CreateRevision(1),
    );
    let some_mod_below_3 = compare("n/", "n0", CompareResult::Less, TargetUnion::ModRevision(3));
    let no_lease = compare("n/a", "", CompareResult::Equal, TargetUnion::Lease(0));
    let missing_has_version_0 = compare("zz", "", CompareResult::Equal, TargetUnion::Version(0));
    let txn = pb::TxnRequest {
        compare: vec![
            every_value_is_1,
            all_created_after_1,
            no_lease,
            missing_has_version_0,
        ],
        success: vec![
            put("n/a"),
            // A nested txn decides on the state before the outer one wrote anything.
            pb::RequestOp {
                request: Some(Request::RequestTxn(pb::TxnRequest {
                    compare: vec![compare(
                        "n/a",
                        "",
                        CompareResult::Equal,
                        TargetUnion::Value(b"1".to_vec()),
                    )],
                    success: vec![put("nested")],
                    failure: vec![],
                })),
            },
            pb::RequestOp {
                request: Some(Request::RequestRange(range("n/", "n0"))),
            },
        ],
        failure: vec![],
    };
    let answer = kv.txn(txn).await.unwrap().into_inner();
    assert!(answer.succeeded);
    assert_eq!(answer.header.as_ref().unwrap().revision, 4, "one revision");
    use pb::response_op::Response;
    let responses: Vec<_> = answer
        .responses
        .iter()
        .map(|r| r.response.clone().unwrap())
        .collect();
    let Response::ResponsePut(put_answer) = &responses[0] else {
        panic!("{responses:?}")
    };
    assert_eq!(put_answer.prev_kv.as_ref().unwrap().value, b"1");
    let Response::ResponseTxn(nested) = &responses[1] else {
        panic!("{responses:?}")
    };
    assert!(nested.succeeded);
    let Response::ResponseRange(read) = &responses[2] else {
        panic!("{responses:?}")
    };
    assert_eq!(
        read.kvs[0].value, b"x",
        "a read in a txn sees its earlier writes"
    );
    assert!(store.get("nested").await.unwrap().is_some());

    let failing = pb::TxnRequest {
        compare: vec![some_mod_below_3],
        success: vec![put("never")],
        failure: vec![delete("nested")],
    };
    let answer = kv.txn(failing).await.unwrap().into_inner();
    assert!(!answer.succeeded, "n/a was modified at 4");
    assert_eq!(store.get("nested").await.unwrap(), None);

    for ops in [vec![put("d"), put("d")], vec![delete("d"), put("d")]] {
        let error = kv
            .txn(pb::TxnRequest {
                success: ops,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(error.message().contains("duplicate key"), "{error:?}");
    }
    let too_many = pb::TxnRequest {
        success: (0..129).map(|i| put(&format!("k{i}"))).collect(),
        ..Default::default()
    };
    let error = kv.txn(too_many).await.unwrap_err();
    assert!(error.message().contains("too many operations"), "{error:?}");
    let unknown_lease = pb::PutRequest {
        key: b"k".to_vec(),
        lease: 77,
        ..Default::default()
    };
    let error = kv.put(unknown_lease).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert!(error.message().contains("requested lease not found"));
    server.shutdown().await.unwrap();
}

/// A client that opens a watch and never reads: writers keep their pace, other clients
/// are served, and the watch is cancelled for lagging (which the client learns once it
/// reads); shutting down does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_nobody_waits_for_it() {
    let store = EmbeddedStore::new();
    let server = serve_tcp(store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint().to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (requests, request_stream) = futures::channel::mpsc::channel(4);
    let mut requests = requests;
    requests
        .try_send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: vec![0],
                    range_end: vec![0],
                    prev_kv: true,
                    ..Default::default()
                },
            )),
        })
        .unwrap();
    let mut stream = WatchClient::new(channel)
        .watch(request_stream)
        .await
        .unwrap()
        .into_inner();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created);

    // 3000 events of 4 KiB: far more than the watch buffer and HTTP/2's windows.
    let writer = EtcdStore::new(config(server.endpoint(), "/w/")).unwrap();
    let value = vec![b'x'; 4096];
    let started = Instant::now();
    for i in 0..3000 {
        writer
            .put(&format!("k{i:04}"), value.clone())
            .await
            .unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "writers kept their pace: {:?}",
        started.elapsed()
    );
    let reader = EtcdStore::new(config(server.endpoint(), "/w/")).unwrap();
    assert!(
        reader.get("k2999").await.unwrap().is_some(),
        "others are served"
    );

    let mut events = 0;
    let cancel = loop {
        let answer = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream goes on once read")
            .expect("a healthy stream")
            .expect("a cancel before the end");
        events += answer.events.len();
        if answer.canceled {
            break answer;
        }
    };
    assert!(cancel.cancel_reason.contains("fell behind"), "{cancel:?}");
    assert!(events < 3000, "cut off after {events} events");

    // A second idle reader, left unread: shutting down does not wait for it.
    let mut requests2 = requests.clone();
    requests2
        .try_send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: b"/w/".to_vec(),
                    range_end: b"/w0".to_vec(),
                    start_revision: 1,
                    ..Default::default()
                },
            )),
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    server.shutdown().await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(6),
        "{:?}",
        asked.elapsed()
    );
    drop(requests);
}

// --- The server ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_overflow_is_reported_as_compaction() {
    let served = Served::serving(EmbeddedStore::with_history(4)).await;
    let store = served.client("/t/");
    for i in 0..6 {
        store.put(&format!("k{i}"), b"x".to_vec()).await.unwrap(); // 2..=7
    }
    match suite::watch_error(store.as_ref(), "", 1).await {
        StoreError::Compacted { requested, oldest } => assert_eq!((requested, oldest), (1, 4)),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut watch = store.watch("", 3).await.unwrap();
    assert_eq!(next_event(&mut watch).await.revision(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_clients_apart_in_one_key_space() {
    let served = Served::start().await;
    let trellis = served.client("/trellis/");
    let other = served.client("/other/");
    trellis.put("k", b"1".to_vec()).await.unwrap();
    other.put("k", b"2".to_vec()).await.unwrap();
    assert_eq!(trellis.list("").await.unwrap().0.len(), 1);
    assert_eq!(trellis.get("k").await.unwrap().unwrap().value, b"1");
    let mut watch = trellis.watch("", 1).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut watch).await),
        ("k".into(), "put", 2)
    );
    let raw: Vec<String> = served
        .store
        .list("")
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(raw, ["/other/k", "/trellis/k"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_watches_and_keep_alives_and_removes_the_socket() {
    let mut served = Served::start().await;
    let store = served.client("/t/");
    let mut watch = store.watch("", 1).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let etcdctl_watch = served.etcdctl_running(&["watch", "--prefix", "/t/"]);
    let keep_alive = served.etcdctl_running(&["lease", "keep-alive", &format!("{lease:x}")]);
    keep_alive.wait_for(Duration::from_secs(10), |l| l.contains("keepalived"));
    store.put("k", b"1".to_vec()).await.unwrap();
    next_event(&mut watch).await;

    let asked = Instant::now();
    served.shutdown().await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(!served.socket().exists(), "the socket file is removed");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the watch ends with the server");
    assert!(
        matches!(ended, Some(Err(StoreError::Unavailable(_))) | None),
        "{ended:?}"
    );
    let error = store.get("k").await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
    drop((etcdctl_watch, keep_alive));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_a_stale_one_is_replaced_and_a_live_one_kept() {
    let dir = TempDir::new();
    let path = dir.0.join("store.sock");
    // A socket file left by a dead server.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let first = serve_unix(EmbeddedStore::new(), &path).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(first.endpoint(), format!("unix://{}", path.display()));

    let error = serve_unix(EmbeddedStore::new(), &path).await.err().unwrap();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    let store = EtcdStore::new(config(first.endpoint(), "/t/")).unwrap();
    store.put("still", b"served".to_vec()).await.unwrap();

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let error = serve_unix(EmbeddedStore::new(), &file).await.err().unwrap();
    assert!(error.to_string().contains("not a socket"), "{error}");
    first.shutdown().await.unwrap();
    assert!(!Path::new(&path).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_endpoint_that_nobody_serves_is_unavailable_within_the_deadline() {
    let dir = TempDir::new();
    let endpoint = format!("unix://{}", dir.0.join("nobody.sock").display());
    let store = EtcdStore::new(config(&endpoint, "/t/")).unwrap();
    let asked = Instant::now();
    let error = store.get("k").await.unwrap_err();
    assert!(
        matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{error:?}"
    );
    assert!(asked.elapsed() < Duration::from_secs(3));
    // Served later: the same client connects then.
    let server = serve_unix(EmbeddedStore::new(), dir.0.join("nobody.sock"))
        .await
        .unwrap();
    store.put("k", b"v".to_vec()).await.unwrap();
    server.shutdown().await.unwrap();
}
