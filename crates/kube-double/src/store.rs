//! Storage: every object as JSON keyed by (group, resource, namespace, name), one global
//! resource version counter, and the writes with their preconditions. Every write publishes
//! an event to the watch hub under the same lock, so versions and events are in one order.
//!
//! Custom resources are stored once per group and resource, whatever version they are
//! written or read in (a CRD's `conversion: None`): only `apiVersion` changes.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::clock;
use crate::resources::{CRD_GROUP, CRD_RESOURCE, Registry, ResourceDef};
use crate::select::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::watch::{Event, EventType, Hub};

type Key = (String, String, String, String);

pub struct State {
    pub registry: Registry,
    pub hub: Hub,
    objects: BTreeMap<Key, Value>,
    rv: u64,
    uid_seq: u64,
    ip_seq: u32,
    seed: u64,
}

/// Preconditions of a write or a deletion.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub resource_version: Option<String>,
    pub uid: Option<String>,
}

fn key(def: &ResourceDef, namespace: &str, name: &str) -> Key {
    (
        def.group.clone(),
        def.resource.clone(),
        namespace.to_string(),
        name.to_string(),
    )
}

/// The object as served in `def`'s version: with its `apiVersion` and `kind`.
pub fn present(def: &ResourceDef, object: &Value) -> Value {
    let mut o = object.clone();
    o["apiVersion"] = json!(def.api_version());
    o["kind"] = json!(def.kind);
    o
}

fn rv_of(object: &Value) -> &str {
    object["metadata"]["resourceVersion"].as_str().unwrap_or("")
}

/// Everything but `metadata` and `status`: a change to it bumps `metadata.generation`.
fn spec_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(k);
        }
    }
    o
}

impl State {
    pub fn new(history: usize) -> Self {
        let seed = clock::now_secs() as u64 ^ u64::from(std::process::id()) << 32;
        let mut state = State {
            registry: Registry::default(),
            hub: Hub::new(history),
            objects: BTreeMap::new(),
            rv: 0,
            uid_seq: 0,
            ip_seq: 10,
            seed,
        };
        let ns = state
            .registry
            .find("", "v1", "namespaces")
            .cloned()
            .expect("namespaces are built in");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            state
                .create(&ns, "", json!({"metadata": {"name": name}}))
                .expect("a fresh store takes the namespaces");
        }
        state
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compact(&mut self) {
        self.hub.compact(self.rv);
    }

    fn next_uid(&mut self) -> String {
        self.uid_seq += 1;
        let x = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.uid_seq;
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            x >> 32,
            (x >> 16) & 0xffff,
            x & 0xfff,
            (self.uid_seq >> 48) & 0xfff,
            self.uid_seq & 0xffff_ffff_ffff
        )
    }

    fn publish(
        &mut self,
        kind: EventType,
        def: &ResourceDef,
        namespace: &str,
        object: Value,
        prev: Option<Value>,
    ) {
        self.hub.publish(Event {
            rv: self.rv,
            kind,
            group: def.group.clone(),
            resource: def.resource.clone(),
            namespace: namespace.to_string(),
            object,
            prev,
        });
    }

    pub fn get(&self, def: &ResourceDef, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&key(def, namespace, name))
            .map(|o| present(def, o))
            .ok_or_else(|| ApiError::not_found(&def.group, &def.resource, name))
    }

    /// The objects of a resource, in one namespace or (`None`) all, that match the selectors.
    pub fn list(
        &self,
        def: &ResourceDef,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        let from = (
            def.group.clone(),
            def.resource.clone(),
            String::new(),
            String::new(),
        );
        self.objects
            .range(from..)
            .take_while(|((g, r, _, _), _)| *g == def.group && *r == def.resource)
            .filter(|((_, _, ns, _), _)| namespace.is_none_or(|n| n == ns))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| present(def, o))
            .collect()
    }

    pub fn create(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(kind) = object["kind"].as_str()
            && kind != def.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind {kind} does not match the resource {}",
                def.resource
            )));
        }
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let namespace = self.check_namespace(def, namespace, &mut object)?;
        let meta = &mut object["metadata"];
        if meta["name"].as_str().is_none_or(str::is_empty) {
            let Some(prefix) = meta["generateName"].as_str() else {
                return Err(ApiError::invalid("name or generateName is required"));
            };
            meta["name"] = json!(format!("{prefix}{}", &self.next_uid()[..5]));
        }
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let k = key(def, &namespace, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(&def.group, &def.resource, &name));
        }
        self.defaults_on_create(def, &mut object)?;
        self.rv += 1;
        let uid = self.next_uid();
        let meta = &mut object["metadata"];
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(self.rv.to_string());
        meta["creationTimestamp"] = json!(clock::rfc3339(clock::now_secs()));
        meta["generation"] = json!(1);
        let object = present(def, &object);
        self.objects.insert(k, object.clone());
        self.publish(EventType::Added, def, &namespace, object.clone(), None);
        Ok(object)
    }

    fn check_namespace(
        &self,
        def: &ResourceDef,
        namespace: &str,
        object: &mut Value,
    ) -> Result<String, ApiError> {
        let meta = &mut object["metadata"];
        if !def.namespaced {
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
            return Ok(String::new());
        }
        match meta["namespace"].as_str() {
            Some(ns) if !ns.is_empty() && ns != namespace => Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            )),
            _ => {
                meta["namespace"] = json!(namespace);
                Ok(namespace.to_string())
            }
        }
    }

    /// What the real API sets on create for the kinds the double knows.
    fn defaults_on_create(
        &mut self,
        def: &ResourceDef,
        object: &mut Value,
    ) -> Result<(), ApiError> {
        if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        if def.custom
            && def.status_subresource
            && let Some(m) = object.as_object_mut()
        {
            m.remove("status");
        }
        match (def.group.as_str(), def.resource.as_str()) {
            ("", "namespaces") => object["status"] = json!({"phase": "Active"}),
            ("", "services") => self.default_service(object, None),
            (CRD_GROUP, CRD_RESOURCE) => {
                self.registry
                    .register_crd(object)
                    .map_err(ApiError::invalid)?;
                let names = object["spec"]["names"].clone();
                let stored: Vec<Value> = object["spec"]["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["storage"].as_bool() == Some(true))
                    .map(|v| v["name"].clone())
                    .collect();
                let now = clock::rfc3339(clock::now_secs());
                let condition = |t: &str, reason: &str| json!({"type": t, "status": "True", "reason": reason, "message": "", "lastTransitionTime": now});
                object["status"] = json!({
                    "acceptedNames": names,
                    "storedVersions": stored,
                    "conditions": [condition("NamesAccepted", "NoConflicts"), condition("Established", "InitialNamesAccepted")],
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// A service's defaults, on every write: type, ports' protocol and target port, and a
    /// cluster IP (allocated on create, kept on update).
    fn default_service(&mut self, object: &mut Value, old: Option<&Value>) {
        let spec = &mut object["spec"];
        if spec["type"].is_null() {
            spec["type"] = json!("ClusterIP");
        }
        if spec["clusterIP"].is_null() && spec["type"] != "ExternalName" {
            match old
                .map(|o| &o["spec"])
                .filter(|s| !s["clusterIP"].is_null())
            {
                Some(old) => {
                    spec["clusterIP"] = old["clusterIP"].clone();
                    spec["clusterIPs"] = old["clusterIPs"].clone();
                }
                None => {
                    let n = self.ip_seq;
                    self.ip_seq += 1;
                    spec["clusterIP"] = json!(format!("10.96.{}.{}", n / 256, n % 256));
                    spec["clusterIPs"] = json!([spec["clusterIP"]]);
                }
            }
        }
        if let Some(ports) = spec["ports"].as_array_mut() {
            for p in ports {
                if p["protocol"].is_null() {
                    p["protocol"] = json!("TCP");
                }
                if p["targetPort"].is_null() {
                    p["targetPort"] = p["port"].clone();
                }
            }
        }
    }

    /// A `PUT` (of the object, or with `status_only` of its `status` subresource).
    pub fn update(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        mut new: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let k = key(def, namespace, name);
        let old = self
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.group, &def.resource, name))?;
        if !new.is_object() || !new["metadata"].is_object() {
            return Err(ApiError::bad_request(
                "the body must be a JSON object with metadata",
            ));
        }
        match new["metadata"]["name"].as_str() {
            Some(n) if n != name => {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            _ => new["metadata"]["name"] = json!(name),
        }
        self.check_namespace(def, namespace, &mut new)?;
        let wanted = rv_of(&new);
        if !wanted.is_empty() && wanted != rv_of(&old) {
            return Err(ApiError::conflict(
                &def.group,
                &def.resource,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut result = if status_only {
            let mut r = old.clone();
            match new.get_mut("status").map(Value::take) {
                Some(status) if !status.is_null() => r["status"] = status,
                _ => {
                    r.as_object_mut().map(|m| m.remove("status"));
                }
            }
            r
        } else {
            if def.status_subresource {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        new.as_object_mut().map(|m| m.remove("status"));
                    }
                }
            }
            new
        };
        // Fields only the server sets.
        for field in [
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
        ] {
            match old["metadata"].get(field) {
                Some(v) => result["metadata"][field] = v.clone(),
                None => {
                    result["metadata"].as_object_mut().map(|m| m.remove(field));
                }
            }
        }
        if def.group.is_empty() && def.resource == "services" && !status_only {
            self.default_service(&mut result, Some(&old));
        }
        if spec_part(&result) != spec_part(&old) {
            result["metadata"]["generation"] =
                json!(old["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
        }
        let result = present(def, &result);
        if result == old {
            return Ok(old); // A no-op write changes nothing, not even the version.
        }
        if def.group == CRD_GROUP && def.resource == CRD_RESOURCE && !status_only {
            self.registry
                .register_crd(&result)
                .map_err(ApiError::invalid)?;
        }
        self.rv += 1;
        let mut result = result;
        result["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects.insert(k, result.clone());
        self.publish(
            EventType::Modified,
            def,
            namespace,
            result.clone(),
            Some(old),
        );
        Ok(result)
    }

    pub fn delete(
        &mut self,
        def: &ResourceDef,
        namespace: &str,
        name: &str,
        pre: &Preconditions,
    ) -> Result<Value, ApiError> {
        let k = key(def, namespace, name);
        let old = self
            .objects
            .get(&k)
            .ok_or_else(|| ApiError::not_found(&def.group, &def.resource, name))?;
        if let Some(rv) = &pre.resource_version
            && rv != rv_of(old)
        {
            let why = format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                rv_of(old)
            );
            return Err(ApiError::conflict(&def.group, &def.resource, name, &why));
        }
        let uid = old["metadata"]["uid"].as_str().unwrap_or("");
        if let Some(want) = &pre.uid
            && want != uid
        {
            let why = format!(
                "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
            );
            return Err(ApiError::conflict(&def.group, &def.resource, name, &why));
        }
        let mut object = self.objects.remove(&k).unwrap_or_default();
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.publish(EventType::Deleted, def, namespace, object.clone(), None);
        if def.group == CRD_GROUP && def.resource == CRD_RESOURCE {
            self.delete_custom_resources(&object);
        }
        Ok(object)
    }

    /// A CRD's deletion deletes its resource and every object of it.
    fn delete_custom_resources(&mut self, crd: &Value) {
        let group = crd["spec"]["group"].as_str().unwrap_or("").to_string();
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let Some(def) = self
            .registry
            .all()
            .iter()
            .find(|d| d.custom && d.group == group && d.resource == plural)
            .cloned()
        else {
            return;
        };
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|(g, r, _, _)| *g == group && *r == plural)
            .cloned()
            .collect();
        for (_, _, ns, name) in keys {
            let _ = self.delete(&def, &ns, &name, &Preconditions::default());
        }
        self.registry.unregister(&group, &plural);
    }
}
