//! `trellis agent`: the agent's flags, turned into a checked `AgentConfig`.

use anyhow::bail;
use clap::Args;
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use trellis_agent::leader::ElectionConfig;
use trellis_agent::node_facts::{NodeFacts, discover};
use trellis_agent::probe::ProbeConfig;
use trellis_agent::state::CACHE_GRACE;
use trellis_agent::store_addr::StoreAddress;
use trellis_agent::{AgentConfig, WireGuardBackend};
use trellis_dataplane::wireguard::offload::OffloadMode;
use trellis_model::{Endpoint, GatewayPolicy, Granularity};
use trellis_plan::Settings;
use trellis_plan::health::DetectorConfig;
use trellis_plan::rounds::RoundConfig;

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (lowercase letters, digits, '-').
    #[arg(long)]
    pub node: String,
    /// The location (site, region, zone) this node belongs to. On `--store kubernetes`,
    /// default: the Node's `kilo.squat.ai/location` annotation or region label.
    #[arg(long)]
    pub location: Option<String>,
    /// This node's address and prefix on its location's internal network. On `--store
    /// kubernetes`, default: the Node's InternalIP.
    #[arg(long, value_name = "CIDR")]
    pub internal_ip: Option<IpNet>,
    /// Where other locations reach this node's WireGuard port (host:port). Omit for a
    /// private node. On `--store kubernetes`, default: the Node's ExternalIP, if it has one
    /// (Kilo's `force-endpoint` annotation is read over it by every agent).
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,
    /// WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    /// A pod CIDR of this node (repeat for several). On `--store kubernetes`, default: the
    /// Node's `spec.podCIDRs`.
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<IpNet>,
    /// This node's overlay address, put on the WireGuard interface. On `--store
    /// kubernetes`, default: derived from the node's pod CIDR (100.64.0.0/11 + its index).
    #[arg(long, value_name = "IP")]
    pub overlay_ip: Option<IpAddr>,
    /// The address forwarding probes are sent from and to (omit to take no part in probing).
    /// On `--store kubernetes`, default: derived from the pod CIDR (100.96.0.0/11 + its index).
    #[arg(long, value_name = "IP")]
    pub probe_ip: Option<IpAddr>,
    /// Keepalive every peer of this node sends it, in seconds: for a node behind a NAT
    /// whose mapping would expire (Kilo's `persistent-keepalive`).
    #[arg(long, value_name = "SECONDS")]
    pub persistent_keepalive: Option<u16>,
    /// A prefix of this node's location's own network (a site's LAN), routed to it from
    /// other locations (Kilo's `allowed-location-ips`; repeat for several).
    #[arg(long = "location-prefix", value_name = "CIDR")]
    pub location_prefixes: Vec<IpNet>,
    /// Never serve as a location gateway.
    #[arg(long)]
    pub no_gateway: bool,
    /// Preference when a gateway vacancy is filled (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub gateway_priority: i32,
    /// WireGuard interface name (unique on the machine for the userspace device).
    #[arg(long, default_value = "trellis0")]
    pub interface: String,
    /// Where the private key lives (created with mode 0600 if missing).
    #[arg(long, default_value = "/var/lib/trellis/private.key")]
    pub key_file: PathBuf,
    /// The last cluster state read from the store, kept here to plan from when the agent
    /// starts while the store is unreachable.
    #[arg(long, default_value = "/var/lib/trellis/cluster-state.json")]
    pub state_cache: PathBuf,
    /// Keep no state cache: an agent started during a store outage waits for the store.
    #[arg(long)]
    pub no_state_cache: bool,
    /// The store: etcd://HOST:PORT[,HOST:PORT...], unix:/path/to/store.sock, or kubernetes
    /// (the cluster's API server: see --kube-api).
    #[arg(long)]
    pub store: String,
    #[command(flatten)]
    pub kube: super::state::KubeArgs,
    #[command(flatten)]
    pub etcd: super::state::EtcdArgs,
    /// Take no part in the leader election (never do cluster-wide work).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Leader election: TTL of the session lease, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub election_lease_ms: u64,
    /// Leader election: the leader stops acting this long after its last successful
    /// renewal, in milliseconds (less than the lease).
    #[arg(long, default_value_t = 7_000)]
    pub election_renew_deadline_ms: u64,
    /// Leader election: how often the leader renews, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub election_retry_ms: u64,
    /// Mesh granularity when the store holds no cluster settings.
    #[arg(long, default_value = "location")]
    pub granularity: Granularity,
    /// Gateways per location when the store holds no cluster settings.
    #[arg(long, default_value_t = 2)]
    pub gateways: usize,
    /// Re-read and repair the kernel state at least this often (seconds).
    #[arg(long, default_value_t = 10)]
    pub resync_seconds: u64,
    /// Forwarding probe interval, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub probe_interval_ms: u64,
    /// The shortest a probe round waits for its answer, in milliseconds; it waits longer
    /// when measured round-trip times call for it (srtt + 4 deviations, as TCP).
    #[arg(long, default_value_t = 150)]
    pub probe_min_timeout_ms: u64,
    /// Failed probe rounds in a row before a gateway counts as down.
    #[arg(long, default_value_t = 3)]
    pub probe_multiplier: u32,
    /// How long a recovered gateway must forward before it counts as up, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub hold_down_ms: u64,
    /// Serve metrics (/metrics), readiness (/readyz, /healthz) and the agent's state
    /// (/debug/state) on this address (HOST:PORT); off when absent.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Do not load-balance Services on this node (no `trellis-proxy` nftables table).
    #[arg(long)]
    pub no_service_proxy: bool,
    /// Do not enforce NetworkPolicy on this node (no `trellis-policy` nftables table).
    #[arg(long)]
    pub no_network_policy: bool,
    /// Keep the CNI plugin's node file here (pod CIDRs and MTU; on persistent disk, so
    /// pods get addresses after a reboot before the agent runs).
    #[arg(long, value_name = "PATH")]
    pub cni_node_file: Option<PathBuf>,
    /// Keep the CNI plugin's ready file here (touched while the data plane is programmed;
    /// the plugin's STATUS reads it).
    #[arg(long, value_name = "PATH")]
    pub cni_ready_file: Option<PathBuf>,
    /// The CNI plugin's allocation file (its `ipamFile`), from which network policy knows
    /// this node's pods from their ADD on.
    #[arg(long, value_name = "PATH", default_value = trellis_cni::spec::DEFAULT_IPAM_FILE)]
    pub cni_ipam_file: PathBuf,
    /// Where to tell the CNI plugin which pods' network policy is in place (its ADD waits
    /// for a new pod's).
    #[arg(long, value_name = "PATH", default_value = trellis_cni::spec::DEFAULT_POLICY_FILE)]
    pub cni_policy_file: PathBuf,
    /// WireGuard implementation: userspace (embedded) or kernel.
    #[arg(long, default_value = "userspace", value_parser = ["userspace", "kernel"])]
    pub wireguard: String,
    /// Segmentation offloads of the userspace device's TUN interface and UDP socket: `auto`
    /// asks the kernel for each and falls back, with a log line, where it refuses; `off`
    /// moves one packet per system call.
    #[arg(
        long,
        value_name = "auto|off",
        default_value = "auto",
        env = "TRELLIS_USERSPACE_OFFLOADS"
    )]
    pub userspace_offloads: OffloadMode,
}

impl AgentArgs {
    /// The store's address, with the Kubernetes options when it is the API.
    fn store(&self) -> anyhow::Result<StoreAddress> {
        Ok(match StoreAddress::parse(&self.store)? {
            StoreAddress::Kubernetes(_) => StoreAddress::Kubernetes(self.kube.options()),
            other => {
                if let Some(api) = &self.kube.kube_api {
                    bail!("--kube-api {api}: only with --store kubernetes");
                }
                other
            }
        })
    }

    /// What the flags leave out, from the Node on Kubernetes; elsewhere, the flags that
    /// must be given.
    fn node_facts(&self, store: &StoreAddress) -> anyhow::Result<Option<NodeFacts>> {
        let complete =
            self.location.is_some() && self.internal_ip.is_some() && self.overlay_ip.is_some();
        match store {
            StoreAddress::Kubernetes(kube) if !complete => {
                let cache = (!self.no_state_cache).then_some(self.state_cache.as_path());
                Ok(Some(discover(kube, &self.node, cache, CACHE_GRACE)?))
            }
            _ => {
                for (flag, given) in [
                    ("--location", self.location.is_some()),
                    ("--internal-ip", self.internal_ip.is_some()),
                    ("--overlay-ip", self.overlay_ip.is_some()),
                ] {
                    if !given && !matches!(store, StoreAddress::Kubernetes(_)) {
                        bail!(
                            "{flag} is required (it comes from the Node only with --store kubernetes)"
                        );
                    }
                }
                Ok(None)
            }
        }
    }

    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let store = self.store()?;
        let facts = self.node_facts(&store)?;
        let from_node =
            |what: &str| anyhow::anyhow!("{what}: not given and not read from the Node");
        let config = AgentConfig {
            node: self.node.clone(),
            location: match (&self.location, &facts) {
                (Some(l), _) => l.clone(),
                (None, Some(f)) => f.location.clone(),
                (None, None) => return Err(from_node("--location")),
            },
            internal_ip: match (self.internal_ip, &facts) {
                (Some(ip), _) => ip,
                (None, Some(f)) => f.internal_ip,
                (None, None) => return Err(from_node("--internal-ip")),
            },
            endpoint: match (&self.endpoint, facts.as_ref().and_then(|f| f.external_ip)) {
                (Some(e), _) => Some(Endpoint::parse("--endpoint", e)?),
                (None, Some(ip)) => Some(Endpoint::parse(
                    "the Node's ExternalIP",
                    &std::net::SocketAddr::new(ip, self.listen_port).to_string(),
                )?),
                (None, None) => None,
            },
            listen_port: self.listen_port,
            pod_cidrs: match &facts {
                Some(f) if self.pod_cidrs.is_empty() => f.pod_cidrs.clone(),
                _ => self.pod_cidrs.clone(),
            },
            overlay_ip: match (self.overlay_ip, &facts) {
                (Some(ip), _) => ip,
                (None, Some(f)) => f.overlay_ip,
                (None, None) => return Err(from_node("--overlay-ip")),
            },
            probe_ip: self.probe_ip.or(facts.as_ref().map(|f| f.probe_ip)),
            persistent_keepalive: self.persistent_keepalive.filter(|s| *s != 0),
            location_prefixes: self.location_prefixes.clone(),
            gateway: GatewayPolicy {
                eligible: !self.no_gateway,
                priority: self.gateway_priority,
            },
            interface: self.interface.clone(),
            wireguard: match self.wireguard.as_str() {
                "kernel" => WireGuardBackend::Kernel,
                _ => WireGuardBackend::Userspace,
            },
            userspace_offloads: self.userspace_offloads,
            key_file: self.key_file.clone(),
            state_cache: (!self.no_state_cache).then(|| self.state_cache.clone()),
            store,
            etcd: self.etcd.options(),
            election: (!self.no_leader_election).then_some(ElectionConfig {
                lease: Duration::from_millis(self.election_lease_ms),
                renew_deadline: Duration::from_millis(self.election_renew_deadline_ms),
                retry: Duration::from_millis(self.election_retry_ms),
            }),
            defaults: Settings {
                granularity: self.granularity,
                gateways_per_location: self.gateways,
                persistent_keepalive: None,
            },
            resync: Duration::from_secs(self.resync_seconds.max(1)),
            probe: {
                let defaults = ProbeConfig::default();
                ProbeConfig {
                    interval_ms: self.probe_interval_ms.max(10),
                    rounds: RoundConfig {
                        min_timeout_ms: self.probe_min_timeout_ms.max(1),
                        ..defaults.rounds
                    },
                    detector: DetectorConfig {
                        multiplier: self.probe_multiplier.max(1),
                        hold_down_ms: self.hold_down_ms,
                        ..defaults.detector
                    },
                }
            },
            admin_addr: self.metrics_addr,
            service_proxy: !self.no_service_proxy,
            network_policy: !self.no_network_policy,
            cni_node_file: self.cni_node_file.clone(),
            cni_ready_file: self.cni_ready_file.clone(),
            cni_ipam_file: Some(self.cni_ipam_file.clone()),
            cni_policy_file: Some(self.cni_policy_file.clone()),
        };
        config.validate()?;
        Ok(config)
    }
}
