//! The patch types of `PATCH` requests, chosen by `Content-Type`:
//! - `application/merge-patch+json`: RFC 7386 JSON merge patch;
//! - `application/json-patch+json`: RFC 6902 JSON patch (a failed `test` is `422 Invalid`);
//! - `application/strategic-merge-patch+json`: APPROXIMATED, see the `strategic` module (merge
//!   keys from a small table of paths, not the schema). Refused with `415` for custom
//!   resources, as the real API does;
//! - `application/apply-patch+yaml` (server-side apply) is not implemented: `415`.

use serde_json::Value;

use crate::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            other => Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json (got {other:?})"
            ))),
        }
    }
}

/// The object after applying `body` to `target`.
pub fn apply(kind: PatchType, target: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let mut out = target.clone();
    match kind {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut out, &ops)
                .map_err(|e| ApiError::invalid(format!("the patch could not be applied: {e}")))?;
        }
        PatchType::Merge | PatchType::Strategic => {
            let doc: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid merge patch: {e}")))?;
            if !doc.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            if kind == PatchType::Strategic {
                crate::strategic::apply(&mut out, &doc, "");
            } else {
                json_patch::merge(&mut out, &doc);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_json_and_strategic() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1, 2]}});
        let m = apply(
            PatchType::Merge,
            &o,
            br#"{"metadata":{"labels":{"a":null,"c":"3"}}}"#,
        )
        .unwrap();
        assert_eq!(m["metadata"]["labels"], json!({"b": "2", "c": "3"}));
        let j = apply(PatchType::Json, &o, br#"[{"op":"test","path":"/spec/x/0","value":1},{"op":"add","path":"/spec/x/-","value":3}]"#)
            .unwrap();
        assert_eq!(j["spec"]["x"], json!([1, 2, 3]));
        let failed = apply(
            PatchType::Json,
            &o,
            br#"[{"op":"test","path":"/spec/x/0","value":9}]"#,
        )
        .unwrap_err();
        assert_eq!(failed.code, 422);
        let s = apply(
            PatchType::Strategic,
            &o,
            br#"{"$setElementOrder/x":[1],"spec":{"$retainKeys":["x"],"x":[7]}}"#,
        )
        .unwrap();
        assert_eq!(s["spec"], json!({"x": [7]}));
    }
}
