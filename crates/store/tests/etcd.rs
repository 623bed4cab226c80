//! The `Store` on a real etcd 3.4 (Debian's), started by each test on loopback: the
//! conformance suite, and what only a real cluster shows (freezes, restarts, TLS, users,
//! losing members).

mod suite;

use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_store::etcd::{Credentials, EtcdStore, TlsFiles};
use trellis_store::{Event, Revision, Store, StoreError, Watch};
use trellis_testkit::etcd::{Etcd, Pki, wait_answering};

struct RealEtcd(Etcd);

impl suite::Backend for RealEtcd {
    async fn start() -> Self {
        RealEtcd(Etcd::start())
    }
    fn store(&self) -> Arc<dyn Store> {
        self.0.store("/t/")
    }
    async fn compact(&self, revision: Revision) {
        self.0.etcdctl(&["compact", &revision.to_string()]);
    }
}

suite::conformance_tests!(RealEtcd);

async fn next_event(watch: &mut Watch) -> Event {
    match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn summary(event: &Event) -> (String, &'static str) {
    let kind = match event {
        Event::Put(_) => "put",
        Event::Delete { .. } => "delete",
    };
    (event.key().to_string(), kind)
}

#[tokio::test]
async fn keys_revisions_and_prefixes_behave_as_in_the_model() {
    let etcd = Etcd::start();
    let store = etcd.store("/trellis/");
    let other = etcd.store("/other/");

    let first = store.put("nodes/a1", b"1".to_vec()).await.unwrap();
    let second = store.put("nodes/a1", b"2".to_vec()).await.unwrap();
    assert_eq!(second, first + 1);
    let kv = store.get("nodes/a1").await.unwrap().expect("a1 exists");
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice()),
        ("nodes/a1", &b"2"[..])
    );
    assert_eq!((kv.create_revision, kv.mod_revision), (first, second));

    store.put("nodes/b1", b"x".to_vec()).await.unwrap();
    store.put("status/a1", b"y".to_vec()).await.unwrap();
    other.put("nodes/zz", b"z".to_vec()).await.unwrap();
    let (nodes, revision) = store.list("nodes/").await.unwrap();
    let keys: Vec<&str> = nodes.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["nodes/a1", "nodes/b1"],
        "sorted, by prefix, not the other user's"
    );
    assert!(revision > second);
    assert_eq!(store.list("").await.unwrap().0.len(), 3);
    // etcdctl sees the keys under the configured prefix.
    assert!(
        etcd.etcdctl(&["get", "--prefix", "/trellis/nodes/"])
            .contains("/trellis/nodes/b1")
    );

    let deleted = store.delete("nodes/b1").await.unwrap();
    assert!(store.get("nodes/b1").await.unwrap().is_none());
    assert_eq!(
        store.delete("nodes/b1").await.unwrap(),
        deleted,
        "deleting what is gone is no new revision"
    );
}

/// SIGSTOP leaves connections open and unanswered: calls must end at their deadline, a
/// watch must notice, and everything must work again after SIGCONT, with the watch
/// resuming from its last revision without losing an event.
#[tokio::test]
async fn a_frozen_etcd_costs_a_deadline_not_a_hang_and_watches_resume() {
    let etcd = Etcd::start();
    let store = etcd.store("/t/");
    let writer = etcd.store("/t/");
    let start = store.list("").await.unwrap().1;
    let mut watch = store.watch("", start).await.unwrap();
    writer.put("before", b"1".to_vec()).await.unwrap();
    let before = next_event(&mut watch).await;

    etcd.freeze();
    let asked = Instant::now();
    let error = store.get("before").await.unwrap_err();
    assert!(matches!(error, StoreError::Timeout(_)), "{error:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    // HTTP/2 keep-alive pings find the silent connection dead and end the watch.
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.next())
        .await
        .expect("the watch of a frozen etcd ends within 15 s");
    assert!(matches!(ended, Some(Err(_)) | None), "{ended:?}");

    etcd.thaw();
    wait_answering(writer.as_ref()).await;
    writer.put("after", b"2".to_vec()).await.unwrap();
    let mut resumed = store.watch("", before.revision()).await.unwrap();
    assert_eq!(
        summary(&next_event(&mut resumed).await),
        ("after".into(), "put")
    );
}

#[tokio::test]
async fn a_restarted_etcd_is_reconnected_and_keeps_history() {
    let mut etcd = Etcd::start();
    let store = etcd.store("/t/");
    let rev = store.put("k", b"1".to_vec()).await.unwrap();
    etcd.kill();
    let error = store.get("k").await.unwrap_err();
    assert!(
        matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_)),
        "{error:?}"
    );
    etcd.restart();
    wait_answering(store.as_ref()).await;
    store.put("k", b"2".to_vec()).await.unwrap();
    let mut watch = store.watch("", rev).await.unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(summary(&event), ("k".into(), "put"));
    assert!(event.revision() > rev);
}

#[tokio::test]
async fn client_certificates_are_required_and_a_wrong_one_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("trt-pki-{}", std::process::id()));
    let pki = Pki::create(&dir);
    let flags = vec![
        format!("--cert-file={}", pki.path("server.pem").display()),
        format!("--key-file={}", pki.path("server.key").display()),
        format!("--trusted-ca-file={}", pki.path("ca.pem").display()),
        "--client-cert-auth".to_string(),
    ];
    let etcd = Etcd::start_with(flags, "https");
    let with = |cert: Option<&str>| {
        let mut config = etcd.config("/t/");
        config.tls = Some(TlsFiles {
            ca: pki.path("ca.pem"),
            cert: cert.map(|c| pki.path(&format!("{c}.pem"))),
            key: cert.map(|c| pki.path(&format!("{c}.key"))),
        });
        EtcdStore::new(config).expect("valid config")
    };
    let trusted = with(Some("client"));
    wait_answering(trusted.as_ref()).await;
    trusted.put("k", b"v".to_vec()).await.unwrap();

    for (cert, why) in [
        (None, "no client certificate"),
        (Some("stranger"), "another CA"),
    ] {
        let error = with(cert).get("k").await.unwrap_err();
        assert!(
            matches!(error, StoreError::Unavailable(_) | StoreError::Timeout(_)),
            "{why}: {error:?}"
        );
    }
    // A server we do not trust: the error says it is about the certificate.
    let mut config = etcd.config("/t/");
    config.tls = Some(TlsFiles {
        ca: pki.path("otherca.pem"),
        cert: Some(pki.path("client.pem")),
        key: Some(pki.path("client.key")),
    });
    let error = EtcdStore::new(config)
        .unwrap()
        .get("k")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn credentials_authenticate_and_a_wrong_password_is_denied() {
    let etcd = Etcd::start();
    etcd.etcdctl(&["user", "add", "root:rootpw"]);
    etcd.etcdctl(&["user", "add", "trellis:s3cret"]);
    etcd.etcdctl(&["role", "add", "trellis"]);
    etcd.etcdctl(&[
        "role",
        "grant-permission",
        "trellis",
        "--prefix=true",
        "readwrite",
        "/trellis/",
    ]);
    etcd.etcdctl(&["user", "grant-role", "trellis", "trellis"]);
    etcd.etcdctl(&["auth", "enable"]);
    let with = |user: &str, password: &str, prefix: &str| {
        let mut config = etcd.config(prefix);
        config.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        EtcdStore::new(config).unwrap()
    };
    let store = with("trellis", "s3cret", "/trellis/");
    store.put("k", b"v".to_vec()).await.unwrap();
    let mut watch = store.watch("", 0).await.unwrap();
    assert_eq!(summary(&next_event(&mut watch).await), ("k".into(), "put"));
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    store.keep_alive(lease).await.unwrap();

    let error = with("trellis", "wrong", "/trellis/")
        .get("k")
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Denied(_)), "{error:?}");
    let error = with("trellis", "s3cret", "/elsewhere/")
        .put("k", vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::Denied(_)),
        "outside its role: {error:?}"
    );
    let anonymous = etcd.store("/trellis/");
    let error = anonymous.get("k").await.unwrap_err();
    assert!(matches!(error, StoreError::Denied(_)), "{error:?}");
}

/// What an operator passing `--store etcd://m0,m1,m2` expects: losing any one member costs
/// the calls in flight and a raft election at most, then every call succeeds while it stays
/// down (no call keeps being sent to it), and a watch resumes on another member from the
/// last revision it delivered, missing nothing.
#[tokio::test]
async fn a_three_member_cluster_serves_through_the_loss_of_any_member() {
    let mut members = Etcd::cluster(3);
    let config = trellis_store::etcd::EtcdConfig {
        endpoints: members.iter().map(Etcd::url).collect(),
        ..members[0].config("/t/")
    };
    let store = EtcdStore::new(config).unwrap();
    wait_answering(store.as_ref()).await;
    let mut seen = store.put("k", b"start".to_vec()).await.unwrap();
    let mut watch = store.watch("", seen).await.unwrap();

    for (victim, member) in members.iter_mut().enumerate() {
        member.kill();
        let value = format!("without m{victim}");
        // Allows for a raft election when the lost member led.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut failed_calls = 0;
        loop {
            match store.put("k", value.clone().into_bytes()).await {
                Ok(_) => break,
                Err(e) => {
                    failed_calls += 1;
                    eprintln!("without m{victim}: {e}");
                    assert!(Instant::now() < deadline, "no write without m{victim}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        for i in 0..20 {
            store
                .put("k", value.clone().into_bytes())
                .await
                .unwrap_or_else(|e| panic!("call {i} after recovering without m{victim}: {e}"));
        }
        let written = store.get("k").await.unwrap().unwrap().mod_revision;
        // Every write in order, across a watch that may have been on the lost member.
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen < written {
            assert!(Instant::now() < deadline, "the watch never caught up");
            match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
                Ok(Some(Ok(event))) => {
                    assert!(event.revision() > seen, "in order, no repeats");
                    seen = event.revision();
                }
                _ => watch = store.watch("", seen).await.unwrap_or(watch),
            }
        }
        assert_eq!(
            store.get("k").await.unwrap().unwrap().value,
            value.as_bytes()
        );
        member.restart();
        // Back in the cluster (it answers a linearizable read) before the next one goes.
        wait_answering(member.store("/t/").as_ref()).await;
        eprintln!("without m{victim}: {failed_calls} failed calls");
    }
}
