//! `KubeStore`: Trellis's `Store` on a Kubernetes API server, each record kept in the
//! native object the cluster already has (the table in docs/kubernetes.md).
//!
//! Reads come from a *mirror*: an in-memory store ([`trellis_store::embedded`]) that one
//! reflector per kind keeps equal to what the cluster's objects stand for
//! ([`derive::records`]), listing once and then watching from the last resource version
//! seen, re-listing only when the API answers 410. So the agent keeps its own flow and
//! semantics — revisions, watches that resume, compares — and an API outage is only a
//! mirror that stops changing: the agent keeps its data plane and its state, as with etcd.
//! Records that live under a lease on etcd count only while the Lease that stands for it
//! is live ([`liveness`]), which is how a dead agent's status and opinions disappear.
//!
//! Writes ([`write`]) become the smallest API call that makes the mirror show them: a merge
//! patch of the agent's own Node's annotations, of its own Lease, of one map entry in a
//! Location's status — each only when something changed — with the object's
//! `resourceVersion` as precondition where the record was compared (optimistic
//! concurrency: a stale writer gets 409 and its transaction fails). The object the API
//! returns goes straight into the mirror, so a writer reads its own write.
//!
//! What the API server owns is read-only here: Services, EndpointSlices (kubectl and the
//! controllers write them; ClusterIPs and node ports are the API server's), pod CIDRs
//! (`spec.podCIDRs`), Kilo Peers (users apply them). Writing those is refused, naming the
//! record and what to use instead.

pub mod derive;
pub mod liveness;
mod write;

pub use write::forget_node;

use crate::client::{Change, Kube, KubeError};
use derive::{Kind, ObjectRef, Record};
use futures::StreamExt;
use liveness::Liveness;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_store::backoff::Backoff;
use trellis_store::embedded::EmbeddedStore;
use trellis_store::{KeyValue, LeaseId, Op, Revision, Store, StoreError};

/// How long an API call may be outstanding before this process counts itself cut off
/// from the API (and stops judging other Leases expired: see [`liveness`]).
const CUT_OFF_AFTER: Duration = Duration::from_secs(1);

/// How often the mirror looks for Leases that expired.
const TICK: Duration = Duration::from_millis(200);

/// A `Store` on a Kubernetes API server.
pub struct KubeStore {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    kube: Kube,
    /// Where Trellis's Leases and its settings ConfigMap live.
    namespace: String,
    mirror: Arc<EmbeddedStore>,
    view: tokio::sync::Mutex<View>,
    /// Turns true once every kind was listed once.
    synced: watch::Sender<bool>,
    /// Woken whenever the mirror changed (the election waits on it).
    changed: Notify,
    leases: std::sync::Mutex<HashMap<LeaseId, write::LocalLease>>,
    next_lease: AtomicU64,
    /// When the oldest API call still unanswered was sent, and whether the last one failed.
    calls: std::sync::Mutex<Calls>,
}

#[derive(Default)]
struct Calls {
    outstanding: BTreeMap<u64, Instant>,
    next: u64,
    failing: bool,
}

/// The cluster's objects as last seen, what they stand for, and what the mirror holds.
#[derive(Default)]
struct View {
    objects: BTreeMap<ObjectRef, Value>,
    derived: BTreeMap<ObjectRef, Vec<Record>>,
    liveness: Liveness,
    published: BTreeMap<String, Vec<u8>>,
    listed: HashSet<Kind>,
    /// The watch on Leases is broken.
    leases_unwatched: bool,
    /// As of the last publish: whether this process was cut off from the API, and when the
    /// first Lease would expire. The tick republishes only when either has moved.
    was_cut_off: bool,
    recheck_at: Option<Instant>,
}

impl KubeStore {
    /// Starts mirroring the cluster behind `kube`; Trellis's own objects go in `namespace`.
    /// Must be called within a Tokio runtime.
    pub fn start(kube: Kube, namespace: &str) -> KubeStore {
        let inner = Arc::new(Inner {
            kube,
            namespace: namespace.to_string(),
            mirror: EmbeddedStore::new(),
            view: tokio::sync::Mutex::new(View {
                leases_unwatched: true,
                ..View::default()
            }),
            synced: watch::channel(false).0,
            changed: Notify::new(),
            leases: Default::default(),
            next_lease: AtomicU64::new(initial_lease_id()),
            calls: Default::default(),
        });
        let mut tasks: Vec<JoinHandle<()>> = Kind::ALL
            .iter()
            .map(|kind| tokio::spawn(reflect(inner.clone(), *kind)))
            .collect();
        tasks.push(tokio::spawn(expire(inner.clone())));
        KubeStore { inner, tasks }
    }

    /// Resolves once every kind was listed once.
    pub async fn synced(&self) {
        let _ = self.inner.synced.subscribe().wait_for(|s| *s).await;
    }
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Lease ids are this process's own; starting from the clock keeps two runs of an agent
/// from reusing each other's candidate keys.
fn initial_lease_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (nanos ^ (u64::from(std::process::id()) << 40)) & 0x7fff_ffff_ffff_ffff | 1
}

impl Inner {
    fn kind_namespace(&self, kind: Kind) -> Option<&str> {
        kind.in_own_namespace().then_some(self.namespace.as_str())
    }

    /// An API call, timed for the cut-off rule (see [`CUT_OFF_AFTER`]).
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, KubeError>>,
    ) -> Result<T, KubeError> {
        let id = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.next += 1;
            let id = calls.next;
            calls.outstanding.insert(id, Instant::now());
            id
        };
        let result = call.await;
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.outstanding.remove(&id);
        calls.failing = matches!(
            result,
            Err(KubeError::Timeout { .. } | KubeError::Transport { .. })
        );
        result
    }

    /// Since when this process has been cut off from the API, if it is.
    fn cut_off_since(&self, view: &View, now: Instant) -> Option<Instant> {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let slow = calls
            .outstanding
            .values()
            .min()
            .map(|sent| *sent + CUT_OFF_AFTER)
            .filter(|at| *at <= now);
        if view.leases_unwatched || calls.failing {
            Some(slow.unwrap_or(now))
        } else {
            slow
        }
    }

    /// One object as it is now.
    async fn upsert(&self, kind: Kind, object: Value) {
        let mut view = self.view.lock().await;
        self.upsert_locked(&mut view, kind, object);
        self.publish(&mut view).await;
    }

    fn upsert_locked(&self, view: &mut View, kind: Kind, object: Value) {
        let at = ObjectRef::of(kind, &object);
        if let Some(old) = view.objects.get(&at)
            && newer_version(old, &object)
        {
            return; // a write's answer already put a newer version here
        }
        if kind == Kind::Lease {
            view.liveness.observe(&object, Instant::now());
        }
        view.derived
            .insert(at.clone(), derive::records(kind, &object, &self.namespace));
        view.objects.insert(at, object);
    }

    async fn remove(&self, kind: Kind, object: &Value) {
        let at = ObjectRef::of(kind, object);
        let mut view = self.view.lock().await;
        if kind == Kind::Lease {
            view.liveness.forget(&at.name);
        }
        view.derived.remove(&at);
        view.objects.remove(&at);
        self.publish(&mut view).await;
    }

    /// Every object of `kind` as listed: those not listed are gone.
    async fn replace(&self, kind: Kind, objects: Vec<Value>) {
        let mut view = self.view.lock().await;
        let listed: HashSet<ObjectRef> = objects.iter().map(|o| ObjectRef::of(kind, o)).collect();
        let stale: Vec<ObjectRef> = view
            .objects
            .keys()
            .filter(|at| at.kind == kind && !listed.contains(*at))
            .cloned()
            .collect();
        for at in stale {
            view.objects.remove(&at);
            view.derived.remove(&at);
        }
        if kind == Kind::Lease {
            view.liveness
                .retain(&listed.iter().map(|at| at.name.clone()).collect());
        }
        for object in objects {
            self.upsert_locked(&mut view, kind, object);
        }
        view.listed.insert(kind);
        self.publish(&mut view).await;
        if view.listed.len() == Kind::ALL.len() {
            self.synced.send_replace(true);
        }
    }

    async fn set_leases_unwatched(&self, unwatched: bool) {
        let mut view = self.view.lock().await;
        view.leases_unwatched = unwatched;
        self.publish(&mut view).await;
    }

    /// Brings the mirror to what the objects stand for now.
    async fn publish(&self, view: &mut View) {
        let now = Instant::now();
        let cut_off = self.cut_off_since(view, now);
        view.liveness
            .set_blind(cut_off.is_some(), cut_off.unwrap_or(now));
        view.was_cut_off = cut_off.is_some();
        view.recheck_at = view.liveness.next_expiry(now);
        let mut wanted: BTreeMap<&str, &[u8]> = BTreeMap::new();
        for record in view.derived.values().flatten() {
            let counts = record
                .gate
                .as_deref()
                .is_none_or(|lease| view.liveness.is_live(lease, now));
            if counts {
                wanted.insert(&record.key, &record.value);
            }
        }
        let mut ops = Vec::new();
        for (key, value) in &wanted {
            if view.published.get(*key).map(Vec::as_slice) != Some(*value) {
                ops.push(Op::Put {
                    key: key.to_string(),
                    value: value.to_vec(),
                    lease: None,
                });
            }
        }
        for key in view.published.keys() {
            if !wanted.contains_key(key.as_str()) {
                ops.push(Op::Delete { key: key.clone() });
            }
        }
        if ops.is_empty() {
            return;
        }
        let published: BTreeMap<String, Vec<u8>> = wanted
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        match self.mirror.txn(vec![], ops).await {
            Ok(_) => view.published = published,
            Err(e) => tracing::error!("the Kubernetes mirror refused a write: {e}"),
        }
        self.changed.notify_waiters();
    }
}

/// Whether `old` is a later version of the object than `new` (resource versions are
/// opaque, but the API serves them from one counter: a longer or greater number is newer;
/// anything else is taken as it comes).
fn newer_version(old: &Value, new: &Value) -> bool {
    let version = |o: &Value| {
        o["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse::<u128>().ok())
    };
    match (version(old), version(new)) {
        (Some(old), Some(new)) => old > new,
        _ => false,
    }
}

/// List and watch one kind, forever: resume from the last version seen; list afresh only
/// when the API says that version is gone.
async fn reflect(inner: Arc<Inner>, kind: Kind) {
    let api = kind.api();
    let namespace = inner.kind_namespace(kind).map(String::from);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut missing_said = false;
    'list: loop {
        let mut version = match inner.kube.list(&api, namespace.as_deref()).await {
            Ok((objects, version)) => {
                inner.replace(kind, objects).await;
                version
            }
            Err(KubeError::Refused { code: 404, .. }) if kind.optional() => {
                if !missing_said {
                    missing_said = true;
                    tracing::info!(
                        "no {} in this cluster (its CRD is not installed); looking again every 5 s",
                        api.name()
                    );
                }
                inner.replace(kind, vec![]).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "{e}");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        loop {
            let stream = match inner.kube.watch(&api, namespace.as_deref(), &version).await {
                Ok(stream) => stream,
                Err(e) => {
                    watch_broke(&inner, kind, &mut backoff, e).await;
                    continue;
                }
            };
            if kind == Kind::Lease {
                inner.set_leases_unwatched(false).await;
            }
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => {
                        backoff.reset();
                        version = event.resource_version;
                        match event.change {
                            Change::Applied(object) => inner.upsert(kind, object).await,
                            Change::Deleted(object) => inner.remove(kind, &object).await,
                            Change::Bookmark => {}
                        }
                    }
                    Err(KubeError::Expired { .. }) => {
                        tracing::info!(version, "{}: version expired; listing afresh", api.name());
                        continue 'list;
                    }
                    Err(e) => {
                        watch_broke(&inner, kind, &mut backoff, e).await;
                        break;
                    }
                }
            }
        }
    }
}

/// A watch that could not start or broke: said, and waited for (jittered); while the
/// Leases cannot be watched, nothing is judged expired.
async fn watch_broke(inner: &Inner, kind: Kind, backoff: &mut Backoff, e: KubeError) {
    if kind == Kind::Lease {
        inner.set_leases_unwatched(true).await;
    }
    let delay = backoff.next_delay();
    tracing::warn!(retry_in = ?delay, "{e}");
    tokio::time::sleep(delay).await;
}

/// Re-publishes as Leases expire (and as this process finds itself cut off or back);
/// otherwise the records stand as the last event left them.
async fn expire(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(TICK).await;
        let mut view = inner.view.lock().await;
        let now = Instant::now();
        let cut_off = inner.cut_off_since(&view, now).is_some();
        let expiry_due = view.recheck_at.is_some_and(|at| at <= now);
        if cut_off != view.was_cut_off || expiry_due {
            inner.publish(&mut view).await;
        }
    }
}

/// How an API refusal reads as a store error.
impl From<KubeError> for StoreError {
    fn from(e: KubeError) -> StoreError {
        store_error(e)
    }
}

fn store_error(e: KubeError) -> StoreError {
    match e {
        KubeError::Timeout { after, .. } => StoreError::Timeout(after),
        KubeError::Refused {
            code: 401 | 403, ..
        } => StoreError::Denied(e.to_string()),
        KubeError::Transport { .. } => StoreError::Unavailable(e.to_string()),
        other => StoreError::Protocol(other.to_string()),
    }
}

/// How long a read waits for the first listing of every kind before it fails (the agent
/// then plans from its cache, as when etcd is down).
const SYNC_WAIT: Duration = Duration::from_secs(5);

impl KubeStore {
    async fn wait_synced(&self) -> trellis_store::Result<()> {
        let mut synced = self.inner.synced.subscribe();
        match tokio::time::timeout(SYNC_WAIT, synced.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::Unavailable(
                "the Kubernetes API has not been listed yet".into(),
            )),
        }
    }
}

#[async_trait::async_trait]
impl Store for KubeStore {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.wait_synced().await?;
        self.inner.mirror.get(key).await
    }

    async fn list(&self, prefix: &str) -> trellis_store::Result<(Vec<KeyValue>, Revision)> {
        self.wait_synced().await?;
        self.inner.mirror.list(prefix).await
    }

    async fn txn(
        &self,
        compares: Vec<trellis_store::Compare>,
        ops: Vec<Op>,
    ) -> trellis_store::Result<trellis_store::TxnResult> {
        self.wait_synced().await?;
        write::txn(&self.inner, compares, ops).await
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> trellis_store::Result<trellis_store::Watch> {
        self.inner.mirror.watch(prefix, after).await
    }

    async fn grant_lease(&self, ttl: Duration) -> trellis_store::Result<LeaseId> {
        Ok(write::grant(&self.inner, ttl))
    }

    async fn keep_alive(&self, lease: LeaseId) -> trellis_store::Result<()> {
        write::keep_alive(&self.inner, lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> trellis_store::Result<()> {
        write::revoke(&self.inner, lease).await
    }
}
