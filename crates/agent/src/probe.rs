//! The prober. Two kinds of subject, one loop:
//!
//! - **gateways** this node observes: every interval, a round of ICMP echoes from this
//!   node's probe address to the gateway's, spread over its relay targets, each with a fresh
//!   id (a new flow, so a fault that spares established flows is still seen); the gateway's
//!   kernel relays each to a node behind it and the answer back;
//! - **direct paths**: the tunnels this node holds to nodes of other locations, probed every
//!   [`PATH_EVERY`] intervals at the peer's own probe address, with ids no gateway relays, so
//!   the peer's kernel answers and only the path itself is measured.
//!
//! A round succeeds when any answer arrives before its deadline, which adapts to the
//! measured round-trip times ([`Rounds`]). Each subject's rounds feed a [`Detector`]; its
//! opinion is published when it changes (gateways: `observations/`, paths: `paths/`).

use crate::admin::Metrics;
use crate::backoff::Backoff;
use crate::report::leased::LeasedKeys;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_dataplane::icmp::IcmpSocket;
use trellis_model::{Observation, PathReport, keys};
use trellis_plan::health::{Detector, DetectorConfig, ID_RANGE_SIZE, UNRELAYED_ID_RANGE, id_range};
use trellis_plan::rounds::{RoundConfig, Rounds};
use trellis_plan::{PathTarget, ProbeTarget};

/// Probes per round, spread over the gateway's relay targets. A round fails only if every
/// one is lost: at 5 % loss on every link a probe crosses eight links and is lost a third
/// of the time, so four independent probes make a failed round a 1 % event and three failed
/// rounds in a row a one-in-a-million one, while a real fault still fails every probe.
const PROBES_PER_ROUND: usize = 4;

/// Direct paths are probed every this many intervals: there can be many more of them than
/// gateways (every pair of public nodes in `full`), and a broken one only costs a detour.
pub const PATH_EVERY: u16 = 5;

/// A timer that fires this much later than asked means this agent did not run in between:
/// whatever it was waiting for may have arrived unseen, so deadlines move back.
const STALL_MS: u64 = 50;

#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub rounds: RoundConfig,
    pub detector: DetectorConfig,
}

/// What the plan asks this node to measure.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    pub gateways: Vec<ProbeTarget>,
    pub paths: Vec<PathTarget>,
}

/// What a probe measures: a gateway candidate's forwarding, or the direct path to a peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    Gateway(String),
    Path(String),
}

struct Watched {
    probe_ip: Ipv4Addr,
    /// Relay targets of a gateway; 0 for a path (the peer answers itself).
    relays: usize,
    detector: Detector,
    rounds: Rounds,
}

impl Watched {
    fn ids(&self, counter: u16) -> Vec<u16> {
        (0..PROBES_PER_ROUND.max(self.relays))
            .map(|i| {
                let range = if self.relays == 0 {
                    UNRELAYED_ID_RANGE
                } else {
                    i % self.relays
                };
                let nth = (u32::from(counter) * PROBES_PER_ROUND as u32 + i as u32)
                    % u32::from(ID_RANGE_SIZE);
                id_range(range).0 + nth as u16
            })
            .collect()
    }
}

pub async fn run(
    me: String,
    probe_ip: Ipv4Addr,
    config: ProbeConfig,
    mut targets: watch::Receiver<Targets>,
    leased: LeasedKeys,
    metrics: Metrics,
) {
    let socket = open_socket(probe_ip).await;
    let start = Instant::now();
    let ms = |t: Instant| t.duration_since(start).as_millis() as u64;
    let mut watched: BTreeMap<Subject, Watched> = BTreeMap::new();
    let mut counter: u16 = 0;
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_tick = Instant::now();
    loop {
        let next_deadline = watched
            .values()
            .filter_map(|w| w.rounds.next_deadline_ms())
            .min()
            .map(|d| start + Duration::from_millis(d));
        let deadline = async {
            match next_deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        // Answers first: after a stall, everything already received must count before any
        // deadline is judged.
        tokio::select! {
            biased;
            reply = socket.recv_reply() => {
                let Ok(reply) = reply else { continue };
                let now = ms(Instant::now());
                // A gateway and a direct path to the same node share its probe address; the
                // id range tells them apart (paths use the one no gateway relays).
                let to_path = usize::from(reply.id / ID_RANGE_SIZE) == UNRELAYED_ID_RANGE;
                let mut decided = false;
                for (subject, w) in watched
                    .iter_mut()
                    .filter(|(s, w)| w.probe_ip == reply.from && matches!(s, Subject::Path(_)) == to_path)
                {
                    // every answer counts as a probe that came back, late or not
                    metrics.probe_answered(subject);
                    if let Some(rtt) = w.rounds.answer(now, reply.seq, reply.id) {
                        metrics.round_answered(subject, Duration::from_millis(rtt));
                        decided = true;
                    }
                }
                if decided {
                    decide(&mut watched, now, &me, &leased, &metrics);
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                note_stall(&mut watched, now.saturating_duration_since(next_tick), &metrics);
                next_tick = now + config.interval;
                let now = ms(now);
                decide(&mut watched, now, &me, &leased, &metrics);
                update_targets(&mut watched, &targets.borrow_and_update(), &me, &leased, config, now, &metrics);
                counter = counter.wrapping_add(1);
                for (subject, w) in watched.iter_mut() {
                    if matches!(subject, Subject::Path(_)) && !counter.is_multiple_of(PATH_EVERY) {
                        continue;
                    }
                    let ids: Vec<u16> = w
                        .ids(counter)
                        .into_iter()
                        .filter(|id| socket.send_echo(w.probe_ip, *id, counter).is_ok())
                        .collect();
                    metrics.probes_sent(subject, ids.len());
                    if !ids.is_empty() {
                        w.rounds.start(now, counter, ids);
                    }
                }
            }
            _ = deadline => {
                let now = Instant::now();
                if let Some(at) = next_deadline {
                    note_stall(&mut watched, now.saturating_duration_since(at), &metrics);
                }
                decide(&mut watched, ms(now), &me, &leased, &metrics);
            }
        }
    }
}

fn note_stall(watched: &mut BTreeMap<Subject, Watched>, late: Duration, metrics: &Metrics) {
    let late = late.as_millis() as u64;
    if late > STALL_MS {
        tracing::debug!(late_ms = late, "probe loop stalled: extending deadlines");
        metrics.observer_stalled();
        for w in watched.values_mut() {
            w.rounds.stalled(late);
        }
    }
}

/// Feed every decided round to its subject's detector, publishing opinions that change.
fn decide(
    watched: &mut BTreeMap<Subject, Watched>,
    now: u64,
    me: &str,
    leased: &LeasedKeys,
    metrics: &Metrics,
) {
    for (subject, w) in watched.iter_mut() {
        for outcome in w.rounds.decide(now) {
            if !outcome.answered {
                metrics.round_failed(subject);
            }
            if let Some(up) = w.detector.observe(now, outcome.answered) {
                let verb = if up { "recovered" } else { "FAILED" };
                match subject {
                    Subject::Gateway(g) => {
                        tracing::warn!(gateway = %g, up, "forwarding through gateway {verb}")
                    }
                    Subject::Path(p) => {
                        tracing::warn!(peer = %p, up, "direct path {verb}")
                    }
                }
                metrics.opinion(subject, up, true);
                publish(leased, subject, me, up);
            }
        }
    }
}

/// Follow the plan's lists: new subjects start out up (and say so, so that a single
/// dissenting observer is never the only voice), dropped ones withdraw their opinion.
fn update_targets(
    watched: &mut BTreeMap<Subject, Watched>,
    targets: &Targets,
    me: &str,
    leased: &LeasedKeys,
    config: ProbeConfig,
    now: u64,
    metrics: &Metrics,
) {
    let wanted: BTreeMap<Subject, (IpAddr, usize)> = targets
        .gateways
        .iter()
        .map(|t| {
            (
                Subject::Gateway(t.gateway.clone()),
                (t.probe_ip, t.relays.max(1)),
            )
        })
        .chain(
            targets
                .paths
                .iter()
                .map(|p| (Subject::Path(p.peer.clone()), (p.probe_ip, 0))),
        )
        .collect();
    watched.retain(|subject, _| {
        let keep = wanted.contains_key(subject);
        if !keep {
            leased.remove(&key_of(subject, me));
            metrics.stop_watching(subject);
        }
        keep
    });
    for (subject, (probe_ip, relays)) in wanted {
        let IpAddr::V4(probe_ip) = probe_ip else {
            continue;
        };
        let w = watched.entry(subject.clone()).or_insert_with(|| {
            publish(leased, &subject, me, true);
            metrics.opinion(&subject, true, false);
            Watched {
                probe_ip,
                relays,
                detector: Detector::new(config.detector, now),
                rounds: Rounds::new(config.rounds),
            }
        });
        w.probe_ip = probe_ip;
        w.relays = relays;
    }
}

fn key_of(subject: &Subject, me: &str) -> String {
    match subject {
        Subject::Gateway(g) => keys::observation(g, me),
        Subject::Path(p) => keys::path(me, p),
    }
}

fn publish(leased: &LeasedKeys, subject: &Subject, me: &str, up: bool) {
    let encoded = match subject {
        Subject::Gateway(g) => serde_json::to_vec(&Observation {
            gateway: g.clone(),
            observer: me.to_string(),
            up,
        }),
        Subject::Path(p) => serde_json::to_vec(&PathReport {
            from: me.to_string(),
            to: p.clone(),
            up,
        }),
    };
    match encoded {
        Ok(value) => leased.set(key_of(subject, me), value),
        Err(e) => tracing::error!("encoding an opinion: {e}"),
    }
}

/// The probe address appears on the interface only after the first plan is applied, so
/// binding is retried until it works.
async fn open_socket(probe_ip: Ipv4Addr) -> IcmpSocket {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        match IcmpSocket::open(Some(probe_ip)) {
            Ok(socket) => return socket,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::debug!(retry_in = ?delay, "probe socket: {e:#}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
