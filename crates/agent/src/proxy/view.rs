//! The Services and EndpointSlices the proxy knows, and which services each store change
//! touches: a slice change dirties the service its label names (before and after the
//! change), a service change dirties itself. The proxy replans exactly those.

use super::source::Update;
use std::collections::{BTreeMap, BTreeSet};
use trellis_model::keys::{ENDPOINT_SLICES, Key, SERVICES};
use trellis_model::{EndpointSlice, Service};
use trellis_proxy::PortWithEndpoints;
use trellis_store::{Event, KeyValue};

/// `(namespace, name)` of a Service.
pub type ServiceKey = (String, String);

#[derive(Default)]
pub struct ServiceView {
    services: BTreeMap<ServiceKey, Service>,
    /// Slices by their own key, with the service their label names.
    slices: BTreeMap<ServiceKey, (ServiceKey, EndpointSlice)>,
    by_service: BTreeMap<ServiceKey, BTreeSet<ServiceKey>>,
    /// Prefixes listed at least once: nothing is programmed before both are.
    listed: BTreeSet<&'static str>,
    /// Records that failed to decode or validate, by store key, with the reason: they are
    /// left out (their previous version too) and reported, never guessed at.
    rejected: BTreeMap<String, String>,
}

impl ServiceView {
    /// Whether both services and slices have been listed: until then a service could look
    /// endpoint-less and be programmed to reject.
    pub fn is_synced(&self) -> bool {
        self.listed.contains(SERVICES) && self.listed.contains(ENDPOINT_SLICES)
    }

    pub fn rejected(&self) -> &BTreeMap<String, String> {
        &self.rejected
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Takes in an update; returns the services it touched.
    pub fn apply(&mut self, update: Update) -> BTreeSet<ServiceKey> {
        let mut touched = BTreeSet::new();
        match update {
            Update::Snapshot { prefix, records } => {
                self.listed.insert(prefix);
                let stale: Vec<String> = if prefix == SERVICES {
                    self.services
                        .keys()
                        .map(|(ns, n)| {
                            Key::Service {
                                namespace: ns.clone(),
                                name: n.clone(),
                            }
                            .to_string()
                        })
                        .collect()
                } else {
                    self.slices
                        .keys()
                        .map(|(ns, n)| {
                            Key::EndpointSlice {
                                namespace: ns.clone(),
                                name: n.clone(),
                            }
                            .to_string()
                        })
                        .collect()
                };
                let present: BTreeSet<&str> = records.iter().map(|kv| kv.key.as_str()).collect();
                for key in stale.iter().filter(|k| !present.contains(k.as_str())) {
                    self.remove(key, &mut touched);
                }
                self.rejected
                    .retain(|k, _| !k.starts_with(prefix) || present.contains(k.as_str()));
                for kv in &records {
                    self.put(kv, &mut touched);
                }
            }
            Update::Changes(events) => {
                for event in &events {
                    match event {
                        Event::Put(kv) => self.put(kv, &mut touched),
                        Event::Delete { key, .. } => self.remove(key, &mut touched),
                    }
                }
            }
        }
        touched
    }

    fn put(&mut self, kv: &KeyValue, touched: &mut BTreeSet<ServiceKey>) {
        match Key::parse(&kv.key) {
            Some(Key::Service { namespace, name }) => {
                let key = (namespace, name);
                touched.insert(key.clone());
                match trellis_model::decode::<Service>(
                    &format!("service {}/{}", key.0, key.1),
                    &kv.value,
                ) {
                    Ok(svc) => {
                        self.rejected.remove(&kv.key);
                        self.services.insert(key, svc);
                    }
                    Err(e) => {
                        self.reject(&kv.key, e.to_string());
                        self.services.remove(&key);
                    }
                }
            }
            Some(Key::EndpointSlice { namespace, name }) => {
                let key = (namespace.clone(), name);
                let decoded = trellis_model::decode::<EndpointSlice>(
                    &format!("endpointslice {}/{}", key.0, key.1),
                    &kv.value,
                );
                self.remove_slice(&key, touched);
                match decoded {
                    Ok(slice) => {
                        self.rejected.remove(&kv.key);
                        let Some(service) =
                            slice.service_name().map(|s| (namespace, s.to_string()))
                        else {
                            return;
                        };
                        touched.insert(service.clone());
                        self.by_service
                            .entry(service.clone())
                            .or_default()
                            .insert(key.clone());
                        self.slices.insert(key, (service, slice));
                    }
                    Err(e) => self.reject(&kv.key, e.to_string()),
                }
            }
            _ => {}
        }
    }

    fn remove(&mut self, key: &str, touched: &mut BTreeSet<ServiceKey>) {
        self.rejected.remove(key);
        match Key::parse(key) {
            Some(Key::Service { namespace, name }) => {
                let key = (namespace, name);
                self.services.remove(&key);
                touched.insert(key);
            }
            Some(Key::EndpointSlice { namespace, name }) => {
                self.remove_slice(&(namespace, name), touched);
            }
            _ => {}
        }
    }

    fn remove_slice(&mut self, key: &ServiceKey, touched: &mut BTreeSet<ServiceKey>) {
        if let Some((service, _)) = self.slices.remove(key) {
            if let Some(set) = self.by_service.get_mut(&service) {
                set.remove(key);
                if set.is_empty() {
                    self.by_service.remove(&service);
                }
            }
            touched.insert(service);
        }
    }

    fn reject(&mut self, key: &str, reason: String) {
        tracing::warn!(key, "store record left out of the service proxy: {reason}");
        self.rejected.insert(key.to_string(), reason);
    }

    /// The proxied ports of one service with their endpoints (none if it is gone).
    pub fn ports_of(&self, key: &ServiceKey) -> Vec<PortWithEndpoints> {
        let Some(svc) = self.services.get(key) else {
            return Vec::new();
        };
        let slices: Vec<&EndpointSlice> = self
            .by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k).map(|(_, s)| s))
            .collect();
        trellis_proxy::resolve::resolve_service(svc, &slices)
    }

    /// Every service key known.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(key: &str, value: serde_json::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: serde_json::to_vec(&value).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        }
    }

    fn service(name: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
    }

    fn slice(name: &str, service: &str, addr: &str) -> serde_json::Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": "shop",
                            "labels": {"kubernetes.io/service-name": service}},
               "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [addr]}]})
    }

    fn key(name: &str) -> ServiceKey {
        ("shop".into(), name.into())
    }

    #[test]
    fn nothing_counts_as_synced_before_both_prefixes_are_listed() {
        let mut view = ServiceView::default();
        view.apply(Update::Snapshot {
            prefix: SERVICES,
            records: vec![kv("services/shop/web", service("web"))],
        });
        assert!(!view.is_synced());
        view.apply(Update::Snapshot {
            prefix: ENDPOINT_SLICES,
            records: vec![],
        });
        assert!(view.is_synced());
    }

    #[test]
    fn a_slice_change_touches_the_services_its_label_names_before_and_after() {
        let mut view = ServiceView::default();
        view.apply(Update::Snapshot {
            prefix: SERVICES,
            records: vec![
                kv("services/shop/web", service("web")),
                kv("services/shop/api", service("api")),
            ],
        });
        let touched = view.apply(Update::Snapshot {
            prefix: ENDPOINT_SLICES,
            records: vec![kv(
                "endpointslices/shop/web-1",
                slice("web-1", "web", "10.244.1.5"),
            )],
        });
        assert_eq!(touched, [key("web")].into());
        assert_eq!(view.ports_of(&key("web"))[0].1.len(), 1);

        let touched = view.apply(Update::Changes(vec![Event::Put(kv(
            "endpointslices/shop/web-1",
            slice("web-1", "api", "10.244.1.5"),
        ))]));
        assert_eq!(touched, [key("api"), key("web")].into(), "relabelled: both");
        assert!(view.ports_of(&key("web"))[0].1.is_empty());
        assert_eq!(view.ports_of(&key("api"))[0].1.len(), 1);

        let touched = view.apply(Update::Changes(vec![Event::Delete {
            key: "endpointslices/shop/web-1".into(),
            revision: 3,
        }]));
        assert_eq!(touched, [key("api")].into());
    }

    #[test]
    fn a_bad_record_is_left_out_and_reported_and_a_relist_forgets_what_is_gone() {
        let mut view = ServiceView::default();
        view.apply(Update::Snapshot {
            prefix: SERVICES,
            records: vec![
                kv("services/shop/web", service("web")),
                kv("services/shop/bad", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "shop"}, "spec": {"ports": [{"port": 0}]}})),
            ],
        });
        assert_eq!(view.service_count(), 1);
        assert!(
            view.rejected()["services/shop/bad"].contains("port"),
            "{:?}",
            view.rejected()
        );

        let touched = view.apply(Update::Snapshot {
            prefix: SERVICES,
            records: vec![],
        });
        assert_eq!(touched, [key("web")].into());
        assert_eq!(view.service_count(), 0);
        assert!(view.rejected().is_empty());
    }
}
