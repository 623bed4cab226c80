//! The proxy's view of Services and EndpointSlices, kept current from the store: list each
//! prefix, then watch from the listing's revision, through outages, as the mesh's state
//! sync does. What comes out is a stream of [`Update`]s: a whole snapshot after a (re)list,
//! then changes in batches, so the proxy replans only what they touch.

use crate::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use trellis_model::keys::{ENDPOINT_SLICES, SERVICES};
use trellis_store::{Event, KeyValue, Store, StoreError};

/// What changed in the store under the proxy's prefixes.
#[derive(Debug)]
pub enum Update {
    /// Everything under `prefix`, replacing what was known of it.
    Snapshot {
        prefix: &'static str,
        records: Vec<KeyValue>,
    },
    /// Events in store order.
    Changes(Vec<Event>),
}

/// The prefixes the proxy reads.
pub const PREFIXES: [&str; 2] = [SERVICES, ENDPOINT_SLICES];

/// Follows `prefix` forever, sending to `tx`; ends only when the receiver is gone.
pub async fn follow(store: Arc<dyn Store>, prefix: &'static str, tx: mpsc::Sender<Update>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut revision = None;
    loop {
        let result = async {
            let after = match revision {
                Some(r) => r,
                None => {
                    let (records, listed_at) = store.list(prefix).await?;
                    if tx.send(Update::Snapshot { prefix, records }).await.is_err() {
                        return Ok(());
                    }
                    revision = Some(listed_at);
                    listed_at
                }
            };
            let mut watch = store.watch(prefix, after).await?;
            backoff.reset();
            loop {
                let first = match watch.next().await {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Unavailable("the watch ended".into())),
                };
                let mut events = vec![first];
                // A burst (a rollout rewriting many slices) goes out as one batch.
                while events.len() < 4096
                    && let Some(Ok(more)) = watch.try_next()
                {
                    events.push(more);
                }
                revision = events.last().map(event_revision);
                if tx.send(Update::Changes(events)).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                if let StoreError::Compacted { .. } = e {
                    tracing::info!(
                        prefix,
                        "store history compacted past our revision; re-listing"
                    );
                    revision = None;
                }
                let delay = backoff.next_delay();
                tracing::warn!(prefix, retry_in = ?delay, "service proxy sync: {e}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn event_revision(event: &Event) -> trellis_store::Revision {
    match event {
        Event::Put(kv) => kv.mod_revision,
        Event::Delete { revision, .. } => *revision,
    }
}
