//! The in-kernel WireGuard device, for production hosts that have the module.
//!
//! Configured over the `wireguard` generic netlink family, one peer per request, never with
//! the device-level "replace peers" flag: that is what lets one peer change without touching
//! the sessions of the others. The machines Trellis is built on lack the module, so the
//! message construction and parsing are tested here as pure functions, and creating a device
//! fails with a plain explanation; the lab uses the userspace device behind the same
//! [`WireGuardDevice`] interface.

use super::{PeerConfig, PeerStatus, WireGuardDevice};
use crate::error::{Error, Result};
use async_trait::async_trait;
use futures::StreamExt;
use genetlink::{GenetlinkError, GenetlinkHandle};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;
use trellis_model::PublicKey;
use x25519_dalek::StaticSecret;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this kernel can create WireGuard interfaces.
pub fn available() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

/// The reason the kernel backend cannot be used here, if any.
pub fn unavailable_reason() -> Option<String> {
    (!available()).then(|| {
        "this kernel has no WireGuard module (no /sys/module/wireguard, generic netlink family \
         \"wireguard\" absent); run the agent with --wireguard userspace"
            .to_string()
    })
}

pub struct KernelDevice {
    name: String,
    handle: Mutex<GenetlinkHandle>,
    /// Which namespace the device is in, for error messages.
    scope: String,
}

impl KernelDevice {
    /// Create (or adopt) the WireGuard interface `name` in the calling thread's namespace
    /// and set its key and port. Must run inside a tokio runtime.
    pub async fn create(
        netlink: &crate::netlink::Netlink,
        name: &str,
        private_key: &StaticSecret,
        listen_port: u16,
    ) -> Result<Self> {
        let action = format!("creating WireGuard interface {name}");
        if let Some(why) = unavailable_reason() {
            return Err(Error::Unsupported { action, why });
        }
        if netlink.link_index(name).await?.is_none() {
            let request = netlink
                .handle()
                .link()
                .add(rtnetlink::LinkWireguard::new(name).build())
                .execute();
            netlink.run(action, request).await?;
        }
        let (connection, handle, _) = genetlink::new_connection()
            .map_err(|e| Error::io(format!("opening a generic netlink socket for {name}"), e))?;
        tokio::spawn(connection);
        let device = Self {
            name: name.to_string(),
            handle: Mutex::new(handle),
            scope: netlink.scope().to_owned(),
        };
        device
            .send(
                format!("setting key and port of {name}"),
                set_device(name, private_key, listen_port),
            )
            .await?;
        Ok(device)
    }

    /// One generic netlink request, bounded by [`REQUEST_TIMEOUT`]; errors name `action`.
    async fn send(
        &self,
        action: String,
        message: WireguardMessage,
    ) -> Result<Vec<WireguardMessage>> {
        let flags = if message.cmd == WireguardCmd::GetDevice {
            NLM_F_REQUEST | NLM_F_DUMP
        } else {
            NLM_F_REQUEST | NLM_F_ACK
        };
        let mut request = NetlinkMessage::from(GenlMessage::from_payload(message));
        request.header.flags = flags;
        let kernel = |errno: i32| Error::Kernel {
            action: action.clone(),
            scope: self.scope.clone(),
            errno,
            message: None,
        };
        let failed = |what: String| Error::Protocol {
            action: action.clone(),
            scope: self.scope.clone(),
            what,
        };
        let exchange = async {
            let mut handle = self.handle.lock().await;
            let mut responses = handle.request(request).await.map_err(|e| match e {
                GenetlinkError::NetlinkError(io) => match io.raw_os_error() {
                    Some(errno) => kernel(errno),
                    None => failed(io.to_string()),
                },
                other => failed(format!("generic netlink: {other}")),
            })?;
            let mut out = Vec::new();
            while let Some(reply) = responses.next().await {
                let reply =
                    reply.map_err(|e| failed(format!("malformed answer from the kernel: {e}")))?;
                match reply.payload {
                    NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(kernel(e.raw_code().abs()));
                    }
                    _ => {}
                }
            }
            Ok(out)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(Error::Timeout {
                action,
                scope: self.scope.clone(),
                after: REQUEST_TIMEOUT,
            }),
        }
    }
}

#[async_trait]
impl WireGuardDevice for KernelDevice {
    fn name(&self) -> &str {
        &self.name
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>> {
        let replies = self
            .send(
                format!("reading the peers of {}", self.name),
                get_device(&self.name),
            )
            .await?;
        Ok(peers_of(&replies, SystemTime::now()))
    }

    async fn upsert_peer(&self, peer: &PeerConfig) -> Result<()> {
        self.send(
            format!("configuring peer {} on {}", peer.public_key, self.name),
            set_peer(&self.name, peer),
        )
        .await?;
        Ok(())
    }

    async fn remove_peer(&self, key: &PublicKey) -> Result<()> {
        self.send(
            format!("removing peer {key} from {}", self.name),
            remove_peer(&self.name, key),
        )
        .await?;
        Ok(())
    }
}

pub fn get_device(ifname: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
    }
}

pub fn set_device(ifname: &str, key: &StaticSecret, listen_port: u16) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::PrivateKey(key.to_bytes()),
            WireguardAttribute::ListenPort(listen_port),
        ],
    }
}

/// One peer, with its allowed IPs replaced as a set; other peers are not mentioned and so
/// not touched. An absent endpoint is left as the kernel learned it.
pub fn set_peer(ifname: &str, peer: &PeerConfig) -> WireguardMessage {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(peer.public_key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PersistentKeepalive(peer.persistent_keepalive.unwrap_or(0)),
        WireguardPeerAttribute::AllowedIps(peer.allowed_ips.iter().map(allowed_ip).collect()),
    ];
    if let Some(endpoint) = peer.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(endpoint));
    }
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::Peers(vec![WireguardPeer(attrs)]),
        ],
    }
}

pub fn remove_peer(ifname: &str, key: &PublicKey) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(key.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])]),
        ],
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net {
        IpNet::V4(_) => WireguardAddressFamily::Ipv4,
        IpNet::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// Peers of a GetDevice dump. A device with many peers answers in several messages, each
/// carrying some peers; a peer's allowed IPs may continue in the next message.
pub fn peers_of(replies: &[WireguardMessage], now: SystemTime) -> Vec<PeerStatus> {
    let mut out: Vec<PeerStatus> = Vec::new();
    for reply in replies {
        for attr in &reply.attributes {
            let WireguardAttribute::Peers(peers) = attr else {
                continue;
            };
            for WireguardPeer(attrs) in peers {
                let Some(key) = attrs.iter().find_map(|a| match a {
                    WireguardPeerAttribute::PublicKey(k) => Some(PublicKey(*k)),
                    _ => None,
                }) else {
                    continue;
                };
                let index = match out.iter().position(|p| p.config.public_key == key) {
                    Some(i) => i,
                    None => {
                        out.push(PeerStatus::new(key));
                        out.len() - 1
                    }
                };
                apply_peer_attributes(&mut out[index], attrs, now);
            }
        }
    }
    out
}

fn apply_peer_attributes(peer: &mut PeerStatus, attrs: &[WireguardPeerAttribute], now: SystemTime) {
    for a in attrs {
        match a {
            WireguardPeerAttribute::Endpoint(e) => peer.config.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                peer.config.persistent_keepalive = (*k != 0).then_some(*k)
            }
            WireguardPeerAttribute::RxBytes(n) => peer.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => peer.tx_bytes = *n,
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                let at = UNIX_EPOCH
                    + Duration::new(
                        t.seconds as u64,
                        t.nano_seconds.clamp(0, 999_999_999) as u32,
                    );
                peer.last_handshake = Some(now.duration_since(at).unwrap_or_default());
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                for WireguardAllowedIp(ip) in ips {
                    let addr = ip.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                        _ => None,
                    });
                    let cidr = ip.iter().find_map(|x| match x {
                        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                        _ => None,
                    });
                    if let (Some(addr), Some(cidr)) = (addr, cidr)
                        && let Ok(net) = IpNet::new(addr, cidr)
                    {
                        peer.config.allowed_ips.insert(net.trunc());
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_generic::GenlHeader;

    fn round_trip(m: &WireguardMessage) -> WireguardMessage {
        use netlink_packet_generic::GenlFamily;
        let header = GenlHeader {
            cmd: m.command(),
            version: m.version(),
        };
        let mut buf = vec![0u8; m.buffer_len()];
        m.emit(&mut buf);
        WireguardMessage::parse_with_param(&buf[..], header).expect("the kernel format parses back")
    }

    fn peer() -> PeerConfig {
        PeerConfig {
            public_key: PublicKey([9; 32]),
            endpoint: Some("198.18.0.10:51820".parse().unwrap()),
            allowed_ips: ["10.244.1.0/24", "100.64.0.2/32"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn set_peer_touches_one_peer_and_never_replaces_the_set() {
        let m = round_trip(&set_peer("wg0", &peer()));
        assert_eq!(m.cmd, WireguardCmd::SetDevice);
        assert!(
            !m.attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::Flags(_))),
            "no device-level flags: REPLACE_PEERS would reset every other session"
        );
        let peers: Vec<&WireguardPeer> = m
            .attributes
            .iter()
            .filter_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(peers.len(), 1);
        assert!(peers[0].0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        let status = peers_of(std::slice::from_ref(&m), SystemTime::now());
        assert_eq!(status[0].config, peer());
    }

    #[test]
    fn remove_peer_names_only_that_peer() {
        let m = round_trip(&remove_peer("wg0", &PublicKey([3; 32])));
        let WireguardAttribute::Peers(peers) = &m.attributes[1] else {
            panic!("{m:?}")
        };
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey([3; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
            ]
        );
    }

    #[test]
    fn a_peer_split_over_two_dump_messages_is_merged() {
        let mut first = peer();
        first.allowed_ips = ["10.244.1.0/24".parse().unwrap()].into();
        let mut second = peer();
        second.allowed_ips = ["100.64.0.2/32".parse().unwrap()].into();
        let replies = [
            round_trip(&set_peer("wg0", &first)),
            round_trip(&set_peer("wg0", &second)),
        ];
        let peers = peers_of(&replies, SystemTime::now());
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].config.allowed_ips.len(), 2);
    }

    #[test]
    fn set_device_carries_key_and_port() {
        let key = StaticSecret::from([5; 32]);
        let m = round_trip(&set_device("wg0", &key, 51820));
        assert!(
            m.attributes
                .contains(&WireguardAttribute::ListenPort(51820))
        );
        assert!(
            m.attributes
                .contains(&WireguardAttribute::PrivateKey([5; 32]))
        );
    }

    #[tokio::test]
    async fn creating_a_device_without_the_module_says_why() {
        if available() {
            return; // this machine has the module; the message test does not apply
        }
        let nl = crate::netlink::Netlink::connect().unwrap();
        let Err(err) =
            KernelDevice::create(&nl, "trt-kwg0", &StaticSecret::from([1; 32]), 51820).await
        else {
            panic!("created a kernel WireGuard device on a kernel without the module");
        };
        let err = format!("{err:#}");
        assert!(
            err.contains("no WireGuard module") && err.contains("--wireguard userspace"),
            "{err}"
        );
    }
}
