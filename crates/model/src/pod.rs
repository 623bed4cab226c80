//! Pods and namespaces as NetworkPolicy reads them: where a pod is, what selectors call it,
//! its addresses and named ports; a namespace's labels. Records `pods/NS/NAME` (a [`Pod`]:
//! on Kubernetes read from the API's Pods, elsewhere published by each node's agent from
//! its CNI attachments) and `namespaces/NAME` (a `v1` [`NamespaceObject`] in its Kubernetes
//! shape: on Kubernetes the API's, elsewhere written with `trellis apply`).

use crate::{InvalidField, Protocol, Validate, dns};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// One address per family, as the CNI plugin gave them.
    pub ips: Vec<IpAddr>,
    /// The node it runs on (whose own traffic to it no policy blocks).
    pub node: String,
    /// Its containers' named ports: what a policy's `port: http` means for traffic to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPort {
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

pub const NAMESPACE_API_VERSION: &str = "v1";
pub const NAMESPACE_KIND: &str = "Namespace";

/// A `v1` Namespace in its Kubernetes shape: what `namespaces/NAME` records hold. Only its
/// name and labels mean anything to Trellis; the rest (spec, status) is kept as given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceObject {
    #[serde(default = "namespace_api_version")]
    pub api_version: String,
    #[serde(default = "namespace_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: crate::meta::ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

fn namespace_api_version() -> String {
    NAMESPACE_API_VERSION.into()
}

fn namespace_kind() -> String {
    NAMESPACE_KIND.into()
}

impl NamespaceObject {
    /// A namespace of this name with these labels.
    pub fn new(name: &str, labels: BTreeMap<String, String>) -> NamespaceObject {
        NamespaceObject {
            api_version: namespace_api_version(),
            kind: namespace_kind(),
            metadata: crate::meta::ObjectMeta {
                name: name.to_string(),
                labels,
                ..Default::default()
            },
            spec: None,
            status: None,
        }
    }

    /// What NetworkPolicy reads of it.
    pub fn namespace(&self) -> Namespace {
        Namespace {
            name: self.metadata.name.clone(),
            labels: self.metadata.labels.clone(),
        }
    }
}

impl Validate for NamespaceObject {
    fn validate(&self) -> Result<(), InvalidField> {
        dns::label("metadata.name", &self.metadata.name)?;
        dns::labels("metadata.labels", &self.metadata.labels)
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

impl Validate for Pod {
    fn validate(&self) -> Result<(), InvalidField> {
        dns::label("namespace", &self.namespace)?;
        dns::subdomain("name", &self.name)?;
        dns::labels("labels", &self.labels)?;
        crate::validate_name("node", &self.node)?;
        for (i, p) in self.ports.iter().enumerate() {
            dns::iana_service_name(&format!("ports[{i}].name"), &p.name)?;
            if p.port == 0 {
                return Err(InvalidField::new(
                    format!("ports[{i}].port"),
                    0,
                    "must be between 1 and 65535, inclusive",
                ));
            }
        }
        Ok(())
    }
}

impl Validate for Namespace {
    fn validate(&self) -> Result<(), InvalidField> {
        dns::label("name", &self.name)?;
        dns::labels("labels", &self.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_bad_ones_are_named() {
        let pod: Pod = serde_json::from_str(
            r#"{"namespace": "shop", "name": "db-0", "labels": {"app": "db"},
                "ips": ["10.244.1.5", "fd00:10:244:1::5"], "node": "a1",
                "ports": [{"name": "redis", "port": 6379}, {"name": "dns", "protocol": "UDP", "port": 53}]}"#,
        )
        .unwrap();
        pod.validate().unwrap();
        assert_eq!(pod.named_port("redis", Protocol::Tcp), Some(6379));
        assert_eq!(pod.named_port("redis", Protocol::Udp), None);
        let mut bad = pod.clone();
        bad.ports[0].name = "Not_A_Name".into();
        assert_eq!(bad.validate().unwrap_err().field, "ports[0].name");
        let ns: Namespace =
            serde_json::from_str(r#"{"name": "shop", "labels": {"team": "a"}}"#).unwrap();
        ns.validate().unwrap();
        assert!(serde_json::from_str::<Namespace>(r#"{"name": "x", "lables": {}}"#).is_err());
    }
}
