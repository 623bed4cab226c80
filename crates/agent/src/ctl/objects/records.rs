//! What an apply reads before it writes: the stored object with its revision, who holds
//! which ClusterIP and node port, and the fields the API server sets itself.

use super::Result;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};
use trellis_model::keys::{self, Key};
use trellis_model::{ClaimHolder, Claims, InvalidField, Kind, Object, Validate, decode};
use trellis_store::{KeyValue, Revision, Store};

/// The stored version of an object, if any. A record that exists but does not decode has a
/// revision and no object: an apply replaces it.
pub struct Current {
    pub revision: Option<Revision>,
    pub object: Option<Object>,
}

impl Current {
    pub async fn read(store: &dyn Store, kind: Kind, key: &str) -> Result<Current> {
        Ok(match store.get(key).await? {
            None => Current {
                revision: None,
                object: None,
            },
            Some(kv) => Current {
                revision: Some(kv.mod_revision),
                object: match stored(kind, &kv) {
                    Ok(object) => Some(object),
                    Err(e) => {
                        tracing::warn!(key, "replacing a stored record that is invalid: {e}");
                        None
                    }
                },
            },
        })
    }
}

/// A stored record as an object, checked against its key.
fn stored(kind: Kind, kv: &KeyValue) -> std::result::Result<Object, InvalidField> {
    let value = serde_json::from_slice(&kv.value)
        .map_err(|e| InvalidField::new(&kv.key, "", format!("is not JSON: {e}")))?;
    let object = Object::from_value(value)?;
    object.validate()?;
    if object.kind() != kind || object.key() != kv.key {
        return Err(InvalidField::new(
            "metadata",
            object.to_string(),
            format!("does not match its key {}", kv.key),
        ));
    }
    Ok(object)
}

/// A stored record as `get` shows it: with the record's revision as its resourceVersion.
pub fn decode_object(kind: Kind, kv: &KeyValue) -> std::result::Result<Object, InvalidField> {
    let mut object = stored(kind, kv)?;
    object.metadata_mut().resource_version = Some(kv.mod_revision.to_string());
    Ok(object)
}

/// A value in one of the shared ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Ip(IpAddr),
    Port(u16),
}

/// Who holds each ClusterIP and node port, as the claim keys say, updated as an apply
/// plans its objects so that two objects of one apply never get the same value.
pub struct Claimed {
    /// `None`: held by a claim whose holder does not decode, or released earlier in this
    /// apply (one transaction cannot both delete and create a key).
    holders: BTreeMap<Value, Option<ClaimHolder>>,
}

impl Claimed {
    pub async fn load(store: &dyn Store) -> Result<Claimed> {
        let mut holders = BTreeMap::new();
        for prefix in [keys::SERVICE_IPS, keys::NODE_PORTS] {
            for kv in store.list(prefix).await?.0 {
                let value = match Key::parse(&kv.key) {
                    Some(Key::ServiceIp(ip)) => Value::Ip(ip),
                    Some(Key::NodePort(port)) => Value::Port(port),
                    _ => continue,
                };
                let holder = decode::<ClaimHolder>(&kv.key, &kv.value)
                    .inspect_err(|e| tracing::warn!("a claim with an unreadable holder: {e}"))
                    .ok();
                holders.insert(value, holder);
            }
        }
        Ok(Claimed { holders })
    }

    fn claims(&self, pick: impl Fn(&Option<ClaimHolder>) -> bool) -> Claims {
        let mut claims = Claims::default();
        for (value, holder) in &self.holders {
            if pick(holder) {
                match value {
                    Value::Ip(ip) => drop(claims.ips.insert(*ip)),
                    Value::Port(port) => drop(claims.node_ports.insert(*port)),
                }
            }
        }
        claims
    }

    /// Everything not held by `holder`.
    pub fn taken_from(&self, holder: &ClaimHolder) -> Claims {
        self.claims(|h| h.as_ref() != Some(holder))
    }

    pub fn held_by(&self, holder: &ClaimHolder) -> Claims {
        self.claims(|h| h.as_ref() == Some(holder))
    }

    /// Records what one object of this apply will hold and give up.
    pub fn hold(&mut self, holder: &ClaimHolder, wanted: Claims, released: Claims) {
        let values = |c: Claims| {
            c.ips
                .into_iter()
                .map(Value::Ip)
                .chain(c.node_ports.into_iter().map(Value::Port))
                .collect::<Vec<_>>()
        };
        for value in values(wanted) {
            self.holders.insert(value, Some(holder.clone()));
        }
        for value in values(released) {
            self.holders.insert(value, None);
        }
    }
}

/// What the API server sets itself: `uid` and `creationTimestamp` on create, kept after;
/// `resourceVersion` is never stored, and one given is a precondition on the write.
pub fn server_fields(
    object: &mut Object,
    current: &Current,
) -> std::result::Result<(), InvalidField> {
    let meta = object.metadata_mut();
    if let Some(version) = meta.resource_version.take() {
        match current.revision {
            None => {
                return Err(InvalidField::new(
                    "metadata.resourceVersion",
                    version,
                    "must not be set on an object to be created",
                ));
            }
            Some(revision) if version != revision.to_string() => {
                return Err(InvalidField::new(
                    "metadata.resourceVersion",
                    version,
                    format!(
                        "the object has been modified since (it is at {revision}): read it again"
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    match current.object.as_ref().map(Object::metadata) {
        Some(stored) => {
            if let Some(uid) = &meta.uid
                && stored.uid.as_ref() != Some(uid)
            {
                return Err(InvalidField::new(
                    "metadata.uid",
                    uid,
                    "names another object than the stored one",
                ));
            }
            meta.uid = stored.uid.clone();
            meta.creation_timestamp = stored.creation_timestamp.clone();
        }
        None => {
            meta.uid = Some(new_uid());
            meta.creation_timestamp = Some(rfc3339(now_unix()));
        }
    }
    Ok(())
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random (version 4) UUID, as the API server gives each object.
fn new_uid() -> String {
    let mut b = [0u8; 16];
    // The kernel's random source; the clock and the process id are a fallback that is
    // still unique enough for a name no one compares but for equality.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (nanos ^ (u128::from(std::process::id()) << 96)).to_be_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `2026-01-02T03:04:05Z` for seconds since the epoch.
pub fn rfc3339(unix: u64) -> String {
    let at = i64::try_from(unix)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::MAX);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Seconds since the epoch of an RFC 3339 time, as written above or by Kubernetes.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let at: jiff::Timestamp = text.parse().ok()?;
    u64::try_from(at.as_second()).ok()
}
