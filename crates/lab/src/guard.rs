//! Runs a lab command so that the labs it built ([`crate::built`]) are torn down on every
//! exit path: it finishes, fails, panics, or SIGINT, SIGTERM or SIGHUP ends it early.
//! Agents run detached in their own sessions, so a terminal's signals never reach them:
//! only this teardown stops them.

use crate::build::Teardown;
use crate::built;
use crate::signals::{Signal, Signals};
use std::future::Future;
use std::io::Write;

/// How the command ended.
pub enum Ended<T> {
    Finished(anyhow::Result<T>),
    Interrupted(Signal),
}

pub struct Guarded<T> {
    pub ended: Ended<T>,
    /// The labs torn down after the command ended, and how that went.
    pub removed: Vec<(String, anyhow::Result<Teardown>)>,
}

/// Runs `command` until it ends or the first signal arrives, then removes what it built.
/// A further signal during the teardown is noted and otherwise ignored: a lab half torn
/// down would be worse than waiting the few seconds it takes.
pub async fn guarded<T>(command: impl Future<Output = anyhow::Result<T>>) -> Guarded<T> {
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            return Guarded {
                ended: Ended::Finished(Err(anyhow::Error::new(e).context("catching signals"))),
                removed: Vec::new(),
            };
        }
    };
    // A reader that goes away (`lab demo | head`) must not kill the process by SIGPIPE
    // before it removes its labs: the write fails instead, and the teardown still runs.
    // SAFETY: signal(2) sets one signal's disposition; no handler is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let on_panic = RemoveOnPanic;
    let ended = tokio::select! {
        result = command => Ended::Finished(result),
        signal = signals.next() => Ended::Interrupted(signal),
    };
    // The command is dropped here: none of its code runs any more. Tasks it spawned (its
    // traffic streams) may run on until the process exits; they build nothing.
    if let Ended::Interrupted(signal) = &ended {
        // Said at once: the teardown takes seconds, and whoever pressed Ctrl-C should know
        // that it is under way.
        let _ = writeln!(
            std::io::stderr(),
            "interrupted by {signal}: removing what this command built"
        );
    }
    let mut teardown = tokio::task::spawn_blocking(remove_all);
    let removed = loop {
        tokio::select! {
            done = &mut teardown => break done.unwrap_or_else(|e| {
                vec![("(all)".into(), Err(anyhow::anyhow!("the teardown failed: {e}")))]
            }),
            signal = signals.next() => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{signal}: still removing what this command built; it exits once that is done"
                );
            }
        }
    };
    drop(on_panic);
    Guarded { ended, removed }
}

impl<T> Guarded<T> {
    /// One line per lab removed (or not), for stderr; empty when there was nothing to do.
    pub fn report(&self) -> String {
        let mut out = String::new();
        if matches!(self.ended, Ended::Interrupted(_)) && self.removed.is_empty() {
            out += "nothing had been built yet\n";
        }
        for (lab, result) in &self.removed {
            out += &removal(lab, result);
        }
        out
    }
}

fn removal(lab: &str, result: &anyhow::Result<Teardown>) -> String {
    match result {
        Ok(t) => format!(
            "removed lab {lab}: {} namespaces, {} processes\n",
            t.namespaces, t.processes
        ),
        Err(e) => {
            format!("could not fully remove lab {lab}: {e:#} (`trellis lab down --name {lab}`)\n")
        }
    }
}

/// A command that panics unwinds through [`guarded`]'s future: its labs go with it.
struct RemoveOnPanic;

impl Drop for RemoveOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (lab, result) in remove_all() {
                let _ = write!(std::io::stderr(), "{}", removal(&lab, &result));
            }
        }
    }
}

/// Tears down every lab this process built and did not remove or keep. Blocking: it waits
/// for the labs' processes to exit.
pub fn remove_all() -> Vec<(String, anyhow::Result<Teardown>)> {
    built::pending()
        .into_iter()
        .map(|lab| {
            let result = crate::build::teardown(&lab);
            (lab, result)
        })
        .collect()
}
