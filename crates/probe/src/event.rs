//! What goes in and out of the prober: echoes to send, replies received, and events for
//! the driver to publish and count. Events carry outcomes, never questions: the driver
//! decides nothing.

use crate::subject::Subject;
use std::net::Ipv4Addr;

/// An ICMP echo request to send from this node's probe address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Echo {
    pub to: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

/// An ICMP echo reply received on this node's probe address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    pub from: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// This node's opinion of a subject, to publish under its key (`observations/` for a
    /// gateway, `paths/` for a direct path). `changed` is false for the first opinion of a
    /// subject just added ("up": a single dissenting observer must never be the only voice),
    /// true when the probes changed it.
    Opinion {
        subject: Subject,
        up: bool,
        changed: bool,
    },
    /// The subject is no longer watched: delete its key and forget its counters.
    Withdrawn { subject: Subject },
    /// A round went out with this many probes (sends that failed are not counted).
    Sent { subject: Subject, probes: usize },
    /// An echo answer from the subject, early, late or duplicate: sent minus answered is
    /// probe loss.
    Answered { subject: Subject },
    /// The first answer of a round, in time: what the RTT estimate follows.
    RoundAnswered { subject: Subject, rtt_ms: u64 },
    /// A round got no answer before its deadline.
    RoundFailed { subject: Subject },
    /// The prober was called this much later than it asked: its observer was not running,
    /// and every pending deadline was moved back by as much.
    Stalled { late_ms: u64 },
}
