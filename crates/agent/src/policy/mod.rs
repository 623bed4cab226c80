//! Network policy's edges: the pure planner ([`trellis_policy`]) decides what each local
//! pod admits; these keep its inputs current from the store ([`view`]), render it to
//! nftables ([`render`]), keep the kernel equal to it and count what it drops ([`run`]).

pub mod local;
pub mod metrics;
pub mod render;
pub mod run;
pub mod view;
