//! Strategic merge patch for the built-in kinds, as far as the double needs it: a JSON merge
//! patch, except that the lists Kubernetes declares with a patch merge key are merged
//! element by element on that key (`spec.ports` on `port`, `status.conditions` on `type`, …),
//! elements marked `{"$patch": "delete"}` are removed, `$setElementOrder/<list>` orders the
//! result, lists of scalars declared `patchStrategy: merge` (`metadata.finalizers`,
//! `spec.podCIDRs`) are unions minus `$deleteFromPrimitiveList/<list>`, and
//! `{"$patch": "replace"}` replaces a map. Other lists are replaced whole; `$retainKeys` is
//! ignored. The merge keys come from a small table of paths, not from the OpenAPI schema.

use serde_json::{Map, Value};

/// The patch merge key of a list at `path` (`spec.containers[].ports`), if it has one; `""`
/// for a list of scalars merged as a set.
fn merge_key(path: &str) -> Option<&'static str> {
    Some(match path {
        "metadata.ownerReferences" => "uid",
        "metadata.finalizers" | "spec.podCIDRs" => "",
        "spec.ports" => "port",
        "status.conditions" | "status.addresses" => "type",
        "spec.containers"
        | "spec.initContainers"
        | "spec.volumes"
        | "spec.containers[].env"
        | "spec.initContainers[].env" => "name",
        "spec.containers[].ports" | "spec.initContainers[].ports" => "containerPort",
        "spec.containers[].volumeMounts" | "spec.initContainers[].volumeMounts" => "mountPath",
        _ => return None,
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Applies `patch` (an object) to `target` at `path`.
pub fn apply(target: &mut Value, patch: &Value, path: &str) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = strip(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        let here = join(path, k);
        let t = target.as_object_mut().expect("made an object above");
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => apply(t.entry(k.clone()).or_insert(Value::Null), v, &here),
            Value::Array(items) => match (merge_key(&here), t.get_mut(k)) {
                (Some(""), Some(Value::Array(existing))) => {
                    for i in items {
                        if !existing.contains(i) {
                            existing.push(i.clone());
                        }
                    }
                }
                (Some(key), Some(Value::Array(existing))) if !key.is_empty() => {
                    merge_list(existing, items, key, &format!("{here}[]"))
                }
                _ => {
                    t.insert(
                        k.clone(),
                        Value::Array(items.iter().filter(|i| !is_delete(i)).map(strip).collect()),
                    );
                }
            },
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/")
            && let (Some(Value::Array(existing)), Some(gone)) = (t.get_mut(list), v.as_array())
        {
            existing.retain(|e| !gone.contains(e));
        }
    }
    for (k, v) in p {
        if let Some(list) = k.strip_prefix("$setElementOrder/")
            && let (Some(Value::Array(existing)), Some(order)) = (t.get_mut(list), v.as_array())
        {
            let key = merge_key(&join(path, list)).unwrap_or("");
            let rank = |e: &Value| {
                let id = if key.is_empty() { e } else { &e[key] };
                order
                    .iter()
                    .position(|o| (if key.is_empty() { o } else { &o[key] }) == id)
                    .unwrap_or(usize::MAX)
            };
            existing.sort_by_key(rank);
        }
    }
}

fn is_delete(v: &Value) -> bool {
    v.get("$patch").and_then(Value::as_str) == Some("delete")
}

fn merge_list(existing: &mut Vec<Value>, items: &[Value], key: &str, path: &str) {
    for item in items {
        let id = &item[key];
        let found = existing.iter().position(|e| &e[key] == id);
        match (is_delete(item), found) {
            (true, Some(i)) => {
                existing.remove(i);
            }
            (true, None) => {}
            (false, Some(i)) => apply(&mut existing[i], item, path),
            (false, None) => existing.push(strip(item)),
        }
    }
}

/// The value without `$` directives.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_merge_on_their_keys() {
        let mut svc = json!({"metadata": {"finalizers": ["a"]}, "spec": {"ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ], "selector": {"app": "web"}}});
        // What kubectl apply sends when port 80 becomes 81.
        let patch = json!({
            "metadata": {"finalizers": ["b"], "$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"$setElementOrder/ports": [{"port": 81}, {"port": 53}],
                     "ports": [{"name": "http", "port": 81, "targetPort": 8080}, {"$patch": "delete", "port": 80}],
                     "selector": {"$patch": "replace", "app": "web2"}},
        });
        apply(&mut svc, &patch, "");
        assert_eq!(svc["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"name": "http", "port": 81, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}])
        );
        assert_eq!(svc["spec"]["selector"], json!({"app": "web2"}));
        let mut node = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "DiskPressure", "status": "False"}]}});
        apply(
            &mut node,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            "",
        );
        assert_eq!(
            node["status"]["conditions"][0],
            json!({"type": "Ready", "status": "True"})
        );
        assert_eq!(node["status"]["conditions"].as_array().unwrap().len(), 2);
    }
}
