//! `trellis`: parses the command line and hands each command to the agent library
//! (`trellis-agent`) or the lab (`trellis-lab`). Nothing here decides anything.

mod cli;

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
