//! Seed 003 replayed on a lab on etcd: every node reboots at once with the store (standing
//! in for the API server) down, twice.
//!
//! 1. As in the incident: the pods' plugin chain must first reach the API server through
//!    its ClusterIP (`kubernetes`, 10.96.0.1:443, served by the service proxy). After the
//!    reboot nothing can: the proxy has no rules until the agent reaches the store, so no
//!    pod gets an address for as long as the store is down, and pods come back only after
//!    it returns and the proxy has synced — the circle that kept seed 003's cluster down.
//! 2. With `trellis-cni` alone: each pod's address comes from the node's own files, so
//!    every pod has one within a second of power-on, and every pair of pods reaches every
//!    other across the mesh (agents plan from their caches), all with the store down.
//!
//! The gated plugin is a small script the demo writes (`api-gate`): it opens a TCP
//! connection to the ClusterIP and hands its stdin to `trellis-cni` only if that works, as
//! a delegating meta-plugin that first asks the API would.

use super::lab::{summary_table, up_and_check};
use crate::check;
use crate::cold_boot::{self, PodBoot};
use crate::state::{self, LabState};
use crate::store::{self, StoreKind};
use anyhow::Context;
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;
use trellis_model::Granularity;

/// The API server's Service address, as in a kubeadm cluster.
const API_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const API_PORT: u16 = 443;
/// How long the store stays down after the reboot in part 1: each pod is retried for this
/// long, as a kubelet keeps retrying a sandbox.
const OUTAGE: Duration = Duration::from_secs(5);
/// How long part 2 waits for every pair of pods to reach each other.
const PAIRS_LIMIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// What the demo saw; also the `--json` summary. Times in milliseconds since power-on
/// (part 1's recovery: since the store came back). `None`: did not happen.
#[derive(Default, Debug, serde::Serialize)]
pub struct Summary {
    pairs_ok_before: bool,
    pods: usize,
    /// Part 1: pods that got an address while the store was down (seed 003: none).
    gated_addressed_during_outage: usize,
    /// Part 1: after the store came back, when the last pod got its address.
    gated_all_addressed_after_store_ms: Option<u128>,
    /// Part 2: pods that got an address with the store down, and when the last did.
    trellis_addressed: usize,
    trellis_all_addressed_ms: Option<u128>,
    /// Part 2: every ordered pair of pods reached each other, with the store still down.
    trellis_all_pairs_ms: Option<u128>,
    pairs: usize,
    /// Part 2: the store is back and the agents are in sync with it.
    store_back: bool,
}

impl Summary {
    pub fn passed(&self) -> bool {
        self.pairs_ok_before
            && self.trellis_addressed == self.pods
            && self.trellis_all_pairs_ms.is_some()
            && self.store_back
    }

    pub fn table(&self) -> String {
        let ms = |v: Option<u128>| v.map_or("did not happen".into(), |ms| format!("{ms} ms"));
        let rows: Vec<(String, String)> = vec![
            (
                "plugin chain through the API's ClusterIP (seed 003): pods with an address while the store was down".into(),
                format!("{} of {}", self.gated_addressed_during_outage, self.pods),
            ),
            (
                "  ... every pod addressed, after the store came back".into(),
                ms(self.gated_all_addressed_after_store_ms),
            ),
            (
                "trellis-cni: pods with an address, store down".into(),
                format!("{} of {}", self.trellis_addressed, self.pods),
            ),
            (
                "  ... the last of them, after power-on".into(),
                ms(self.trellis_all_addressed_ms),
            ),
            (
                format!(
                    "  ... all {} pod pairs reach each other across the mesh, store down",
                    self.pairs
                ),
                ms(self.trellis_all_pairs_ms),
            ),
        ];
        summary_table(&rows)
    }
}

pub async fn scenario(name: &str) -> anyhow::Result<Summary> {
    let (lab, pairs_ok_before) = up_and_check(name, Granularity::Location, StoreKind::Etcd).await?;
    let pods = lab.spec.all_pods().count();
    let mut summary = Summary {
        pairs_ok_before,
        pods,
        pairs: pods * (pods - 1),
        ..Default::default()
    };
    say!(
        "\n== the API server as a Service: kubernetes.default, {API_CLUSTER_IP}:{API_PORT} -> the store (etcd), port {}, on each node's location network",
        store::ETCD_CLIENT_PORT
    );
    api_service(name).await?;
    for node in &lab.spec.nodes {
        let reached = wait_api(&node.netns, Duration::from_secs(20)).await;
        say!(
            "  from node {}: {API_CLUSTER_IP}:{API_PORT} {}",
            node.name,
            if reached {
                "answers"
            } else {
                "does NOT answer"
            }
        );
    }
    let gate = write_gate(name)?;

    say!(
        "\n== part 1, as in seed 003: every node reboots with the store down; pods come from a plugin chain that first calls the API server at its ClusterIP ({})",
        gate.display()
    );
    cold_boot::power_off(name, true).await?;
    say!(
        "  power off: store killed, agents killed, pod sandboxes gone, node namespaces gone, /run cleared"
    );
    let boots = cold_boot::power_on(name, Some(&gate), OUTAGE).await?;
    summary.gated_addressed_during_outage = narrate(&boots);
    say!(
        "  {} of {pods} pods got an address in {} s with the store down",
        summary.gated_addressed_during_outage,
        OUTAGE.as_secs()
    );
    say!("\n== trellis lab heal --name {name} store");
    store::heal(name).await?;
    let back = Instant::now();
    let recreated = recreate_missing(name, &gate).await?;
    summary.gated_all_addressed_after_store_ms = recreated.map(|_| back.elapsed().as_millis());
    say!(
        "  every pod has an address {} after the store came back",
        recreated.map_or("never (within the limit)".into(), |_| format!(
            "{} ms",
            back.elapsed().as_millis()
        ))
    );

    say!(
        "\n== part 2: the same cold boot, store down; pods from trellis-cni alone (the node's own files)"
    );
    cold_boot::power_off(name, true).await?;
    say!(
        "  power off: store killed, agents killed, pod sandboxes gone, node namespaces gone, /run cleared"
    );
    let on = Instant::now();
    let boots = cold_boot::power_on(name, None, cold_boot::POD_PATIENCE).await?;
    summary.trellis_addressed = narrate(&boots);
    summary.trellis_all_addressed_ms = (summary.trellis_addressed == pods)
        .then(|| boots.iter().filter_map(|b| b.addressed_ms).max())
        .flatten();
    let spec = LabState::load(name)?.spec;
    loop {
        let report = check::all_pairs(&spec, 1, Duration::from_millis(300)).await?;
        let ok = report.results.iter().filter(|r| r.ok).count();
        if report.ok {
            let ms = on.elapsed().as_millis();
            summary.trellis_all_pairs_ms = Some(ms);
            say!(
                "  t = {ms:>5} ms  all {} pod pairs reach each other across the mesh, store still down",
                report.results.len()
            );
            break;
        }
        if on.elapsed() > PAIRS_LIMIT {
            say!(
                "  {ok} of {} pairs reachable after {} s: giving up",
                report.results.len(),
                PAIRS_LIMIT.as_secs()
            );
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    say!("\n== trellis lab heal --name {name} store");
    store::heal(name).await?;
    let store = crate::open_store(name)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(None) = crate::up::converged(store.as_ref(), &spec).await {
            summary.store_back = true;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    say!(
        "  the store is back; every agent {} reported its applied plan",
        if summary.store_back { "has" } else { "has NOT" }
    );
    Ok(summary)
}

/// One line per pod; returns how many got an address.
fn narrate(boots: &[PodBoot]) -> usize {
    for b in boots {
        match (b.addressed_ms, &b.address) {
            (Some(ms), Some(a)) => say!("  t = {ms:>5} ms  {} on {}: address {a}", b.pod, b.node),
            _ => say!(
                "  {} on {}: no address ({})",
                b.pod,
                b.node,
                b.error
                    .as_deref()
                    .and_then(|e| e.lines().last())
                    .unwrap_or("?")
            ),
        }
    }
    boots.iter().filter(|b| b.address.is_some()).count()
}

/// Pods without a sandbox after part 1, created again through the gate until each has an
/// address, every node's pods in parallel with the other nodes', as kubelets retry.
async fn recreate_missing(name: &str, gate: &Path) -> anyhow::Result<Option<()>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let spec = LabState::load(name)?.spec;
    let mut kubelets = tokio::task::JoinSet::new();
    for node in spec.nodes.clone() {
        let (spec, gate) = (spec.clone(), gate.to_path_buf());
        kubelets.spawn(async move {
            let mut pods = node.pods.clone();
            for pod in pods.iter_mut().filter(|p| p.container_id.is_empty()) {
                while crate::pod_network::create_with(&spec, &node, pod, &gate, Duration::ZERO)
                    .await
                    .is_err()
                {
                    if Instant::now() > deadline {
                        return (node.name, None);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            (node.name, Some(pods))
        });
    }
    let mut all = Some(());
    while let Some(done) = kubelets.join_next().await {
        let (node, pods) = done?;
        match pods {
            Some(pods) => {
                let mut state = LabState::load(name)?;
                if let Some(n) = state.spec.nodes.iter_mut().find(|n| n.name == node) {
                    n.pods = pods;
                }
                state.save()?;
            }
            None => all = None,
        }
    }
    Ok(all)
}

/// The `kubernetes` Service and its EndpointSlice, pointing at the lab's etcd. The store
/// has a leg on each location's network and no location reaches another's, so each node
/// gets an endpoint of its own on its location's leg (an address added to the store's
/// namespace for it: a slice holds an address once), with a node-local traffic policy.
async fn api_service(name: &str) -> anyhow::Result<()> {
    use trellis_agent::ctl::objects;
    use trellis_model::Object;
    let spec = LabState::load(name)?.spec;
    let store_ns = trellis_dataplane::netlink::Netlink::connect_in(&store::netns_of(&spec))?;
    let mut endpoints = Vec::new();
    for (location, site) in spec.locations.iter().enumerate() {
        for (j, node) in spec
            .nodes
            .iter()
            .filter(|n| n.location == site.name)
            .enumerate()
        {
            let address = Ipv4Addr::new(172, 20, location as u8, 200 + j as u8);
            store_ns
                .add_address(
                    &format!("loc{location}"),
                    ipnet::IpNet::new(address.into(), 24)?,
                )
                .await?;
            endpoints.push(json!({
                "addresses": [address.to_string()],
                "conditions": {"ready": true},
                "nodeName": node.name,
            }));
        }
    }
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {
            "clusterIP": API_CLUSTER_IP.to_string(),
            "internalTrafficPolicy": "Local",
            "ports": [{"name": "https", "protocol": "TCP", "port": API_PORT, "targetPort": store::ETCD_CLIENT_PORT}],
        },
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "https", "protocol": "TCP", "port": store::ETCD_CLIENT_PORT}],
        "endpoints": endpoints,
    });
    let objects = vec![Object::from_value(service)?, Object::from_value(slice)?];
    let store = crate::open_store(name)?;
    objects::apply(store.as_ref(), objects)
        .await
        .context("writing the kubernetes Service")?;
    Ok(())
}

/// Whether a TCP connection from `netns` to the API's ClusterIP succeeds within `limit`.
async fn wait_api(netns: &str, limit: Duration) -> bool {
    let target = SocketAddr::V4(SocketAddrV4::new(API_CLUSTER_IP, API_PORT));
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let ns = netns.to_string();
        let connected = tokio::task::spawn_blocking(move || {
            trellis_dataplane::netns::run_in(&ns, move || {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok()
            })
            .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if connected {
            return true;
        }
        tokio::time::sleep(POLL).await;
    }
    false
}

/// The gated plugin: `trellis-cni` behind a TCP check of the API's ClusterIP.
fn write_gate(name: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let plugin = crate::cni::plugin_path()?;
    let path = state::dir(name).join("api-gate");
    let script = format!(
        r#"#!/bin/bash
# A CNI plugin that, like seed 003's chain, asks the API server (through its ClusterIP)
# before it does anything, then hands its stdin to trellis-cni.
conf=$(cat)
if ! timeout 1 bash -c 'exec 3<>/dev/tcp/{API_CLUSTER_IP}/{API_PORT}' 2>/dev/null; then
  printf '{{"cniVersion":"1.1.0","code":11,"msg":"cannot reach the API server at {API_CLUSTER_IP}:{API_PORT} (its ClusterIP)"}}\n'
  exit 1
fi
printf '%s' "$conf" | exec {}
"#,
        plugin.display()
    );
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
