//! Keys the agent publishes under one lease: its status and its observations of gateways.
//! A crashed agent's keys disappear on their own when the lease expires, which is how
//! others tell a live agent from a dead one without trusting a heartbeat the agent itself
//! would have to keep sending.
//!
//! Writers never wait on the store: `set` records the wanted value and wakes the writer
//! task, which retries with backoff and rewrites everything after a new lease.

use crate::backoff::Backoff;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use trellis_store::{LeaseId, Op, Store, StoreError};

const LEASE_TTL: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    /// What the keys should hold (None: deleted).
    wanted: BTreeMap<String, Option<Vec<u8>>>,
    lease: Option<LeaseId>,
}

#[derive(Clone)]
pub struct LeasedKeys {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    store: Arc<dyn Store>,
    task: Arc<JoinHandle<()>>,
}

impl LeasedKeys {
    pub fn start(store: Arc<dyn Store>) -> Self {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(write_loop(store.clone(), shared.clone(), wake.clone()));
        Self {
            shared,
            wake,
            store,
            task: Arc::new(task),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish `value` at `key` (no-op when unchanged).
    pub fn set(&self, key: String, value: Vec<u8>) {
        let changed = {
            let mut shared = self.lock();
            let slot = shared.wanted.entry(key).or_default();
            let changed = slot.as_ref() != Some(&value);
            *slot = Some(value);
            changed
        };
        if changed {
            self.wake.notify_one();
        }
    }

    pub fn remove(&self, key: &str) {
        let changed = {
            let mut shared = self.lock();
            match shared.wanted.get_mut(key) {
                Some(slot @ Some(_)) => {
                    *slot = None;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.wake.notify_one();
        }
    }

    /// Revoke the lease so every key disappears now rather than at expiry.
    pub async fn stop(self) {
        self.task.abort();
        let lease = self.lock().lease;
        if let Some(lease) = lease {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.store.revoke_lease(lease)).await;
        }
    }
}

async fn write_loop(store: Arc<dyn Store>, shared: Arc<Mutex<Shared>>, wake: Arc<Notify>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    // What the store holds under the current lease.
    let mut written: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    let mut lease: Option<LeaseId> = None;
    let mut last_renew = tokio::time::Instant::now();
    loop {
        let result: trellis_store::Result<()> = async {
            let id = match lease {
                Some(id) => id,
                None => {
                    let id = store.grant_lease(LEASE_TTL).await?;
                    lease = Some(id);
                    shared.lock().unwrap_or_else(|e| e.into_inner()).lease = Some(id);
                    written.clear();
                    last_renew = tokio::time::Instant::now();
                    id
                }
            };
            if last_renew.elapsed() >= RENEW_EVERY {
                store.keep_alive(id).await?;
                last_renew = tokio::time::Instant::now();
            }
            let wanted = shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .wanted
                .clone();
            let ops: Vec<Op> = wanted
                .iter()
                .filter(|(k, v)| written.get(*k).and_then(Option::as_ref) != v.as_ref())
                .map(|(key, value)| match value {
                    Some(value) => Op::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease: Some(id),
                    },
                    None => Op::Delete { key: key.clone() },
                })
                .collect();
            if !ops.is_empty() {
                store.txn(vec![], ops).await?;
                written = wanted;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => backoff.reset(),
            Err(e) => {
                if matches!(e, StoreError::LeaseNotFound(_)) {
                    lease = None;
                }
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "publishing status and observations: {e}");
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        // Wake on a change or when the lease needs renewing, whichever comes first.
        let until_renew = RENEW_EVERY.saturating_sub(last_renew.elapsed());
        let _ = tokio::time::timeout(until_renew, wake.notified()).await;
    }
}
