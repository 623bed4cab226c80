//! How the planner scales: clusters of 1,000 and 10,000 nodes in 100 and 500 locations.
//!
//!     cargo bench -p trellis-plan --bench scale
//!
//! Prints Markdown tables (with the machine and date) for docs/benchmarks.md. Per shape it
//! times what one agent does on every change of the plan inputs (verdicts from the
//! observations, `Topology::build_with_health`, `plan_for` of its own node), and estimates
//! what the whole cluster spends when one gateway is measured down or one node joins.
//! Memory comes from the counting allocator below. `--quick` runs fewer repetitions.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use trellis_model::{GatewayPolicy, Granularity, Node, PublicKey};
use trellis_plan::{Settings, Slots, Topology, health};

// ------------------------------------------------------------------ counting allocator

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its result, the bytes it left allocated and the most it had
/// allocated at once, both counted from the call.
fn measure_memory<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let out = f();
    let (after, peak) = (LIVE.load(Relaxed), PEAK.load(Relaxed));
    (out, after.saturating_sub(before), peak - before)
}

// ------------------------------------------------------------------ the clusters

/// Public, gateway-eligible nodes per location (at most half of it); the rest are private
/// (and keep the default policy, eligible, which matters only where no public node qualifies).
const PUBLIC_PER_LOCATION: usize = 3;

fn public_in(per_location: usize) -> usize {
    PUBLIC_PER_LOCATION.min(per_location / 2).max(1)
}

fn location_name(loc: usize) -> String {
    format!("site-{loc:03}")
}

/// Node `k` (global index) of location `loc`, its `i`-th member.
fn node(k: usize, loc: usize, i: usize, public: bool) -> Node {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(k as u64 + 1).to_le_bytes());
    Node {
        name: format!("site-{loc:03}-node-{i:03}"),
        location: location_name(loc),
        internal_ip: format!("172.{}.{}.{}/24", 16 + loc / 256, loc % 256, i + 2)
            .parse()
            .unwrap(),
        endpoint: public.then(|| {
            format!("198.18.{}.{}:51820", k / 250, k % 250 + 1)
                .parse()
                .unwrap()
        }),
        listen_port: 51820,
        public_key: Some(PublicKey(key)),
        pod_cidrs: vec![format!("10.{}.{}.0/24", k / 256, k % 256).parse().unwrap()],
        gateway: GatewayPolicy::default(),
        overlay_ip: format!("100.64.{}.{}", k / 250, k % 250 + 1)
            .parse()
            .unwrap(),
        probe_ip: Some(
            format!("100.96.{}.{}", k / 250, k % 250 + 1)
                .parse()
                .unwrap(),
        ),
        persistent_keepalive: None,
        location_prefixes: Vec::new(),
    }
}

/// `n` nodes spread evenly over `locations`.
fn cluster(n: usize, locations: usize) -> Vec<Node> {
    let per = n / locations;
    (0..n)
        .map(|k| node(k, k / per, k % per, k % per < public_in(per)))
        .collect()
}

/// The plan inputs an agent holds in a steady cluster: the nodes, the stored gateway
/// record, and every assigned observer reporting its gateway up.
struct Inputs {
    settings: Settings,
    nodes: Vec<Node>,
    slots: BTreeMap<String, Slots>,
    reports: BTreeMap<String, BTreeMap<String, bool>>,
}

impl Inputs {
    fn steady(settings: Settings, nodes: Vec<Node>) -> Self {
        let first = Topology::build(settings.clone(), nodes.clone(), [], &BTreeMap::new());
        let reports = first
            .observers
            .iter()
            .map(|(g, os)| (g.clone(), os.iter().map(|o| (o.clone(), true)).collect()))
            .collect();
        Inputs {
            settings,
            nodes,
            slots: first.slots,
            reports,
        }
    }

    /// The agent's `measured_down`: candidates a majority of their observers call down.
    fn down(&self) -> BTreeSet<String> {
        health::verdicts(self.nodes.iter(), &self.reports)
            .into_iter()
            .filter(|(_, v)| *v == health::Verdict::Down)
            .map(|(g, _)| g)
            .collect()
    }

    fn topology(&self, down: &BTreeSet<String>) -> Topology {
        Topology::build_with_health(
            self.settings.clone(),
            self.nodes.iter().cloned(),
            [],
            &self.slots,
            down,
        )
    }
}

// ------------------------------------------------------------------ timing

#[derive(Clone, Copy)]
struct Budget {
    min_runs: usize,
    max_runs: usize,
    time: Duration,
}

/// Times `f` at least `min_runs` times, more while within the time budget.
fn time_runs<T>(budget: Budget, mut f: impl FnMut() -> T) -> Stats {
    let mut samples = Vec::new();
    let started = Instant::now();
    while samples.len() < budget.min_runs
        || (samples.len() < budget.max_runs && started.elapsed() < budget.time)
    {
        let t = Instant::now();
        black_box(f());
        samples.push(t.elapsed());
    }
    Stats::of(samples)
}

struct Stats {
    median: Duration,
    max: Duration,
    runs: usize,
}

impl Stats {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Stats {
            median: samples[samples.len() / 2],
            max: *samples.last().unwrap(),
            runs: samples.len(),
        }
    }
    fn cell(&self) -> String {
        format!("{} / {}", ms(self.median), ms(self.max))
    }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn mib(bytes: usize) -> String {
    let m = bytes as f64 / (1024.0 * 1024.0);
    if m < 1.0 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{m:.1} MiB")
    }
}

// ------------------------------------------------------------------ one shape

struct Shape {
    nodes: usize,
    locations: usize,
    granularity: Granularity,
}

struct Row {
    shape: Shape,
    candidates: usize,
    verdicts: Stats,
    build: Stats,
    plan_gateway: Stats,
    plan_ordinary: Stats,
    agent_total: Duration,
    peak: usize,
    topology_bytes: usize,
    plan_bytes: (usize, usize),
    plan_peers: (usize, usize),
    plan_routes: (usize, usize),
    gateway_down: Change,
    join: Change,
    records_clone: Stats,
    records_compare: Stats,
}

/// A change every agent reacts to: each builds the topology and plans its own node.
struct Change {
    /// One agent: verdicts + build + plan_for (median plan over the sampled nodes).
    one_agent: Duration,
    /// The whole cluster: N × (verdicts + build) + sum of plan_for over all nodes,
    /// estimated from a sample of nodes.
    cluster_cpu: Duration,
    sampled: usize,
    /// Sampled nodes whose plan differs from before the change, scaled to the cluster.
    changed: usize,
}

fn run_shape(shape: Shape, budget: Budget, sample: usize) -> Row {
    let settings = Settings {
        granularity: shape.granularity,
        ..Settings::default()
    };
    let inputs = Inputs::steady(settings, cluster(shape.nodes, shape.locations));
    let down = inputs.down();
    assert!(down.is_empty());
    let topology = inputs.topology(&down);
    assert!(topology.warnings.is_empty(), "{:?}", topology.warnings);
    let site = location_name(shape.locations / 2);
    let gateway = topology.gateways[&site][0].clone();
    let ordinary = topology
        .nodes
        .values()
        .find(|n| n.location == site && !n.is_public())
        .unwrap()
        .name
        .clone();

    let verdicts = time_runs(budget, || inputs.down());
    let build = time_runs(budget, || inputs.topology(&down));
    let plan_gateway = time_runs(budget, || topology.plan_for(&gateway).unwrap());
    let plan_ordinary = time_runs(budget, || topology.plan_for(&ordinary).unwrap());
    let agent_total = verdicts.median + build.median + plan_gateway.median;
    // Not the planner: what an agent spends on every store event to find out whether the
    // plan inputs changed at all (it clones the node records and compares them).
    let records: BTreeMap<String, Node> = (inputs.nodes.iter())
        .map(|n| (n.name.clone(), n.clone()))
        .collect();
    let copy = records.clone();
    let records_clone = time_runs(budget, || records.clone());
    let records_compare = time_runs(budget, || records == copy);

    let (built, topology_bytes, _) = measure_memory(|| inputs.topology(&down));
    drop(built);
    let (_, _, peak) = measure_memory(|| {
        let t = inputs.topology(&down);
        t.plan_for(&gateway).unwrap()
    });
    let (gp, gateway_plan_bytes, _) = measure_memory(|| topology.plan_for(&gateway).unwrap());
    let (op, ordinary_plan_bytes, _) = measure_memory(|| topology.plan_for(&ordinary).unwrap());
    let size = std::mem::size_of::<Topology>();
    let plan_size = std::mem::size_of::<trellis_plan::Plan>();

    // One gateway measured down: every observer of `gateway` reports it down.
    let mut failed = Inputs {
        settings: inputs.settings.clone(),
        nodes: inputs.nodes.clone(),
        slots: inputs.slots.clone(),
        reports: inputs.reports.clone(),
    };
    for up in failed.reports.get_mut(&gateway).unwrap().values_mut() {
        *up = false;
    }
    let gateway_down = change(&topology, &failed, sample);

    // One private node joins a location.
    let mut joined = Inputs {
        settings: inputs.settings.clone(),
        nodes: inputs.nodes.clone(),
        slots: inputs.slots.clone(),
        reports: inputs.reports.clone(),
    };
    let per = shape.nodes / shape.locations;
    joined
        .nodes
        .push(node(shape.nodes, shape.locations / 2, per, false));
    let join = change(&topology, &joined, sample);

    Row {
        candidates: topology.observers.len(),
        verdicts,
        build,
        plan_gateway,
        plan_ordinary,
        agent_total,
        peak,
        topology_bytes: topology_bytes + size,
        plan_bytes: (
            gateway_plan_bytes + plan_size,
            ordinary_plan_bytes + plan_size,
        ),
        plan_peers: (gp.peers.len(), op.peers.len()),
        plan_routes: (gp.routes.len(), op.routes.len()),
        gateway_down,
        join,
        records_clone,
        records_compare,
        shape,
    }
}

/// Every agent re-plans after the change from `before` to `after`: time one verdicts +
/// build (the same for every agent), and plan_for over an even sample of the nodes.
fn change(before: &Topology, after: &Inputs, sample: usize) -> Change {
    let t = Instant::now();
    let down = after.down();
    let topology = after.topology(&down);
    let shared = t.elapsed();
    let names: Vec<&String> = topology.nodes.keys().collect();
    // An even spread over locations and roles: a prime stride (coprime with the sizes).
    let picked: Vec<&String> = (0..sample.min(names.len()))
        .map(|i| names[i * 7_919 % names.len()])
        .collect();
    let mut plan_times = Vec::with_capacity(picked.len());
    let mut changed = 0;
    for name in &picked {
        let t = Instant::now();
        let plan = topology.plan_for(name).unwrap();
        plan_times.push(t.elapsed());
        if before.plan_for(name).ok().as_ref() != Some(&plan) {
            if std::env::var("DEBUG_DIFF").is_ok() && changed < 6 {
                let old = before.plan_for(name).unwrap();
                let r: Vec<_> = old
                    .routes
                    .iter()
                    .filter(|r| !plan.routes.contains(r))
                    .take(3)
                    .collect();
                let r2: Vec<_> = plan
                    .routes
                    .iter()
                    .filter(|r| !old.routes.contains(r))
                    .take(3)
                    .collect();
                eprintln!(
                    "{name}: {r:?} -> {r2:?} peers {} {} obs {:?} {:?}",
                    old.peers.len(),
                    plan.peers.len(),
                    old.observe,
                    plan.observe
                );
            }
            changed += 1;
        }
    }
    let n = names.len();
    let plan_sum: Duration = plan_times.iter().sum();
    let per_plan = plan_sum / picked.len() as u32;
    let median_plan = Stats::of(plan_times).median;
    Change {
        one_agent: shared + median_plan,
        cluster_cpu: shared * n as u32 + per_plan * n as u32,
        sampled: picked.len(),
        changed: changed * n / picked.len(),
    }
}

// ------------------------------------------------------------------ report

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let output = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = output("git", &["rev-parse", "--short", "HEAD"]);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{date}, {cores} cores (nproc), {cpu}, load average {load} at the end, commit {commit} \
         (plus uncommitted changes, if any), release build, one thread"
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let budget = if quick {
        Budget {
            min_runs: 3,
            max_runs: 3,
            time: Duration::ZERO,
        }
    } else {
        Budget {
            min_runs: 5,
            max_runs: 25,
            time: Duration::from_secs(2),
        }
    };
    let sample = if quick { 50 } else { 200 };
    let mut shapes = Vec::new();
    for nodes in [1_000, 10_000] {
        for locations in [100, 500] {
            shapes.push(Shape {
                nodes,
                locations,
                granularity: Granularity::Location,
            });
        }
    }
    for granularity in [Granularity::Full, Granularity::Hybrid] {
        for locations in [100, 500] {
            shapes.push(Shape {
                nodes: 1_000,
                locations,
                granularity,
            });
        }
    }

    // `--profile`: one agent step at 10,000 nodes in 500 locations, nothing else (for
    // `valgrind --tool=callgrind`).
    if args.iter().any(|a| a == "--profile") {
        let nodes = cluster(10_000, 500);
        let settings = Settings::default();
        let topology = Topology::build(settings, nodes, [], &BTreeMap::new());
        let gateway = &topology.gateways[&location_name(250)][0];
        black_box(topology.plan_for(gateway).unwrap());
        black_box(health::verdicts(topology.nodes.values(), &BTreeMap::new()));
        return;
    }
    // `--nodes N` keeps only the shapes of N nodes.
    if let Some(i) = args.iter().position(|a| a == "--nodes") {
        let n: usize = args[i + 1].parse().expect("--nodes N");
        shapes.retain(|s| s.nodes == n);
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    for shape in shapes {
        eprintln!(
            "{} nodes, {} locations, {} ...",
            shape.nodes, shape.locations, shape.granularity
        );
        rows.push(run_shape(shape, budget, sample));
    }

    println!("Machine: {}.", machine());
    println!(
        "{PUBLIC_PER_LOCATION} public gateway-eligible nodes per location (1 of 2 at 1,000 nodes in 500 locations), the rest private; \
         2 gateways per location; every observer reporting. Times in ms, median / max of \
         the runs shown."
    );
    println!();
    println!("### One agent, on every change of the plan inputs");
    println!();
    println!(
        "| nodes | locations | granularity | candidates | runs | verdicts | build_with_health | plan_for gateway | plan_for ordinary | agent total (median) | peak alloc (build + plan) | Topology | Plan gateway / ordinary (peers, routes) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}, {}) / {} ({}, {}) |",
            r.shape.nodes,
            r.shape.locations,
            r.shape.granularity,
            r.candidates,
            r.build.runs,
            r.verdicts.cell(),
            r.build.cell(),
            r.plan_gateway.cell(),
            r.plan_ordinary.cell(),
            ms(r.agent_total),
            mib(r.peak),
            mib(r.topology_bytes),
            mib(r.plan_bytes.0),
            r.plan_peers.0,
            r.plan_routes.0,
            mib(r.plan_bytes.1),
            r.plan_peers.1,
            r.plan_routes.1,
        );
    }
    println!();
    println!("### The whole cluster re-plans");
    println!();
    println!(
        "Cluster CPU = N × (verdicts + build_with_health) + Σ plan_for over all N nodes, the \
         sum estimated from an even sample of nodes; one agent = verdicts + build + median \
         plan_for. \"Plans changed\" is estimated from the same sample."
    );
    println!();
    println!(
        "| nodes | locations | granularity | gateway down: one agent (ms) | cluster CPU (s) | plans changed | node joins: one agent (ms) | cluster CPU (s) | plans changed | sample |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} | ~{} | {} | {:.1} | ~{} | {} |",
            r.shape.nodes,
            r.shape.locations,
            r.shape.granularity,
            ms(r.gateway_down.one_agent),
            r.gateway_down.cluster_cpu.as_secs_f64(),
            r.gateway_down.changed,
            ms(r.join.one_agent),
            r.join.cluster_cpu.as_secs_f64(),
            r.join.changed,
            r.join.sampled,
        );
    }
    println!();
    println!("### Not the planner: the agent's per-event check of its inputs");
    println!();
    println!(
        "Cloning and comparing the node records (`BTreeMap<String, Node>`), which the agent \
         does on every store event, relevant or not, to decide whether to re-plan."
    );
    println!();
    println!("| nodes | clone (ms) | compare (ms) |");
    println!("|---|---|---|");
    let mut seen = BTreeSet::new();
    for r in rows.iter().filter(|r| seen.insert(r.shape.nodes)) {
        println!(
            "| {} | {} | {} |",
            r.shape.nodes,
            r.records_clone.cell(),
            r.records_compare.cell()
        );
    }
    println!();
    println!("(whole run: {:.0} s)", started.elapsed().as_secs_f64());
}
