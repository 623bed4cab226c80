//! `trellis uninstall`: what Trellis made on this node, removed — after its agent has
//! stopped (deploy/uninstall runs it on every node once the DaemonSet is gone).
//!
//! The nftables tables (the relay's `inet trellis`, the service proxy's `ip`/`ip6
//! trellis-proxy`, network policy's `ip`/`ip6 trellis-policy`), the WireGuard interface
//! (the kernel's; the userspace device went with the agent's process) and with it every
//! route through it, the CNI plugin and its
//! configuration, and the node's files; on Kubernetes also the node's annotations and its
//! Lease. Every step is tried, whatever failed before it, and each is said; removing what
//! is already gone is no error, so it can run again.

use clap::Args;
use std::path::{Path, PathBuf};
use trellis_agent::store_addr::StoreAddress;
use trellis_dataplane::nftables::{Batch, Family, Nft};

#[derive(Args)]
pub struct UninstallArgs {
    /// The WireGuard interface the agent used (its --interface).
    #[arg(long, default_value = "trellis0")]
    pub interface: String,
    /// The runtime's CNI configuration directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The runtime's CNI plugin directory.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The agent's persistent directory (key, state cache, CNI node file).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/trellis")]
    pub state_dir: PathBuf,
    /// The agent's and the plugin's run-time directory (ready file, allocations).
    #[arg(long, value_name = "DIR", default_value = "/run/trellis")]
    pub run_dir: PathBuf,
    /// This node's name: with --store kubernetes, its annotations and Lease are removed too.
    #[arg(long)]
    pub node: Option<String>,
    /// `kubernetes` to remove what the agent kept in the API (see --node).
    #[arg(long)]
    pub store: Option<String>,
    #[command(flatten)]
    pub kube: super::state::KubeArgs,
}

/// The nftables tables Trellis programs.
const TABLES: [(Family, &str); 5] = [
    (Family::Inet, trellis_agent::apply::relay::TABLE),
    (Family::Ip, trellis_agent::proxy::render::TABLE),
    (Family::Ip6, trellis_agent::proxy::render::TABLE),
    (Family::Ip, trellis_agent::policy::render::TABLE),
    (Family::Ip6, trellis_agent::policy::render::TABLE),
];

pub async fn run(args: &UninstallArgs) -> anyhow::Result<()> {
    let api = match args.store.as_deref().map(StoreAddress::parse).transpose()? {
        None => None,
        Some(StoreAddress::Kubernetes(_)) => {
            let node = args.node.clone().ok_or_else(|| {
                anyhow::anyhow!("--store kubernetes: give --node, whose annotations and Lease go")
            })?;
            Some((node, args.kube.options()))
        }
        Some(other) => anyhow::bail!(
            "--store {other}: only kubernetes keeps per-node objects to remove (on etcd, `trellis` records expire or the leader collects them)"
        ),
    };
    let mut failed = Vec::new();
    let mut step = |what: String, result: anyhow::Result<bool>| match result {
        Ok(true) => println!("removed {what}"),
        Ok(false) => println!("absent  {what}"),
        Err(e) => {
            println!("FAILED  {what}: {e:#}");
            failed.push(what);
        }
    };
    for (family, table) in TABLES {
        step(
            format!("nftables table {family} {table}"),
            drop_table(family, table),
        );
    }
    step(
        format!("interface {}", args.interface),
        drop_link(&args.interface).await,
    );
    step(
        format!(
            "{}",
            args.conf_dir
                .join(trellis_cni::install::CONFLIST_NAME)
                .display()
        ),
        remove_file(&args.conf_dir.join(trellis_cni::install::CONFLIST_NAME)),
    );
    step(
        format!("{}", args.bin_dir.join(trellis_lab::cni::PLUGIN).display()),
        remove_file(&args.bin_dir.join(trellis_lab::cni::PLUGIN)),
    );
    for dir in [&args.state_dir, &args.run_dir] {
        step(format!("{}", dir.display()), remove_dir(dir));
    }
    if let Some((node, kube)) = &api {
        let forgotten = async {
            let client = kube.client().await?;
            trellis_kube::store::forget_node(&client, &kube.namespace, node).await?;
            anyhow::Ok(true)
        };
        step(
            format!(
                "Node {node}'s trellis.network annotations and Lease {}/node.{node}",
                kube.namespace
            ),
            forgotten.await,
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("not removed: {}", failed.join("; "))
    }
}

fn drop_table(family: Family, table: &str) -> anyhow::Result<bool> {
    let nft = Nft::connect()?;
    if !nft.table_exists(family, table)? {
        return Ok(false);
    }
    let mut batch = Batch::new();
    batch.delete_table(family, table);
    nft.apply(&batch)?;
    Ok(true)
}

async fn drop_link(name: &str) -> anyhow::Result<bool> {
    let netlink = trellis_dataplane::netlink::Netlink::connect()?;
    if netlink.link_index(name).await?.is_none() {
        return Ok(false);
    }
    netlink.delete_link(name).await?;
    Ok(true)
}

fn remove_file(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Empties and removes a directory. One that is a mount point (a hostPath volume in the
/// uninstall pod) cannot itself be removed: emptied, it counts as removed.
fn remove_dir(path: &Path) -> anyhow::Result<bool> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?.path();
        if entry.is_dir() && !entry.is_symlink() {
            std::fs::remove_dir_all(&entry)?;
        } else {
            std::fs::remove_file(&entry)?;
        }
    }
    match std::fs::remove_dir(path) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        other => Ok(other.map(|()| true)?),
    }
}
