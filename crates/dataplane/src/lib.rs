//! The edges that touch the kernel. Each is a small reconciler: desired state in, kernel
//! state out, then read back and compared.
//!
//! - [`wireguard`]: WireGuard devices (userspace and kernel) and the per-peer reconciler.
//! - [`netlink`]: links, addresses and routes over rtnetlink; [`routes`] and
//!   [`interface`] are the reconcilers on top (a pure diff, then the operations).
//! - [`netns`]: named network namespaces, compatible with iproute2.
//! - [`sysctl`]: per-namespace kernel settings.
//! - [`nftables`]: nftables tables, chains and rules over netlink (no `nft` binary).
//! - [`icmp`]: ICMP echo over raw sockets (connectivity checks and forwarding probes).
//! - [`fake`]: in-memory stand-ins behind the same traits, for reconciler tests.
//!
//! Every fallible call returns [`Result`], whose [`Error`] says what was being done, where,
//! and what the kernel answered, as a kind callers can match on (see [`error`]).

pub mod conntrack;
pub mod error;
pub mod fake;
pub mod icmp;
pub mod interface;
pub mod netlink;
pub mod netns;
mod nfsocket;
pub mod nftables;
pub mod routes;
pub mod sysctl;
pub mod wireguard;

pub use error::{Error, Result};
