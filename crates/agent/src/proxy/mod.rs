//! The service proxy's edges: the pure planner ([`trellis_proxy`]) decides; these keep its
//! inputs current from the store, program the kernel, serve health checks and sweep
//! conntrack.

pub mod health;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod run;
pub mod source;
pub mod view;
