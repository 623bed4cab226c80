//! Agent → store: what this agent says about itself. Its node record is kept equal to what
//! it knows ([`register`]); its status and its opinions live under one lease
//! ([`leased`]), so a dead agent's words disappear on their own.

pub mod leased;
pub mod register;
