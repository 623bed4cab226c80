//! WireGuard devices behind one interface, and the reconciler that brings a device's peers
//! to a desired set one peer at a time.
//!
//! Two backends: [`userspace::UserspaceDevice`] (gotatun on a TUN device, for hosts and
//! labs without the kernel module) and [`kernel::KernelDevice`] (the in-kernel device over
//! generic netlink). Both expose the standard control socket or interface, so `wg show`
//! reads either.

pub mod kernel;
pub mod keyfile;
pub mod uapi;
pub mod userspace;

use async_trait::async_trait;
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use trellis_model::PublicKey;

/// The configuration of one peer, as the plan wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub config: PeerConfig,
    /// Time since the last completed handshake, if any.
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl PeerStatus {
    /// A peer known only by its key, before its attributes are read.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            config: PeerConfig {
                public_key,
                endpoint: None,
                allowed_ips: BTreeSet::new(),
                persistent_keepalive: None,
            },
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }
}

#[async_trait]
pub trait WireGuardDevice: Send + Sync {
    /// The network interface name.
    fn name(&self) -> &str;
    async fn peers(&self) -> anyhow::Result<Vec<PeerStatus>>;
    /// Add the peer, or change only the fields that differ on an existing one. Never
    /// resets the peer's session.
    async fn upsert_peer(&self, peer: &PeerConfig) -> anyhow::Result<()>;
    async fn remove_peer(&self, key: &PublicKey) -> anyhow::Result<()>;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerChanges {
    pub added: Vec<PublicKey>,
    pub updated: Vec<PublicKey>,
    pub removed: Vec<PublicKey>,
}

impl PeerChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// Bring the device's peers to `desired`, touching only peers that differ: other peers'
/// sessions carry on (Kilo replaces the whole set and drops packets on every resync).
///
/// A configured endpoint of `None` leaves whatever endpoint the device learned from the
/// peer's own handshakes, because a peer that dials in (NAT, no public address) is
/// reachable only at the address it came from.
pub async fn reconcile_peers(
    device: &dyn WireGuardDevice,
    desired: &[PeerConfig],
) -> anyhow::Result<PeerChanges> {
    let current = device.peers().await?;
    let mut changes = PeerChanges::default();
    let mut failures = Vec::new();
    for want in desired {
        let have = current
            .iter()
            .find(|p| p.config.public_key == want.public_key);
        let needs_write = match have {
            None => true,
            Some(have) => !same_config(&have.config, want),
        };
        if !needs_write {
            continue;
        }
        match device.upsert_peer(want).await {
            Ok(()) if have.is_none() => changes.added.push(want.public_key),
            Ok(()) => changes.updated.push(want.public_key),
            Err(e) => failures.push(format!("peer {}: {e:#}", want.public_key)),
        }
    }
    for have in &current {
        let key = have.config.public_key;
        if desired.iter().any(|d| d.public_key == key) {
            continue;
        }
        match device.remove_peer(&key).await {
            Ok(()) => changes.removed.push(key),
            Err(e) => failures.push(format!("removing peer {key}: {e:#}")),
        }
    }
    if failures.is_empty() {
        Ok(changes)
    } else {
        anyhow::bail!(
            "{} of the peer updates on {} failed: {}",
            failures.len(),
            device.name(),
            failures.join("; ")
        )
    }
}

fn same_config(have: &PeerConfig, want: &PeerConfig) -> bool {
    have.allowed_ips == want.allowed_ips
        && have.persistent_keepalive.unwrap_or(0) == want.persistent_keepalive.unwrap_or(0)
        && (want.endpoint.is_none() || have.endpoint == want.endpoint)
}
