//! The per-location custom resource (`locations.trellis.network`, cluster-scoped): what
//! `kubectl get locations` shows of the mesh's gateways — the active ones, the standby
//! ones, each candidate's forwarding as its observers measure it, the last failover — and
//! where observers write their opinions.
//!
//! Writes are shaped so that many writers never conflict: each observer merge-patches only
//! its own entries (`status.opinions.OBSERVER.GATEWAY`), and only when its opinion changes;
//! the leader writes the slots (`status.active`, `status.standby`, `status.lastFailover`).
//! A merge patch of distinct map keys needs no resourceVersion precondition.

use serde_json::{Value, json};

pub const GROUP: &str = "trellis.network";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "Location";
pub const PLURAL: &str = "locations";

/// The CustomResourceDefinition, with a complete schema and the printer columns
/// `kubectl get locations` shows.
pub fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{PLURAL}.{GROUP}")},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "plural": PLURAL,
                "singular": "location",
                "kind": KIND,
                "shortNames": ["loc"],
            },
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Active", "type": "string", "jsonPath": ".status.activeList"},
                    {"name": "Standby", "type": "string", "jsonPath": ".status.standbyList"},
                    {"name": "Forwarding", "type": "string", "jsonPath": ".status.candidates"},
                    {"name": "Last failover", "type": "date", "jsonPath": ".status.lastFailover.at"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": schema()},
            }],
        },
    })
}

fn schema() -> Value {
    json!({
        "type": "object",
        "description": "A location of the Trellis mesh and its gateways, as measured by forwarding probes.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "properties": {
                    "gateways": {
                        "type": "integer", "minimum": 1, "maximum": 16,
                        "description": "Active gateways wanted in this location (default: the cluster's setting).",
                    },
                },
            },
            "status": status_schema(),
        },
    })
}

fn status_schema() -> Value {
    let names = json!({"type": "array", "items": {"type": "string"}});
    let opinions = json!({
        "type": "object",
        "description": "observer -> gateway -> whether it forwarded the observer's last probes.",
        "additionalProperties": {
            "type": "object",
            "additionalProperties": {"type": "boolean"},
        },
    });
    let last_failover = json!({
        "type": "object",
        "description": "The last time an active gateway was replaced: which left, which joined.",
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "from": names,
            "to": names,
        },
    });
    json!({
        "type": "object",
        "properties": {
            "slots": {
                "type": "array",
                "description": "The gateway slots as the agents keep them (sticky; null: vacant).",
                "items": {"type": "string", "nullable": true},
            },
            "active": names,
            "standby": names,
            "activeList": {"type": "string", "description": "active, comma-separated, for printing"},
            "standbyList": {"type": "string", "description": "standby, comma-separated, for printing"},
            "candidates": {
                "type": "object",
                "description": "Each gateway candidate's forwarding as most of its observers last measured it: up, down or unknown.",
                "additionalProperties": {"type": "string", "enum": ["up", "down", "unknown"]},
            },
            "opinions": opinions,
            "lastFailover": last_failover,
        },
    })
}

/// The status the leader writes for a location's slots: the lists and their printed forms.
pub fn slots_status(active: &[String], standby: &[String]) -> Value {
    json!({"status": {
        "active": active,
        "standby": standby,
        "activeList": active.join(","),
        "standbyList": standby.join(","),
    }})
}

/// The merge patch an observer sends when its opinion of `gateway` changes.
pub fn opinion_patch(observer: &str, gateway: &str, forwards: bool) -> Value {
    json!({"status": {"opinions": {observer: {gateway: forwards}}}})
}

/// Every observer's opinions from a Location's status: `(observer, gateway, forwards)`.
pub fn opinions(object: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    if let Some(by_observer) = object["status"]["opinions"].as_object() {
        for (observer, gateways) in by_observer {
            for (gateway, forwards) in gateways.as_object().into_iter().flatten() {
                if let Some(f) = forwards.as_bool() {
                    out.push((observer.clone(), gateway.clone(), f));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observers_patches_touch_only_their_own_entries() {
        let mut location = json!({"metadata": {"name": "site-a"}});
        json_patch::merge(
            &mut location,
            &slots_status(&["a1".into(), "a2".into()], &["a3".into()]),
        );
        json_patch::merge(&mut location, &opinion_patch("b1", "a1", true));
        json_patch::merge(&mut location, &opinion_patch("b2", "a1", false));
        json_patch::merge(&mut location, &opinion_patch("b1", "a2", true));
        json_patch::merge(&mut location, &opinion_patch("b1", "a1", false));
        let mut seen = opinions(&location);
        seen.sort();
        assert_eq!(
            seen,
            [
                ("b1".to_string(), "a1".to_string(), false),
                ("b1".into(), "a2".into(), true),
                ("b2".into(), "a1".into(), false),
            ]
        );
        assert_eq!(location["status"]["activeList"], "a1,a2", "the slots stay");
    }

    #[test]
    fn the_crd_prints_what_an_operator_asks_first() {
        let crd = crd();
        assert_eq!(crd["metadata"]["name"], "locations.trellis.network");
        let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            columns,
            ["Active", "Standby", "Forwarding", "Last failover", "Age"]
        );
        // Every printed path exists in the schema.
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        for path in ["activeList", "standbyList", "candidates", "lastFailover"] {
            assert!(
                schema["properties"]["status"]["properties"][path].is_object(),
                "{path}"
            );
        }
    }

    /// deploy/crds/ holds the CRD as this module defines it: the manifest an operator
    /// applies and the schema the agent writes against cannot drift apart.
    #[test]
    fn the_crd_in_deploy_is_the_one_the_code_defines() {
        crate::deploy_file_matches(
            "locations.trellis.network.yaml",
            "trellis_kube::location::crd()",
            &crd(),
        );
    }
}
