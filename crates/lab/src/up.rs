//! `lab up`: build a lab's namespaces and links, start its store and one agent per node,
//! and wait until every agent reports the plan computed here from the same state.

use crate::spec::{self, LabParams, LabSpec};
use crate::state::{self, LabState};
use crate::{build, processes, store};
use anyhow::{Context, bail};
use std::time::{Duration, Instant};
use trellis_dataplane::netns;
use trellis_model::{ClusterSettings, keys};
use trellis_store::Store;

/// What a successful `lab up` tells its caller.
#[derive(Debug)]
pub struct Up {
    pub spec: LabSpec,
    pub converged_in: Duration,
}

/// Brings a lab up and waits for convergence. On failure the half-built lab is removed
/// (unless `TRELLIS_LAB_KEEP_FAILED` is set) and the error carries the agents' last log
/// lines.
pub async fn up(params: &LabParams, timeout: Duration) -> anyhow::Result<Up> {
    let spec = params.spec()?;
    let name = spec.name.clone();
    if spec.store == store::StoreKind::Etcd && which("etcd").is_none() {
        bail!("--store etcd needs etcd on PATH (apt-get install etcd-server)");
    }
    if state::dir(&name).join("lab.json").exists() || netns::exists(&spec::fabric_netns(&name)) {
        bail!(
            "lab {name:?} already exists: `trellis lab down --name {name}` first, or pick another --name"
        );
    }
    let started = Instant::now();
    match bring_up(&spec, timeout).await {
        Ok(()) => Ok(Up {
            spec,
            converged_in: started.elapsed(),
        }),
        Err(e) => {
            let logs = state::dir(&name).join("logs");
            if std::env::var_os("TRELLIS_LAB_KEEP_FAILED").is_some() {
                crate::built::keep(&name);
                bail!(
                    "lab {name} failed to come up: {e:#}\nagent logs: {}\n(kept for inspection: TRELLIS_LAB_KEEP_FAILED is set)",
                    logs.display()
                );
            }
            let tails = collect_logs(&name);
            let _ = build::teardown(&name);
            bail!(
                "lab {name} failed to come up: {e:#}\n{tails}lab removed (set TRELLIS_LAB_KEEP_FAILED=1 to keep it for inspection)"
            )
        }
    }
}

/// The last lines of every process's log.
fn collect_logs(lab: &str) -> String {
    let dir = state::dir(lab).join("logs");
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(Result::ok) {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            out.push_str(&format!(
                "--- {} (last lines)\n",
                e.file_name().to_string_lossy()
            ));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Builds and starts a lab from its spec; the lab's own benches use it with fixed specs.
pub async fn bring_up(spec: &LabSpec, timeout: Duration) -> anyhow::Result<()> {
    // Before anything exists, so that an interrupted command removes whatever did.
    crate::built::building(&spec.name);
    let mut lab = LabState {
        spec: spec.clone(),
        store_pid: None,
        agent_pids: Default::default(),
        pods_pid: None,
        faults: Default::default(),
        store_faults: Vec::new(),
    };
    // The state file goes first so that `lab down` knows the lab even if this crashes.
    lab.save()?;
    build::create_fabric(spec)
        .await
        .context("creating the fabric")?;
    for node in &spec.nodes {
        build::create_node(spec, node)
            .await
            .with_context(|| format!("creating node {}", node.name))?;
    }
    let store_pid = store::start(spec).await.context("starting the store")?;
    lab.store_pid = Some(store_pid);
    lab.save()?;
    let store = store::open(&spec.name)?;
    wait_for_store(store.as_ref(), Duration::from_secs(20)).await?;
    let settings = ClusterSettings {
        granularity: spec.granularity,
        gateways_per_location: spec.gateways,
        persistent_keepalive: None,
        gateway_health: spec.gateway_health,
        // Nodes that join without --pod-cidr get one from the leader, beside the lab's own
        // (on Kubernetes the controller manager gives every Node its pod CIDRs).
        pod_cidr_pool: (spec.store != store::StoreKind::Kubernetes)
            .then(|| "10.244.0.0/16".parse())
            .transpose()?
            .map(|cidr| trellis_model::PodCidrPool {
                cidr,
                node_prefix: 24,
            }),
        gc_after_seconds: trellis_model::DEFAULT_GC_AFTER_SECONDS,
        services: None,
    };
    store
        .put(keys::SETTINGS, serde_json::to_vec(&settings)?)
        .await?;
    for node in &spec.nodes {
        let pid = processes::spawn_in(
            &node.netns,
            &processes::agent_args(spec, node),
            &state::log_path(&spec.name, &node.name),
        )?;
        lab.agent_pids.insert(node.name.clone(), pid);
    }
    lab.save()?;
    // As a kubelet does once the node's network is up: every pod through the CNI plugin,
    // which waits (code 11, retried) until the agent has written the node file.
    create_pods(&mut lab).await?;
    lab.pods_pid = Some(crate::pods::start(&lab.spec).context("starting the pods' echo servers")?);
    lab.save()?;
    wait_converged(store.as_ref(), spec, timeout).await?;
    if lab.pods_pid.is_some_and(|p| !processes::is_alive(p)) {
        bail!(
            "the pods' echo server exited: see {}",
            state::log_path(&spec.name, "pods").display()
        );
    }
    Ok(())
}

/// Every pod of the spec, through the CNI plugin; the spec records what each got.
pub async fn create_pods(lab: &mut LabState) -> anyhow::Result<()> {
    let spec = lab.spec.clone();
    for (i, node) in spec.nodes.iter().enumerate() {
        for (j, _) in node.pods.iter().enumerate() {
            let pod = &mut lab.spec.nodes[i].pods[j];
            crate::pod_network::create(&spec, node, pod)
                .await
                .with_context(|| format!("pod {} on {}", pod.name, node.name))?;
        }
        lab.save()?;
    }
    Ok(())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

async fn wait_for_store(store: &dyn Store, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match store.get(keys::SETTINGS).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("the lab store did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Converged: every node is registered, and every agent reports a fully applied plan with
/// as many peers and routes as the plan computed here from the same state.
async fn wait_converged(
    store: &dyn Store,
    spec: &LabSpec,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match converged(store, spec).await {
            Ok(None) => return Ok(()),
            Ok(Some(waiting)) => last = waiting,
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("agents did not converge within {timeout:?}: {last}")
}

/// `None` when converged, else what is still missing.
pub async fn converged(store: &dyn Store, spec: &LabSpec) -> anyhow::Result<Option<String>> {
    let state = trellis_agent::state::load(store).await?;
    let topology = state.topology(&trellis_plan::Settings::default());
    if topology.nodes.len() < spec.nodes.len() {
        return Ok(Some(format!(
            "{} of {} nodes registered",
            topology.nodes.len(),
            spec.nodes.len()
        )));
    }
    for node in &spec.nodes {
        let plan = topology.plan_for(&node.name)?;
        match state.status.get(&node.name) {
            None => return Ok(Some(format!("no status from {}", node.name))),
            Some(s) if !s.applied => {
                return Ok(Some(format!(
                    "{}: {}",
                    node.name,
                    s.error.as_deref().unwrap_or("not applied")
                )));
            }
            Some(s)
                if s.nodes != spec.nodes.len()
                    || s.peers != plan.peers.len()
                    || s.routes != plan.routes.len() =>
            {
                return Ok(Some(format!(
                    "{} has not applied the latest plan",
                    node.name
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

/// The line `lab up` prints once a lab has converged.
pub fn summary(up: &Up) -> String {
    format!(
        "lab {} is up: {} nodes in {} locations, granularity {}, converged in {:.1} s",
        up.spec.name,
        up.spec.nodes.len(),
        up.spec.locations.len(),
        up.spec.granularity,
        up.converged_in.as_secs_f64()
    )
}
