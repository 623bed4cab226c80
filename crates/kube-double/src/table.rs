//! `meta.k8s.io/v1` `Table`s, what `kubectl get` asks for (`Accept: application/json;as=Table;
//! v=v1;g=meta.k8s.io`): a NAME column, then the resource's columns (a CRD's
//! `additionalPrinterColumns`, or the double's approximation of a built-in kind's printer),
//! with `date` columns rendered as ages, as the API server does.

use serde_json::{Value, json};

use crate::clock;
use crate::resources::{CellSource, Column, ResourceDef};

/// Whether an `Accept` header asks for a v1 Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let params: Vec<&str> = part.split(';').map(str::trim).collect();
        params.contains(&"as=Table")
            && params.contains(&"g=meta.k8s.io")
            && params.contains(&"v=v1")
    })
}

/// How much of each object the rows carry (`includeObject`): `None`, `Metadata` (the default)
/// or `Object`.
pub fn table(def: &ResourceDef, objects: &[Value], resource_version: u64, include: &str) -> Value {
    let mut columns = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace.",
    })];
    columns.extend(def.columns.iter().map(|c| {
        json!({"name": c.name, "type": c.kind, "format": "", "description": c.description, "priority": c.priority})
    }));
    let now = clock::now_secs();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(def.columns.iter().map(|c| cell(c, o, now)));
            let mut row = json!({"cells": cells});
            match include {
                "None" => {}
                "Object" => row["object"] = o.clone(),
                _ => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"],
                    })
                }
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn cell(column: &Column, o: &Value, now: i64) -> Value {
    let joined = |items: Vec<String>| {
        if items.is_empty() {
            json!("<none>")
        } else {
            json!(items.join(","))
        }
    };
    match &column.source {
        CellSource::Path(path) => {
            let v = jsonpath(o, path).cloned().unwrap_or(Value::Null);
            match (&v, column.kind.as_str()) {
                (Value::String(s), "date") => clock::parse_rfc3339(s)
                    .map(|t| json!(clock::human_duration(now - t)))
                    .unwrap_or(json!("<unknown>")),
                (Value::Array(_) | Value::Object(_), _) => json!(v.to_string()),
                _ => v,
            }
        }
        CellSource::NodeStatus => {
            let ready = o["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"].as_str().unwrap_or(""));
            let mut status = match ready {
                Some("True") => "Ready".to_string(),
                Some(_) => "NotReady".to_string(),
                None => "Unknown".to_string(),
            };
            if o["spec"]["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            json!(status)
        }
        CellSource::NodeRoles => {
            let roles = o["metadata"]["labels"]
                .as_object()
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            joined(roles)
        }
        CellSource::ServicePorts => {
            let ports = o["spec"]["ports"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            joined(ports)
        }
        CellSource::SlicePorts => {
            let ports = o["ports"]
                .as_array()
                .map(|ps| ps.iter().map(|p| p["port"].to_string()).collect())
                .unwrap_or_default();
            joined(ports)
        }
        CellSource::SliceEndpoints => {
            let addresses = o["endpoints"]
                .as_array()
                .map(|es| {
                    es.iter()
                        .flat_map(|e| e["addresses"].as_array().into_iter().flatten())
                        .filter_map(|a| a.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            joined(addresses)
        }
    }
}

/// The JSONPath subset printer columns use: `.a.b`, `.a[0].b`, `{.a.b}`; `None` if absent.
pub fn jsonpath<'a>(o: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut v = o;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (field, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !field.is_empty() {
            v = v.get(field)?;
        }
        for index in indices.split('[').filter(|s| !s.is_empty()) {
            let i: usize = index.trim_end_matches(']').parse().ok()?;
            v = v.get(i)?;
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }

    #[test]
    fn paths() {
        let o = json!({"status": {"gateways": [{"node": "a"}], "x": {"y": 3}}});
        assert_eq!(jsonpath(&o, ".status.x.y"), Some(&json!(3)));
        assert_eq!(jsonpath(&o, ".status.gateways[0].node"), Some(&json!("a")));
        assert_eq!(jsonpath(&o, "{.status.missing}"), None);
    }
}
