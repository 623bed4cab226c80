//! Leadership for cluster-wide work, over any `Store`, that never ends the process.
//!
//! The recipe is etcd's own election (`clientv3/concurrency`): each candidate holds a
//! session lease and a key `election/<lease id in hex>` attached to it; the key with the
//! lowest create revision leads, and that create revision is the term's epoch. Because
//! the layout is etcd's, `etcdctl elect <prefix>election` competes in the same election.
//!
//! Seed 001 (Skupper) exited when it lost its lease. Here a lost lease ends one *term*:
//! the term's tasks see `Term::ended` and stop, the agent and its data plane carry on, and
//! the campaign starts over after a jittered backoff. The leader stops acting when its
//! own renew deadline passes, measured from when its last successful renewal was *sent*,
//! so it stops even if the store never answers again. And every write a leader makes is
//! fenced: a transaction that also requires the leader key to still carry the term's
//! epoch, so a leader that was paused past its lease cannot overwrite its successor.

pub mod work;

use crate::backoff::Backoff;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use trellis_model::keys;
use trellis_store::{Compare, Event, LeaseId, Op, Revision, Store, StoreError, TxnResult};

/// Timings of the election, as client-go names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    /// TTL of the session lease: how long a dead leader blocks its successor at most.
    pub lease: Duration,
    /// The leader stops acting this long after its last successful renewal was sent.
    pub renew_deadline: Duration,
    /// How often the lease is renewed.
    pub retry: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        ElectionConfig {
            lease: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry: Duration::from_secs(2),
        }
    }
}

impl ElectionConfig {
    /// client-go's rule: lease > renew deadline > 1.2 × retry, so that a leader renews
    /// several times before it gives up, and gives up before its lease can expire.
    pub fn validate(&self) -> Result<(), trellis_model::InvalidField> {
        use trellis_model::InvalidField;
        if self.renew_deadline >= self.lease {
            return Err(InvalidField::new(
                "--election-renew-deadline-ms",
                self.renew_deadline.as_millis(),
                format!(
                    "must be less than --election-lease-ms {}",
                    self.lease.as_millis()
                ),
            ));
        }
        if self.renew_deadline.as_secs_f64() <= 1.2 * self.retry.as_secs_f64() {
            return Err(InvalidField::new(
                "--election-retry-ms",
                self.retry.as_millis(),
                "must be less than --election-renew-deadline-ms / 1.2",
            ));
        }
        Ok(())
    }
}

/// What this candidate currently is; published for metrics and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Not yet in the election (no lease yet, or the store is unreachable).
    #[default]
    Joining,
    /// Waiting behind the candidate that leads.
    Candidate,
    Leader {
        epoch: Revision,
    },
}

/// One term of leadership. Cloned into every leader-only task.
#[derive(Clone, Debug)]
pub struct Term {
    pub epoch: Revision,
    /// The leader key whose create revision is the epoch.
    pub key: String,
    ended: watch::Receiver<bool>,
}

/// A write refused because the term is over (locally known, or found by the store).
#[derive(Debug, thiserror::Error)]
pub enum FencedError {
    #[error("term {0} is over")]
    TermOver(Revision),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Term {
    pub fn is_current(&self) -> bool {
        // A dropped sender (the campaign itself stopped) ends the term too.
        !*self.ended.borrow() && self.ended.has_changed().is_ok()
    }

    /// Resolves when the term ends.
    pub async fn ended(&self) {
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(|over| *over).await;
    }

    /// Applies `ops` if the compares hold and this term is still the store's current
    /// one. `Ok(false)` means a compare failed; `TermOver` that the fence did.
    pub async fn txn(
        &self,
        store: &dyn Store,
        mut compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<bool, FencedError> {
        if !self.is_current() {
            return Err(FencedError::TermOver(self.epoch));
        }
        let fence = Compare::CreateRevision(self.key.clone(), self.epoch);
        compares.insert(0, fence.clone());
        let TxnResult { succeeded, .. } = store.txn(compares, ops).await?;
        if succeeded {
            return Ok(true);
        }
        // Which compare failed: if the fence, the term is over whatever we believe.
        match store.txn(vec![fence], vec![]).await? {
            TxnResult {
                succeeded: false, ..
            } => Err(FencedError::TermOver(self.epoch)),
            _ => Ok(false),
        }
    }
}

/// Work that runs for the length of a term and returns when the term ends.
#[async_trait::async_trait]
pub trait LeaderWork: Send + Sync + 'static {
    async fn lead(&self, term: Term);
}

/// Campaigns until `shutdown` turns true; never returns early and never fails. On
/// shutdown the lease is revoked so that a successor need not wait for it to expire.
pub async fn campaign_forever(
    store: Arc<dyn Store>,
    identity: String,
    config: ElectionConfig,
    work: Arc<dyn LeaderWork>,
    role: watch::Sender<Role>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Capped at one lease: after an outage every candidate is back within that.
    let mut backoff = Backoff::new(config.retry / 2, config.lease);
    loop {
        let mut lease = None;
        let lost = tokio::select! {
            lost = one_session(&store, &identity, config, &work, &role, &mut lease) => Some(lost),
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        role.send_replace(Role::Joining);
        if let Some(lease) = lease {
            // Frees the election at once if the store answers; harmless if it does not.
            revoke(store.as_ref(), lease, config.retry).await;
        }
        let Some(lost) = lost else {
            tracing::info!("leader election: stopped");
            return;
        };
        if lost.led {
            backoff.reset(); // a term ended: be back in the race soon
        }
        let delay = backoff.next_delay();
        tracing::warn!(retry_in = ?delay, "leader election: {}; campaigning again", lost.why);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Why a session ended.
struct Lost {
    why: String,
    /// Whether it held a term.
    led: bool,
}

async fn revoke(store: &dyn Store, lease: LeaseId, within: Duration) {
    match timeout(within, store.revoke_lease(lease)).await {
        Ok(Ok(())) | Ok(Err(StoreError::LeaseNotFound(_))) => {}
        Ok(Err(e)) => tracing::debug!("revoking election lease {lease:x}: {e}"),
        Err(_) => tracing::debug!("revoking election lease {lease:x}: timed out"),
    }
}

/// One session: a lease, a candidate key, waiting, and terms, all with the epoch of that
/// key. A session outlives an outage when the store kept its lease (see `resume`).
async fn one_session(
    store: &Arc<dyn Store>,
    identity: &str,
    config: ElectionConfig,
    work: &Arc<dyn LeaderWork>,
    role: &watch::Sender<Role>,
    lease_slot: &mut Option<LeaseId>,
) -> Lost {
    let lost = |why: String| Lost { why, led: false };
    // The lease's TTL runs from when etcd granted it, at the latest from now.
    let asked = Instant::now();
    let lease = match store.grant_lease(config.lease).await {
        Ok(lease) => lease,
        Err(e) => return lost(format!("granting a session lease: {e}")),
    };
    *lease_slot = Some(lease);
    let key = keys::candidate(lease);
    let created = store
        .txn(
            vec![Compare::Absent(key.clone())],
            vec![Op::Put {
                key: key.clone(),
                value: identity.as_bytes().to_vec(),
                lease: Some(lease),
            }],
        )
        .await;
    let epoch = match created {
        Ok(r) if r.succeeded => r.revision,
        Ok(_) => return lost(format!("candidate key {key} already exists")),
        Err(e) => return lost(format!("creating candidate key {key}: {e}")),
    };
    let mut session = Session {
        store: store.as_ref(),
        lease,
        key,
        epoch,
        config,
        last_renew_sent: asked,
    };
    let mut led = false;
    loop {
        role.send_replace(Role::Candidate);
        let why = match session.wait_to_lead().await {
            Ok(()) => {
                led = true;
                lead_one_term(&mut session, work, role).await
            }
            Err(why) => why,
        };
        // This node could not see the store for a while; the store may still hold the
        // session. If its key is still there with the same create revision, nobody can
        // have led meanwhile (a successor needs that key gone), so the session goes on,
        // in its old place in line: after an etcd restart, which extends every lease, the
        // old leader leads again at once instead of everyone waiting out a lease.
        match session.resume().await {
            Ok(()) => tracing::info!(
                epoch,
                "leader election: {why}; the session survived, campaigning in it again"
            ),
            Err(gone) => {
                return Lost {
                    why: format!("{why}; {gone}"),
                    led,
                };
            }
        }
    }
}

/// Leads until the term ends; returns why it ended.
async fn lead_one_term(
    session: &mut Session<'_>,
    work: &Arc<dyn LeaderWork>,
    role: &watch::Sender<Role>,
) -> String {
    let epoch = session.epoch;
    role.send_replace(Role::Leader { epoch });
    tracing::info!(epoch, "leader election: leading");
    let (end_term, ended) = watch::channel(false);
    let term = Term {
        epoch,
        key: session.key.clone(),
        ended,
    };
    let worker = {
        let work = work.clone();
        let term = term.clone();
        tokio::spawn(async move { work.lead(term).await })
    };
    let why = session.hold().await;
    // Leader work stops now, before anything else: the renew deadline has passed or the
    // lease is gone, and a successor may be acting.
    end_term.send_replace(true);
    role.send_replace(Role::Joining);
    tracing::warn!(epoch, "leader election: term over: {why}");
    if timeout(session.config.retry, worker).await.is_err() {
        tracing::warn!(
            epoch,
            "leader work did not stop within {:?}",
            session.config.retry
        );
    }
    format!("term {epoch} over: {why}")
}

struct Session<'a> {
    store: &'a dyn Store,
    lease: LeaseId,
    key: String,
    epoch: Revision,
    config: ElectionConfig,
    last_renew_sent: Instant,
}

impl Session<'_> {
    /// Renews the lease once; `Err` when the lease is gone for sure.
    async fn renew(&mut self) -> Result<(), String> {
        let sent = Instant::now();
        match self.store.keep_alive(self.lease).await {
            Ok(()) => {
                self.last_renew_sent = sent;
                Ok(())
            }
            Err(StoreError::LeaseNotFound(_)) => Err("the session lease expired".into()),
            Err(e) => {
                tracing::debug!("renewing election lease: {e}");
                Ok(())
            }
        }
    }

    /// Asks the store whether the session is still alive: renews the lease until the store
    /// answers (jittered, at most one retry period apart, so a returning store is noticed
    /// soon), then checks that the candidate key still has the session's create revision.
    async fn resume(&mut self) -> Result<(), String> {
        let mut backoff = Backoff::new(self.config.retry / 4, self.config.retry);
        loop {
            let sent = Instant::now();
            match self.store.keep_alive(self.lease).await {
                Ok(()) => {
                    self.last_renew_sent = sent;
                    break;
                }
                Err(StoreError::LeaseNotFound(_)) => {
                    return Err("the session lease expired".into());
                }
                Err(e) => tracing::debug!("leader election: resuming the session: {e}"),
            }
            sleep(backoff.next_delay()).await;
        }
        match self.store.get(&self.key).await {
            Ok(Some(kv)) if kv.create_revision == self.epoch => Ok(()),
            Ok(_) => Err(format!("the candidate key {} is gone", self.key)),
            Err(e) => Err(format!("reading the candidate key {}: {e}", self.key)),
        }
    }

    /// The latest moment the lease can still be counted on.
    fn lease_deadline(&self) -> Instant {
        self.last_renew_sent + self.config.lease
    }

    /// Returns once this candidate's key is the lowest; keeps the lease alive meanwhile.
    async fn wait_to_lead(&mut self) -> Result<(), String> {
        loop {
            let (candidates, revision) = match self.store.list(keys::ELECTION).await {
                Ok(listed) => listed,
                Err(e) => {
                    self.pause_renewing(&format!("listing candidates: {e}"))
                        .await?;
                    continue;
                }
            };
            let first = candidates.iter().min_by_key(|kv| kv.create_revision);
            match first {
                Some(kv) if kv.key == self.key => return Ok(()),
                Some(_) if candidates.iter().any(|kv| kv.key == self.key) => {}
                _ => return Err(format!("candidate key {} vanished", self.key)),
            }
            let mut watch = match self.store.watch(keys::ELECTION, revision).await {
                Ok(w) => w,
                Err(e) => {
                    self.pause_renewing(&format!("watching candidates: {e}"))
                        .await?;
                    continue;
                }
            };
            // Until some candidate leaves (or the watch breaks), renew on schedule.
            loop {
                let renew_at = Instant::now() + self.config.retry;
                tokio::select! {
                    event = watch.next() => match event {
                        Some(Ok(Event::Delete { .. })) => break,
                        Some(Ok(Event::Put(_))) => continue,
                        Some(Err(_)) | None => break,
                    },
                    _ = sleep_until(renew_at) => {
                        self.renew().await?;
                        if Instant::now() > self.lease_deadline() {
                            return Err("the session lease lapsed while the store was unreachable".into());
                        }
                    }
                }
            }
        }
    }

    /// After a failed call: wait one retry period, renewing, and give up on the session
    /// only when the lease has surely lapsed.
    async fn pause_renewing(&mut self, why: &str) -> Result<(), String> {
        tracing::debug!("leader election: {why}");
        tokio::time::sleep(self.config.retry).await;
        self.renew().await?;
        if Instant::now() > self.lease_deadline() {
            return Err(format!("{why}; the session lease lapsed meanwhile"));
        }
        Ok(())
    }

    /// Holds the term: renews every `retry` and returns why the term ended. The renew
    /// deadline is a local timer, so it fires even while a renewal hangs.
    async fn hold(&mut self) -> String {
        let mut key_watch = self.store.watch(keys::ELECTION, self.epoch).await.ok();
        loop {
            let stop_at = self.last_renew_sent + self.config.renew_deadline;
            let renew_at = Instant::now() + self.config.retry;
            tokio::select! {
                _ = sleep_until(stop_at) => {
                    return format!(
                        "no successful renewal for {:?} (renew deadline)",
                        self.config.renew_deadline
                    );
                }
                gone = own_key_deleted(&mut key_watch, &self.key) => {
                    if gone {
                        return format!("the leader key {} was deleted", self.key);
                    }
                    key_watch = None; // the watch broke: rely on renewals alone
                }
                _ = sleep_until(renew_at) => {
                    let renewed = tokio::select! {
                        r = self.renew() => r,
                        _ = sleep_until(stop_at) => continue,
                    };
                    if let Err(why) = renewed {
                        return why;
                    }
                }
            }
        }
    }
}

/// Resolves `true` when the key is deleted, `false` when the watch ends; never when there
/// is no watch.
async fn own_key_deleted(watch: &mut Option<trellis_store::Watch>, key: &str) -> bool {
    let Some(w) = watch else {
        return std::future::pending().await;
    };
    loop {
        match w.next().await {
            Some(Ok(Event::Delete { key: deleted, .. })) if deleted == key => return true,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return false,
        }
    }
}

/// The current leader per the store: the candidate with the lowest create revision, its
/// identity and its epoch.
pub async fn current_leader(store: &dyn Store) -> Result<Option<(String, Revision)>, StoreError> {
    let (candidates, _) = store.list(keys::ELECTION).await?;
    Ok(candidates
        .into_iter()
        .min_by_key(|kv| kv.create_revision)
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.create_revision,
            )
        }))
}

#[cfg(test)]
mod tests;
