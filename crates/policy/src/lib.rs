//! NetworkPolicy, pure (issue 12; seed 002's first half: a stale allow nobody sees).
//!
//! [`evaluate`] is Kubernetes' semantics written down directly: for one packet (source,
//! destination, protocol, port), whether the policies of the cluster admit it, and why —
//! which policies isolate each end and which rule of which policy lets it through. It is
//! the reference the planner to nftables will be checked against (a tracer over the planned
//! rules must agree with it on random policies and pods), and what `trellis` will print
//! when an operator asks why a packet is dropped.
//!
//! [`plan`] turns policies, pods and namespaces into what one node enforces for its own pods
//! (checks per pod address, named address sets), the shape of its nftables state; its
//! [`plan::trace`] is held equal to [`evaluate`] on thousands of random clusters.
//!
//! [`cluster`] holds what both read besides the policies: pods (namespace, labels,
//! addresses, node, named ports) and namespaces (labels).

pub mod cluster;
pub mod evaluate;
pub mod plan;
#[cfg(any(test, feature = "testing"))]
pub mod random;

pub use cluster::{Cluster, NamedPort, Namespace, Pod};
pub use evaluate::{Decision, End, Packet, PolicyRef, Side, evaluate};
