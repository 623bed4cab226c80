//! One subject's probing state: its rounds in flight, its detector, its ids.
//!
//! [`Rounds`] decides rounds and [`Detector`] turns them into an opinion; this module adds
//! what they leave to their caller: which answer is a round's first (the RTT histogram
//! follows those), when the detector's start-up grace begins, and what a late answer
//! means.
//!
//! # Late answers
//!
//! [`Rounds`] learns the round-trip time only from answers that beat their round's
//! deadline. When the RTT steps up past the timeout it has learned (30 ms for minutes,
//! then 250 ms under load), every round times out, no answer is ever in time again, the
//! estimate never moves — and a slow gateway is declared down, for good. TCP backs its
//! timer off after a timeout for the same reason, but backing off would also slow the
//! detection of a real cut. Instead, an answer to a round that already failed is taken as
//! proof that the subject is alive but slower than the deadlines assume, and as a first
//! measurement of a changed path: the rounds still pending are given the timeout RFC 6298
//! sets from a first sample R (3R, within the configured bounds), by extending them as a
//! stall does. Their answers then come in time, and from those `Rounds` learns the new
//! RTT. The same holds when the timeout is merely tight (the estimate follows the first
//! answer of each round, the fastest of four): a round lost to a jittery answer lets the
//! next ones wait. A dead subject sends no late answers, so detecting a real fault takes
//! no longer. An answer later than the longest timeout is no such evidence (a probe that
//! waited in a WireGuard queue for a handshake): it is ignored.

use crate::event::Event;
use crate::ids::IdAllocator;
use crate::subject::Subject;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use trellis_plan::health::{Detector, DetectorConfig};
use trellis_plan::rounds::{RoundConfig, Rounds};

/// Failed rounds remembered for their late answers; the longest timeout over the
/// shortest interval, with room.
const FAILED_REMEMBERED: usize = 128;

#[derive(Clone, Copy, Debug)]
struct RoundInfo {
    seq: u16,
    sent_ms: u64,
    /// As [`Rounds`] holds it: sent plus the timeout then, plus every extension since.
    deadline_ms: u64,
    answered: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Watched {
    pub(crate) probe_ip: Ipv4Addr,
    /// Relay targets of a gateway; 0 for a path (the peer answers itself).
    pub(crate) relays: usize,
    ids: IdAllocator,
    round_config: RoundConfig,
    detector_config: DetectorConfig,
    rounds: Rounds,
    /// Created with the first round sent: the start-up grace counts from the first probe
    /// that left, not from when the plan named the subject (the probe address may not
    /// exist yet then, and nothing can answer a probe never sent).
    detector: Option<Detector>,
    in_flight: VecDeque<RoundInfo>,
    failed: VecDeque<RoundInfo>,
}

impl Watched {
    pub(crate) fn new(
        probe_ip: Ipv4Addr,
        relays: usize,
        round_config: RoundConfig,
        detector_config: DetectorConfig,
    ) -> Self {
        Self {
            probe_ip,
            relays,
            ids: IdAllocator::default(),
            round_config,
            detector_config,
            rounds: Rounds::new(round_config),
            detector: None,
            in_flight: VecDeque::new(),
            failed: VecDeque::new(),
        }
    }

    pub(crate) fn next_ids(&mut self) -> Vec<u16> {
        self.ids.round(self.relays)
    }

    /// A round went out at `now` with the probes in `ids` (none failed to send).
    pub(crate) fn start(&mut self, now: u64, seq: u16, ids: Vec<u16>) {
        self.detector
            .get_or_insert_with(|| Detector::new(self.detector_config, now));
        let deadline_ms = now + self.rounds.rtt().timeout_ms(self.round_config);
        self.rounds.start(now, seq, ids);
        self.in_flight.push_back(RoundInfo {
            seq,
            sent_ms: now,
            deadline_ms,
            answered: false,
        });
    }

    /// An answer to one of this subject's echoes arrived. Returns the round-trip time when
    /// it is the first answer of a pending round.
    pub(crate) fn answer(&mut self, now: u64, seq: u16, id: u16) -> Option<u64> {
        if let Some(rtt) = self.rounds.answer(now, seq, id) {
            let round = self.in_flight.iter_mut().find(|r| r.seq == seq)?;
            return (!std::mem::replace(&mut round.answered, true)).then_some(rtt);
        }
        if let Some(at) = self.failed.iter().position(|r| r.seq == seq) {
            let round = self.failed.remove(at).expect("position is in range");
            self.late_answer(now.saturating_sub(round.sent_ms));
        }
        None
    }

    /// See the module docs: give the pending rounds the timeout a first sample of `rtt`
    /// would set.
    fn late_answer(&mut self, rtt: u64) {
        let bounds = self.round_config;
        if rtt > bounds.max_timeout_ms {
            return;
        }
        let timeout = (3 * rtt).clamp(
            bounds.min_timeout_ms,
            bounds.max_timeout_ms.max(bounds.min_timeout_ms),
        );
        let extra = self
            .in_flight
            .iter()
            .filter(|r| !r.answered)
            .map(|r| (r.sent_ms + timeout).saturating_sub(r.deadline_ms))
            .max()
            .unwrap_or(0);
        if extra > 0 {
            self.extend(extra);
        }
    }

    /// The observer did not run for `by_ms`.
    pub(crate) fn stalled(&mut self, by_ms: u64) {
        self.extend(by_ms);
    }

    fn extend(&mut self, by_ms: u64) {
        self.rounds.stalled(by_ms);
        for r in &mut self.in_flight {
            r.deadline_ms += by_ms;
        }
    }

    /// Judge the rounds decided by `now`, feeding them to the detector.
    pub(crate) fn decide(&mut self, now: u64, subject: &Subject, events: &mut VecDeque<Event>) {
        for outcome in self.rounds.decide(now) {
            let info = self
                .in_flight
                .iter()
                .position(|r| r.seq == outcome.seq)
                .and_then(|at| self.in_flight.remove(at));
            if !outcome.answered {
                events.push_back(Event::RoundFailed {
                    subject: subject.clone(),
                });
                if let Some(info) = info {
                    if self.failed.len() == FAILED_REMEMBERED {
                        self.failed.pop_front();
                    }
                    self.failed.push_back(info);
                }
            }
            let Some(detector) = self.detector.as_mut() else {
                continue;
            };
            if let Some(up) = detector.observe(now, outcome.answered) {
                events.push_back(Event::Opinion {
                    subject: subject.clone(),
                    up,
                    changed: true,
                });
            }
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.rounds.next_deadline_ms()
    }

    pub(crate) fn is_up(&self) -> bool {
        self.detector.as_ref().is_none_or(Detector::is_up)
    }
}
