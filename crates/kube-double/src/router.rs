//! HTTP routing: discovery paths, then resource paths
//! (`/api/v1[/namespaces/{ns}]/{resource}[/{name}[/status]]` and the same under
//! `/apis/{group}/{version}`), each verb turned into a store operation or a watch.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use crate::Options;
use crate::discovery;
use crate::patch::{self, PatchType};
use crate::resources::ResourceDef;
use crate::select::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{Preconditions, State};
use crate::table;
use crate::watchstream::{self, WatchFilter};

pub type Body = BoxBody<Bytes, Infallible>;

/// What every connection shares.
pub struct Shared {
    pub state: Mutex<State>,
    pub options: Options,
    pub server: String,
    /// Bumped to end every open watch, as an API server restart does.
    pub watch_generation: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("a response of a valid status and header")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

fn not_found() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// `a=b&c=d%3De` into a map (`+` is a space, as Go's query encoding writes it).
pub fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A resolved resource path.
struct Target {
    def: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn resolve(state: &State, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let namespaced_form = rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"));
    let (namespace, rest) = if namespaced_form {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let def = state
        .registry
        .find(group, version, rest[0])
        .cloned()
        .ok_or_else(not_found)?;
    if namespace.is_some() && !def.namespaced || rest.len() > 3 {
        return Err(not_found());
    }
    let name = rest.get(1).map(|s| s.to_string());
    if def.namespaced && name.is_some() && namespace.is_none() {
        return Err(not_found());
    }
    let status = match rest.get(2) {
        None => false,
        Some(&"status") if def.status_subresource => true,
        Some(_) => return Err(not_found()),
    };
    Ok(Target {
        def,
        namespace,
        name,
        status,
    })
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let accept = header(header::ACCEPT);
    let content_type = header(header::CONTENT_TYPE);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the body: {e}"
            ))));
        }
    };
    tracing::debug!(%method, %path, ?query, "kube-double request");
    let response = route(
        &shared,
        &method,
        &path,
        &query,
        &accept,
        &content_type,
        &body,
    )
    .await
    .unwrap_or_else(|e| error_response(&e));
    Ok(response)
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    accept: &str,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let state = shared.lock();
    let discovery_doc = match segments.as_slice() {
        ["version"] => Some(discovery::version()),
        ["healthz" | "readyz" | "livez"] => {
            return Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()));
        }
        ["api"] => Some(discovery::core_versions(&shared.server)),
        ["api", "v1"] => {
            Some(discovery::resource_list(&state.registry, "", "v1").ok_or_else(not_found)?)
        }
        ["apis"] => Some(discovery::group_list(&state.registry)),
        ["apis", g] => Some(discovery::group(&state.registry, g).ok_or_else(not_found)?),
        ["apis", g, v] => {
            Some(discovery::resource_list(&state.registry, g, v).ok_or_else(not_found)?)
        }
        _ => None,
    };
    if let Some(doc) = discovery_doc {
        return if *method == Method::GET {
            Ok(json_response(200, &doc))
        } else {
            Err(ApiError::method_not_allowed("discovery is read-only"))
        };
    }
    let target = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => resolve(&state, "", "v1", rest)?,
        ["apis", g, v, rest @ ..] if !rest.is_empty() => resolve(&state, g, v, rest)?,
        _ => return Err(not_found()),
    };
    drop(state);
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    match (method, &target.name) {
        (&Method::GET, None) if watching => watch(shared, &target, query, accept),
        (&Method::GET, None) => list(shared, &target, query, accept),
        (&Method::GET, Some(name)) => {
            let object = shared.lock().get(&target.def, ns(&target), name)?;
            if table::wants_table(accept) {
                let rv = shared.lock().resource_version();
                return Ok(json_response(
                    200,
                    &table::table(&target.def, &[object], rv, include(query)),
                ));
            }
            Ok(json_response(200, &object))
        }
        (&Method::POST, None) => {
            let object: Value = parse_body(body)?;
            let namespace = match &target.namespace {
                Some(n) => n.clone(),
                None if target.def.namespaced => object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                None => String::new(),
            };
            let created = shared.lock().create(&target.def, &namespace, object)?;
            Ok(json_response(201, &created))
        }
        (&Method::PUT, Some(name)) => {
            let object: Value = parse_body(body)?;
            let updated =
                shared
                    .lock()
                    .update(&target.def, ns(&target), name, object, target.status)?;
            Ok(json_response(200, &updated))
        }
        (&Method::PATCH, Some(name)) => {
            let kind = PatchType::from_content_type(content_type)?;
            if kind == PatchType::Strategic && target.def.custom {
                return Err(ApiError::unsupported_media_type(
                    "strategic merge patch is not supported for custom resources: use a merge patch or a JSON patch",
                ));
            }
            let mut state = shared.lock();
            let current = state.get(&target.def, ns(&target), name)?;
            let patched = patch::apply(kind, &current, body)?;
            let updated = state.update(&target.def, ns(&target), name, patched, target.status)?;
            Ok(json_response(200, &updated))
        }
        (&Method::DELETE, Some(name)) => {
            let options: Value = if body.is_empty() {
                json!({})
            } else {
                parse_body(body)?
            };
            let text = |v: &Value| v.as_str().map(str::to_string);
            let pre = Preconditions {
                resource_version: text(&options["preconditions"]["resourceVersion"]),
                uid: text(&options["preconditions"]["uid"]),
            };
            let deleted = shared.lock().delete(&target.def, ns(&target), name, &pre)?;
            Ok(json_response(200, &deleted))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {path}"
        ))),
    }
}

fn ns(target: &Target) -> &str {
    target.namespace.as_deref().unwrap_or("")
}

fn include(query: &HashMap<String, String>) -> &str {
    query
        .get("includeObject")
        .map(String::as_str)
        .unwrap_or("Metadata")
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not JSON (the double speaks JSON only): {e}"
        ))
    })
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or("");
    Ok((
        LabelSelector::parse(get("labelSelector"))?,
        FieldSelector::parse(get("fieldSelector"))?,
    ))
}

/// A list: always the newest state, whatever `resourceVersion` asks (`limit` and `continue`
/// are accepted and ignored: everything comes in one page, without a `continue` token).
fn list(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(query)?;
    let state = shared.lock();
    let items = state.list(&target.def, target.namespace.as_deref(), &labels, &fields);
    let rv = state.resource_version();
    drop(state);
    if table::wants_table(accept) {
        return Ok(json_response(
            200,
            &table::table(&target.def, &items, rv, include(query)),
        ));
    }
    Ok(json_response(
        200,
        &json!({
            "kind": target.def.list_kind,
            "apiVersion": target.def.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    ))
}

fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(query)?;
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(std::time::Duration::from_secs);
    let filter = WatchFilter {
        def: target.def.clone(),
        namespace: target.namespace.clone(),
        labels,
        fields,
        bookmarks: matches!(
            query.get("allowWatchBookmarks").map(String::as_str),
            Some("true" | "1")
        ),
        table: table::wants_table(accept).then(|| include(query).to_string()),
    };
    Ok(watchstream::start(shared.clone(), filter, from, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x");
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
        assert_eq!(q["x"], "");
        assert_eq!(decode("100%"), "100%");
    }
}
