//! The Trellis node agent, as a library. One flow, one module each, in this order:
//!
//! ```text
//! store ──▶ state ──▶ plan (trellis-plan) ──▶ apply ──▶ probe / verify ──▶ report ──▶ store
//! ```
//!
//! - [`state`]: the store's records as a validated [`state::ClusterState`], kept current by
//!   a list-then-watch loop that survives outages, and cached on disk;
//! - [`apply`]: one node's plan brought into the kernel by reconcilers that read back what
//!   they changed (WireGuard peers, the interface, routes, the probe relay) and the
//!   location's gateway choice recorded in the store;
//! - [`probe`]: forwarding probes to gateways and direct paths, whose opinions go to the
//!   store;
//! - [`report`]: what this agent publishes: its node record, and its status and opinions
//!   under one lease;
//! - [`leader`]: leadership for cluster-wide work beside that flow, never in its way;
//! - [`admin`]: what the agent serves to operators: metrics, readiness, its state;
//! - [`run`]: the agent's main loop, which wires the above together;
//! - [`ctl`]: what the command-line tools do with cluster state (peers, configurations,
//!   status), on the same state layer.
//!
//! Nothing here imports the lab: the lab starts agents as processes and hands them a plain
//! store address.

pub mod admin;
pub mod apply;
pub use trellis_store::backoff;
pub mod ctl;
pub mod leader;
pub mod nft_table;
pub mod node_facts;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod report;
pub mod run;
pub mod state;
pub mod store_addr;

pub use run::{AgentConfig, WireGuardBackend};
