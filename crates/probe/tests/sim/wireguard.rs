//! Enough of WireGuard's session and handshake timers to reproduce its silences.
//!
//! What matters to a prober is when a tunnel carries nothing: before the first handshake
//! completes (packets wait in a queue, and a lost initiation or response is retried only
//! after REKEY_TIMEOUT plus up to 333 ms of jitter), and when an initiation reaches a peer
//! that does not know the sender's key yet (dropped, same retry). Rekeying after
//! REKEY_AFTER_TIME (120 s) keeps using the old session until it is rejected at
//! REJECT_AFTER_TIME (180 s), so a lost rekey handshake costs nothing unless it is lost
//! for a minute. A responder may send on a new session only once data arrived on it.
//!
//! Handshake messages and data travel the same lossy links as everything else; the
//! model returns what to transmit and when to be called back, and the simulation moves it.

use super::NodeId;
use super::rng::Rng;
use std::collections::{HashMap, VecDeque};

pub const REKEY_AFTER_TIME_MS: u64 = 120_000;
pub const REJECT_AFTER_TIME_MS: u64 = 180_000;
pub const REKEY_TIMEOUT_MS: u64 = 5_000;
pub const REKEY_TIMEOUT_JITTER_MS: u64 = 333;
pub const REKEY_ATTEMPT_TIME_MS: u64 = 90_000;
const MAX_QUEUE: usize = 256;

#[derive(Clone, Copy, Debug)]
struct Session {
    id: u64,
    established: u64,
    initiator: bool,
}

impl Session {
    fn valid(&self, now: u64) -> bool {
        now.saturating_sub(self.established) < REJECT_AFTER_TIME_MS
    }
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    id: u64,
    first_at: u64,
    retry_at: u64,
}

/// One node's state for one peer.
#[derive(Clone, Debug)]
struct End<P> {
    /// When this node learned the peer's key (its agent applied a plan naming the peer).
    configured_at: u64,
    current: Option<Session>,
    previous: Option<Session>,
    /// Created by an initiation from the peer; usable for sending once data arrives on it.
    unconfirmed: Option<Session>,
    handshake: Option<Attempt>,
    queue: VecDeque<P>,
}

impl<P> End<P> {
    fn new(configured_at: u64) -> Self {
        Self {
            configured_at,
            current: None,
            previous: None,
            unconfirmed: None,
            handshake: None,
            queue: VecDeque::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Wire<P> {
    Init(u64),
    Response(u64),
    Data(u64, P),
}

pub enum Action<P> {
    /// Put this on the wire from `.0` to `.1`.
    Transmit(NodeId, NodeId, Wire<P>),
    /// Call [`WireGuard::timer`] for (`.1` → `.2`) at `.0`.
    Timer(u64, NodeId, NodeId),
    /// Decrypted: hand the payload to node `.0`, from `.1`.
    Deliver(NodeId, NodeId, P),
}

#[derive(Debug, Default)]
pub struct Stats {
    pub initiations: u64,
    pub completed: u64,
    pub gave_up: u64,
}

pub struct WireGuard<P> {
    ends: HashMap<(NodeId, NodeId), End<P>>,
    next_id: u64,
    pub stats: Stats,
}

impl<P: Clone> WireGuard<P> {
    pub fn new() -> Self {
        Self {
            ends: HashMap::new(),
            next_id: 1,
            stats: Stats::default(),
        }
    }

    /// `node` learns `peer`'s key at `at`.
    pub fn configure(&mut self, node: NodeId, peer: NodeId, at: u64) {
        self.ends.insert((node, peer), End::new(at));
    }

    fn end(&mut self, node: NodeId, peer: NodeId) -> Option<&mut End<P>> {
        self.ends.get_mut(&(node, peer))
    }

    /// `from` sends `payload` into its tunnel to `to`.
    pub fn send(
        &mut self,
        now: u64,
        rng: &mut Rng,
        from: NodeId,
        to: NodeId,
        payload: P,
    ) -> Vec<Action<P>> {
        let mut out = Vec::new();
        let Some(end) = self.end(from, to) else {
            return out; // no peer: nothing routes into the tunnel
        };
        if now < end.configured_at {
            return out;
        }
        match end.current.filter(|s| s.valid(now)) {
            Some(s) => {
                out.push(Action::Transmit(from, to, Wire::Data(s.id, payload)));
                let rekey = s.initiator && now - s.established >= REKEY_AFTER_TIME_MS;
                if rekey && end.handshake.is_none() {
                    self.initiate(now, rng, from, to, None, &mut out);
                }
            }
            None => {
                if end.queue.len() < MAX_QUEUE {
                    end.queue.push_back(payload);
                }
                if end.handshake.is_none() {
                    self.initiate(now, rng, from, to, None, &mut out);
                }
            }
        }
        out
    }

    fn initiate(
        &mut self,
        now: u64,
        rng: &mut Rng,
        from: NodeId,
        to: NodeId,
        first_at: Option<u64>,
        out: &mut Vec<Action<P>>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        self.stats.initiations += 1;
        let retry_at = now + REKEY_TIMEOUT_MS + rng.between(0, REKEY_TIMEOUT_JITTER_MS);
        let end = self.end(from, to).expect("caller checked");
        end.handshake = Some(Attempt {
            id,
            first_at: first_at.unwrap_or(now),
            retry_at,
        });
        out.push(Action::Transmit(from, to, Wire::Init(id)));
        out.push(Action::Timer(retry_at, from, to));
    }

    /// A handshake retransmission timer of `node` towards `peer` fired.
    pub fn timer(&mut self, now: u64, rng: &mut Rng, node: NodeId, peer: NodeId) -> Vec<Action<P>> {
        let mut out = Vec::new();
        let Some(end) = self.end(node, peer) else {
            return out;
        };
        let Some(h) = end.handshake.filter(|h| h.retry_at == now) else {
            return out; // completed or superseded
        };
        // Retried while packets wait for a session, or while a session due for rekeying
        // is still in use; given up after REKEY_ATTEMPT_TIME.
        let wants = !end.queue.is_empty()
            || end.current.is_some_and(|s| {
                s.initiator && s.valid(now) && now - s.established >= REKEY_AFTER_TIME_MS
            });
        if wants && now - h.first_at < REKEY_ATTEMPT_TIME_MS {
            self.initiate(now, rng, node, peer, Some(h.first_at), &mut out);
        } else {
            end.handshake = None;
            end.queue.clear();
            self.stats.gave_up += 1;
        }
        out
    }

    /// `wire` arrived at `to` from `from`.
    pub fn receive(&mut self, now: u64, from: NodeId, to: NodeId, wire: Wire<P>) -> Vec<Action<P>> {
        let mut out = Vec::new();
        let Some(end) = self.end(to, from) else {
            return out;
        };
        if now < end.configured_at {
            return out; // an initiation from a key not known yet is dropped
        }
        match wire {
            Wire::Init(id) => {
                end.unconfirmed = Some(Session {
                    id,
                    established: now,
                    initiator: false,
                });
                out.push(Action::Transmit(to, from, Wire::Response(id)));
            }
            Wire::Response(id) => {
                if end.handshake.is_some_and(|h| h.id == id) {
                    end.handshake = None;
                    end.previous = end.current.take();
                    let s = Session {
                        id,
                        established: now,
                        initiator: true,
                    };
                    end.current = Some(s);
                    self.stats.completed += 1;
                    let end = self.end(to, from).expect("exists");
                    for p in end.queue.drain(..) {
                        out.push(Action::Transmit(to, from, Wire::Data(s.id, p)));
                    }
                }
            }
            Wire::Data(id, payload) => {
                let known = |s: &Option<Session>| s.is_some_and(|s| s.id == id && s.valid(now));
                if end.unconfirmed.is_some_and(|s| s.id == id && s.valid(now)) {
                    end.previous = end.current.take();
                    end.current = end.unconfirmed.take();
                    let s = end.current.expect("just set");
                    for p in end.queue.drain(..) {
                        out.push(Action::Transmit(to, from, Wire::Data(s.id, p)));
                    }
                } else if !known(&end.current) && !known(&end.previous) {
                    return out;
                }
                out.push(Action::Deliver(to, from, payload));
            }
        }
        out
    }
}
