//! Kilo's `Peer` (`peers.kilo.squat.ai/v1alpha1`, cluster-scoped), accepted unchanged, as
//! Trellis's external peer.

use serde_json::{Value, json};
use trellis_model::{Endpoint, ExternalPeer, InvalidField, PublicKey, Validate};

/// Kilo's `Peer` CustomResourceDefinition, for clusters that do not have it yet: the same
/// group, version, kind, scope and fields as Kilo's own, so objects written for either
/// are accepted by both.
pub fn kilo_crd() -> Value {
    let endpoint = json!({
        "type": "object",
        "required": ["dnsOrIP", "port"],
        "properties": {
            "dnsOrIP": {
                "type": "object",
                "properties": {"dns": {"type": "string"}, "ip": {"type": "string"}},
            },
            "port": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535},
        },
    });
    let spec = json!({
        "type": "object",
        "required": ["allowedIPs", "publicKey"],
        "properties": {
            "allowedIPs": {"type": "array", "items": {"type": "string"}},
            "publicKey": {"type": "string", "description": "The peer's WireGuard public key, base64."},
            "endpoint": endpoint,
            "persistentKeepalive": {"type": "integer", "minimum": 0},
            "presharedKey": {"type": "string"},
        },
    });
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "peers.kilo.squat.ai"},
        "spec": {
            "group": "kilo.squat.ai",
            "scope": "Cluster",
            "names": {"plural": "peers", "singular": "peer", "kind": "Peer", "listKind": "PeerList"},
            "versions": [{
                "name": "v1alpha1",
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                    },
                }},
            }],
        },
    })
}

/// The external peer a Kilo `Peer` object describes.
pub fn peer_from_object(object: &Value) -> Result<ExternalPeer, InvalidField> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let spec = &object["spec"];
    let field = |path: &str| format!("peer {name}: spec.{path}");
    let public_key = match spec["publicKey"].as_str() {
        Some(text) => PublicKey::parse(&field("publicKey"), text)?,
        None => return Err(InvalidField::new(field("publicKey"), "", "required")),
    };
    let allowed_ips = match spec["allowedIPs"].as_array() {
        Some(list) => list
            .iter()
            .map(|v| {
                let text = v.as_str().unwrap_or_default();
                text.parse()
                    .map_err(|_| InvalidField::new(field("allowedIPs"), text, "not a CIDR"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => return Err(InvalidField::new(field("allowedIPs"), "", "required")),
    };
    let endpoint = match spec.get("endpoint") {
        None | Some(Value::Null) => None,
        Some(e) => Some(endpoint(e, &field("endpoint"))?),
    };
    let persistent_keepalive = match spec.get("persistentKeepalive") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| {
                    InvalidField::new(field("persistentKeepalive"), v, "seconds, 0-65535")
                })?,
        ),
    };
    if spec
        .get("presharedKey")
        .is_some_and(|k| k.as_str().is_some_and(|s| !s.is_empty()))
    {
        // Without the key the peer's handshakes would fail: refused loudly rather than
        // configured into a tunnel that cannot work.
        return Err(InvalidField::new(
            field("presharedKey"),
            "(set)",
            "preshared keys are not supported yet",
        ));
    }
    let peer = ExternalPeer {
        name: name.to_string(),
        public_key,
        allowed_ips,
        endpoint,
        persistent_keepalive,
    };
    peer.validate()
        .map_err(|e| InvalidField::new(format!("peer {name}: {}", e.field), e.value, e.reason))?;
    Ok(peer)
}

/// `{dnsOrIP: {dns | ip}, port}`.
fn endpoint(value: &Value, field: &str) -> Result<Endpoint, InvalidField> {
    let port = value["port"].as_u64().unwrap_or_default();
    let host = &value["dnsOrIP"];
    let host = host["ip"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_string()
            }
        })
        .or_else(|| host["dns"].as_str().map(str::to_string))
        .ok_or_else(|| InvalidField::new(field, value, "dnsOrIP needs dns or ip"))?;
    Endpoint::parse(field, &format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kilo_peer(spec: Value) -> Value {
        json!({
            "apiVersion": "kilo.squat.ai/v1alpha1",
            "kind": "Peer",
            "metadata": {"name": "laptop"},
            "spec": spec,
        })
    }

    #[test]
    fn a_kilo_peer_is_an_external_peer() {
        let peer = peer_from_object(&kilo_peer(json!({
            "allowedIPs": ["10.5.0.1/32"],
            "publicKey": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
            "endpoint": {"dnsOrIP": {"ip": "203.0.113.9"}, "port": 51820},
            "persistentKeepalive": 10,
        })))
        .unwrap();
        assert_eq!(peer.name, "laptop");
        assert_eq!(peer.endpoint.unwrap().to_string(), "203.0.113.9:51820");
        assert_eq!(peer.persistent_keepalive, Some(10));
        let by_name = peer_from_object(&kilo_peer(json!({
            "allowedIPs": ["10.5.0.2/32"],
            "publicKey": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
            "endpoint": {"dnsOrIP": {"dns": "vpn.example.org"}, "port": 51820},
        })))
        .unwrap();
        assert_eq!(
            by_name.endpoint.unwrap().to_string(),
            "vpn.example.org:51820"
        );
    }

    #[test]
    fn what_cannot_work_is_refused_by_peer_and_field() {
        let key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
        for (spec, field, expect) in [
            (
                json!({"allowedIPs": ["10.5.0.1/32"]}),
                "spec.publicKey",
                "required",
            ),
            (json!({"publicKey": key}), "spec.allowedIPs", "required"),
            (
                json!({"publicKey": key, "allowedIPs": ["x"]}),
                "spec.allowedIPs",
                "CIDR",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["10.5.0.1/32"], "presharedKey": "abc"}),
                "spec.presharedKey",
                "not supported",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["10.5.0.1/32"], "endpoint": {"dnsOrIP": {}, "port": 1}}),
                "spec.endpoint",
                "dns or ip",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["10.5.0.1/32"], "persistentKeepalive": -1}),
                "spec.persistentKeepalive",
                "seconds",
            ),
            (
                json!({"publicKey": key, "allowedIPs": ["10.5.0.0/24", "10.5.0.1/32"]}),
                "allowed_ips",
                "overlaps",
            ),
        ] {
            let e = peer_from_object(&kilo_peer(spec)).unwrap_err();
            assert!(e.field.starts_with("peer laptop: "), "{e:?}");
            assert!(e.field.ends_with(field), "{e:?}");
            assert!(e.reason.contains(expect), "{e:?}");
        }
    }

    #[test]
    fn the_crd_in_deploy_is_the_one_the_code_defines() {
        crate::deploy_file_matches(
            "peers.kilo.squat.ai.yaml",
            "trellis_kube::peer::kilo_crd(): Kilo's Peer, accepted unchanged",
            &kilo_crd(),
        );
    }
}
