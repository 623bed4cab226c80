//! `trellis`: parses the command line and hands each command to the agent library
//! (`trellis-agent`) or the lab (`trellis-lab`). Nothing here decides anything.

mod cli;

/// mimalloc, not glibc's allocator: after the proxy planned a table of 100,000 elements,
/// glibc spent 10–35 ms inside single allocations of a later endpoint event sorting the
/// blocks the plan had freed (`_int_malloc`, `malloc_consolidate`, measured with `perf`),
/// five times the event's own cost. mimalloc frees into small per-page lists and has no
/// such pause.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if cli.command.writes_to_a_pipe() {
        // Commands whose output is piped into `head` should end quietly when it closes.
        cli::default_sigpipe();
    }
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr)
        .with_target(false)
        // colour only for a person at a terminal; log files stay greppable
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
