//! Report to the store what the agent last applied, under a lease: a crashed agent's status
//! disappears on its own, which is how the lab and operators tell a live agent from a dead
//! one without trusting a heartbeat the agent itself would have to keep sending.

use crate::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_model::{AgentStatus, keys};
use trellis_store::{LeaseId, Op, Store};

const LEASE_TTL: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);

pub struct Reporter {
    tx: watch::Sender<Option<AgentStatus>>,
    task: JoinHandle<()>,
    lease: Arc<std::sync::Mutex<Option<LeaseId>>>,
    store: Arc<dyn Store>,
}

impl Reporter {
    pub fn start(store: Arc<dyn Store>, node: String) -> Self {
        let (tx, rx) = watch::channel(None);
        let lease = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn(report_loop(store.clone(), node, rx, lease.clone()));
        Self {
            tx,
            task,
            lease,
            store,
        }
    }

    /// Publish when different from the last status; never blocks the caller.
    pub fn publish(&self, status: AgentStatus) {
        self.tx.send_if_modified(|current| {
            if current.as_ref() == Some(&status) {
                false
            } else {
                *current = Some(status);
                true
            }
        });
    }

    /// Revoke the lease so the status disappears now rather than at expiry.
    pub async fn stop(self) {
        self.task.abort();
        let lease = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = lease {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), self.store.revoke_lease(lease)).await;
        }
    }
}

async fn report_loop(
    store: Arc<dyn Store>,
    node: String,
    mut rx: watch::Receiver<Option<AgentStatus>>,
    lease_slot: Arc<std::sync::Mutex<Option<LeaseId>>>,
) {
    let key = keys::status(&node);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut lease: Option<LeaseId> = None;
    // What the key holds now; a new lease means the old key is gone.
    let mut written: Option<AgentStatus> = None;
    loop {
        let result: trellis_store::Result<()> = async {
            let id = match lease {
                Some(id) => id,
                None => {
                    let id = store.grant_lease(LEASE_TTL).await?;
                    lease = Some(id);
                    *lease_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
                    written = None;
                    id
                }
            };
            store.keep_alive(id).await?;
            let status = rx.borrow_and_update().clone();
            if let Some(status) = status.filter(|s| written.as_ref() != Some(s)) {
                let value = serde_json::to_vec(&status)
                    .map_err(|e| trellis_store::StoreError::Protocol(e.to_string()))?;
                let put = Op::Put {
                    key: key.clone(),
                    value,
                    lease: Some(id),
                };
                store.txn(vec![], vec![put]).await?;
                written = Some(status);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => backoff.reset(),
            Err(e) => {
                if matches!(e, trellis_store::StoreError::LeaseNotFound(_)) {
                    lease = None;
                }
                let delay = backoff.next_delay();
                tracing::warn!(retry_in = ?delay, "reporting status: {e}");
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        // Wake on a new status or when the lease needs renewing, whichever comes first.
        let _ = tokio::time::timeout(RENEW_EVERY, rx.changed()).await;
    }
}
