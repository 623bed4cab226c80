//! What the plugin knows of its node without asking anyone (seed 003: no API server, no
//! ClusterIP, no DNS on the pod path): the node-local file the agent keeps on persistent
//! disk, and from it and an allocation, the pod's side of the network as values.
//!
//! The agent writes the file whenever the node's pod CIDRs or the overlay's MTU change; it
//! is there after a reboot before any agent starts, so ADD works with the agent down.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

use crate::ipam::gateway;
use crate::spec::{CniError, code};

/// The node-local file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeNetwork {
    /// At most one per family (Kubernetes' spelling, `podCIDRs`).
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    /// The MTU pods get: the overlay's, so that a full-size packet fits the tunnel.
    pub mtu: u32,
}

impl NodeNetwork {
    /// Parses and checks the file's content; `origin` names it in errors.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<NodeNetwork, CniError> {
        let node: NodeNetwork = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("the node's network file {origin} cannot be read"),
                e.to_string(),
            )
        })?;
        node.check(origin)?;
        Ok(node)
    }

    fn check(&self, origin: &str) -> Result<(), CniError> {
        let bad = |field: &str, value: String, why: &str| {
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                format!("{origin}: {field} = {value}: {why}"),
                "",
            )
        };
        if self.pod_cidrs.is_empty() {
            return Err(bad("podCIDRs", "[]".into(), "at least one pod CIDR"));
        }
        let v4 = self.pod_cidrs.iter().filter(|n| n.addr().is_ipv4()).count();
        if v4 > 1 || self.pod_cidrs.len() - v4 > 1 {
            return Err(bad(
                "podCIDRs",
                format!("{:?}", self.pod_cidrs),
                "at most one per family",
            ));
        }
        for cidr in &self.pod_cidrs {
            if gateway(*cidr).is_none() {
                return Err(bad(
                    "podCIDRs",
                    cidr.to_string(),
                    "too small for a gateway and a pod (a /30 or /126 at least)",
                ));
            }
        }
        if !(576..=65535).contains(&self.mtu) {
            return Err(bad("mtu", self.mtu.to_string(), "576 to 65535"));
        }
        Ok(())
    }
}

/// The pod's side of an attachment, to be programmed (and checked by CHECK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// The interface in the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// The host end of the veth: `tp` and a hash of the container ID and ifname, so it is
    /// the same on every call for the attachment and fits the kernel's 15 bytes.
    pub host_ifname: String,
    /// Every host end's MAC (as Calico's): pods send every frame to it, and nothing else
    /// shares the link, so it needs to be unique on no wire.
    pub host_mac: [u8; 6],
    /// The pod end's MAC, derived from the attachment, so the host's neighbour entry for
    /// the pod is fixed at creation and a retried ADD or CHECK expects the same one.
    pub pod_mac: [u8; 6],
    pub mtu: u32,
    /// The pod's addresses as host prefixes (/32, /128): the veth is routed, not bridged,
    /// so a pod shares no link with other pods and every packet it sends, to a pod on the
    /// same node too, goes through the node, where routes, the service proxy and policy
    /// see it (Calico's shape; no ARP or neighbour discovery between pods).
    pub addresses: Vec<IpNet>,
    /// A default route per family, through the gateway (on-link: the pod has no prefix
    /// that contains it), whose neighbour entry is fixed to the host end's MAC.
    pub routes: Vec<(IpNet, IpAddr)>,
    /// On the host: a route to each pod address through the host end.
    pub host_routes: Vec<IpNet>,
}

/// The network of one attachment: `addresses` as IPAM gave them (one per pod CIDR).
pub fn pod_network(
    node: &NodeNetwork,
    container_id: &str,
    ifname: &str,
    addresses: &[IpAddr],
) -> PodNetwork {
    let mut out = PodNetwork {
        ifname: ifname.to_string(),
        host_ifname: host_ifname(container_id, ifname),
        host_mac: HOST_MAC,
        pod_mac: pod_mac(container_id, ifname),
        mtu: node.mtu,
        addresses: Vec::new(),
        routes: Vec::new(),
        host_routes: Vec::new(),
    };
    for addr in addresses {
        let Some(cidr) = node.pod_cidrs.iter().find(|c| c.contains(addr)) else {
            continue;
        };
        let host = IpNet::new(*addr, if addr.is_ipv4() { 32 } else { 128 }).expect("host prefix");
        out.addresses.push(host);
        if let Some(gw) = gateway(*cidr) {
            let default = match addr {
                IpAddr::V4(_) => "0.0.0.0/0",
                IpAddr::V6(_) => "::/0",
            };
            out.routes.push((default.parse().expect("literal"), gw));
        }
        out.host_routes.push(host);
    }
    out
}

/// A locally administered unicast address.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// What every pod's host end is named with (network policy refuses traffic through these
/// from and to addresses it does not know yet).
pub const HOST_IFNAME_PREFIX: &str = "tp";

/// [`HOST_IFNAME_PREFIX`] + 12 hex digits of FNV-1a over `container_id/ifname`: 14 bytes.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    format!(
        "{HOST_IFNAME_PREFIX}{:012x}",
        attachment_hash(container_id, ifname) & 0xffff_ffff_ffff
    )
}

/// `0a:58` (locally administered, unicast) and four bytes of the attachment's hash not
/// used by its host end's name.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let h = (attachment_hash(container_id, ifname) >> 16).to_be_bytes();
    [0x0a, 0x58, h[4], h[5], h[6], h[7]]
}

/// A MAC as results print it.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_file_is_checked_field_by_field() {
        let ok = NodeNetwork::parse(
            br#"{"podCIDRs":["10.244.1.0/24","fd00:244:1::/64"],"mtu":1420}"#,
            "/var/lib/trellis/node.json",
        )
        .unwrap();
        assert_eq!(ok.mtu, 1420);
        for (text, expect) in [
            (r#"{"podCIDRs":[],"mtu":1420}"#, "podCIDRs = []"),
            (
                r#"{"podCIDRs":["10.0.0.0/24","10.1.0.0/24"],"mtu":1420}"#,
                "at most one per family",
            ),
            (r#"{"podCIDRs":["10.0.0.0/31"],"mtu":1420}"#, "10.0.0.0/31"),
            (r#"{"podCIDRs":["10.0.0.0/24"],"mtu":9}"#, "mtu = 9"),
        ] {
            let e = NodeNetwork::parse(text.as_bytes(), "node.json").unwrap_err();
            assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
            assert!(e.msg.contains(expect), "{}", e.msg);
        }
        let e = NodeNetwork::parse(br#"{"podCIDRs":["x"],"mtu":1}"#, "node.json").unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);
        assert!(e.msg.contains("node.json"));
    }

    #[test]
    fn a_pod_gets_its_addresses_default_routes_the_mtu_and_a_stable_host_end() {
        let node = NodeNetwork {
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:244:1::/64".parse().unwrap(),
            ],
            mtu: 1420,
        };
        let net = pod_network(
            &node,
            "abc",
            "eth0",
            &[
                "10.244.1.7".parse().unwrap(),
                "fd00:244:1::7".parse().unwrap(),
            ],
        );
        assert_eq!(
            net.addresses,
            [
                "10.244.1.7/32".parse::<IpNet>().unwrap(),
                "fd00:244:1::7/128".parse().unwrap()
            ]
        );
        assert_eq!(net.routes[0].1, "10.244.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(net.routes[1].0, "::/0".parse::<IpNet>().unwrap());
        assert_eq!(
            net.host_routes[0],
            "10.244.1.7/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(net.mtu, 1420);
        assert_eq!(net.host_ifname, host_ifname("abc", "eth0"));
        assert!(net.host_ifname.len() <= 15);
        assert_ne!(host_ifname("abc", "eth0"), host_ifname("abc", "eth1"));
        assert_eq!(
            mac_string(&net.pod_mac),
            mac_string(&pod_mac("abc", "eth0"))
        );
        assert_eq!(net.pod_mac[0] & 1, 0, "unicast");
        assert_ne!(pod_mac("abc", "eth0"), pod_mac("abd", "eth0"));
    }
}
