//! The edges that touch the kernel. Each is a small reconciler: desired state in, kernel
//! state out, then read back and compared.
//!
//! - [`wireguard`]: WireGuard devices (userspace and kernel) and the per-peer reconciler.
//! - [`netlink`]: links, addresses and routes over rtnetlink.
//! - [`netns`]: named network namespaces, compatible with iproute2.
//! - [`sysctl`]: per-namespace kernel settings.
//! - [`nftables`]: nftables tables, chains and rules over netlink (no `nft` binary).
//! - [`icmp`]: ICMP echo over raw sockets (connectivity checks and forwarding probes).

pub mod icmp;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod sysctl;
pub mod wireguard;
