//! On Kubernetes a DaemonSet gives every agent the same flags, so what differs per node —
//! location, internal address, pod CIDRs, overlay and probe addresses — comes from the
//! node's own `Node` object ([`from_node`], pure) when the flags leave it out. Read once at
//! start ([`discover`]), with the state cache as the fallback when the API does not answer
//! (a cold boot with the control plane down, seed 003).

use crate::state::cache::StateCache;
use crate::store_addr::KubeOptions;
use ipnet::IpNet;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;
use trellis_kube::annotations::{kilo, trellis as own};
use trellis_model::{InvalidField, Node, keys};
use trellis_store::backoff::Backoff;

/// What a node's agent needs to know of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub location: String,
    pub internal_ip: IpNet,
    pub pod_cidrs: Vec<IpNet>,
    pub overlay_ip: IpAddr,
    pub probe_ip: IpAddr,
    /// The Node's `ExternalIP`: where other locations reach it, unless Kilo's
    /// `force-endpoint` says otherwise (read over the agent's record by every reader).
    pub external_ip: Option<IpAddr>,
}

/// The range overlay addresses are derived from (when not given), and probe addresses:
/// two halves of the shared address space (RFC 6598), so neither meets a pod or a host.
const OVERLAY_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
const PROBE_BASE: u32 = u32::from_be_bytes([100, 96, 0, 0]);
const DERIVED_BITS: u32 = 21;

/// A node's overlay and probe addresses from its first IPv4 pod CIDR: its index in the
/// cluster's CIDR (the network address shifted by the prefix), so every node of a cluster
/// whose pod CIDRs share one size gets its own, with no allocation to keep.
pub fn derived_addresses(pod_cidrs: &[IpNet]) -> Option<(IpAddr, IpAddr)> {
    let IpNet::V4(cidr) = pod_cidrs.iter().find(|c| c.addr().is_ipv4())? else {
        return None;
    };
    let prefix = u32::from(cidr.prefix_len());
    if prefix == 0 {
        return None;
    }
    let index = (u32::from(cidr.network()) >> (32 - prefix)) & ((1 << DERIVED_BITS) - 1);
    let at = |base: u32| IpAddr::V4(Ipv4Addr::from(base | index));
    Some((at(OVERLAY_BASE), at(PROBE_BASE)))
}

/// The facts of `object`, the Node named `name`. The agent's own annotations (from an
/// earlier run) and Kilo's are read first, then what the kubelet and the controller
/// manager set.
pub fn from_node(name: &str, object: &Value) -> Result<NodeFacts, InvalidField> {
    let annotations = &object["metadata"]["annotations"];
    let field = |what: &str| format!("Node {name}: {what}");
    let location = trellis_kube::store::derive::node_location(object).unwrap_or(name.into());
    let internal_ip = match annotations[kilo::FORCE_INTERNAL_IP]
        .as_str()
        .or(annotations[own::INTERNAL_IP].as_str())
    {
        Some(text) => text.parse::<IpNet>().map_err(|_| {
            InvalidField::new(field("internal IP annotation"), text, "expected a CIDR")
        })?,
        None => {
            let address = object["status"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["type"] == "InternalIP")
                .and_then(|a| a["address"].as_str())
                .ok_or_else(|| {
                    InvalidField::new(
                        field("status.addresses"),
                        "",
                        "no InternalIP yet (the kubelet reports it); or give --internal-ip",
                    )
                })?;
            let ip: IpAddr = address.parse().map_err(|_| {
                InvalidField::new(field("status.addresses InternalIP"), address, "not an IP")
            })?;
            IpNet::from(ip)
        }
    };
    let mut pod_cidrs = Vec::new();
    let listed = object["spec"]["podCIDRs"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| {
            object["spec"]["podCIDR"]
                .as_str()
                .map(Value::from)
                .into_iter()
                .collect()
        });
    for c in &listed {
        let text = c.as_str().unwrap_or_default();
        pod_cidrs.push(
            text.parse::<IpNet>()
                .map_err(|_| InvalidField::new(field("spec.podCIDRs"), text, "expected CIDRs"))?,
        );
    }
    let published = |key: &str| {
        annotations[key]
            .as_str()
            .and_then(|t| t.parse::<IpAddr>().ok())
    };
    let derived = derived_addresses(&pod_cidrs);
    let overlay_ip = published(own::OVERLAY_IP)
        .or(derived.map(|d| d.0))
        .ok_or_else(|| {
            InvalidField::new(
                field("spec.podCIDRs"),
                "",
                "no IPv4 pod CIDR to derive the overlay address from; give --overlay-ip",
            )
        })?;
    let probe_ip = published(own::PROBE_IP)
        .or(derived.map(|d| d.1))
        .unwrap_or(overlay_ip);
    let external_ip = object["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "ExternalIP")
        .find_map(|a| a["address"].as_str()?.parse().ok());
    Ok(NodeFacts {
        location,
        internal_ip,
        pod_cidrs,
        overlay_ip,
        probe_ip,
        external_ip,
    })
}

/// The node's facts from the API; if it has not answered within `cache_after`, from the
/// node's record in the state cache (what it last published). Retries for ever otherwise:
/// an agent must come up with its node.
pub fn discover(
    kube: &KubeOptions,
    name: &str,
    cache: Option<&Path>,
    cache_after: Duration,
) -> Result<NodeFacts, crate::run::StartError> {
    // Its own small runtime: the agent's comes later, and nothing here outlives this call.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::run::StartError::Runtime)?;
    runtime.block_on(async {
        let client = kube.client().await?;
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match client
                .get(&trellis_kube::client::Kind::node(), None, name)
                .await
            {
                Ok(Some(object)) => return Ok(from_node(name, &object)?),
                Ok(None) => {
                    tracing::warn!(node = name, "no such Node yet (the kubelet registers it)")
                }
                Err(e) => tracing::warn!(node = name, "reading the agent's own Node: {e}"),
            }
            if started.elapsed() >= cache_after
                && let Some(facts) = cache.and_then(|path| cached(path, name))
            {
                tracing::warn!(
                    node = name,
                    "Kubernetes API unreachable at start: this node's facts from the state cache"
                );
                return Ok(facts);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    })
}

fn cached(path: &Path, name: &str) -> Option<NodeFacts> {
    let (records, _) = StateCache::new(path.to_path_buf()).load().ok()??;
    let kv = records.iter().find(|kv| kv.key == keys::node(name))?;
    let node: Node = serde_json::from_slice(&kv.value).ok()?;
    Some(NodeFacts {
        location: node.location,
        internal_ip: node.internal_ip,
        pod_cidrs: node.pod_cidrs,
        overlay_ip: node.overlay_ip,
        probe_ip: node.probe_ip.unwrap_or(node.overlay_ip),
        external_ip: node.endpoint.and_then(|e| e.socket_addr()).map(|a| a.ip()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_fresh_node_gives_its_region_internal_ip_pod_cidrs_and_derived_addresses() {
        let node = json!({
            "metadata": {"name": "w1", "labels": {"topology.kubernetes.io/region": "eu-1"}},
            "spec": {"podCIDRs": ["10.244.7.0/24", "fd00:10:244:7::/64"]},
            "status": {"addresses": [{"type": "Hostname", "address": "w1"},
                {"type": "InternalIP", "address": "192.168.1.7"},
                {"type": "ExternalIP", "address": "203.0.113.7"}]},
        });
        let facts = from_node("w1", &node).unwrap();
        assert_eq!(facts.location, "eu-1");
        assert_eq!(facts.internal_ip, "192.168.1.7/32".parse().unwrap());
        assert_eq!(facts.pod_cidrs.len(), 2);
        // 10.244.7.0/24 is /24 number 0x0af407 of the IPv4 space: its low 21 bits.
        assert_eq!(facts.overlay_ip, "100.74.244.7".parse::<IpAddr>().unwrap());
        assert_eq!(facts.probe_ip, "100.106.244.7".parse::<IpAddr>().unwrap());
        assert_eq!(facts.external_ip, Some("203.0.113.7".parse().unwrap()));
    }

    #[test]
    fn neighbouring_pod_cidrs_get_distinct_addresses_outside_them() {
        let mut seen = std::collections::HashSet::new();
        for third in 0..=255u8 {
            let cidr: IpNet = format!("10.244.{third}.0/24").parse().unwrap();
            let (overlay, probe) = derived_addresses(&[cidr]).unwrap();
            assert!(!cidr.contains(&overlay) && !cidr.contains(&probe));
            assert!(seen.insert(overlay) && seen.insert(probe));
        }
    }

    #[test]
    fn published_and_kilo_annotations_come_first_and_bad_values_are_named() {
        let node = json!({
            "metadata": {"name": "w1", "annotations": {
                "kilo.squat.ai/location": "lab", "kilo.squat.ai/force-internal-ip": "10.1.0.5/16",
                "trellis.network/overlay-ip": "100.64.0.9"}},
            "spec": {"podCIDR": "10.244.1.0/24"},
        });
        let facts = from_node("w1", &node).unwrap();
        assert_eq!(facts.location, "lab");
        assert_eq!(facts.internal_ip, "10.1.0.5/16".parse().unwrap());
        assert_eq!(facts.overlay_ip, "100.64.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(facts.pod_cidrs, ["10.244.1.0/24".parse().unwrap()]);

        let bare = json!({"metadata": {"name": "w2"}, "spec": {"podCIDRs": ["10.244.2.0/24"]}});
        let err = from_node("w2", &bare).unwrap_err().to_string();
        assert!(
            err.contains("Node w2") && err.contains("InternalIP"),
            "{err}"
        );
    }
}
