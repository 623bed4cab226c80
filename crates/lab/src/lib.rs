//! The lab: a whole multi-site cluster of network namespaces on one machine, running the
//! production agent (the `trellis` binary, started once per node namespace) against a real
//! store. It is the demo, the end-to-end test bed and the benchmark rig.
//!
//! - [`spec`]: the lab's addressing plan, a pure function of its parameters;
//! - [`build`], [`processes`], [`store`]: namespaces and links, agent processes, the store;
//! - [`up`]: bring a lab up and wait for convergence; [`build::teardown`] removes it;
//! - [`fault`]: the incidents as injectable faults, and their healing; [`cold_boot`]: every
//!   node rebooted at once with the store down (seed 003);
//! - [`pod_network`]: pods made and removed through the CNI plugin, as a runtime does;
//! - [`pods`], [`service`]: what pods serve (TCP and UDP echo naming the pod), clients
//!   that tell which pod answered, and Services whose backends are lab pods;
//! - [`cni`]: a CNI plugin called as a runtime calls it (the lab's pods are made that way);
//! - [`check`], [`status`], [`agent_admin`]: what a lab does and says;
//! - [`demo`], [`bench`]: the incidents replayed and measured;
//! - [`guard`] (with [`signals`] and [`built`]): whatever a command built is removed when it
//!   ends, also on Ctrl-C, SIGTERM or SIGHUP.
//!
//! Nothing in the agent imports this crate: the lab resolves its own names ([`open_store`],
//! [`state::running_labs`]) and hands agents a plain store address.

#[macro_use]
mod narrate;

pub mod agent_admin;
pub mod bench;
pub mod build;
pub mod built;
pub mod check;
pub mod cni;
pub mod cold_boot;
pub mod demo;
pub mod exec;
pub mod fault;
pub mod guard;
pub mod incident;
pub mod kube_api;
pub mod pod_network;
pub mod pods;
pub mod processes;
pub mod service;
pub mod signals;
pub mod spec;
pub mod state;
pub mod status;
pub mod store;
pub mod up;

pub use store::open as open_store;
