//! Objects to records, as pure functions: what each object of the cluster means in
//! Trellis's key layout, and which Lease keeps it alive.
//!
//! Records that live under a lease on etcd (an agent's status, its path reports and
//! opinions, a leader's candidate key) are *gated* here by the Lease object that stands for
//! that lease: they count only while it is live ([`super::liveness`]). That is how a dead
//! agent's words disappear on Kubernetes, where an expired Lease deletes nothing.

use crate::annotations::REGION_LABEL;
use crate::{location, node, peer};
use serde_json::{Value, json};
use trellis_model::{GatewaySet, Observation, PathReport, keys};

/// Where Trellis keeps what is not the cluster's own: Leases, the settings ConfigMap.
pub mod names {
    /// The Lease of a node's agent: `node.NAME` (names of Nodes are DNS subdomains, and a
    /// dot cannot start one, so `node.` never collides with [`LEADER_LEASE`]).
    pub fn node_lease(node: &str) -> String {
        format!("node.{node}")
    }
    pub fn node_of_lease(lease: &str) -> Option<&str> {
        lease.strip_prefix("node.").filter(|n| !n.is_empty())
    }
    pub const LEADER_LEASE: &str = "leader";
    pub const SETTINGS_CONFIG_MAP: &str = "trellis";
    pub const SETTINGS_KEY: &str = "settings.json";
    /// On a node's Lease: the agent's status (JSON).
    pub const STATUS_ANNOTATION: &str = "trellis.network/status";
    /// On a node's Lease: `path.trellis.network/PEER`: `up` or `down`, its direct tunnel as
    /// measured from this end.
    pub const PATH_ANNOTATION_PREFIX: &str = "path.trellis.network/";
    /// On the leader Lease: the holder's session (hex), its candidate key in the election.
    pub const CANDIDATE_ANNOTATION: &str = "trellis.network/candidate";
}

/// The objects Trellis reads, each kind with its own list and watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    /// Leases in Trellis's namespace.
    Lease,
    /// ConfigMaps in Trellis's namespace.
    ConfigMap,
    Location,
    Peer,
    Service,
    EndpointSlice,
    NetworkPolicy,
    Pod,
    Namespace,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Node,
        Kind::Lease,
        Kind::ConfigMap,
        Kind::Location,
        Kind::Peer,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::Pod,
        Kind::Namespace,
    ];

    pub fn api(self) -> crate::client::Kind {
        use crate::client::Kind as K;
        match self {
            Kind::Node => K::node(),
            Kind::Lease => K::lease(),
            Kind::ConfigMap => K::config_map(),
            Kind::Location => K::location(),
            Kind::Peer => K::kilo_peer(),
            Kind::Service => K::service(),
            Kind::EndpointSlice => K::endpoint_slice(),
            Kind::NetworkPolicy => K::network_policy(),
            Kind::Pod => K::pod(),
            Kind::Namespace => K::namespace(),
        }
    }

    /// Whether the kind lives in Trellis's namespace (the rest: cluster-wide, or every
    /// namespace).
    pub fn in_own_namespace(self) -> bool {
        matches!(self, Kind::Lease | Kind::ConfigMap)
    }

    /// Kinds a cluster may lack (a CRD not installed): their absence is an empty list.
    pub fn optional(self) -> bool {
        matches!(self, Kind::Peer | Kind::Location)
    }
}

/// One object: its kind, namespace (empty for cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn of(kind: Kind, object: &Value) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .into(),
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .into(),
        }
    }
}

/// One record an object stands for, and the Lease that must be live for it to count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
    /// The name of a Lease in Trellis's namespace; `None`: always counts.
    pub gate: Option<String>,
}

fn record(key: String, value: &impl serde::Serialize, gate: Option<String>) -> Record {
    Record {
        key,
        value: serde_json::to_vec(value).expect("records serialize"),
        gate,
    }
}

/// What `object` stands for in Trellis's layout. An object that does not decode stands for
/// nothing, with a warning naming it: one bad object must not stop the mesh.
pub fn records(kind: Kind, object: &Value, own_namespace: &str) -> Vec<Record> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let warn = |e: &dyn std::fmt::Display| {
        tracing::warn!(kind = ?kind, namespace, name, "ignoring object: {e}");
    };
    match kind {
        Kind::Node => match node::node_from_object(object) {
            Ok(Some(node)) => vec![record(keys::node(name), &node, None)],
            Ok(None) => vec![],
            Err(e) => {
                warn(&e);
                vec![]
            }
        },
        Kind::Lease if namespace == own_namespace => lease_records(object, name),
        Kind::ConfigMap if namespace == own_namespace && name == names::SETTINGS_CONFIG_MAP => {
            match object["data"][names::SETTINGS_KEY].as_str() {
                Some(text) => vec![Record {
                    key: keys::SETTINGS.into(),
                    value: text.as_bytes().to_vec(),
                    gate: None,
                }],
                None => vec![],
            }
        }
        Kind::Location => location_records(object, name),
        Kind::Peer => match peer::peer_from_object(object) {
            Ok(p) => vec![record(keys::peer(name), &p, None)],
            Err(e) => {
                warn(&e);
                vec![]
            }
        },
        Kind::Service => vec![record(
            keys::service(namespace, name),
            &served_object(object),
            None,
        )],
        Kind::EndpointSlice => vec![record(
            keys::endpoint_slice(namespace, name),
            &served_object(object),
            None,
        )],
        Kind::NetworkPolicy => vec![record(
            keys::network_policy(namespace, name),
            &served_object(object),
            None,
        )],
        Kind::Pod => pod(object)
            .map(|p| record(keys::pod(namespace, name), &p, None))
            .into_iter()
            .collect(),
        Kind::Namespace => {
            let ns = trellis_model::NamespaceObject::new(
                name,
                string_map(&object["metadata"]["labels"]),
            );
            vec![record(keys::namespace(name), &ns, None)]
        }
        Kind::Lease | Kind::ConfigMap => vec![],
    }
}

fn string_map(value: &Value) -> std::collections::BTreeMap<String, String> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// A Pod as NetworkPolicy reads it: a scheduled pod with its own network that has not
/// ended (a host-network pod has the node's addresses; a finished one may have given its
/// address to the next pod). A pod not addressed yet stands for its labels and named
/// ports: its node's agent has its addresses from the CNI plugin before the API does, and
/// programs its rules from both before the plugin's ADD returns.
fn pod(object: &Value) -> Option<trellis_model::Pod> {
    let spec = &object["spec"];
    let status = &object["status"];
    if spec["hostNetwork"] == true
        || matches!(status["phase"].as_str(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let ips: Vec<std::net::IpAddr> = status["podIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["ip"].as_str()?.parse().ok())
        .collect();
    let mut ports = Vec::new();
    for container in spec["containers"].as_array().into_iter().flatten() {
        for p in container["ports"].as_array().into_iter().flatten() {
            let (Some(name), Some(port)) = (p["name"].as_str(), p["containerPort"].as_u64()) else {
                continue;
            };
            let protocol = serde_json::from_value(p["protocol"].clone()).unwrap_or_default();
            ports.push(trellis_model::NamedPort {
                name: name.to_string(),
                protocol,
                port: u16::try_from(port).ok()?,
            });
        }
    }
    Some(trellis_model::Pod {
        namespace: object["metadata"]["namespace"].as_str()?.to_string(),
        name: object["metadata"]["name"].as_str()?.to_string(),
        labels: string_map(&object["metadata"]["labels"]),
        ips,
        node: spec["nodeName"].as_str()?.to_string(),
        ports,
    })
}

/// The object without what the server adds and Trellis's decoders need not see.
fn served_object(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("managedFields");
    }
    object
}

fn lease_records(object: &Value, name: &str) -> Vec<Record> {
    let annotations = object["metadata"]["annotations"].as_object();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
    let gate = Some(name.to_string());
    if name == names::LEADER_LEASE {
        let holder = object["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default();
        let session = annotation(names::CANDIDATE_ANNOTATION)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        return match session {
            Some(session) if !holder.is_empty() => vec![Record {
                key: keys::candidate(session),
                value: holder.as_bytes().to_vec(),
                gate,
            }],
            _ => vec![],
        };
    }
    let Some(node) = names::node_of_lease(name) else {
        return vec![];
    };
    let mut out = Vec::new();
    if let Some(status) = annotation(names::STATUS_ANNOTATION) {
        out.push(Record {
            key: keys::status(node),
            value: status.as_bytes().to_vec(),
            gate: gate.clone(),
        });
    }
    for (key, value) in annotations.into_iter().flatten() {
        let Some(to) = key.strip_prefix(names::PATH_ANNOTATION_PREFIX) else {
            continue;
        };
        let up = match value.as_str() {
            Some("up") => true,
            Some("down") => false,
            _ => continue,
        };
        let report = PathReport {
            from: node.into(),
            to: to.into(),
            up,
        };
        out.push(record(keys::path(node, to), &report, gate.clone()));
    }
    out
}

fn location_records(object: &Value, name: &str) -> Vec<Record> {
    let mut out = Vec::new();
    if let Some(slots) = object["status"]["slots"].as_array() {
        let set = GatewaySet {
            location: name.into(),
            slots: slots.iter().map(|s| s.as_str().map(String::from)).collect(),
        };
        out.push(record(keys::gateways(name), &set, None));
    }
    for (observer, gateway, up) in location::opinions(object) {
        let o = Observation {
            gateway: gateway.clone(),
            observer: observer.clone(),
            up,
        };
        out.push(record(
            keys::observation(&gateway, &observer),
            &o,
            Some(names::node_lease(&observer)),
        ));
    }
    out
}

/// The leader's status patch for a location's slots: the slots as stored, the active and
/// standby gateways as `kubectl get` prints them, and the last failover when an active
/// gateway was replaced (`previous`: the slots before; `now`: RFC 3339).
pub fn slots_patch(
    previous: &[Option<String>],
    slots: &[Option<String>],
    standby: &[String],
    now: &str,
) -> Value {
    let active: Vec<String> = slots.iter().flatten().cloned().collect();
    let mut patch = location::slots_status(&active, standby);
    patch["status"]["slots"] = json!(slots);
    let left: Vec<&String> = previous
        .iter()
        .flatten()
        .filter(|g| !active.contains(g))
        .collect();
    if !left.is_empty() {
        let joined: Vec<&String> = active
            .iter()
            .filter(|g| !previous.iter().flatten().any(|p| p == *g))
            .collect();
        patch["status"]["lastFailover"] = json!({"at": now, "from": left, "to": joined});
    }
    patch
}

/// What most observers say of `gateway`'s forwarding, with `observer`'s opinion now `up`
/// (`None`: withdrawn): `up`, `down`, or `unknown` on a tie or without opinions. For
/// `kubectl get`: the agents' verdicts are the planner's, from the opinions themselves.
pub fn forwarding_summary(
    location: &Value,
    gateway: &str,
    observer: &str,
    up: Option<bool>,
) -> &'static str {
    let mut votes: std::collections::BTreeMap<String, bool> = location::opinions(location)
        .into_iter()
        .filter(|(_, g, _)| g == gateway)
        .map(|(o, _, up)| (o, up))
        .collect();
    match up {
        Some(up) => votes.insert(observer.to_string(), up),
        None => votes.remove(observer),
    };
    let ups = votes.values().filter(|up| **up).count();
    let downs = votes.len() - ups;
    match ups.cmp(&downs) {
        std::cmp::Ordering::Greater => "up",
        std::cmp::Ordering::Less => "down",
        std::cmp::Ordering::Equal => "unknown",
    }
}

/// A Node's location as the cluster says it, for an agent that was not told its own.
pub fn node_location(object: &Value) -> Option<String> {
    object["metadata"]["annotations"][crate::annotations::kilo::LOCATION]
        .as_str()
        .or_else(|| object["metadata"]["labels"][REGION_LABEL].as_str())
        .map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_lease_stands_for_the_agents_status_and_paths_gated_by_itself() {
        let lease = json!({
            "metadata": {"name": "node.a1", "namespace": "trellis-system", "annotations": {
                names::STATUS_ANNOTATION: "{\"node\":\"a1\"}",
                "path.trellis.network/b1": "down",
                "path.trellis.network/b2": "up",
                "path.trellis.network/b3": "sideways",
                "other/x": "y",
            }},
            "spec": {"holderIdentity": "a1", "leaseDurationSeconds": 15},
        });
        let got = records(Kind::Lease, &lease, "trellis-system");
        let keys: Vec<&str> = got.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["status/a1", "paths/a1/b1", "paths/a1/b2"]);
        assert!(got.iter().all(|r| r.gate.as_deref() == Some("node.a1")));
        let path: PathReport = serde_json::from_slice(&got[1].value).unwrap();
        assert_eq!(
            (path.from.as_str(), path.to.as_str(), path.up),
            ("a1", "b1", false)
        );
        assert!(
            records(Kind::Lease, &lease, "elsewhere").is_empty(),
            "Leases outside Trellis's namespace are not its own"
        );
    }

    #[test]
    fn the_leader_lease_stands_for_the_holders_candidate_key() {
        let mut lease = json!({
            "metadata": {"name": "leader", "namespace": "ns", "annotations": {
                names::CANDIDATE_ANNOTATION: "2a"}},
            "spec": {"holderIdentity": "b2"},
        });
        let got = records(Kind::Lease, &lease, "ns");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key, keys::candidate(0x2a));
        assert_eq!(got[0].value, b"b2");
        assert_eq!(got[0].gate.as_deref(), Some("leader"));
        lease["spec"]["holderIdentity"] = Value::Null; // released
        assert!(records(Kind::Lease, &lease, "ns").is_empty());
    }

    #[test]
    fn a_location_stands_for_its_slots_and_each_observers_gated_opinions() {
        let mut object = json!({"metadata": {"name": "site-a"}});
        json_patch::merge(
            &mut object,
            &slots_patch(&[], &[Some("a1".into()), None], &["a2".into()], "t"),
        );
        json_patch::merge(&mut object, &location::opinion_patch("b1", "a1", false));
        let got = records(Kind::Location, &object, "ns");
        let set: GatewaySet = serde_json::from_slice(&got[0].value).unwrap();
        assert_eq!(set.slots, [Some("a1".to_string()), None]);
        assert_eq!(got[0].gate, None);
        assert_eq!(got[1].key, "observations/a1/b1");
        assert_eq!(got[1].gate.as_deref(), Some("node.b1"));
        assert_eq!(object["status"]["activeList"], "a1");
        assert!(object["status"]["lastFailover"].is_null());
    }

    #[test]
    fn a_candidates_forwarding_is_what_most_of_its_observers_say() {
        let mut object = json!({"metadata": {"name": "site-a"}});
        assert_eq!(forwarding_summary(&object, "a1", "b1", None), "unknown");
        json_patch::merge(&mut object, &location::opinion_patch("b1", "a1", true));
        json_patch::merge(&mut object, &location::opinion_patch("b2", "a1", false));
        json_patch::merge(&mut object, &location::opinion_patch("b2", "a2", false));
        assert_eq!(forwarding_summary(&object, "a1", "b3", Some(false)), "down");
        assert_eq!(forwarding_summary(&object, "a1", "b2", Some(true)), "up");
        assert_eq!(forwarding_summary(&object, "a1", "b2", None), "up");
        assert_eq!(forwarding_summary(&object, "a1", "b1", None), "down");
    }

    #[test]
    fn a_replaced_active_gateway_is_recorded_as_the_last_failover() {
        let before = [Some("a1".to_string()), Some("a2".to_string())];
        let after = [Some("a3".to_string()), Some("a2".to_string())];
        let patch = slots_patch(&before, &after, &[], "2026-11-30T11:00:00Z");
        assert_eq!(
            patch["status"]["lastFailover"],
            json!({"at": "2026-11-30T11:00:00Z", "from": ["a1"], "to": ["a3"]})
        );
        let grown = slots_patch(&before[..1], &before, &[], "t");
        assert!(grown["status"]["lastFailover"].is_null(), "no gateway left");
    }

    #[test]
    fn a_running_pod_stands_for_its_addresses_labels_node_and_named_ports() {
        let mut object = json!({
            "metadata": {"name": "db-0", "namespace": "shop", "labels": {"app": "db"}},
            "spec": {"nodeName": "a1", "containers": [{"name": "db", "ports": [
                {"name": "redis", "containerPort": 6379},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"containerPort": 9000}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]},
        });
        let got = records(Kind::Pod, &object, "trellis-system");
        assert_eq!(got[0].key, "pods/shop/db-0");
        let pod: trellis_model::Pod = serde_json::from_slice(&got[0].value).unwrap();
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.node, "a1");
        assert_eq!(
            pod.named_port("dns", trellis_model::Protocol::Udp),
            Some(53)
        );
        assert_eq!(pod.ports.len(), 2, "unnamed ports mean nothing to a policy");
        object["status"] = json!({"phase": "Pending"});
        let pending: trellis_model::Pod =
            serde_json::from_slice(&records(Kind::Pod, &object, "x")[0].value).unwrap();
        assert!(pending.ips.is_empty(), "labels before addresses");
        assert_eq!(pending.labels["app"], "db");
        object["status"]["phase"] = json!("Succeeded");
        assert!(
            records(Kind::Pod, &object, "x").is_empty(),
            "its address may be reused"
        );
        object["status"]["phase"] = json!("Running");
        object["spec"]["hostNetwork"] = json!(true);
        assert!(
            records(Kind::Pod, &object, "x").is_empty(),
            "the node's address"
        );
    }

    #[test]
    fn settings_come_from_the_config_map_in_trellis_namespace_only() {
        let cm = json!({"metadata": {"name": "trellis", "namespace": "ns"},
            "data": {"settings.json": "{\"granularity\":\"full\"}"}});
        let got = records(Kind::ConfigMap, &cm, "ns");
        assert_eq!(got[0].key, "settings");
        assert!(records(Kind::ConfigMap, &cm, "other").is_empty());
    }
}
