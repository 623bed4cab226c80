//! Where a lab keeps its files: `/run/trellis/labs/NAME/` (tmpfs, so a reboot forgets
//! labs as it forgets their namespaces). `lab.json` is the spec plus process ids.
//!
//! Each node also has a disk and a `/run` of its own, as a machine does, so that a cold
//! boot (`lab fault cold-boot`) can clear one and keep the other: the node's disk
//! (`/var/lib/trellis/labs/NAME/NODE/`) holds its WireGuard key, its agent's cache of the
//! cluster state and the CNI node file; its run directory
//! (`/run/trellis/labs/NAME/nodes/NODE/`) holds the CNI plugin's allocations and the ready
//! file.

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

/// Where the nodes' disks are.
pub const DISKS_DIR: &str = "/var/lib/trellis/labs";

/// A node's persistent disk: survives `lab fault cold-boot`, removed by `lab down`.
pub fn node_disk(lab: &str, node: &str) -> PathBuf {
    PathBuf::from(DISKS_DIR).join(lab).join(node)
}

/// A node's `/run`: cleared by a cold boot.
pub fn node_run(lab: &str, node: &str) -> PathBuf {
    dir(lab).join("nodes").join(node)
}

pub fn key_path(lab: &str, node: &str) -> PathBuf {
    node_disk(lab, node).join("wireguard.key")
}

/// Where a node's agent keeps its last known cluster state.
pub fn cache_path(lab: &str, node: &str) -> PathBuf {
    node_disk(lab, node).join("cluster-state.json")
}

/// The CNI node file the agent keeps (pod CIDRs, MTU).
pub fn cni_node_file(lab: &str, node: &str) -> PathBuf {
    node_disk(lab, node).join("cni").join("node.json")
}

/// The CNI plugin's allocations.
pub fn cni_ipam_file(lab: &str, node: &str) -> PathBuf {
    node_run(lab, node).join("cni").join("ipam.json")
}

/// Where the agent says which attachments' network policy is in place (ADD waits).
pub fn cni_policy_file(lab: &str, node: &str) -> PathBuf {
    node_run(lab, node).join("cni").join("policy.json")
}

/// The ready file the agent keeps and the plugin's STATUS reads.
pub fn cni_ready_file(lab: &str, node: &str) -> PathBuf {
    node_run(lab, node).join("cni").join("ready")
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
