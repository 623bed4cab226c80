//! `trellis lab …`: the lab's command line, handed to the `trellis-lab` library.

use anyhow::bail;
use clap::{Args, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use trellis_lab::fault::{self, FaultKind};
use trellis_lab::guard::{self, Ended};
use trellis_lab::pods::{self, L4};
use trellis_lab::service::{self, Families, Policy, Type};
use trellis_lab::spec::LabParams;
use trellis_lab::state::LabState;
use trellis_lab::store::{self, StoreKind};
use trellis_lab::{bench, build, check, demo, status};
use trellis_model::{GatewayHealth, Granularity};

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build a lab and start its agents; returns once every agent has converged. Interrupted
    /// (Ctrl-C, SIGTERM, SIGHUP) before that, it removes what it built and exits with 130,
    /// 143 or 129; a lab that came up stays.
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
    /// loss PERCENT, cut-path PEER, or proxy-tamper (its service proxy rules changed from
    /// outside); or into the store (a lab on etcd): `store freeze`, `store kill`,
    /// `store partition NODE`, `store throttle`.
    Fault(FaultArgs),
    /// Remove every fault of a node (and restart its agent if it was killed), or of the
    /// store (`heal store`: thaw or restart etcd, end partitions and throttling). After
    /// proxy-tamper there is nothing to undo: it waits for the node's proxy to repair its
    /// rules and says so.
    Heal(HealArgs),
    /// Services whose backends are lab pods (in namespace `default`), written to the lab's
    /// store with their EndpointSlices; every agent's proxy programs them.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Exchanges with a TCP or UDP echo server from a pod, node or host, each on a new
    /// socket; prints which pod answered how often, and the failures by kind (refused,
    /// timeout, ...); exits non-zero if any failed. Every pod answers echo on ports 9376
    /// and 9377 with its name.
    Connect(ConnectArgs),
    /// A node agent's metrics (Prometheus text), read from inside the node's namespace.
    Metrics(HealArgs),
    /// Benchmarks on labs of their own, removed when the bench ends, also when interrupted
    /// by Ctrl-C, SIGTERM or SIGHUP (exit code 130, 143 or 129).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// External hosts on the public network (no agent), to try clients from.
    #[command(subcommand)]
    Host(HostCommand),
    /// Pods, made and removed through the CNI plugin as a runtime calls it.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Seed 000 on a lab: a gateway stops forwarding new flows; watch it be detected,
    /// replaced, healed and given its share back, then tear the lab down (also when
    /// interrupted by Ctrl-C, SIGTERM or SIGHUP: exit code 130, 143 or 129). `--seed 001`:
    /// the store stops answering; `--seed 002`: a Service's backend pod dies and a node's
    /// proxy rules are tampered with.
    Demo(DemoArgs),
    /// Serve the lab's embedded store (started by `lab up`; not for direct use).
    #[command(hide = true)]
    ServeStore(NameArg),
    /// Serve the lab's Kubernetes API (started by `lab up --store kubernetes`; not for
    /// direct use).
    #[command(hide = true)]
    ServeKube(NameArg),
    /// Answer TCP and UDP echo in every pod (started by `lab up`; not for direct use).
    #[command(hide = true)]
    ServePods(NameArg),
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Create (or update) a Service and its EndpointSlice: endpoints are the named pods,
    /// ready, on their nodes. The ClusterIP (10.96.0.0/12) and node port are allocated as
    /// the API server would; a LoadBalancer gets an ingress address from 198.19.0.0/24,
    /// which lab hosts route to the first public node.
    Add(ServiceAddArgs),
    /// Delete a Service and its EndpointSlice.
    Rm {
        /// The Service.
        service: String,
        #[command(flatten)]
        name: NameArg,
    },
    /// The lab's Services with their addresses and backends (also `trellis get services
    /// --lab NAME`).
    List {
        #[command(flatten)]
        name: NameArg,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ServiceAddArgs {
    /// The Service's name (a DNS label).
    pub service: String,
    /// The Service's port.
    #[arg(long)]
    pub port: u32,
    /// Backend pods, e.g. a1-p0,b1-p0; none: a Service without endpoints (refused).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// The pods' port (default 9376, where every lab pod answers TCP and UDP echo).
    #[arg(long)]
    pub target_port: Option<u32>,
    #[arg(long, value_enum, default_value = "tcp", ignore_case = true)]
    pub protocol: L4,
    #[arg(
        long = "type",
        value_enum,
        default_value = "ClusterIP",
        ignore_case = true
    )]
    pub type_: Type,
    /// ClientIP session affinity: a client stays on one backend.
    #[arg(long)]
    pub affinity: bool,
    /// Local: traffic from outside the cluster only to the node's own endpoints (NodePort
    /// and LoadBalancer).
    #[arg(long, value_enum, ignore_case = true)]
    pub external_traffic_policy: Option<Policy>,
    /// Local: traffic from inside the cluster only to the node's own endpoints.
    #[arg(long, value_enum, ignore_case = true)]
    pub internal_traffic_policy: Option<Policy>,
    /// The ClusterIP's family: ipv4, ipv6 (from fd00:10:96::/108, endpoints the pods'
    /// IPv6 addresses; needs `lab up --dual-stack`) or dual (one of each). IPv6 ClusterIPs
    /// are reached from pods.
    #[arg(long, value_enum, default_value = "ipv4", ignore_case = true)]
    pub ip_families: Families,
    #[command(flatten)]
    pub name: NameArg,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// Where the client runs: a pod (a1-p0), a node (a1) or a host (laptop).
    pub from: String,
    /// ADDRESS:PORT, e.g. a ClusterIP and port, or a node's address and a NodePort.
    pub target: std::net::SocketAddr,
    #[arg(long, value_enum, default_value = "tcp", ignore_case = true)]
    pub protocol: L4,
    /// Exchanges, one after the other, each on a new socket.
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// How long one exchange may take before it counts as timed out, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub name: NameArg,
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
    /// The store: embedded (in-process, the default), etcd (Debian's etcd in its own
    /// namespace, reached over the location networks), or kubernetes (an API server double
    /// there; the agents run on Trellis's Kubernetes backend).
    #[arg(long, default_value = "embedded")]
    pub store: StoreKind,
    /// Give every node an IPv6 pod CIDR too (fd00:10:244:K::/64 for node K) and every pod
    /// an IPv6 address: the mesh carries both families, and `lab check` pings both.
    #[arg(long)]
    pub dual_stack: bool,
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
    /// The demo lab's name (1-6 lowercase letters or digits).
    #[arg(long, default_value = "demo", value_parser = lab_name)]
    pub name: String,
    /// Mesh granularity for the demo (seed 000).
    #[arg(long, default_value = "location")]
    pub granularity: Granularity,
    /// Which incident to replay: 000, a gateway that stops forwarding new flows; 001, the
    /// store (etcd) stops answering and the leader must stop without taking anything down;
    /// 002, a Service's backend pod dies and a node's proxy rules are tampered with; 003,
    /// every node reboots at once with the store down and pods must still get addresses.
    #[arg(long, default_value = "000", value_parser = ["000", "001", "002", "003"])]
    pub seed: String,
    /// Print the summary as one JSON object on stdout, at the end; the step-by-step
    /// narrative and the summary table go to stderr instead.
    #[arg(long)]
    pub json: bool,
}

/// `--name` of a lab, checked before anything is built.
fn lab_name(name: &str) -> anyhow::Result<String> {
    trellis_lab::spec::validate_lab_name(name)?;
    Ok(name.to_string())
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
    /// The node to break, `store`, or `cold-boot` alone: every node reboots at once with
    /// the store down (agents and pods gone, node namespaces made anew, each node's disk
    /// kept and its /run cleared), then agents start and pods are re-created through the
    /// CNI plugin (seed 003). `lab heal store` brings the store back.
    pub node: String,
    /// What breaks.
    pub kind: Option<FaultKind>,
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
        /// Only these fault kinds (default: all).
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<FaultKind>,
        #[command(flatten)]
        trial: TrialArgs,
    },
    /// Outage of new connections when the direct tunnel between two public nodes of
    /// different locations breaks (`cut-path`), with path probes and relay fallback, and
    /// with liveness only (no fallback, as Kilo), measured in the same run.
    PathFallback {
        /// Trials per mode.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        #[command(flatten)]
        trial: TrialArgs,
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
        /// The store the lab runs: etcd, or kubernetes (the API double; no peer there).
        #[arg(long, default_value = "etcd")]
        store: StoreKind,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// The bench's lab (1-6 lowercase letters or digits; a lab of that name is removed
        /// first).
        #[arg(long, default_value = "bld", value_parser = lab_name)]
        name: String,
    },
    /// The service proxy (its table as the proxy renders it) against kube-proxy's text
    /// path (`nft -f` of the same services in kube-proxy's nftables shape, a chain per
    /// service and per endpoint), measured in the same run: full sync, audit, one endpoint
    /// added or removed, cold start, connection setup through the proxy; each side in
    /// namespaces and processes of its own (wall time, peak memory, CPU).
    Proxy {
        /// Services (one TCP port each) for the full sync, audit, change and connection
        /// cases.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Ready endpoints per service.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Services for the cold start case.
        #[arg(long, default_value_t = 50_000)]
        cold_start_services: usize,
        /// Only these cases (default all): full-sync, endpoint-change, audit, cold-start,
        /// connect.
        #[arg(long, value_delimiter = ',')]
        cases: Vec<trellis_lab::bench::proxy::Case>,
        /// EndpointSlice changes to time (an endpoint added, then removed, in turn).
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Connections to time per size in the connection case.
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        /// How long one `nft` run of the peer may take (seconds); a timeout is reported.
        #[arg(long, default_value_t = 900)]
        peer_timeout: u64,
        /// Skip the `nft -f` peer.
        #[arg(long)]
        no_peer: bool,
        /// Print the rows as JSON on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// The bench's namespaces are `tl-NAME-…` (1-6 lowercase letters or digits; what a
        /// previous run left is removed first).
        #[arg(long, default_value = "bpx", value_parser = lab_name)]
        name: String,
    },
    /// NetworkPolicy enforcement, against peers in the same run. Programming: the
    /// enforcement loop on a synthetic cluster (cold start; a pod added on another node, a
    /// policy added or changed, a pod added on the bench's node, each from the store write
    /// to the kernel's commit) against `nft -f` of the whole same ruleset. Per packet:
    /// connection setup and iperf3 throughput through the enforcing node with Trellis's
    /// table at N policies, with no table and with a linear chain of N rules (needs
    /// iperf3).
    Policy {
        /// Only these parts (default both): programming, packet.
        #[arg(long, value_delimiter = ',')]
        parts: Vec<trellis_lab::bench::policy::Part>,
        /// NetworkPolicies of the synthetic cluster.
        #[arg(long, default_value_t = 1000)]
        policies: usize,
        /// Pods of the synthetic cluster, 100 per node.
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        /// Changes of each kind to time.
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Policy counts of the per-packet part.
        #[arg(long, value_delimiter = ',', default_value = "0,100,1000")]
        packet_policies: Vec<usize>,
        /// Rounds of the per-packet part (every configuration once per round).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Connections timed per configuration and round.
        #[arg(long, default_value_t = 2000)]
        connections: usize,
        /// Length of each iperf3 run (seconds).
        #[arg(long, default_value_t = 3)]
        iperf_seconds: u64,
        /// How long one `nft -f` of the peer may take (seconds).
        #[arg(long, default_value_t = 600)]
        peer_timeout: u64,
        /// Skip the peers (`nft -f` of the whole ruleset, the linear chain).
        #[arg(long)]
        no_peer: bool,
        /// Print the report as JSON on stdout (the tables go to stderr).
        #[arg(long)]
        json: bool,
        /// The bench's namespaces are `tl-NAME-…` (1-6 lowercase letters or digits; what a
        /// previous run left is removed first).
        #[arg(long, default_value = "bpol", value_parser = lab_name)]
        name: String,
    },
    /// One side of `bench proxy`, run by it inside a namespace (not for direct use).
    #[command(hide = true)]
    ProxyWorker(trellis_lab::bench::proxy::WorkerArgs),
    /// The CNI plugin (trellis-cni) against Debian's reference plugins (bridge with
    /// host-local IPAM), invoked alike in the same run, each pod in a namespace of its own:
    /// ADD and DEL latency (p50, p99, max, and the ratio), then ADD/DEL churn with SIGKILL
    /// of the plugin at random instants, then the addresses each leaked or handed out
    /// twice and the links each left behind; then pods that vanish without any DEL (as
    /// after a reboot), with a GC for trellis-cni and nothing for host-local, which has
    /// none. Exits non-zero if trellis-cni leaked, duplicated or left anything.
    Cni {
        /// Timed ADD + DEL rounds per plugin (after a few untimed ones).
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Churn cycles (ADD on a new pod, DEL of a live one) per plugin; 0 skips the churn.
        #[arg(long, default_value_t = 1000)]
        churn: usize,
        /// Percentage of churn calls killed with SIGKILL at a random instant.
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(0..=100))]
        kill_percent: u8,
        /// Pods per plugin added after the churn, then made to vanish without any DEL (their
        /// namespaces deleted); 0 skips that phase.
        #[arg(long, default_value_t = 20)]
        abandon: usize,
        /// Seed of the churn's random choices (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
        /// Only these plugins (default both): trellis, reference.
        #[arg(long, value_delimiter = ',')]
        plugins: Vec<trellis_lab::bench::cni::Plugin>,
        /// Print the report as JSON on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
        /// The bench's namespaces are `tl-NAME-…` (1-6 lowercase letters or digits; what a
        /// previous run left is removed first).
        #[arg(long, default_value = "bcni", value_parser = lab_name)]
        name: String,
    },
    /// Random loss on every link for a while; counts gateway changes (the target is none).
    FalseFailover {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Loss on every link of every node, in percent.
        #[arg(long, default_value_t = 5)]
        loss: u8,
        /// The bench's lab (1-6 lowercase letters or digits; a lab of that name is removed
        /// first).
        #[arg(long, default_value = "bfx", value_parser = lab_name)]
        name: String,
    },
}

/// What `bench failover` and `bench path-fallback` share.
#[derive(Args, Debug)]
pub struct TrialArgs {
    /// How long to wait for recovery before a trial counts as not recovered (seconds).
    #[arg(long, default_value_t = 10)]
    window_seconds: u64,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    json: bool,
    /// Which health to measure: forwarding (probes), liveness (the baseline), or both in
    /// one run (the default, and what a comparison should use).
    #[arg(long, default_value = "both", value_parser = ["both", "forwarding", "liveness"])]
    health: String,
    /// The bench's lab (1-6 lowercase letters or digits; a lab of that name is removed
    /// first); by default bff for the forwarding trials and bfl for the baseline.
    #[arg(long, value_parser = lab_name)]
    name: Option<String>,
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

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Add a pod on a node: a sandbox namespace, then CNI ADD in the node's namespace.
    Add {
        node: String,
        /// 1-12 lowercase letters, digits or '-'.
        pod: String,
        /// Its Kubernetes namespace (what network policies select by, with its labels).
        #[arg(long, default_value = trellis_lab::spec::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Its labels: KEY=VALUE, comma-separated.
        #[arg(long, value_name = "K=V,...", value_parser = parse_labels, default_value = "")]
        labels: std::collections::BTreeMap<String, String>,
        /// A named port of the pod: NAME=PORT or NAME=PORT/PROTOCOL (TCP, UDP, SCTP); may
        /// be given several times.
        #[arg(long = "port", value_name = "NAME=PORT[/PROTO]", value_parser = parse_named_port)]
        ports: Vec<trellis_model::NamedPort>,
        #[command(flatten)]
        name: NameArg,
    },
    /// Remove a pod: CNI DEL, then its sandbox.
    Del {
        pod: String,
        #[command(flatten)]
        name: NameArg,
    },
}

/// `NAME=PORT` or `NAME=PORT/PROTOCOL`.
fn parse_named_port(text: &str) -> Result<trellis_model::NamedPort, String> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("--port {text:?}: expected NAME=PORT[/PROTOCOL]"))?;
    let (port, protocol) = rest.split_once('/').unwrap_or((rest, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("--port {text:?}: the port must be 1-65535"))?;
    let protocol = serde_json::from_value(serde_json::json!(protocol.to_ascii_uppercase()))
        .map_err(|_| format!("--port {text:?}: the protocol must be TCP, UDP or SCTP"))?;
    Ok(trellis_model::NamedPort {
        name: name.to_string(),
        protocol,
        port,
    })
}

/// `k=v,k2=v2` (empty: no labels).
fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    (text.split(',').filter(|p| !p.is_empty()))
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("label {pair:?}: expected KEY=VALUE")),
        })
        .collect()
}

pub fn main(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        // exec replaces this process: it must enter the namespace while single-threaded.
        LabCommand::Exec(args) => Err(trellis_lab::exec::exec(
            &args.name.name,
            &args.node,
            args.pod.as_deref(),
            &args.command,
        )),
        // A process of its own, measured by `bench proxy`: its own runtime, if any.
        LabCommand::Bench(BenchCommand::ProxyWorker(args)) => {
            trellis_lab::bench::proxy::worker_main(args)?;
            Ok(ExitCode::SUCCESS)
        }
        other => super::runtime()?.block_on(run(other)),
    }
}

/// Commands that build labs run guarded: whatever they built is removed however they end,
/// and a signal ends them with the shell's code for it (128 + its number).
async fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    if !matches!(
        cmd,
        LabCommand::Up(_) | LabCommand::Demo(_) | LabCommand::Bench(_)
    ) {
        return dispatch(cmd).await;
    }
    let guarded = guard::guarded(dispatch(cmd)).await;
    // Not eprint!: after SIGHUP the terminal may be gone, and a failed write must not
    // turn a clean exit into a panic.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), guarded.report().as_bytes());
    match guarded.ended {
        Ended::Finished(result) => result,
        Ended::Interrupted(signal) => Ok(ExitCode::from(signal.exit_code())),
    }
}

async fn dispatch(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    let ok = |passed: bool| {
        if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    match cmd {
        LabCommand::Up(args) => {
            let params = args.params();
            let up = trellis_lab::up::up(&params, Duration::from_secs(args.timeout)).await?;
            // It came up: it is the user's now, and stays whatever happens next.
            trellis_lab::built::keep(&params.name);
            println!("{}", trellis_lab::up::summary(&up));
            print!("{}", status::show(&params.name, false).await?);
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Down(args) => {
            let report = build::teardown(&args.name)?;
            println!(
                "lab {} removed: {} namespaces, {} processes",
                args.name, report.namespaces, report.processes
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status(args) => {
            print!("{}", status::show(&args.name.name, args.json).await?);
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Check(args) => {
            let lab = LabState::load(&args.name.name)?;
            let report = check::all_pairs(&lab.spec, args.attempts, Duration::from_secs(1)).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", check::matrix(&report));
            }
            Ok(ok(report.ok))
        }
        LabCommand::Pod(PodCommand::Add {
            node,
            pod,
            namespace,
            labels,
            ports,
            name,
        }) => {
            let pod = trellis_lab::pod_network::add_pod(
                &name.name, &node, &pod, &namespace, labels, ports,
            )
            .await?;
            let v6 = pod.ip6.map(|a| format!(" and {a}")).unwrap_or_default();
            println!(
                "pod {} on {node} at {}{v6} (namespace {}, container {})",
                pod.name, pod.ip, pod.netns, pod.container_id
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Pod(PodCommand::Del { pod, name }) => {
            trellis_lab::pod_network::del_pod(&name.name, &pod)?;
            println!("pod {pod} removed");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Host(HostCommand::Add { host, name }) => {
            let spec = trellis_lab::build::add_host(&name.name, &host).await?;
            println!(
                "host {} at {} (namespace {})",
                spec.name, spec.ip, spec.netns
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Fault(args) if args.node == "cold-boot" && args.kind.is_none() => {
            let lab = &args.name.name;
            let boots = trellis_lab::cold_boot::cold_boot(lab).await?;
            for b in &boots {
                match (&b.address, b.addressed_ms, &b.error) {
                    (Some(a), Some(ms), _) => {
                        println!("{} on {}: {a} after {ms} ms", b.pod, b.node)
                    }
                    (_, _, e) => println!(
                        "{} on {}: no address: {}",
                        b.pod,
                        b.node,
                        e.as_deref().unwrap_or("?")
                    ),
                }
            }
            println!("cold boot done; the store is down: `trellis lab heal --name {lab} store`");
            Ok(ok(boots.iter().all(|b| b.address.is_some())))
        }
        LabCommand::Fault(args) if args.kind.is_none() => {
            anyhow::bail!(
                "lab fault {}: what breaks? e.g. `trellis lab fault {} kill` (or `trellis lab fault cold-boot`)",
                args.node,
                args.node
            )
        }
        LabCommand::Fault(args) if args.node == "store" => {
            let kind = args.kind.ok_or_else(|| anyhow::anyhow!("KIND missing"))?;
            let f = store::StoreFault::parse(kind, args.value.as_deref())?;
            store::inject(&args.name.name, f.clone()).await?;
            println!("{f}");
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Heal(args) if args.node == "store" => {
            let healed = store::heal(&args.name.name).await?;
            println!("store: healed {}", listed(&healed));
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Fault(args) => {
            let kind = args.kind.ok_or_else(|| anyhow::anyhow!("KIND missing"))?;
            let f = fault::Fault::parse(kind, args.new_flows_only, args.value.as_deref())?;
            if f.kind == FaultKind::ProxyTamper {
                let t = fault::tamper_proxy(&args.name.name, &args.node, None).await?;
                println!("{}: {f}: {t}", args.node);
            } else if f.kind == FaultKind::PolicyTamper {
                let t = fault::tamper_policy(&args.name.name, &args.node).await?;
                println!("{}: {f}: {t}", args.node);
            } else {
                fault::inject(&args.name.name, &args.node, f.clone()).await?;
                println!("{}: {f}", args.node);
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Heal(args) => {
            let lab = &args.name.name;
            let healed = fault::heal(lab, &args.node).await?;
            println!("{}: healed {}", args.node, listed(&healed));
            if healed.iter().any(|f| f.kind == FaultKind::PolicyTamper) {
                println!(
                    "{}: policy-tamper: nothing to undo; its agent's audit repaired the rules (see trellis_policy_drift_repaired_total in `lab metrics {}`)",
                    args.node, args.node
                );
            }
            if healed.iter().any(|f| f.kind == FaultKind::ProxyTamper) {
                // The audit runs every resync interval: three of them is a generous wait.
                let resync = LabState::load(lab)?.spec.agent_resync;
                let limit = Duration::from_secs(3 * resync + 5);
                match fault::wait_proxy_repaired(lab, &args.node, limit).await? {
                    Some(_) => println!(
                        "{}: proxy-tamper: nothing to undo; its proxy repaired its rules (its audit runs every {resync} s; see trellis_proxy_drift_repaired_total in `lab metrics {}`)",
                        args.node, args.node
                    ),
                    None => bail!(
                        "{}: its proxy rules are still not repaired after {} s",
                        args.node,
                        limit.as_secs()
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Service(ServiceCommand::Add(args)) => {
            let request = service::Request {
                name: args.service,
                port: args.port,
                target_port: args.target_port,
                protocol: args.protocol,
                type_: args.type_,
                backends: args
                    .backends
                    .into_iter()
                    .filter(|b| !b.is_empty())
                    .collect(),
                affinity: args.affinity,
                external_traffic_policy: args.external_traffic_policy,
                internal_traffic_policy: args.internal_traffic_policy,
                families: args.ip_families,
            };
            let added = service::add(&args.name.name, &request).await?;
            print!("{}", service::table(std::slice::from_ref(&added)));
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Service(ServiceCommand::Rm { service, name }) => {
            if service::remove(&name.name, &service).await? {
                println!("service {service} deleted, with its EndpointSlice");
                Ok(ExitCode::SUCCESS)
            } else {
                bail!("lab {} has no service {service:?}", name.name)
            }
        }
        LabCommand::Service(ServiceCommand::List { name, json }) => {
            let services = service::list(&name.name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&services)?);
            } else if services.is_empty() {
                println!("no services: add one with `trellis lab service add`");
            } else {
                print!("{}", service::table(&services));
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Connect(args) => {
            let tally = pods::connect(
                &args.name.name,
                &args.from,
                args.target,
                args.protocol,
                args.count.max(1),
                Duration::from_millis(args.timeout_ms.max(1)),
            )
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&tally)?);
            } else {
                println!("{tally}");
            }
            Ok(ok(tally.failures.is_empty()))
        }
        LabCommand::Bench(BenchCommand::Failover {
            trials,
            kinds,
            trial,
        }) => {
            let kinds = bench::default_kinds()
                .into_iter()
                .filter(|f| kinds.is_empty() || kinds.contains(&f.kind))
                .collect();
            failover_bench(bench::Target::Gateways(kinds), trials, trial).await
        }
        LabCommand::Bench(BenchCommand::PathFallback { trials, trial }) => {
            failover_bench(bench::Target::DirectPath, trials, trial).await
        }
        LabCommand::Bench(BenchCommand::Leadership {
            reps,
            faults,
            hold_seconds,
            no_peer,
            store,
            json,
            name,
        }) => {
            anyhow::ensure!(
                store != StoreKind::Embedded,
                "--store embedded: the leadership bench needs etcd or kubernetes (store faults)"
            );
            let args = bench::LeadershipArgs {
                store,
                name,
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
            // Trellis's own results only: the peer's troubles are in the report.
            Ok(ok(report.passed()))
        }
        LabCommand::Bench(BenchCommand::FalseFailover {
            minutes,
            loss,
            name,
        }) => {
            let minutes = if minutes.is_finite() && minutes > 0.0 {
                minutes
            } else {
                bail!("invalid --minutes {minutes}: must be a positive number")
            };
            let report =
                bench::false_failover(&name, Duration::from_secs_f64(minutes * 60.0), loss).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ok(report.gateway_changes == 0))
        }
        LabCommand::Bench(BenchCommand::Proxy {
            services,
            endpoints,
            cold_start_services,
            cases,
            changes,
            connections,
            peer_timeout,
            no_peer,
            json,
            name,
        }) => {
            let args = bench::proxy::ProxyArgs {
                name,
                services,
                endpoints,
                cold_start_services,
                cases: if cases.is_empty() {
                    bench::proxy::Case::ALL.to_vec()
                } else {
                    cases
                },
                changes: changes.max(1),
                connections,
                peer: !no_peer,
                peer_timeout: Duration::from_secs(peer_timeout.max(1)),
            };
            let outcome = bench::proxy::proxy(&args).await;
            // What was measured is printed even when the run could not finish; with --json
            // the table goes to stderr.
            if json {
                eprint!("{}", bench::proxy::table(&outcome.rows));
                println!("{}", serde_json::to_string_pretty(&outcome.rows)?);
            } else {
                print!("{}", bench::proxy::table(&outcome.rows));
            }
            match outcome.stopped {
                Some(e) => {
                    Err(e.context("the bench stopped early; the rows above are what it measured"))
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
        LabCommand::Bench(BenchCommand::Policy {
            parts,
            policies,
            pods,
            changes,
            packet_policies,
            rounds,
            connections,
            iperf_seconds,
            no_peer,
            peer_timeout,
            json,
            name,
        }) => {
            let args = bench::policy::PolicyArgs {
                name,
                parts: if parts.is_empty() {
                    vec![
                        bench::policy::Part::Programming,
                        bench::policy::Part::Packet,
                    ]
                } else {
                    parts
                },
                policies,
                pods,
                changes: changes.max(1),
                packet_policies,
                rounds: rounds.max(1),
                connections: connections.max(1),
                iperf_seconds: iperf_seconds.max(1),
                peer: !no_peer,
                peer_timeout: Duration::from_secs(peer_timeout.max(1)),
            };
            let report = bench::policy::policy(&args).await;
            // What was measured is printed even when the run could not finish; with --json
            // the tables go to stderr.
            if json {
                eprint!("{}", bench::policy::table(&report));
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::policy::table(&report));
            }
            match report.stopped {
                Some(e) => {
                    Err(e.context("the bench stopped early; the rows above are what it measured"))
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
        LabCommand::Bench(BenchCommand::ProxyWorker(_)) => {
            unreachable!("handled before the runtime starts")
        }
        LabCommand::Bench(BenchCommand::Cni {
            iterations,
            churn,
            kill_percent,
            abandon,
            seed,
            plugins,
            json,
            name,
        }) => {
            let args = bench::cni::CniArgs {
                name,
                iterations,
                churn,
                kill_percent,
                abandon,
                seed,
                plugins: if plugins.is_empty() {
                    bench::cni::Plugin::ALL.to_vec()
                } else {
                    plugins
                },
            };
            let outcome = bench::cni::run(&args).await;
            // What was measured is printed even when the run could not finish; with --json
            // the table goes to stderr.
            if json {
                eprint!("{}", bench::cni::table(&outcome.report));
                println!("{}", serde_json::to_string_pretty(&outcome.report)?);
            } else {
                print!("{}", bench::cni::table(&outcome.report));
            }
            match outcome.stopped {
                Some(e) => {
                    Err(e.context("the bench stopped early; the rows above are what it measured"))
                }
                None => Ok(ok(outcome.report.passed())),
            }
        }
        LabCommand::Metrics(args) => {
            let lab = LabState::load(&args.name.name)?;
            print!(
                "{}",
                trellis_lab::agent_admin::metrics(&lab, &args.node).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::ServeStore(args) => {
            store::serve(&args.name).await?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::ServeKube(args) => {
            trellis_lab::kube_api::serve(&args.name).await?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::ServePods(args) => {
            pods::serve(&args.name).await?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Demo(args) => {
            let seed = match args.seed.as_str() {
                "001" => demo::Seed::Lease001,
                "002" => demo::Seed::Proxy002,
                "003" => demo::Seed::ColdBoot003,
                _ => demo::Seed::Gateway000,
            };
            Ok(ok(
                demo::run(&args.name, args.granularity, seed, args.json).await?
            ))
        }
        LabCommand::Exec(_) => unreachable!("handled before the runtime starts"),
    }
}

fn listed<T: std::fmt::Display>(healed: &[T]) -> String {
    if healed.is_empty() {
        "(no faults)".into()
    } else {
        healed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `lab bench failover` and `lab bench path-fallback`: the same trials, on a different target.
async fn failover_bench(
    target: bench::Target,
    trials: usize,
    trial: TrialArgs,
) -> anyhow::Result<ExitCode> {
    let TrialArgs {
        window_seconds,
        json,
        health,
        name,
    } = trial;
    let args = bench::FailoverArgs {
        name,
        trials: trials.max(1),
        window: Duration::from_secs(window_seconds.max(1)),
        target,
        forwarding: health != "liveness",
        baseline: health != "forwarding",
    };
    let outcome = bench::failover(&args).await;
    // What was measured is printed even when the run could not finish.
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome.rows)?);
    } else {
        print!("{}", bench::table(&outcome.rows));
    }
    match outcome.stopped {
        Some(e) => Err(e.context("the bench stopped early; the rows above are what it measured")),
        None => Ok(ExitCode::SUCCESS),
    }
}

impl UpArgs {
    fn params(&self) -> LabParams {
        LabParams {
            name: self.name.name.clone(),
            nodes: self.nodes,
            locations: self.locations,
            granularity: self.granularity,
            gateways: self.gateways,
            public_per_location: self.public,
            pods_per_node: self.pods,
            agent_resync: self.agent_resync,
            gateway_health: self.gateway_health.into(),
            store: self.store,
            dual_stack: self.dual_stack,
        }
    }
}
