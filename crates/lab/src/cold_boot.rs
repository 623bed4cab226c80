//! `lab fault cold-boot` (seed 003): every node of the lab reboots at once, with the store
//! down. As on real machines after a power loss:
//!
//! - [`power_off`]: the store goes down first (etcd killed; the embedded store frozen,
//!   since it keeps its data in memory), then every agent is killed, every pod's sandbox
//!   vanishes without a CNI DEL, and each node's namespace is deleted — its links, routes,
//!   nftables and WireGuard device with it — and its `/run` cleared. Each node's disk
//!   (key, the agent's cache, the CNI node file) is kept.
//! - [`power_on`]: the nodes' namespaces and network links come back, the agents start
//!   (from their caches: the store is still down), and every pod is created again
//!   through the CNI plugin in a new sandbox, each node's pods in parallel with the other
//!   nodes', as kubelets do. When each pod got its address is measured from power-on.
//!
//! The store comes back with `lab heal store`.

use crate::spec::{LabSpec, NodeSpec, StoreKind};
use crate::state::{self, LabState};
use crate::store::{self, StoreFault};
use crate::{build, fault, pod_network, processes};
use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::netns;

/// How long a pod's creation is retried (the plugin answering "try again later") before
/// the boot gives up on it.
pub const POD_PATIENCE: Duration = Duration::from_secs(30);

/// One pod after the boot.
#[derive(Clone, Debug, Serialize)]
pub struct PodBoot {
    pub node: String,
    pub pod: String,
    /// Since power-on; `None`: no address within the patience.
    pub addressed_ms: Option<u128>,
    pub address: Option<String>,
    pub error: Option<String>,
}

/// Every node off at once, the store first.
pub async fn power_off(lab: &str, store_down: bool) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    if store_down {
        store_off(&state).await?;
    }
    let mut state = LabState::load(lab)?;
    for pid in state.agent_pids.values() {
        processes::kill_and_reap(*pid);
    }
    state.agent_pids.clear();
    let spec = state.spec.clone();
    for node in &spec.nodes {
        for pod in &node.pods {
            if netns::exists(&pod.netns) {
                netns::delete(&pod.netns)
                    .with_context(|| format!("removing the sandbox of pod {}", pod.name))?;
            }
        }
        processes::kill_all_in(&node.netns, Duration::ZERO);
        // The node's cables, from the fabric's side: a deleted namespace takes its veths
        // with it only when the kernel gets round to destroying it, and power-on would
        // find the old ends still plugged in.
        let fabric = Netlink::connect_in(&crate::spec::fabric_netns(lab))?;
        for port in [format!("i-{}", node.name), format!("p-{}", node.name)] {
            fabric.delete_link(&port).await?;
        }
        if netns::exists(&node.netns) {
            netns::delete(&node.netns).with_context(|| format!("powering off {}", node.name))?;
        }
        fault::clear_link_faults(lab, &node.name).await?;
        let run = state::node_run(lab, &node.name);
        if run.exists() {
            std::fs::remove_dir_all(&run).with_context(|| format!("clearing {}", run.display()))?;
        }
    }
    state.faults.clear();
    for pod in state.spec.nodes.iter_mut().flat_map(|n| n.pods.iter_mut()) {
        pod.container_id.clear();
    }
    state.save()
}

async fn store_off(state: &LabState) -> anyhow::Result<()> {
    match state.spec.store {
        StoreKind::Etcd => store::inject(&state.spec.name, StoreFault::Kill).await,
        // Their objects live in their processes: frozen, not killed.
        StoreKind::Embedded | StoreKind::Kubernetes => {
            store::inject(&state.spec.name, StoreFault::Freeze).await
        }
    }
}

/// Nodes on, agents started, pods re-created through `plugin` (`None`: `trellis-cni`),
/// each retried for up to `patience` while the plugin says "try again later".
pub async fn power_on(
    lab: &str,
    plugin: Option<&Path>,
    patience: Duration,
) -> anyhow::Result<Vec<PodBoot>> {
    let started = Instant::now();
    let mut state = LabState::load(lab)?;
    let spec = state.spec.clone();
    for node in &spec.nodes {
        build::create_node(&spec, node)
            .await
            .with_context(|| format!("powering on {}", node.name))?;
    }
    for node in &spec.nodes {
        let pid = processes::spawn_in(
            &node.netns,
            &processes::agent_args(&spec, node),
            &state::log_path(lab, &node.name),
        )?;
        state.agent_pids.insert(node.name.clone(), pid);
    }
    state.save()?;
    let plugin: PathBuf = match plugin {
        Some(p) => p.to_path_buf(),
        None => crate::cni::plugin_path()?,
    };
    let mut kubelets = tokio::task::JoinSet::new();
    for node in spec.nodes.clone() {
        let (spec, plugin) = (spec.clone(), plugin.clone());
        kubelets.spawn(async move { start_pods(&spec, node, &plugin, patience, started).await });
    }
    let mut booted = Vec::new();
    while let Some(done) = kubelets.join_next().await {
        let (node, boots) = done?;
        let mut fresh = LabState::load(lab)?;
        if let Some(n) = fresh.spec.nodes.iter_mut().find(|n| n.name == node.name) {
            n.pods = node.pods;
        }
        fresh.save()?;
        booted.extend(boots);
    }
    booted.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    Ok(booted)
}

/// One node's kubelet: its pods, one after the other.
async fn start_pods(
    spec: &LabSpec,
    mut node: NodeSpec,
    plugin: &Path,
    patience: Duration,
    started: Instant,
) -> (NodeSpec, Vec<PodBoot>) {
    let mut boots = Vec::new();
    let node_spec = node.clone();
    for pod in &mut node.pods {
        let made = pod_network::create_with(spec, &node_spec, pod, plugin, patience).await;
        boots.push(PodBoot {
            node: node_spec.name.clone(),
            pod: pod.name.clone(),
            addressed_ms: made.is_ok().then(|| started.elapsed().as_millis()),
            address: made.is_ok().then(|| pod.ip.addr().to_string()),
            error: made.err().map(|e| format!("{e:#}")),
        });
    }
    (node, boots)
}

/// `lab fault cold-boot`: off with the store down, then on.
pub async fn cold_boot(lab: &str) -> anyhow::Result<Vec<PodBoot>> {
    power_off(lab, true).await?;
    power_on(lab, None, POD_PATIENCE).await
}
