//! The cluster model: what the store holds and every other part reads.
//!
//! Everything here is plain data plus validation. Records come from a store that other
//! programs (and people) can write, so every decoder checks its input and names the field
//! and value it rejects instead of letting a bad record reach the planner.
//!
//! Services and EndpointSlices are Kubernetes' own v1 shapes ([`service`],
//! [`endpoint_slice`], [`object`] for manifests), so a Kubernetes backend can pass them
//! through; [`allocate`] gives Services their ClusterIPs and node ports as the API server
//! would.

pub mod allocate;
pub mod dns;
mod endpoint;
pub mod endpoint_slice;
mod key;
pub mod keys;
pub mod label_selector;
pub mod meta;
mod name;
pub mod network_policy;
mod node;
pub mod object;
mod peer;
pub mod pod;
pub mod service;
mod service_settings;
mod settings;

pub use allocate::{ClaimHolder, Claims, allocate};
pub use endpoint::{Endpoint, Host};
pub use endpoint_slice::{AddressType, EndpointSlice, SliceEndpoint};
pub use ipnet::{IpNet, Ipv4Net, Ipv6Net};
pub use key::PublicKey;
pub use label_selector::LabelSelector;
pub use meta::{DEFAULT_NAMESPACE, IntOrString, ObjectMeta, Protocol};
pub use name::validate_name;
pub use network_policy::NetworkPolicy;
pub use node::{GatewayPolicy, GatewaySet, Granularity, Node};
pub use object::{Document, Kind, Object};
pub use peer::ExternalPeer;
pub use pod::{NamedPort, Namespace, NamespaceObject, Pod};
pub use service::{Service, ServicePort, ServiceType};
pub use service_settings::{DEFAULT_NODE_PORT_RANGE, PortRange, ServiceSettings};
pub use settings::{
    AgentStatus, ClusterSettings, DEFAULT_GC_AFTER_SECONDS, GatewayHealth, Observation, PathReport,
    PodCidrAllocation, PodCidrPool,
};

/// A record or argument that failed validation. The message names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct InvalidField {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Prefix the field with the record it belongs to, e.g. `node a1: pod_cidrs`.
    pub fn within(mut self, context: impl std::fmt::Display) -> Self {
        self.field = format!("{context}: {}", self.field);
        self
    }
}

/// Decode a JSON record and validate it, naming the record in any error.
pub fn decode<T>(what: &str, bytes: &[u8]) -> Result<T, InvalidField>
where
    T: serde::de::DeserializeOwned + Validate,
{
    let record: T = serde_json::from_slice(bytes).map_err(|e| {
        InvalidField::new(
            what,
            String::from_utf8_lossy(&bytes[..bytes.len().min(120)]),
            e.to_string(),
        )
    })?;
    record.validate().map_err(|e| e.within(what))?;
    Ok(record)
}

/// Records that can check their own invariants after decoding.
pub trait Validate {
    fn validate(&self) -> Result<(), InvalidField>;
}
