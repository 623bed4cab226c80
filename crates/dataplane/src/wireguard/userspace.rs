//! The embedded userspace device: gotatun on a TUN interface, configured in-process, with
//! the standard control socket so `wg show` and `wg set` work on it. The TUN and UDP edges
//! are ours ([`super::offload`]): they move 64 KB per system call where the kernel allows.

use super::offload::tun::{TunReader, TunWriter};
use super::offload::{self, Counters, Granted, OffloadMode, udp::GsoUdpFactory};
use super::{PeerConfig, PeerStatus, WireGuardDevice};
use crate::error::{Error, Result};
use async_trait::async_trait;
use gotatun::device::uapi::UapiServer;
use gotatun::device::{Device, DeviceBuilder, Peer};
use ipnet::IpNet;
use std::path::PathBuf;
use std::sync::Arc;
use trellis_model::PublicKey;
use x25519_dalek::StaticSecret;

/// Where userspace WireGuard implementations keep their control sockets. Shared by every
/// network namespace, so device names must be unique on the machine.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// gotatun's device over our offloading edges.
type Transports = (GsoUdpFactory, TunWriter, TunReader);

pub struct UserspaceDevice {
    name: String,
    device: Device<Transports>,
    granted: Granted,
    counters: Arc<Counters>,
}

impl UserspaceDevice {
    /// Create the TUN interface `name` in the calling thread's network namespace and start
    /// the device on UDP `listen_port`, with segmentation offloads as `offloads` says. The
    /// interface is left down and unaddressed; the link reconciler owns that.
    pub async fn create(
        name: &str,
        private_key: StaticSecret,
        listen_port: u16,
        offloads: OffloadMode,
    ) -> Result<Self> {
        let uapi = UapiServer::default_unix_socket(name, None, None).map_err(|e| {
            Error::io(
                format!("opening the control socket for {name}"),
                std::io::Error::other(format!("{e:#}")),
            )
        })?;
        let counters = Arc::new(Counters::default());
        let (reader, writer, granted) =
            offload::tun::open(name, offloads, Arc::clone(&counters))
                .map_err(|e| Error::io(format!("creating TUN device {name}"), e))?;
        tracing::info!(
            interface = name,
            ?offloads,
            tso = granted.tso,
            uso = granted.uso,
            "userspace WireGuard device on TUN"
        );
        let device = DeviceBuilder::new()
            .with_udp(GsoUdpFactory::new(offloads, Arc::clone(&counters)))
            .with_ip_pair(writer, reader)
            .with_listen_port(listen_port)
            .with_uapi(uapi)
            .build()
            .await
            .map_err(|e| device_error(format!("starting WireGuard on {name}"), e))?;
        // Setting the key after build brings the UDP socket up even before the first peer
        // exists, so peers that know us can complete handshakes right away.
        device
            .set_private_key(private_key)
            .await
            .map_err(|e| device_error(format!("binding UDP port {listen_port} for {name}"), e))?;
        Ok(Self {
            name: name.to_string(),
            device,
            granted,
            counters,
        })
    }

    pub fn socket_path(name: &str) -> PathBuf {
        PathBuf::from(format!("{SOCKET_DIR}/{name}.sock"))
    }
}

impl Drop for UserspaceDevice {
    /// The control socket lives outside the network namespace: leave no stale one behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Self::socket_path(&self.name));
    }
}

/// A failure of the userspace device, as an [`Error::Io`] (its OS error kept where it has
/// one).
fn device_error(action: String, error: gotatun::device::Error) -> Error {
    let error = match error {
        gotatun::device::Error::IoError(error) => error,
        other => std::io::Error::other(other.to_string()),
    };
    Error::io(action, error)
}

fn to_gotatun_key(key: &PublicKey) -> x25519_dalek::PublicKey {
    x25519_dalek::PublicKey::from(key.0)
}

fn to_network(net: &IpNet) -> ipnetwork::IpNetwork {
    ipnetwork::IpNetwork::new(net.addr(), net.prefix_len())
        .expect("an IpNet always has a valid prefix length")
}

#[async_trait]
impl WireGuardDevice for UserspaceDevice {
    fn name(&self) -> &str {
        &self.name
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>> {
        let peers = self.device.peers().await;
        Ok(peers
            .into_iter()
            .map(|p| PeerStatus {
                config: PeerConfig {
                    public_key: PublicKey(p.peer.public_key.to_bytes()),
                    endpoint: p.peer.endpoint,
                    allowed_ips: p
                        .peer
                        .allowed_ips
                        .iter()
                        .filter_map(|n| IpNet::new(n.ip(), n.prefix()).ok())
                        .map(|n| n.trunc())
                        .collect(),
                    persistent_keepalive: p.peer.keepalive.filter(|k| *k != 0),
                },
                last_handshake: p.stats.last_handshake,
                rx_bytes: p.stats.rx_bytes as u64,
                tx_bytes: p.stats.tx_bytes as u64,
            })
            .collect())
    }

    async fn upsert_peer(&self, want: &PeerConfig) -> Result<()> {
        let key = to_gotatun_key(&want.public_key);
        let allowed: Vec<_> = want.allowed_ips.iter().map(to_network).collect();
        let endpoint = want.endpoint;
        let keepalive = want.persistent_keepalive;
        self.device
            .write(async |dev| {
                let updated = dev
                    .modify_peer(&key, |p| {
                        p.clear_allowed_ips();
                        p.add_allowed_ips(allowed.clone());
                        if endpoint.is_some() {
                            p.set_endpoint(endpoint);
                        }
                        p.set_keepalive(keepalive);
                    })
                    .await;
                if !updated {
                    let mut peer = Peer::new(key).with_allowed_ips(allowed);
                    peer.endpoint = endpoint;
                    peer.keepalive = keepalive;
                    dev.add_peer(peer);
                }
            })
            .await
            .map_err(|e| {
                device_error(
                    format!("configuring peer {} on {}", want.public_key, self.name),
                    e,
                )
            })
    }

    fn offloads(&self) -> Option<offload::Report> {
        Some(offload::Report {
            granted: self.granted,
            usage: self.counters.read(),
        })
    }

    async fn remove_peer(&self, key: &PublicKey) -> Result<()> {
        let k = to_gotatun_key(key);
        self.device
            .write(async |dev| dev.remove_peer(&k).await)
            .await
            .map_err(|e| device_error(format!("removing peer {key} from {}", self.name), e))?;
        Ok(())
    }
}
