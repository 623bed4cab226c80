//! The command line: one module per command family, each parsing its flags into the
//! library's types and calling it.

mod agent;
mod cni;
mod lab;
mod objects;
mod state;
mod uninstall;

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
pub struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", env = "TRELLIS_LOG")]
    pub log: tracing::Level,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent: publish this node, plan the mesh, program WireGuard and routes.
    Agent(Box<agent::AgentArgs>),
    /// Install the CNI plugin and the network's configuration on this node.
    #[command(subcommand)]
    Cni(cni::CniCommand),
    /// Remove what Trellis made on this node (after its agent stopped): nftables tables,
    /// the WireGuard interface and its routes, the CNI plugin, the agent's files; with
    /// --store kubernetes also the node's annotations and Lease.
    Uninstall(Box<uninstall::UninstallArgs>),
    /// Build, inspect and remove a cluster of network namespaces on this machine.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Manage external WireGuard peers (laptops, VMs) that join the mesh.
    #[command(subcommand)]
    Peer(state::PeerCommand),
    /// Print a WireGuard configuration for a node or an external peer.
    #[command(subcommand)]
    Showconf(state::ShowconfCommand),
    /// Print the mesh topology as a GraphViz graph (pipe it into `dot -Tsvg`).
    Graph(state::StoreArgs),
    /// Show the nodes, their gateways and what each agent last reported.
    Status(state::StatusArgs),
    /// Create or update Services, EndpointSlices, NetworkPolicies and Namespaces from
    /// manifests, as `kubectl apply`.
    Apply(objects::ApplyArgs),
    /// Delete Services, EndpointSlices, NetworkPolicies and Namespaces, named or from
    /// manifests, as `kubectl delete`.
    Delete(objects::DeleteArgs),
    /// List Services, EndpointSlices, NetworkPolicies or Namespaces, as `kubectl get`.
    Get(objects::GetArgs),
}

impl Command {
    /// Long-running processes keep SIGPIPE ignored (a closed socket must not kill them);
    /// commands that print for a person or a pipe take the default.
    pub fn writes_to_a_pipe(&self) -> bool {
        !matches!(
            self,
            Command::Agent(_)
                | Command::Lab(lab::LabCommand::ServeStore(_) | lab::LabCommand::ServeKube(_))
        )
    }

    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            // The agent and the lab's helper processes pick their network namespace before
            // any thread exists, so they build their own runtime.
            Command::Agent(args) => {
                trellis_agent::run::main(args.config()?)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Lab(cmd) => lab::main(cmd),
            Command::Cni(cmd) => {
                cni::run(cmd)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Uninstall(args) => {
                runtime()?.block_on(uninstall::run(&args))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Peer(cmd) => runtime()?.block_on(state::peer(cmd)),
            Command::Showconf(cmd) => runtime()?.block_on(state::showconf(cmd)),
            Command::Graph(args) => runtime()?.block_on(state::graph(args)),
            Command::Status(args) => runtime()?.block_on(state::status(args)),
            Command::Apply(args) => runtime()?.block_on(objects::apply(args)),
            Command::Delete(args) => runtime()?.block_on(objects::delete(args)),
            Command::Get(args) => runtime()?.block_on(objects::get(args)),
        }
    }
}

pub fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: restores the default disposition of one signal before any thread exists.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
