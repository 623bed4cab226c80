//! The lab's addressing plan: a pure function from the `lab up` parameters to every
//! namespace, link and address. Ranges (see ENVIRONMENT.md): underlay "public" network
//! 198.18.0.0/16, location-internal networks 172.20.0.0/16, pod CIDRs 10.244.0.0/16 and,
//! in a dual-stack lab (`lab up --dual-stack`), IPv6 pod CIDRs from fd00:10:244::/56 (node
//! K gets `fd00:10:244:K::/64`, K in hex; see [`pod_cidr_v6`]), overlay addresses
//! 100.64.0.0/16, probe addresses 100.65.0.0/16, Service ClusterIPs from the cluster's
//! default service ranges 10.96.0.0/12 and fd00:10:96::/108 (every node routes them, see
//! [`SERVICE_CIDR`]), load-balancer addresses 198.19.0.0/24 ([`LOAD_BALANCER_RANGE`]).
//! Nothing here is routed outside the lab's namespaces.

use anyhow::bail;
use clap::ValueEnum;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use trellis_model::{GatewayHealth, Granularity};

pub const LISTEN_PORT: u16 = 51820;
/// Where a lab's etcd listens for clients, on each location network.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const MAX_NAME: usize = 6;
/// The ClusterIP range (the store's default service settings, as kubeadm's). Every node
/// routes it out of its internal network, as a node's default route would: the proxy's
/// REJECT of a port no Service serves, or of a Service without endpoints, sits in the
/// forward and output hooks, which a packet only reaches once routing has found a route.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The IPv6 ClusterIP range (the store's default), routed alike in a dual-stack lab.
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/108";
/// Where `lab service add --type LoadBalancer` takes ingress addresses from (198.19.0.1 up,
/// the other half of the benchmarking range the public network is in). Lab hosts route it
/// to the first public node, which stands in for a cloud load balancer.
pub const LOAD_BALANCER_RANGE: &str = "198.19.0.0/24";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabParams {
    pub name: String,
    pub nodes: usize,
    pub locations: usize,
    pub granularity: Granularity,
    pub gateways: usize,
    /// Nodes per location that join the public network (the first ones of each).
    pub public_per_location: usize,
    pub pods_per_node: usize,
    /// How often agents re-read and repair kernel state, in seconds.
    pub agent_resync: u64,
    pub gateway_health: GatewayHealth,
    pub store: StoreKind,
    /// Every node gets an IPv6 pod CIDR beside its IPv4 one, and every pod an IPv6 address.
    pub dual_stack: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub granularity: Granularity,
    pub gateways: usize,
    pub locations: Vec<LocationSpec>,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub hosts: Vec<HostSpec>,
    #[serde(default = "default_resync")]
    pub agent_resync: u64,
    #[serde(default)]
    pub gateway_health: GatewayHealth,
    #[serde(default)]
    pub store: StoreKind,
}

fn default_resync() -> u64 {
    10
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationSpec {
    pub name: String,
    pub subnet: Ipv4Net,
    /// Bridge in the fabric namespace that is the location's internal network.
    pub bridge: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub location: String,
    pub netns: String,
    pub internal_ip: Ipv4Net,
    pub public_ip: Option<Ipv4Net>,
    pub pod_cidr: Ipv4Net,
    /// The IPv6 pod CIDR, in a dual-stack lab (given to the agent as a second `--pod-cidr`).
    #[serde(default)]
    pub pod_cidr_v6: Option<Ipv6Net>,
    pub overlay_ip: Ipv4Addr,
    /// Address forwarding probes use (100.65.0.0/16).
    pub probe_ip: Ipv4Addr,
    /// The WireGuard interface; unique on the machine because userspace control sockets
    /// live in one directory shared by all namespaces.
    pub interface: String,
    pub pods: Vec<PodSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub netns: String,
    /// What the CNI plugin gave the pod (before the pod exists: what it will give, the
    /// node's allocations being made in order from the CIDR's second address).
    pub ip: Ipv4Net,
    /// Its IPv6 address, in a dual-stack lab.
    #[serde(default)]
    pub ip6: Option<Ipv6Net>,
    pub gateway: Ipv4Addr,
    /// The sandbox the CNI plugin was called for (`CNI_CONTAINERID`): a new one each time
    /// the pod is created, as a runtime makes a new sandbox.
    #[serde(default)]
    pub container_id: String,
    /// Its Kubernetes namespace and labels, which the runtime hands the CNI plugin and
    /// network policy selects by.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Its named ports (what a policy's `port: NAME` means for traffic to it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<trellis_model::NamedPort>,
}

pub const DEFAULT_NAMESPACE: &str = "default";

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Net,
}

pub const PUBLIC_BRIDGE: &str = "br-pub";

pub fn validate_lab_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        bail!(
            "invalid --name {name:?}: 1-{MAX_NAME} lowercase letters or digits (it prefixes interface names, which are limited to 15 characters)"
        );
    }
    Ok(())
}

pub fn netns_prefix(lab: &str) -> String {
    format!("tl-{lab}-")
}

pub fn fabric_netns(lab: &str) -> String {
    format!("tl-{lab}-fabric")
}

impl LabParams {
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_lab_name(&self.name)?;
        if !(1..=200).contains(&self.nodes) {
            bail!("invalid --nodes {}: 1-200", self.nodes);
        }
        if !(1..=20).contains(&self.locations) {
            bail!("invalid --locations {}: 1-20", self.locations);
        }
        if self.locations > self.nodes {
            bail!(
                "invalid --locations {}: more locations than --nodes {}",
                self.locations,
                self.nodes
            );
        }
        if !(1..=16).contains(&self.gateways) {
            bail!("invalid --gateways {}: 1-16", self.gateways);
        }
        if !(1..=3600).contains(&self.agent_resync) {
            bail!(
                "invalid --agent-resync {}: 1-3600 seconds",
                self.agent_resync
            );
        }
        if !(1..=8).contains(&self.pods_per_node) {
            bail!("invalid --pods {}: 1-8 per node", self.pods_per_node);
        }
        Ok(())
    }

    pub fn spec(&self) -> anyhow::Result<LabSpec> {
        self.validate()?;
        let lab = &self.name;
        let locations: Vec<LocationSpec> = (0..self.locations)
            .map(|i| LocationSpec {
                name: format!("site-{}", letter(i)),
                subnet: Ipv4Net::new(Ipv4Addr::new(172, 20, i as u8, 0), 24).expect("valid prefix"),
                bridge: format!("br-{}", letter(i)),
            })
            .collect();
        let mut nodes = Vec::with_capacity(self.nodes);
        for (i, location) in locations.iter().enumerate() {
            let count = self.nodes / self.locations + usize::from(i < self.nodes % self.locations);
            for j in 0..count {
                let k = nodes.len();
                let name = format!("{}{}", letter(i), j + 1);
                let netns = format!("tl-{lab}-{name}");
                let pod_base = Ipv4Addr::new(10, 244, k as u8, 0);
                // The CNI plugin's gateway: the pod CIDR's first address.
                let gateway = Ipv4Addr::new(10, 244, k as u8, 1);
                let pods = (0..self.pods_per_node)
                    .map(|p| PodSpec {
                        name: format!("{name}-p{p}"),
                        netns: format!("tl-{lab}-{name}-p{p}"),
                        ip: Ipv4Net::new(Ipv4Addr::new(10, 244, k as u8, 2 + p as u8), 32)
                            .expect("valid prefix"),
                        ip6: None,
                        gateway,
                        container_id: String::new(),
                        namespace: default_namespace(),
                        labels: BTreeMap::new(),
                        ports: Vec::new(),
                    })
                    .collect();
                nodes.push(NodeSpec {
                    interface: format!("tw-{lab}-{name}"),
                    internal_ip: Ipv4Net::new(Ipv4Addr::new(172, 20, i as u8, 10 + j as u8), 24)
                        .expect("valid prefix"),
                    public_ip: (j < self.public_per_location).then(|| {
                        Ipv4Net::new(
                            Ipv4Addr::new(198, 18, (k / 200) as u8, 10 + (k % 200) as u8),
                            16,
                        )
                        .expect("valid prefix")
                    }),
                    pod_cidr: Ipv4Net::new(pod_base, 24).expect("valid prefix"),
                    pod_cidr_v6: self.dual_stack.then(|| pod_cidr_v6(k)),
                    overlay_ip: Ipv4Addr::new(100, 64, (k / 250) as u8, (k % 250 + 1) as u8),
                    probe_ip: Ipv4Addr::new(100, 65, (k / 250) as u8, (k % 250 + 1) as u8),
                    location: location.name.clone(),
                    netns,
                    name,
                    pods,
                });
            }
        }
        Ok(LabSpec {
            name: lab.clone(),
            granularity: self.granularity,
            gateways: self.gateways,
            locations,
            nodes,
            hosts: Vec::new(),
            agent_resync: self.agent_resync,
            gateway_health: self.gateway_health,
            store: self.store,
        })
    }
}

/// Node `k`'s IPv6 pod CIDR in a dual-stack lab: `fd00:10:244:K::/64` (K in hex), inside
/// fd00:10:244::/56, which holds the largest lab's 200 nodes.
pub fn pod_cidr_v6(k: usize) -> Ipv6Net {
    let k = u16::try_from(k)
        .ok()
        .filter(|k| *k <= 0xff)
        .expect("at most 256 nodes");
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0x10, 0x244, k, 0, 0, 0, 0), 64).expect("valid prefix")
}

fn letter(i: usize) -> char {
    (b'a' + i as u8) as char
}

impl LabSpec {
    pub fn node(&self, name: &str) -> anyhow::Result<&NodeSpec> {
        match self.nodes.iter().find(|n| n.name == name) {
            Some(n) => Ok(n),
            None => {
                let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
                bail!(
                    "lab {} has no node {name:?} (nodes: {})",
                    self.name,
                    names.join(", ")
                )
            }
        }
    }

    pub fn location(&self, name: &str) -> &LocationSpec {
        self.locations
            .iter()
            .find(|l| l.name == name)
            .expect("nodes name existing locations")
    }

    /// A new external host on the public network.
    pub fn new_host(&self, name: &str) -> anyhow::Result<HostSpec> {
        if name.is_empty()
            || name.len() > 8
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("invalid host name {name:?}: 1-8 lowercase letters or digits");
        }
        if self.hosts.iter().any(|h| h.name == name) || self.nodes.iter().any(|n| n.name == name) {
            bail!(
                "lab {} already has a host or node named {name:?}",
                self.name
            );
        }
        let i = self.hosts.len();
        if i >= 200 {
            bail!("lab {} has the maximum of 200 hosts", self.name);
        }
        Ok(HostSpec {
            name: name.to_string(),
            netns: format!("tl-{}-h-{name}", self.name),
            ip: Ipv4Net::new(Ipv4Addr::new(198, 18, 100, 10 + i as u8), 16).expect("valid prefix"),
        })
    }

    /// A new pod on `node` (`lab pod add`); its addresses come from the CNI plugin.
    pub fn new_pod(&self, node: &str, name: &str) -> anyhow::Result<PodSpec> {
        let node = self.node(node)?;
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            bail!("invalid pod name {name:?}: 1-12 lowercase letters, digits or '-'");
        }
        if self.all_pods().any(|(_, p)| p.name == name) {
            bail!("lab {} already has a pod named {name:?}", self.name);
        }
        let gateway = node.pod_cidr.hosts().next().expect("a /24 has hosts");
        Ok(PodSpec {
            name: name.to_string(),
            netns: format!("tl-{}-{}-{name}", self.name, node.name),
            ip: Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32).expect("valid prefix"),
            ip6: None,
            gateway,
            container_id: String::new(),
            namespace: default_namespace(),
            labels: BTreeMap::new(),
            ports: Vec::new(),
        })
    }

    /// Whether the lab's nodes have IPv6 pod CIDRs (`lab up --dual-stack`).
    pub fn dual_stack(&self) -> bool {
        self.nodes.iter().any(|n| n.pod_cidr_v6.is_some())
    }

    pub fn all_pods(&self) -> impl Iterator<Item = (&NodeSpec, &PodSpec)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
    }
}

/// Which store a lab runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// The embedded store, served over the etcd v3 API on a Unix socket.
    #[default]
    Embedded,
    /// A real etcd (Debian's etcd-server) in its own namespace.
    Etcd,
    /// A Kubernetes API server (the double, `trellis-kube-double`) in its own namespace;
    /// the agents run on Trellis's Kubernetes backend.
    Kubernetes,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Etcd => "etcd",
            StoreKind::Kubernetes => "kubernetes",
        }
    }
}

/// The etcd address on location `index`'s network.
pub fn etcd_ip(location_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 20, location_index as u8, 250)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(nodes: usize, locations: usize) -> LabParams {
        LabParams {
            name: "lab".into(),
            nodes,
            locations,
            granularity: Granularity::Location,
            gateways: 1,
            public_per_location: 2,
            pods_per_node: 1,
            agent_resync: 10,
            gateway_health: GatewayHealth::Forwarding,
            store: Default::default(),
            dual_stack: false,
        }
    }

    #[test]
    fn six_nodes_two_locations() {
        let spec = params(6, 2).spec().unwrap();
        let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a1", "a2", "a3", "b1", "b2", "b3"]);
        let a3 = spec.node("a3").unwrap();
        assert!(a3.public_ip.is_none());
        assert_eq!(a3.internal_ip.to_string(), "172.20.0.12/24");
        assert_eq!(
            spec.node("b1").unwrap().public_ip.unwrap().to_string(),
            "198.18.0.13/16"
        );
        assert!(spec.nodes.iter().all(|n| n.interface.len() <= 15));
        assert!(spec.node("zz").unwrap_err().to_string().contains("a1, a2"));
    }

    #[test]
    fn every_address_is_unique_at_the_largest_size() {
        let spec = params(200, 20).spec().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for n in &spec.nodes {
            assert!(seen.insert(n.internal_ip.addr()), "{}", n.internal_ip);
            assert!(seen.insert(n.overlay_ip));
            assert!(seen.insert(n.probe_ip));
            assert!(seen.insert(n.pod_cidr.addr()));
            if let Some(p) = n.public_ip {
                assert!(seen.insert(p.addr()), "{p}");
            }
            assert!(n.interface.len() <= 15, "{}", n.interface);
        }
    }

    #[test]
    fn a_dual_stack_lab_gives_every_node_its_own_ipv6_pod_cidr() {
        assert!(
            params(6, 2)
                .spec()
                .unwrap()
                .nodes
                .iter()
                .all(|n| n.pod_cidr_v6.is_none())
        );
        let mut p = params(200, 20);
        p.dual_stack = true;
        let spec = p.spec().unwrap();
        assert!(spec.dual_stack());
        let range: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for n in &spec.nodes {
            let v6 = n.pod_cidr_v6.expect("every node");
            assert!(range.contains(&v6) && v6.prefix_len() == 64, "{v6}");
            assert!(seen.insert(v6), "{v6} twice");
        }
        assert_eq!(
            spec.node("b1")
                .map(|n| n.pod_cidr_v6.unwrap().to_string())
                .unwrap(),
            "fd00:10:244:a::/64",
            "b1 is node 10 of 200 in 20 locations"
        );
        // a lab.json from before dual-stack labs loads, as a single-stack lab
        let mut old = serde_json::to_value(params(2, 1).spec().unwrap()).unwrap();
        for n in old["nodes"].as_array_mut().unwrap() {
            n.as_object_mut().unwrap().remove("pod_cidr_v6");
        }
        let loaded: LabSpec = serde_json::from_value(old).unwrap();
        assert!(!loaded.dual_stack());
    }

    #[test]
    fn the_routed_service_range_is_the_one_clusterips_come_from() {
        let settings = trellis_model::ServiceSettings::default();
        assert_eq!(settings.cidrs()[0].to_string(), SERVICE_CIDR);
        assert_eq!(settings.cidrs()[1].to_string(), SERVICE_CIDR_V6);
        let lb: Ipv4Net = LOAD_BALANCER_RANGE.parse().unwrap();
        let spec = params(6, 2).spec().unwrap();
        for n in &spec.nodes {
            for addr in [n.internal_ip.addr(), n.pod_cidr.addr(), n.overlay_ip] {
                assert!(!lb.contains(&addr));
            }
        }
    }

    #[test]
    fn rejects_bad_parameters_by_name() {
        let mut p = params(6, 2);
        p.name = "Lab-1".into();
        assert!(p.spec().unwrap_err().to_string().contains("--name"));
        assert!(
            params(2, 3)
                .spec()
                .unwrap_err()
                .to_string()
                .contains("--locations 3")
        );
        assert!(
            params(0, 1)
                .spec()
                .unwrap_err()
                .to_string()
                .contains("--nodes 0")
        );
    }
}
