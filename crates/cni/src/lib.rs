//! The CNI plugin's pure core (issue 10, seed 003): what the plugin decides, with no IO,
//! so that every rule can be tested exhaustively. The plugin binary and its edges (the
//! state file and its lock, netlink, the pod's network namespace) come on top of it.
//!
//! - [`ipam`]: node-local address allocation keyed by attachment (container ID and
//!   interface name), idempotent, released by DEL or collected by GC, never handing one
//!   address to two attachments.
//! - [`state`]: the allocation state on disk, changed under a lock with a deadline and
//!   written atomically (the one edge here: a plugin call is short-lived, and its state
//!   must survive kill -9 at any instant).
//! - [`node`]: the node-local file the agent keeps (pod CIDRs, the overlay's MTU), and from
//!   it and an allocation, the pod's addresses, routes and veth names as values.
//! - [`verbs`]: ADD, DEL, GC and STATUS over the state and the pod's links (a trait: netlink
//!   in the binary, a fake in tests), with the rules that keep a node from leaking
//!   addresses: a failed ADD undoes itself, DEL never fails, GC collects the rest.
//! - [`install`]: the configuration list `trellis cni install` writes.
//! - [`spec`]: the CNI 1.1 invocation, configuration, result and error, with version
//!   negotiation down to 0.3.0; refusals name the variable or field and value.

pub mod install;
pub mod ipam;
pub mod node;
pub mod spec;
pub mod state;
pub mod verbs;
