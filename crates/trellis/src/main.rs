//! `trellis`: the agent, the lab and the tools that read and write cluster state.

mod agent;
mod backoff;
mod cluster;
mod commands;
mod lab;
mod leader;
mod state_cache;
mod store_url;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "A self-healing WireGuard network fabric for clusters that span several sites",
    long_about = "A self-healing WireGuard network fabric for clusters that span several sites.\n\n\
        One agent per node plans the mesh from shared cluster state and programs WireGuard,\n\
        links and routes itself. `trellis lab` runs a whole multi-site cluster of network\n\
        namespaces on this machine."
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", env = "TRELLIS_LOG")]
    log: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: publish this node, plan the mesh, program WireGuard and routes.
    Agent(Box<agent::AgentArgs>),
    /// Build, inspect and remove a cluster of network namespaces on this machine.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Manage external WireGuard peers (laptops, VMs) that join the mesh.
    #[command(subcommand)]
    Peer(commands::PeerCommand),
    /// Print a WireGuard configuration for a node or an external peer.
    #[command(subcommand)]
    Showconf(commands::ShowconfCommand),
    /// Print the mesh topology as a GraphViz graph (pipe it into `dot -Tsvg`).
    Graph(commands::StoreArgs),
    /// Show the nodes, their gateways and what each agent last reported.
    Status(commands::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Agent(_) | Command::Lab(lab::LabCommand::ServeStore(_))
    ) {
        // Commands whose output is piped into `head` should end quietly when it closes.
        // SAFETY: restoring the default disposition of one signal before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr)
        .with_target(false)
        // colour only for a person at a terminal; log files stay greppable
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        // The agent and the lab's helper processes pick their network namespace before any
        // thread exists, so they build their own runtime.
        Command::Agent(args) => agent::main(*args),
        Command::Lab(cmd) => lab::main(cmd),
        Command::Peer(cmd) => runtime().and_then(|rt| rt.block_on(commands::peer(cmd))),
        Command::Showconf(cmd) => runtime().and_then(|rt| rt.block_on(commands::showconf(cmd))),
        Command::Graph(args) => runtime().and_then(|rt| rt.block_on(commands::graph(args))),
        Command::Status(args) => runtime().and_then(|rt| rt.block_on(commands::status(args))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
