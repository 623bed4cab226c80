//! The cluster as NetworkPolicy sees it: pods and namespaces with their labels (the model's
//! records), and the policies, grouped by namespace.

use std::borrow::Cow;
use std::collections::BTreeMap;
use trellis_model::NetworkPolicy;
use trellis_model::network_policy::{PolicyPeer, PolicyType};
pub use trellis_model::{NamedPort, Namespace, Pod};

/// The label the API server gives every namespace: its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

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
            namespaces: (namespaces.into_iter())
                .map(|mut n| {
                    n.labels
                        .insert(NAMESPACE_NAME_LABEL.to_string(), n.name.clone());
                    (n.name.clone(), n)
                })
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

    /// The policies of `pod`'s namespace that select it for `direction`: those that isolate
    /// it.
    pub fn isolating<'a>(
        &'a self,
        pod: &'a Pod,
        direction: PolicyType,
    ) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        self.policies
            .get(&pod.namespace)
            .into_iter()
            .flat_map(|by_name| by_name.values())
            .filter(move |p| {
                p.spec.types().contains(&direction) && p.spec.pod_selector.matches(&pod.labels)
            })
    }

    /// Whether a selector peer of `policy` (podSelector, namespaceSelector or both) picks
    /// `pod`: podSelector alone means pods of the policy's own namespace.
    pub fn selects(&self, policy: &NetworkPolicy, peer: &PolicyPeer, pod: &Pod) -> bool {
        self.selects_namespace(policy, peer, &pod.namespace)
            && peer
                .pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(&pod.labels))
    }

    /// Whether a selector peer of `policy` picks pods of namespace `name` (their own
    /// labels aside).
    pub fn selects_namespace(&self, policy: &NetworkPolicy, peer: &PolicyPeer, name: &str) -> bool {
        match &peer.namespace_selector {
            None => name == policy.metadata.namespace,
            Some(selector) => selector.matches(&self.namespace_labels(name)),
        }
    }

    /// A namespace's labels, with `kubernetes.io/metadata.name` set to its name as the API
    /// server always sets it (so a namespace is selectable by name on every store, listed
    /// or not).
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, BTreeMap<String, String>> {
        match self.namespaces.get(name) {
            Some(n) => Cow::Borrowed(&n.labels),
            None => Cow::Owned([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into()),
        }
    }
}
