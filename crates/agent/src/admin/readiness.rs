//! Readiness and liveness, judged from the last apply pass alone. Deliberately blind to the
//! store and to leadership: a node that lost both still forwards, and taking it out of
//! service for that would turn a control-plane outage into a data-plane one (seed 001).

use std::time::{Duration, Instant};

/// One pass of the main loop, as readiness needs it.
#[derive(Clone, Debug)]
pub struct ApplyPass {
    pub at: Instant,
    /// The store revision the plan was made from.
    pub revision: u64,
    pub errors: Vec<String>,
}

/// Ready: a plan was applied and verified by a pass no older than `stale_after`.
pub fn judge(
    last: Option<&ApplyPass>,
    now: Instant,
    stale_after: Duration,
) -> Result<String, String> {
    let pass = recent(last, now, stale_after)?;
    if !pass.errors.is_empty() {
        return Err(format!(
            "the last apply pass failed: {}",
            pass.errors.join("; ")
        ));
    }
    Ok(format!(
        "data plane applied and verified at store revision {}, {:.1}s ago",
        pass.revision,
        now.duration_since(pass.at).as_secs_f64()
    ))
}

/// Alive: the main loop completed a pass no older than `stale_after`, successful or not
/// (a failing pass is retried; a loop that stopped passing is stuck).
pub fn alive(
    last: Option<&ApplyPass>,
    now: Instant,
    stale_after: Duration,
) -> Result<String, String> {
    match last {
        // Before the first state arrives the loop waits for the store, which is no fault.
        None => Ok("waiting for the first cluster state".into()),
        Some(_) => recent(last, now, stale_after).map(|p| {
            format!(
                "main loop alive, last pass {:.1}s ago",
                now.duration_since(p.at).as_secs_f64()
            )
        }),
    }
}

fn recent(
    last: Option<&ApplyPass>,
    now: Instant,
    stale_after: Duration,
) -> Result<&ApplyPass, String> {
    match last {
        None => Err("no plan applied yet (nothing read from the store so far)".into()),
        Some(pass) if now.duration_since(pass.at) > stale_after => Err(format!(
            "the last apply pass was {:.1}s ago (expected every {:.1}s at most): the agent's loop is stuck",
            now.duration_since(pass.at).as_secs_f64(),
            stale_after.as_secs_f64()
        )),
        Some(pass) => Ok(pass),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_last_apply_pass_and_nothing_else() {
        let t0 = Instant::now();
        let stale = Duration::from_secs(60);
        assert!(
            judge(None, t0, stale)
                .unwrap_err()
                .contains("no plan applied yet")
        );
        let ok = ApplyPass {
            at: t0,
            revision: 7,
            errors: vec![],
        };
        let at = |s| t0 + Duration::from_secs(s);
        assert!(
            judge(Some(&ok), at(1), stale)
                .unwrap()
                .contains("revision 7")
        );
        assert!(judge(Some(&ok), at(59), stale).is_ok());
        assert!(
            judge(Some(&ok), at(61), stale)
                .unwrap_err()
                .contains("stuck")
        );
        let failed = ApplyPass {
            at: at(62),
            revision: 8,
            errors: vec!["route 10.244.3.0/24: EPERM".into()],
        };
        let why = judge(Some(&failed), at(62), stale).unwrap_err();
        assert!(why.contains("10.244.3.0/24: EPERM"), "{why}");
    }

    #[test]
    fn a_failing_loop_is_alive_and_a_stuck_one_is_not() {
        let t0 = Instant::now();
        let stale = Duration::from_secs(60);
        assert!(
            alive(None, t0, stale).is_ok(),
            "waiting for the store is no fault"
        );
        let failed = ApplyPass {
            at: t0,
            revision: 8,
            errors: vec!["EPERM".into()],
        };
        assert!(alive(Some(&failed), t0 + Duration::from_secs(1), stale).is_ok());
        assert!(alive(Some(&failed), t0 + Duration::from_secs(61), stale).is_err());
    }
}
