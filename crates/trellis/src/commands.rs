//! Commands that read or write cluster state: `peer`, `showconf`, `graph`, `status`.

use crate::cluster::{self, ClusterState};
use crate::store_url;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use std::process::ExitCode;
use std::sync::Arc;
use trellis_model::{Endpoint, ExternalPeer, PublicKey, Validate, keys};
use trellis_plan::{Settings, Topology, graph, showconf};
use trellis_store::Store;

#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// The store: etcd://HOST:PORT[,...], unix:/path/to/store.sock or lab:NAME (default:
    /// the only running lab).
    #[arg(long, global = true)]
    pub store: Option<String>,
    /// Shorthand for --store lab:NAME.
    #[arg(long, global = true)]
    pub lab: Option<String>,
    #[command(flatten)]
    pub etcd: store_url::EtcdArgs,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        store_url::resolve(self.store.as_deref(), self.lab.as_deref())?.open(&self.etcd)
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
            peer.validate()?;
            let store = store.open()?;
            let state = cluster::load(store.as_ref()).await?;
            // Refuse what the planner would leave out, instead of storing a peer that
            // silently never works.
            let mut peers: Vec<ExternalPeer> = state
                .peers
                .values()
                .filter(|p| p.name != peer.name)
                .cloned()
                .collect();
            peers.push(peer.clone());
            let topology = topology_of(&state, peers);
            if let Some(w) = topology
                .warnings
                .iter()
                .find(|w| w.starts_with(&format!("peer {} ", peer.name)))
            {
                bail!("{w}");
            }
            store
                .put(&keys::peer(&peer.name), serde_json::to_vec(&peer)?)
                .await?;
            println!(
                "peer {} registered; `trellis showconf peer {}` prints its configuration",
                peer.name, peer.name
            );
            Ok(ExitCode::SUCCESS)
        }
        PeerCommand::Remove { name, store } => {
            let store = store.open()?;
            if store.get(&keys::peer(&name)).await?.is_none() {
                bail!("no peer named {name:?}");
            }
            store.delete(&keys::peer(&name)).await?;
            println!("peer {name} removed");
            Ok(ExitCode::SUCCESS)
        }
        PeerCommand::List { store } => {
            let state = cluster::load(store.open()?.as_ref()).await?;
            for p in state.peers.values() {
                let ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
                println!("{}\t{}\t{}", p.name, p.public_key, ips.join(","));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn topology_of(state: &ClusterState, peers: Vec<ExternalPeer>) -> Topology {
    let inputs = state.plan_inputs(&Settings::default());
    Topology::build(
        inputs.settings,
        inputs.nodes.into_values(),
        peers,
        &inputs.gateways,
    )
}

async fn load_topology(store: &StoreArgs) -> anyhow::Result<(ClusterState, Topology)> {
    let state = cluster::load(store.open()?.as_ref())
        .await
        .context("reading cluster state")?;
    let topology = state.plan_inputs(&Settings::default()).topology();
    Ok((state, topology))
}

pub async fn showconf(cmd: ShowconfCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ShowconfCommand::Peer { name, store } => {
            let (_, topology) = load_topology(&store).await?;
            let Some(conf) = showconf::external_peer_config(&topology, &name) else {
                bail!("no external peer named {name:?} (see `trellis peer list`)");
            };
            print!("{conf}");
        }
        ShowconfCommand::Node { name, store } => {
            let (_, topology) = load_topology(&store).await?;
            let plan = topology.plan_for(&name)?;
            print!(
                "{}",
                showconf::node_config(&plan, topology.nodes[&name].listen_port)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn graph(store: StoreArgs) -> anyhow::Result<ExitCode> {
    let (_, topology) = load_topology(&store).await?;
    print!("{}", graph::dot(&topology));
    Ok(ExitCode::SUCCESS)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = args.store.open()?;
    let state = cluster::load(store.as_ref())
        .await
        .context("reading cluster state")?;
    let topology = state.plan_inputs(&Settings::default()).topology();
    let leader = crate::leader::current_leader(store.as_ref())
        .await
        .context("reading the leader election")?;
    if args.json {
        let nodes: Vec<serde_json::Value> = topology
            .nodes
            .values()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "location": n.location,
                    "gateway": topology.is_gateway(n),
                    "served_by": topology.serving.get(&n.name),
                    "agent": state.status.get(&n.name),
                })
            })
            .collect();
        let out = serde_json::json!({
            "revision": state.revision,
            "granularity": topology.settings.granularity.to_string(),
            "gateways": topology.gateways,
            "leader": leader.as_ref().map(|(node, epoch)| serde_json::json!({"node": node, "epoch": epoch})),
            "nodes": nodes,
            "warnings": topology.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "granularity {}, store revision {}, {}",
        topology.settings.granularity,
        state.revision,
        leader.map_or("no leader".to_string(), |(node, epoch)| format!(
            "leader {node} (epoch {epoch})"
        ))
    );
    println!(
        "{:<10} {:<10} {:<8} {:<10} {:>5} {:>6}  agent",
        "NODE", "LOCATION", "GATEWAY", "VIA", "PEERS", "ROUTES"
    );
    for n in topology.nodes.values() {
        let agent = state.status.get(&n.name);
        let health = match agent {
            None => "no report (agent down?)".to_string(),
            Some(s) if s.applied => format!("applied rev {}", s.revision),
            Some(s) => format!(
                "FAILING: {}",
                s.error.as_deref().unwrap_or("plan not applied")
            ),
        };
        println!(
            "{:<10} {:<10} {:<8} {:<10} {:>5} {:>6}  {}",
            n.name,
            n.location,
            if topology.is_gateway(n) { "yes" } else { "-" },
            topology.serving.get(&n.name).map_or("-", String::as_str),
            agent.map_or(0, |s| s.peers),
            agent.map_or(0, |s| s.routes),
            health
        );
    }
    for w in &topology.warnings {
        println!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}
