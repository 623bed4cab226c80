//! Probe rounds and their deadlines, as a pure state machine.
//!
//! A round is a handful of probes sent together to one gateway; it succeeds when any of them
//! is answered before its deadline. The deadline is not the next round: a loaded machine
//! (six userspace WireGuard hops per probe, two cores) answers in 30 ms one moment and 250 ms
//! the next, and a fixed 100 ms deadline turns such a burst into three "failed" rounds on
//! every observer at once — a false failover. So each round waits for an adaptive timeout
//! computed from the measured round-trip times the way TCP computes its retransmission
//! timeout (RFC 6298: smoothed RTT plus four deviations), never less than a floor. A dead
//! gateway answers nothing, so it is still declared down `multiplier` rounds after the
//! fault plus one timeout; a slow one keeps answering and is not.
//!
//! The observer itself can stall too (its process starved of CPU): then its own device has
//! not decrypted the answers yet and they would look lost. [`Rounds::stalled`] pushes every
//! pending deadline back by the stall, which is Lifeguard's "local health" idea: an observer
//! that knows it is slow gives others more time before it accuses them.
//!
//! Time is milliseconds from the caller; no clocks here.

use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundConfig {
    /// The shortest a round waits for an answer.
    pub min_timeout_ms: u64,
    /// The longest a round waits, whatever the RTT history says.
    pub max_timeout_ms: u64,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            min_timeout_ms: 150,
            max_timeout_ms: 1_000,
        }
    }
}

/// Smoothed round-trip time and its mean deviation (RFC 6298, section 2).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RttEstimator {
    srtt: Option<f64>,
    rttvar: f64,
}

impl RttEstimator {
    pub fn sample(&mut self, rtt_ms: f64) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt_ms);
                self.rttvar = rtt_ms / 2.0;
            }
            Some(srtt) => {
                self.rttvar = 0.75 * self.rttvar + 0.25 * (srtt - rtt_ms).abs();
                self.srtt = Some(0.875 * srtt + 0.125 * rtt_ms);
            }
        }
    }

    pub fn smoothed_ms(&self) -> Option<f64> {
        self.srtt
    }

    /// srtt + 4·rttvar, within the configured bounds; the floor before any sample.
    pub fn timeout_ms(&self, config: RoundConfig) -> u64 {
        let raw = match self.srtt {
            None => 0.0,
            Some(srtt) => srtt + 4.0 * self.rttvar,
        };
        (raw.ceil() as u64).clamp(
            config.min_timeout_ms,
            config.max_timeout_ms.max(config.min_timeout_ms),
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Round {
    seq: u16,
    ids: Vec<u16>,
    sent_ms: u64,
    deadline_ms: u64,
    answered: bool,
}

/// What happened to a round, once it is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub seq: u16,
    pub answered: bool,
}

/// The rounds in flight towards one gateway, decided strictly in the order they were sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Rounds {
    config: RoundConfig,
    rtt: RttEstimator,
    pending: VecDeque<Round>,
}

impl Rounds {
    pub fn new(config: RoundConfig) -> Self {
        Self {
            config,
            rtt: RttEstimator::default(),
            pending: VecDeque::new(),
        }
    }

    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// A round of probes with these echo ids went out.
    pub fn start(&mut self, now_ms: u64, seq: u16, ids: Vec<u16>) {
        let deadline_ms = now_ms + self.rtt.timeout_ms(self.config);
        self.pending.push_back(Round {
            seq,
            ids,
            sent_ms: now_ms,
            deadline_ms,
            answered: false,
        });
    }

    /// An echo answer arrived. Returns its round-trip time when it answered a pending round
    /// (the first answer of a round is an RTT sample; later ones and strangers are ignored).
    pub fn answer(&mut self, now_ms: u64, seq: u16, id: u16) -> Option<u64> {
        let round = self
            .pending
            .iter_mut()
            .find(|r| r.seq == seq && r.ids.contains(&id))?;
        let rtt = now_ms.saturating_sub(round.sent_ms);
        if !round.answered {
            round.answered = true;
            self.rtt.sample(rtt as f64);
        }
        Some(rtt)
    }

    /// The observer could not run for `by_ms`: nothing it was waiting for could be seen in
    /// that time, so every pending deadline moves back by as much.
    pub fn stalled(&mut self, by_ms: u64) {
        for r in &mut self.pending {
            r.deadline_ms += by_ms;
        }
    }

    /// Rounds decided by `now_ms`, oldest first: answered ones, and unanswered ones whose
    /// deadline passed. A round is never decided before an older one.
    pub fn decide(&mut self, now_ms: u64) -> Vec<Outcome> {
        let mut decided = Vec::new();
        while let Some(front) = self.pending.front() {
            if !front.answered && now_ms < front.deadline_ms {
                break;
            }
            let r = self.pending.pop_front().expect("front exists");
            decided.push(Outcome {
                seq: r.seq,
                answered: r.answered,
            });
        }
        decided
    }

    /// When [`Rounds::decide`] will next have something to say without a new answer.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.pending.front().map(|r| r.deadline_ms)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoundConfig {
        RoundConfig {
            min_timeout_ms: 150,
            max_timeout_ms: 1_000,
        }
    }

    #[test]
    fn timeout_follows_rfc6298_within_bounds() {
        let mut e = RttEstimator::default();
        assert_eq!(e.timeout_ms(config()), 150, "the floor before any sample");
        e.sample(1.0);
        assert_eq!(e.timeout_ms(config()), 150, "fast paths sit on the floor");
        for _ in 0..50 {
            e.sample(100.0);
        }
        let t = e.timeout_ms(config());
        assert!((150..=160).contains(&t), "steady 100 ms: {t}");
        // jitter widens the timeout
        for i in 0..50 {
            e.sample(if i % 2 == 0 { 20.0 } else { 200.0 });
        }
        let t = e.timeout_ms(config());
        assert!(t > 300, "jittery path: {t}");
        for _ in 0..100 {
            e.sample(5_000.0);
        }
        assert_eq!(e.timeout_ms(config()), 1_000, "the ceiling holds");
    }

    #[test]
    fn a_late_answer_still_counts_for_its_round() {
        let mut r = Rounds::new(config());
        r.start(0, 1, vec![10, 11]);
        r.start(100, 2, vec![12, 13]);
        assert_eq!(r.decide(120), vec![], "round 1 still within its deadline");
        // round 1's answer arrives after round 2 was sent: it still counts
        assert_eq!(r.answer(130, 1, 11), Some(130));
        assert_eq!(
            r.decide(130),
            vec![Outcome {
                seq: 1,
                answered: true
            }]
        );
        assert_eq!(r.decide(249), vec![]);
        assert_eq!(
            r.decide(400),
            vec![Outcome {
                seq: 2,
                answered: false
            }],
            "round 2 expired (its deadline came from the RTT seen so far)"
        );
    }

    #[test]
    fn rounds_are_decided_in_order() {
        let mut r = Rounds::new(config());
        r.start(0, 1, vec![1]);
        r.start(100, 2, vec![2]);
        r.answer(110, 2, 2);
        assert_eq!(r.decide(120), vec![], "round 2 waits for round 1");
        assert_eq!(
            r.decide(150),
            vec![
                Outcome {
                    seq: 1,
                    answered: false
                },
                Outcome {
                    seq: 2,
                    answered: true
                }
            ]
        );
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn strangers_and_duplicates_are_ignored() {
        let mut r = Rounds::new(config());
        r.start(0, 7, vec![1, 2]);
        assert_eq!(r.answer(5, 7, 3), None, "id not sent in that round");
        assert_eq!(r.answer(5, 8, 1), None, "another round's sequence");
        assert_eq!(r.answer(5, 7, 1), Some(5));
        assert_eq!(r.answer(9, 7, 2), Some(9), "a second answer is an answer");
        assert_eq!(
            r.rtt().smoothed_ms(),
            Some(5.0),
            "but only the first is a sample"
        );
    }

    #[test]
    fn an_observer_stall_extends_what_it_waits_for() {
        let mut r = Rounds::new(config());
        r.start(0, 1, vec![1]);
        r.stalled(400);
        assert_eq!(
            r.decide(300),
            vec![],
            "the stall is not held against the gateway"
        );
        r.answer(450, 1, 1);
        assert_eq!(
            r.decide(450),
            vec![Outcome {
                seq: 1,
                answered: true
            }]
        );
    }

    #[test]
    fn a_dead_gateway_fails_every_round_one_timeout_after_it_was_sent() {
        let mut r = Rounds::new(config());
        // a healthy history of 2 ms answers
        for seq in 0..20u16 {
            let t = u64::from(seq) * 100;
            r.start(t, seq, vec![seq]);
            r.answer(t + 2, seq, seq);
            assert!(r.decide(t + 2).iter().all(|o| o.answered));
        }
        // then silence: each round fails exactly at the floor timeout
        for seq in 20..23u16 {
            let t = u64::from(seq) * 100;
            r.start(t, seq, vec![seq]);
        }
        assert_eq!(r.decide(2_149), vec![]);
        let failed = r.decide(2_150);
        assert_eq!(failed.len(), 1);
        assert!(!failed[0].answered);
        assert_eq!(r.decide(2_350).len(), 2);
    }
}
