//! The lab's store: the embedded one (a `lab serve-store` process in the fabric namespace,
//! reached over a Unix socket), or a real etcd, or a Kubernetes API server (the double:
//! [`crate::kube_api`]) in a namespace of its own, reached by the agents over the lab's
//! location networks as it would be on real hosts.
//!
//! The etcd namespace has one leg on each location's bridge (172.20.L.250) and forwards
//! nothing, so it joins no networks together. Store faults are made where the store meets
//! the fabric: SIGSTOP/SIGKILL of the etcd process, and a bridge table on its ports that
//! drops a node's traffic (partition) or most of everyone's (throttle).

use crate::spec::{self, LabSpec};
use crate::state::{self, LabState};
use crate::{build, processes};
use anyhow::{Context, bail};

use std::sync::Arc;
use std::time::Duration;
use trellis_dataplane::netns;
use trellis_store::Store;
use trellis_store::etcd::{EtcdConfig, EtcdStore};

pub use crate::incident::StoreFault;
use crate::incident::THROTTLE_PERCENT;
pub use crate::spec::{ETCD_CLIENT_PORT, StoreKind, etcd_ip};
const ETCD_PEER_PORT: u16 = 2380;
/// Key prefix of the lab's cluster in its etcd.
pub const ETCD_PREFIX: &str = "/trellis/";
const STORE_FAULT_TABLE: &str = "trellis_store_links";

pub fn netns_of(spec: &LabSpec) -> String {
    match spec.store {
        StoreKind::Embedded => spec::fabric_netns(&spec.name),
        StoreKind::Etcd | StoreKind::Kubernetes => format!("tl-{}-store", spec.name),
    }
}

/// Creates the store's namespace (etcd only) and starts the store; returns its pid.
pub async fn start(spec: &LabSpec) -> anyhow::Result<i32> {
    match spec.store {
        StoreKind::Embedded => processes::spawn_in(
            &spec::fabric_netns(&spec.name),
            &[
                "lab".into(),
                "serve-store".into(),
                format!("--name={}", spec.name),
            ],
            &state::log_path(&spec.name, "store"),
        ),
        StoreKind::Etcd => {
            create_store_netns(spec).await?;
            spawn_etcd(spec)
        }
        StoreKind::Kubernetes => {
            create_store_netns(spec).await?;
            spawn_kube_api(spec)
        }
    }
}

fn spawn_kube_api(spec: &LabSpec) -> anyhow::Result<i32> {
    processes::spawn_in(
        &netns_of(spec),
        &[
            "lab".into(),
            "serve-kube".into(),
            format!("--name={}", spec.name),
        ],
        &state::log_path(&spec.name, "kube-api"),
    )
}

async fn create_store_netns(spec: &LabSpec) -> anyhow::Result<()> {
    let ns = netns_of(spec);
    netns::create(&ns)?;
    let nl = trellis_dataplane::netlink::Netlink::connect_in(&ns)?;
    let fabric = trellis_dataplane::netlink::Netlink::connect_in(&spec::fabric_netns(&spec.name))?;
    nl.set_up("lo").await?;
    for (i, location) in spec.locations.iter().enumerate() {
        let address = ipnet::IpNet::new(etcd_ip(i).into(), location.subnet.prefix_len())?;
        build::attach_to_fabric(
            spec,
            &nl,
            &fabric,
            &format!("loc{i}"),
            &store_port(i),
            &location.bridge,
            address,
        )
        .await
        .with_context(|| format!("the store's leg on {}", location.name))?;
    }
    Ok(())
}

/// The fabric-side name of the store's leg on location `index`.
fn store_port(index: usize) -> String {
    format!("st-{index}")
}

fn spawn_etcd(spec: &LabSpec) -> anyhow::Result<i32> {
    let data = state::dir(&spec.name).join("etcd");
    let advertise: Vec<String> = (0..spec.locations.len())
        .map(|i| format!("http://{}:{ETCD_CLIENT_PORT}", etcd_ip(i)))
        .collect();
    let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
    let args = vec![
        format!("--name={}", spec.name),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}"),
        format!("--advertise-client-urls={}", advertise.join(",")),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster={}={peer}", spec.name),
    ];
    processes::spawn_program_in(
        &netns_of(spec),
        std::path::Path::new("etcd"),
        &args,
        &state::log_path(&spec.name, "etcd"),
    )
    .context("starting etcd (apt-get install etcd-server)")
}

/// A client of the lab's store for tools running in the host's namespace. For etcd the
/// connection is opened from inside the store's namespace, on its loopback: the host's
/// namespace is never connected to the lab.
pub fn open(lab: &str) -> anyhow::Result<Arc<dyn Store>> {
    let kind = LabState::load(lab)
        .map(|s| s.spec.store)
        .unwrap_or_default();
    Ok(match kind {
        StoreKind::Embedded => EtcdStore::new(EtcdConfig {
            endpoints: vec![format!("unix://{}", state::store_socket(lab).display())],
            prefix: ETCD_PREFIX.into(),
            tls: None,
            credentials: None,
            call_timeout: trellis_agent::store_addr::CALL_TIMEOUT,
            dialer: None,
        })?,
        StoreKind::Etcd => {
            let ns = format!("tl-{lab}-store");
            let dialer: trellis_store::etcd::Dialer = Arc::new(move |addr| {
                netns::run_in(&ns, move || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                })
                .map_err(std::io::Error::other)?
            });
            EtcdStore::new(EtcdConfig {
                endpoints: vec![format!("http://127.0.0.1:{ETCD_CLIENT_PORT}")],
                prefix: ETCD_PREFIX.into(),
                tls: None,
                credentials: None,
                call_timeout: trellis_agent::store_addr::CALL_TIMEOUT,
                dialer: Some(dialer),
            })?
        }
        StoreKind::Kubernetes => crate::kube_api::open(lab)?,
    })
}

pub async fn inject(lab: &str, fault: StoreFault) -> anyhow::Result<()> {
    let mut state = LabState::load(lab)?;
    if state.spec.store == StoreKind::Kubernetes && fault == StoreFault::Kill {
        bail!(
            "the lab's Kubernetes API keeps its objects in its process: it can be frozen, partitioned or throttled, not killed"
        );
    }
    if state.spec.store == StoreKind::Embedded && fault != StoreFault::Freeze {
        // Its data lives in its process, and it has no network port to cut.
        bail!(
            "store {fault} needs a lab on etcd (`trellis lab up --store etcd`); the embedded store can only be frozen"
        );
    }
    let pid = state.store_pid.filter(|p| processes::is_alive(*p));
    match &fault {
        StoreFault::Freeze | StoreFault::Kill => {
            let Some(pid) = pid else {
                bail!("the store of lab {lab} is not running");
            };
            if fault == StoreFault::Freeze {
                processes::signal(pid, nix::sys::signal::Signal::SIGSTOP);
            } else {
                processes::kill_and_reap(pid);
            }
        }
        StoreFault::Partition(node) => {
            state.spec.node(node)?;
        }
        StoreFault::Throttle => {}
    }
    state.store_faults.push(fault);
    program_links(&state).await?;
    state.save()
}

/// Undoes every store fault: thaws or restarts etcd, removes partitions and throttling.
pub async fn heal(lab: &str) -> anyhow::Result<Vec<StoreFault>> {
    let mut state = LabState::load(lab)?;
    match state.store_pid.filter(|p| processes::is_alive(*p)) {
        Some(pid) => {
            processes::signal(pid, nix::sys::signal::Signal::SIGCONT);
        }
        None if state.spec.store == StoreKind::Etcd => {
            state.store_pid = Some(spawn_etcd(&state.spec)?)
        }
        None => bail!(
            "the embedded store of lab {lab} is gone, and its data with it: `trellis lab down` and up again"
        ),
    }
    if state.spec.store == StoreKind::Embedded {
        let healed = std::mem::take(&mut state.store_faults);
        state.save()?;
        return Ok(healed);
    }
    let healed = std::mem::take(&mut state.store_faults);
    program_links(&state).await?;
    state.save()?;
    Ok(healed)
}

/// The partition and throttle faults as one bridge table on the store's ports.
async fn program_links(state: &LabState) -> anyhow::Result<()> {
    use trellis_dataplane::nftables::{
        BaseChain, Batch, ChainKind, Family, Hook, Nft, Policy, dsl,
    };
    let fabric = spec::fabric_netns(&state.spec.name);
    let faults = state.store_faults.clone();
    let ports: Vec<String> = (0..state.spec.locations.len()).map(store_port).collect();
    tokio::task::spawn_blocking(move || {
        let nft = Nft::connect_in(&fabric)?;
        let mut b = Batch::new();
        if nft.table_exists(Family::Bridge, STORE_FAULT_TABLE)? {
            b.delete_table(Family::Bridge, STORE_FAULT_TABLE);
        }
        let mut rules: Vec<(Vec<_>, String)> = Vec::new();
        let existed = nft.table_exists(Family::Bridge, STORE_FAULT_TABLE)?;
        for fault in &faults {
            for port in &ports {
                match fault {
                    StoreFault::Partition(node) => {
                        let node_port = format!("i-{node}");
                        rules.push((
                            [dsl::iifname(&node_port), dsl::oifname(port)].concat(),
                            fault.to_string(),
                        ));
                        rules.push((
                            [dsl::iifname(port), dsl::oifname(&node_port)].concat(),
                            fault.to_string(),
                        ));
                    }
                    StoreFault::Throttle => {
                        for side in [dsl::iifname(port), dsl::oifname(port)] {
                            rules.push((
                                [side, dsl::numgen_random_below(100, THROTTLE_PERCENT)].concat(),
                                fault.to_string(),
                            ));
                        }
                    }
                    StoreFault::Freeze | StoreFault::Kill => {}
                }
            }
        }
        if !existed && rules.is_empty() {
            return Ok(()); // nothing to add or remove
        }
        if !rules.is_empty() {
            b.add_table(Family::Bridge, STORE_FAULT_TABLE);
            let base = BaseChain {
                hook: Hook::Forward,
                priority: 0,
                kind: ChainKind::Filter,
                policy: Policy::Accept,
            };
            b.add_chain(Family::Bridge, STORE_FAULT_TABLE, "forward", Some(base));
            for (matches, comment) in rules {
                let exprs = [matches, dsl::counter(), dsl::drop()].concat();
                b.add_rule(
                    Family::Bridge,
                    STORE_FAULT_TABLE,
                    "forward",
                    exprs,
                    Some(&comment),
                );
            }
        }
        nft.apply(&b)
    })
    .await?
    .map_err(anyhow::Error::from)
}

/// `lab serve-store`: serves a new embedded store on the lab's socket, over the etcd v3
/// API, until SIGTERM. Agents in every namespace reach it through the socket's path.
pub async fn serve(lab: &str) -> anyhow::Result<()> {
    let store = trellis_store::embedded::EmbeddedStore::new();
    let path = state::store_socket(lab);
    let mut server = trellis_store::etcd::server::serve_unix(store, &path)
        .await
        .with_context(|| format!("serving the store on {}", path.display()))?;
    tracing::info!(socket = %path.display(), "lab store serving the etcd v3 API");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        stopped = server.stopped() => stopped.context("the store server failed")?,
    }
    server.shutdown().await?;
    Ok(())
}
