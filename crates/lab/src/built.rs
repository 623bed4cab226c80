//! The labs this process has started to build and not removed yet: what a command that is
//! interrupted, fails or panics must tear down before it exits ([`crate::guard`]).
//!
//! It is a process-wide list because every lab is built by [`crate::up::bring_up`], which
//! adds it here before it creates anything, and removed by [`crate::build::teardown`],
//! which takes it off: no command can build a lab and forget to say so. [`crate::guard`]
//! removes what is left. A lab that is meant
//! to outlive the command (`lab up` once it came up) is handed over with [`keep`].

use std::collections::BTreeSet;
use std::sync::Mutex;

static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn labs() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    // A panic while the lock was held leaves a set that is still correct.
    BUILT.lock().unwrap_or_else(|e| e.into_inner())
}

/// `lab` is being built by this process: from now on its namespaces are ours to remove.
pub(crate) fn building(lab: &str) {
    labs().insert(lab.to_string());
}

/// `lab` was removed.
pub(crate) fn removed(lab: &str) {
    labs().remove(lab);
}

/// `lab` came up and stays after this process exits: it is the user's now.
pub fn keep(lab: &str) {
    labs().remove(lab);
}

/// The labs this process built and did not remove or keep yet.
pub(crate) fn pending() -> Vec<String> {
    labs().iter().cloned().collect()
}
