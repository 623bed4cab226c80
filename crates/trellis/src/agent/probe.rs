//! The forwarding prober: every interval, one probe round per gateway this node observes.
//! A round is an ICMP echo from this node's probe address to the gateway's, one per relay
//! target, each with a fresh id (a new flow, so a fault that spares established flows is
//! still seen); the gateway's kernel relays each to a node behind it and the answer back.
//! A round succeeds when any answer arrives before its deadline, which adapts to the
//! measured round-trip times ([`Rounds`]). Each gateway's rounds feed a [`Detector`]; its
//! opinion is published when it changes.

use super::leased::LeasedKeys;
use super::metrics::Metrics;
use crate::backoff::Backoff;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_dataplane::icmp::IcmpSocket;
use trellis_model::{Observation, keys};
use trellis_plan::ProbeTarget;
use trellis_plan::health::{Detector, DetectorConfig, ID_RANGE_SIZE, id_range};
use trellis_plan::rounds::{RoundConfig, Rounds};

/// Probes per round, spread over the gateway's relay targets. A round fails only if every
/// one is lost: at 5 % loss on every link a probe crosses eight links and is lost a third
/// of the time, so four independent probes make a failed round a 1 % event and three failed
/// rounds in a row a one-in-a-million one, while a real fault still fails every probe.
const PROBES_PER_ROUND: usize = 4;

/// A timer that fires this much later than asked means this agent did not run in between:
/// whatever it was waiting for may have arrived unseen, so deadlines move back.
const STALL_MS: u64 = 50;

#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub rounds: RoundConfig,
    pub detector: DetectorConfig,
}

struct Watched {
    probe_ip: Ipv4Addr,
    relays: usize,
    detector: Detector,
    rounds: Rounds,
}

pub async fn run(
    me: String,
    probe_ip: Ipv4Addr,
    config: ProbeConfig,
    mut targets: watch::Receiver<Vec<ProbeTarget>>,
    leased: LeasedKeys,
    metrics: Metrics,
) {
    let socket = open_socket(probe_ip).await;
    let start = Instant::now();
    let ms = |t: Instant| t.duration_since(start).as_millis() as u64;
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
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
                let Some((gateway, w)) = watched.iter_mut().find(|(_, w)| w.probe_ip == reply.from) else {
                    continue;
                };
                metrics.probe_answered(gateway);
                if let Some(rtt) = w.rounds.answer(now, reply.seq, reply.id) {
                    metrics.round_answered(gateway, Duration::from_millis(rtt));
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
                for (gateway, w) in watched.iter_mut() {
                    let relays = w.relays.max(1);
                    let mut ids = Vec::with_capacity(PROBES_PER_ROUND.max(relays));
                    for i in 0..PROBES_PER_ROUND.max(relays) {
                        let k = i % relays;
                        let nth = (u32::from(counter) * PROBES_PER_ROUND as u32 + i as u32) % u32::from(ID_RANGE_SIZE);
                        let id = id_range(k).0 + nth as u16;
                        if socket.send_echo(w.probe_ip, id, counter).is_ok() {
                            ids.push(id);
                        }
                    }
                    metrics.probes_sent(gateway, ids.len());
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

fn note_stall(watched: &mut BTreeMap<String, Watched>, late: Duration, metrics: &Metrics) {
    let late = late.as_millis() as u64;
    if late > STALL_MS {
        tracing::debug!(late_ms = late, "probe loop stalled: extending deadlines");
        metrics.observer_stalled();
        for w in watched.values_mut() {
            w.rounds.stalled(late);
        }
    }
}

/// Feed every decided round to its gateway's detector, publishing opinions that change.
fn decide(
    watched: &mut BTreeMap<String, Watched>,
    now: u64,
    me: &str,
    leased: &LeasedKeys,
    metrics: &Metrics,
) {
    for (gateway, w) in watched.iter_mut() {
        for outcome in w.rounds.decide(now) {
            if !outcome.answered {
                metrics.round_failed(gateway);
            }
            if let Some(up) = w.detector.observe(now, outcome.answered) {
                tracing::warn!(gateway = %gateway, up, "forwarding through gateway {}", if up { "recovered" } else { "FAILED" });
                metrics.opinion(gateway, up, true);
                publish(leased, gateway, me, up);
            }
        }
    }
}

/// Follow the plan's list of gateways to observe: new ones start out up (and say so, so
/// that a single dissenting observer is never the only voice), dropped ones withdraw.
fn update_targets(
    watched: &mut BTreeMap<String, Watched>,
    targets: &[ProbeTarget],
    me: &str,
    leased: &LeasedKeys,
    config: ProbeConfig,
    now: u64,
    metrics: &Metrics,
) {
    watched.retain(|gateway, _| {
        let keep = targets.iter().any(|t| &t.gateway == gateway);
        if !keep {
            leased.remove(&keys::observation(gateway, me));
            metrics.stop_watching(gateway);
        }
        keep
    });
    for t in targets {
        let IpAddr::V4(probe_ip) = t.probe_ip else {
            continue;
        };
        let w = watched.entry(t.gateway.clone()).or_insert_with(|| {
            publish(leased, &t.gateway, me, true);
            metrics.opinion(&t.gateway, true, false);
            Watched {
                probe_ip,
                relays: t.relays,
                detector: Detector::new(config.detector, now),
                rounds: Rounds::new(config.rounds),
            }
        });
        w.probe_ip = probe_ip;
        w.relays = t.relays;
    }
}

fn publish(leased: &LeasedKeys, gateway: &str, me: &str, up: bool) {
    let record = Observation {
        gateway: gateway.to_string(),
        observer: me.to_string(),
        up,
    };
    match serde_json::to_vec(&record) {
        Ok(value) => leased.set(keys::observation(gateway, me), value),
        Err(e) => tracing::error!("encoding observation: {e}"),
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
