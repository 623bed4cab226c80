//! Building and removing a lab's namespaces and links. Every veth pair is created inside a
//! lab namespace and one end moved to another lab namespace: nothing is ever created in,
//! or connected to, the host's namespace.

use crate::processes;
use crate::spec::{self, HostSpec, LabSpec, NodeSpec, PodSpec};
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
    // The node's pod network: a bridge holding the pods' gateway address.
    nl.create_bridge("pods0").await?;
    let gateway = IpNet::new(node.pods[0].gateway.into(), node.pod_cidr.prefix_len())?;
    nl.add_address("pods0", gateway).await?;
    nl.set_up("pods0").await?;
    for (i, pod) in node.pods.iter().enumerate() {
        create_pod(&nl, node, pod, i)
            .await
            .with_context(|| format!("pod {}", pod.name))?;
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
    Ok(())
}

async fn create_pod(
    node_nl: &Netlink,
    node: &NodeSpec,
    pod: &PodSpec,
    index: usize,
) -> anyhow::Result<()> {
    netns::create(&pod.netns)?;
    let pod_nl = Netlink::connect_in(&pod.netns)?;
    pod_nl.set_up("lo").await?;
    let outer = format!("pod{index}");
    let node_fd = netns::open(&node.netns)?;
    pod_nl.create_veth("eth0", &outer).await?;
    pod_nl.move_link_to_netns(&outer, &node_fd).await?;
    node_nl.set_master(&outer, "pods0").await?;
    let index = node_nl
        .link_index(&outer)
        .await?
        .with_context(|| format!("{outer} is gone"))?;
    netns::run_in(&node.netns, move || bridge_port_hairpin(index))?
        .with_context(|| format!("hairpin mode on {outer}"))?;
    node_nl.set_up(&outer).await?;
    pod_nl.add_address("eth0", pod.ip.into()).await?;
    pod_nl.set_up("eth0").await?;
    pod_nl
        .add_route(&RouteSpec {
            dst: "0.0.0.0/0".parse()?,
            via: Some(pod.gateway.into()),
            dev: None,
            src: None,
            protocol: RTPROT_STATIC,
        })
        .await?;
    Ok(())
}

/// Hairpin mode on a bridge port of this thread's namespace (`bridge link set dev PORT
/// hairpin on`), as the CNI bridge plugin sets it on pod ports: a pod that reaches a
/// Service whose chosen endpoint is itself sends a frame that, DNATed on the bridge
/// (br_netfilter), must go back out of the port it came in by. One RTM_SETLINK for the
/// bridge family with `IFLA_PROTINFO { IFLA_BRPORT_MODE 1 }`, which the dataplane's
/// netlink client does not build.
fn bridge_port_hairpin(ifindex: u32) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const RTM_SETLINK: u16 = 19;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const AF_BRIDGE: u8 = 7;
    const IFLA_PROTINFO: u16 = 12;
    const NLA_F_NESTED: u16 = 0x8000;
    const IFLA_BRPORT_MODE: u16 = 4;
    const LEN: u32 = 16 + 16 + 4 + 8;
    let mut msg = Vec::with_capacity(LEN as usize);
    // nlmsghdr: length, type, flags, sequence, port id
    msg.extend(LEN.to_ne_bytes());
    msg.extend(RTM_SETLINK.to_ne_bytes());
    msg.extend((NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    // ifinfomsg: family, padding, type, index, flags, change
    msg.extend([AF_BRIDGE, 0]);
    msg.extend(0u16.to_ne_bytes());
    msg.extend(ifindex.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    // IFLA_PROTINFO (nested) { IFLA_BRPORT_MODE: u8 1 }
    msg.extend(12u16.to_ne_bytes());
    msg.extend((IFLA_PROTINFO | NLA_F_NESTED).to_ne_bytes());
    msg.extend(5u16.to_ne_bytes());
    msg.extend(IFLA_BRPORT_MODE.to_ne_bytes());
    msg.extend([1, 0, 0, 0]);
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of the size given; send and recv use buffers of
    // the lengths given.
    unsafe {
        if libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) < 0
        {
            return Err(Error::last_os_error());
        }
        if libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) < 0 {
            return Err(Error::last_os_error());
        }
        let mut answer = [0u8; 1024];
        let n = libc::recv(
            socket.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        );
        if n < 0 {
            return Err(Error::last_os_error());
        }
        let n = n as usize;
        if n < 20 || u16::from_ne_bytes([answer[4], answer[5]]) != NLMSG_ERROR {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "no netlink acknowledgement",
            ));
        }
        match i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]) {
            0 => Ok(()),
            errno => Err(Error::from_raw_os_error(-errno)),
        }
    }
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
    let dir = state::dir(lab);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
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
