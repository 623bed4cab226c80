//! `lab status`: the lab as a person or a script needs it: nodes with their role and
//! peers (read from each device's control socket), pods and hosts.

use crate::spec::LabSpec;
use crate::state::LabState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use trellis_dataplane::wireguard::{uapi, userspace::UserspaceDevice};
use trellis_model::PublicKey;
use trellis_plan::health::Verdict;

#[derive(Serialize)]
struct LabView {
    name: String,
    granularity: String,
    store: StoreView,
    /// The current leader per the store, with its epoch; null when none (or unknown).
    leader: Option<LeaderView>,
    nodes: Vec<NodeView>,
    hosts: Vec<HostView>,
    /// Direct tunnels measured broken, each relayed through a gateway: [a, b] by name.
    broken_paths: Vec<[String; 2]>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct StoreView {
    kind: &'static str,
    pid: Option<i32>,
    netns: String,
    /// The embedded store's Unix socket, serving the etcd v3 API.
    #[serde(skip_serializing_if = "Option::is_none")]
    socket: Option<String>,
    /// The etcd v3 endpoint a client on this host uses, and an `etcdctl` command line that
    /// lists the lab's keys (etcdctl reaches a Unix socket only by a relative name).
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etcdctl: Option<String>,
    /// Whether the store process is stopped (SIGSTOP, `lab fault store freeze`).
    frozen: bool,
    faults: Vec<String>,
}

#[derive(Serialize)]
struct LeaderView {
    node: String,
    epoch: u64,
}

#[derive(Serialize)]
struct NodeView {
    name: String,
    location: String,
    netns: String,
    gateway: bool,
    served_by: Option<String>,
    /// For gateway candidates: "up", "down" or "unknown", from the observers' majority.
    forwarding: Option<&'static str>,
    /// For gateway candidates: observer -> does it see this node forward.
    observed_by: BTreeMap<String, bool>,
    agent_pid: Option<i32>,
    /// The agent's own `/readyz`: its data plane is applied and verified (null: no answer).
    ready: Option<bool>,
    agent: Option<trellis_model::AgentStatus>,
    interface: String,
    peers: Vec<PeerView>,
    pods: Vec<HostView>,
}

#[derive(Serialize)]
struct PeerView {
    name: String,
    endpoint: Option<String>,
    last_handshake_s: Option<f64>,
    rx_bytes: u64,
    tx_bytes: u64,
}

#[derive(Serialize)]
struct HostView {
    name: String,
    netns: String,
    ip: String,
    /// A pod's IPv6 address, in a dual-stack lab.
    #[serde(skip_serializing_if = "Option::is_none")]
    ip6: Option<String>,
}

/// The lab's status as a table, or as JSON for scripts.
pub async fn show(lab: &str, json: bool) -> anyhow::Result<String> {
    let state = LabState::load(lab)?;
    let store = crate::open_store(lab)?;
    // The store may be down (that is a fault the lab can inject): show what we can.
    let (cluster, store_error) = match trellis_agent::state::load(store.as_ref()).await {
        Ok(c) => (c, None),
        Err(e) => (
            Default::default(),
            Some(format!("store unreachable: {e:#}")),
        ),
    };
    let topology = cluster.topology(&trellis_plan::Settings::default());
    let names: BTreeMap<PublicKey, String> = cluster
        .nodes
        .values()
        .filter_map(|n| n.public_key.map(|k| (k, n.name.clone())))
        .chain(
            cluster
                .peers
                .values()
                .map(|p| (p.public_key, p.name.clone())),
        )
        .collect();
    let leader = match &store_error {
        None => trellis_agent::leader::current_leader(store.as_ref())
            .await
            .ok()
            .flatten()
            .map(|(node, epoch)| LeaderView { node, epoch }),
        Some(_) => None,
    };
    let mut view = build_view(&state, &topology, &cluster, &names, store_error).await;
    view.leader = leader;
    Ok(if json {
        serde_json::to_string_pretty(&view)? + "\n"
    } else {
        table(&view, &state.spec)
    })
}

async fn build_view(
    state: &LabState,
    topology: &trellis_plan::Topology,
    cluster: &trellis_agent::state::ClusterState,
    names: &BTreeMap<PublicKey, String>,
    store_error: Option<String>,
) -> LabView {
    let spec = &state.spec;
    let verdicts = trellis_plan::health::verdicts(topology.nodes.values(), &cluster.observations);
    let mut nodes = Vec::new();
    for n in &spec.nodes {
        let device = uapi::get(
            &UserspaceDevice::socket_path(&n.interface),
            Duration::from_secs(1),
        )
        .await;
        let peers = device
            .map(|d| {
                d.peers
                    .into_iter()
                    .map(|p| PeerView {
                        name: names
                            .get(&p.config.public_key)
                            .cloned()
                            .unwrap_or_else(|| p.config.public_key.to_string()),
                        endpoint: p.config.endpoint.map(|e| e.to_string()),
                        last_handshake_s: p.last_handshake.map(|d| d.as_secs_f64()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let record = topology.nodes.get(&n.name);
        nodes.push(NodeView {
            name: n.name.clone(),
            location: n.location.clone(),
            netns: n.netns.clone(),
            gateway: record.is_some_and(|r| topology.is_gateway(r)),
            served_by: topology.serving.get(&n.name).cloned(),
            forwarding: verdicts.get(&n.name).map(|v| match v {
                Verdict::Up => "up",
                Verdict::Down => "down",
                Verdict::Unknown => "unknown",
            }),
            observed_by: topology
                .observers
                .get(&n.name)
                .into_iter()
                .flatten()
                .filter_map(|o| Some((o.clone(), *cluster.observations.get(&n.name)?.get(o)?)))
                .collect(),
            agent_pid: state
                .agent_pids
                .get(&n.name)
                .copied()
                .filter(|p| crate::processes::is_alive(*p)),
            ready: crate::agent_admin::ready(state, &n.name).await.ok(),
            agent: cluster.status.get(&n.name).cloned(),
            interface: n.interface.clone(),
            peers,
            pods: n
                .pods
                .iter()
                .map(|p| HostView {
                    name: p.name.clone(),
                    netns: p.netns.clone(),
                    ip: p.ip.addr().to_string(),
                    ip6: p.ip6.map(|a| a.addr().to_string()),
                })
                .collect(),
        });
    }
    let mut warnings = topology.warnings.clone();
    warnings.extend(store_error);
    let embedded = spec.store == crate::store::StoreKind::Embedded;
    let socket = crate::state::store_socket(&spec.name);
    LabView {
        name: spec.name.clone(),
        granularity: spec.granularity.to_string(),
        store: StoreView {
            kind: spec.store.name(),
            pid: state.store_pid.filter(|p| crate::processes::is_alive(*p)),
            netns: crate::store::netns_of(spec),
            socket: embedded.then(|| socket.display().to_string()),
            endpoint: embedded.then(|| format!("unix://{}", socket.display())),
            etcdctl: embedded.then(|| {
                format!(
                    "cd {} && ETCDCTL_API=3 etcdctl --endpoints unix://{} get --prefix {}",
                    socket
                        .parent()
                        .map_or(String::new(), |d| d.display().to_string()),
                    socket
                        .file_name()
                        .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
                    crate::store::ETCD_PREFIX
                )
            }),
            frozen: state.store_pid.and_then(crate::processes::run_state) == Some('T'),
            faults: state.store_faults.iter().map(ToString::to_string).collect(),
        },
        leader: None,
        nodes,
        hosts: spec
            .hosts
            .iter()
            .map(|h| HostView {
                name: h.name.clone(),
                netns: h.netns.clone(),
                ip: h.ip.addr().to_string(),
                ip6: None,
            })
            .collect(),
        broken_paths: topology
            .broken_paths
            .iter()
            .map(|(a, b)| [a.clone(), b.clone()])
            .collect(),
        warnings,
    }
}

fn table(view: &LabView, spec: &LabSpec) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lab {} — granularity {}, {} locations, {} store pid {}{}, leader {}",
        view.name,
        view.granularity,
        spec.locations.len(),
        view.store.kind,
        view.store.pid.map_or("DOWN".to_string(), |p| p.to_string()),
        if view.store.frozen { " (FROZEN)" } else { "" },
        view.leader.as_ref().map_or("none".to_string(), |l| format!(
            "{} (epoch {})",
            l.node, l.epoch
        ))
    );
    for f in &view.store.faults {
        let _ = writeln!(out, "store fault: {f}");
    }
    let _ = writeln!(
        out,
        "{:<6} {:<8} {:<8} {:<7} {:<10} {:<14} peers (last handshake)",
        "NODE", "LOCATION", "ROLE", "AGENT", "POD", "POD IP"
    );
    for n in &view.nodes {
        let role = if n.forwarding == Some("down") {
            "DOWN".to_string()
        } else if n.gateway {
            "gateway".to_string()
        } else {
            n.served_by
                .as_ref()
                .map_or("-".into(), |g| format!("via {g}"))
        };
        let agent = match (&n.agent_pid, n.ready) {
            (None, _) => "DOWN",
            (Some(_), Some(true)) => "ready",
            (Some(_), Some(false)) => "unready",
            (Some(_), None) => "silent",
        };
        let peers: Vec<String> = n
            .peers
            .iter()
            .map(|p| match p.last_handshake_s {
                Some(s) => format!("{}({:.0}s)", p.name, s),
                None => format!("{}(never)", p.name),
            })
            .collect();
        let pod = n.pods.first();
        let _ = writeln!(
            out,
            "{:<6} {:<8} {:<8} {:<7} {:<10} {:<14} {}",
            n.name,
            n.location,
            role,
            agent,
            pod.map_or("", |p| p.name.as_str()),
            pod.map_or("", |p| p.ip.as_str()),
            if peers.is_empty() {
                "-".to_string()
            } else {
                peers.join(" ")
            }
        );
    }
    for h in &view.hosts {
        let _ = writeln!(out, "host {:<10} {:<14} netns {}", h.name, h.ip, h.netns);
    }
    for [a, b] in &view.broken_paths {
        let _ = writeln!(
            out,
            "direct path {a} <-> {b} is broken: relayed through a gateway"
        );
    }
    for w in &view.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
