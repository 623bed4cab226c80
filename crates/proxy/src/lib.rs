//! The service proxy's pure core: from Services and EndpointSlices (resolved to
//! [`ServicePort`]s and [`Endpoint`]s) and the node it runs on, to the nftables state that
//! load-balances them ([`plan`]), and a packet tracer ([`trace`]) that says what that state
//! does to a packet. No IO and no clock: the kernel side (rendering to nftables, the
//! reconciler, conntrack) lives at the edges and reads this.
//!
//! Endpoint choice follows Kubernetes: ready endpoints, else serving terminating ones,
//! separately for Cluster and Local traffic policies ([`endpoints`]).

pub mod conntrack;
pub mod endpoints;
pub mod input;
pub mod plan;
pub mod resolve;
pub mod ruleset;
pub mod shape;
pub mod small;
pub mod trace;

pub use input::{
    Endpoint, IpFamily, NodeView, Protocol, ServicePort, ServicePortName, TrafficPolicy,
};
pub use plan::{PortWithEndpoints, plan, plan_port};
pub use resolve::resolve;
pub use ruleset::{Destination, HealthCheck, NodePort, Plan, Refusal, Rule, ServiceRules, Table};
pub use trace::{Fate, Origin, Packet, Tracer};

#[cfg(test)]
mod tests;
