//! The last cluster state an agent read, kept on local disk so that an agent that starts
//! while the store is unreachable (a restart during an outage, a cold reboot with the
//! control plane down) plans from it instead of leaving its node without a data plane.
//!
//! What is kept is the store's records themselves, not the decoded state: loading them goes
//! through the same validation as records read from the store, so a cache written by an
//! older agent, or damaged on disk, can only ever drop records, never smuggle one in.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use trellis_store::{KeyValue, Revision};

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a state cache: {source}", path.display())]
    NotACache {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

#[derive(Serialize, Deserialize)]
struct Cached {
    revision: Revision,
    records: Vec<KeyValue>,
}

#[derive(Clone, Debug)]
pub struct StateCache {
    path: PathBuf,
}

impl StateCache {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records and the revision they reflect; `None` when there is no cache yet.
    pub fn load(&self) -> Result<Option<(Vec<KeyValue>, Revision)>, CacheError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &self.path)(e)),
        };
        let cached: Cached =
            serde_json::from_slice(&bytes).map_err(|source| CacheError::NotACache {
                path: self.path.clone(),
                source,
            })?;
        Ok(Some((cached.records, cached.revision)))
    }

    /// Replaces the cache atomically (write a temporary file, sync, rename), so a crash or
    /// power loss leaves the old cache or the new one, never half of one.
    pub fn save(
        &self,
        records: &BTreeMap<String, KeyValue>,
        revision: Revision,
    ) -> Result<(), CacheError> {
        let cached = Cached {
            revision,
            records: records.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec(&cached).map_err(|source| CacheError::NotACache {
            path: self.path.clone(),
            source,
        })?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        file.write_all(&bytes).map_err(io("writing", &tmp))?;
        file.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io("replacing", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], revision: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: revision,
            mod_revision: revision,
            lease: Some(7),
        }
    }

    #[test]
    fn saves_and_loads_records_atomically() {
        let dir = std::env::temp_dir().join(format!("trellis-cache-test-{}", std::process::id()));
        let cache = StateCache::new(dir.join("sub").join("state.json"));
        assert!(cache.load().unwrap().is_none(), "no cache yet");

        let records: BTreeMap<String, KeyValue> = [
            ("nodes/a1".to_string(), kv("nodes/a1", b"{\"x\":1}", 3)),
            ("peers/p".to_string(), kv("peers/p", &[0, 255, 10], 5)),
        ]
        .into();
        cache.save(&records, 9).unwrap();
        let (loaded, revision) = cache.load().unwrap().unwrap();
        assert_eq!(revision, 9);
        assert_eq!(loaded, records.values().cloned().collect::<Vec<_>>());
        assert!(!cache.path().with_extension("tmp").exists());

        std::fs::write(cache.path(), b"{not json").unwrap();
        let error = cache.load().unwrap_err().to_string();
        assert!(error.contains("not a state cache"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
