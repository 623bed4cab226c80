//! Kubernetes objects as `kubectl apply` reads them: a stream of documents (YAML or JSON,
//! already parsed into JSON values by the caller), each one object or a `kind: List` of
//! them, dispatched on `apiVersion` and `kind`. Every refusal names the document, the
//! object when known, the field path and the value.

use crate::endpoint_slice::{ENDPOINT_SLICE_API_VERSION, ENDPOINT_SLICE_KIND, EndpointSlice};
use crate::meta::ObjectMeta;
use crate::network_policy::{NETWORK_POLICY_API_VERSION, NETWORK_POLICY_KIND, NetworkPolicy};
use crate::pod::{NAMESPACE_API_VERSION, NAMESPACE_KIND, NamespaceObject};
use crate::service::{SERVICE_API_VERSION, SERVICE_KIND, Service};
use crate::{InvalidField, Validate, keys};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// The kinds Trellis stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    NetworkPolicy,
    /// Cluster-scoped: its objects have no namespace.
    Namespace,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
        Kind::Namespace,
    ];

    /// Whether its objects live in a namespace (all but Namespace).
    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// The kind a `kubectl` resource name means: `svc`, `service`, `services`,
    /// `endpointslice`, `endpointslices`, or with their API group.
    pub fn from_resource(name: &str) -> Option<Kind> {
        match name.to_ascii_lowercase().as_str() {
            "svc" | "service" | "services" => Some(Kind::Service),
            "endpointslice"
            | "endpointslices"
            | "endpointslice.discovery.k8s.io"
            | "endpointslices.discovery.k8s.io" => Some(Kind::EndpointSlice),
            "netpol"
            | "networkpolicy"
            | "networkpolicies"
            | "networkpolicy.networking.k8s.io"
            | "networkpolicies.networking.k8s.io" => Some(Kind::NetworkPolicy),
            "ns" | "namespace" | "namespaces" => Some(Kind::Namespace),
            _ => None,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service => SERVICE_API_VERSION,
            Kind::EndpointSlice => ENDPOINT_SLICE_API_VERSION,
            Kind::NetworkPolicy => NETWORK_POLICY_API_VERSION,
            Kind::Namespace => NAMESPACE_API_VERSION,
        }
    }

    /// The key prefix its objects live under.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Kind::Service => keys::SERVICES,
            Kind::EndpointSlice => keys::ENDPOINT_SLICES,
            Kind::NetworkPolicy => keys::NETWORK_POLICIES,
            Kind::Namespace => keys::NAMESPACES,
        }
    }

    pub fn key(self, namespace: &str, name: &str) -> String {
        match self {
            Kind::Service => keys::service(namespace, name),
            Kind::EndpointSlice => keys::endpoint_slice(namespace, name),
            Kind::NetworkPolicy => keys::network_policy(namespace, name),
            Kind::Namespace => keys::namespace(name),
        }
    }

    /// How `kubectl` names the kind in its messages (`service/web created`).
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::EndpointSlice => "endpointslice.discovery.k8s.io",
            Kind::NetworkPolicy => "networkpolicy.networking.k8s.io",
            Kind::Namespace => "namespace",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => SERVICE_KIND,
            Kind::EndpointSlice => ENDPOINT_SLICE_KIND,
            Kind::NetworkPolicy => NETWORK_POLICY_KIND,
            Kind::Namespace => NAMESPACE_KIND,
        })
    }
}

/// One object of a kind Trellis stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    NetworkPolicy(Box<NetworkPolicy>),
    Namespace(Box<NamespaceObject>),
}

impl Object {
    /// Decodes one object, checking `apiVersion` and `kind` first; a field that does not
    /// decode is named by its path, with its value.
    pub fn from_value(value: Value) -> Result<Object, InvalidField> {
        let text = |field: &str| value.get(field).and_then(Value::as_str).unwrap_or_default();
        let (api_version, kind) = (text("apiVersion").to_string(), text("kind").to_string());
        let kind = match kind.as_str() {
            SERVICE_KIND => Kind::Service,
            ENDPOINT_SLICE_KIND => Kind::EndpointSlice,
            NETWORK_POLICY_KIND => Kind::NetworkPolicy,
            NAMESPACE_KIND => Kind::Namespace,
            "" => return Err(InvalidField::new("kind", "", "required")),
            other => {
                return Err(InvalidField::new(
                    "kind",
                    other,
                    "not a kind Trellis stores (Service, EndpointSlice, NetworkPolicy, Namespace)",
                ));
            }
        };
        if api_version != kind.api_version() {
            return Err(InvalidField::new(
                "apiVersion",
                api_version,
                format!("{kind} is {}", kind.api_version()),
            ));
        }
        Ok(match kind {
            Kind::Service => Object::Service(Box::new(decode(value)?)),
            Kind::EndpointSlice => Object::EndpointSlice(Box::new(decode(value)?)),
            Kind::NetworkPolicy => Object::NetworkPolicy(Box::new(decode(value)?)),
            Kind::Namespace => Object::Namespace(Box::new(decode(value)?)),
        })
    }

    pub fn to_value(&self) -> Value {
        match self {
            Object::Service(s) => serde_json::to_value(s),
            Object::EndpointSlice(s) => serde_json::to_value(s),
            Object::NetworkPolicy(p) => serde_json::to_value(p),
            Object::Namespace(n) => serde_json::to_value(n),
        }
        .expect("objects serialise")
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
            Object::Namespace(_) => Kind::Namespace,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Service(s) => &s.metadata,
            Object::EndpointSlice(s) => &s.metadata,
            Object::NetworkPolicy(p) => &p.metadata,
            Object::Namespace(n) => &n.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Service(s) => &mut s.metadata,
            Object::EndpointSlice(s) => &mut s.metadata,
            Object::NetworkPolicy(p) => &mut p.metadata,
            Object::Namespace(n) => &mut n.metadata,
        }
    }

    pub fn key(&self) -> String {
        let m = self.metadata();
        self.kind().key(&m.namespace, &m.name)
    }

    /// The API server's defaulting; Services' allocated values come later.
    pub fn set_defaults(&mut self) {
        if let Object::Service(s) = self {
            s.set_defaults();
        }
    }
}

impl Validate for Object {
    fn validate(&self) -> Result<(), InvalidField> {
        match self {
            Object::Service(s) => s.validate(),
            Object::EndpointSlice(s) => s.validate(),
            Object::NetworkPolicy(p) => p.validate(),
            Object::Namespace(n) => n.validate(),
        }
    }
}

/// `Service default/web`, as objects are named in messages.
impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.metadata();
        if self.kind().is_namespaced() {
            write!(f, "{} {}/{}", self.kind(), m.namespace, m.name)
        } else {
            write!(f, "{} {}", self.kind(), m.name)
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, InvalidField> {
    let original = value.clone();
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = explain(&e.inner().to_string());
        let at = value_at(&original, e.path());
        let value = match (at, unknown_field(&e.inner().to_string())) {
            (Some(v), _) => render(v),
            (None, name) => name.unwrap_or_default(),
        };
        InvalidField::new(path, value, reason)
    })
}

/// serde's messages, made shorter and closer to the API server's.
fn explain(message: &str) -> String {
    if let Some(name) = unknown_field(message) {
        let suggestion = expected(message)
            .into_iter()
            .find(|known| close(known, &name))
            .map(|known| format!("; did you mean {known}?"))
            .unwrap_or_default();
        return format!("unknown field (refused as kubectl's strict validation does){suggestion}");
    }
    if message.contains("did not match any variant of untagged enum IntOrString") {
        return "must be a port number or a port name".to_string();
    }
    // Rust's type names mean nothing to someone writing YAML.
    message
        .replace("expected i32", "expected an integer")
        .replace("expected i64", "expected an integer")
        .replace("expected a boolean", "expected true or false")
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn expected(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("expected one of ") else {
        return message
            .split_once("expected `")
            .and_then(|(_, r)| r.split_once('`'))
            .map(|(one, _)| vec![one.to_string()])
            .unwrap_or_default();
    };
    list.split(", ")
        .map(|s| s.trim_matches('`').to_string())
        .collect()
}

/// Same but for case, or one edit apart: a likely typo.
fn close(known: &str, typed: &str) -> bool {
    if known.eq_ignore_ascii_case(typed) {
        return true;
    }
    let (a, b): (Vec<char>, Vec<char>) = (known.chars().collect(), typed.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (prev[j] + 1).min(row[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = row;
    }
    prev[b.len()] <= 2
}

fn value_at<'v>(root: &'v Value, path: &serde_path_to_error::Path) -> Option<&'v Value> {
    use serde_path_to_error::Segment;
    path.iter().try_fold(root, |v, segment| match segment {
        Segment::Seq { index } => v.get(index),
        Segment::Map { key } => v.get(key),
        Segment::Enum { .. } | Segment::Unknown => Some(v),
    })
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One object of a manifest, with where it came from (`web.yaml: document 2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub origin: String,
    pub object: Object,
}

/// Decodes, defaults and validates every document before anything is written: a `List`
/// gives its items, an empty document nothing. Refuses the same object twice, as one
/// write could not hold both. `docs` pairs each value with its origin.
pub fn documents(docs: Vec<(String, Value)>) -> Result<Vec<Document>, InvalidField> {
    let mut out = Vec::new();
    for (origin, value) in docs {
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let Some(Value::Array(items)) = value.get("items").cloned() else {
                return Err(InvalidField::new("items", "", "a List needs items").within(origin));
            };
            for (i, item) in items.into_iter().enumerate() {
                out.push(document(format!("{origin}, item {}", i + 1), item)?);
            }
        } else {
            out.push(document(origin, value)?);
        }
    }
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for d in &out {
        if let Some(first) = seen.insert(d.object.key(), &d.origin) {
            return Err(InvalidField::new(
                "metadata.name",
                &d.object.metadata().name,
                format!("{} is also {first}", d.object),
            )
            .within(&d.origin));
        }
    }
    Ok(out)
}

fn document(origin: String, value: Value) -> Result<Document, InvalidField> {
    let named = describe(&value);
    let context = match &named {
        Some(named) => format!("{origin} ({named})"),
        None => origin.clone(),
    };
    let mut object = Object::from_value(value).map_err(|e| e.within(&context))?;
    object.set_defaults();
    object.validate().map_err(|e| e.within(&context))?;
    Ok(Document { origin, object })
}

/// `Service default/web` from a value that may not decode, for naming it in errors.
fn describe(value: &Value) -> Option<String> {
    let kind = value.get("kind")?.as_str()?;
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(crate::DEFAULT_NAMESPACE);
    Some(format!("{kind} {namespace}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn web() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80},
                {"name": "admin", "port": 81, "targetPort": "admin"}
            ]}
        })
    }

    fn slice() -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.10"]}],
            "ports": [{"name": "http", "port": 8080}]
        })
    }

    fn error(docs: Vec<Value>) -> InvalidField {
        let docs = docs
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("document {}", i + 1), v))
            .collect();
        documents(docs).unwrap_err()
    }

    #[test]
    fn lists_and_documents_become_objects_in_order() {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [slice()]});
        let docs = documents(vec![
            ("document 1".into(), web()),
            ("document 2".into(), Value::Null),
            ("document 3".into(), list),
        ])
        .unwrap();
        let names: Vec<String> = docs
            .iter()
            .map(|d| format!("{}: {}", d.origin, d.object))
            .collect();
        assert_eq!(
            names,
            [
                "document 1: Service default/web",
                "document 3, item 1: EndpointSlice default/web-1"
            ]
        );
        let Object::Service(svc) = &docs[0].object else {
            panic!()
        };
        assert!(
            svc.spec.ports[0].target_port.is_some(),
            "defaulted before validation"
        );
    }

    #[test]
    fn refusals_name_document_object_field_and_value() {
        let mut bad = web();
        bad["spec"]["ports"][1]["targetPort"] = json!("Http!");
        let e = error(vec![slice(), bad]);
        assert_eq!(
            e.field,
            "document 2 (Service default/web): spec.ports[1].targetPort"
        );
        assert_eq!(e.value, "Http!");

        let mut typo = web();
        typo["spec"]["clusterIp"] = json!("None");
        let e = error(vec![typo]);
        assert_eq!(e.field, "document 1 (Service default/web): spec.clusterIp");
        assert_eq!(e.value, "None");
        assert!(e.reason.contains("did you mean clusterIP?"), "{e}");

        let mut wrong_type = web();
        wrong_type["spec"]["ports"][0]["port"] = json!("eighty");
        let e = error(vec![wrong_type]);
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            (
                "document 1 (Service default/web): spec.ports[0].port",
                "eighty"
            )
        );
        assert!(e.reason.contains("expected an integer"), "{e}");

        let mut bad_enum = web();
        bad_enum["spec"]["type"] = json!("Nodeport");
        let e = error(vec![bad_enum]);
        assert_eq!(e.value, "Nodeport", "{e}");

        let e = error(vec![json!({"apiVersion": "apps/v1", "kind": "Deployment",
                                  "metadata": {"name": "web"}})]);
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("document 1 (Deployment default/web): kind", "Deployment")
        );
        let mut old = slice();
        old["apiVersion"] = json!("discovery.k8s.io/v1beta1");
        assert!(error(vec![old]).field.ends_with("apiVersion"));
    }

    #[test]
    fn the_same_object_twice_is_refused() {
        let e = error(vec![web(), slice(), web()]);
        assert!(e.field.starts_with("document 3"), "{e}");
        assert!(e.reason.contains("is also document 1"), "{e}");
    }

    #[test]
    fn resource_names_as_kubectl_takes_them() {
        assert_eq!(Kind::from_resource("svc"), Some(Kind::Service));
        assert_eq!(Kind::from_resource("Services"), Some(Kind::Service));
        assert_eq!(
            Kind::from_resource("endpointslices.discovery.k8s.io"),
            Some(Kind::EndpointSlice)
        );
        assert_eq!(Kind::from_resource("endpoints"), None);
    }
}
