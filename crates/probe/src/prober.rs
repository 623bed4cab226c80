//! The prober: ticks, transmits, replies and deadlines, for every subject at once.
//!
//! Every interval a round of echoes goes to every subject — gateways and direct paths
//! alike. Paths used to be probed every fifth interval to save packets, which made a cut
//! path take 1.5 s to fall back; at four small echoes per round, the same cadence as the
//! gateways costs little and brings that under half a second.

use crate::config::ProbeConfig;
use crate::event::{Echo, Event, Reply};
use crate::ids::is_path_id;
use crate::stall::StallDetector;
use crate::subject::{Subject, Targets};
use crate::watched::Watched;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

/// A round whose echoes are being handed to the driver: it is started only once the
/// driver said which of them it could send.
#[derive(Clone, Debug)]
struct Forming {
    seq: u16,
    at: u64,
    sent: Vec<u16>,
}

#[derive(Debug)]
pub struct Prober {
    config: ProbeConfig,
    watched: BTreeMap<Subject, Watched>,
    /// The echo sequence number of the latest round (one per tick, shared by all subjects).
    seq: u16,
    /// `None` while there is nothing to watch: an idle prober needs no wake-ups.
    next_tick: Option<u64>,
    stall: StallDetector,
    transmits: VecDeque<(Subject, Echo)>,
    forming: BTreeMap<Subject, Forming>,
    events: VecDeque<Event>,
}

impl Prober {
    pub fn new(config: ProbeConfig, now_ms: u64) -> Self {
        let mut stall = StallDetector::default();
        stall.called(now_ms, None);
        Self {
            config: ProbeConfig {
                interval_ms: config.interval_ms.max(1),
                ..config
            },
            watched: BTreeMap::new(),
            seq: 0,
            next_tick: None,
            stall,
            transmits: VecDeque::new(),
            forming: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Follow the plan's lists. New subjects start out up, and say so: a single
    /// dissenting observer must never be the only voice. Dropped ones withdraw their
    /// opinion. Targets with an IPv6 probe address are not probed.
    pub fn set_targets(&mut self, now_ms: u64, targets: Targets) {
        self.enter(now_ms);
        let wanted: BTreeMap<Subject, (Ipv4Addr, usize)> = targets
            .gateways
            .into_iter()
            .filter_map(|t| match t.probe_ip {
                IpAddr::V4(ip) => Some((Subject::Gateway(t.gateway), (ip, t.relays.max(1)))),
                IpAddr::V6(_) => None,
            })
            .chain(targets.paths.into_iter().filter_map(|p| match p.probe_ip {
                IpAddr::V4(ip) => Some((Subject::Path(p.peer), (ip, 0))),
                IpAddr::V6(_) => None,
            }))
            .collect();
        let dropped: Vec<Subject> = self
            .watched
            .keys()
            .filter(|s| !wanted.contains_key(*s))
            .cloned()
            .collect();
        for subject in dropped {
            self.watched.remove(&subject);
            self.events.push_back(Event::Withdrawn { subject });
        }
        for (subject, (probe_ip, relays)) in wanted {
            match self.watched.get_mut(&subject) {
                Some(w) => {
                    w.probe_ip = probe_ip;
                    w.relays = relays;
                }
                None => {
                    self.watched.insert(
                        subject.clone(),
                        Watched::new(probe_ip, relays, self.config.rounds, self.config.detector),
                    );
                    self.events.push_back(Event::Opinion {
                        subject,
                        up: true,
                        changed: false,
                    });
                }
            }
        }
        if self.watched.is_empty() {
            self.next_tick = None;
        } else if self.next_tick.is_none() {
            self.next_tick = Some(now_ms);
        }
    }

    /// An echo reply arrived. Never judges a deadline (see the crate docs: replies first).
    pub fn handle_reply(&mut self, now_ms: u64, reply: Reply) {
        self.enter(now_ms);
        let Some((subject, w)) = self.subject_of(reply.from, reply.id) else {
            return;
        };
        let subject = subject.clone();
        let first = w.answer(now_ms, reply.seq, reply.id);
        self.events.push_back(Event::Answered {
            subject: subject.clone(),
        });
        if let Some(rtt_ms) = first {
            self.events
                .push_back(Event::RoundAnswered { subject, rtt_ms });
        }
    }

    /// The time asked for by [`Prober::poll_timeout`] has come: judge the rounds whose
    /// deadline passed, then send the next round if a tick is due.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.enter(now_ms);
        for (subject, w) in &mut self.watched {
            w.decide(now_ms, subject, &mut self.events);
        }
        if self.next_tick.is_some_and(|t| t <= now_ms) {
            self.tick(now_ms);
        }
    }

    /// The next echo to send. When this returns `None`, the round just handed out starts.
    pub fn poll_transmit(&mut self) -> Option<Echo> {
        match self.transmits.pop_front() {
            Some((subject, echo)) => {
                if let Some(f) = self.forming.get_mut(&subject) {
                    f.sent.push(echo.id);
                }
                Some(echo)
            }
            None => {
                self.commit();
                None
            }
        }
    }

    /// The echo just handed out could not be sent: it is not part of its round.
    pub fn transmit_failed(&mut self, echo: Echo) {
        let Some((subject, _)) = self.subject_of(echo.to, echo.id) else {
            return;
        };
        let subject = subject.clone();
        if let Some(f) = self.forming.get_mut(&subject)
            && f.seq == echo.seq
        {
            f.sent.retain(|id| *id != echo.id);
        }
    }

    /// When to call [`Prober::handle_timeout`]: the next tick or the next round deadline,
    /// whichever comes first. `None` while there is nothing to watch.
    pub fn poll_timeout(&mut self) -> Option<u64> {
        self.commit();
        self.wake_at()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// This node's current opinion of a subject, if it is watched.
    pub fn opinion(&self, subject: &Subject) -> Option<bool> {
        self.watched.get(subject).map(Watched::is_up)
    }

    fn wake_at(&self) -> Option<u64> {
        self.watched
            .values()
            .filter_map(Watched::next_deadline)
            .chain(self.next_tick)
            .min()
    }

    /// Every call with the time starts here: finish the round being handed out, and see
    /// whether the observer stalled since it last ran.
    fn enter(&mut self, now: u64) {
        self.commit();
        if let Some(late) = self.stall.called(now, self.wake_at()) {
            // One millisecond past `now`: nothing is judged in the call that noticed the
            // stall, so answers the driver has yet to hand in still count, whatever the
            // order of its calls.
            for w in self.watched.values_mut() {
                w.stalled(late + 1);
            }
            self.events.push_back(Event::Stalled { late_ms: late });
        }
    }

    fn tick(&mut self, now: u64) {
        self.seq = self.seq.wrapping_add(1);
        for (subject, w) in &mut self.watched {
            for id in w.next_ids() {
                self.transmits.push_back((
                    subject.clone(),
                    Echo {
                        to: w.probe_ip,
                        id,
                        seq: self.seq,
                    },
                ));
            }
            self.forming.insert(
                subject.clone(),
                Forming {
                    seq: self.seq,
                    at: now,
                    sent: Vec::new(),
                },
            );
        }
        // Keep to the grid while on time; after a stall, start a new one rather than
        // sending the missed rounds in a burst.
        let interval = self.config.interval_ms;
        let next = self.next_tick.unwrap_or(now) + interval;
        self.next_tick = Some(if next <= now { now + interval } else { next });
    }

    /// Start the rounds handed out; echoes never handed out were not sent.
    fn commit(&mut self) {
        self.transmits.clear();
        for (subject, f) in std::mem::take(&mut self.forming) {
            let Some(w) = self.watched.get_mut(&subject) else {
                continue;
            };
            if f.sent.is_empty() {
                continue;
            }
            let probes = f.sent.len();
            w.start(f.at, f.seq, f.sent);
            self.events.push_back(Event::Sent { subject, probes });
        }
    }

    /// The subject an echo to or from `addr` with this id belongs to. A gateway and a path
    /// to the same node share its probe address; the id range tells them apart.
    fn subject_of(&mut self, addr: Ipv4Addr, id: u16) -> Option<(&Subject, &mut Watched)> {
        let path = is_path_id(id);
        self.watched
            .iter_mut()
            .find(|(s, w)| w.probe_ip == addr && s.is_path() == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PROBES_PER_ROUND;
    use trellis_plan::{PathTarget, ProbeTarget};

    const G: Ipv4Addr = Ipv4Addr::new(100, 66, 0, 1);

    /// A gateway with two relay targets and the direct path to the same node.
    fn prober() -> Prober {
        let mut p = Prober::new(ProbeConfig::default(), 0);
        p.set_targets(
            0,
            Targets {
                gateways: vec![ProbeTarget {
                    gateway: "g".into(),
                    probe_ip: IpAddr::V4(G),
                    relays: 2,
                }],
                paths: vec![PathTarget {
                    peer: "g".into(),
                    probe_ip: IpAddr::V4(G),
                    broken: false,
                }],
            },
        );
        p
    }

    fn events(p: &mut Prober) -> Vec<Event> {
        std::iter::from_fn(|| p.poll_event()).collect()
    }

    /// Send what the prober asks, failing the sends `fail` picks.
    fn transmit(p: &mut Prober, fail: impl Fn(&Echo) -> bool) -> Vec<Echo> {
        let mut sent = Vec::new();
        while let Some(e) = p.poll_transmit() {
            if fail(&e) {
                p.transmit_failed(e);
            } else {
                sent.push(e);
            }
        }
        sent
    }

    fn reply(e: &Echo) -> Reply {
        Reply {
            from: e.to,
            id: e.id,
            seq: e.seq,
        }
    }

    #[test]
    fn paths_and_gateways_get_a_round_every_interval() {
        let mut p = prober();
        for tick in 0..10u64 {
            let now = tick * 100;
            assert_eq!(p.poll_timeout(), Some(now));
            p.handle_timeout(now);
            let sent = transmit(&mut p, |_| false);
            let paths = sent.iter().filter(|e| is_path_id(e.id)).count();
            assert_eq!(paths, PROBES_PER_ROUND, "tick {tick}");
            assert_eq!(sent.len() - paths, PROBES_PER_ROUND, "tick {tick}");
            for e in &sent {
                p.handle_reply(now + 5, reply(e));
            }
        }
    }

    #[test]
    fn answers_from_one_address_are_told_apart_by_id_range() {
        let mut p = prober();
        p.handle_timeout(0);
        let sent = transmit(&mut p, |_| false);
        events(&mut p);
        let path_echo = sent.iter().find(|e| is_path_id(e.id)).unwrap();
        p.handle_reply(3, reply(path_echo));
        assert_eq!(
            events(&mut p),
            vec![
                Event::Answered {
                    subject: Subject::Path("g".into())
                },
                Event::RoundAnswered {
                    subject: Subject::Path("g".into()),
                    rtt_ms: 3
                }
            ]
        );
        let gw_echo = sent.iter().find(|e| !is_path_id(e.id)).unwrap();
        p.handle_reply(4, reply(gw_echo));
        p.handle_reply(5, reply(gw_echo));
        assert_eq!(
            events(&mut p),
            vec![
                Event::Answered {
                    subject: Subject::Gateway("g".into())
                },
                Event::RoundAnswered {
                    subject: Subject::Gateway("g".into()),
                    rtt_ms: 4
                },
                Event::Answered {
                    subject: Subject::Gateway("g".into())
                },
            ],
            "a second answer is an answer, not a round"
        );
        p.handle_reply(
            6,
            Reply {
                from: Ipv4Addr::new(100, 66, 0, 9),
                ..reply(gw_echo)
            },
        );
        assert_eq!(events(&mut p), vec![], "a stranger");
    }

    #[test]
    fn a_probe_that_could_not_be_sent_is_no_part_of_its_round() {
        let mut p = prober();
        p.handle_timeout(0);
        // every path probe fails, and the gateway probes of the first relay range
        let sent = transmit(&mut p, |e| is_path_id(e.id) || e.id < 0x4000);
        assert_eq!(sent.len(), PROBES_PER_ROUND / 2);
        let ev = events(&mut p);
        assert!(ev.contains(&Event::Sent {
            subject: Subject::Gateway("g".into()),
            probes: 2
        }));
        assert!(!ev.iter().any(|e| matches!(
            e,
            Event::Sent {
                subject: Subject::Path(_),
                ..
            }
        )));
        // the path had no round, so there is nothing to fail; the gateway's round fails
        // at its deadline, and only its deadline is waited for
        assert_eq!(p.poll_timeout(), Some(100), "the next tick");
        p.handle_timeout(100);
        transmit(&mut p, |_| true);
        assert_eq!(p.poll_timeout(), Some(150), "the gateway round's deadline");
        p.handle_timeout(150);
        let ev = events(&mut p);
        assert_eq!(
            ev,
            vec![Event::RoundFailed {
                subject: Subject::Gateway("g".into())
            }]
        );
    }

    #[test]
    fn a_stall_noticed_before_the_replies_are_in_judges_nothing() {
        let mut p = prober();
        p.handle_timeout(0);
        let sent = transmit(&mut p, |_| false);
        events(&mut p);
        // asked for 100 (the tick), called at 500: the driver calls the timer first,
        // though answers wait in the socket
        p.handle_timeout(500);
        let ev = events(&mut p);
        assert_eq!(ev[0], Event::Stalled { late_ms: 400 });
        assert!(
            !ev.iter().any(|e| matches!(e, Event::RoundFailed { .. })),
            "{ev:?}"
        );
        transmit(&mut p, |_| false);
        assert_eq!(
            p.poll_timeout(),
            Some(551),
            "the round's deadline (150) moved back by 401"
        );
        for e in &sent {
            p.handle_reply(500, reply(e));
        }
        p.handle_timeout(551);
        let ev = events(&mut p);
        assert!(
            !ev.iter()
                .any(|e| matches!(e, Event::RoundFailed { .. } | Event::Stalled { .. })),
            "{ev:?}"
        );
    }

    #[test]
    fn an_idle_prober_asks_for_no_wake_up() {
        let mut p = Prober::new(ProbeConfig::default(), 0);
        assert_eq!(p.poll_timeout(), None);
        let mut p = prober();
        p.set_targets(50, Targets::default());
        assert_eq!(p.poll_timeout(), None);
        let ev = events(&mut p);
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, Event::Withdrawn { .. }))
                .count(),
            2
        );
    }
}
