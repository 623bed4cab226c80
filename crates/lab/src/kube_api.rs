//! The lab's Kubernetes API (`lab up --store kubernetes`): the API server double
//! (`trellis-kube-double`) as the cluster's API server, in the store's own namespace with a
//! leg on every location network (as etcd is), and the agents on Trellis's Kubernetes
//! backend against it.
//!
//! `lab serve-kube` plays the control plane and the kubelets: it serves the API, installs
//! the CRDs, and registers every node of the lab as a `Node` (its region label, pod CIDRs and
//! InternalIP, as the kubelet and the controller manager would). The API is also served on a
//! Unix socket in the lab's directory, which is how tools in the host's namespace (and
//! `kubectl` run there through [`proxy_on_loopback`]) reach it without joining the lab's
//! networks to the host's.

use crate::spec::{LabSpec, etcd_ip};
use crate::state::{self, LabState};
use anyhow::Context;
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use trellis_kube::api_address::{ApiAddress, Source};
use trellis_kube::client::{Kind, Kube};
use trellis_store::Store;

/// The API's port on the store namespace's legs (plain HTTP: the double has no TLS).
pub const KUBE_API_PORT: u16 = 6443;
/// Where Trellis keeps its Leases and settings in a lab.
pub const NAMESPACE: &str = "trellis-system";

pub fn socket(lab: &str) -> PathBuf {
    state::dir(lab).join("kube-api.sock")
}

/// The API address the agents of location `index` are given.
pub fn agent_url(location_index: usize) -> String {
    format!("http://{}:{KUBE_API_PORT}", etcd_ip(location_index))
}

/// `lab serve-kube`: serves the double until SIGTERM.
pub async fn serve(lab: &str) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    let mut double =
        trellis_kube_double::KubeDouble::start(SocketAddr::from(([0, 0, 0, 0], KUBE_API_PORT)))
            .await
            .context("serving the Kubernetes API double")?;
    double.listen_unix(&socket(lab))?;
    let kube = client(&format!("http://127.0.0.1:{KUBE_API_PORT}"))?;
    register(&kube, &state.spec).await?;
    tracing::info!(port = KUBE_API_PORT, socket = %socket(lab).display(), "lab Kubernetes API serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    drop(double);
    Ok(())
}

fn client(url: &str) -> anyhow::Result<Kube> {
    let address = ApiAddress {
        url: url.into(),
        source: Source::Flag,
    };
    Ok(Kube::new(
        &address,
        trellis_agent::store_addr::CALL_TIMEOUT,
    )?)
}

/// What a cluster has before Trellis runs: its CRDs, its namespace, and its Nodes.
async fn register(kube: &Kube, spec: &LabSpec) -> anyhow::Result<()> {
    let crds = Kind::custom_resource_definition();
    kube.create(&crds, None, &trellis_kube::location::crd())
        .await?;
    kube.create(&crds, None, &trellis_kube::peer::kilo_crd())
        .await?;
    kube.create(
        &Kind::namespace(),
        None,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    .await?;
    for node in &spec.nodes {
        let mut cidrs = vec![node.pod_cidr.to_string()];
        cidrs.extend(node.pod_cidr_v6.map(|c| c.to_string()));
        let object = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": {
                trellis_kube::annotations::REGION_LABEL: node.location,
                "kubernetes.io/hostname": node.name,
            }},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
        });
        kube.create(&Kind::node(), None, &object).await?;
        let status = json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": node.internal_ip.addr().to_string()},
                {"type": "Hostname", "address": node.name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        }});
        kube.merge_patch(&Kind::node(), None, &node.name, &status, true)
            .await?;
    }
    Ok(())
}

/// What the API server and a kubelet have of a pod before its sandbox's CNI ADD: the Pod,
/// scheduled to its node, with its labels and named ports (and its namespace).
pub async fn pod_scheduled(
    lab: &str,
    node: &str,
    pod: &crate::spec::PodSpec,
) -> anyhow::Result<()> {
    let kube = host_client(lab)?;
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": pod.namespace}});
    match kube.create(&Kind::namespace(), None, &namespace).await {
        Err(trellis_kube::client::KubeError::Refused { code: 409, .. }) | Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    let ports: Vec<serde_json::Value> = (pod.ports.iter())
        .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.protocol}))
        .collect();
    let object = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {"nodeName": node, "containers": [{"name": "echo", "ports": ports}]},
    });
    kube.delete(&Kind::pod(), Some(&pod.namespace), &pod.name)
        .await?;
    kube.create(&Kind::pod(), Some(&pod.namespace), &object)
        .await?;
    let status = json!({"status": {"phase": "Pending"}});
    kube.merge_patch(&Kind::pod(), Some(&pod.namespace), &pod.name, &status, true)
        .await?;
    Ok(())
}

/// What the kubelet reports once the sandbox has its network: the pod's addresses, Running.
pub async fn pod_running(lab: &str, pod: &crate::spec::PodSpec) -> anyhow::Result<()> {
    let kube = host_client(lab)?;
    let mut ips = vec![json!({"ip": pod.ip.addr().to_string()})];
    ips.extend(pod.ip6.map(|a| json!({"ip": a.addr().to_string()})));
    let status = json!({"status": {"phase": "Running", "podIP": ips[0]["ip"], "podIPs": ips}});
    kube.merge_patch(&Kind::pod(), Some(&pod.namespace), &pod.name, &status, true)
        .await?;
    Ok(())
}

/// The Pod removed (`lab pod del`), from synchronous code: on a thread of its own with a
/// runtime of its own.
pub fn pod_deleted(lab: &str, pod: &crate::spec::PodSpec) -> anyhow::Result<()> {
    let (lab, namespace, name) = (lab.to_string(), pod.namespace.clone(), pod.name.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let kube = host_client(&lab)?;
            kube.delete(&Kind::pod(), Some(&namespace), &name).await?;
            anyhow::Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("deleting pod {}: the thread panicked", pod.name))?
}

/// A listener on the host's loopback that forwards each connection to the lab's API
/// socket, for clients that speak TCP only; lives as long as the current runtime.
pub fn proxy_on_loopback(lab: &str) -> anyhow::Result<SocketAddr> {
    let path = socket(lab);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Handle::try_current()
        .context("the lab's Kubernetes API is reached from within a runtime")?;
    runtime.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        while let Ok((mut tcp, _)) = listener.accept().await {
            let path = path.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&path).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    Ok(addr)
}

/// A client of the lab's API from the host's namespace.
pub fn host_client(lab: &str) -> anyhow::Result<Kube> {
    let addr = proxy_on_loopback(lab)?;
    client(&format!("http://{addr}"))
}

/// The lab's store as the agents see it, for tools in the host's namespace.
pub fn open(lab: &str) -> anyhow::Result<Arc<dyn Store>> {
    let kube = host_client(lab)?;
    Ok(Arc::new(trellis_kube::store::KubeStore::start(
        kube, NAMESPACE,
    )))
}
