//! What is probed.

use std::fmt;
use trellis_plan::{PathTarget, ProbeTarget};

/// A gateway candidate's forwarding, or the direct path to a peer of another location.
/// Both can have the same probe address (a peer that is also a gateway candidate): the
/// echo id range tells their answers apart.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Gateway(String),
    Path(String),
}

impl Subject {
    pub fn name(&self) -> &str {
        match self {
            Subject::Gateway(n) | Subject::Path(n) => n,
        }
    }

    pub fn is_path(&self) -> bool {
        matches!(self, Subject::Path(_))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Gateway(g) => write!(f, "gateway {g}"),
            Subject::Path(p) => write!(f, "path to {p}"),
        }
    }
}

/// What the plan asks this node to measure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub gateways: Vec<ProbeTarget>,
    pub paths: Vec<PathTarget>,
}
