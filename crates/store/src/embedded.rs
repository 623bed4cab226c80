//! `EmbeddedStore`: the whole `Store` model in memory, for the lab and single-process use.
//!
//! One mutex guards all state, and nothing awaits while holding it: every operation is a
//! short synchronous step, so a plain `std::sync::Mutex` is both simpler and faster than an
//! async one. Watchers are fed with `try_send` under that lock, which is what guarantees
//! that a slow watcher can never block a writer.

use crate::{
    Compare, Event, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// Events kept for watches that resume from a past revision, unless told otherwise.
pub const DEFAULT_HISTORY: usize = 10_000;

/// Live events a watcher may have unread before it is cut off with `WatchLagged`.
pub const WATCH_BUFFER: usize = 1024;

/// Stands in for "never" when a TTL is too large to add to the clock.
const FAR_FUTURE: Duration = Duration::from_secs(60 * 60 * 24 * 365 * 30);

pub struct EmbeddedStore {
    state: Mutex<State>,
    /// Wakes the expiry task when a lease may now expire sooner than it planned for, and
    /// when the store is dropped so that the task can exit.
    expiry_wakeup: Arc<Notify>,
}

impl EmbeddedStore {
    /// An empty store at revision 1 that keeps the last [`DEFAULT_HISTORY`] events.
    ///
    /// Must be called inside a tokio runtime: it spawns the task that expires leases even
    /// when nobody calls the store (panics otherwise, like `tokio::spawn`).
    pub fn new() -> Arc<EmbeddedStore> {
        Self::with_history(DEFAULT_HISTORY)
    }

    /// Like [`EmbeddedStore::new`], keeping only the last `events` events for watches.
    pub fn with_history(events: usize) -> Arc<EmbeddedStore> {
        let runtime = Handle::current();
        let store = Arc::new(EmbeddedStore {
            state: Mutex::new(State::new(events, runtime.clone())),
            expiry_wakeup: Arc::new(Notify::new()),
        });
        runtime.spawn(expire_leases_forever(
            Arc::downgrade(&store),
            store.expiry_wakeup.clone(),
        ));
        store
    }

    /// The state, with expired leases already gone, so that no call ever observes a key
    /// whose lease is past its deadline even if the expiry task has not run yet.
    fn current_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated (every mutation
        // validates first and then applies infallibly), so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.expire_leases(Instant::now());
        state
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Lets the expiry task notice that the store is gone.
        self.expiry_wakeup.notify_one();
    }
}

async fn expire_leases_forever(store: Weak<EmbeddedStore>, wakeup: Arc<Notify>) {
    loop {
        let next_deadline = match store.upgrade() {
            Some(store) => store.current_state().leases.next_deadline(),
            None => return,
        };
        match next_deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = wakeup.notified() => {}
                }
            }
            None => wakeup.notified().await,
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.current_state().keys.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let state = self.current_state();
        let kvs = state
            .keys
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, state.revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        self.current_state().txn(&compares, ops)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        self.current_state().watch(prefix, after)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let id = self.current_state().leases.grant(ttl, Instant::now());
        // The new lease may expire before whatever the expiry task is sleeping towards.
        self.expiry_wakeup.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.current_state().leases.renew(lease, Instant::now())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        if self.current_state().remove_lease(lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }
}

struct State {
    revision: Revision,
    keys: BTreeMap<String, KeyValue>,
    leases: Leases,
    history: History,
    watchers: Watchers,
}

impl State {
    fn new(history: usize, runtime: Handle) -> State {
        State {
            revision: 1,
            keys: BTreeMap::new(),
            leases: Leases::default(),
            history: History::new(history),
            watchers: Watchers::new(runtime),
        }
    }

    fn txn(&mut self, compares: &[Compare], ops: Vec<Op>) -> Result<TxnResult> {
        if !compares.iter().all(|c| self.holds(c)) {
            return Ok(self.txn_result(false));
        }
        // Checked before anything is applied, so that a failing txn changes nothing.
        if let Some(lease) = self.first_missing_lease(&ops) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let revision = self.revision + 1;
        let events = ops
            .into_iter()
            .filter_map(|op| self.apply(op, revision))
            .collect();
        self.commit(revision, events);
        Ok(self.txn_result(true))
    }

    fn txn_result(&self, succeeded: bool) -> TxnResult {
        TxnResult {
            succeeded,
            revision: self.revision,
        }
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::Absent(key) => !self.keys.contains_key(key),
            Compare::ModRevision(key, rev) => {
                self.keys.get(key).is_some_and(|kv| kv.mod_revision == *rev)
            }
            Compare::CreateRevision(key, rev) => self
                .keys
                .get(key)
                .is_some_and(|kv| kv.create_revision == *rev),
            Compare::Value(key, value) => self.keys.get(key).is_some_and(|kv| kv.value == *value),
        }
    }

    fn first_missing_lease(&self, ops: &[Op]) -> Option<LeaseId> {
        ops.iter().find_map(|op| match op {
            Op::Put {
                lease: Some(lease), ..
            } if !self.leases.contains(*lease) => Some(*lease),
            _ => None,
        })
    }

    /// Applies one already-validated op; `None` when it changed nothing.
    fn apply(&mut self, op: Op, revision: Revision) -> Option<Event> {
        match op {
            Op::Put { key, value, lease } => Some(self.put(key, value, lease, revision)),
            Op::Delete { key } => self.delete(&key, revision),
        }
    }

    fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        revision: Revision,
    ) -> Event {
        let previous = self.keys.get(&key);
        let create_revision = previous.map_or(revision, |kv| kv.create_revision);
        if let Some(old_lease) = previous.and_then(|kv| kv.lease) {
            self.leases.detach(old_lease, &key);
        }
        if let Some(lease) = lease {
            self.leases.attach(lease, &key);
        }
        let kv = KeyValue {
            key: key.clone(),
            value,
            create_revision,
            mod_revision: revision,
            lease,
        };
        self.keys.insert(key, kv.clone());
        Event::Put(kv)
    }

    fn delete(&mut self, key: &str, revision: Revision) -> Option<Event> {
        let kv = self.keys.remove(key)?;
        if let Some(lease) = kv.lease {
            self.leases.detach(lease, key);
        }
        Some(Event::Delete {
            key: kv.key,
            revision,
        })
    }

    /// Makes `revision` current if the events changed anything, and tells watchers.
    fn commit(&mut self, revision: Revision, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.revision = revision;
        self.watchers.notify(&events);
        self.history.record(events);
    }

    /// Deletes the lease and its keys in one revision; false if there was no such lease.
    fn remove_lease(&mut self, lease: LeaseId) -> bool {
        let Some(keys) = self.leases.remove(lease) else {
            return false;
        };
        let revision = self.revision + 1;
        let events = keys
            .iter()
            .filter_map(|key| self.delete(key, revision))
            .collect();
        self.commit(revision, events);
        true
    }

    fn expire_leases(&mut self, now: Instant) {
        for lease in self.leases.due(now) {
            tracing::debug!(lease, "lease expired");
            self.remove_lease(lease);
        }
    }

    fn watch(&mut self, prefix: &str, after: Revision) -> Result<Watch> {
        self.history.check_kept_since(after)?;
        let backlog = self.history.events_since(after, prefix);
        // Room for the whole backlog, so that replaying it never counts as lagging.
        let (tx, rx) = mpsc::channel(WATCH_BUFFER + backlog.len());
        for event in backlog {
            if tx.try_send(Ok(event)).is_err() {
                break; // cannot happen: the channel was sized for the backlog
            }
        }
        self.watchers.add(Watcher {
            prefix: prefix.to_string(),
            after,
            tx,
        });
        Ok(Watch { rx })
    }
}

#[derive(Default)]
struct Leases {
    by_id: HashMap<LeaseId, Lease>,
    last_id: LeaseId,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl Leases {
    fn grant(&mut self, ttl: Duration, now: Instant) -> LeaseId {
        self.last_id += 1;
        let lease = Lease {
            ttl,
            deadline: deadline_after(now, ttl),
            keys: BTreeSet::new(),
        };
        self.by_id.insert(self.last_id, lease);
        self.last_id
    }

    fn renew(&mut self, id: LeaseId, now: Instant) -> Result<()> {
        let lease = self
            .by_id
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = deadline_after(now, lease.ttl);
        Ok(())
    }

    fn contains(&self, id: LeaseId) -> bool {
        self.by_id.contains_key(&id)
    }

    fn attach(&mut self, id: LeaseId, key: &str) {
        if let Some(lease) = self.by_id.get_mut(&id) {
            lease.keys.insert(key.to_string());
        }
    }

    fn detach(&mut self, id: LeaseId, key: &str) {
        if let Some(lease) = self.by_id.get_mut(&id) {
            lease.keys.remove(key);
        }
    }

    /// Forgets the lease and returns the keys that were attached to it.
    fn remove(&mut self, id: LeaseId) -> Option<BTreeSet<String>> {
        self.by_id.remove(&id).map(|lease| lease.keys)
    }

    fn due(&self, now: Instant) -> Vec<LeaseId> {
        let mut due: Vec<LeaseId> = self
            .by_id
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        // Oldest lease first, so that expiry order (and so revisions) is deterministic.
        due.sort_unstable();
        due
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.by_id.values().map(|lease| lease.deadline).min()
    }
}

fn deadline_after(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl).unwrap_or(now + FAR_FUTURE)
}

/// The last events, for watches that resume from a past revision.
struct History {
    events: VecDeque<Event>,
    capacity: usize,
    /// Revision of the newest event that was dropped: a watch must start at or after it.
    /// Events are dropped one by one, so part of this revision's events may be gone.
    dropped_through: Revision,
}

impl History {
    fn new(capacity: usize) -> History {
        History {
            events: VecDeque::with_capacity(capacity.min(WATCH_BUFFER)),
            capacity,
            dropped_through: 0,
        }
    }

    fn record(&mut self, events: Vec<Event>) {
        self.events.extend(events);
        while self.events.len() > self.capacity {
            if let Some(dropped) = self.events.pop_front() {
                self.dropped_through = dropped.revision();
            }
        }
    }

    fn check_kept_since(&self, after: Revision) -> Result<()> {
        if after < self.dropped_through {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: self.dropped_through + 1,
            });
        }
        Ok(())
    }

    fn events_since(&self, after: Revision, prefix: &str) -> Vec<Event> {
        let first = self.events.partition_point(|e| e.revision() <= after);
        self.events
            .range(first..)
            .filter(|e| e.key().starts_with(prefix))
            .cloned()
            .collect()
    }
}

struct Watcher {
    prefix: String,
    /// Only events after this revision; matters when a watch starts in the future.
    after: Revision,
    tx: mpsc::Sender<Result<Event>>,
}

struct Watchers {
    list: Vec<Watcher>,
    /// Where to spawn the tasks that tell lagging watchers they were cut off.
    runtime: Handle,
}

impl Watchers {
    fn new(runtime: Handle) -> Watchers {
        Watchers {
            list: Vec::new(),
            runtime,
        }
    }

    fn add(&mut self, watcher: Watcher) {
        self.list.retain(|w| !w.tx.is_closed());
        self.list.push(watcher);
    }

    fn notify(&mut self, events: &[Event]) {
        let runtime = &self.runtime;
        self.list
            .retain(|watcher| deliver_or_drop(watcher, events, runtime));
    }
}

/// Sends the events the watcher wants; false when the watcher must be dropped.
fn deliver_or_drop(watcher: &Watcher, events: &[Event], runtime: &Handle) -> bool {
    let wanted = events
        .iter()
        .filter(|e| e.revision() > watcher.after && e.key().starts_with(&watcher.prefix));
    for event in wanted {
        match watcher.tx.try_send(Ok(event.clone())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tell_lagged(watcher.tx.clone(), runtime);
                return false;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
    }
    true
}

/// Delivers `WatchLagged` once the consumer has drained room for it, without making the
/// writer wait; the stream ends after it.
fn tell_lagged(tx: mpsc::Sender<Result<Event>>, runtime: &Handle) {
    tracing::warn!("watcher fell {WATCH_BUFFER} events behind; cutting it off");
    runtime.spawn(async move {
        // An error only means the consumer went away meanwhile: nobody left to tell.
        let _ = tx.send(Err(StoreError::WatchLagged)).await;
    });
}
