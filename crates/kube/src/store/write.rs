//! Records written as API calls (module doc of [`super`]), leases as Lease objects, and
//! the leader election on one Lease.
//!
//! A transaction's compares are checked against the mirror; its operations then become
//! one call each. Kubernetes has no multi-object transaction: a transaction of several
//! operations (only the leader's garbage collection sends one) is applied in order and
//! may stop half-way on an error, which its caller retries; each of its operations is
//! idempotent. Where a compare names the record an operation writes, the call carries the
//! object's `resourceVersion` as precondition, so a concurrent writer makes it fail as
//! the compare would have on etcd.
//!
//! The election keeps etcd's recipe as the agent sees it (a candidate key under the
//! session's lease; the lowest create revision leads) on one `Lease`, as client-go's
//! leader election does: a candidate's key is created when its session *acquires* the
//! Lease (free, released, or not seen renewed for its duration), so the mirror only ever
//! holds the holder's key; the create call waits until then. Renewals carry the Lease's
//! `resourceVersion`: a holder that lost it gets 409 and its session ends.

use super::Inner;
use super::derive::{Kind, ObjectRef, names};
use crate::client::{Kind as ApiKind, KubeError};
use crate::location;
use serde_json::{Map, Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use trellis_model::keys::Key;
use trellis_model::{GatewaySet, Node, Observation, PathReport};
use trellis_store::{Compare, LeaseId, Op, Revision, Store, StoreError, TxnResult};

#[derive(Clone, Debug)]
pub(super) struct LocalLease {
    ttl: Duration,
    binding: Option<Binding>,
}

/// What a lease of the agent stands for on the API, known from the first key put under it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Binding {
    /// The node's own Lease (`node.NAME`), and whether it was written under this lease yet.
    Node { node: String, written: bool },
    /// The leader Lease, held by this session.
    Leader { session: u64, identity: String },
}

pub(super) fn grant(inner: &Inner, ttl: Duration) -> LeaseId {
    let id = inner.next_lease.fetch_add(1, Ordering::Relaxed);
    inner
        .leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, LocalLease { ttl, binding: None });
    id
}

fn local_lease(inner: &Inner, id: LeaseId) -> Result<LocalLease, StoreError> {
    inner
        .leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned()
        .ok_or(StoreError::LeaseNotFound(id))
}

fn bind(inner: &Inner, id: LeaseId, binding: Binding) {
    if let Some(l) = inner
        .leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(&id)
    {
        l.binding = Some(binding);
    }
}

/// Now, as the API's `MicroTime`.
fn micro_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

fn seconds(ttl: Duration) -> u64 {
    ttl.as_secs_f64().ceil().max(1.0) as u64
}

/// What one operation came to.
enum Outcome {
    Done,
    /// The API refused it for a stale precondition: the transaction did not succeed.
    Conflict,
}

pub(super) async fn txn(
    inner: &Inner,
    compares: Vec<Compare>,
    ops: Vec<Op>,
) -> trellis_store::Result<TxnResult> {
    if !compares.is_empty() {
        let checked = inner.mirror.txn(compares.clone(), vec![]).await?;
        if !checked.succeeded {
            return Ok(checked);
        }
    }
    let mut revision = None;
    for op in ops {
        match apply(inner, &compares, op).await? {
            (Outcome::Done, r) => revision = revision.max(r),
            (Outcome::Conflict, _) => {
                return Ok(TxnResult {
                    succeeded: false,
                    revision: inner.mirror.revision(),
                });
            }
        }
    }
    Ok(TxnResult {
        succeeded: true,
        revision: revision.unwrap_or_else(|| inner.mirror.revision()),
    })
}

fn read_only(key: &str, instead: &str) -> StoreError {
    StoreError::Denied(format!(
        "{key}: on Kubernetes this record is the API server's ({instead}); Trellis does not write it"
    ))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Protocol(format!("{key}: {e}")))
}

/// One operation as an API call; the revision is the one a created record got, if any.
async fn apply(
    inner: &Inner,
    compares: &[Compare],
    op: Op,
) -> Result<(Outcome, Option<Revision>), StoreError> {
    let (key_text, value, lease) = match &op {
        Op::Put { key, value, lease } => (key.as_str(), Some(value.as_slice()), *lease),
        Op::Delete { key } => (key.as_str(), None, None),
    };
    let key = Key::parse(key_text)
        .ok_or_else(|| StoreError::Protocol(format!("{key_text}: not a key of Trellis")))?;
    let done = |r: Option<Revision>| Ok((Outcome::Done, r));
    match key {
        Key::Node(name) => {
            let patch = match value {
                Some(v) => {
                    let node: Node = decode(key_text, v)?;
                    let current = object(inner, Kind::Node, "", &name).await.ok_or_else(|| {
                        StoreError::Unavailable(format!(
                            "{key_text}: the cluster has no Node {name} (the kubelet creates it)"
                        ))
                    })?;
                    crate::node::annotations_patch(&current, &node)
                }
                None => Some(crate::node::removal_patch()),
            };
            if let Some(patch) = patch {
                patch_object(inner, Kind::Node, &name, &patch, false).await?;
            }
            done(None)
        }
        Key::Status(node) => {
            let text = value.map(|v| String::from_utf8_lossy(v).into_owned());
            node_lease_annotation(inner, lease, &node, names::STATUS_ANNOTATION, text).await?;
            done(None)
        }
        Key::Path { from, to } => {
            let text = match value {
                Some(v) => {
                    let report: PathReport = decode(key_text, v)?;
                    Some(if report.up { "up" } else { "down" }.to_string())
                }
                None => None,
            };
            let annotation = format!("{}{to}", names::PATH_ANNOTATION_PREFIX);
            node_lease_annotation(inner, lease, &from, &annotation, text).await?;
            done(None)
        }
        Key::Observation { gateway, observer } => {
            if let Some(lease) = lease {
                bind_node(inner, lease, &observer);
            }
            let up = match value {
                Some(v) => Some(decode::<Observation>(key_text, v)?.up),
                None => None,
            };
            let Some(loc) = location_of(inner, &gateway, &observer).await else {
                if up.is_none() {
                    return done(None);
                }
                return Err(StoreError::Unavailable(format!(
                    "{key_text}: gateway {gateway} has no node record to place it in a location"
                )));
            };
            ensure_location(inner, &loc).await?;
            let current = object(inner, Kind::Location, "", &loc)
                .await
                .unwrap_or(Value::Null);
            let mut patch = match up {
                Some(up) => location::opinion_patch(&observer, &gateway, up),
                None => {
                    // The observer's last opinion goes with its entry, not as an empty map.
                    let others = current["status"]["opinions"][&observer]
                        .as_object()
                        .is_some_and(|o| o.keys().any(|g| *g != gateway));
                    let entry = if others {
                        json!({gateway.as_str(): null})
                    } else {
                        Value::Null
                    };
                    json!({"status": {"opinions": {observer.as_str(): entry}}})
                }
            };
            let verdict = super::derive::forwarding_summary(&current, &gateway, &observer, up);
            if current["status"]["candidates"][&gateway].as_str() != Some(verdict) {
                patch["status"]["candidates"] = json!({gateway.as_str(): verdict});
            }
            patch_object(inner, Kind::Location, &loc, &patch, true).await?;
            done(None)
        }
        Key::Gateways(loc) => {
            let Some(v) = value else {
                return Err(read_only(key_text, "a Location is deleted with kubectl"));
            };
            let set: GatewaySet = decode(key_text, v)?;
            ensure_location(inner, &loc).await?;
            let current = object(inner, Kind::Location, "", &loc)
                .await
                .unwrap_or(Value::Null);
            let previous: Vec<Option<String>> = current["status"]["slots"]
                .as_array()
                .map(|a| a.iter().map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default();
            let standby = standby(inner, &loc, &set.slots).await;
            let mut patch =
                super::derive::slots_patch(&previous, &set.slots, &standby, &micro_now());
            let compared = compares.iter().any(|c| match c {
                Compare::ModRevision(k, _) | Compare::Absent(k) => k == key_text,
                _ => false,
            });
            if compared && let Some(rv) = current["metadata"]["resourceVersion"].as_str() {
                patch["metadata"] = json!({"resourceVersion": rv});
            }
            match patch_object(inner, Kind::Location, &loc, &patch, true).await {
                Err(e) if is_code(&e, 409) => Ok((Outcome::Conflict, None)),
                Err(e) => Err(e.into()),
                Ok(()) => done(None),
            }
        }
        Key::Candidate(session) => match value {
            Some(v) => {
                let lease =
                    lease.ok_or_else(|| StoreError::Protocol(format!("{key_text}: no lease")))?;
                let identity = String::from_utf8_lossy(v).into_owned();
                let revision = acquire(inner, lease, session, &identity).await?;
                done(Some(revision))
            }
            None => {
                release(inner, session).await;
                done(None)
            }
        },
        Key::Settings => {
            let data = match value {
                Some(v) => json!({names::SETTINGS_KEY: String::from_utf8_lossy(v)}),
                None => json!({names::SETTINGS_KEY: null}),
            };
            let ns = inner.namespace.clone();
            let present = object(inner, Kind::ConfigMap, &ns, names::SETTINGS_CONFIG_MAP)
                .await
                .is_some();
            if !present && value.is_some() {
                let cm = json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": names::SETTINGS_CONFIG_MAP, "namespace": ns},
                    "data": data,
                });
                match create(inner, Kind::ConfigMap, &cm).await {
                    Err(e) if is_code(&e, 409) => {}
                    other => {
                        other?;
                        return done(None);
                    }
                }
            }
            patch_object(
                inner,
                Kind::ConfigMap,
                names::SETTINGS_CONFIG_MAP,
                &json!({"data": data}),
                false,
            )
            .await?;
            done(None)
        }
        Key::Peer(_) => Err(read_only(
            key_text,
            "apply a kilo.squat.ai/v1alpha1 Peer with kubectl",
        )),
        Key::Service { .. } | Key::EndpointSlice { .. } | Key::NetworkPolicy { .. } => {
            Err(read_only(key_text, "apply it with kubectl"))
        }
        Key::Pod { .. } | Key::Namespace(_) => Err(read_only(
            key_text,
            "pods and namespaces are the cluster's own objects",
        )),
        Key::ServiceIp(_) | Key::NodePort(_) => Err(read_only(
            key_text,
            "the API server allocates ClusterIPs and node ports",
        )),
        Key::PodCidr(_) => Err(read_only(
            key_text,
            "pod CIDRs are the Node's spec.podCIDRs, given by the controller manager",
        )),
    }
}

async fn object(inner: &Inner, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
    inner
        .view
        .lock()
        .await
        .objects
        .get(&ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        })
        .cloned()
}

/// A merge patch of one object (or its status); the answer goes into the mirror.
async fn patch_object(
    inner: &Inner,
    kind: Kind,
    name: &str,
    patch: &Value,
    status: bool,
) -> Result<(), KubeError> {
    let api = kind.api();
    let ns = inner.kind_namespace(kind);
    let patched = inner
        .call(inner.kube.merge_patch(&api, ns, name, patch, status))
        .await?;
    inner.upsert(kind, patched).await;
    Ok(())
}

async fn create(inner: &Inner, kind: Kind, object: &Value) -> Result<(), KubeError> {
    let api = kind.api();
    let ns = inner.kind_namespace(kind);
    let created = inner.call(inner.kube.create(&api, ns, object)).await?;
    inner.upsert(kind, created).await;
    Ok(())
}

/// Whether the API refused the call with this status code (409: a stale version or a
/// name taken; 404: gone).
fn is_code(e: &KubeError, code: u16) -> bool {
    matches!(e, KubeError::Refused { code: c, .. } if *c == code)
}

fn bind_node(inner: &Inner, lease: LeaseId, node: &str) {
    let mut leases = inner.leases.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = leases.get_mut(&lease)
        && l.binding.is_none()
    {
        l.binding = Some(Binding::Node {
            node: node.into(),
            written: false,
        });
    }
}

/// Sets (or, with `None`, removes) one annotation of the node's Lease. The first write
/// under a new lease also clears what an earlier run of the agent left there, and (re)takes
/// the Lease: a new session of the agent starts from nothing, as a new lease on etcd does.
async fn node_lease_annotation(
    inner: &Inner,
    lease: Option<LeaseId>,
    node: &str,
    annotation: &str,
    value: Option<String>,
) -> Result<(), StoreError> {
    let name = names::node_lease(node);
    let ns = inner.namespace.clone();
    let current = object(inner, Kind::Lease, &ns, &name).await;
    let (ttl, fresh) = match lease {
        Some(id) => {
            bind_node(inner, id, node);
            let local = local_lease(inner, id)?;
            let fresh = matches!(local.binding, Some(Binding::Node { written: false, .. }));
            (Some(local.ttl), fresh)
        }
        None => (None, false),
    };
    let mut annotations = Map::new();
    if fresh
        && let Some(old) = current
            .as_ref()
            .and_then(|c| c["metadata"]["annotations"].as_object())
    {
        for key in old.keys() {
            if key == names::STATUS_ANNOTATION || key.starts_with(names::PATH_ANNOTATION_PREFIX) {
                annotations.insert(key.clone(), Value::Null);
            }
        }
    }
    annotations.insert(annotation.into(), value.map_or(Value::Null, Value::String));
    let now = micro_now();
    let result = match (&current, ttl) {
        (None, None) => return Ok(()), // removing from a Lease that is not there
        (None, Some(ttl)) => {
            annotations.retain(|_, v| !v.is_null());
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                    "labels": {"app.kubernetes.io/managed-by": "trellis"}},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": seconds(ttl),
                    "acquireTime": now, "renewTime": now},
            });
            create(inner, Kind::Lease, &lease).await
        }
        (Some(_), ttl) => {
            let mut patch = json!({"metadata": {"annotations": annotations}});
            if fresh && let Some(ttl) = ttl {
                patch["spec"] = json!({"holderIdentity": node,
                    "leaseDurationSeconds": seconds(ttl), "acquireTime": now, "renewTime": now});
            }
            patch_object(inner, Kind::Lease, &name, &patch, false).await
        }
    };
    match result {
        Err(e) if is_code(&e, 404) && ttl.is_none() => Ok(()),
        Err(e) => Err(e.into()),
        Ok(()) => {
            if let Some(id) = lease {
                bind(
                    inner,
                    id,
                    Binding::Node {
                        node: node.into(),
                        written: true,
                    },
                );
            }
            Ok(())
        }
    }
}

/// The location an observation belongs in: the gateway's, or for a removal of a gateway
/// that left, any Location holding the opinion.
async fn location_of(inner: &Inner, gateway: &str, observer: &str) -> Option<String> {
    if let Ok(Some(kv)) = inner.mirror.get(&trellis_model::keys::node(gateway)).await
        && let Ok(node) = serde_json::from_slice::<Node>(&kv.value)
    {
        return Some(node.location);
    }
    let view = inner.view.lock().await;
    view.objects
        .iter()
        .filter(|(at, _)| at.kind == Kind::Location)
        .find(|(_, o)| !o["status"]["opinions"][observer][gateway].is_null())
        .map(|(at, _)| at.name.clone())
}

async fn ensure_location(inner: &Inner, name: &str) -> Result<(), StoreError> {
    if object(inner, Kind::Location, "", name).await.is_some() {
        return Ok(());
    }
    let loc = json!({
        "apiVersion": format!("{}/{}", location::GROUP, location::VERSION),
        "kind": location::KIND,
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "trellis"}},
    });
    match create(inner, Kind::Location, &loc).await {
        Err(e) if is_code(&e, 409) => Ok(()),
        other => Ok(other?),
    }
}

/// The location's eligible gateways not in a slot.
async fn standby(inner: &Inner, loc: &str, slots: &[Option<String>]) -> Vec<String> {
    let Ok((nodes, _)) = inner.mirror.list(trellis_model::keys::NODES).await else {
        return Vec::new();
    };
    nodes
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Node>(&kv.value).ok())
        .filter(|n| n.location == loc && n.gateway.eligible)
        .map(|n| n.name)
        .filter(|n| !slots.iter().flatten().any(|s| s == n))
        .collect()
}

pub(super) async fn keep_alive(inner: &Inner, id: LeaseId) -> trellis_store::Result<()> {
    let local = local_lease(inner, id)?;
    match local.binding {
        None => Ok(()),
        Some(Binding::Node { node, .. }) => {
            let patch = json!({"spec": {"renewTime": micro_now(), "holderIdentity": node,
                "leaseDurationSeconds": seconds(local.ttl)}});
            match patch_object(inner, Kind::Lease, &names::node_lease(&node), &patch, false).await {
                Err(e) if is_code(&e, 404) => Err(StoreError::LeaseNotFound(id)),
                other => Ok(other?),
            }
        }
        Some(Binding::Leader { session, identity }) => {
            renew_leader(inner, id, session, &identity).await
        }
    }
}

pub(super) async fn revoke(inner: &Inner, id: LeaseId) -> trellis_store::Result<()> {
    let local = local_lease(inner, id)?;
    inner
        .leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    match local.binding {
        None => Ok(()),
        Some(Binding::Node { node, .. }) => {
            let api = ApiKind::lease();
            inner
                .call(
                    inner
                        .kube
                        .delete(&api, Some(&inner.namespace), &names::node_lease(&node)),
                )
                .await
                .map_err(StoreError::from)
        }
        Some(Binding::Leader { session, .. }) => {
            release(inner, session).await;
            Ok(())
        }
    }
}

/// Whether the leader Lease `lease` is held by this session.
fn held_by(lease: &Value, session: u64, identity: &str) -> bool {
    lease["spec"]["holderIdentity"].as_str() == Some(identity)
        && lease["metadata"]["annotations"][names::CANDIDATE_ANNOTATION].as_str()
            == Some(&format!("{session:x}"))
}

/// Waits until this session holds the leader Lease; returns its candidate key's create
/// revision in the mirror (the term's epoch).
async fn acquire(
    inner: &Inner,
    lease: LeaseId,
    session: u64,
    identity: &str,
) -> Result<Revision, StoreError> {
    let ttl = local_lease(inner, lease)?.ttl;
    let ns = inner.namespace.clone();
    let key = trellis_model::keys::candidate(session);
    loop {
        let changed = inner.changed.notified();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        let (current, live) = {
            let view = inner.view.lock().await;
            let at = ObjectRef {
                kind: Kind::Lease,
                namespace: ns.clone(),
                name: names::LEADER_LEASE.into(),
            };
            (
                view.objects.get(&at).cloned(),
                view.liveness.is_live(names::LEADER_LEASE, Instant::now()),
            )
        };
        let now = micro_now();
        let mut spec = json!({"holderIdentity": identity, "leaseDurationSeconds": seconds(ttl),
            "acquireTime": now, "renewTime": now});
        let annotations = json!({names::CANDIDATE_ANNOTATION: format!("{session:x}")});
        let attempt = match &current {
            None => {
                spec["leaseTransitions"] = json!(0);
                let object = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": names::LEADER_LEASE, "namespace": ns,
                        "annotations": annotations,
                        "labels": {"app.kubernetes.io/managed-by": "trellis"}},
                    "spec": spec,
                });
                Some(create(inner, Kind::Lease, &object).await)
            }
            Some(lease_object) if !live || held_by(lease_object, session, identity) => {
                let transitions = lease_object["spec"]["leaseTransitions"]
                    .as_u64()
                    .unwrap_or(0);
                spec["leaseTransitions"] = json!(transitions + 1);
                let rv = lease_object["metadata"]["resourceVersion"].clone();
                let patch = json!({"metadata": {"resourceVersion": rv, "annotations": annotations},
                    "spec": spec});
                Some(patch_object(inner, Kind::Lease, names::LEADER_LEASE, &patch, false).await)
            }
            Some(_) => None, // held and renewed: wait for a change
        };
        match attempt {
            Some(Ok(())) => {
                bind(
                    inner,
                    lease,
                    Binding::Leader {
                        session,
                        identity: identity.into(),
                    },
                );
                if let Some(kv) = inner.mirror.get(&key).await? {
                    tracing::info!(
                        session = format!("{session:x}"),
                        "acquired the leader Lease {ns}/{}",
                        names::LEADER_LEASE
                    );
                    return Ok(kv.create_revision);
                }
            }
            Some(Err(e)) if is_code(&e, 409) => {} // someone was quicker: look again
            Some(Err(e)) => tracing::debug!("leader election: acquiring the Lease: {e}"),
            None => {}
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    }
}

async fn renew_leader(
    inner: &Inner,
    id: LeaseId,
    session: u64,
    identity: &str,
) -> trellis_store::Result<()> {
    let ns = inner.namespace.clone();
    let mut current = object(inner, Kind::Lease, &ns, names::LEADER_LEASE).await;
    for _ in 0..2 {
        let Some(lease) = current.as_ref().filter(|l| held_by(l, session, identity)) else {
            return Err(StoreError::LeaseNotFound(id));
        };
        let patch = json!({"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": {"renewTime": micro_now()}});
        match patch_object(inner, Kind::Lease, names::LEADER_LEASE, &patch, false).await {
            Ok(()) => return Ok(()),
            Err(e) if is_code(&e, 404) => return Err(StoreError::LeaseNotFound(id)),
            Err(e) if is_code(&e, 409) => {
                // Someone else wrote it: read it afresh and look again.
                current = inner
                    .call(
                        inner
                            .kube
                            .get(&ApiKind::lease(), Some(&ns), names::LEADER_LEASE),
                    )
                    .await
                    .map_err(StoreError::from)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::LeaseNotFound(id))
}

/// Gives the leader Lease up if this session holds it, so a successor need not wait.
async fn release(inner: &Inner, session: u64) {
    let ns = inner.namespace.clone();
    let Some(lease) = object(inner, Kind::Lease, &ns, names::LEADER_LEASE).await else {
        return;
    };
    if lease["metadata"]["annotations"][names::CANDIDATE_ANNOTATION].as_str()
        != Some(&format!("{session:x}"))
    {
        return;
    }
    let patch = json!({"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"],
        "annotations": {names::CANDIDATE_ANNOTATION: null}},
        "spec": {"holderIdentity": null}});
    if let Err(e) = patch_object(inner, Kind::Lease, names::LEADER_LEASE, &patch, false).await {
        tracing::debug!("releasing the leader Lease: {e}");
    }
}

/// Removes what an agent of `node` kept in the API: its annotations on the Node (only
/// Trellis's own; Kilo's, set by users, stay) and its Lease. For uninstalling; each step
/// is idempotent.
pub async fn forget_node(
    kube: &crate::client::Kube,
    namespace: &str,
    node: &str,
) -> Result<(), KubeError> {
    match kube
        .merge_patch(
            &ApiKind::node(),
            None,
            node,
            &crate::node::removal_patch(),
            false,
        )
        .await
    {
        Ok(_) | Err(KubeError::Refused { code: 404, .. }) => {}
        Err(e) => return Err(e),
    }
    kube.delete(&ApiKind::lease(), Some(namespace), &names::node_lease(node))
        .await
}
