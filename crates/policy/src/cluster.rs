//! The cluster as NetworkPolicy sees it: pods and namespaces with their labels, and the
//! policies, grouped by namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use trellis_model::{NetworkPolicy, Protocol};

/// A pod: where it is, what it is called by selectors, and its named container ports
/// (what a policy's `port: http` means for traffic *to* it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// One address per family, as the CNI plugin gave them.
    pub ips: Vec<IpAddr>,
    /// The node it runs on (whose own traffic to it no policy blocks).
    pub node: String,
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Namespaces and policies, as the evaluation looks them up.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    /// By namespace, then name.
    pub policies: BTreeMap<String, BTreeMap<String, NetworkPolicy>>,
}

impl Cluster {
    pub fn new(
        namespaces: impl IntoIterator<Item = Namespace>,
        policies: impl IntoIterator<Item = NetworkPolicy>,
    ) -> Cluster {
        let mut cluster = Cluster {
            namespaces: namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
            policies: BTreeMap::new(),
        };
        for p in policies {
            cluster
                .policies
                .entry(p.metadata.namespace.clone())
                .or_default()
                .insert(p.metadata.name.clone(), p);
        }
        cluster
    }

    /// A namespace's labels; a namespace the cluster does not list has none.
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(name)
            .map(|n| n.labels.clone())
            .unwrap_or_default()
    }
}

impl Pod {
    /// The port a policy names, on this pod, for `protocol`.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}
