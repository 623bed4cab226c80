//! The prober's driver. Every decision (which echoes, with which ids; when a round failed;
//! whether the observer was starved; what this node thinks of each gateway and direct
//! path) is made by [`trellis_probe::Prober`], a state machine without IO or clocks that is
//! tested on a simulated network. This module only moves bytes and time between it and
//! the world: the ICMP socket, a timer, the plan's targets, the store (opinions, under the
//! agent's lease) and the metrics.

use crate::admin::Metrics;
use crate::backoff;
use crate::report::leased::LeasedKeys;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_dataplane::icmp::IcmpSocket;
use trellis_model::{Observation, PathReport, keys};
use trellis_probe::{Echo, Event, Prober, Reply};

pub use trellis_probe::{ProbeConfig, Subject, Targets};

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
    let mut prober = Prober::new(config, ms(Instant::now()));
    prober.set_targets(ms(Instant::now()), targets.borrow_and_update().clone());
    loop {
        // Wait for a reply, new targets or the machine's next deadline, whichever is first.
        let wake_at = prober
            .poll_timeout()
            .map(|t| start + Duration::from_millis(t));
        let timer = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut retarget = false;
        tokio::select! {
            readable = socket.readable() => {
                if let Err(e) = readable {
                    tracing::warn!("probe socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            changed = targets.changed() => {
                if changed.is_err() {
                    return; // the agent is shutting down
                }
                retarget = true;
            }
            _ = timer => {}
        }
        let now = ms(Instant::now());
        if retarget {
            prober.set_targets(now, targets.borrow_and_update().clone());
        }
        // Every answer already received counts before any deadline is judged.
        loop {
            match socket.try_recv_reply() {
                Ok(Some(r)) => prober.handle_reply(
                    now,
                    Reply {
                        from: r.from,
                        id: r.id,
                        seq: r.seq,
                    },
                ),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("reading probe answers: {e}");
                    break;
                }
            }
        }
        if prober.poll_timeout().is_some_and(|t| t <= now) {
            prober.handle_timeout(now);
        }
        while let Some(echo) = prober.poll_transmit() {
            let Echo { to, id, seq } = echo;
            if socket.send_echo(to, id, seq).is_err() {
                prober.transmit_failed(echo);
            }
        }
        while let Some(event) = prober.poll_event() {
            handle(&event, &me, &leased, &metrics);
        }
    }
}

/// Publishes opinions and counts everything; decides nothing.
fn handle(event: &Event, me: &str, leased: &LeasedKeys, metrics: &Metrics) {
    match event {
        Event::Opinion {
            subject,
            up,
            changed,
        } => {
            if *changed {
                let verb = if *up { "recovered" } else { "FAILED" };
                match subject {
                    Subject::Gateway(g) => {
                        tracing::warn!(gateway = %g, up, "forwarding through gateway {verb}")
                    }
                    Subject::Path(p) => tracing::warn!(peer = %p, up, "direct path {verb}"),
                }
            }
            metrics.opinion(subject, *up, *changed);
            publish(leased, subject, me, *up);
        }
        Event::Withdrawn { subject } => {
            leased.remove(&key_of(subject, me));
            metrics.stop_watching(subject);
        }
        Event::Sent { subject, probes } => metrics.probes_sent(subject, *probes),
        Event::Answered { subject } => metrics.probe_answered(subject),
        Event::RoundAnswered { subject, rtt_ms } => {
            metrics.round_answered(subject, Duration::from_millis(*rtt_ms))
        }
        Event::RoundFailed { subject } => metrics.round_failed(subject),
        Event::Stalled { late_ms } => {
            tracing::debug!(late_ms, "probe loop stalled: deadlines extended");
            metrics.observer_stalled();
        }
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
    backoff::until_ok(
        "probe socket",
        Duration::from_millis(50),
        Duration::from_secs(5),
        || async move { IcmpSocket::open(Some(probe_ip)) },
    )
    .await
}
