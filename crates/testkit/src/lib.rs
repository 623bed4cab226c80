//! What Trellis's tests share, so that no test file carries its own copy:
//!
//! - [`etcd`]: a real etcd (Debian's 3.4) on loopback ports, removed when dropped;
//! - [`Freezable`]: a store whose calls hang while frozen, as a SIGSTOPped etcd's do, and
//!   [`Unreachable`], one whose calls all fail;
//! - [`netns`] and [`nft`]: scratch network namespaces, a routed topology in both
//!   families, and `ip`, `nft` and `ping` as independent witnesses for kernel tests;
//! - [`podman`]: podman with runc and its CNI backend, confined to a test's namespace and
//!   directory, everything of it removed when dropped or swept after a killed run;
//! - [`tcp`]: a TCP server and client across test namespaces, a JSON store write;
//! - [`wait_until`] / [`wait_for`]: poll a condition until it holds or a deadline passes,
//!   instead of sleeping a fixed time and hoping.

pub mod etcd;
mod freezable;
pub mod netns;
pub mod nft;
pub mod podman;
pub mod tcp;
mod wait;

pub use freezable::{Freezable, Unreachable};
pub use wait::{wait_for, wait_until};
