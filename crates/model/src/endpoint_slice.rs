//! `discovery.k8s.io/v1 EndpointSlice`: a Service's endpoints, in the shape `kubectl`
//! accepts and prints. Conditions stay optional booleans as in Kubernetes; readers use the
//! accessors, which apply Kubernetes' rules for unknown values.

use crate::meta::{ObjectMeta, Protocol, expect, nullable, port_number};
use crate::{InvalidField, Validate, dns};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

pub const ENDPOINT_SLICE_API_VERSION: &str = "discovery.k8s.io/v1";
pub const ENDPOINT_SLICE_KIND: &str = "EndpointSlice";
/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The API server's bounds on one slice.
pub const MAX_ENDPOINTS: usize = 1000;
pub const MAX_ADDRESSES: usize = 100;
pub const MAX_PORTS: usize = 20000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSlice {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub address_type: AddressType,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<EndpointPort>,
}

fn api_version() -> String {
    ENDPOINT_SLICE_API_VERSION.to_string()
}
fn kind() -> String {
    ENDPOINT_SLICE_KIND.to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressType {
    IPv4,
    IPv6,
    #[serde(rename = "FQDN")]
    Fqdn,
}

impl fmt::Display for AddressType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
            AddressType::Fqdn => "FQDN",
        })
    }
}

/// One endpoint (a pod, usually). Named apart from the WireGuard [`crate::Endpoint`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub conditions: EndpointConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<EndpointHints>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub deprecated_topology: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
}

/// Topology hints: where the endpoint should be preferred.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointHints {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub for_zones: Vec<NamedHint>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub for_nodes: Vec<NamedHint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedHint {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    /// Matches the Service port's name (and so a named `targetPort`); may be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub protocol: Protocol,
    /// Absent means "all ports", which a proxy cannot use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl EndpointSlice {
    pub fn new(namespace: &str, name: &str, service: &str, address_type: AddressType) -> Self {
        let mut metadata = ObjectMeta::named(namespace, name);
        metadata
            .labels
            .insert(SERVICE_NAME_LABEL.to_string(), service.to_string());
        EndpointSlice {
            api_version: api_version(),
            kind: kind(),
            metadata,
            address_type,
            endpoints: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// The Service this slice belongs to (its `kubernetes.io/service-name` label).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

impl SliceEndpoint {
    /// Ready to receive new connections. Unknown counts as ready, as Kubernetes defines it.
    pub fn is_ready(&self) -> bool {
        self.conditions.ready.unwrap_or(true)
    }

    /// Able to serve, whether or not terminating. Unknown defers to `ready`.
    pub fn is_serving(&self) -> bool {
        self.conditions.serving.unwrap_or_else(|| self.is_ready())
    }

    /// On its way out. Unknown counts as not terminating.
    pub fn is_terminating(&self) -> bool {
        self.conditions.terminating.unwrap_or(false)
    }

    /// The address a proxy sends to: the first (all of an endpoint's are fungible).
    pub fn ip(&self) -> Option<IpAddr> {
        self.addresses.first()?.parse().ok()
    }
}

impl EndpointPort {
    pub fn port(&self) -> Option<u16> {
        self.port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    }
}

impl Validate for EndpointSlice {
    fn validate(&self) -> Result<(), InvalidField> {
        expect("apiVersion", &self.api_version, ENDPOINT_SLICE_API_VERSION)?;
        expect("kind", &self.kind, ENDPOINT_SLICE_KIND)?;
        self.metadata.validate_with(dns::subdomain)?;
        match self.service_name() {
            None => {
                return Err(InvalidField::new(
                    format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                    "",
                    "required: names the Service these endpoints belong to",
                ));
            }
            Some(service) => {
                dns::dns1035_label(&format!("metadata.labels[{SERVICE_NAME_LABEL}]"), service)?
            }
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(InvalidField::new(
                "endpoints",
                self.endpoints.len(),
                format!("must have at most {MAX_ENDPOINTS} items"),
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            endpoint(self.address_type, &format!("endpoints[{i}]"), e)?;
        }
        ports(&self.ports)
    }
}

fn endpoint(kind: AddressType, at: &str, e: &SliceEndpoint) -> Result<(), InvalidField> {
    if e.addresses.is_empty() || e.addresses.len() > MAX_ADDRESSES {
        return Err(InvalidField::new(
            format!("{at}.addresses"),
            e.addresses.len(),
            format!("must have 1-{MAX_ADDRESSES} addresses"),
        ));
    }
    for (j, address) in e.addresses.iter().enumerate() {
        let field = format!("{at}.addresses[{j}]");
        let fits = match kind {
            AddressType::IPv4 => address.parse::<std::net::Ipv4Addr>().is_ok(),
            AddressType::IPv6 => address.parse::<std::net::Ipv6Addr>().is_ok(),
            // A fully qualified name: a subdomain of at least two labels.
            AddressType::Fqdn => {
                dns::subdomain(&field, address)?;
                address.contains('.')
            }
        };
        if !fits {
            return Err(InvalidField::new(
                field,
                address,
                format!("must be an {kind} address (addressType is {kind})"),
            ));
        }
    }
    if let Some(node) = &e.node_name {
        dns::subdomain(&format!("{at}.nodeName"), node)?;
    }
    if let Some(host) = &e.hostname {
        dns::label(&format!("{at}.hostname"), host)?;
    }
    if let Some(hints) = &e.hints {
        for (k, zone) in hints.for_zones.iter().enumerate() {
            if zone.name.is_empty() {
                return Err(InvalidField::new(
                    format!("{at}.hints.forZones[{k}].name"),
                    "",
                    "required",
                ));
            }
        }
        for (k, node) in hints.for_nodes.iter().enumerate() {
            dns::subdomain(&format!("{at}.hints.forNodes[{k}].name"), &node.name)?;
        }
    }
    Ok(())
}

fn ports(ports: &[EndpointPort]) -> Result<(), InvalidField> {
    if ports.len() > MAX_PORTS {
        return Err(InvalidField::new(
            "ports",
            ports.len(),
            format!("must have at most {MAX_PORTS} items"),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let name = p.name.as_deref().unwrap_or_default();
        if !name.is_empty() {
            dns::label(&format!("ports[{i}].name"), name)?;
        }
        if !names.insert(name) {
            return Err(InvalidField::new(
                format!("ports[{i}].name"),
                name,
                "duplicate name",
            ));
        }
        if let Some(port) = p.port {
            port_number(&format!("ports[{i}].port"), port)?;
        }
        if let Some(a) = &p.app_protocol {
            dns::qualified_name(&format!("ports[{i}].appProtocol"), a)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: &str) -> EndpointSlice {
        serde_json::from_str(json).unwrap()
    }

    const GOOD: &str = r#"{
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc12", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.244.1.10"], "conditions": {"ready": true}, "nodeName": "a1",
             "zone": "site-a", "targetRef": {"kind": "Pod", "name": "p0", "namespace": "default"}},
            {"addresses": ["10.244.2.10"], "conditions": {"ready": false, "serving": true,
             "terminating": true}, "hints": {"forZones": [{"name": "site-b"}]}},
            {"addresses": ["10.244.3.10"]}
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
    }"#;

    #[test]
    fn a_slice_decodes_validates_and_round_trips() {
        let s = slice(GOOD);
        s.validate().unwrap();
        assert_eq!(s.metadata.namespace, "default");
        assert_eq!(s.service_name(), Some("web"));
        let back: EndpointSlice =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(s.ports[0].port(), Some(8080));
        assert_eq!(s.endpoints[0].ip(), Some("10.244.1.10".parse().unwrap()));
    }

    #[test]
    fn conditions_follow_kubernetes_defaulting() {
        let s = slice(GOOD);
        let [ready, terminating, unknown] = &s.endpoints[..] else {
            panic!()
        };
        assert!(ready.is_ready() && ready.is_serving() && !ready.is_terminating());
        assert!(
            !terminating.is_ready() && terminating.is_serving() && terminating.is_terminating()
        );
        assert!(unknown.is_ready() && unknown.is_serving() && !unknown.is_terminating());
        let not_ready = SliceEndpoint {
            conditions: EndpointConditions {
                ready: Some(false),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!not_ready.is_serving(), "unknown serving follows ready");
    }

    #[test]
    fn bad_slices_are_refused_by_field() {
        type Change = fn(&mut EndpointSlice);
        let cases: [(Change, &str, &str); 8] = [
            (
                |s| s.endpoints[0].addresses[0] = "fd00::1".into(),
                "endpoints[0].addresses[0]",
                "fd00::1",
            ),
            (
                |s| s.endpoints[1].addresses.clear(),
                "endpoints[1].addresses",
                "0",
            ),
            (
                |s| drop(s.metadata.labels.remove(SERVICE_NAME_LABEL)),
                "metadata.labels[kubernetes.io/service-name]",
                "",
            ),
            (|s| s.ports[0].port = Some(0), "ports[0].port", "0"),
            (
                |s| s.ports.push(s.ports[0].clone()),
                "ports[1].name",
                "http",
            ),
            (
                |s| s.endpoints[0].node_name = Some("A1".into()),
                "endpoints[0].nodeName",
                "A1",
            ),
            (|s| s.metadata.name = "Web".into(), "metadata.name", "Web"),
            (
                |s| s.api_version = "discovery.k8s.io/v1beta1".into(),
                "apiVersion",
                "discovery.k8s.io/v1beta1",
            ),
        ];
        for (change, field, value) in cases {
            let mut s = slice(GOOD);
            change(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{e}");
        }
        let mut fqdn = slice(GOOD);
        fqdn.address_type = AddressType::Fqdn;
        fqdn.endpoints.truncate(1);
        fqdn.endpoints[0].addresses = vec!["web.example.com".into()];
        fqdn.validate().unwrap();
        fqdn.endpoints[0].addresses = vec!["web".into()];
        let e = fqdn.validate().unwrap_err();
        assert_eq!(e.field, "endpoints[0].addresses[0]", "{e}");
        let ok: Result<EndpointSlice, _> =
            serde_json::from_str(&GOOD.replace("\"zone\"", "\"zones\""));
        assert!(ok.is_err(), "unknown fields are refused");
    }
}
