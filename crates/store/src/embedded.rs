//! `EmbeddedStore`: the whole `Store` model in memory, for the lab and single-process use.
//!
//! One mutex guards all state, and nothing awaits while holding it: every operation is a
//! short synchronous step, so a plain `std::sync::Mutex` is both simpler and faster than an
//! async one. Watchers are fed with `try_send` under that lock, which is what guarantees
//! that a slow watcher can never block a writer.
//!
//! The state is etcd's key space, not only the `Store` trait's: keys are raw bytes, every
//! key has a version, events carry the previous value, and the crate-private API below
//! (key ranges, lease details, compaction) is what `etcd::server` serves etcd's protocol
//! with. The `Store` trait is a view of the same state: its keys are the UTF-8 keys (a key
//! some etcd client wrote in other bytes is shown lossily), and it is the single source of
//! truth for both.

use crate::{
    Compare, Event, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
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

    /// The revision of the last write.
    pub fn revision(&self) -> Revision {
        self.lock().revision()
    }

    /// Forgets the history before `revision`, like etcd's compaction: watches from an
    /// earlier revision get `Compacted` from then on. A revision not after the last
    /// compaction is `Compacted`; one in the future is a `Protocol` error.
    pub fn compact(&self, revision: Revision) -> Result<()> {
        self.lock().compact(revision)
    }

    /// The state, with expired leases already gone, so that no call ever observes a key
    /// whose lease is past its deadline even if the expiry task has not run yet.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated (every mutation
        // validates first and then applies infallibly), so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.expire_leases(Instant::now());
        state
    }

    /// Grants a lease of `ttl`, with the given id if it is free (etcd lets clients pick).
    pub(crate) fn grant(&self, ttl: Duration, id: Option<LeaseId>) -> Option<LeaseId> {
        let granted = self.lock().leases.grant(ttl, id, Instant::now());
        // The new lease may expire before whatever the expiry task is sleeping towards.
        self.expiry_wakeup.notify_one();
        granted
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
            Some(store) => store.lock().leases.next_deadline(),
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
        Ok(self.lock().get(key.as_bytes()).map(Entry::key_value))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let state = self.lock();
        let kvs = state
            .range(&KeyRange::prefix(prefix.as_bytes()))
            .map(Entry::key_value)
            .collect();
        Ok((kvs, state.revision()))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        self.lock().txn(&compares, ops)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        let (_, rx) = self.lock().watch(
            KeyRange::prefix(prefix.as_bytes()),
            Some(after),
            |capacity| {
                let (tx, rx) = mpsc::channel(capacity);
                (Sink::Events(tx), rx)
            },
        )?;
        Ok(Watch { rx })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // Without an id asked for, granting cannot fail.
        self.grant(ttl, None)
            .ok_or_else(|| StoreError::Protocol("no lease id left".into()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.lock().leases.renew(lease, Instant::now()).map(|_| ())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        if self.lock().remove_lease(lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }
}

/// One key as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: Vec<u8>,
    /// Shared, so that copying a range out of the lock costs no value copies.
    pub value: Arc<[u8]>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Writes since the key was created: 1 for a new key (etcd's version).
    pub version: i64,
    pub lease: Option<LeaseId>,
}

impl Entry {
    fn key_value(&self) -> KeyValue {
        KeyValue {
            key: String::from_utf8_lossy(&self.key).into_owned(),
            value: self.value.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: self.lease,
        }
    }
}

/// A change to one key, as watches see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub kind: ChangeKind,
    /// The key after a put; after a delete only its key and (as mod_revision) the revision
    /// of the delete, the rest zero, as etcd reports deletions.
    pub kv: Entry,
    /// The key before the change, if it existed.
    pub prev: Option<Entry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Put,
    Delete,
}

impl Change {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }

    fn event(&self) -> Event {
        match self.kind {
            ChangeKind::Put => Event::Put(self.kv.key_value()),
            ChangeKind::Delete => Event::Delete {
                key: String::from_utf8_lossy(&self.kv.key).into_owned(),
                revision: self.kv.mod_revision,
            },
        }
    }
}

/// What a byte-level (etcd protocol) watch receives.
#[derive(Debug)]
pub(crate) enum Feed {
    Change(Arc<Change>),
    /// The watcher fell [`WATCH_BUFFER`] changes behind and was dropped; nothing follows.
    Lagged,
}

/// A set of keys as etcd gives them: one key, `[start, end)`, or every key from `start` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyRange {
    start: Vec<u8>,
    end: RangeEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RangeEnd {
    Single,
    Before(Vec<u8>),
    Unbounded,
}

impl KeyRange {
    /// etcd's `key` and `range_end`: an empty end is the key alone, `"\0"` every key from
    /// `key` on, anything else the keys in `[key, range_end)` (none if it is not after key).
    pub fn new(key: Vec<u8>, range_end: Vec<u8>) -> KeyRange {
        let end = match range_end.as_slice() {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            _ => RangeEnd::Before(range_end),
        };
        KeyRange { start: key, end }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        KeyRange::new(prefix.to_vec(), crate::prefix_end(prefix))
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_slice(),
            RangeEnd::Before(end) => self.start.as_slice() <= key && key < end.as_slice(),
            RangeEnd::Unbounded => self.start.as_slice() <= key,
        }
    }

    fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        let start = Bound::Included(self.start.as_slice());
        match &self.end {
            RangeEnd::Single => (start, Bound::Included(self.start.as_slice())),
            // An end not after the start is an empty range (BTreeMap would panic).
            RangeEnd::Before(end) if end.as_slice() <= self.start.as_slice() => {
                (start, Bound::Excluded(self.start.as_slice()))
            }
            RangeEnd::Before(end) => (start, Bound::Excluded(end.as_slice())),
            RangeEnd::Unbounded => (start, Bound::Unbounded),
        }
    }
}

/// Everything the store holds. Crate-private methods are the primitives `etcd::server`
/// builds etcd's operations from; each keeps the invariants (revisions, lease attachments,
/// history and watchers) itself, so a caller cannot leave the state inconsistent.
pub(crate) struct State {
    revision: Revision,
    keys: BTreeMap<Vec<u8>, Entry>,
    pub(crate) leases: Leases,
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

    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.keys.get(key)
    }

    /// The keys in the range, in key order.
    pub fn range(&self, range: &KeyRange) -> impl Iterator<Item = &Entry> {
        self.keys.range::<[u8], _>(range.bounds()).map(|(_, e)| e)
    }

    /// Whether any key in the range changed after `revision`, as far as the history tells;
    /// `None` when the history no longer reaches back that far.
    pub fn changed_since(&self, range: &KeyRange, revision: Revision) -> Option<bool> {
        if revision < self.history.dropped_through {
            return None;
        }
        Some(
            self.history
                .events
                .iter()
                .rev()
                .take_while(|c| c.revision() > revision)
                .any(|c| range.contains(&c.kv.key)),
        )
    }

    /// Approximate bytes held by keys and values, for etcd's status.
    pub fn size(&self) -> usize {
        self.keys
            .values()
            .map(|e| e.key.len() * 2 + e.value.len() + 64)
            .sum()
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
        let changes = ops
            .into_iter()
            .filter_map(|op| self.apply(op, revision))
            .collect();
        self.commit(revision, changes);
        Ok(self.txn_result(true))
    }

    fn txn_result(&self, succeeded: bool) -> TxnResult {
        TxnResult {
            succeeded,
            revision: self.revision,
        }
    }

    fn holds(&self, compare: &Compare) -> bool {
        let get = |key: &String| self.keys.get(key.as_bytes());
        match compare {
            Compare::Absent(key) => get(key).is_none(),
            Compare::ModRevision(key, rev) => get(key).is_some_and(|kv| kv.mod_revision == *rev),
            Compare::CreateRevision(key, rev) => {
                get(key).is_some_and(|kv| kv.create_revision == *rev)
            }
            Compare::Value(key, value) => get(key).is_some_and(|kv| *kv.value == **value),
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
    fn apply(&mut self, op: Op, revision: Revision) -> Option<Change> {
        match op {
            Op::Put { key, value, lease } => {
                Some(self.put(key.into_bytes(), value.into(), lease, revision))
            }
            Op::Delete { key } => self.delete(key.as_bytes(), revision),
        }
    }

    /// Writes the key at `revision`, which must be `revision() + 1`, and whose changes
    /// must then be handed to [`State::commit`]. The lease must exist (or be `None`).
    pub fn put(
        &mut self,
        key: Vec<u8>,
        value: Arc<[u8]>,
        lease: Option<LeaseId>,
        revision: Revision,
    ) -> Change {
        let prev = self.keys.get(&key).cloned();
        if let Some(old_lease) = prev.as_ref().and_then(|kv| kv.lease) {
            self.leases.detach(old_lease, &key);
        }
        if let Some(lease) = lease {
            self.leases.attach(lease, &key);
        }
        let kv = Entry {
            key: key.clone(),
            value,
            create_revision: prev.as_ref().map_or(revision, |kv| kv.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |kv| kv.version + 1),
            lease,
        };
        self.keys.insert(key, kv.clone());
        Change {
            kind: ChangeKind::Put,
            kv,
            prev,
        }
    }

    /// Deletes the key at `revision` (see [`State::put`]); `None` if there was no such key.
    pub fn delete(&mut self, key: &[u8], revision: Revision) -> Option<Change> {
        let prev = self.keys.remove(key)?;
        if let Some(lease) = prev.lease {
            self.leases.detach(lease, key);
        }
        Some(Change {
            kind: ChangeKind::Delete,
            kv: Entry {
                key: prev.key.clone(),
                value: Arc::from(&[][..]),
                create_revision: 0,
                mod_revision: revision,
                version: 0,
                lease: None,
            },
            prev: Some(prev),
        })
    }

    /// Makes `revision` current if the changes changed anything, and tells watchers.
    pub fn commit(&mut self, revision: Revision, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let changes: Vec<Arc<Change>> = changes.into_iter().map(Arc::new).collect();
        self.revision = revision;
        self.watchers.notify(&changes);
        self.history.record(changes);
    }

    /// Deletes the lease and its keys in one revision; false if there was no such lease.
    pub fn remove_lease(&mut self, lease: LeaseId) -> bool {
        let Some(keys) = self.leases.remove(lease) else {
            return false;
        };
        let revision = self.revision + 1;
        let changes = keys
            .iter()
            .filter_map(|key| self.delete(key, revision))
            .collect();
        self.commit(revision, changes);
        true
    }

    fn expire_leases(&mut self, now: Instant) {
        for lease in self.leases.due(now) {
            tracing::debug!(lease, "lease expired");
            self.remove_lease(lease);
        }
    }

    pub fn compact(&mut self, revision: Revision) -> Result<()> {
        if revision > self.revision {
            return Err(StoreError::Protocol(format!(
                "revision {revision} is in the future (current is {})",
                self.revision
            )));
        }
        self.history.compact(revision)
    }

    /// A watcher of the range for changes after `after` (`None`: after the current
    /// revision), fed through the sink that `channel` makes for the capacity it is given.
    /// Returns the revision the watch starts from, with the receiving end.
    pub fn watch<R>(
        &mut self,
        range: KeyRange,
        after: Option<Revision>,
        channel: impl FnOnce(usize) -> (Sink, R),
    ) -> Result<(Revision, R)> {
        let after = after.unwrap_or(self.revision);
        self.history.check_kept_since(after)?;
        let backlog = self.history.changes_since(after, &range);
        // Room for the whole backlog, so that replaying it never counts as lagging.
        let (sink, rx) = channel(WATCH_BUFFER + backlog.len());
        let watcher = Watcher { range, after, sink };
        for change in &backlog {
            // Cannot fail for lack of room: the channel was sized for the backlog.
            if !watcher.sink.try_send(change) {
                break;
            }
        }
        self.watchers.add(watcher);
        Ok((self.revision, rx))
    }
}

#[derive(Default)]
pub(crate) struct Leases {
    by_id: HashMap<LeaseId, Lease>,
    last_id: LeaseId,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
}

/// What etcd's TimeToLive reports about a lease.
pub(crate) struct LeaseInfo {
    pub ttl: Duration,
    pub remaining: Duration,
    pub keys: Vec<Vec<u8>>,
}

impl Leases {
    /// A new lease with the given id, or the next free one; `None` if the id is taken.
    fn grant(&mut self, ttl: Duration, id: Option<LeaseId>, now: Instant) -> Option<LeaseId> {
        let id = match id {
            Some(id) if id == 0 || self.by_id.contains_key(&id) => return None,
            Some(id) => id,
            None => {
                self.last_id += 1;
                while self.by_id.contains_key(&self.last_id) || self.last_id == 0 {
                    self.last_id = self.last_id.wrapping_add(1);
                }
                self.last_id
            }
        };
        let lease = Lease {
            ttl,
            deadline: deadline_after(now, ttl),
            keys: BTreeSet::new(),
        };
        self.by_id.insert(id, lease);
        Some(id)
    }

    /// Renews the lease to its full TTL, which it returns.
    pub fn renew(&mut self, id: LeaseId, now: Instant) -> Result<Duration> {
        let lease = self
            .by_id
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = deadline_after(now, lease.ttl);
        Ok(lease.ttl)
    }

    pub fn contains(&self, id: LeaseId) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn info(&self, id: LeaseId, now: Instant) -> Option<LeaseInfo> {
        self.by_id.get(&id).map(|lease| LeaseInfo {
            ttl: lease.ttl,
            remaining: lease.deadline.saturating_duration_since(now),
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    pub fn ids(&self) -> Vec<LeaseId> {
        let mut ids: Vec<LeaseId> = self.by_id.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn attach(&mut self, id: LeaseId, key: &[u8]) {
        if let Some(lease) = self.by_id.get_mut(&id) {
            lease.keys.insert(key.to_vec());
        }
    }

    fn detach(&mut self, id: LeaseId, key: &[u8]) {
        if let Some(lease) = self.by_id.get_mut(&id) {
            lease.keys.remove(key);
        }
    }

    /// Forgets the lease and returns the keys that were attached to it.
    fn remove(&mut self, id: LeaseId) -> Option<BTreeSet<Vec<u8>>> {
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

/// The last changes, for watches that resume from a past revision.
struct History {
    events: VecDeque<Arc<Change>>,
    capacity: usize,
    /// Revision of the newest change that was dropped (or compacted away): a watch must
    /// start after it. Changes are dropped one by one, so part of this revision's changes
    /// may still be there.
    dropped_through: Revision,
    /// The revision of the last explicit compaction, 0 for none.
    compacted: Revision,
}

impl History {
    fn new(capacity: usize) -> History {
        History {
            events: VecDeque::with_capacity(capacity.min(WATCH_BUFFER)),
            capacity,
            dropped_through: 0,
            compacted: 0,
        }
    }

    fn record(&mut self, changes: Vec<Arc<Change>>) {
        self.events.extend(changes);
        while self.events.len() > self.capacity {
            if let Some(dropped) = self.events.pop_front() {
                self.dropped_through = dropped.revision();
            }
        }
    }

    /// Drops every change before `revision`: watches may start at `revision` or later.
    /// As in etcd, compacting again at or before the last compaction is an error.
    fn compact(&mut self, revision: Revision) -> Result<()> {
        if revision <= self.compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                oldest: self.compacted,
            });
        }
        while self.events.front().is_some_and(|c| c.revision() < revision) {
            self.events.pop_front();
        }
        self.compacted = revision;
        self.dropped_through = self.dropped_through.max(revision - 1);
        Ok(())
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

    fn changes_since(&self, after: Revision, range: &KeyRange) -> Vec<Arc<Change>> {
        let first = self.events.partition_point(|e| e.revision() <= after);
        self.events
            .range(first..)
            .filter(|c| range.contains(&c.kv.key))
            .cloned()
            .collect()
    }
}

/// Where a watcher's changes go: `Store` watches get `Event`s, etcd protocol watches the
/// changes themselves.
pub(crate) enum Sink {
    Events(mpsc::Sender<Result<Event>>),
    Changes(mpsc::Sender<Feed>),
}

impl Sink {
    /// False when the change could not be queued (full or closed).
    fn try_send(&self, change: &Arc<Change>) -> bool {
        match self {
            Sink::Events(tx) => tx.try_send(Ok(change.event())).is_ok(),
            Sink::Changes(tx) => tx.try_send(Feed::Change(change.clone())).is_ok(),
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Sink::Events(tx) => tx.is_closed(),
            Sink::Changes(tx) => tx.is_closed(),
        }
    }

    /// Delivers the lagging notice once the consumer has drained room for it, without
    /// making the writer wait; the stream ends after it.
    fn tell_lagged(&self, runtime: &Handle) {
        tracing::warn!("watcher fell {WATCH_BUFFER} events behind; cutting it off");
        // An error only means the consumer went away meanwhile: nobody left to tell.
        match self {
            Sink::Events(tx) => {
                let tx = tx.clone();
                runtime.spawn(async move {
                    let _ = tx.send(Err(StoreError::WatchLagged)).await;
                });
            }
            Sink::Changes(tx) => {
                let tx = tx.clone();
                runtime.spawn(async move {
                    let _ = tx.send(Feed::Lagged).await;
                });
            }
        }
    }
}

struct Watcher {
    range: KeyRange,
    /// Only changes after this revision; matters when a watch starts in the future.
    after: Revision,
    sink: Sink,
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
        self.list.retain(|w| !w.sink.is_closed());
        self.list.push(watcher);
    }

    fn notify(&mut self, changes: &[Arc<Change>]) {
        let runtime = &self.runtime;
        self.list
            .retain(|watcher| deliver_or_drop(watcher, changes, runtime));
    }
}

/// Sends the changes the watcher wants; false when the watcher must be dropped.
fn deliver_or_drop(watcher: &Watcher, changes: &[Arc<Change>], runtime: &Handle) -> bool {
    let wanted = changes
        .iter()
        .filter(|c| c.revision() > watcher.after && watcher.range.contains(&c.kv.key));
    for change in wanted {
        if !watcher.sink.try_send(change) {
            if !watcher.sink.is_closed() {
                watcher.sink.tell_lagged(runtime);
            }
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(key: &str, end: &str) -> KeyRange {
        KeyRange::new(key.as_bytes().to_vec(), end.as_bytes().to_vec())
    }

    #[test]
    fn key_ranges_follow_etcd() {
        assert!(range("a", "").contains(b"a"));
        assert!(!range("a", "").contains(b"ab"));
        assert!(range("a", "c").contains(b"b"));
        assert!(!range("a", "c").contains(b"c"));
        assert!(range("b", "\0").contains(b"zzz"));
        assert!(!range("b", "\0").contains(b"a"));
        assert!(!range("c", "a").contains(b"c"), "an end before the start");
        assert!(KeyRange::prefix(b"").contains(b"anything"));
        assert!(KeyRange::prefix(b"a/").contains(b"a/b"));
        assert!(!KeyRange::prefix(b"a/").contains(b"a0"));
    }
}
