//! Where a lab keeps its files: `/run/trellis/labs/NAME/` (tmpfs, so a reboot forgets
//! labs as it forgets their namespaces). `lab.json` is the spec plus process ids.

use crate::spec::LabSpec;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const LABS_DIR: &str = "/run/trellis/labs";

pub fn dir(lab: &str) -> PathBuf {
    PathBuf::from(LABS_DIR).join(lab)
}

pub fn store_socket(lab: &str) -> PathBuf {
    dir(lab).join("store.sock")
}

pub fn log_path(lab: &str, process: &str) -> PathBuf {
    dir(lab).join("logs").join(format!("{process}.log"))
}

pub fn key_path(lab: &str, node: &str) -> PathBuf {
    dir(lab).join("keys").join(format!("{node}.key"))
}

/// Where a node's agent keeps its last known cluster state.
pub fn cache_path(lab: &str, node: &str) -> PathBuf {
    dir(lab).join("cache").join(format!("{node}.json"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub spec: LabSpec,
    #[serde(default)]
    pub store_pid: Option<i32>,
    #[serde(default)]
    pub agent_pids: BTreeMap<String, i32>,
    /// The process that answers TCP and UDP echo in every pod (`lab serve-pods`).
    #[serde(default)]
    pub pods_pid: Option<i32>,
    /// Faults injected per node and not yet healed.
    #[serde(default)]
    pub faults: BTreeMap<String, Vec<crate::incident::Fault>>,
    /// Faults of the store not yet healed.
    #[serde(default)]
    pub store_faults: Vec<crate::incident::StoreFault>,
}

impl LabState {
    pub fn load(lab: &str) -> anyhow::Result<LabState> {
        let path = dir(lab).join("lab.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "lab {lab:?} is not running (no {}); see `trellis lab up --help`",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
    }

    /// Write atomically so a crash never leaves a half-written file behind.
    pub fn save(&self) -> anyhow::Result<()> {
        let dir = dir(&self.spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join("lab.json"))?;
        Ok(())
    }
}

/// Labs that have a state file.
pub fn running_labs() -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(LABS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(LABS_DIR),
    };
    let mut labs: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("lab.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    labs.sort();
    Ok(labs)
}
