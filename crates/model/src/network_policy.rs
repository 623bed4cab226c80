//! `networking.k8s.io/v1` NetworkPolicy, in its Kubernetes shape, with the API server's
//! validation (`ValidateNetworkPolicy`): every refusal names the field path and the value.
//!
//! What a policy *means* (which pods it isolates, what it admits) is `trellis-policy`'s; here
//! are the shape, the checks, and the two rules every reader needs the same way: the policy
//! types that apply when none are listed ([`NetworkPolicySpec::types`]), and an `ipBlock`'s
//! membership test ([`IpBlock::contains`]).

use crate::meta::{IntOrString, ObjectMeta, Protocol, expect, nullable, port_number};
use crate::{InvalidField, LabelSelector, Validate, dns};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

pub const NETWORK_POLICY_API_VERSION: &str = "networking.k8s.io/v1";
pub const NETWORK_POLICY_KIND: &str = "NetworkPolicy";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: NetworkPolicySpec,
}

fn api_version() -> String {
    NETWORK_POLICY_API_VERSION.into()
}
fn kind() -> String {
    NETWORK_POLICY_KIND.into()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// The pods of the policy's namespace it applies to; empty: all of them.
    #[serde(default, deserialize_with = "nullable")]
    pub pod_selector: LabelSelector,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub policy_types: Vec<PolicyType>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ingress: Vec<IngressRule>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub egress: Vec<EgressRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// Traffic a selected pod admits: from any of `from` (empty: from anywhere) to any of
/// `ports` (empty: every port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub from: Vec<PolicyPeer>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<PolicyPort>,
}

/// Traffic a selected pod may send: to any of `to` (empty: anywhere) on any of `ports`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub to: Vec<PolicyPeer>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<PolicyPort>,
}

/// One side of a rule: pods (by their labels, in the policy's namespace or in the
/// namespaces `namespaceSelector` picks), or addresses (`ipBlock`), never both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub except: Vec<String>,
}

/// A port or port range of a protocol; no `port`: every port of the protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyPort {
    /// Default TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// A number, or the name of a container port of the pod the traffic goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// The last port of a range starting at `port` (a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
}

impl NetworkPolicySpec {
    /// The policy types that apply: the listed ones, or when none are listed, Ingress, and
    /// Egress if the policy has egress rules (the API's defaulting).
    pub fn types(&self) -> Vec<PolicyType> {
        if !self.policy_types.is_empty() {
            return self.policy_types.clone();
        }
        let mut types = vec![PolicyType::Ingress];
        if !self.egress.is_empty() {
            types.push(PolicyType::Egress);
        }
        types
    }
}

impl PolicyPort {
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or_default()
    }
}

impl IpBlock {
    /// The block and its exceptions as prefixes (the caller validated them).
    pub fn prefixes(&self) -> Option<(IpNet, Vec<IpNet>)> {
        let cidr = self.cidr.parse::<IpNet>().ok()?.trunc();
        let except = self
            .except
            .iter()
            .filter_map(|e| e.parse::<IpNet>().ok().map(|e| e.trunc()))
            .collect();
        Some((cidr, except))
    }

    /// Whether `ip` is in the block and in none of its exceptions.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.prefixes().is_some_and(|(cidr, except)| {
            cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
        })
    }
}

impl Validate for NetworkPolicy {
    fn validate(&self) -> Result<(), InvalidField> {
        expect("apiVersion", &self.api_version, NETWORK_POLICY_API_VERSION)?;
        expect("kind", &self.kind, NETWORK_POLICY_KIND)?;
        self.metadata.validate_with(dns::subdomain)?;
        let spec = &self.spec;
        spec.pod_selector.validate("spec.podSelector")?;
        for (i, rule) in spec.ingress.iter().enumerate() {
            let at = format!("spec.ingress[{i}]");
            peers(&format!("{at}.from"), &rule.from)?;
            ports(&format!("{at}.ports"), &rule.ports)?;
        }
        for (i, rule) in spec.egress.iter().enumerate() {
            let at = format!("spec.egress[{i}]");
            peers(&format!("{at}.to"), &rule.to)?;
            ports(&format!("{at}.ports"), &rule.ports)?;
        }
        if spec.policy_types.len() > 2 {
            return Err(InvalidField::new(
                "spec.policyTypes",
                spec.policy_types.len(),
                "may not specify more than two policyTypes",
            ));
        }
        if spec.policy_types.len() == 2 && spec.policy_types[0] == spec.policy_types[1] {
            return Err(InvalidField::new(
                "spec.policyTypes[1]",
                format!("{:?}", spec.policy_types[1]),
                "duplicate policy type",
            ));
        }
        Ok(())
    }
}

fn peers(field: &str, peers: &[PolicyPeer]) -> Result<(), InvalidField> {
    for (i, peer) in peers.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match (&peer.ip_block, selectors) {
            (None, false) => {
                return Err(InvalidField::new(
                    &at,
                    "{}",
                    "must specify a peer: podSelector, namespaceSelector or ipBlock",
                ));
            }
            (Some(_), true) => {
                return Err(InvalidField::new(
                    &at,
                    "ipBlock and a selector",
                    "may not specify more than 1 peer type: ipBlock excludes podSelector and namespaceSelector",
                ));
            }
            (Some(block), false) => ip_block(&format!("{at}.ipBlock"), block)?,
            (None, true) => {
                if let Some(s) = &peer.pod_selector {
                    s.validate(&format!("{at}.podSelector"))?;
                }
                if let Some(s) = &peer.namespace_selector {
                    s.validate(&format!("{at}.namespaceSelector"))?;
                }
            }
        }
    }
    Ok(())
}

fn cidr(field: &str, text: &str) -> Result<IpNet, InvalidField> {
    let net: IpNet = text.parse().map_err(|_| {
        InvalidField::new(
            field,
            text,
            "must be a valid CIDR value (e.g. 10.9.8.0/24 or 2001:db8::/64)",
        )
    })?;
    Ok(net)
}

fn ip_block(field: &str, block: &IpBlock) -> Result<(), InvalidField> {
    let outer = cidr(&format!("{field}.cidr"), &block.cidr)?.trunc();
    for (i, e) in block.except.iter().enumerate() {
        let at = format!("{field}.except[{i}]");
        let inner = cidr(&at, e)?.trunc();
        let strict = inner.prefix_len() > outer.prefix_len() && outer.contains(&inner.network());
        if !strict {
            return Err(InvalidField::new(
                at,
                e,
                format!("must be a strict subset of `cidr` {}", block.cidr),
            ));
        }
    }
    Ok(())
}

fn ports(field: &str, ports: &[PolicyPort]) -> Result<(), InvalidField> {
    for (i, p) in ports.iter().enumerate() {
        let at = format!("{field}[{i}]");
        match (&p.port, p.end_port) {
            (Some(IntOrString::Int(n)), end) => {
                let start = port_number(&format!("{at}.port"), *n)?;
                if let Some(end) = end {
                    let end = port_number(&format!("{at}.endPort"), end)?;
                    if end < start {
                        return Err(InvalidField::new(
                            format!("{at}.endPort"),
                            end,
                            format!("must be greater than or equal to `port` {start}"),
                        ));
                    }
                }
            }
            (Some(IntOrString::String(name)), end) => {
                dns::iana_service_name(&format!("{at}.port"), name)?;
                if let Some(end) = end {
                    return Err(InvalidField::new(
                        format!("{at}.endPort"),
                        end,
                        "may not be specified when `port` is a name",
                    ));
                }
            }
            (None, Some(end)) => {
                return Err(InvalidField::new(
                    format!("{at}.endPort"),
                    end,
                    "may not be specified without a numeric `port`",
                ));
            }
            (None, None) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> NetworkPolicy {
        serde_json::from_str(json).unwrap()
    }

    /// The Kubernetes documentation's example policy.
    const EXAMPLE: &str = r#"{
      "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
      "metadata": {"name": "test-network-policy", "namespace": "default"},
      "spec": {
        "podSelector": {"matchLabels": {"role": "db"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [
            {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
            {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
            {"podSelector": {"matchLabels": {"role": "frontend"}}}],
          "ports": [{"protocol": "TCP", "port": 6379}]}],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
          "ports": [{"protocol": "TCP", "port": 5978}]}]
      }}"#;

    #[test]
    fn the_documentations_example_reads_and_validates() {
        let p = parse(EXAMPLE);
        p.validate().unwrap();
        let block = p.spec.ingress[0].from[0].ip_block.as_ref().unwrap();
        assert!(block.contains("172.17.0.9".parse().unwrap()));
        assert!(!block.contains("172.17.1.9".parse().unwrap()), "excepted");
        assert!(!block.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(p.spec.types(), [PolicyType::Ingress, PolicyType::Egress]);
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back["spec"]["ingress"][0]["ports"][0]["port"], 6379);
    }

    #[test]
    fn policy_types_default_as_the_api_defaults_them() {
        let ingress_only = parse(r#"{"metadata": {"name": "a"}, "spec": {"podSelector": {}}}"#);
        assert_eq!(ingress_only.spec.types(), [PolicyType::Ingress]);
        let with_egress = parse(r#"{"metadata": {"name": "a"}, "spec": {"egress": [{"to": []}]}}"#);
        assert_eq!(
            with_egress.spec.types(),
            [PolicyType::Ingress, PolicyType::Egress]
        );
    }

    #[test]
    fn every_refusal_names_the_field_and_value() {
        let cases: [(&str, &str); 8] = [
            (
                r#"{"ingress": [{"from": [{}]}]}"#,
                "spec.ingress[0].from[0]",
            ),
            (
                r#"{"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}"#,
                "spec.ingress[0].from[0]",
            ),
            (
                r#"{"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}"#,
                "spec.egress[0].to[0].ipBlock.cidr",
            ),
            (
                r#"{"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]}"#,
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                r#"{"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}"#,
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                r#"{"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}"#,
                "spec.ingress[0].ports[0].endPort",
            ),
            (
                r#"{"ingress": [{"ports": [{"port": "not_a_name"}]}]}"#,
                "spec.ingress[0].ports[0].port",
            ),
            (
                r#"{"policyTypes": ["Egress", "Egress"]}"#,
                "spec.policyTypes[1]",
            ),
        ];
        for (spec, field) in cases {
            let p = parse(&format!(
                r#"{{"metadata": {{"name": "p"}}, "spec": {spec}}}"#
            ));
            let e = p.validate().unwrap_err();
            assert_eq!(e.field, field, "{spec}: {e}");
        }
        let unknown = serde_json::from_str::<NetworkPolicy>(
            r#"{"metadata": {"name": "p"}, "spec": {"ingres": []}}"#,
        );
        assert!(unknown.is_err(), "a misspelt field is refused, not ignored");
    }
}
