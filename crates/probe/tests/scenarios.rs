//! The prober on a simulated network: each test is one behaviour the agent depends on,
//! with the numbers it must meet at the default configuration (interval 100 ms, minimum
//! timeout 150 ms, multiplier 3, hold-down 5 s).

mod sim;

use sim::{Behaviour, Site};
use trellis_probe::{Event, STARTUP_GRACE_MS, Subject};

const MINUTE: u64 = 60_000;

fn warm(seed: u64) -> Site {
    let mut site = Site::new(seed);
    site.start();
    site.sim.run_for(20_000);
    assert!(site.sim.changes().is_empty());
    site
}

/// Scenario 1. Relayed probes cross eight lossy points (a third of them lost), path
/// probes four; four probes a round keep a healthy gateway and its paths up.
#[test]
fn healthy_gateway_and_paths_stay_up_for_ten_minutes_at_5_percent_loss() {
    let mut site = Site::new(1);
    site.sim.links.loss = 0.05;
    site.start();
    site.sim.run_for(10 * MINUTE);
    assert_eq!(site.sim.changes(), vec![], "no opinion may change");
    let sent = site.sim.rounds_sent();
    let failed = site.sim.failed_rounds();
    // 3 gateway + 2 path subjects, 10 rounds a second
    assert!(sent >= 5 * 10 * 600 - 10, "{sent} rounds sent");
    // the loss bit: about 1.3 % of gateway rounds fail, 0.1 % of path rounds
    assert!(
        failed > 100,
        "only {failed} failed rounds: is the loss modelled?"
    );
    let o1 = site.o1;
    let sent_probes: usize = site
        .sim
        .log(o1)
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Sent {
                subject: Subject::Gateway(_),
                probes,
            } => Some(*probes),
            _ => None,
        })
        .sum();
    let answered = site.sim.count(o1, |e| {
        matches!(
            e,
            Event::Answered {
                subject: Subject::Gateway(_)
            }
        )
    });
    let loss = 1.0 - answered as f64 / sent_probes as f64;
    assert!((0.30..0.37).contains(&loss), "relayed probe loss {loss}");
}

/// Scenario 2. Loss, reordering and an RTT that steps from 30 ms to 250 ms (a loaded
/// machine) and back: the deadlines follow, nobody is declared down.
#[test]
fn loss_delay_steps_and_reordering_cause_no_false_down() {
    let mut site = Site::new(2);
    site.sim.links.loss = 0.05;
    site.sim.links.reorder = 0.2;
    site.sim.links.reorder_ms = 30;
    site.sim.links.hop_ms = 7; // relayed RTT about 30 ms (four hops)
    site.start();
    let mut steps = Vec::new();
    for _ in 0..3 {
        site.sim.run_for(MINUTE);
        steps.push(site.sim.now);
        site.sim.links.hop_ms = 62; // about 250 ms
        site.sim.run_for(MINUTE);
        site.sim.links.hop_ms = 7;
    }
    assert_eq!(site.sim.changes(), vec![]);
    // The step was felt: rounds in flight at the step failed, and answers of 250 ms
    // were accepted afterwards.
    let o1 = site.o1;
    let slow = site.sim.count(o1, |e| {
        matches!(e, Event::RoundAnswered { subject: Subject::Gateway(_), rtt_ms } if *rtt_ms >= 240)
    });
    assert!(slow > 500, "{slow} slow answers accepted");
    let failed_at_steps = site
        .sim
        .log(o1)
        .iter()
        .filter(|(t, e)| {
            matches!(e, Event::RoundFailed { .. })
                && steps.iter().any(|s| (*s..*s + 1_000).contains(t))
        })
        .count();
    assert!(failed_at_steps > 0, "the steps were not felt");
}

/// Scenario 3. An observer whose process does not run for 400 ms, just after sending a
/// round, accuses nobody: answers that came through the tunnel are decrypted only once
/// it runs again (its WireGuard device is userspace), so it must notice its own stall and
/// wait; answers from its own location wait in the socket, and must be read before any
/// deadline is judged. A gateway that really died meanwhile is still found.
#[test]
fn a_starved_observer_does_not_accuse() {
    let mut site = warm(3);
    site.sim.run_for(1); // the round of 20 000 ms is in flight
    let t = site.sim.now;
    for o in [site.o1, site.o3] {
        site.sim.starve(o, 400);
    }
    site.sim.run_for(5_000);
    for o in [site.o1, site.o3] {
        let stalls: Vec<u64> = site
            .sim
            .log(o)
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Stalled { late_ms } => Some(*late_ms),
                _ => None,
            })
            .collect();
        assert_eq!(stalls.len(), 1, "{stalls:?}");
        assert!((300..=400).contains(&stalls[0]), "{stalls:?}");
        let failed = site
            .sim
            .log(o)
            .iter()
            .filter(|(at, e)| *at >= t && matches!(e, Event::RoundFailed { .. }))
            .count();
        assert_eq!(failed, 0, "answers that waited out the stall must count");
    }
    assert_eq!(site.sim.changes(), vec![]);

    // The same stall while the gateway dies: the stall delays the verdict, no more.
    let (g, o1) = (site.g, site.o1);
    site.sim.set_behaviour(g, Behaviour::Dead);
    let fault = site.sim.now;
    site.sim.starve(o1, 400);
    site.sim.run_for(2_000);
    let gw = site.gateway();
    let down = site
        .sim
        .first_change(o1, &gw, false)
        .expect("declared down");
    assert!(
        down - fault <= 400 + 500,
        "down {} ms after the fault",
        down - fault
    );
}

/// Scenario 4. A gateway that keeps forwarding old flows but no new one: every probe is
/// a new flow, so it is found like a dead one, within multiplier rounds plus a timeout.
#[test]
fn a_gateway_that_forwards_no_new_flow_is_down_within_500_ms() {
    for seed in 0..5 {
        let mut site = warm(40 + seed);
        site.sim.run_for(seed * 17); // faults at various points of the interval
        let fault = site.sim.now;
        let g = site.g;
        site.sim.set_behaviour(g, Behaviour::OldFlowsOnly);
        site.sim.run_for(3_000);
        let gw = site.gateway();
        for o in site.observers() {
            let down = site.sim.first_change(o, &gw, false).expect("declared down");
            let after = down - fault;
            println!("seed {seed}: down {after} ms after the fault");
            assert!(
                (200..=500).contains(&after),
                "seed {seed}: down {after} ms after the fault"
            );
        }
        // the direct paths to the same node are not affected
        let path = site.path();
        assert_eq!(site.sim.first_change(site.o1, &path, false), None);
    }
}

/// Scenario 5a. A gateway that comes back is up again only after the 5 s hold-down.
#[test]
fn a_gateway_that_comes_back_is_up_after_the_hold_down() {
    let mut site = warm(5);
    let g = site.g;
    site.sim.set_behaviour(g, Behaviour::Dead);
    site.sim.run_for(2_000);
    site.sim.set_behaviour(g, Behaviour::Healthy);
    let back = site.sim.now;
    site.sim.run_for(10_000);
    let gw = site.gateway();
    for o in site.observers() {
        let up = site.sim.first_change(o, &gw, true).expect("up again");
        assert!(
            (back + 5_000..=back + 5_300).contains(&up),
            "up {} ms after it came back",
            up - back
        );
    }
}

/// Scenario 5b. One that flaps is damped: after the third down it stays down while it
/// works, until the penalty has decayed (RFC 2439).
#[test]
fn a_flapping_gateway_is_damped() {
    let mut site = warm(6);
    let (g, o1) = (site.g, site.o1);
    let gw = site.gateway();
    for _ in 0..4 {
        site.sim.set_behaviour(g, Behaviour::Dead);
        site.sim.run_for(1_000);
        site.sim.set_behaviour(g, Behaviour::Healthy);
        site.sim.run_for(6_000);
    }
    let changes: Vec<bool> = site
        .sim
        .log(o1)
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Opinion {
                subject,
                up,
                changed: true,
            } if *subject == gw => Some(*up),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        vec![false, true, false, true, false],
        "the third recovery is suppressed"
    );
    let quiet = site.sim.now;
    site.sim.run_for(30_000);
    assert_eq!(
        site.sim.prober_opinion(o1, &gw),
        Some(false),
        "still damped 30 s later"
    );
    site.sim.run_for(60_000);
    let up = site.sim.log(o1).iter().rev().find_map(|(t, e)| match e {
        Event::Opinion {
            subject,
            up: true,
            changed: true,
        } if *subject == gw => Some(*t),
        _ => None,
    });
    assert!(
        up.is_some_and(|t| t > quiet + 30_000),
        "back once the penalty decayed: {up:?}"
    );
}

/// Scenario 6a. A cut direct path (every frame between the two nodes dropped, the
/// Kilo-188 case) is broken within half a second, and mended after the hold-down.
#[test]
fn a_cut_path_is_broken_within_500_ms() {
    for seed in 0..5 {
        let mut site = warm(60 + seed);
        site.sim.links.loss = 0.05;
        site.sim.run_for(10_000 + seed * 23);
        let (g, o1, o2) = (site.g, site.o1, site.o2);
        let cut = site.sim.now;
        site.sim.cut(o1, g);
        site.sim.run_for(2_000);
        let path = site.path();
        let down = site.sim.first_change(o1, &path, false).expect("broken");
        println!("seed {seed}: broken {} ms after the cut", down - cut);
        assert!(
            down - cut <= 500,
            "seed {seed}: broken {} ms after the cut",
            down - cut
        );
        assert_eq!(
            site.sim.first_change(o2, &path, false),
            None,
            "o2's path is fine"
        );
        site.sim.heal(o1, g);
        let healed = site.sim.now;
        site.sim.run_for(6_000);
        let up = site.sim.first_change(o1, &path, true).expect("mended");
        assert!(up >= healed + 5_000);
    }
}

/// Scenario 6b. A path that never answered is given the start-up grace (at least the
/// plan's 7 s) before its failures count, then broken as fast as any.
#[test]
fn a_path_never_answered_is_not_broken_before_the_startup_grace() {
    let mut site = Site::new(7);
    let (g, o1) = (site.g, site.o1);
    site.sim.cut(o1, g);
    site.start();
    site.sim.run_for(STARTUP_GRACE_MS + 2_000);
    let path = site.path();
    let down = site
        .sim
        .first_change(o1, &path, false)
        .expect("broken after the grace");
    assert!(down >= STARTUP_GRACE_MS.max(7_000), "broken at {down} ms");
    assert!(down <= STARTUP_GRACE_MS + 500, "broken at {down} ms");
    assert_eq!(site.sim.first_change(site.o2, &path, false), None);
}

/// Scenario 7a. The plan's lists change: a dropped gateway is withdrawn and no longer
/// probed; added again, it starts afresh, up.
#[test]
fn targets_dropped_are_withdrawn_and_readded_ones_start_up() {
    let mut site = warm(8);
    let (g, o1) = (site.g, site.o1);
    let gw = site.gateway();
    let t = site.sim.targets(&[], &[g]);
    let before = site.sim.log(o1).len();
    site.sim.observe(o1, t);
    site.sim.run_for(1_000);
    let after: Vec<&Event> = site.sim.log(o1)[before..].iter().map(|(_, e)| e).collect();
    assert_eq!(
        after
            .iter()
            .filter(|e| matches!(e, Event::Withdrawn { subject } if *subject == gw))
            .count(),
        1
    );
    assert!(
        !after
            .iter()
            .any(|e| matches!(e, Event::Sent { subject, .. } if *subject == gw)),
        "no longer probed"
    );
    assert!(
        after.iter().any(|e| matches!(
            e,
            Event::Sent {
                subject: Subject::Path(_),
                ..
            }
        )),
        "the path still is"
    );
    // Re-added (dead by now): up at first, as any new subject, and a new watch has no
    // history: it gets the start-up grace again.
    site.sim.set_behaviour(g, Behaviour::Dead);
    let t = site.sim.targets(&[g], &[g]);
    site.sim.observe(o1, t);
    let readded = site.sim.now;
    let first = site
        .sim
        .log(o1)
        .iter()
        .rev()
        .find(|(_, e)| matches!(e, Event::Opinion { subject, .. } if *subject == gw));
    assert_eq!(
        first,
        Some(&(
            readded,
            Event::Opinion {
                subject: gw.clone(),
                up: true,
                changed: false
            }
        ))
    );
    site.sim.run_for(STARTUP_GRACE_MS + 1_000);
    let down = site
        .sim
        .first_change(o1, &gw, false)
        .expect("down after the grace");
    assert!(down >= readded + STARTUP_GRACE_MS);
}

/// Scenario 7b. Probes that cannot be sent (no probe address yet) are no part of any
/// round: nothing sent, nothing failed, and the start-up grace counts from the first
/// probe that left.
#[test]
fn probes_that_cannot_be_sent_make_no_round() {
    let mut site = Site::new(9);
    let (g, o1) = (site.g, site.o1);
    site.sim.set_behaviour(g, Behaviour::Dead);
    site.sim.fail_sends_until(o1, 10_000);
    site.start();
    site.sim.run_for(9_999);
    assert_eq!(site.sim.count(o1, |e| matches!(e, Event::Sent { .. })), 0);
    assert_eq!(
        site.sim
            .count(o1, |e| matches!(e, Event::RoundFailed { .. })),
        0
    );
    site.sim.run_for(STARTUP_GRACE_MS + 1_000);
    let gw = site.gateway();
    let down = site.sim.first_change(o1, &gw, false).expect("down");
    assert!(
        down >= 10_000 + STARTUP_GRACE_MS,
        "grace from the first probe sent: {down}"
    );
    assert_eq!(
        site.sim.first_change(o1, &site.path(), false),
        None,
        "the path answers"
    );
}
