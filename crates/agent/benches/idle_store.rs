//! Store writes of a whole cluster of agents, simulated in one process: N real agent loops
//! (`trellis_agent::run::run_with`: state sync, planning, apply, status under a lease,
//! registration, leader election) against one embedded store, each on an in-memory kernel
//! (`trellis_dataplane::fake`). Measures, per cluster size:
//!
//! - how long the cluster takes to settle from a cold start, and the writes that took;
//! - store writes per second once idle (the goal: none);
//! - the writes one change causes (an external peer joins), and how long until every
//!   agent has applied it.
//!
//! Not simulated: forwarding probes (they need ICMP sockets; an idle prober publishes only
//! when an opinion changes). Run: `cargo bench -p trellis-agent --bench idle_store`
//! (`-- --nodes 100` for one size, `--idle-seconds 30` for the idle window).

use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_agent::apply::Kernel;
use trellis_agent::leader::ElectionConfig;
use trellis_agent::probe::ProbeConfig;
use trellis_agent::store_addr::{EtcdOptions, StoreAddress};
use trellis_agent::{AgentConfig, WireGuardBackend};
use trellis_dataplane::fake::{FakeInterfaces, FakeRoutes, FakeRuleset, FakeWireGuard};
use trellis_model::{Endpoint, GatewayPolicy, Node, PublicKey, keys};
use trellis_plan::Settings;
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;

struct Args {
    sizes: Vec<usize>,
    idle: Duration,
}

fn args() -> Args {
    let mut sizes = vec![100, 1000];
    let mut idle = Duration::from_secs(30);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => sizes = vec![it.next().and_then(|n| n.parse().ok()).expect("--nodes N")],
            "--idle-seconds" => {
                idle = Duration::from_secs(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--idle-seconds S"),
                )
            }
            _ => {} // cargo bench passes --bench
        }
    }
    Args { sizes, idle }
}

/// N nodes in N/10 locations; the first three of each location are public.
fn node(i: usize) -> Node {
    let (loc, j) = (i / 10, i % 10);
    let b = |x: usize| (x % 250) as u8;
    Node {
        name: format!("n{i}"),
        location: format!("loc{loc}"),
        internal_ip: format!("172.{}.{}.{}/24", 16 + loc / 250, b(loc), 10 + j)
            .parse()
            .unwrap(),
        endpoint: (j < 3).then(|| {
            Endpoint::parse("endpoint", &format!("198.18.{}.{}:51820", i / 250, b(i))).unwrap()
        }),
        listen_port: 51820,
        public_key: Some(PublicKey({
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            k
        })),
        pod_cidrs: vec![
            format!("10.{}.{}.0/24", 64 + i / 250, b(i))
                .parse()
                .unwrap(),
        ],
        gateway: GatewayPolicy {
            eligible: true,
            priority: 0,
        },
        overlay_ip: format!("100.64.{}.{}", i / 250, b(i) + 1).parse().unwrap(),
        probe_ip: None,
        persistent_keepalive: None,
        location_prefixes: Vec::new(),
    }
}

fn config(n: &Node) -> AgentConfig {
    AgentConfig {
        node: n.name.clone(),
        location: n.location.clone(),
        internal_ip: n.internal_ip,
        endpoint: n.endpoint.clone(),
        listen_port: n.listen_port,
        pod_cidrs: n.pod_cidrs.clone(),
        overlay_ip: n.overlay_ip,
        probe_ip: None,
        gateway: n.gateway,
        interface: "wg0".into(),
        wireguard: WireGuardBackend::Userspace,
        userspace_offloads: Default::default(),
        key_file: "/nonexistent".into(),
        state_cache: None,
        store: StoreAddress::Unix("/nonexistent".into()),
        etcd: EtcdOptions::default(),
        election: Some(ElectionConfig::default()),
        defaults: Settings::default(),
        resync: Duration::from_secs(10),
        probe: ProbeConfig::default(),
        admin_addr: None,
        service_proxy: false,
        network_policy: false,
        cni_node_file: None,
        cni_ready_file: None,
        cni_ipam_file: None,
        cni_policy_file: None,
        persistent_keepalive: None,
        location_prefixes: Vec::new(),
    }
}

fn kernel() -> Kernel {
    Kernel {
        device: Arc::new(FakeWireGuard::new("wg0")),
        interfaces: Arc::new(FakeInterfaces::default()),
        routes: Arc::new(FakeRoutes::new(trellis_agent::apply::ROUTE_PROTOCOL)),
        ruleset: Arc::new(FakeRuleset::default()),
        service_proxy: None,
        network_policy: None,
    }
}

async fn revision(store: &dyn Store) -> u64 {
    store.list("settings").await.map(|(_, r)| r).unwrap_or(0)
}

/// Waits until every agent has applied a plan at or after `since` and the store has been
/// quiet for `quiet`; returns when it settled.
async fn settle(store: &dyn Store, nodes: usize, since: u64, quiet: Duration) -> Instant {
    let mut last = revision(store).await;
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = revision(store).await;
        if now != last {
            last = now;
            last_change = Instant::now();
            continue;
        }
        let (statuses, _) = store.list(trellis_model::keys::STATUS).await.unwrap();
        let applied = statuses
            .iter()
            .filter_map(|kv| serde_json::from_slice::<trellis_model::AgentStatus>(&kv.value).ok())
            .filter(|s| s.applied && s.revision >= since && s.nodes == nodes)
            .count();
        if applied == nodes && last_change.elapsed() >= quiet {
            return last_change;
        }
        if std::env::var_os("IDLE_DEBUG").is_some() {
            let odd: Vec<(String, u64, bool)> = statuses
                .iter()
                .filter_map(|kv| {
                    serde_json::from_slice::<trellis_model::AgentStatus>(&kv.value).ok()
                })
                .map(|s| (s.node, s.revision, s.applied))
                .collect();
            eprintln!(
                "since {since}: revision {now}, {applied}/{nodes} applied ({} statuses), quiet for {:?}: {odd:?}",
                statuses.len(),
                last_change.elapsed()
            );
        }
    }
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| agents | locations | cold start: settled in (s) | writes to settle | idle writes/s ({} s) | a peer joins: writes | every agent applied it in (ms) |",
        args.idle.as_secs()
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        runtime.block_on(async {
            let store: Arc<dyn Store> = EmbeddedStore::with_history(1 << 20);
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let started = Instant::now();
            let nodes: Vec<Node> = (0..n).map(node).collect();
            let mut tasks = Vec::new();
            for node in &nodes {
                let (store, node) = (store.clone(), node.clone());
                let mut stopped = stopped.clone();
                tasks.push(tokio::spawn(async move {
                    let config = config(&node);
                    let shutdown = async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    };
                    trellis_agent::run::run_with(&config, store, node, kernel(), shutdown).await;
                }));
            }
            let settled_at = settle(store.as_ref(), n, 0, Duration::from_secs(3)).await;
            let settled_rev = revision(store.as_ref()).await;
            let settle_s = settled_at.duration_since(started).as_secs_f64();

            let idle_from = revision(store.as_ref()).await;
            tokio::time::sleep(args.idle).await;
            let idle_writes = revision(store.as_ref()).await - idle_from;

            // one change every agent must act on: an external peer joins
            let peer = trellis_model::ExternalPeer {
                name: "laptop".into(),
                public_key: PublicKey([0xfe; 32]),
                allowed_ips: vec!["10.5.0.1/32".parse().unwrap()],
                endpoint: None,
                persistent_keepalive: None,
            };
            let before = revision(store.as_ref()).await;
            let changed_at = Instant::now();
            let changed_rev = store
                .put(&keys::peer(&peer.name), serde_json::to_vec(&peer).unwrap())
                .await
                .unwrap();
            let settled = settle(store.as_ref(), n, changed_rev, Duration::from_secs(2)).await;
            let change_writes = revision(store.as_ref()).await - before;
            println!(
                "| {n} | {} | {settle_s:.1} | {settled_rev} | {:.2} | {change_writes} | {:.0} |",
                n.div_ceil(10),
                idle_writes as f64 / args.idle.as_secs_f64(),
                settled.duration_since(changed_at).as_secs_f64() * 1000.0,
            );
            stop.send_replace(true);
            for t in tasks {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
        });
    }
}
