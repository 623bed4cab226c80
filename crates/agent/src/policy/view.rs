//! The policies, pods and namespaces network policy knows, kept from the store's updates
//! and, for this node's pods, from the CNI plugin's attachments ([`super::local`]).
//! Records that fail to decode or validate are left out (their previous version too) and
//! reported by key, never guessed at.

use super::local::LocalPods;
use crate::proxy::source::Update;
use std::collections::{BTreeMap, BTreeSet};
use trellis_model::keys::{Key, NAMESPACES, NETWORK_POLICIES, PODS};
use trellis_model::{Namespace, NamespaceObject, NetworkPolicy, Pod};
use trellis_policy::Cluster;
use trellis_store::{Event, KeyValue};

/// The prefixes network policy reads.
pub const PREFIXES: [&str; 3] = [NETWORK_POLICIES, PODS, NAMESPACES];

#[derive(Default)]
pub struct PolicyView {
    policies: BTreeMap<String, NetworkPolicy>,
    pods: BTreeMap<String, Pod>,
    namespaces: BTreeMap<String, Namespace>,
    listed: BTreeSet<&'static str>,
    rejected: BTreeMap<String, String>,
    /// This node, and its pods as the CNI plugin made them (`None`: not read yet, or not
    /// followed at all when `node` is `None`).
    node: Option<String>,
    local: Option<LocalPods>,
    /// Whether this node's pods take their labels from the store alone (Kubernetes: the
    /// runtime does not hand the plugin labels): a pod the store does not know yet is not
    /// a pod the plan can judge, so it stays unknown (refused) until it does.
    labels_from_store: bool,
}

impl PolicyView {
    /// Whether every prefix has been listed: before that, a pod could look unselected (an
    /// allow nobody meant) or a peer missing from a set (a deny nobody meant).
    pub fn is_synced(&self) -> bool {
        PREFIXES.iter().all(|p| self.listed.contains(p))
            && (self.node.is_none() || self.local.is_some())
    }

    /// A view that takes this node's pods from the CNI plugin's attachments, with their
    /// labels from the store when `labels_from_store`.
    pub fn with_local_pods(node: &str, labels_from_store: bool) -> PolicyView {
        PolicyView {
            node: Some(node.to_string()),
            labels_from_store,
            ..PolicyView::default()
        }
    }

    /// Takes in this node's pods; true when they changed.
    pub fn set_local(&mut self, pods: LocalPods) -> bool {
        let changed = self.local.as_ref() != Some(&pods);
        self.local = Some(pods);
        changed
    }

    pub fn rejected(&self) -> &BTreeMap<String, String> {
        &self.rejected
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// Takes in an update; true when it changed anything.
    pub fn apply(&mut self, update: Update) -> bool {
        let mut changed = false;
        match update {
            Update::Snapshot { prefix, records } => {
                changed |= self.listed.insert(prefix);
                let present: BTreeSet<&str> = records.iter().map(|kv| kv.key.as_str()).collect();
                let stale: Vec<String> = (self.keys(prefix))
                    .filter(|k| !present.contains(k.as_str()))
                    .collect();
                for key in stale {
                    changed |= self.remove(&key);
                }
                self.rejected
                    .retain(|k, _| !k.starts_with(prefix) || present.contains(k.as_str()));
                for kv in &records {
                    changed |= self.put(kv);
                }
            }
            Update::Changes(events) => {
                for event in &events {
                    changed |= match event {
                        Event::Put(kv) => self.put(kv),
                        Event::Delete { key, .. } => self.remove(key),
                    };
                }
            }
        }
        changed
    }

    fn keys(&self, prefix: &str) -> Box<dyn Iterator<Item = String> + '_> {
        match prefix {
            NETWORK_POLICIES => Box::new(self.policies.keys().cloned()),
            PODS => Box::new(self.pods.keys().cloned()),
            NAMESPACES => Box::new(self.namespaces.keys().cloned()),
            _ => Box::new(std::iter::empty()),
        }
    }

    fn put(&mut self, kv: &KeyValue) -> bool {
        let key = kv.key.clone();
        let outcome = match Key::parse(&kv.key) {
            Some(Key::NetworkPolicy { namespace, name }) => {
                decode(&kv.value, &format!("networkpolicy {namespace}/{name}")).map(
                    |p: NetworkPolicy| {
                        (p.metadata.namespace == namespace && p.metadata.name == name)
                            .then(|| self.policies.insert(key.clone(), p.clone()) != Some(p))
                    },
                )
            }
            Some(Key::Pod { namespace, name }) => {
                decode(&kv.value, &format!("pod {namespace}/{name}")).map(|p: Pod| {
                    (p.namespace == namespace && p.name == name)
                        .then(|| self.pods.insert(key.clone(), p.clone()) != Some(p))
                })
            }
            Some(Key::Namespace(name)) => {
                decode(&kv.value, &format!("namespace {name}")).map(|o: NamespaceObject| {
                    let n = o.namespace();
                    (n.name == name)
                        .then(|| self.namespaces.insert(key.clone(), n.clone()) != Some(n))
                })
            }
            _ => return false,
        };
        match outcome {
            Ok(Some(changed)) => {
                self.rejected.remove(&key);
                changed
            }
            Ok(None) => {
                self.reject(&key, "its name or namespace differs from its key".into());
                self.remove(&key)
            }
            Err(why) => {
                self.reject(&key, why);
                self.remove(&key)
            }
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        self.policies.remove(key).is_some()
            | self.pods.remove(key).is_some()
            | self.namespaces.remove(key).is_some()
    }

    fn reject(&mut self, key: &str, why: String) {
        if self.rejected.get(key) != Some(&why) {
            tracing::warn!(key, "network policy: record left out: {why}");
        }
        self.rejected.insert(key.to_string(), why);
    }

    /// The cluster as the planner reads it, and every pod. This node's attachments are
    /// the truth about its addresses: a store record of this node that shares an address
    /// with another pod's attachment is a pod that went (its address already serves the
    /// next one) and is left out. A store record of the same pod lends what the plugin
    /// cannot know: labels (on Kubernetes, the API's) and named ports. Pods of this node
    /// the attachments do not know (another CNI made them) are taken from the store.
    pub fn cluster(&self) -> (Cluster, Vec<Pod>) {
        let cluster = Cluster::new(
            self.namespaces.values().cloned(),
            self.policies.values().cloned(),
        );
        let (Some(node), Some(local)) = (&self.node, &self.local) else {
            return (cluster, self.pods.values().cloned().collect());
        };
        let attached: BTreeSet<std::net::IpAddr> =
            local.values().flat_map(|p| p.ips.iter().copied()).collect();
        let mut pods: Vec<Pod> = (self.pods.iter())
            .filter(|(key, p)| {
                &p.node != node
                    || (!local.contains_key(&key[PODS.len()..])
                        && !p.ips.iter().any(|ip| attached.contains(ip)))
            })
            .map(|(_, p)| p.clone())
            .collect();
        for (key, pod) in local {
            let mut pod = pod.clone();
            match self.pods.get(&format!("{PODS}{key}")) {
                Some(known) => {
                    if pod.labels.is_empty() {
                        pod.labels = known.labels.clone();
                    }
                    pod.ports = known.ports.clone();
                }
                None if self.labels_from_store => continue,
                None => {}
            }
            pods.push(pod);
        }
        (cluster, pods)
    }
}

fn decode<T: serde::de::DeserializeOwned + trellis_model::Validate>(
    value: &[u8],
    what: &str,
) -> Result<T, String> {
    trellis_model::decode::<T>(what, value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: serde_json::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: serde_json::to_vec(&value).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        }
    }

    fn pod(ns: &str, name: &str) -> serde_json::Value {
        serde_json::json!({"namespace": ns, "name": name, "ips": ["10.244.1.2"], "node": "a1"})
    }

    #[test]
    fn nothing_is_planned_before_every_prefix_is_listed_and_bad_records_are_left_out() {
        let mut view = PolicyView::default();
        for prefix in [NETWORK_POLICIES, PODS] {
            view.apply(Update::Snapshot {
                prefix,
                records: Vec::new(),
            });
        }
        assert!(!view.is_synced());
        view.apply(Update::Snapshot {
            prefix: NAMESPACES,
            records: Vec::new(),
        });
        assert!(view.is_synced());

        assert!(view.apply(Update::Changes(vec![Event::Put(kv(
            "pods/shop/web",
            pod("shop", "web")
        ))])));
        assert_eq!(view.cluster().1.len(), 1);
        // The same record again changes nothing.
        assert!(!view.apply(Update::Changes(vec![Event::Put(kv(
            "pods/shop/web",
            pod("shop", "web")
        ))])));
        // A record under another pod's key is refused, and the old one goes with it.
        view.apply(Update::Changes(vec![Event::Put(kv(
            "pods/shop/web",
            pod("shop", "other"),
        ))]));
        assert!(view.cluster().1.is_empty());
        assert!(view.rejected()["pods/shop/web"].contains("differs"));
        // An invalid one names what is wrong.
        view.apply(Update::Changes(vec![Event::Put(kv(
            "pods/shop/db",
            serde_json::json!({"namespace": "shop", "name": "db", "ips": ["nope"], "node": "a1"}),
        ))]));
        assert!(view.rejected().contains_key("pods/shop/db"));
        // A snapshot without it forgets the rejection.
        view.apply(Update::Snapshot {
            prefix: PODS,
            records: Vec::new(),
        });
        assert!(view.rejected().is_empty());
    }

    #[test]
    fn attachments_are_the_truth_about_this_nodes_addresses_and_the_store_lends_labels() {
        let mut view = PolicyView::with_local_pods("a1", false);
        for prefix in PREFIXES {
            view.apply(Update::Snapshot {
                prefix,
                records: Vec::new(),
            });
        }
        assert!(!view.is_synced(), "this node's pods are not read yet");
        let mut new = pod("shop", "new");
        new["labels"] = serde_json::json!({"app": "web"});
        new["ports"] = serde_json::json!([{"name": "http", "port": 80}]);
        let mut remote = pod("shop", "far");
        remote["node"] = serde_json::json!("b1");
        remote["ips"] = serde_json::json!(["10.244.2.2"]);
        view.apply(Update::Changes(vec![
            // A pod that went, whose address (10.244.1.2) now serves `new`.
            Event::Put(kv("pods/shop/old", pod("shop", "old"))),
            Event::Put(kv("pods/shop/new", new)),
            Event::Put(kv("pods/shop/far", remote)),
            // A pod of this node some other CNI made.
            Event::Put(kv("pods/shop/other-cni", {
                let mut p = pod("shop", "other-cni");
                p["ips"] = serde_json::json!(["10.88.0.5"]);
                p
            })),
        ]));
        let attached: trellis_model::Pod = serde_json::from_value(serde_json::json!({
            "namespace": "shop", "name": "new", "ips": ["10.244.1.2"], "node": "a1"}))
        .unwrap();
        assert!(view.set_local([("shop/new".to_string(), attached)].into()));
        assert!(view.is_synced());
        let (_, pods) = view.cluster();
        let names: BTreeSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["far", "new", "other-cni"].into());
        let new = pods.iter().find(|p| p.name == "new").unwrap();
        assert_eq!(new.labels["app"], "web");
        assert_eq!(new.ports.len(), 1);
    }
}
