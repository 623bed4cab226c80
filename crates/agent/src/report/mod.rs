//! Agent → store: what this agent says about itself. Its node record is kept equal to what
//! it knows ([`register`]); its status and its opinions live under one lease
//! ([`leased`]), so a dead agent's words disappear on their own. What the CNI plugin
//! needs goes to the node's own disk ([`node_files`]). [`transition`] decides
//! what changed in the cluster's health between passes, for metrics and logs.

pub mod leased;
pub mod node_files;
pub mod register;
pub mod transition;
