//! What Services and EndpointSlices share with every Kubernetes object: metadata, the
//! int-or-string type and the L4 protocol, in the shapes `kubectl` reads and writes.

use crate::{InvalidField, dns};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The namespace an object without one lands in, as with `kubectl`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `metadata`. The fields Trellis reads are typed; every other one (ownerReferences,
/// finalizers, managedFields, …) is kept as given, so a Kubernetes backend can pass the
/// object through unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(
        default = "default_namespace",
        deserialize_with = "namespace_or_default"
    )]
    pub namespace: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Never stored: readers get the store's revision of the record here, and a writer
    /// that sends one asks for the write to happen only at that revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Default for ObjectMeta {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: default_namespace(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            uid: None,
            resource_version: None,
            creation_timestamp: None,
            other: BTreeMap::new(),
        }
    }
}

impl ObjectMeta {
    pub fn named(namespace: &str, name: &str) -> Self {
        Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            ..Self::default()
        }
    }

    /// The checks every namespaced object gets; `name_rule` is the object kind's own.
    pub(crate) fn validate_with(
        &self,
        name_rule: fn(&str, &str) -> Result<(), InvalidField>,
    ) -> Result<(), InvalidField> {
        name_rule("metadata.name", &self.name)?;
        dns::label("metadata.namespace", &self.namespace)?;
        dns::labels("metadata.labels", &self.labels)?;
        for key in self.annotations.keys() {
            dns::qualified_name(&format!("metadata.annotations[{key}]"), key)?;
        }
        Ok(())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// `namespace: ""` means the default namespace, as it does to `kubectl`.
fn namespace_or_default<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let namespace = Option::<String>::deserialize(d)?.unwrap_or_default();
    Ok(if namespace.is_empty() {
        default_namespace()
    } else {
        namespace
    })
}

/// An explicit `null` reads as the field's default, as the API server treats it: generated
/// manifests are full of `creationTimestamp: null` and `selector:` with nothing after it.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A port given by number or by name (`targetPort`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i32),
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

/// An L4 protocol of a port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port number as the API server checks it: 1-65535.
pub(crate) fn port_number(field: &str, port: i32) -> Result<u16, InvalidField> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| InvalidField::new(field, port, "must be between 1 and 65535, inclusive"))
}

/// `apiVersion` and `kind`, which name the type the object was decoded as.
pub(crate) fn expect(field: &str, value: &str, expected: &str) -> Result<(), InvalidField> {
    if value == expected {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        format!("must be {expected:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_defaults_the_namespace_and_keeps_unknown_fields() {
        let meta: ObjectMeta = serde_json::from_str(
            r#"{"name":"web","namespace":"","creationTimestamp":null,"labels":null,
                "finalizers":["x"],"ownerReferences":[{"kind":"Deployment"}]}"#,
        )
        .unwrap();
        assert_eq!(meta.namespace, "default");
        assert!(meta.labels.is_empty());
        assert_eq!(meta.creation_timestamp, None);
        let back = serde_json::to_value(&meta).unwrap();
        assert_eq!(back["finalizers"], serde_json::json!(["x"]));
        assert_eq!(back["ownerReferences"][0]["kind"], "Deployment");
    }

    #[test]
    fn int_or_string_keeps_what_it_was_given() {
        let v: Vec<IntOrString> = serde_json::from_str(r#"[8080, "http", "8080"]"#).unwrap();
        assert_eq!(
            v,
            [
                IntOrString::Int(8080),
                IntOrString::String("http".into()),
                IntOrString::String("8080".into())
            ]
        );
    }
}
