//! What the command-line tools do with cluster state: register and list external peers,
//! print WireGuard configurations, draw the mesh, report status, and ([`objects`]) apply,
//! delete and get Services and EndpointSlices. Each takes a store and returns data or
//! text; the `trellis` binary parses flags and prints. Every view is built with
//! [`ClusterState::topology`], the same function the agents plan with.

pub mod objects;

use crate::state::{self, ClusterState};
use serde::Serialize;
use trellis_model::{AgentStatus, ExternalPeer, InvalidField, Validate, keys};
use trellis_plan::{PlanError, Settings, Topology, graph, showconf};
use trellis_store::{Store, StoreError};

/// Why a command could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// The planner would leave the record out, so it is not stored.
    #[error("{0}")]
    Refused(String),
    #[error("no {what} named {name:?}{hint}")]
    NotFound {
        what: &'static str,
        name: String,
        hint: &'static str,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
    /// One of several objects given at once was refused; `index` is its place among them.
    #[error("object {} ({object}): {error}", index + 1)]
    InvalidObject {
        index: usize,
        object: String,
        error: InvalidField,
    },
    /// Other writers kept changing what this command read.
    #[error("{0}")]
    Conflict(String),
}

type Result<T> = std::result::Result<T, CtlError>;

async fn snapshot(store: &dyn Store) -> Result<(ClusterState, Topology)> {
    let state = state::load(store).await?;
    let topology = state.topology(&Settings::default());
    Ok((state, topology))
}

/// Registers (or replaces) an external peer; refuses one the planner would leave out,
/// instead of storing a peer that silently never works.
pub async fn peer_add(store: &dyn Store, peer: &ExternalPeer) -> Result<()> {
    peer.validate()?;
    let state = state::load(store).await?;
    let mut inputs = state.plan_inputs(&Settings::default());
    inputs.peers.insert(peer.name.clone(), peer.clone());
    let topology = inputs.topology();
    if let Some(w) = topology
        .warnings
        .iter()
        .find(|w| w.starts_with(&format!("peer {} ", peer.name)))
    {
        return Err(CtlError::Refused(w.clone()));
    }
    store
        .put(&keys::peer(&peer.name), serde_json::to_vec(peer)?)
        .await?;
    Ok(())
}

pub async fn peer_remove(store: &dyn Store, name: &str) -> Result<()> {
    if store.get(&keys::peer(name)).await?.is_none() {
        return Err(CtlError::NotFound {
            what: "peer",
            name: name.to_string(),
            hint: "",
        });
    }
    store.delete(&keys::peer(name)).await?;
    Ok(())
}

pub async fn peers(store: &dyn Store) -> Result<Vec<ExternalPeer>> {
    let state = state::load(store).await?;
    Ok(state.peers.into_values().collect())
}

/// A wg-quick configuration for an external peer.
pub async fn peer_config(store: &dyn Store, name: &str) -> Result<String> {
    let (_, topology) = snapshot(store).await?;
    showconf::external_peer_config(&topology, name).ok_or_else(|| CtlError::NotFound {
        what: "external peer",
        name: name.to_string(),
        hint: " (see `trellis peer list`)",
    })
}

/// A node's WireGuard peers as a `wg setconf` file.
pub async fn node_config(store: &dyn Store, name: &str) -> Result<String> {
    let (_, topology) = snapshot(store).await?;
    let plan = topology.plan_for(name)?;
    Ok(showconf::node_config(
        &plan,
        topology.nodes[name].listen_port,
    ))
}

/// The topology as GraphViz.
pub async fn graph(store: &dyn Store) -> Result<String> {
    let (_, topology) = snapshot(store).await?;
    Ok(graph::dot(&topology))
}

/// What `trellis status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    pub revision: u64,
    pub granularity: String,
    pub gateways: std::collections::BTreeMap<String, Vec<String>>,
    pub leader: Option<Leader>,
    pub nodes: Vec<NodeStatus>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Leader {
    pub node: String,
    pub epoch: u64,
}

#[derive(Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub location: String,
    pub gateway: bool,
    pub served_by: Option<String>,
    /// What the node's agent last reported; `None` when it holds no status lease.
    pub agent: Option<AgentStatus>,
}

pub async fn status(store: &dyn Store) -> Result<Status> {
    let (state, topology) = snapshot(store).await?;
    let leader = crate::leader::current_leader(store).await?;
    Ok(Status {
        revision: state.revision,
        granularity: topology.settings.granularity.to_string(),
        gateways: topology.gateways.clone(),
        leader: leader.map(|(node, epoch)| Leader { node, epoch }),
        nodes: topology
            .nodes
            .values()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                location: n.location.clone(),
                gateway: topology.is_gateway(n),
                served_by: topology.serving.get(&n.name).cloned(),
                agent: state.status.get(&n.name).cloned(),
            })
            .collect(),
        warnings: topology.warnings.clone(),
    })
}

impl Status {
    /// The table people read.
    pub fn table(&self) -> String {
        let mut out = format!(
            "granularity {}, store revision {}, {}\n",
            self.granularity,
            self.revision,
            self.leader
                .as_ref()
                .map_or("no leader".to_string(), |l| format!(
                    "leader {} (epoch {})",
                    l.node, l.epoch
                ))
        );
        out += &format!(
            "{:<10} {:<10} {:<8} {:<10} {:>5} {:>6}  agent\n",
            "NODE", "LOCATION", "GATEWAY", "VIA", "PEERS", "ROUTES"
        );
        for n in &self.nodes {
            let health = match &n.agent {
                None => "no report (agent down?)".to_string(),
                Some(s) if s.applied => format!("applied rev {}", s.revision),
                Some(s) => format!(
                    "FAILING: {}",
                    s.error.as_deref().unwrap_or("plan not applied")
                ),
            };
            out += &format!(
                "{:<10} {:<10} {:<8} {:<10} {:>5} {:>6}  {}\n",
                n.name,
                n.location,
                if n.gateway { "yes" } else { "-" },
                n.served_by.as_deref().unwrap_or("-"),
                n.agent.as_ref().map_or(0, |s| s.peers),
                n.agent.as_ref().map_or(0, |s| s.routes),
                health
            );
        }
        for w in &self.warnings {
            out += &format!("warning: {w}\n");
        }
        out
    }
}
