//! The watch hub: every change as an event stamped with its resource version, a bounded
//! history of them for watches that resume from a version, and a broadcast to live watches.
//!
//! Like etcd's compaction under the real API's watch cache, the history forgets the oldest
//! events: a watch resuming from a version older than what is kept is answered `410 Expired`.
//! The history is global (one for all resources), as etcd's revision history is.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change: the object after it (before it, for a deletion) and, for a modification,
/// the object before it (so a selector-filtered watch can tell entering from leaving).
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub object: Value,
    pub prev: Option<Value>,
}

pub struct Hub {
    history: VecDeque<Arc<Event>>,
    capacity: usize,
    /// The newest version whose events may have been forgotten.
    compacted: u64,
    tx: broadcast::Sender<Arc<Event>>,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Hub {
            history: VecDeque::new(),
            capacity: capacity.max(1),
            compacted: 0,
            tx,
        }
    }

    pub fn publish(&mut self, event: Event) {
        let event = Arc::new(event);
        self.history.push_back(event.clone());
        while self.history.len() > self.capacity {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        let _ = self.tx.send(event);
    }

    /// Forgets the whole history, as an etcd compaction at `current` would.
    pub fn compact(&mut self, current: u64) {
        self.history.clear();
        self.compacted = current;
    }

    /// A receiver of future events; subscribe before reading the history or the store, while
    /// the state is locked, so that nothing falls between them.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// The events after `rv`, or `Err(oldest version still resumable)` if some were forgotten.
    pub fn since(&self, rv: u64) -> Result<Vec<Arc<Event>>, u64> {
        if rv < self.compacted {
            return Err(self.compacted);
        }
        Ok(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }
}
