//! A Kubernetes `Node` and Trellis's node record.
//!
//! Read: the record is what the node's agent published in Trellis's annotations
//! ([`crate::annotations::trellis`]), the pod CIDRs from `spec.podCIDRs`, the location
//! from Kilo's annotation or the region label — with Kilo's user-set annotations
//! ([`crate::annotations::kilo`]) over the agent's values, so a Kilo cluster keeps its
//! configuration. Written: an agent's merge patch of its own Node's annotations, only the
//! keys whose value changed (Kilo patches every Node every 30 s; an idle Trellis node
//! writes nothing).

use crate::annotations::{REGION_LABEL, kilo, trellis};
use ipnet::IpNet;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;
use trellis_model::{Endpoint, GatewayPolicy, InvalidField, Node, PublicKey, Validate};

/// The gateway priority a Kilo `leader` annotation gives: above any set by hand.
pub const LEADER_PRIORITY: i32 = 1_000_000;

/// The node record of a Kubernetes Node, or `None` while no agent has joined it to the
/// mesh (no overlay address published yet).
pub fn node_from_object(object: &Value) -> Result<Option<Node>, InvalidField> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let read = Annotations::of(object, name);
    let (Some(overlay), Some(port)) = (
        read.get(trellis::OVERLAY_IP),
        read.get(trellis::LISTEN_PORT),
    ) else {
        return Ok(None);
    };
    let overlay_ip: IpAddr = read.parse(trellis::OVERLAY_IP, overlay, "an IP address")?;
    let listen_port: u16 = read.parse(trellis::LISTEN_PORT, port, "a port number")?;
    let location = read
        .get(kilo::LOCATION)
        .or_else(|| object["metadata"]["labels"][REGION_LABEL].as_str())
        // Without either, a node is a location of its own (it meets the others over the
        // tunnels only).
        .unwrap_or(name)
        .to_string();
    let internal_ip = match read.get(kilo::FORCE_INTERNAL_IP) {
        Some("" | "-") => {
            return Err(read.refuse(
                kilo::FORCE_INTERNAL_IP,
                "-",
                "a node without an internal address is not supported",
            ));
        }
        Some(forced) => read.parse(kilo::FORCE_INTERNAL_IP, forced, "a CIDR")?,
        None => {
            let published = read.get(trellis::INTERNAL_IP).ok_or_else(|| {
                read.refuse(trellis::INTERNAL_IP, "", "missing: the agent publishes it")
            })?;
            read.parse(trellis::INTERNAL_IP, published, "a CIDR")?
        }
    };
    let endpoint = match read
        .get(kilo::FORCE_ENDPOINT)
        .map(|e| (kilo::FORCE_ENDPOINT, e))
        .or_else(|| read.get(trellis::ENDPOINT).map(|e| (trellis::ENDPOINT, e)))
    {
        Some((key, text)) => Some(
            Endpoint::parse(&read.field(key), text)
                .map_err(|e| read.refuse(key, text, &e.reason))?,
        ),
        None => None,
    };
    let public_key = match read.get(trellis::PUBLIC_KEY) {
        Some(text) => Some(
            PublicKey::parse(&read.field(trellis::PUBLIC_KEY), text)
                .map_err(|e| read.refuse(trellis::PUBLIC_KEY, text, &e.reason))?,
        ),
        None => None,
    };
    let mut gateway = match read.get(trellis::GATEWAY) {
        Some(text) => {
            gateway_policy(text).map_err(|why| read.refuse(trellis::GATEWAY, text, &why))?
        }
        None => GatewayPolicy::default(),
    };
    if read.get(kilo::LEADER).is_some() {
        gateway = GatewayPolicy {
            eligible: true,
            priority: LEADER_PRIORITY,
        };
    }
    let probe_ip = match read.get(trellis::PROBE_IP) {
        Some(text) => Some(read.parse(trellis::PROBE_IP, text, "an IP address")?),
        None => None,
    };
    // Kilo's user-set annotations over what the agent published from its flags.
    let keepalive_key = [kilo::PERSISTENT_KEEPALIVE, trellis::PERSISTENT_KEEPALIVE]
        .into_iter()
        .find(|k| read.get(k).is_some());
    let persistent_keepalive = match keepalive_key {
        Some(key) => {
            let text = read.get(key).unwrap_or_default();
            // 0 is WireGuard's (and Kilo's) "off".
            Some(read.parse::<u16>(key, text, "seconds, 0-65535")?).filter(|s| *s != 0)
        }
        None => None,
    };
    let prefixes_key = [kilo::ALLOWED_LOCATION_IPS, trellis::LOCATION_PREFIXES]
        .into_iter()
        .find(|k| read.get(k).is_some());
    let allowed_location_ips = match prefixes_key {
        Some(key) => read
            .get(key)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|cidr| read.parse(key, cidr, "comma-separated CIDRs"))
            .collect::<Result<Vec<IpNet>, _>>()?,
        None => Vec::new(),
    };
    let node = Node {
        name: name.to_string(),
        location,
        internal_ip,
        endpoint,
        listen_port,
        public_key,
        pod_cidrs: pod_cidrs(object, name)?,
        gateway,
        overlay_ip,
        probe_ip,
        persistent_keepalive,
        location_prefixes: allowed_location_ips,
    };
    node.validate()
        .map_err(|e| InvalidField::new(format!("node {name}: {}", e.field), e.value, e.reason))?;
    Ok(Some(node))
}

/// `spec.podCIDRs` (one per family), or the older `spec.podCIDR`.
fn pod_cidrs(object: &Value, name: &str) -> Result<Vec<IpNet>, InvalidField> {
    let spec = &object["spec"];
    let listed: Vec<&str> = match spec["podCIDRs"].as_array() {
        Some(list) => list.iter().filter_map(Value::as_str).collect(),
        None => spec["podCIDR"].as_str().into_iter().collect(),
    };
    listed
        .into_iter()
        .map(|cidr| {
            cidr.parse().map_err(|_| {
                InvalidField::new(format!("node {name}: spec.podCIDRs"), cidr, "not a CIDR")
            })
        })
        .collect()
}

/// `eligible` or `ineligible`, optionally followed by `,priority=N`.
fn gateway_policy(text: &str) -> Result<GatewayPolicy, String> {
    let mut parts = text.split(',').map(str::trim);
    let eligible = match parts.next() {
        Some("eligible") => true,
        Some("ineligible") => false,
        _ => return Err("eligible or ineligible, then optionally ,priority=N".into()),
    };
    let mut priority = 0;
    for part in parts {
        match part.split_once('=') {
            Some(("priority", n)) => {
                priority = n
                    .parse()
                    .map_err(|_| format!("priority {n:?} is not an integer"))?
            }
            _ => return Err(format!("unknown part {part:?}")),
        }
    }
    Ok(GatewayPolicy { eligible, priority })
}

fn gateway_text(policy: GatewayPolicy) -> String {
    let kind = if policy.eligible {
        "eligible"
    } else {
        "ineligible"
    };
    if policy.priority == 0 {
        kind.to_string()
    } else {
        format!("{kind},priority={}", policy.priority)
    }
}

/// What an agent publishes on its own Node for `node`; `None`: the key must be absent.
pub fn own_annotations(node: &Node) -> BTreeMap<&'static str, Option<String>> {
    BTreeMap::from([
        (trellis::PUBLIC_KEY, node.public_key.map(|k| k.to_string())),
        (trellis::INTERNAL_IP, Some(node.internal_ip.to_string())),
        (
            trellis::ENDPOINT,
            node.endpoint.as_ref().map(ToString::to_string),
        ),
        (trellis::LISTEN_PORT, Some(node.listen_port.to_string())),
        (trellis::OVERLAY_IP, Some(node.overlay_ip.to_string())),
        (trellis::PROBE_IP, node.probe_ip.map(|ip| ip.to_string())),
        (trellis::GATEWAY, Some(gateway_text(node.gateway))),
        (
            trellis::PERSISTENT_KEEPALIVE,
            node.persistent_keepalive.map(|s| s.to_string()),
        ),
        (
            trellis::LOCATION_PREFIXES,
            (!node.location_prefixes.is_empty()).then(|| {
                let texts: Vec<String> = node
                    .location_prefixes
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                texts.join(",")
            }),
        ),
    ])
}

/// The merge patch that takes every annotation Trellis writes off a Node (Kilo's, set by
/// users, stay): a departed node's record, or an uninstall.
pub fn removal_patch() -> Value {
    let nulls: Map<String, Value> = (trellis::ALL.iter())
        .map(|k| (k.to_string(), Value::Null))
        .collect();
    json!({"metadata": {"annotations": nulls}})
}

/// The merge patch that brings the Node `current` to publishing `node`, or `None` when it
/// already does: the agent writes nothing while nothing changes.
pub fn annotations_patch(current: &Value, node: &Node) -> Option<Value> {
    let present = current["metadata"]["annotations"].as_object();
    let mut changes = Map::new();
    for (key, wanted) in own_annotations(node) {
        let have = present.and_then(|a| a.get(key)).and_then(Value::as_str);
        match (have, wanted.as_deref()) {
            (Some(h), Some(w)) if h == w => {}
            (None, None) => {}
            (_, Some(w)) => {
                changes.insert(key.to_string(), json!(w));
            }
            (Some(_), None) => {
                changes.insert(key.to_string(), Value::Null);
            }
        }
    }
    (!changes.is_empty()).then(|| json!({"metadata": {"annotations": changes}}))
}

/// One Node's annotations, with errors that name the node and the annotation.
struct Annotations<'a> {
    node: &'a str,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Annotations<'a> {
    fn of(object: &'a Value, node: &'a str) -> Annotations<'a> {
        Annotations {
            node,
            map: object["metadata"]["annotations"].as_object(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.map?.get(key)?.as_str()
    }

    fn field(&self, key: &str) -> String {
        format!("node {}: annotation {key}", self.node)
    }

    fn refuse(&self, key: &str, value: &str, why: &str) -> InvalidField {
        InvalidField::new(self.field(key), value, why)
    }

    fn parse<T: std::str::FromStr>(
        &self,
        key: &str,
        text: &str,
        what: &str,
    ) -> Result<T, InvalidField> {
        text.trim()
            .parse()
            .map_err(|_| self.refuse(key, text, &format!("expected {what}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_object(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "a1",
                "labels": {"topology.kubernetes.io/region": "eu-west"},
                "annotations": annotations,
            },
            "spec": {"podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
        })
    }

    fn published() -> Value {
        json!({
            "trellis.network/public-key": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
            "trellis.network/internal-ip": "172.20.0.10/24",
            "trellis.network/endpoint": "198.18.0.10:51820",
            "trellis.network/listen-port": "51820",
            "trellis.network/overlay-ip": "100.64.0.1",
            "trellis.network/probe-ip": "100.65.0.1",
            "trellis.network/gateway": "eligible,priority=5",
        })
    }

    #[test]
    fn a_node_without_an_agent_is_not_in_the_mesh_yet() {
        assert_eq!(node_from_object(&node_object(json!({}))).unwrap(), None);
    }

    #[test]
    fn the_agents_annotations_make_the_record_and_round_trip() {
        let facts = node_from_object(&node_object(published()))
            .unwrap()
            .unwrap();
        let n = &facts;
        assert_eq!(n.location, "eu-west", "the region label");
        assert_eq!(n.internal_ip, "172.20.0.10/24".parse::<IpNet>().unwrap());
        assert_eq!(n.pod_cidrs.len(), 2);
        assert_eq!(n.gateway.priority, 5);
        assert_eq!(n.probe_ip, Some("100.65.0.1".parse().unwrap()));
        // What the agent publishes for that record is what is there: nothing to write.
        assert_eq!(annotations_patch(&node_object(published()), n), None);
        // A changed endpoint is one key; a node gone private removes it.
        let mut moved = n.clone();
        moved.endpoint = None;
        moved.listen_port = 51821;
        let patch = annotations_patch(&node_object(published()), &moved).unwrap();
        assert_eq!(
            patch,
            json!({"metadata": {"annotations": {
                "trellis.network/endpoint": null,
                "trellis.network/listen-port": "51821",
            }}})
        );
    }

    #[test]
    fn kilos_user_set_annotations_win() {
        let mut a = published();
        a["kilo.squat.ai/location"] = json!("fra");
        a["kilo.squat.ai/force-endpoint"] = json!("vpn.example.org:51820");
        a["kilo.squat.ai/force-internal-ip"] = json!("10.1.0.5/16");
        a["kilo.squat.ai/leader"] = json!("");
        a["kilo.squat.ai/persistent-keepalive"] = json!("25");
        a["kilo.squat.ai/allowed-location-ips"] = json!("192.168.10.0/24, 192.168.11.0/24");
        let facts = node_from_object(&node_object(a)).unwrap().unwrap();
        assert_eq!(facts.location, "fra");
        assert_eq!(
            facts.endpoint.as_ref().unwrap().to_string(),
            "vpn.example.org:51820"
        );
        assert_eq!(facts.internal_ip.to_string(), "10.1.0.5/16");
        assert_eq!(facts.gateway.priority, LEADER_PRIORITY);
        assert_eq!(facts.persistent_keepalive, Some(25));
        assert_eq!(facts.location_prefixes.len(), 2);
    }

    /// The agent's own --persistent-keepalive and --location-prefix travel as Trellis's
    /// annotations; Kilo's, set by users, win over them; a keepalive of 0 is off.
    #[test]
    fn keepalive_and_location_prefixes_round_trip_and_kilos_win() {
        let plain = node_from_object(&node_object(published()))
            .unwrap()
            .unwrap();
        let mut record = plain.clone();
        record.persistent_keepalive = Some(15);
        record.location_prefixes = vec!["192.168.50.0/24".parse().unwrap()];
        let patch = annotations_patch(&node_object(published()), &record).unwrap();
        let mut written = published();
        json_patch::merge(&mut written, &patch["metadata"]["annotations"]);
        assert_eq!(
            node_from_object(&node_object(written.clone())).unwrap(),
            Some(record.clone())
        );
        written["kilo.squat.ai/persistent-keepalive"] = json!("0");
        written["kilo.squat.ai/allowed-location-ips"] = json!("10.9.0.0/16");
        let kilo = node_from_object(&node_object(written)).unwrap().unwrap();
        assert_eq!(kilo.persistent_keepalive, None, "0 is off");
        assert_eq!(
            kilo.location_prefixes,
            ["10.9.0.0/16".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn bad_values_are_refused_by_node_and_annotation() {
        for (key, value, expect) in [
            (
                "kilo.squat.ai/force-endpoint",
                "no-port",
                "expected host:port",
            ),
            ("kilo.squat.ai/force-internal-ip", "-", "not supported"),
            ("kilo.squat.ai/force-internal-ip", "10.1.0.5", "a CIDR"),
            ("kilo.squat.ai/persistent-keepalive", "soon", "seconds"),
            (
                "kilo.squat.ai/allowed-location-ips",
                "10.0.0.0/8,x",
                "CIDRs",
            ),
            ("trellis.network/gateway", "maybe", "eligible or ineligible"),
            ("trellis.network/public-key", "short", "base64"),
            ("trellis.network/listen-port", "70000", "port number"),
        ] {
            let mut a = published();
            a[key] = json!(value);
            let e = node_from_object(&node_object(a)).unwrap_err();
            assert_eq!(e.field, format!("node a1: annotation {key}"), "{e:?}");
            assert!(e.reason.contains(expect), "{key}: {e:?}");
        }
        let mut object = node_object(published());
        object["spec"]["podCIDRs"] = json!(["10.244.1.7/24"]);
        let e = node_from_object(&object).unwrap_err();
        assert!(e.field.starts_with("node a1: pod_cidrs"), "{e:?}");
        object["spec"] = json!({"podCIDR": "10.244.9.0/24"});
        let facts = node_from_object(&object).unwrap().unwrap();
        assert_eq!(facts.pod_cidrs, ["10.244.9.0/24".parse::<IpNet>().unwrap()]);
    }
}
