//! The store's key layout, relative to the store's prefix, as one type: [`Key`] is written
//! with [`Key::to_string`] and read with [`Key::parse`], so every part of Trellis (and every
//! backend: embedded, etcd, Kubernetes) agrees on the names, and no caller splits key strings
//! by hand.

use std::fmt;

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
            _ => None,
        }
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
            | Key::Candidate(_) => Vec::new(),
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
        ];
        for key in all {
            assert_eq!(Key::parse(&key.to_string()), Some(key.clone()), "{key}");
        }
        assert_eq!(candidate(0xabc), "election/abc");
        assert_eq!(observation("g", "o"), "observations/g/o");
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
            owners("status/a1"),
            "",
            "a status goes with its agent's lease"
        );
    }
}
