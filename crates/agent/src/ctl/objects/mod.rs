//! `trellis apply|delete|get`: Services and EndpointSlices in the store, written as the
//! API server would write them.
//!
//! An apply is one transaction: every object was decoded and validated before (see
//! [`trellis_model::object::documents`]), here each is defaulted, given its ClusterIPs and
//! node ports, validated again, and then all are written together or none is. Each write
//! is conditional on the revision of the record it replaces, and each newly allocated
//! value is a claim key created only if absent, so two writers racing for the same object
//! or the same address cannot both succeed; the loser reads again and retries.

mod records;
mod table;
#[cfg(test)]
mod tests;

pub use table::table;

use super::CtlError;
use records::{Claimed, Current, server_fields};
use std::fmt;
use trellis_model::{
    ClaimHolder, Claims, ClusterSettings, InvalidField, Kind, Object, ServiceSettings, Validate,
    allocate, decode, keys,
};
use trellis_store::{Compare, Op, Store};

type Result<T> = std::result::Result<T, CtlError>;

/// How often an apply or delete that lost a race to another writer starts over.
const ATTEMPTS: u64 = 8;
/// etcd's default `--max-txn-ops`, which the served embedded store enforces too.
const MAX_TXN_OPS: usize = 128;

/// What an apply did to one object, in `kubectl`'s words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

/// One object an apply or delete touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub outcome: Outcome,
}

/// `service/web created`, as `kubectl apply` prints it.
impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match self.outcome {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        };
        write!(f, "{}/{} {outcome}", self.kind.resource(), self.name)
    }
}

/// An object named by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn of(object: &Object) -> ObjectRef {
        let m = object.metadata();
        ObjectRef {
            kind: object.kind(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
        }
    }

    fn key(&self) -> String {
        self.kind.key(&self.namespace, &self.name)
    }
}

/// What one attempt will write.
#[derive(Default)]
struct Txn {
    compares: Vec<Compare>,
    ops: Vec<Op>,
}

impl Txn {
    fn claim(&mut self, key: String, holder: &ClaimHolder) {
        self.compares.push(Compare::Absent(key.clone()));
        self.ops.push(Op::Put {
            key,
            value: holder.to_bytes(),
            lease: None,
        });
    }

    fn release(&mut self, key: String, holder: &ClaimHolder) {
        self.compares
            .push(Compare::Value(key.clone(), holder.to_bytes()));
        self.ops.push(Op::Delete { key });
    }

    fn replace(&mut self, key: &str, current: &Current) {
        self.compares.push(match current.revision {
            Some(revision) => Compare::ModRevision(key.to_string(), revision),
            None => Compare::Absent(key.to_string()),
        });
    }

    /// Runs the transaction; `false` when a compare failed (another writer was first).
    async fn commit(self, store: &dyn Store) -> Result<bool> {
        if self.ops.is_empty() {
            return Ok(true);
        }
        if self.ops.len() > MAX_TXN_OPS || self.compares.len() > MAX_TXN_OPS {
            return Err(CtlError::Refused(format!(
                "this change needs {} writes in one transaction, more than the store's limit \
                 of {MAX_TXN_OPS}: apply the objects in smaller groups",
                self.ops.len().max(self.compares.len())
            )));
        }
        Ok(store.txn(self.compares, self.ops).await?.succeeded)
    }
}

/// Creates or updates every object, all in one transaction: each is reported created,
/// configured or unchanged, in the order given. `objects` are decoded ones; a refusal
/// names the object's index in `objects`.
pub async fn apply(store: &dyn Store, objects: Vec<Object>) -> Result<Vec<Applied>> {
    for attempt in 0..ATTEMPTS {
        let settings = service_settings(store).await?;
        let mut claimed = Claimed::load(store).await?;
        let mut txn = Txn::default();
        let mut applied = Vec::with_capacity(objects.len());
        for (index, object) in objects.iter().enumerate() {
            let invalid = |error: InvalidField| CtlError::InvalidObject {
                index,
                object: object.to_string(),
                error,
            };
            let current = Current::read(store, object.kind(), &object.key()).await?;
            let outcome = plan(
                object.clone(),
                &current,
                &settings,
                &mut claimed,
                &mut txn,
                attempt,
            )
            .map_err(invalid)?;
            let r = ObjectRef::of(object);
            applied.push(Applied {
                kind: r.kind,
                namespace: r.namespace,
                name: r.name,
                outcome,
            });
        }
        if txn.commit(store).await? {
            return Ok(applied);
        }
        tracing::debug!(
            attempt,
            "apply lost a race with another writer; reading again"
        );
    }
    Err(CtlError::Conflict(format!(
        "the objects kept changing under this apply ({ATTEMPTS} attempts); try again"
    )))
}

/// The write of one object into `txn`, and what it amounts to.
fn plan(
    mut object: Object,
    current: &Current,
    settings: &ServiceSettings,
    claimed: &mut Claimed,
    txn: &mut Txn,
    attempt: u64,
) -> std::result::Result<Outcome, InvalidField> {
    let key = object.key();
    server_fields(&mut object, current)?;
    object.set_defaults();
    object.validate()?;
    let mut claims_changed = false;
    if let Object::Service(service) = &mut object {
        let holder = ClaimHolder::of(service);
        let previous = match &current.object {
            Some(Object::Service(previous)) => Some(previous.as_ref()),
            _ => None,
        };
        if service.status.is_empty()
            && let Some(previous) = previous
        {
            // Nothing here writes a Service's status but its manifest: a manifest without
            // one leaves the stored status (load balancer addresses) alone.
            service.status = previous.status.clone();
        }
        allocate(
            service,
            previous,
            settings,
            &claimed.taken_from(&holder),
            attempt,
        )?;
        service.validate()?;
        let wanted = service.claims();
        let held = claimed.held_by(&holder);
        let mut released = Claims::default();
        for ip in wanted.ips.difference(&held.ips) {
            txn.claim(keys::service_ip(*ip), &holder);
        }
        for port in wanted.node_ports.difference(&held.node_ports) {
            txn.claim(keys::node_port(*port), &holder);
        }
        for ip in held.ips.difference(&wanted.ips) {
            txn.release(keys::service_ip(*ip), &holder);
            released.ips.insert(*ip);
        }
        for port in held.node_ports.difference(&wanted.node_ports) {
            txn.release(keys::node_port(*port), &holder);
            released.node_ports.insert(*port);
        }
        claims_changed = wanted != held;
        claimed.hold(&holder, wanted, released);
    }
    if current.object.as_ref() == Some(&object) && !claims_changed {
        return Ok(Outcome::Unchanged);
    }
    txn.replace(&key, current);
    txn.ops.push(Op::Put {
        key,
        value: serde_json::to_vec(&object.to_value()).expect("objects serialise"),
        lease: None,
    });
    Ok(match current.revision {
        Some(_) => Outcome::Configured,
        None => Outcome::Created,
    })
}

/// The service ranges in force: the stored settings', or the defaults.
async fn service_settings(store: &dyn Store) -> Result<ServiceSettings> {
    Ok(match store.get(keys::SETTINGS).await? {
        Some(kv) => decode::<ClusterSettings>("cluster settings", &kv.value)?.services(),
        None => ServiceSettings::default(),
    })
}

/// Deletes the named objects in one transaction, with the claims of the Services among
/// them. Each is reported; one that does not exist is `false`, and the others are still
/// deleted, as `kubectl delete` does.
pub async fn delete(store: &dyn Store, refs: &[ObjectRef]) -> Result<Vec<(ObjectRef, bool)>> {
    for attempt in 0..ATTEMPTS {
        let claimed = Claimed::load(store).await?;
        let mut txn = Txn::default();
        let mut outcome = Vec::with_capacity(refs.len());
        for r in refs {
            let current = Current::read(store, r.kind, &r.key()).await?;
            let Some(revision) = current.revision else {
                outcome.push((r.clone(), false));
                continue;
            };
            if r.kind == Kind::Service {
                let holder = ClaimHolder {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                };
                let held = claimed.held_by(&holder);
                for ip in &held.ips {
                    txn.release(keys::service_ip(*ip), &holder);
                }
                for port in &held.node_ports {
                    txn.release(keys::node_port(*port), &holder);
                }
            }
            txn.compares.push(Compare::ModRevision(r.key(), revision));
            txn.ops.push(Op::Delete { key: r.key() });
            outcome.push((r.clone(), true));
        }
        if txn.commit(store).await? {
            return Ok(outcome);
        }
        tracing::debug!(
            attempt,
            "delete lost a race with another writer; reading again"
        );
    }
    Err(CtlError::Conflict(format!(
        "the objects kept changing under this delete ({ATTEMPTS} attempts); try again"
    )))
}

/// What `get` read: the objects, and the records that did not decode (named, with why).
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<Object>,
    pub invalid: Vec<String>,
}

/// The objects of one kind: in one namespace or all, or one by name. Each carries the
/// store revision of its record as `metadata.resourceVersion`.
pub async fn get(
    store: &dyn Store,
    kind: Kind,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Result<Listing> {
    // A cluster-scoped kind has no namespace to look in.
    let namespace = if kind.is_namespaced() {
        namespace
    } else {
        None
    };
    let kvs = match (namespace, name) {
        (Some(ns), Some(name)) => {
            let key = kind.key(ns, name);
            let kv = store.get(&key).await?.ok_or_else(|| CtlError::NotFound {
                what: kind.resource(),
                name: format!("{ns}/{name}"),
                hint: "",
            })?;
            vec![kv]
        }
        (None, Some(name)) if !kind.is_namespaced() => {
            let kv = (store.get(&kind.key("", name)).await?).ok_or_else(|| CtlError::NotFound {
                what: kind.resource(),
                name: name.to_string(),
                hint: "",
            })?;
            vec![kv]
        }
        (None, Some(name)) => {
            return Err(CtlError::Refused(format!(
                "a name ({name}) needs a namespace"
            )));
        }
        (_, None) => {
            store
                .list(&keys::in_namespace(kind.key_prefix(), namespace))
                .await?
                .0
        }
    };
    let mut listing = Listing::default();
    for kv in kvs {
        match records::decode_object(kind, &kv) {
            Ok(object) => listing.objects.push(object),
            Err(e) => listing.invalid.push(format!("{}: {e}", kv.key)),
        }
    }
    Ok(listing)
}
