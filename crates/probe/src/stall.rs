//! Noticing that this observer did not run.
//!
//! A starved agent (two cores, six userspace WireGuard hops per probe) stops reading its
//! socket: answers wait, unread, and rounds look failed that were answered — every
//! observer of the same machine then accuses whatever it watches. The prober cannot see
//! the starvation itself, only its trace: it is called later than it asked. That lateness
//! is how long nothing could be seen, so every pending deadline moves back by as much
//! (Lifeguard's "local health": an observer that knows it is slow gives the others more
//! time before it accuses them).

/// A call this much later than asked means the observer did not run in between; less is
/// ordinary timer and scheduling slack.
pub const STALL_MS: u64 = 50;

#[derive(Clone, Debug, Default)]
pub(crate) struct StallDetector {
    /// The latest time the prober was called: the observer was running then.
    last_now: u64,
}

impl StallDetector {
    /// The prober is called at `now`, having asked to be woken at `asked`. Returns by how
    /// much the observer stalled, if it did.
    ///
    /// Lateness counts from the wake-up asked for, or from the last call if that came
    /// after it: an overdue timer seen by an earlier call has been accounted for already.
    pub(crate) fn called(&mut self, now: u64, asked: Option<u64>) -> Option<u64> {
        let late = asked
            .map(|asked| now.saturating_sub(asked.max(self.last_now)))
            .unwrap_or(0);
        self.last_now = self.last_now.max(now);
        (late > STALL_MS).then_some(late)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_is_counted_once_from_the_wake_up_asked_for() {
        let mut s = StallDetector::default();
        assert_eq!(s.called(100, Some(100)), None);
        assert_eq!(s.called(150, Some(100)), None, "50 ms is slack");
        assert_eq!(s.called(600, Some(200)), Some(400));
        assert_eq!(
            s.called(600, Some(200)),
            None,
            "the same stall seen by the next call"
        );
        assert_eq!(s.called(700, None), None, "nothing asked, nothing late");
        assert_eq!(
            s.called(690, Some(650)),
            None,
            "a clock read before the last call"
        );
    }
}
