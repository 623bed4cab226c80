//! `trellis cni install`: what a DaemonSet's init container runs to put Trellis's CNI
//! plugin on a node — the `trellis-cni` binary into the runtime's plugin directory and the
//! network's configuration list into its configuration directory, each replaced
//! atomically (a runtime calling the plugin meanwhile runs the old binary or the new one,
//! and reads the old list or the new one, never half of either).

use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use trellis_cni::install::{CONFLIST_NAME, Chained, Files, conflist};

#[derive(Subcommand)]
pub enum CniCommand {
    /// Install the plugin binary and the network's configuration list.
    Install(InstallArgs),
}

#[derive(Args)]
pub struct InstallArgs {
    /// The runtime's CNI configuration directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The runtime's CNI plugin directory.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The network's name.
    #[arg(long, default_value = "trellis")]
    pub name: String,
    /// Reference plugins to chain after Trellis's: portmap, bandwidth (repeatable).
    #[arg(long = "chain", value_name = "PLUGIN", value_parser = Chained::parse)]
    pub chain: Vec<Chained>,
    /// Where the agent keeps the node file (its `--cni-node-file`).
    #[arg(long, value_name = "PATH", default_value = trellis_cni::spec::DEFAULT_NODE_FILE)]
    pub node_file: String,
    /// Where the plugin keeps its allocations.
    #[arg(long, value_name = "PATH", default_value = trellis_cni::spec::DEFAULT_IPAM_FILE)]
    pub ipam_file: String,
    /// Where the agent keeps the ready file (its `--cni-ready-file`).
    #[arg(long, value_name = "PATH", default_value = trellis_cni::spec::DEFAULT_READY_FILE)]
    pub ready_file: String,
}

pub fn run(command: CniCommand) -> anyhow::Result<()> {
    match command {
        CniCommand::Install(args) => install(&args),
    }
}

fn install(args: &InstallArgs) -> anyhow::Result<()> {
    let plugin = trellis_lab::cni::plugin_path()?;
    let files = Files {
        node_file: args.node_file.clone(),
        ipam_file: args.ipam_file.clone(),
        ready_file: args.ready_file.clone(),
    };
    for (flag, path) in [
        ("--node-file", &files.node_file),
        ("--ipam-file", &files.ipam_file),
        ("--ready-file", &files.ready_file),
    ] {
        anyhow::ensure!(path.starts_with('/'), "{flag} {path:?}: an absolute path");
    }
    let binary = std::fs::read(&plugin).with_context(|| format!("reading {}", plugin.display()))?;
    let bin_target = args.bin_dir.join(trellis_lab::cni::PLUGIN);
    replace(&bin_target, &binary, 0o755)?;
    let list = conflist(&args.name, &files, &args.chain);
    let conf_target = args.conf_dir.join(CONFLIST_NAME);
    replace(&conf_target, &serde_json::to_vec_pretty(&list)?, 0o644)?;
    println!("installed {}", bin_target.display());
    println!("installed {}", conf_target.display());
    Ok(())
}

/// Writes `content` beside `target` and renames it over `target`.
fn replace(target: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    trellis_cni::state::write_atomically(target, content, mode)
        .with_context(|| format!("replacing {}", target.display()))
}
