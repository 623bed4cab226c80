//! The lab's pods get their network from the CNI plugin, called exactly as a runtime calls
//! it ([`crate::cni`]): a sandbox namespace, then ADD in the node's namespace with the
//! node's configuration; DEL before the sandbox goes. So every lab test and demo runs the
//! plugin, and `lab pod add` / `lab pod del` are what a kubelet does for one pod.

use crate::cni::{self, Call};
use crate::spec::{LabSpec, NodeSpec, PodSpec};
use crate::state::{self, LabState};
use anyhow::{Context, bail};
use ipnet::{IpNet, Ipv4Net};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::netns;

/// The network's name in the lab's configuration.
pub const NETWORK: &str = "trellis-lab";
/// How long ADD is retried while the plugin says "try again later" (the node file not
/// written yet: the agent is starting).
const ADD_PATIENCE: Duration = Duration::from_secs(30);

/// The plugin's configuration on `node`, as a runtime hands it over (one plugin of the
/// list, with the list's name and version).
pub fn plugin_config(lab: &str, node: &str) -> Value {
    json!({
        "cniVersion": trellis_cni::spec::CNI_VERSION,
        "name": NETWORK,
        "type": cni::PLUGIN,
        "nodeFile": state::cni_node_file(lab, node),
        "ipamFile": state::cni_ipam_file(lab, node),
        "readyFile": state::cni_ready_file(lab, node),
        "policyFile": state::cni_policy_file(lab, node),
    })
}

/// A new sandbox identity for a pod: its name and the time, as unique as a runtime's.
fn new_container_id(pod: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{pod}-{nanos:x}")
}

/// Creates the pod's sandbox and calls ADD; records what the plugin gave it in `pod`.
pub async fn create(spec: &LabSpec, node: &NodeSpec, pod: &mut PodSpec) -> anyhow::Result<()> {
    create_with(spec, node, pod, &cni::plugin_path()?, ADD_PATIENCE).await
}

/// [`create`] through another plugin (one that wraps `trellis-cni`), retrying "try again
/// later" for up to `patience`, as a kubelet retries a sandbox.
pub async fn create_with(
    spec: &LabSpec,
    node: &NodeSpec,
    pod: &mut PodSpec,
    plugin: &std::path::Path,
    patience: Duration,
) -> anyhow::Result<()> {
    if !netns::exists(&pod.netns) {
        netns::create(&pod.netns)?;
        // Loopback is the runtime's, not the plugin's.
        Netlink::connect_in(&pod.netns)?.set_up("lo").await?;
    }
    pod.container_id = new_container_id(&pod.name);
    let on_kubernetes = spec.store == crate::spec::StoreKind::Kubernetes;
    // On a Kubernetes lab the Pod object comes first, as the API server has it before a
    // kubelet makes the sandbox. Best effort: a kubelet re-creates the sandboxes of pods it
    // knows with the API down (a cold boot), and so does the lab.
    if on_kubernetes
        && let Err(e) = crate::kube_api::pod_scheduled(&spec.name, &node.name, pod).await
    {
        tracing::warn!(pod = %pod.name, "the Pod object: {e:#}");
    }
    match add(spec, node, pod, plugin, patience).await {
        Ok(result) => {
            record(pod, &result)?;
            if on_kubernetes && let Err(e) = crate::kube_api::pod_running(&spec.name, pod).await {
                tracing::warn!(pod = %pod.name, "the Pod's status: {e:#}");
            }
            Ok(())
        }
        Err(e) => {
            // No sandbox holds a network: the next try is a new one, in the same namespace.
            pod.container_id.clear();
            Err(e)
        }
    }
}

async fn add(
    spec: &LabSpec,
    node: &NodeSpec,
    pod: &PodSpec,
    plugin: &std::path::Path,
    patience: Duration,
) -> anyhow::Result<Value> {
    let plugin = plugin.to_path_buf();
    let mut config = plugin_config(&spec.name, &node.name);
    // As a runtime names and labels the pod: CNI_ARGS like a kubelet's, the labels in the
    // configuration's `args` (the CNI conventions'), which network policy reads.
    let labels: Vec<Value> = (pod.labels.iter())
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    let ports: Vec<Value> = (pod.ports.iter())
        .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.port}))
        .collect();
    config["args"] = json!({"cni": {"labels": labels}, "trellis": {"ports": ports}});
    let args = format!(
        "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
        pod.namespace, pod.name
    );
    let netns_path = format!("/run/netns/{}", pod.netns);
    let started = Instant::now();
    loop {
        let (plugin, config, netns_path) = (plugin.clone(), config.clone(), netns_path.clone());
        let (runtime_netns, container_id) = (node.netns.clone(), pod.container_id.clone());
        let args = args.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            cni::call(&Call {
                plugin: &plugin,
                runtime_netns: &runtime_netns,
                command: "ADD",
                container_id: &container_id,
                netns_path: &netns_path,
                ifname: "eth0",
                cni_path: "",
                args: &args,
                config: &config,
            })
        })
        .await??;
        match outcome.result() {
            Ok(result) => return Ok(result),
            Err(e) if try_again(&outcome) && started.elapsed() < patience => {
                tracing::debug!(pod = %pod.name, "ADD: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("CNI ADD for pod {}", pod.name)),
        }
    }
}

/// The plugin answered code 11: "try again later".
fn try_again(outcome: &cni::Outcome) -> bool {
    serde_json::from_slice::<Value>(&outcome.stdout)
        .ok()
        .and_then(|e| e.get("code")?.as_u64())
        == Some(u64::from(trellis_cni::spec::code::TRY_AGAIN_LATER))
}

/// The pod's addresses from the plugin's result.
fn record(pod: &mut PodSpec, result: &Value) -> anyhow::Result<()> {
    let addresses: Vec<IpNet> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.parse().ok())
        .collect();
    let Some(IpNet::V4(v4)) = addresses.iter().find(|a| a.addr().is_ipv4()) else {
        bail!("the plugin gave pod {} no IPv4 address: {result}", pod.name);
    };
    pod.ip = Ipv4Net::new(v4.addr(), 32)?;
    pod.ip6 = addresses.iter().find_map(|a| match a {
        IpNet::V6(v6) => Some(*v6),
        IpNet::V4(_) => None,
    });
    Ok(())
}

/// DEL for the pod's sandbox, then the sandbox goes. DEL is retried once on failure; a
/// sandbox that is already gone is fine (DEL must succeed without it).
pub fn delete(spec: &LabSpec, node: &NodeSpec, pod: &PodSpec) -> anyhow::Result<()> {
    if spec.store == crate::spec::StoreKind::Kubernetes
        && let Err(e) = crate::kube_api::pod_deleted(&spec.name, pod)
    {
        tracing::warn!(pod = %pod.name, "removing the Pod object: {e:#}");
    }
    let plugin = cni::plugin_path()?;
    let config = plugin_config(&spec.name, &node.name);
    let netns_path = if netns::exists(&pod.netns) {
        format!("/run/netns/{}", pod.netns)
    } else {
        String::new()
    };
    let call = Call {
        plugin: &plugin,
        runtime_netns: &node.netns,
        command: "DEL",
        container_id: &pod.container_id,
        netns_path: &netns_path,
        ifname: "eth0",
        cni_path: "",
        args: "",
        config: &config,
    };
    let outcome = cni::call(&call).or_else(|_| cni::call(&call))?;
    outcome
        .result()
        .with_context(|| format!("CNI DEL for pod {}", pod.name))?;
    if netns::exists(&pod.netns) {
        netns::delete(&pod.netns)?;
    }
    Ok(())
}

/// `lab pod add NODE NAME`: a new pod on a node, recorded in the lab's state (the pods'
/// echo server picks it up).
pub async fn add_pod(
    lab: &str,
    node: &str,
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    ports: Vec<trellis_model::NamedPort>,
) -> anyhow::Result<PodSpec> {
    let mut lab_state = LabState::load(lab)?;
    let node_spec = lab_state.spec.node(node)?.clone();
    let mut pod = lab_state.spec.new_pod(node, name)?;
    pod.namespace = namespace.to_string();
    pod.labels = labels;
    pod.ports = ports;
    // What the agents will read of it, checked here with the field named.
    trellis_model::Validate::validate(&trellis_model::Pod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        labels: pod.labels.clone(),
        ips: Vec::new(),
        node: node.to_string(),
        ports: pod.ports.clone(),
    })
    .map_err(|e| anyhow::anyhow!("pod {name}: {e}"))?;
    create(&lab_state.spec, &node_spec, &mut pod)
        .await
        .with_context(|| format!("creating pod {name} on {node}"))?;
    lab_state
        .spec
        .nodes
        .iter_mut()
        .find(|n| n.name == node)
        .context("the node went away")?
        .pods
        .push(pod.clone());
    lab_state.save()?;
    Ok(pod)
}

/// `lab pod del NAME`: the pod's DEL, its sandbox removed, and the pod forgotten.
pub fn del_pod(lab: &str, name: &str) -> anyhow::Result<()> {
    let mut lab_state = LabState::load(lab)?;
    let Some((node, pod)) = lab_state
        .spec
        .all_pods()
        .find(|(_, p)| p.name == name)
        .map(|(n, p)| (n.clone(), p.clone()))
    else {
        bail!("lab {lab} has no pod {name:?}");
    };
    delete(&lab_state.spec, &node, &pod)?;
    for n in &mut lab_state.spec.nodes {
        n.pods.retain(|p| p.name != name);
    }
    lab_state.save()
}
