//! A store that stops answering on demand: calls made while it is frozen hang until it
//! thaws, exactly what a client of a SIGSTOPped etcd (or an API server under pressure, seed
//! 001) sees. Lets leadership and sync tests run the outage in paused time, in process.
//!
//! [`Unreachable`] is the other kind of outage: every call fails at once.

use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use trellis_store::{
    Compare, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch,
};

pub struct Freezable {
    inner: Arc<dyn Store>,
    frozen: AtomicBool,
}

impl Freezable {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            frozen: AtomicBool::new(false),
        })
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    async fn gate(&self) {
        while self.frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl Store for Freezable {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.gate().await;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        self.gate().await;
        self.inner.list(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        self.gate().await;
        self.inner.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        self.gate().await;
        self.inner.watch(prefix, after).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.gate().await;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.gate().await;
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.gate().await;
        self.inner.revoke_lease(lease).await
    }
}

/// A store that cannot be reached: every call fails with `Unavailable`, as a client of a
/// store that is down (connection refused) sees it.
pub struct Unreachable;

fn down<T>() -> Result<T> {
    Err(StoreError::Unavailable("test store is down".into()))
}

#[async_trait]
impl Store for Unreachable {
    async fn get(&self, _: &str) -> Result<Option<KeyValue>> {
        down()
    }
    async fn list(&self, _: &str) -> Result<(Vec<KeyValue>, Revision)> {
        down()
    }
    async fn txn(&self, _: Vec<Compare>, _: Vec<Op>) -> Result<TxnResult> {
        down()
    }
    async fn watch(&self, _: &str, _: Revision) -> Result<Watch> {
        down()
    }
    async fn grant_lease(&self, _: Duration) -> Result<LeaseId> {
        down()
    }
    async fn keep_alive(&self, _: LeaseId) -> Result<()> {
        down()
    }
    async fn revoke_lease(&self, _: LeaseId) -> Result<()> {
        down()
    }
}
