//! Where the demos' step-by-step narrative goes: stdout, or stderr when stdout carries the
//! JSON summary (`lab demo --json`). A process runs one demo, so the choice is process-wide.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Narrate on stderr from now on (`true`), or on stdout.
pub(crate) fn to_stderr(yes: bool) {
    TO_STDERR.store(yes, Ordering::Relaxed);
}

/// One line of narrative. Write errors are ignored: a terminal closed under the demo
/// (SIGHUP) must not turn its clean-up into a panic.
pub(crate) fn line(args: std::fmt::Arguments) {
    let _ = if TO_STDERR.load(Ordering::Relaxed) {
        writeln!(std::io::stderr(), "{args}")
    } else {
        writeln!(std::io::stdout(), "{args}")
    };
}

/// `println!` for the demos' narrative: see [`line`].
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::narrate::line(format_args!($($arg)*))
    };
}
