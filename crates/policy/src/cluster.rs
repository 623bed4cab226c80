//! The cluster as NetworkPolicy sees it: pods and namespaces with their labels (the model's
//! records), and the policies, grouped by namespace.

use std::collections::BTreeMap;
use trellis_model::NetworkPolicy;
pub use trellis_model::{NamedPort, Namespace, Pod};

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
