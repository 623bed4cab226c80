//! The forwarding prober: every interval, one probe round per gateway this node observes.
//! A round is an ICMP echo from this node's probe address to the gateway's, one per relay
//! target, each with a fresh id (a new flow, so a fault that spares established flows is
//! still seen); the gateway's kernel relays each to a node behind it and the answer back.
//! A round succeeds when any answer arrives before the next round starts. Each gateway's
//! rounds feed a [`Detector`]; its opinion is published when it changes.

use super::leased::LeasedKeys;
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

/// Probes per round, spread over the gateway's relay targets. A round fails only if every
/// one is lost: at 5 % loss on every link a probe crosses eight links and is lost a third
/// of the time, so four independent probes make a failed round a 1 % event and three failed
/// rounds in a row a one-in-a-million one, while a real fault still fails every probe.
const PROBES_PER_ROUND: usize = 4;

#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub detector: DetectorConfig,
}

struct Watched {
    probe_ip: Ipv4Addr,
    relays: usize,
    detector: Detector,
    /// Ids sent in the current round; any answer carrying one of them makes it a success.
    outstanding: Vec<u16>,
    answered: bool,
}

pub async fn run(
    me: String,
    probe_ip: Ipv4Addr,
    config: ProbeConfig,
    mut targets: watch::Receiver<Vec<ProbeTarget>>,
    leased: LeasedKeys,
) {
    let socket = open_socket(probe_ip).await;
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
    let mut counter: u16 = 0;
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = now_ms();
                // Close the round that just ended, then start the next one.
                for (gateway, w) in watched.iter_mut() {
                    if w.outstanding.is_empty() {
                        continue;
                    }
                    if let Some(up) = w.detector.observe(now, w.answered) {
                        tracing::warn!(gateway = %gateway, up, "forwarding through gateway {}", if up { "recovered" } else { "FAILED" });
                        publish(&leased, gateway, &me, up);
                    }
                }
                update_targets(&mut watched, &targets.borrow_and_update(), &me, &leased, config, now);
                counter = counter.wrapping_add(1);
                for w in watched.values_mut() {
                    w.answered = false;
                    w.outstanding.clear();
                    let relays = w.relays.max(1);
                    for i in 0..PROBES_PER_ROUND.max(relays) {
                        let k = i % relays;
                        let nth = (u32::from(counter) * PROBES_PER_ROUND as u32 + i as u32) % u32::from(ID_RANGE_SIZE);
                        let id = id_range(k).0 + nth as u16;
                        if socket.send_echo(w.probe_ip, id, counter).is_ok() {
                            w.outstanding.push(id);
                        }
                    }
                }
            }
            reply = socket.recv_reply() => {
                let Ok(reply) = reply else { continue };
                if let Some(w) = watched.values_mut().find(|w| w.probe_ip == reply.from)
                    && reply.seq == counter
                    && w.outstanding.contains(&reply.id)
                {
                    w.answered = true;
                }
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
) {
    watched.retain(|gateway, _| {
        let keep = targets.iter().any(|t| &t.gateway == gateway);
        if !keep {
            leased.remove(&keys::observation(gateway, me));
        }
        keep
    });
    for t in targets {
        let IpAddr::V4(probe_ip) = t.probe_ip else {
            continue;
        };
        let w = watched.entry(t.gateway.clone()).or_insert_with(|| {
            publish(leased, &t.gateway, me, true);
            Watched {
                probe_ip,
                relays: t.relays,
                detector: Detector::new(config.detector, now),
                outstanding: Vec::new(),
                answered: false,
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
