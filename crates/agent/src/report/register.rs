//! Keeps this node's record in the store equal to what the agent knows about itself: after
//! a store restart, a wipe, or someone else's edit, the record comes back.

use crate::backoff::Backoff;
use crate::state::ClusterState;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_model::{Node, keys};
use trellis_store::Store;

pub async fn keep_registered(
    store: Arc<dyn Store>,
    node: Node,
    mut state: watch::Receiver<Arc<ClusterState>>,
) {
    let key = keys::node(&node.name);
    let value = match serde_json::to_vec(&node) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("cannot encode own node record: {e}");
            return;
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let current = state.borrow_and_update().clone();
        let registered = current.revision > 0 && current.nodes.get(&node.name) == Some(&node);
        if !registered {
            match store.put(&key, value.clone()).await {
                Ok(revision) => {
                    tracing::info!(revision, "published node record");
                    backoff.reset();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(retry_in = ?delay, "publishing node record: {e}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}
