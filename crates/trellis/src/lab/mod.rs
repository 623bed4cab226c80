//! The lab: a whole multi-site cluster of network namespaces on one machine, running the
//! production agent against an embedded store. It is the demo, the end-to-end test bed
//! and the benchmark rig.

mod bench;
mod build;
mod check;
mod demo;
pub mod fault;
mod lease_demo;
mod processes;
pub mod spec;
pub mod state;
mod status;
pub mod store;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use spec::{LabParams, LabSpec};
use state::LabState;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_dataplane::netns;
use trellis_model::{ClusterSettings, GatewayHealth, Granularity, keys};
use trellis_store::Store;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build a lab and start its agents; returns once every agent has converged.
    Up(UpArgs),
    /// Remove every namespace, link, device and process of a lab (also after a crash).
    Down(NameArg),
    /// Nodes, gateways, peers with their last handshake, pods and hosts.
    Status(StatusArgs),
    /// Ping between every pair of pods; exits non-zero if any pair fails.
    Check(CheckArgs),
    /// Run a command inside a node's (or a pod's) network namespace.
    Exec(ExecArgs),
    /// Inject a fault into a node: blackhole-forward [--new-flows-only], kill, partition,
    /// loss PERCENT, or cut-path PEER; or into the store (a lab on etcd): `store freeze`,
    /// `store kill`, `store partition NODE`, `store throttle`.
    Fault(FaultArgs),
    /// Remove every fault of a node (and restart its agent if it was killed), or of the
    /// store (`heal store`: thaw or restart etcd, end partitions and throttling).
    Heal(HealArgs),
    /// A node agent's metrics (Prometheus text), read from inside the node's namespace.
    Metrics(HealArgs),
    /// Benchmarks on labs of their own.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// External hosts on the public network (no agent), to try clients from.
    #[command(subcommand)]
    Host(HostCommand),
    /// Seed 000 on a lab: a gateway stops forwarding new flows; watch it be detected,
    /// replaced, healed and given its share back, then tear the lab down.
    Demo(DemoArgs),
    /// Serve the lab's embedded store (started by `lab up`; not for direct use).
    #[command(hide = true)]
    ServeStore(NameArg),
}

#[derive(Args, Debug, Clone)]
pub struct NameArg {
    /// The lab's name (1-6 lowercase letters or digits).
    #[arg(long, default_value = "lab")]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Number of nodes, spread evenly over the locations.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Number of locations (sites).
    #[arg(long, default_value_t = 2)]
    pub locations: usize,
    /// Mesh granularity: full, location, cross or hybrid.
    #[arg(long, default_value = "location")]
    pub granularity: Granularity,
    /// Active gateways per location (where that many are eligible).
    #[arg(long, default_value_t = 2)]
    pub gateways: usize,
    /// Nodes per location that get a public endpoint (the first ones).
    #[arg(long, default_value_t = 2)]
    pub public: usize,
    /// Pods per node.
    #[arg(long, default_value_t = 1)]
    pub pods: usize,
    /// How long to wait for every agent to converge, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// How often agents re-read and repair kernel state, in seconds.
    #[arg(long, default_value_t = 10)]
    pub agent_resync: u64,
    /// What decides that a gateway is down: forwarding (probes) or liveness (agent lease
    /// only, as Kilo does; for comparison).
    #[arg(long, default_value = "forwarding")]
    pub gateway_health: GatewayHealthArg,
    /// The store: embedded (in-process, the default) or etcd (Debian's etcd in its own
    /// namespace, reached over the location networks).
    #[arg(long, default_value = "embedded")]
    pub store: store::StoreKind,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GatewayHealthArg {
    Forwarding,
    Liveness,
}

impl From<GatewayHealthArg> for GatewayHealth {
    fn from(a: GatewayHealthArg) -> Self {
        match a {
            GatewayHealthArg::Forwarding => GatewayHealth::Forwarding,
            GatewayHealthArg::Liveness => GatewayHealth::Liveness,
        }
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The demo lab's name.
    #[arg(long, default_value = "demo")]
    pub name: String,
    /// Mesh granularity for the demo (seed 000).
    #[arg(long, default_value = "location")]
    pub granularity: Granularity,
    /// Which incident to replay: 000, a gateway that stops forwarding new flows; 001, the
    /// store (etcd) stops answering and the leader must stop without taking anything down.
    #[arg(long, default_value = "000", value_parser = ["000", "001"])]
    pub seed: String,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    /// Rounds of pings before a pair counts as failed.
    #[arg(long, default_value_t = 3)]
    pub attempts: usize,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The node (or, with --pod, the node whose pod) to run in; a host name also works.
    pub node: String,
    /// Run in this pod of the node instead (e.g. a1-p0, or just p0).
    #[arg(long)]
    pub pod: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct FaultArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The node to break, or `store`.
    pub node: String,
    /// What breaks.
    pub kind: fault::FaultKind,
    /// PERCENT for `loss`, PEER for `cut-path`.
    pub value: Option<String>,
    /// blackhole-forward: drop only new flows; established ones keep working (seed 000).
    #[arg(long)]
    pub new_flows_only: bool,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Outage of new connections when a gateway breaks, per fault kind, with forwarding
    /// probes and with liveness only (as Kilo), measured in the same run.
    Failover {
        /// Trials per fault kind and mode.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// How long to wait for recovery before a trial counts as not recovered (seconds).
        #[arg(long, default_value_t = 10)]
        window_seconds: u64,
        /// Only these fault kinds (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<fault::FaultKind>,
        /// Print JSON rows instead of a table.
        #[arg(long)]
        json: bool,
        /// Which gateway health to measure: forwarding (probes), liveness (the baseline),
        /// or both in one run (the default, and what a comparison should use).
        #[arg(long, default_value = "both", value_parser = ["both", "forwarding", "liveness"])]
        health: String,
    },
    /// Outage of new connections when the direct tunnel between two public nodes of
    /// different locations breaks (`cut-path`), with path probes and relay fallback, and
    /// with liveness only (no fallback, as Kilo), measured in the same run.
    PathFallback {
        /// Trials per mode.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// How long to wait for recovery before a trial counts as not recovered (seconds).
        #[arg(long, default_value_t = 10)]
        window_seconds: u64,
        /// Print JSON rows instead of a table.
        #[arg(long)]
        json: bool,
        /// forwarding (path probes), liveness (the baseline), or both in one run.
        #[arg(long, default_value = "both", value_parser = ["both", "forwarding", "liveness"])]
        health: String,
    },
    /// Seed 001 on a lab on etcd: takeover after the leader's node is killed, time for a
    /// leader to stop acting after the store freezes, agent restarts and lost connections
    /// during store faults; `etcdctl elect` measured beside it as the peer.
    Leadership {
        /// Repetitions of the takeover and of the stop-acting measurements.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Store faults (freeze, kill, partition of the leader, throttle, in turn).
        #[arg(long, default_value_t = 10)]
        faults: usize,
        /// How long each store fault is held (seconds).
        #[arg(long, default_value_t = 12)]
        hold_seconds: u64,
        /// Skip the etcdctl elect peer (it takes about two of its 60 s session TTLs).
        #[arg(long)]
        no_peer: bool,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Random loss on every link for a while; counts gateway changes (the target is none).
    FalseFailover {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Loss on every link of every node, in percent.
        #[arg(long, default_value_t = 5)]
        loss: u8,
    },
}

#[derive(Args, Debug)]
pub struct HealArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The node to heal.
    pub node: String,
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Add a bare host (no agent) on the lab's public network.
    Add {
        host: String,
        #[command(flatten)]
        name: NameArg,
    },
}

pub fn main(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        // exec replaces this process: it must enter the namespace while single-threaded.
        LabCommand::Exec(args) => exec(args),
        other => crate::runtime()?.block_on(run(other)),
    }
}

async fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Up(args) => up_inner(args).await,
        LabCommand::Down(args) => {
            let report = build::teardown(&args.name)?;
            println!(
                "lab {} removed: {} namespaces, {} processes",
                args.name, report.namespaces, report.processes
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status(args) => status::show(&args.name.name, args.json).await,
        LabCommand::Check(args) => {
            let lab = LabState::load(&args.name.name)?;
            let report = check::all_pairs(&lab.spec, args.attempts, Duration::from_secs(1)).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", check::matrix(&report));
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Host(HostCommand::Add { host, name }) => {
            let mut lab = LabState::load(&name.name)?;
            let spec = lab.spec.new_host(&host)?;
            build::create_host(&lab.spec, &spec)
                .await
                .with_context(|| format!("creating host {host}"))?;
            println!(
                "host {} at {} (namespace {})",
                spec.name, spec.ip, spec.netns
            );
            lab.spec.hosts.push(spec);
            lab.save()?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Fault(args) if args.node == "store" => {
            let f = store::StoreFault::parse(args.kind, args.value.as_deref())?;
            store::inject(&args.name.name, f.clone()).await?;
            println!("{f}");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Heal(args) if args.node == "store" => {
            let healed = store::heal(&args.name.name).await?;
            let list: Vec<String> = healed.iter().map(ToString::to_string).collect();
            println!(
                "store: healed {}",
                if list.is_empty() {
                    "(no faults)".into()
                } else {
                    list.join(", ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Fault(args) => {
            let f = fault::Fault::parse(args.kind, args.new_flows_only, args.value.as_deref())?;
            fault::inject(&args.name.name, &args.node, f.clone()).await?;
            println!("{}: {f}", args.node);
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Heal(args) => {
            let healed = fault::heal(&args.name.name, &args.node).await?;
            let list: Vec<String> = healed.iter().map(ToString::to_string).collect();
            println!(
                "{}: healed {}",
                args.node,
                if list.is_empty() {
                    "(no faults)".into()
                } else {
                    list.join(", ")
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Bench(BenchCommand::Failover {
            trials,
            window_seconds,
            kinds,
            json,
            health,
        }) => {
            let kinds = bench::default_kinds()
                .into_iter()
                .filter(|f| kinds.is_empty() || kinds.contains(&f.kind))
                .collect();
            failover_bench(
                bench::Target::Gateways(kinds),
                trials,
                window_seconds,
                &health,
                json,
            )
            .await
        }
        LabCommand::Bench(BenchCommand::PathFallback {
            trials,
            window_seconds,
            json,
            health,
        }) => {
            failover_bench(
                bench::Target::DirectPath,
                trials,
                window_seconds,
                &health,
                json,
            )
            .await
        }
        LabCommand::Bench(BenchCommand::Leadership {
            reps,
            faults,
            hold_seconds,
            no_peer,
            json,
        }) => {
            let args = bench::LeadershipArgs {
                reps: reps.max(1),
                faults,
                hold: Duration::from_secs(hold_seconds.max(1)),
                peer: !no_peer,
            };
            let report = bench::leadership(&args).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::leadership_table(&report));
            }
            let clean = report.agent_restarts == 0 && report.connections_lost == 0;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Bench(BenchCommand::FalseFailover { minutes, loss }) => {
            let minutes = if minutes.is_finite() && minutes > 0.0 {
                minutes
            } else {
                bail!("invalid --minutes {minutes}")
            };
            let report =
                bench::false_failover(Duration::from_secs_f64(minutes * 60.0), loss).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.gateway_changes == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Metrics(args) => {
            let lab = LabState::load(&args.name.name)?;
            print!("{}", metrics_of(&lab, &args.node)?);
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::ServeStore(args) => serve_store(&args.name).await,
        LabCommand::Demo(args) => demo::run(args).await,
        LabCommand::Exec(_) => unreachable!("handled before the runtime starts"),
    }
}

/// `lab bench failover` and `lab bench path-fallback`: the same trials, on a different target.
async fn failover_bench(
    target: bench::Target,
    trials: usize,
    window_seconds: u64,
    health: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let args = bench::FailoverArgs {
        trials: trials.max(1),
        window: Duration::from_secs(window_seconds.max(1)),
        target,
        forwarding: health != "liveness",
        baseline: health != "forwarding",
    };
    let rows = bench::failover(&args).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", bench::table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

async fn up_inner(args: UpArgs) -> anyhow::Result<ExitCode> {
    let params = LabParams {
        name: args.name.name.clone(),
        nodes: args.nodes,
        locations: args.locations,
        granularity: args.granularity,
        gateways: args.gateways,
        public_per_location: args.public,
        pods_per_node: args.pods,
        agent_resync: args.agent_resync,
        gateway_health: args.gateway_health.into(),
        store: args.store,
    };
    let spec = params.spec()?;
    let name = spec.name.clone();
    if args.store == store::StoreKind::Etcd && which("etcd").is_none() {
        bail!("--store etcd needs etcd on PATH (apt-get install etcd-server)");
    }
    if state::dir(&name).join("lab.json").exists() || netns::exists(&spec::fabric_netns(&name)) {
        bail!(
            "lab {name:?} already exists: `trellis lab down --name {name}` first, or pick another --name"
        );
    }
    let started = Instant::now();
    let brought_up = tokio::select! {
        r = bring_up(&spec, Duration::from_secs(args.timeout)) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match brought_up {
        Ok(()) => {
            println!(
                "lab {name} is up: {} nodes in {} locations, granularity {}, converged in {:.1} s",
                spec.nodes.len(),
                spec.locations.len(),
                spec.granularity,
                started.elapsed().as_secs_f64()
            );
            status::show(&name, false).await?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("lab {name} failed to come up: {e:#}");
            eprintln!("agent logs: {}", state::dir(&name).join("logs").display());
            if std::env::var_os("TRELLIS_LAB_KEEP_FAILED").is_none() {
                let logs = collect_logs(&name);
                let _ = build::teardown(&name);
                eprintln!("{logs}");
                eprintln!("lab removed (set TRELLIS_LAB_KEEP_FAILED=1 to keep it for inspection)");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The README's main command: a lab comes up, proves all-pairs connectivity, and goes.
fn collect_logs(lab: &str) -> String {
    let dir = state::dir(lab).join("logs");
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.filter_map(Result::ok) {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            out.push_str(&format!(
                "--- {} (last lines)\n",
                e.file_name().to_string_lossy()
            ));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

async fn bring_up(spec: &LabSpec, timeout: Duration) -> anyhow::Result<()> {
    let mut lab = LabState {
        spec: spec.clone(),
        store_pid: None,
        agent_pids: Default::default(),
        faults: Default::default(),
        store_faults: Vec::new(),
    };
    // The state file goes first so that `lab down` knows the lab even if this crashes.
    lab.save()?;
    build::create_fabric(spec)
        .await
        .context("creating the fabric")?;
    for node in &spec.nodes {
        build::create_node(spec, node)
            .await
            .with_context(|| format!("creating node {}", node.name))?;
    }
    let store_pid = store::start(spec).await.context("starting the store")?;
    lab.store_pid = Some(store_pid);
    lab.save()?;
    let store = open_store(&spec.name)?;
    wait_for_store(store.as_ref(), Duration::from_secs(20)).await?;
    let settings = ClusterSettings {
        granularity: spec.granularity,
        gateways_per_location: spec.gateways,
        persistent_keepalive: None,
        gateway_health: spec.gateway_health,
        // Nodes that join without --pod-cidr get one from the leader, beside the lab's own.
        pod_cidr_pool: Some(trellis_model::PodCidrPool {
            cidr: "10.244.0.0/16".parse()?,
            node_prefix: 24,
        }),
        gc_after_seconds: trellis_model::DEFAULT_GC_AFTER_SECONDS,
    };
    store
        .put(keys::SETTINGS, serde_json::to_vec(&settings)?)
        .await?;
    for node in &spec.nodes {
        let pid = processes::spawn_in(
            &node.netns,
            &processes::agent_args(spec, node),
            &state::log_path(&spec.name, &node.name),
        )?;
        lab.agent_pids.insert(node.name.clone(), pid);
    }
    lab.save()?;
    wait_converged(store.as_ref(), spec, timeout).await
}

pub fn open_store(lab: &str) -> anyhow::Result<Arc<dyn Store>> {
    store::open(lab)
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

async fn wait_for_store(store: &dyn Store, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match store.get(keys::SETTINGS).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("the lab store did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Converged: every node is registered, and every agent reports a fully applied plan with
/// as many peers and routes as the plan computed here from the same state.
async fn wait_converged(
    store: &dyn Store,
    spec: &LabSpec,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match converged(store, spec).await {
            Ok(None) => return Ok(()),
            Ok(Some(waiting)) => last = waiting,
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("agents did not converge within {timeout:?}: {last}")
}

/// `None` when converged, else what is still missing.
pub async fn converged(store: &dyn Store, spec: &LabSpec) -> anyhow::Result<Option<String>> {
    let state = crate::cluster::load(store).await?;
    let topology = state
        .plan_inputs(&trellis_plan::Settings::default())
        .topology();
    if topology.nodes.len() < spec.nodes.len() {
        return Ok(Some(format!(
            "{} of {} nodes registered",
            topology.nodes.len(),
            spec.nodes.len()
        )));
    }
    for node in &spec.nodes {
        let plan = topology.plan_for(&node.name)?;
        match state.status.get(&node.name) {
            None => return Ok(Some(format!("no status from {}", node.name))),
            Some(s) if !s.applied => {
                return Ok(Some(format!(
                    "{}: {}",
                    node.name,
                    s.error.as_deref().unwrap_or("not applied")
                )));
            }
            Some(s)
                if s.nodes != spec.nodes.len()
                    || s.peers != plan.peers.len()
                    || s.routes != plan.routes.len() =>
            {
                return Ok(Some(format!(
                    "{} has not applied the latest plan",
                    node.name
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

async fn serve_store(lab: &str) -> anyhow::Result<ExitCode> {
    let store = trellis_store::embedded::EmbeddedStore::new();
    let path = state::store_socket(lab);
    let server = trellis_store::remote::serve(store, &path)
        .await
        .with_context(|| format!("serving the store on {}", path.display()))?;
    tracing::info!(socket = %path.display(), "lab store serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = server => {}
    }
    let _ = std::fs::remove_file(&path);
    Ok(ExitCode::SUCCESS)
}

/// A node agent's metrics page, fetched on the loopback of the node's own namespace.
pub fn metrics_of(lab: &LabState, node: &str) -> anyhow::Result<String> {
    match agent_page(lab, node, "/metrics")? {
        (200, body) => Ok(body),
        (status, body) => bail!("{node}'s agent answered /metrics with {status}: {body:.200}"),
    }
}

/// A node agent's readiness: `Ok(true)` when `/readyz` answers 200, `Ok(false)` on 503.
pub fn ready_of(lab: &LabState, node: &str) -> anyhow::Result<bool> {
    match agent_page(lab, node, "/readyz")? {
        (200, _) => Ok(true),
        (503, _) => Ok(false),
        (status, body) => bail!("{node}'s agent answered /readyz with {status}: {body:.200}"),
    }
}

/// One page of a node agent's HTTP endpoint: status code and body.
fn agent_page(lab: &LabState, node: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let netns = lab.spec.node(node)?.netns.clone();
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let fetched = netns::run_in(&netns, move || -> std::io::Result<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], processes::METRICS_PORT));
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        // A SIGSTOPped agent's kernel still accepts: only the read tells it is silent.
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })?
    .with_context(|| format!("reading {path} of {node}'s agent"))?;
    let status = fetched
        .strip_prefix("HTTP/1.0 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match (status, fetched.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Ok((status, body.to_string())),
        _ => bail!("unexpected answer from {node}'s agent for {path}: {fetched:.200}"),
    }
}

fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let lab = LabState::load(&args.name.name)?;
    let netns_name = match (
        &args.pod,
        lab.spec.hosts.iter().find(|h| h.name == args.node),
    ) {
        (None, Some(host)) => host.netns.clone(),
        (None, None) => lab.spec.node(&args.node)?.netns.clone(),
        (Some(pod), _) => {
            let node = lab.spec.node(&args.node)?;
            let full = if pod.starts_with(&format!("{}-", node.name)) {
                pod.clone()
            } else {
                format!("{}-{pod}", node.name)
            };
            match node.pods.iter().find(|p| p.name == full) {
                Some(p) => p.netns.clone(),
                None => bail!("node {} has no pod {pod:?}", node.name),
            }
        }
    };
    netns::enter(&netns_name)?;
    let err = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .exec();
    bail!("running {:?} in {netns_name}: {err}", args.command[0])
}
