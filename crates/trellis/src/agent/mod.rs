//! The node agent. One flow, in this order:
//!
//! store → cluster state ([`crate::cluster`]) → plan ([`trellis_plan`]) → apply
//! ([`apply`]) → verify (read back, in the reconcilers; forwarding probes in [`probe`]) →
//! report ([`leased`]).
//!
//! The agent never exits because a dependency is down: the store, the device and the
//! kernel are retried with jittered backoff while the last applied state keeps forwarding.

mod apply;
mod leased;
mod metrics;
mod probe;
mod register;
mod relay;

use crate::backoff::Backoff;
use crate::cluster::{ClusterState, PlanInputs};
use crate::store_url::StoreUrl;
use anyhow::Context;
use clap::Args;
use ipnet::IpNet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::wireguard::{
    WireGuardDevice, kernel::KernelDevice, keyfile, userspace::UserspaceDevice,
};
use trellis_model::{Endpoint, GatewayPolicy, Granularity, Node, Validate, keys};
use trellis_plan::Settings;
use trellis_plan::health::DetectorConfig;
use trellis_plan::rounds::RoundConfig;

/// Routes the agent installs carry this protocol number, so it recognises its own routes
/// and never touches anyone else's (`ip route show proto 116`).
pub const ROUTE_PROTOCOL: u8 = 116;

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (lowercase letters, digits, '-').
    #[arg(long)]
    pub node: String,
    /// The location (site, region, zone) this node belongs to.
    #[arg(long)]
    pub location: String,
    /// This node's address and prefix on its location's internal network.
    #[arg(long, value_name = "CIDR")]
    pub internal_ip: IpNet,
    /// Where other locations reach this node's WireGuard port (host:port). Omit for a
    /// private node.
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: Option<String>,
    /// WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    /// A pod CIDR of this node (repeat for several).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pub pod_cidrs: Vec<IpNet>,
    /// This node's overlay address, put on the WireGuard interface.
    #[arg(long, value_name = "IP")]
    pub overlay_ip: IpAddr,
    /// The address forwarding probes are sent from and to (omit to take no part in probing).
    #[arg(long, value_name = "IP")]
    pub probe_ip: Option<IpAddr>,
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
    /// The store: etcd://HOST:PORT[,HOST:PORT...], unix:/path/to/store.sock or lab:NAME.
    #[arg(long)]
    pub store: String,
    #[command(flatten)]
    pub etcd: crate::store_url::EtcdArgs,
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
    /// Serve Prometheus metrics on this address (HOST:PORT); off when absent.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// WireGuard implementation: userspace (embedded) or kernel.
    #[arg(long, default_value = "userspace", value_parser = ["userspace", "kernel"])]
    pub wireguard: String,
}

impl AgentArgs {
    /// The node record this agent publishes, validated before anything is touched.
    fn node_record(&self, key: trellis_model::PublicKey) -> anyhow::Result<Node> {
        let endpoint = self
            .endpoint
            .as_deref()
            .map(|e| Endpoint::parse("--endpoint", e))
            .transpose()?;
        let node = Node {
            name: self.node.clone(),
            location: self.location.clone(),
            internal_ip: self.internal_ip,
            endpoint,
            listen_port: self.listen_port,
            public_key: Some(key),
            pod_cidrs: self.pod_cidrs.clone(),
            gateway: GatewayPolicy {
                eligible: !self.no_gateway,
                priority: self.gateway_priority,
            },
            overlay_ip: self.overlay_ip,
            probe_ip: self.probe_ip,
        };
        node.validate()
            .map_err(|e| anyhow::anyhow!("invalid flag: {e}"))?;
        Ok(node)
    }

    fn default_settings(&self) -> anyhow::Result<Settings> {
        if !(1..=16).contains(&self.gateways) {
            anyhow::bail!("invalid --gateways {}: must be 1-16", self.gateways);
        }
        Ok(Settings {
            granularity: self.granularity,
            gateways_per_location: self.gateways,
            persistent_keepalive: None,
        })
    }
}

pub fn main(args: AgentArgs) -> anyhow::Result<ExitCode> {
    if args.interface.len() > 15 {
        anyhow::bail!(
            "invalid --interface {:?}: at most 15 characters",
            args.interface
        );
    }
    if args.wireguard == "kernel"
        && let Some(why) = trellis_dataplane::wireguard::kernel::unavailable_reason()
    {
        anyhow::bail!("--wireguard kernel: {why}");
    }
    let store_url = StoreUrl::parse(&args.store)?;
    let runtime = crate::runtime()?;
    // Store clients spawn their connection tasks on the runtime.
    let store = {
        let _runtime = runtime.enter();
        store_url.open(&args.etcd)?
    };
    let election = crate::leader::ElectionConfig {
        lease: Duration::from_millis(args.election_lease_ms),
        renew_deadline: Duration::from_millis(args.election_renew_deadline_ms),
        retry: Duration::from_millis(args.election_retry_ms),
    };
    election.validate()?;
    let defaults = args.default_settings()?;
    let key = keyfile::load_or_generate(&args.key_file)?;
    let node = args.node_record(keyfile::public_key(&key))?;
    runtime.block_on(run(args, store_url, store, election, defaults, node, key))?;
    Ok(ExitCode::SUCCESS)
}

async fn run(
    args: AgentArgs,
    store_url: StoreUrl,
    store: Arc<dyn trellis_store::Store>,
    election: crate::leader::ElectionConfig,
    defaults: Settings,
    node: Node,
    key: x25519_dalek::StaticSecret,
) -> anyhow::Result<()> {
    tracing::info!(node = %node.name, location = %node.location, store = %store_url, "agent starting");
    apply::prepare_kernel().context("preparing kernel settings")?;
    let netlink = Arc::new(Netlink::connect()?);
    let device = start_device(&args, key, &netlink).await;

    let (state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let cache = (!args.no_state_cache)
        .then(|| crate::state_cache::StateCache::new(args.state_cache.clone()));
    tokio::spawn(crate::cluster::sync_forever(store.clone(), state_tx, cache));
    let metrics = metrics::Metrics::default();
    // Leadership runs beside the data plane and nothing here waits on it: readiness,
    // plans and probes are the same whether this node leads or not.
    let (stop_campaign, campaign_stopped) = watch::channel(false);
    let campaign = (!args.no_leader_election).then(|| {
        let (role_tx, role_rx) = watch::channel(crate::leader::Role::Joining);
        tokio::spawn(metrics.clone().follow_role(role_rx));
        let stats = Arc::new(crate::leader::work::WorkStats::default());
        metrics.count_leader_work(stats.clone());
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
    tokio::spawn(register::keep_registered(
        store.clone(),
        node.clone(),
        state_rx.clone(),
    ));
    let leased = leased::LeasedKeys::start(store.clone());
    if let Some(addr) = args.metrics_addr {
        // A pass runs at least every resync; one that takes far longer is stuck.
        let stale_after =
            Duration::from_secs(args.resync_seconds.max(1) * 3) + Duration::from_secs(30);
        tokio::spawn(metrics::serve(
            addr,
            node.name.clone(),
            metrics.clone(),
            stale_after,
        ));
    }
    let (observe_tx, observe_rx) = watch::channel(probe::Targets::default());
    match node.probe_ip {
        Some(IpAddr::V4(probe_ip)) => {
            let config = probe::ProbeConfig {
                interval: Duration::from_millis(args.probe_interval_ms.max(10)),
                rounds: RoundConfig {
                    min_timeout_ms: args.probe_min_timeout_ms.max(1),
                    ..RoundConfig::default()
                },
                detector: DetectorConfig {
                    multiplier: args.probe_multiplier.max(1),
                    hold_down_ms: args.hold_down_ms,
                    ..DetectorConfig::default()
                },
            };
            tokio::spawn(probe::run(
                node.name.clone(),
                probe_ip,
                config,
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

    let nft = Arc::new(trellis_dataplane::nftables::Nft::connect()?);
    let mut reconciler = apply::Reconciler::new(
        node.clone(),
        args.interface.clone(),
        device.clone(),
        netlink,
        nft,
        store.clone(),
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let mut state_rx = state_rx;
    let mut last_inputs: Option<PlanInputs> = None;
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
        let inputs = state.plan_inputs(&defaults);
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
        metrics.applied(std::time::Instant::now(), inputs_revision, outcome.errors());
        if let Some(health) = outcome.health() {
            metrics.planned(std::time::Instant::now(), &health.down, &health.gateways);
        }
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
    stop_campaign.send_replace(true);
    if let Some(campaign) = campaign {
        let _ = tokio::time::timeout(Duration::from_secs(3), campaign).await;
    }
    leased.stop().await;
    drop(device);
    Ok(())
}

/// Create the WireGuard device, retrying until it works: without it the node has no mesh,
/// but exiting would only make a supervisor restart us into the same failure.
async fn start_device(
    args: &AgentArgs,
    key: x25519_dalek::StaticSecret,
    netlink: &Netlink,
) -> Arc<dyn WireGuardDevice> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let created: anyhow::Result<Arc<dyn WireGuardDevice>> = if args.wireguard == "kernel" {
            KernelDevice::create(netlink, &args.interface, &key, args.listen_port)
                .await
                .map(|d| Arc::new(d) as Arc<dyn WireGuardDevice>)
        } else {
            UserspaceDevice::create(&args.interface, key.clone(), args.listen_port)
                .await
                .map(|d| Arc::new(d) as Arc<dyn WireGuardDevice>)
        };
        match created {
            Ok(device) => return device,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(interface = %args.interface, retry_in = ?delay, "creating WireGuard device: {e:#}");
                tokio::time::sleep(delay).await;
            }
        }
    }
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
