//! `trellis peer|showconf|graph|status`: commands that read or write cluster state (as do
//! `apply|delete|get`, in `objects`, with the same [`StoreArgs`]). The
//! store is `--store`, or a lab's (`--lab NAME`, or the only running lab), which the lab
//! library resolves; the commands themselves live in `trellis_agent::ctl`.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use trellis_agent::ctl;
use trellis_agent::store_addr::{EtcdOptions, StoreAddress};
use trellis_model::{Endpoint, ExternalPeer, PublicKey};
use trellis_store::Store;

/// How to reach an etcd cluster: everything but the member list, which the URL holds.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// Key prefix in etcd; keeps Trellis's keys apart from other users of the cluster.
    #[arg(long, global = true, default_value = "/trellis/")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed the members' certificates; turns TLS on.
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), for members started with --client-cert-auth.
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user, for clusters with authentication enabled.
    #[arg(long, global = true)]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (kept out of the process list).
    #[arg(long, global = true, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            prefix: self.etcd_prefix.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

/// How to reach the Kubernetes API, for `--store kubernetes`.
#[derive(Args, Debug, Clone)]
pub struct KubeArgs {
    /// On `--store kubernetes`: the API server's real address (https://HOST:PORT). Default:
    /// the server of --kubeconfig, then the in-cluster environment (a service address: last).
    #[arg(long, value_name = "URL")]
    pub kube_api: Option<String>,
    /// On `--store kubernetes`: the kubelet's kubeconfig, read for the API server's address.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/kubernetes/kubelet.conf"
    )]
    pub kubeconfig: std::path::PathBuf,
    /// On `--store kubernetes`: the namespace of Trellis's Leases and settings ConfigMap.
    #[arg(long, default_value = "trellis-system")]
    pub kube_namespace: String,
}

impl KubeArgs {
    pub fn options(&self) -> trellis_agent::store_addr::KubeOptions {
        trellis_agent::store_addr::KubeOptions {
            api: self.kube_api.clone(),
            kubeconfig: self.kubeconfig.clone(),
            namespace: self.kube_namespace.clone(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The store: etcd://HOST:PORT[,...] or unix:/path/to/store.sock (default: the only
    /// running lab's).
    #[arg(long, global = true)]
    pub store: Option<String>,
    /// Use this lab's store.
    #[arg(long, global = true)]
    pub lab: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

impl StoreArgs {
    pub(super) fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        match (&self.store, &self.lab) {
            (Some(_), Some(_)) => bail!("give either --store or --lab, not both"),
            (Some(address), None) => Ok(StoreAddress::parse(address)?.open(&self.etcd.options())?),
            (None, Some(lab)) => trellis_lab::open_store(lab),
            (None, None) => {
                let labs =
                    trellis_lab::state::running_labs().context("looking for running labs")?;
                match labs.as_slice() {
                    [only] => trellis_lab::open_store(only),
                    [] => bail!(
                        "no --store given and no lab is running: start one with `trellis lab up` or pass --store"
                    ),
                    many => bail!(
                        "no --store given and {} labs are running ({}): pass --lab NAME",
                        many.len(),
                        many.join(", ")
                    ),
                }
            }
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum PeerCommand {
    /// Register an external peer.
    Add {
        /// The peer's name (lowercase letters, digits, '-').
        name: String,
        /// The peer's WireGuard public key (base64, as `wg pubkey` prints it).
        #[arg(long)]
        public_key: String,
        /// The peer's own addresses, comma-separated CIDRs (e.g. 10.5.0.1/32).
        #[arg(long, value_delimiter = ',', required = true)]
        allowed_ips: Vec<String>,
        /// Where the mesh can reach the peer (host:port); omit when the peer dials in.
        #[arg(long)]
        endpoint: Option<String>,
        /// Keepalive the mesh sends to the peer, in seconds.
        #[arg(long)]
        persistent_keepalive: Option<u16>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Remove an external peer.
    Remove {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List external peers.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ShowconfCommand {
    /// A wg-quick configuration for an external peer.
    Peer {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// A node's WireGuard peers as a `wg setconf` file.
    Node {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

pub async fn peer(cmd: PeerCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PeerCommand::Add {
            name,
            public_key,
            allowed_ips,
            endpoint,
            persistent_keepalive,
            store,
        } => {
            let peer = ExternalPeer {
                name,
                public_key: PublicKey::parse("--public-key", &public_key)?,
                allowed_ips: allowed_ips
                    .iter()
                    .map(|c| {
                        c.trim()
                            .parse::<IpNet>()
                            .map_err(|e| anyhow::anyhow!("invalid --allowed-ips {c:?}: {e}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                endpoint: endpoint
                    .as_deref()
                    .map(|e| Endpoint::parse("--endpoint", e))
                    .transpose()?,
                persistent_keepalive,
            };
            ctl::peer_add(store.open()?.as_ref(), &peer).await?;
            println!(
                "peer {} registered; `trellis showconf peer {}` prints its configuration",
                peer.name, peer.name
            );
        }
        PeerCommand::Remove { name, store } => {
            ctl::peer_remove(store.open()?.as_ref(), &name).await?;
            println!("peer {name} removed");
        }
        PeerCommand::List { store } => {
            for p in ctl::peers(store.open()?.as_ref()).await? {
                let ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
                println!("{}\t{}\t{}", p.name, p.public_key, ips.join(","));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn showconf(cmd: ShowconfCommand) -> anyhow::Result<ExitCode> {
    let conf = match cmd {
        ShowconfCommand::Peer { name, store } => {
            ctl::peer_config(store.open()?.as_ref(), &name).await?
        }
        ShowconfCommand::Node { name, store } => {
            ctl::node_config(store.open()?.as_ref(), &name).await?
        }
    };
    print!("{conf}");
    Ok(ExitCode::SUCCESS)
}

pub async fn graph(store: StoreArgs) -> anyhow::Result<ExitCode> {
    print!("{}", ctl::graph(store.open()?.as_ref()).await?);
    Ok(ExitCode::SUCCESS)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let status = ctl::status(args.store.open()?.as_ref()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.table());
    }
    Ok(ExitCode::SUCCESS)
}
