//! Building and removing a lab's namespaces and links. Every veth pair is created inside a
//! lab namespace and one end moved to another lab namespace: nothing is ever created in,
//! or connected to, the host's namespace. Pods are not made here: the CNI plugin makes
//! them once the node's agent runs ([`crate::pod_network`]).

use crate::processes;
use crate::spec::{self, HostSpec, LabSpec, NodeSpec};
use crate::state;
use anyhow::Context;
use ipnet::IpNet;
use std::time::Duration;
use trellis_dataplane::netlink::{Netlink, RouteSpec};
use trellis_dataplane::netns;

/// Route protocol "static" (RTPROT_STATIC): what `ip route add` would mark.
const RTPROT_STATIC: u8 = 4;

pub async fn create_fabric(spec: &LabSpec) -> anyhow::Result<()> {
    let fabric = spec::fabric_netns(&spec.name);
    netns::create(&fabric)?;
    let nl = Netlink::connect_in(&fabric)?;
    nl.set_up("lo").await?;
    // The fabric only switches: a bridge has no address, so it never forwards at IP level.
    for bridge in spec
        .locations
        .iter()
        .map(|l| l.bridge.as_str())
        .chain([spec::PUBLIC_BRIDGE])
    {
        nl.create_bridge(bridge).await?;
        nl.set_up(bridge).await?;
    }
    Ok(())
}

/// A veth pair from `ns` (end `inner`, addressed) to the fabric bridge `bridge`.
pub(crate) async fn attach_to_fabric(
    spec: &LabSpec,
    nl: &Netlink,
    fabric: &Netlink,
    inner: &str,
    outer: &str,
    bridge: &str,
    address: IpNet,
) -> anyhow::Result<()> {
    let fabric_fd = netns::open(&spec::fabric_netns(&spec.name))?;
    nl.create_veth(inner, outer).await?;
    nl.move_link_to_netns(outer, &fabric_fd).await?;
    fabric.set_master(outer, bridge).await?;
    fabric.set_up(outer).await?;
    nl.add_address(inner, address).await?;
    Ok(nl.set_up(inner).await?)
}

pub async fn create_node(spec: &LabSpec, node: &NodeSpec) -> anyhow::Result<()> {
    netns::create(&node.netns)?;
    let nl = Netlink::connect_in(&node.netns)?;
    let fabric = Netlink::connect_in(&spec::fabric_netns(&spec.name))?;
    nl.set_up("lo").await?;
    let location = spec.location(&node.location);
    attach_to_fabric(
        spec,
        &nl,
        &fabric,
        "int0",
        &format!("i-{}", node.name),
        &location.bridge,
        node.internal_ip.into(),
    )
    .await
    .with_context(|| format!("internal network of {}", node.name))?;
    if let Some(public) = node.public_ip {
        attach_to_fabric(
            spec,
            &nl,
            &fabric,
            "pub0",
            &format!("p-{}", node.name),
            spec::PUBLIC_BRIDGE,
            public.into(),
        )
        .await
        .with_context(|| format!("public network of {}", node.name))?;
    }
    // The service range, as a node's default route would cover it: a packet to a ClusterIP
    // port no Service serves, or to a Service without endpoints, must be routed before the
    // proxy's REJECT in the forward (or output) hook sees it. One the proxy DNATs never
    // takes this route.
    nl.add_route(&RouteSpec {
        dst: spec::SERVICE_CIDR.parse()?,
        via: None,
        dev: Some("int0".into()),
        src: None,
        protocol: RTPROT_STATIC,
    })
    .await
    .context("routing the service range")?;
    if node.pod_cidr_v6.is_some() {
        // The same for IPv6 ClusterIPs, which the pods of a dual-stack lab reach.
        nl.add_route(&RouteSpec {
            dst: spec::SERVICE_CIDR_V6.parse()?,
            via: None,
            dev: Some("int0".into()),
            src: None,
            protocol: RTPROT_STATIC,
        })
        .await
        .context("routing the IPv6 service range")?;
    }
    Ok(())
}

pub async fn create_host(spec: &LabSpec, host: &HostSpec) -> anyhow::Result<()> {
    netns::create(&host.netns)?;
    let nl = Netlink::connect_in(&host.netns)?;
    let fabric = Netlink::connect_in(&spec::fabric_netns(&spec.name))?;
    nl.set_up("lo").await?;
    attach_to_fabric(
        spec,
        &nl,
        &fabric,
        "eth0",
        &format!("h-{}", host.name),
        spec::PUBLIC_BRIDGE,
        host.ip.into(),
    )
    .await?;
    // Load-balancer addresses go to the first public node, standing in for a cloud load
    // balancer in front of the cluster.
    if let Some(public) = spec.nodes.iter().find_map(|n| n.public_ip) {
        nl.add_route(&RouteSpec {
            dst: spec::LOAD_BALANCER_RANGE.parse()?,
            via: Some(public.addr().into()),
            dev: None,
            src: None,
            protocol: RTPROT_STATIC,
        })
        .await
        .context("routing the load-balancer range")?;
    }
    Ok(())
}

/// Namespaces (and so links, bridges and TUN devices inside them) and processes of a
/// lab, found by name prefix so that this also cleans up after a `lab up` that crashed
/// before it wrote its state file.
pub fn teardown(lab: &str) -> anyhow::Result<Teardown> {
    spec::validate_lab_name(lab)?;
    let prefix = spec::netns_prefix(lab);
    let namespaces: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    let mut report = Teardown::default();
    // Agents first (they release their status and leadership), the store last.
    let fabric = spec::fabric_netns(lab);
    let etcd = format!("tl-{lab}-store");
    let (stores, agents): (Vec<&String>, Vec<&String>) = namespaces
        .iter()
        .partition(|n| **n == fabric || **n == etcd);
    for ns in agents.into_iter().chain(stores) {
        report.processes += netns::pids_in(ns).len();
        processes::kill_all_in(ns, Duration::from_secs(2));
    }
    let mut errors = Vec::new();
    for ns in &namespaces {
        match netns::delete(ns) {
            Ok(()) => report.namespaces += 1,
            Err(e) => errors.push(format!("{ns}: {e:#}")),
        }
    }
    // Control sockets of the lab's userspace WireGuard devices live outside namespaces.
    let socket_prefix = format!("tw-{lab}-");
    if let Ok(entries) = std::fs::read_dir(trellis_dataplane::wireguard::userspace::SOCKET_DIR) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&socket_prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for dir in [
        state::dir(lab),
        std::path::Path::new(state::DISKS_DIR).join(lab),
    ] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("could not remove: {}", errors.join("; "));
    }
    crate::built::removed(lab);
    Ok(report)
}

#[derive(Debug, Default)]
pub struct Teardown {
    pub namespaces: usize,
    pub processes: usize,
}

/// `lab host add`: a bare host (no agent) on the lab's public network, recorded in the
/// lab's state.
pub async fn add_host(lab: &str, host: &str) -> anyhow::Result<HostSpec> {
    let mut state = state::LabState::load(lab)?;
    let spec = state.spec.new_host(host)?;
    create_host(&state.spec, &spec)
        .await
        .with_context(|| format!("creating host {host}"))?;
    state.spec.hosts.push(spec.clone());
    state.save()?;
    Ok(spec)
}
