//! The agent's main loop: it wires the flow together (state sync, leadership, reporting,
//! probing, admin endpoint) and runs plan → apply on every change of the plan inputs and on
//! every resync tick. It never exits because a dependency is down: the store, the device
//! and the kernel are retried with jittered backoff while the last applied state keeps
//! forwarding.

use crate::leader::ElectionConfig;
use crate::probe::ProbeConfig;
use crate::state::{ClusterState, PlanInputs};
use crate::store_addr::{EtcdOptions, StoreAddress};
use crate::{admin, apply, probe, report};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::wireguard::offload::OffloadMode;
use trellis_dataplane::wireguard::{
    WireGuardDevice, kernel::KernelDevice, keyfile, userspace::UserspaceDevice,
};
use trellis_model::{Endpoint, GatewayPolicy, InvalidField, Node, PublicKey, Validate, keys};
use trellis_plan::Settings;
use trellis_store::Store;

/// Which WireGuard implementation carries the tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireGuardBackend {
    /// The embedded userspace device on TUN (works everywhere; the lab uses it).
    Userspace,
    /// The kernel module, configured over generic netlink.
    Kernel,
}

/// Everything an agent needs, as the command line (or a test) gives it.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: String,
    pub location: String,
    /// This node's address and prefix on its location's internal network.
    pub internal_ip: IpNet,
    /// Where other locations reach this node's WireGuard port; `None` for a private node.
    pub endpoint: Option<Endpoint>,
    pub listen_port: u16,
    pub pod_cidrs: Vec<IpNet>,
    pub overlay_ip: IpAddr,
    /// The address forwarding probes are sent from and to (`None`: no part in probing).
    pub probe_ip: Option<IpAddr>,
    /// What every peer of this node sends it, in seconds (a node behind a NAT).
    pub persistent_keepalive: Option<u16>,
    /// Prefixes of this node's location's own network, routed to it from other locations.
    pub location_prefixes: Vec<IpNet>,
    pub gateway: GatewayPolicy,
    /// The WireGuard interface (unique on the machine for the userspace device).
    pub interface: String,
    pub wireguard: WireGuardBackend,
    /// Segmentation offloads of the userspace device.
    pub userspace_offloads: OffloadMode,
    /// Where the private key lives (created with mode 0600 if missing).
    pub key_file: PathBuf,
    /// Where the last known cluster state is kept (`None`: no cache).
    pub state_cache: Option<PathBuf>,
    pub store: StoreAddress,
    pub etcd: EtcdOptions,
    /// `None`: take no part in the leader election.
    pub election: Option<ElectionConfig>,
    /// Planner settings while the store holds none.
    pub defaults: Settings,
    /// Re-read and repair the kernel state at least this often.
    pub resync: Duration,
    pub probe: ProbeConfig,
    /// Where to serve metrics, readiness and state (`None`: off).
    pub admin_addr: Option<SocketAddr>,
    /// Load-balance Services on this node (nftables table `trellis-proxy`).
    pub service_proxy: bool,
    /// Enforce NetworkPolicy for this node's pods (nftables table `trellis-policy`).
    pub network_policy: bool,
    /// Where the CNI plugin finds this node's pod CIDRs and MTU (`None`: not written).
    pub cni_node_file: Option<PathBuf>,
    /// What the CNI plugin's STATUS reads: present and fresh while the data plane is
    /// programmed (`None`: not kept).
    pub cni_ready_file: Option<PathBuf>,
    /// The CNI plugin's allocation file: this node's pods for network policy (`None`:
    /// from the store only).
    pub cni_ipam_file: Option<PathBuf>,
    /// Where to tell the CNI plugin which pods' network policy is in place (`None`: not
    /// told; ADD then does not wait).
    pub cni_policy_file: Option<PathBuf>,
}

impl AgentConfig {
    /// Every check that needs no IO, so that bad input stops the agent before it touches
    /// anything (the key file included).
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.interface.is_empty() || self.interface.len() > 15 {
            return Err(InvalidField::new(
                "--interface",
                &self.interface,
                "must be 1-15 characters",
            ));
        }
        if !(1..=16).contains(&self.defaults.gateways_per_location) {
            return Err(InvalidField::new(
                "--gateways",
                self.defaults.gateways_per_location,
                "must be 1-16",
            ));
        }
        if let Some(election) = &self.election {
            election.validate()?;
        }
        // The record's own validation, with its fields named as the flags that set them.
        self.node_record(PublicKey([0; 32]))
            .validate()
            .map_err(|e| {
                let flag = match e.field.as_str() {
                    "name" => "--node",
                    "location" => "--location",
                    "listen_port" => "--listen-port",
                    "pod_cidrs" => "--pod-cidr",
                    "overlay_ip" => "--overlay-ip",
                    "probe_ip" => "--probe-ip",
                    "persistent_keepalive" => "--persistent-keepalive",
                    "location_prefixes" => "--location-prefix",
                    other => other,
                };
                InvalidField::new(flag, e.value, e.reason)
            })
    }

    /// The node record this agent publishes.
    fn node_record(&self, key: PublicKey) -> Node {
        Node {
            name: self.node.clone(),
            location: self.location.clone(),
            internal_ip: self.internal_ip,
            endpoint: self.endpoint.clone(),
            listen_port: self.listen_port,
            public_key: Some(key),
            pod_cidrs: self.pod_cidrs.clone(),
            gateway: self.gateway,
            overlay_ip: self.overlay_ip,
            probe_ip: self.probe_ip,
            persistent_keepalive: self.persistent_keepalive,
            location_prefixes: self.location_prefixes.clone(),
        }
    }
}

/// Why the agent could not start. Only bad input and a kernel that lacks what the agent
/// needs stop it; everything that can heal on its own (the store, the device) is retried.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("--wireguard kernel: {0}")]
    NoKernelWireGuard(String),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store_addr::OpenError),
    #[error(transparent)]
    Kernel(#[from] trellis_dataplane::Error),
}

/// Runs the agent until SIGTERM or SIGINT. Builds its own runtime: the caller may have
/// entered a network namespace, which every thread must share, so no thread may exist
/// before this is called.
pub fn main(config: AgentConfig) -> Result<(), StartError> {
    config.validate()?;
    if config.wireguard == WireGuardBackend::Kernel
        && let Some(why) = trellis_dataplane::wireguard::kernel::unavailable_reason()
    {
        return Err(StartError::NoKernelWireGuard(why.to_string()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    // Store clients spawn their connection tasks on the runtime.
    let store = match &config.store {
        StoreAddress::Kubernetes(kube) => runtime.block_on(kube.open())? as Arc<dyn Store>,
        other => {
            let _runtime = runtime.enter();
            other.open(&config.etcd)?
        }
    };
    let key = keyfile::load_or_generate(&config.key_file)?;
    let node = config.node_record(keyfile::public_key(&key));
    runtime.block_on(run(config, store, node, key))
}

async fn run(
    config: AgentConfig,
    store: Arc<dyn trellis_store::Store>,
    node: Node,
    key: x25519_dalek::StaticSecret,
) -> Result<(), StartError> {
    tracing::info!(node = %node.name, location = %node.location, store = %config.store, "agent starting");
    apply::prepare_kernel()?;
    let netlink = Arc::new(Netlink::connect()?);
    let device = start_device(&config, key, &netlink).await;
    let kernel = apply::Kernel {
        device: device.clone(),
        interfaces: netlink.clone(),
        routes: netlink,
        ruleset: Arc::new(trellis_dataplane::nftables::Nft::connect()?),
        service_proxy: if config.service_proxy {
            Some(Arc::new(crate::proxy::run::ProxyKernel::connect()?))
        } else {
            None
        },
        network_policy: if config.network_policy {
            Some(Arc::new(
                trellis_dataplane::nftables::Nft::connect()?
                    .with_timeout(crate::proxy::run::NFT_TIMEOUT),
            ))
        } else {
            None
        },
    };
    run_with(&config, store, node, kernel, shutdown_signal()).await;
    drop(device);
    Ok(())
}

/// The agent on a given kernel until `shutdown` resolves: the real one in [`main`], an
/// in-memory one (`trellis_dataplane::fake`) to simulate many agents in one process.
pub async fn run_with(
    config: &AgentConfig,
    store: Arc<dyn trellis_store::Store>,
    node: Node,
    kernel: apply::Kernel,
    shutdown: impl Future<Output = ()>,
) {
    let (state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let cache = config
        .state_cache
        .clone()
        .map(crate::state::cache::StateCache::new);
    tokio::spawn(crate::state::sync_forever(store.clone(), state_tx, cache));
    // A pass runs at least every resync; one that takes far longer is stuck.
    let admin = admin::Admin::new(&node.name, config.resync * 3 + Duration::from_secs(30));
    let metrics = admin.metrics.clone();
    metrics.watch_device(kernel.device.clone());
    // Leadership runs beside the data plane and nothing here waits on it: readiness,
    // plans and probes are the same whether this node leads or not.
    let (stop_campaign, campaign_stopped) = watch::channel(false);
    let campaign = config.election.map(|election| {
        let (role_tx, role_rx) = watch::channel(crate::leader::Role::Joining);
        tokio::spawn(metrics.clone().follow_role(role_rx));
        let stats = metrics.leader_work();
        let work = Arc::new(crate::leader::work::ClusterWork {
            store: store.clone(),
            state: state_rx.clone(),
            stats,
        });
        tokio::spawn(crate::leader::campaign_forever(
            store.clone(),
            node.name.clone(),
            election,
            work,
            role_tx,
            campaign_stopped,
        ))
    });
    tokio::spawn(report::register::keep_registered(
        store.clone(),
        node.clone(),
        state_rx.clone(),
    ));
    let leased = report::leased::LeasedKeys::start(store.clone());
    if let Some(addr) = config.admin_addr {
        tokio::spawn(admin::serve(addr, admin.clone()));
    }
    // The pod CIDRs given on the command line are known before the store answers: written
    // now, so pods get addresses on a cold boot with the store down.
    let mut node_file = config
        .cni_node_file
        .clone()
        .map(report::node_files::NodeFile::new);
    if let Some(file) = &mut node_file {
        file.keep(&node.pod_cidrs, apply::TUNNEL_MTU);
    }
    let ready_file = config.cni_ready_file.clone().map(|path| {
        let admin = admin.clone();
        tokio::spawn(report::node_files::keep_ready_file(path, move |now| {
            admin.readiness(now).is_ok()
        }))
    });
    if let Some(proxy_kernel) = kernel.service_proxy.clone() {
        let node_port_addresses = std::iter::once(config.internal_ip.addr())
            .chain(node.endpoint.as_ref().and_then(|e| match e.host {
                trellis_model::Host::Ip(ip) => Some(ip),
                trellis_model::Host::Dns(_) => None,
            }))
            .filter(|ip| !ip.is_loopback())
            .collect();
        let audit_interval = config.resync.max(Duration::from_secs(1));
        tokio::spawn(crate::proxy::run::run(
            store.clone(),
            proxy_kernel,
            crate::proxy::run::ProxyConfig {
                node: node.name.clone(),
                node_port_addresses,
                audit_interval,
                stale_after: audit_interval * 3 + Duration::from_secs(30),
            },
            state_rx.clone(),
            metrics.proxy(),
        ));
    }
    if kernel.network_policy.is_none()
        && let Some(path) = &config.cni_policy_file
    {
        // The CNI plugin must not wait for rules nobody writes.
        let _ = std::fs::remove_file(path);
    }
    if let Some(nft) = kernel.network_policy.clone() {
        tokio::spawn(crate::policy::run::run(
            store.clone(),
            nft,
            crate::policy::run::PolicyConfig {
                node: node.name.clone(),
                audit_interval: config.resync.max(Duration::from_secs(1)),
                cni_allocations: config.cni_ipam_file.clone(),
                publish_pods: !matches!(config.store, StoreAddress::Kubernetes(_)),
                programmed_file: config.cni_policy_file.clone(),
            },
            metrics.policy(),
        ));
    }
    let (observe_tx, observe_rx) = watch::channel(probe::Targets::default());
    match node.probe_ip {
        Some(IpAddr::V4(probe_ip)) => {
            tokio::spawn(probe::run(
                node.name.clone(),
                probe_ip,
                config.probe,
                observe_rx,
                leased.clone(),
                metrics.clone(),
            ));
        }
        Some(IpAddr::V6(_)) => {
            tracing::warn!("IPv6 probe addresses are not supported yet: not probing")
        }
        None => tracing::info!("no --probe-ip: this node neither probes nor is probed"),
    }

    let mut reconciler = apply::Reconciler::new(
        node.clone(),
        config.interface.clone(),
        kernel,
        store.clone(),
    );
    tokio::pin!(shutdown);
    let resync = config.resync.max(Duration::from_secs(1));
    let mut state_rx = state_rx;
    let mut last_inputs: Option<PlanInputs> = None;
    let mut last_health: Option<report::transition::Health> = None;
    // The store revision at which the plan inputs last changed: what the status reports.
    // Not the latest revision, which every status write by any agent bumps: reporting that
    // would make each write trigger N more.
    let mut inputs_revision = 0;
    let mut ticker = tokio::time::interval(resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let resync = tokio::select! {
            _ = &mut shutdown => break,
            changed = state_rx.changed() => {
                if changed.is_err() { break; }
                false
            }
            _ = ticker.tick() => true,
        };
        let state = state_rx.borrow_and_update().clone();
        if state.revision == 0 {
            continue; // nothing read from the store yet
        }
        let inputs = state.plan_inputs(&config.defaults);
        if let (Some(file), Some(me)) = (&mut node_file, inputs.nodes.get(&node.name)) {
            // With a CIDR the leader allocated, once the store has said which.
            file.keep(&me.pod_cidrs, apply::TUNNEL_MTU);
        }
        let inputs_changed = last_inputs.as_ref() != Some(&inputs);
        if !inputs_changed && !resync {
            continue; // someone else's status or an unrelated key changed
        }
        if inputs_changed {
            inputs_revision = state.revision;
        }
        let outcome = reconciler.reconcile(&state, &inputs, inputs_changed).await;
        match serde_json::to_vec(&outcome.status(&node.name, inputs_revision)) {
            Ok(status) => leased.set(keys::status(&node.name), status),
            Err(e) => tracing::error!("encoding status: {e}"),
        }
        metrics.routes_repaired(outcome.routes_repaired());
        if let Some(health) = outcome.health() {
            let transition = report::transition::between(last_health.as_ref(), health);
            if transition.failover {
                tracing::warn!(gateways = ?health.gateways, down = ?health.down, "failover: a gateway held down was replaced");
            }
            metrics.transition(std::time::Instant::now(), &transition);
            last_health = Some(health.clone());
        }
        admin.pass(
            std::time::Instant::now(),
            debug_state(&state, &inputs, &outcome, inputs_revision),
        );
        if let Some(plan) = outcome.plan() {
            let wanted = probe::Targets {
                gateways: plan.observe.clone(),
                paths: plan.paths.clone(),
            };
            observe_tx.send_if_modified(|current| {
                let changed = *current != wanted;
                if changed {
                    *current = wanted;
                }
                changed
            });
        }
        last_inputs = Some(inputs);
    }
    tracing::info!("shutting down: resigning leadership, releasing status lease, stopping device");
    if let Some(task) = ready_file {
        // The data plane goes with this agent (the userspace device ends with it).
        task.abort();
        if let Some(path) = &config.cni_ready_file {
            let _ = std::fs::remove_file(path);
        }
    }
    stop_campaign.send_replace(true);
    if let Some(campaign) = campaign {
        let _ = tokio::time::timeout(Duration::from_secs(3), campaign).await;
    }
    leased.stop().await;
}

/// What `/debug/state` shows of one pass.
fn debug_state(
    state: &ClusterState,
    inputs: &PlanInputs,
    outcome: &apply::Outcome,
    revision: u64,
) -> admin::DebugState {
    use crate::state::HealthInputs;
    use trellis_plan::health::{Verdict, verdicts};
    let health = match &inputs.health {
        HealthInputs::Forwarding { .. } => "forwarding",
        HealthInputs::Liveness { .. } => "liveness",
    };
    let observations = state.observations.clone();
    admin::DebugState {
        revision,
        health,
        plan: outcome.plan().cloned(),
        errors: outcome.errors().to_vec(),
        warnings: outcome.warnings().to_vec(),
        gateways: outcome
            .health()
            .map(|h| h.gateways.clone())
            .unwrap_or_default(),
        down: outcome.health().map(|h| h.down.clone()).unwrap_or_default(),
        verdicts: verdicts(inputs.nodes.values(), &observations)
            .into_iter()
            .map(|(g, v)| {
                let v = match v {
                    Verdict::Up => "up",
                    Verdict::Down => "down",
                    Verdict::Unknown => "unknown",
                };
                (g, v)
            })
            .collect(),
        observations,
        broken_paths: inputs.broken_paths(),
    }
}

/// Create the WireGuard device, retrying until it works: without it the node has no mesh,
/// but exiting would only make a supervisor restart us into the same failure.
async fn start_device(
    config: &AgentConfig,
    key: x25519_dalek::StaticSecret,
    netlink: &Netlink,
) -> Arc<dyn WireGuardDevice> {
    let (interface, port) = (config.interface.as_str(), config.listen_port);
    let what = format!("creating WireGuard device {interface}");
    crate::backoff::until_ok(
        &what,
        Duration::from_millis(200),
        Duration::from_secs(30),
        || async {
            let created: trellis_dataplane::Result<Arc<dyn WireGuardDevice>> = match config
                .wireguard
            {
                WireGuardBackend::Kernel => KernelDevice::create(netlink, interface, &key, port)
                    .await
                    .map(|d| Arc::new(d) as Arc<dyn WireGuardDevice>),
                WireGuardBackend::Userspace => {
                    UserspaceDevice::create(interface, key.clone(), port, config.userspace_offloads)
                        .await
                        .map(|d| Arc::new(d) as Arc<dyn WireGuardDevice>)
                }
            };
            created
        },
    )
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => std::future::pending::<()>().await,
    }
}
