//! Which store a command talks to: `--store URL`, `--lab NAME`, or the only running lab.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use trellis_store::Store;
use trellis_store::remote::RemoteStore;

/// How long one store call may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// An embedded store served on a Unix socket (a lab's store).
    Unix(PathBuf),
}

impl StoreUrl {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if let Some(path) = text
            .strip_prefix("unix://")
            .or_else(|| text.strip_prefix("unix:"))
        {
            if path.is_empty() {
                bail!("invalid --store {text:?}: the unix: form needs a socket path");
            }
            return Ok(StoreUrl::Unix(PathBuf::from(path)));
        }
        if let Some(name) = text.strip_prefix("lab:") {
            return Ok(StoreUrl::Unix(crate::lab::state::store_socket(name)));
        }
        if text.starts_with("etcd://")
            || text.starts_with("http://")
            || text.starts_with("https://")
        {
            bail!("invalid --store {text:?}: the etcd store is not built yet (tracked in issue 4)");
        }
        bail!("invalid --store {text:?}: expected unix:/path/to/store.sock or lab:NAME")
    }

    pub fn open(&self) -> Arc<dyn Store> {
        match self {
            StoreUrl::Unix(path) => Arc::new(RemoteStore::connect(path.clone(), CALL_TIMEOUT)),
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Resolve `--store` / `--lab` for a command; with neither, the only running lab.
pub fn resolve(store: Option<&str>, lab: Option<&str>) -> anyhow::Result<StoreUrl> {
    match (store, lab) {
        (Some(_), Some(_)) => bail!("give either --store or --lab, not both"),
        (Some(url), None) => StoreUrl::parse(url),
        (None, Some(name)) => Ok(StoreUrl::Unix(crate::lab::state::store_socket(name))),
        (None, None) => {
            let labs = crate::lab::state::running_labs().context("looking for running labs")?;
            match labs.as_slice() {
                [only] => Ok(StoreUrl::Unix(crate::lab::state::store_socket(only))),
                [] => bail!(
                    "no --store given and no lab is running: start one with `trellis lab up` or pass --store"
                ),
                many => bail!(
                    "no --store given and {} labs are running ({}): pass --lab NAME",
                    many.len(),
                    many.join(", ")
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_lab_forms_and_names_bad_values() {
        assert_eq!(
            StoreUrl::parse("unix:/a/b.sock").unwrap(),
            StoreUrl::Unix("/a/b.sock".into())
        );
        assert_eq!(
            StoreUrl::parse("unix:///a/b.sock").unwrap(),
            StoreUrl::Unix("/a/b.sock".into())
        );
        assert!(
            StoreUrl::parse("lab:x")
                .unwrap()
                .to_string()
                .ends_with("/x/store.sock")
        );
        let err = StoreUrl::parse("tcp://x").unwrap_err().to_string();
        assert!(err.contains("--store") && err.contains("tcp://x"), "{err}");
        assert!(StoreUrl::parse("unix:").is_err());
    }
}
