//! The election against the embedded store, in paused time, and against a store that
//! stops answering (as a SIGSTOPped etcd does).

use super::work::{ClusterWork, LeaderWorkCounters};
use super::*;
use crate::state::ClusterState;
use async_trait::async_trait;
use std::sync::Mutex;
use trellis_store::embedded::EmbeddedStore;
use trellis_testkit::Freezable;

/// Records the terms it was given and holds each until it ends.
#[derive(Default)]
struct Recorder {
    terms: Mutex<Vec<Revision>>,
}

#[async_trait]
impl LeaderWork for Recorder {
    async fn lead(&self, term: Term) {
        self.terms.lock().unwrap().push(term.epoch);
        term.ended().await;
    }
}

struct Candidate {
    role: watch::Receiver<Role>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(store: Arc<dyn Store>, name: &str, work: Arc<dyn LeaderWork>) -> Candidate {
    let (role_tx, role) = watch::channel(Role::Joining);
    let (shutdown, stop) = watch::channel(false);
    let task = tokio::spawn(campaign_forever(
        store,
        name.to_string(),
        ElectionConfig::default(),
        work,
        role_tx,
        stop,
    ));
    Candidate {
        role,
        shutdown,
        task,
    }
}

async fn wait_role(c: &mut Candidate, within: Duration, want: impl Fn(&Role) -> bool) -> Role {
    tokio::time::timeout(within, c.role.wait_for(|r| want(r)))
        .await
        .expect("role reached in time")
        .expect("campaign alive")
        .clone()
}

fn leading(r: &Role) -> bool {
    matches!(r, Role::Leader { .. })
}

#[tokio::test(start_paused = true)]
async fn one_leader_at_a_time_and_a_clean_release_hands_over_at_once() {
    let store = EmbeddedStore::new();
    let work = Arc::new(Recorder::default());
    let mut a = start(store.clone(), "a", work.clone());
    let Role::Leader { epoch } = wait_role(&mut a, Duration::from_secs(5), leading).await else {
        unreachable!()
    };
    let mut b = start(store.clone(), "b", work.clone());
    wait_role(&mut b, Duration::from_secs(5), |r| *r == Role::Candidate).await;
    assert_eq!(
        current_leader(store.as_ref()).await.unwrap(),
        Some(("a".to_string(), epoch))
    );
    // Stays so through many renewals.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(*b.role.borrow(), Role::Candidate);

    let released = tokio::time::Instant::now();
    a.shutdown.send_replace(true);
    a.task.await.unwrap();
    let Role::Leader { epoch: next } = wait_role(&mut b, Duration::from_secs(20), leading).await
    else {
        unreachable!()
    };
    assert!(next > epoch, "epochs only grow");
    assert!(
        released.elapsed() < Duration::from_secs(1),
        "a released lease hands over without waiting for expiry: {:?}",
        released.elapsed()
    );
    assert_eq!(*work.terms.lock().unwrap(), [epoch, next]);
}

#[tokio::test(start_paused = true)]
async fn a_leader_cut_off_from_the_store_stops_at_its_renew_deadline_and_campaigns_on() {
    let inner = EmbeddedStore::new();
    let store = Freezable::new(inner.clone());
    let work = Arc::new(Recorder::default());
    let mut a = start(store.clone(), "a", work.clone());
    let Role::Leader { epoch } = wait_role(&mut a, Duration::from_secs(5), leading).await else {
        unreachable!()
    };
    let frozen_at = tokio::time::Instant::now();
    store.freeze();
    wait_role(&mut a, Duration::from_secs(30), |r| !leading(r)).await;
    let stopped_after = frozen_at.elapsed();
    let config = ElectionConfig::default();
    assert!(
        stopped_after <= config.renew_deadline,
        "stopped {stopped_after:?} after the store went silent"
    );
    // A minute of silence: the campaign neither exits nor leads.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!a.task.is_finished());
    assert!(!leading(&a.role.borrow()));

    store.thaw();
    let Role::Leader { epoch: next } = wait_role(&mut a, Duration::from_secs(60), leading).await
    else {
        unreachable!()
    };
    assert!(next > epoch);
}

/// What an etcd restart looks like to the leader: silence past its renew deadline, then a
/// store that still holds its lease (etcd extends leases when it restarts).
#[tokio::test(start_paused = true)]
async fn a_session_the_store_kept_leads_again_with_its_epoch_and_nobody_leads_between() {
    let inner = EmbeddedStore::new();
    let store = Freezable::new(inner.clone());
    let mut a = start(store.clone(), "a", Arc::new(Recorder::default()));
    let Role::Leader { epoch } = wait_role(&mut a, Duration::from_secs(5), leading).await else {
        unreachable!()
    };
    let b_work = Arc::new(Recorder::default());
    let mut b = start(inner.clone(), "b", b_work.clone());
    wait_role(&mut b, Duration::from_secs(5), |r| *r == Role::Candidate).await;

    store.freeze();
    wait_role(&mut a, Duration::from_secs(10), |r| !leading(r)).await;
    store.thaw();
    let Role::Leader { epoch: again } = wait_role(&mut a, Duration::from_secs(5), leading).await
    else {
        unreachable!()
    };
    assert_eq!(again, epoch, "the same session, so the same epoch");
    assert!(b_work.terms.lock().unwrap().is_empty(), "b never led");
    assert_eq!(*b.role.borrow(), Role::Candidate);
}

#[tokio::test(start_paused = true)]
async fn a_stale_leaders_writes_are_rejected_by_the_fence() {
    let store = EmbeddedStore::new();
    let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
    let key = keys::candidate(lease);
    let epoch = store
        .txn(
            vec![Compare::Absent(key.clone())],
            vec![Op::Put {
                key: key.clone(),
                value: b"old".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
        .unwrap()
        .revision;
    // The term as its holder sees it: still current.
    let (_still_leading, ended) = watch::channel(false);
    let stale = Term { epoch, key, ended };
    assert!(
        stale
            .txn(store.as_ref(), vec![], vec![put("x", "1")])
            .await
            .unwrap()
    );

    // Paused past its lease: the lease expires and a successor takes over.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut b = start(store.clone(), "b", Arc::new(Recorder::default()));
    wait_role(&mut b, Duration::from_secs(5), leading).await;

    assert!(stale.is_current(), "the stale leader does not know yet");
    let refused = stale
        .txn(store.as_ref(), vec![], vec![put("x", "stale")])
        .await
        .unwrap_err();
    assert!(matches!(refused, FencedError::TermOver(e) if e == epoch));
    assert_eq!(store.get("x").await.unwrap().unwrap().value, b"1");
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        lease: None,
    }
}

#[tokio::test(start_paused = true)]
async fn the_leader_allocates_pod_cidrs_and_collects_departed_nodes() {
    let store = EmbeddedStore::new();
    let settings = trellis_model::ClusterSettings {
        granularity: trellis_model::Granularity::Location,
        gateways_per_location: 1,
        persistent_keepalive: None,
        gateway_health: Default::default(),
        pod_cidr_pool: Some(trellis_model::PodCidrPool {
            cidr: "10.244.0.0/16".parse().unwrap(),
            node_prefix: 24,
        }),
        gc_after_seconds: 60,
        services: None,
    };
    store
        .put(keys::SETTINGS, serde_json::to_vec(&settings).unwrap())
        .await
        .unwrap();
    let node = |name: &str, ip: u8, pod: Option<&str>| {
        serde_json::json!({
            "name": name, "location": "site-a", "internal_ip": format!("172.20.0.{ip}/24"),
            "listen_port": 51820, "overlay_ip": format!("100.64.0.{ip}"),
            "pod_cidrs": pod.into_iter().collect::<Vec<_>>(),
        })
    };
    for (name, ip, pod) in [
        ("a1", 1, Some("10.244.0.0/24")),
        ("a2", 2, None),
        ("a3", 3, None),
    ] {
        store
            .put(
                &keys::node(name),
                serde_json::to_vec(&node(name, ip, pod)).unwrap(),
            )
            .await
            .unwrap();
    }
    // a1 and a2 have live agents; a3's is gone.
    let alive = store.grant_lease(Duration::from_secs(3600)).await.unwrap();
    for name in ["a1", "a2"] {
        let status = serde_json::json!({"node": name, "revision": 1, "nodes": 3, "peers": 0,
            "routes": 0, "gateway": false, "applied": true});
        store
            .txn(
                vec![],
                vec![Op::Put {
                    key: keys::status(name),
                    value: serde_json::to_vec(&status).unwrap(),
                    lease: Some(alive),
                }],
            )
            .await
            .unwrap();
    }
    store
        .put("observations/a1/a3", b"{}".to_vec())
        .await
        .unwrap();
    for (pod, node) in [("on-a3", "a3"), ("on-a2", "a2")] {
        let record = serde_json::json!({"namespace": "shop", "name": pod, "ips": ["10.244.9.2"], "node": node});
        store
            .put(
                &format!("pods/shop/{pod}"),
                serde_json::to_vec(&record).unwrap(),
            )
            .await
            .unwrap();
    }

    let (state_tx, state) = watch::channel(Arc::new(ClusterState::default()));
    tokio::spawn(crate::state::sync_forever(store.clone(), state_tx, None));
    let stats = LeaderWorkCounters::default();
    let work = Arc::new(ClusterWork {
        store: store.clone(),
        state: state.clone(),
        stats: stats.clone(),
    });
    let mut leader = start(store.clone(), "a1", work);
    let Role::Leader { epoch } = wait_role(&mut leader, Duration::from_secs(5), leading).await
    else {
        unreachable!()
    };
    tokio::time::sleep(Duration::from_secs(10)).await;
    let allocation = |name: &str| {
        state
            .borrow()
            .pod_cidrs
            .get(name)
            .map(|a| (a.cidr.to_string(), a.epoch))
    };
    assert_eq!(allocation("a2"), Some(("10.244.1.0/24".into(), epoch)));
    assert_eq!(allocation("a3"), Some(("10.244.2.0/24".into(), epoch)));
    assert_eq!(allocation("a1"), None, "a1 has its own");
    let planned = state.borrow().plan_inputs(&Default::default());
    assert_eq!(
        planned.nodes["a2"].pod_cidrs[0].to_string(),
        "10.244.1.0/24"
    );

    // a3 is collected once it has been gone for gc_after_seconds; nothing else is.
    assert!(store.get(&keys::node("a3")).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(60)).await;
    for key in [
        "nodes/a3",
        "podcidrs/a3",
        "observations/a1/a3",
        "pods/shop/on-a3",
    ] {
        assert!(store.get(key).await.unwrap().is_none(), "{key} collected");
    }
    for key in ["nodes/a1", "nodes/a2", "podcidrs/a2", "pods/shop/on-a2"] {
        assert!(store.get(key).await.unwrap().is_some(), "{key} kept");
    }
    assert_eq!(stats.failures.get(), 0);
}

/// The same fence on a real etcd (Debian's 3.4, on loopback): the stale holder's lease
/// really expires and a real successor takes over, so the compare that refuses the write
/// is etcd's own.
mod on_etcd {
    use super::*;

    use trellis_testkit::etcd as etcd_support;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_leaders_writes_are_rejected_by_etcd() {
        let etcd = etcd_support::Etcd::start();
        let stale_side = etcd.store("/trellis/");
        let successor_side = etcd.store("/trellis/");

        // The stale leader won a term on a short lease, then stopped renewing it, as a
        // SIGSTOPped process does, without learning that its term ended.
        let lease = stale_side
            .grant_lease(Duration::from_secs(2))
            .await
            .unwrap();
        let key = keys::candidate(lease);
        let epoch = stale_side
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![Op::Put {
                    key: key.clone(),
                    value: b"paused".to_vec(),
                    lease: Some(lease),
                }],
            )
            .await
            .unwrap()
            .revision;
        let (_still_believes, ended) = watch::channel(false);
        let stale = Term { epoch, key, ended };
        assert!(
            stale
                .txn(
                    stale_side.as_ref(),
                    vec![],
                    vec![put("pod-cidr", "stale-1")]
                )
                .await
                .unwrap()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while stale_side.get(&stale.key).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the lease never expired");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let work = Arc::new(Recorder::default());
        let mut successor = start(successor_side.clone(), "successor", work.clone());
        let role = wait_role(&mut successor, Duration::from_secs(10), leading).await;
        let Role::Leader { epoch: next } = role else {
            unreachable!()
        };
        assert!(next > epoch, "epochs only grow: {next} > {epoch}");
        let winner = successor_side.get("pod-cidr").await.unwrap().unwrap();

        assert!(stale.is_current(), "the stale leader does not know yet");
        let refused = stale
            .txn(
                stale_side.as_ref(),
                vec![],
                vec![put("pod-cidr", "stale-2")],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, FencedError::TermOver(e) if e == epoch),
            "{refused}"
        );
        let after = successor_side.get("pod-cidr").await.unwrap().unwrap();
        assert_eq!(
            after.value, b"stale-1",
            "nothing written after the term ended"
        );
        assert_eq!(after.mod_revision, winner.mod_revision);
        // The role is published as the term's work starts; the work may still be on its way.
        trellis_testkit::wait_for(
            "the successor's work to start its term",
            Duration::from_secs(5),
            || async { (*work.terms.lock().unwrap() == [next]).then_some(()) },
        )
        .await;
        successor.shutdown.send_replace(true);
        successor.task.await.unwrap();
    }
}
