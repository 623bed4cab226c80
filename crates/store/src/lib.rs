//! The `Store`: where cluster state lives.
//!
//! The model is etcd's (keys, a global revision, watches that resume from a revision,
//! leases, transactions with compares), because it is the smallest model that the three
//! backends share: etcd implements it natively, the Kubernetes API maps it onto objects
//! (resourceVersion as revision, Lease objects as leases, preconditions as compares), and
//! the embedded store implements it in memory for the lab and single-process use.
//!
//! Keys given to a `Store` are relative ("nodes/a1"); each backend adds its own prefix.
//!
//! `etcd::server` serves an embedded store with etcd's own gRPC protocol (on a Unix
//! socket for the lab), so that other processes reach it with the same `EtcdStore` they
//! use for a real etcd, and `etcdctl` can inspect it.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub mod backoff;
pub mod embedded;
pub mod etcd;

pub type Revision = u64;
pub type LeaseId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    #[serde(with = "bytes_b64")]
    pub value: Vec<u8>,
    /// Revision of the write that created the key (etcd's create_revision). Stays the same
    /// across updates; a new key after a delete gets a new one.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any; the key is deleted when it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
}

/// A condition on one key that a transaction checks before writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and its mod_revision equals the given one.
    ModRevision(String, Revision),
    /// The key exists and its create_revision equals the given one (fencing tokens).
    CreateRevision(String, Revision),
    /// The key exists and holds exactly these bytes.
    Value(String, Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held and the ops were applied (all of them, atomically).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// A key was deleted (explicitly or by lease expiry) at `revision`.
    Delete {
        key: String,
        revision: Revision,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is older than the store's history; re-list and watch from
    /// the list's revision.
    #[error("revision {requested} is compacted (oldest kept is {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// A watcher fell too far behind and was cut off so that it cannot slow writers.
    #[error("watch fell behind and was cancelled; re-list from a fresh revision")]
    WatchLagged,
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("store unreachable: {0}")]
    Unavailable(String),
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    /// The store refused us: bad credentials, an expired token, missing permissions.
    #[error("store denied the call: {0}")]
    Denied(String),
    #[error("store protocol error: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A stream of watch events. `next` yields `None` when the watch ended (store closed);
/// an `Err` ends the stream too, and the caller re-lists or resumes from its last revision.
pub struct Watch {
    pub rx: tokio::sync::mpsc::Receiver<Result<Event>>,
}

impl Watch {
    pub async fn next(&mut self) -> Option<Result<Event>> {
        self.rx.recv().await
    }

    /// The next event if one is already waiting, without waiting: for batching a burst.
    /// (A zero timeout around `next` waits for the runtime's timer, up to a millisecond.)
    pub fn try_next(&mut self) -> Option<Result<Event>> {
        self.rx.try_recv().ok()
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key under `prefix`, sorted by key, and the revision the listing reflects.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;
    /// Apply `ops` atomically if every compare holds.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult>;
    /// Events for keys under `prefix` with revision > `after`, in revision order, then
    /// live events. `after` older than the kept history gives `Compacted`, either from
    /// this call or as the stream's first item (etcd confirms a watch before it cancels it).
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch>;
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renew the lease to its full TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Delete the lease and every key attached to it.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let r = self
            .txn(
                vec![],
                vec![Op::Put {
                    key: key.to_string(),
                    value,
                    lease: None,
                }],
            )
            .await?;
        Ok(r.revision)
    }

    async fn delete(&self, key: &str) -> Result<Revision> {
        let r = self
            .txn(
                vec![],
                vec![Op::Delete {
                    key: key.to_string(),
                }],
            )
            .await?;
        Ok(r.revision)
    }
}

/// The key just past every key that starts with `prefix` (etcd's range_end for prefixes).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key: the prefix was empty or all 0xff
}

mod bytes_b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
