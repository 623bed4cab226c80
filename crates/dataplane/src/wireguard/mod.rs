//! WireGuard devices behind one interface, and the reconciler that brings a device's peers
//! to a desired set one peer at a time.
//!
//! Two backends: [`userspace::UserspaceDevice`] (gotatun on a TUN device, for hosts and
//! labs without the kernel module) and [`kernel::KernelDevice`] (the in-kernel device over
//! generic netlink). Both expose the standard control socket or interface, so `wg show`
//! reads either.

pub mod kernel;
pub mod keyfile;
pub mod offload;
pub mod uapi;
pub mod userspace;

use crate::error::{Error, Result};
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
    async fn peers(&self) -> Result<Vec<PeerStatus>>;
    /// Add the peer, or change only the fields that differ on an existing one. Never
    /// resets the peer's session.
    async fn upsert_peer(&self, peer: &PeerConfig) -> Result<()>;
    async fn remove_peer(&self, key: &PublicKey) -> Result<()>;
    /// The segmentation offloads a userspace device runs with, and what they did; `None`
    /// for a device without any (the kernel module's are the kernel's business).
    fn offloads(&self) -> Option<offload::Report> {
        None
    }
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

/// One change of a device's peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerOp {
    Add(PeerConfig),
    /// Change an existing peer's attributes in place (its session carries on).
    Update(PeerConfig),
    Remove(PublicKey),
}

/// The operations that bring `current` to `desired`, touching only peers that differ:
/// other peers' sessions carry on (Kilo replaces the whole set and drops packets on every
/// resync).
///
/// A desired endpoint of `None` leaves whatever endpoint the device learned from the
/// peer's own handshakes, because a peer that dials in (NAT, no public address) is
/// reachable only at the address it came from.
pub fn diff_peers(current: &[PeerConfig], desired: &[PeerConfig]) -> Vec<PeerOp> {
    let by_key: std::collections::HashMap<&PublicKey, &PeerConfig> =
        current.iter().map(|p| (&p.public_key, p)).collect();
    let wanted: std::collections::HashSet<&PublicKey> =
        desired.iter().map(|p| &p.public_key).collect();
    let mut ops = Vec::new();
    for want in desired {
        match by_key.get(&want.public_key) {
            None => ops.push(PeerOp::Add(want.clone())),
            Some(have) if !same_config(have, want) => ops.push(PeerOp::Update(want.clone())),
            Some(_) => {}
        }
    }
    ops.extend(
        current
            .iter()
            .filter(|have| !wanted.contains(&have.public_key))
            .map(|have| PeerOp::Remove(have.public_key)),
    );
    ops
}

/// Brings the device's peers to `desired` (see [`diff_peers`]), one peer at a time; a
/// failed step never stops the others, and the error, [`Error::Partial`], lists every one
/// that failed. Any other error means the device's peers could not even be read, and
/// nothing was changed.
pub async fn reconcile_peers(
    device: &dyn WireGuardDevice,
    desired: &[PeerConfig],
) -> Result<PeerChanges> {
    let current: Vec<PeerConfig> = device
        .peers()
        .await?
        .into_iter()
        .map(|p| p.config)
        .collect();
    let mut changes = PeerChanges::default();
    let mut failures = Vec::new();
    for op in diff_peers(&current, desired) {
        match &op {
            PeerOp::Add(peer) | PeerOp::Update(peer) => match device.upsert_peer(peer).await {
                Ok(()) if matches!(op, PeerOp::Add(_)) => changes.added.push(peer.public_key),
                Ok(()) => changes.updated.push(peer.public_key),
                Err(e) => failures.push(format!("peer {}: {e}", peer.public_key)),
            },
            PeerOp::Remove(key) => match device.remove_peer(key).await {
                Ok(()) => changes.removed.push(*key),
                Err(e) => failures.push(format!("removing peer {key}: {e}")),
            },
        }
    }
    if failures.is_empty() {
        Ok(changes)
    } else {
        Err(Error::Partial {
            what: format!("peer updates on {}", device.name()),
            failures,
        })
    }
}

fn same_config(have: &PeerConfig, want: &PeerConfig) -> bool {
    have.allowed_ips == want.allowed_ips
        && have.persistent_keepalive.unwrap_or(0) == want.persistent_keepalive.unwrap_or(0)
        && (want.endpoint.is_none() || have.endpoint == want.endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeWireGuard;

    fn peer(key: u8, endpoint: Option<&str>, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: PublicKey([key; 32]),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    #[test]
    fn only_peers_that_differ_are_touched() {
        let current = [
            peer(1, Some("198.18.0.10:51820"), &["10.244.1.0/24"]),
            peer(2, Some("198.18.0.11:51820"), &["10.244.2.0/24"]),
            peer(3, None, &["10.244.3.0/24"]),
        ];
        let desired = [
            peer(1, Some("198.18.0.10:51820"), &["10.244.1.0/24"]),
            peer(
                2,
                Some("198.18.0.11:51820"),
                &["10.244.2.0/24", "10.244.5.0/24"],
            ),
            peer(4, None, &["10.244.4.0/24"]),
        ];
        assert_eq!(
            diff_peers(&current, &desired),
            [
                PeerOp::Update(desired[1].clone()),
                PeerOp::Add(desired[2].clone()),
                PeerOp::Remove(PublicKey([3; 32])),
            ]
        );
        // an endpoint learned from the peer's handshakes is kept when none is configured
        let learned = [peer(5, Some("203.0.113.9:40000"), &["10.5.0.1/32"])];
        assert!(diff_peers(&learned, &[peer(5, None, &["10.5.0.1/32"])]).is_empty());
        // keepalive None and Some(0) are the same thing to the device
        let mut zero = peer(6, None, &["10.6.0.1/32"]);
        zero.persistent_keepalive = Some(0);
        assert!(diff_peers(&[zero], &[peer(6, None, &["10.6.0.1/32"])]).is_empty());
    }

    #[tokio::test]
    async fn changing_one_peer_keeps_every_other_session() {
        let device = FakeWireGuard::new("wg0");
        let desired = vec![
            peer(1, Some("198.18.0.10:51820"), &["10.244.1.0/24"]),
            peer(2, Some("198.18.0.11:51820"), &["10.244.2.0/24"]),
        ];
        reconcile_peers(&device, &desired).await.unwrap();
        let sessions = device.sessions();
        let mut moved = desired.clone();
        moved[1].endpoint = Some("198.18.0.99:51820".parse().unwrap());
        let changes = reconcile_peers(&device, &moved).await.unwrap();
        assert_eq!(changes.updated, [PublicKey([2; 32])]);
        assert!(changes.added.is_empty() && changes.removed.is_empty());
        assert_eq!(device.sessions(), sessions, "no session was restarted");
        assert_eq!(
            device.writes_to(&PublicKey([1; 32])),
            1,
            "peer 1 written once, at the start"
        );
    }
}
