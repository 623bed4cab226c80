//! The store's key layout, relative to the store's prefix, as one type: [`Key`] is written
//! with [`Key::to_string`] and read with [`Key::parse`], so every part of Trellis (and every
//! backend: embedded, etcd, Kubernetes) agrees on the names, and no caller splits key strings
//! by hand.

use std::fmt;
use std::net::IpAddr;

pub const NODES: &str = "nodes/";
pub const PEERS: &str = "peers/";
pub const GATEWAYS: &str = "gateways/";
pub const STATUS: &str = "status/";
pub const SETTINGS: &str = "settings";
pub const OBSERVATIONS: &str = "observations/";
pub const PATHS: &str = "paths/";
pub const POD_CIDRS: &str = "podcidrs/";
/// The leader election: candidates' keys are `election/<lease id in hex>`, the layout of
/// etcd's own election recipe (`etcdctl elect <prefix>election`).
pub const ELECTION: &str = "election/";
/// Services and EndpointSlices: `services/<namespace>/<name>`.
pub const SERVICES: &str = "services/";
pub const ENDPOINT_SLICES: &str = "endpointslices/";
/// `networking.k8s.io/v1` NetworkPolicies: `networkpolicies/<namespace>/<name>`.
pub const NETWORK_POLICIES: &str = "networkpolicies/";
/// Pods and namespaces as NetworkPolicy reads them (`crate::pod`).
pub const PODS: &str = "pods/";
pub const NAMESPACES: &str = "namespaces/";
/// Claims on allocated values, each created only if absent in the transaction that writes
/// the Service holding it, so two writers can never hand out the same one: a ClusterIP
/// (`serviceips/<ip>`) or a node port (`nodeports/<port>`; one range for every protocol,
/// as the API server's).
pub const SERVICE_IPS: &str = "serviceips/";
pub const NODE_PORTS: &str = "nodeports/";

/// One record's place in the store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// A node's own record, written by its agent.
    Node(String),
    /// An external WireGuard peer.
    Peer(String),
    /// The sticky gateway choice of a location.
    Gateways(String),
    /// What a node's agent last applied (under its lease).
    Status(String),
    /// Cluster-wide settings.
    Settings,
    /// One observer's opinion of one gateway candidate (under the observer's lease).
    Observation { gateway: String, observer: String },
    /// One end's measurement of a direct path (under that end's lease).
    Path { from: String, to: String },
    /// A pod CIDR the leader allocated to a node.
    PodCidr(String),
    /// A leader-election candidate, by its session lease.
    Candidate(u64),
    /// A `v1 Service`.
    Service { namespace: String, name: String },
    /// A `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice { namespace: String, name: String },
    /// A `networking.k8s.io/v1 NetworkPolicy`.
    NetworkPolicy { namespace: String, name: String },
    /// A pod's record for NetworkPolicy.
    Pod { namespace: String, name: String },
    /// A namespace's labels.
    Namespace(String),
    /// A ClusterIP held by a Service (canonical text form).
    ServiceIp(IpAddr),
    /// A node port (or health check node port) held by a Service.
    NodePort(u16),
}

impl Key {
    /// The key a store path names, or `None` for keys outside Trellis's layout (which are
    /// ignored, not errors: others may share the store).
    pub fn parse(key: &str) -> Option<Key> {
        let pair = |rest: &str| {
            let (a, b) = rest.split_once('/')?;
            (!a.is_empty() && !b.is_empty() && !b.contains('/'))
                .then(|| (a.to_string(), b.to_string()))
        };
        let name = |rest: &str| (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string());
        if key == SETTINGS {
            return Some(Key::Settings);
        }
        let (prefix, rest) = key.split_at(key.find('/')? + 1);
        match prefix {
            NODES => name(rest).map(Key::Node),
            PEERS => name(rest).map(Key::Peer),
            GATEWAYS => name(rest).map(Key::Gateways),
            STATUS => name(rest).map(Key::Status),
            POD_CIDRS => name(rest).map(Key::PodCidr),
            OBSERVATIONS => {
                pair(rest).map(|(gateway, observer)| Key::Observation { gateway, observer })
            }
            PATHS => pair(rest).map(|(from, to)| Key::Path { from, to }),
            ELECTION => u64::from_str_radix(rest, 16).ok().map(Key::Candidate),
            SERVICES => pair(rest).map(|(namespace, name)| Key::Service { namespace, name }),
            ENDPOINT_SLICES => {
                pair(rest).map(|(namespace, name)| Key::EndpointSlice { namespace, name })
            }
            NETWORK_POLICIES => {
                pair(rest).map(|(namespace, name)| Key::NetworkPolicy { namespace, name })
            }
            PODS => pair(rest).map(|(namespace, name)| Key::Pod { namespace, name }),
            NAMESPACES => name(rest).map(Key::Namespace),
            // Only the canonical form, so one value has one key.
            SERVICE_IPS => rest
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| ip.to_string() == rest)
                .map(Key::ServiceIp),
            NODE_PORTS => rest
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0 && p.to_string() == rest)
                .map(Key::NodePort),
            _ => None,
        }
    }

    /// Whether the record is the service proxy's (Services, EndpointSlices and their
    /// claims) or NetworkPolicy's (policies, pods, namespaces): records that change far
    /// more often than the mesh and mean nothing to it, so the mesh's state leaves them
    /// alone.
    pub fn is_workload_state(&self) -> bool {
        matches!(
            self,
            Key::Service { .. }
                | Key::EndpointSlice { .. }
                | Key::ServiceIp(_)
                | Key::NodePort(_)
                | Key::NetworkPolicy { .. }
                | Key::Pod { .. }
                | Key::Namespace(_)
        )
    }

    /// The nodes a record belongs to, for garbage collection of departed nodes. A status
    /// is left out: it lives under its agent's lease and goes with it.
    pub fn owners(&self) -> Vec<&str> {
        match self {
            Key::Node(n) | Key::PodCidr(n) => vec![n],
            Key::Observation { gateway, observer } => vec![gateway, observer],
            Key::Path { from, to } => vec![from, to],
            Key::Status(_)
            | Key::Peer(_)
            | Key::Gateways(_)
            | Key::Settings
            | Key::Candidate(_)
            | Key::Service { .. }
            | Key::EndpointSlice { .. }
            | Key::NetworkPolicy { .. }
            | Key::Pod { .. }
            | Key::Namespace(_)
            | Key::ServiceIp(_)
            | Key::NodePort(_) => Vec::new(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Node(n) => write!(f, "{NODES}{n}"),
            Key::Peer(n) => write!(f, "{PEERS}{n}"),
            Key::Gateways(l) => write!(f, "{GATEWAYS}{l}"),
            Key::Status(n) => write!(f, "{STATUS}{n}"),
            Key::Settings => f.write_str(SETTINGS),
            Key::Observation { gateway, observer } => {
                write!(f, "{OBSERVATIONS}{gateway}/{observer}")
            }
            Key::Path { from, to } => write!(f, "{PATHS}{from}/{to}"),
            Key::PodCidr(n) => write!(f, "{POD_CIDRS}{n}"),
            Key::Candidate(lease) => write!(f, "{ELECTION}{lease:x}"),
            Key::Service { namespace, name } => write!(f, "{SERVICES}{namespace}/{name}"),
            Key::EndpointSlice { namespace, name } => {
                write!(f, "{ENDPOINT_SLICES}{namespace}/{name}")
            }
            Key::NetworkPolicy { namespace, name } => {
                write!(f, "{NETWORK_POLICIES}{namespace}/{name}")
            }
            Key::Pod { namespace, name } => write!(f, "{PODS}{namespace}/{name}"),
            Key::Namespace(name) => write!(f, "{NAMESPACES}{name}"),
            Key::ServiceIp(ip) => write!(f, "{SERVICE_IPS}{ip}"),
            Key::NodePort(port) => write!(f, "{NODE_PORTS}{port}"),
        }
    }
}

pub fn node(name: &str) -> String {
    Key::Node(name.into()).to_string()
}
pub fn peer(name: &str) -> String {
    Key::Peer(name.into()).to_string()
}
pub fn gateways(location: &str) -> String {
    Key::Gateways(location.into()).to_string()
}
pub fn status(node: &str) -> String {
    Key::Status(node.into()).to_string()
}
pub fn observation(gateway: &str, observer: &str) -> String {
    Key::Observation {
        gateway: gateway.into(),
        observer: observer.into(),
    }
    .to_string()
}
pub fn path(from: &str, to: &str) -> String {
    Key::Path {
        from: from.into(),
        to: to.into(),
    }
    .to_string()
}
pub fn pod_cidr(node: &str) -> String {
    Key::PodCidr(node.into()).to_string()
}
pub fn candidate(lease: u64) -> String {
    Key::Candidate(lease).to_string()
}
pub fn service(namespace: &str, name: &str) -> String {
    Key::Service {
        namespace: namespace.into(),
        name: name.into(),
    }
    .to_string()
}
pub fn endpoint_slice(namespace: &str, name: &str) -> String {
    Key::EndpointSlice {
        namespace: namespace.into(),
        name: name.into(),
    }
    .to_string()
}
pub fn network_policy(namespace: &str, name: &str) -> String {
    Key::NetworkPolicy {
        namespace: namespace.into(),
        name: name.into(),
    }
    .to_string()
}
pub fn pod(namespace: &str, name: &str) -> String {
    Key::Pod {
        namespace: namespace.into(),
        name: name.into(),
    }
    .to_string()
}
pub fn namespace(name: &str) -> String {
    Key::Namespace(name.into()).to_string()
}
pub fn service_ip(ip: IpAddr) -> String {
    Key::ServiceIp(ip).to_string()
}
pub fn node_port(port: u16) -> String {
    Key::NodePort(port).to_string()
}
/// The prefix that lists one namespace's objects under `kind_prefix` (`SERVICES`,
/// `ENDPOINT_SLICES`), or every namespace's.
pub fn in_namespace(kind_prefix: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{kind_prefix}{ns}/"),
        None => kind_prefix.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reads_back_as_written() {
        let all = [
            Key::Node("a1".into()),
            Key::Peer("laptop".into()),
            Key::Gateways("site-a".into()),
            Key::Status("a1".into()),
            Key::Settings,
            Key::Observation {
                gateway: "a1".into(),
                observer: "b2".into(),
            },
            Key::Path {
                from: "a1".into(),
                to: "b1".into(),
            },
            Key::PodCidr("a3".into()),
            Key::Candidate(0x694d_8a2f_01c3),
            Key::Service {
                namespace: "default".into(),
                name: "web".into(),
            },
            Key::EndpointSlice {
                namespace: "kube-system".into(),
                name: "kube-dns-x7k2p".into(),
            },
            Key::NetworkPolicy {
                namespace: "default".into(),
                name: "deny-all".into(),
            },
            Key::Pod {
                namespace: "shop".into(),
                name: "db-0".into(),
            },
            Key::Namespace("shop".into()),
            Key::ServiceIp("10.96.0.10".parse().unwrap()),
            Key::ServiceIp("fd00:10:96::a".parse().unwrap()),
            Key::NodePort(30080),
        ];
        for key in all {
            assert_eq!(Key::parse(&key.to_string()), Some(key.clone()), "{key}");
        }
        assert_eq!(candidate(0xabc), "election/abc");
        assert_eq!(observation("g", "o"), "observations/g/o");
        assert_eq!(service("default", "web"), "services/default/web");
        assert_eq!(endpoint_slice("ns", "s"), "endpointslices/ns/s");
        assert_eq!(service_ip("fd00::1".parse().unwrap()), "serviceips/fd00::1");
        assert_eq!(node_port(30000), "nodeports/30000");
        assert_eq!(in_namespace(SERVICES, Some("default")), "services/default/");
        assert_eq!(in_namespace(SERVICES, None), "services/");
    }

    #[test]
    fn keys_outside_the_layout_are_not_trellis_keys() {
        for other in [
            "",
            "nodes/",
            "nodes/a/b",
            "observations/a1",
            "observations/a1/",
            "paths//b1",
            "election/not-hex",
            "settings/x",
            "services/default",
            "services/default/",
            "services/a/b/c",
            "endpointslices//s",
            "serviceips/10.96.0.256",
            "serviceips/fd00:0::1",
            "nodeports/0",
            "nodeports/030080",
            "nodeports/65536",
            "kube-system/thing",
            "unrelated",
        ] {
            assert_eq!(Key::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn records_belong_to_the_nodes_they_name() {
        let owners = |k: &str| Key::parse(k).unwrap().owners().join(",");
        assert_eq!(owners("nodes/a1"), "a1");
        assert_eq!(owners("observations/g1/o1"), "g1,o1");
        assert_eq!(owners("paths/a1/b1"), "a1,b1");
        assert_eq!(owners("settings"), "");
        assert_eq!(owners("peers/laptop"), "");
        assert_eq!(
            owners("services/default/a1"),
            "",
            "not a node's, whatever its name"
        );
        assert_eq!(
            owners("status/a1"),
            "",
            "a status goes with its agent's lease"
        );
    }
}
