//! `lab bench cni`: the CNI plugin (`trellis-cni`) against Debian's reference plugins
//! (`bridge` with `host-local` IPAM, from `containernetworking-plugins`), both invoked the
//! same way in the same run, as a runtime invokes them ([`crate::cni`]: the `CNI_*`
//! environment, the configuration on stdin, the plugin started inside the runtime's
//! network namespace).
//!
//! The rig: one network namespace standing for the node (`tl-NAME-node`, only `lo` in it,
//! connected to nothing) where both plugins run and keep their host-side links, and a
//! fresh namespace per pod (`tl-NAME-pN`), deleted after the pod's DEL as a runtime
//! deletes a sandbox's. The plugins' files (Trellis's node file and IPAM state,
//! host-local's data directory) are in the bench's own directory. No traffic flows: what
//! is measured is the plugins' own work.
//!
//! - **Latency**: N rounds (after a few untimed ones) of ADD then DEL on a new pod, for
//!   each plugin in turn, the order swapped every round so that any drift of the machine
//!   hits both alike. A call's time runs from the spawn of the plugin to its exit
//!   ([`crate::cni::Outcome::elapsed`]). Reported: p50, p99 and max per plugin and verb,
//!   and the ratio Trellis / reference (the goal of issue 10: at most one half).
//! - **Churn**: cycles of ADD on a new pod, with a window of a few live pods whose random
//!   one is deleted once the window is full. A fraction of all calls is killed with
//!   SIGKILL at a random instant between the start and the plugin's median duration for
//!   that verb (most kills then land mid-call). As kubelet does, a killed or failed ADD is
//!   followed by a DEL, and a killed or failed DEL is retried (the last of
//!   [`DEL_ATTEMPTS`] is never killed). At the end every pod is deleted, Trellis is given
//!   a CNI 1.1 GC naming no attachment as valid (the reference has no GC), and each
//!   plugin's state is read back: `leaked` counts addresses still allocated (Trellis's
//!   IPAM file, host-local's one file per address), `duplicates` an address handed to a
//!   pod while another live pod held it, or held twice in the final state, and the links
//!   left behind are counted: host-side veths in the node's namespace, and pod interfaces
//!   still there half a second after a DEL succeeded (Trellis's DEL answers before the
//!   kernel has torn the veth down: a detached helper does that).
//! - **Abandon**: then, per plugin, K more pods are added (no call killed) and vanish
//!   without any DEL, as a node's reboot or a crashed runtime leaves them: only their
//!   namespaces are deleted (their veths go with them). Each plugin then gets what its
//!   world offers: Trellis a CNI GC naming no attachment as valid (a runtime's GC once it
//!   is back), the reference nothing (host-local has no GC, containernetworking/plugins
//!   issues 252 and 697; the bridge plugin's DEL, which nothing calls for a vanished pod,
//!   is its only way to free an address). Reported: the pods abandoned, the addresses the
//!   phase left allocated (`leaked_after_abandon`), addresses held twice, and host veths
//!   left. The churn's numbers are taken before this phase and do not include it.
//!
//! The random choices come from a seeded generator and the seed is printed, so a run's
//! kills can be replayed (their effect still depends on the machine's timing).

use super::percentile;
use crate::cni::{self, Call, Outcome};
use crate::{build, built, state};
use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::netns;

/// Untimed rounds before the latency rounds: the first calls pay for cold caches.
const WARMUP_ROUNDS: usize = 5;
/// Live pods kept during the churn: deletes interleave with adds, as on a busy node.
const CHURN_WINDOW: usize = 4;
/// Attempts at deleting one pod in the churn; the last one is never killed, so every pod
/// is deleted unless the plugin itself keeps failing.
const DEL_ATTEMPTS: usize = 10;
/// How long the kernel may take to remove the veths of deleted pod namespaces (it
/// dismantles namespaces in the background) before what is left counts as left behind.
const LINKS_SETTLE: Duration = Duration::from_secs(10);
/// How often a call that is to be killed is looked at before its instant comes.
const KILL_POLL: Duration = Duration::from_micros(100);
/// The pod's interface name, as kubelet passes it.
const IFNAME: &str = "eth0";

/// Where Debian's reference plugins are.
pub const REFERENCE_DIR: &str = "/usr/lib/cni";
const TRELLIS_POD_CIDR: &str = "10.201.0.0/16";
const REFERENCE_POD_CIDR: &str = "10.202.0.0/16";
/// The reference's network name: host-local keeps its addresses in a directory named so.
const REFERENCE_NETWORK: &str = "benchref";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Plugin {
    /// `trellis-cni`, from beside the running `trellis`.
    Trellis,
    /// Debian's `bridge` with `host-local` IPAM.
    Reference,
}

impl Plugin {
    pub const ALL: [Plugin; 2] = [Plugin::Trellis, Plugin::Reference];

    fn name(self) -> &'static str {
        match self {
            Plugin::Trellis => "trellis",
            Plugin::Reference => "reference",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Plugin::Trellis => "trellis-cni",
            Plugin::Reference => "reference (bridge + host-local)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CniArgs {
    /// The bench's namespaces are `tl-NAME-…`, its files in the lab directory of NAME.
    pub name: String,
    /// Timed ADD + DEL rounds per plugin.
    pub iterations: usize,
    /// Churn cycles per plugin.
    pub churn: usize,
    /// Percentage of churn calls killed.
    pub kill_percent: u8,
    /// Pods per plugin added then abandoned without any DEL; 0 skips that phase.
    pub abandon: usize,
    /// `None`: from the clock.
    pub seed: Option<u64>,
    pub plugins: Vec<Plugin>,
}

/// One row: a verb's latency (`ADD`, `DEL`), a plugin's churn (`churn`), or what it did
/// about pods that vanished without a DEL (`abandon`).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub plugin: Plugin,
    pub verb: String,
    /// Latency rows: calls timed. Churn and abandon: every call made (retries included).
    pub calls: usize,
    /// Latency rows only (null for the churn and abandon).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Calls that ended with an error without being killed.
    pub errors: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub abandon: Option<Abandon>,
}

/// What a plugin's churn left behind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Churn {
    pub cycles: usize,
    /// Calls killed with SIGKILL before they exited.
    pub killed: usize,
    /// Addresses still allocated once every pod was deleted (and, for Trellis, after GC).
    pub leaked: usize,
    /// The same before GC (Trellis only: the reference has none).
    pub leaked_before_gc: Option<usize>,
    /// Addresses given to a pod while another live pod held them, plus addresses held
    /// twice in the final state.
    pub duplicates: usize,
    /// Host-side veths of the plugin still in the node's namespace at the end.
    pub host_veths_left: usize,
    /// Pod interfaces still there [`LINK_GONE_WITHIN`] after their DEL succeeded
    /// (trellis-cni leaves the kernel's slow veth teardown to a detached helper, so its
    /// DEL answers before the link is gone).
    pub pod_links_left: usize,
    /// Pods whose DEL never succeeded in [`DEL_ATTEMPTS`] attempts.
    pub undeleted: usize,
}

/// What a plugin's abandoned pods left behind. Only what this phase added counts: an
/// address the churn leaked is the churn's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Abandon {
    /// Pods whose ADD succeeded and that then vanished without any DEL.
    pub abandoned: usize,
    /// Addresses still allocated afterwards (for Trellis, after its GC).
    pub leaked_after_abandon: usize,
    /// The same before GC (Trellis only: the reference has none).
    pub leaked_after_abandon_before_gc: Option<usize>,
    /// Addresses given to two abandoned pods, plus addresses held twice afterwards.
    pub duplicates_after_abandon: usize,
    /// Host-side veths of the plugin still in the node's namespace afterwards.
    pub host_veths_after_abandon: usize,
}

/// Trellis's time over the reference's for one verb.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub verb: String,
    pub p50: f64,
    pub p99: f64,
    /// Issue 10's goal: at most half the reference, at p50 and at p99.
    pub goal_met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub iterations: usize,
    pub churn_cycles: usize,
    pub kill_percent: u8,
    pub abandon_pods: usize,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
}

impl Report {
    /// Trellis's churn and abandoned pods left nothing behind and duplicated nothing (the
    /// latency goal depends on the machine, and is reported, not judged).
    pub fn passed(&self) -> bool {
        let trellis = || self.rows.iter().filter(|r| r.plugin == Plugin::Trellis);
        let churn_clean = trellis().filter_map(|r| r.churn.as_ref()).all(|c| {
            c.leaked == 0
                && c.duplicates == 0
                && c.host_veths_left == 0
                && c.pod_links_left == 0
                && c.undeleted == 0
        });
        let abandon_clean = trellis().filter_map(|r| r.abandon.as_ref()).all(|a| {
            a.leaked_after_abandon == 0
                && a.duplicates_after_abandon == 0
                && a.host_veths_after_abandon == 0
        });
        churn_clean && abandon_clean
    }
}

/// What the bench measured, and why it stopped early if it did: the rows measured
/// before that are kept.
pub struct CniOutcome {
    pub report: Report,
    pub stopped: Option<anyhow::Error>,
}

pub async fn run(args: &CniArgs) -> CniOutcome {
    let seed = args.seed.unwrap_or_else(clock_seed);
    eprintln!("cni bench: seed {seed} (replay with --seed {seed})");
    let mut report = Report {
        seed,
        iterations: args.iterations,
        churn_cycles: args.churn,
        kill_percent: args.kill_percent,
        abandon_pods: args.abandon,
        rows: Vec::new(),
        ratios: Vec::new(),
    };
    // What an earlier run that was killed outright left behind.
    let _ = build::teardown(&args.name);
    // From here on, an interrupted command's guard removes what the bench built.
    built::building(&args.name);
    let stopped = match Rig::build(args, seed).await {
        Ok(rig) => {
            let (rows, stopped) = Worker::run(rig, args.clone()).await;
            report.rows = rows;
            stopped
        }
        Err(e) => Some(e.context("building the bench's rig")),
    };
    if let Err(e) = build::teardown(&args.name) {
        eprintln!("removing the bench's namespaces: {e:#}");
    }
    report.ratios = ratios(&report.rows);
    CniOutcome { report, stopped }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// The measuring runs on a thread of its own: it is a sequence of blocking process
/// calls. If the bench's future is dropped (the command's guard does that on Ctrl-C),
/// the thread is told to stop and waited for, so it cannot create a namespace after the
/// guard's teardown has listed them.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    async fn run(mut rig: Rig, args: CniArgs) -> (Vec<Row>, Option<anyhow::Error>) {
        let stop = rig.stop.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-cni".into())
            .spawn(move || {
                let mut rows = Vec::new();
                let stopped = rig.measure(&args, &mut rows).err();
                let _ = tx.send((rows, stopped));
            });
        let worker = match thread {
            Ok(thread) => Worker {
                stop,
                thread: Some(thread),
            },
            Err(e) => return (Vec::new(), Some(anyhow::Error::new(e).context("a thread"))),
        };
        let result = rx.await;
        drop(worker);
        result.unwrap_or_else(|_| (Vec::new(), Some(anyhow::anyhow!("the bench's thread died"))))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // At most the call under way: every call checks the flag before it starts.
            let _ = thread.join();
        }
    }
}

/// One plugin as the bench invokes it.
struct Side {
    plugin: Plugin,
    binary: PathBuf,
    cni_path: String,
    config: Value,
    /// Where it keeps its allocations, to count what it leaked.
    allocations: Allocations,
    /// How the names of its host-side veths begin, to count those left behind.
    host_veth_prefix: &'static str,
}

enum Allocations {
    /// Trellis's IPAM state (`trellis_cni::ipam::StateFile`, JSON).
    TrellisState(PathBuf),
    /// host-local's directory for the network: one file per address, named by it.
    HostLocalDir(PathBuf),
}

impl Side {
    fn trellis(dir: &Path) -> anyhow::Result<Side> {
        let binary = cni::plugin_path()?;
        let node_file = dir.join("node.json");
        let node = json!({"podCIDRs": [TRELLIS_POD_CIDR], "mtu": 1420});
        std::fs::write(&node_file, serde_json::to_vec(&node)?)
            .with_context(|| format!("writing {}", node_file.display()))?;
        let ipam_file = dir.join("ipam.json");
        let config = json!({
            "cniVersion": "1.1.0",
            "name": "bench",
            "type": cni::PLUGIN,
            "nodeFile": node_file,
            "ipamFile": ipam_file,
            "readyFile": dir.join("ready"),
        });
        let cni_path = binary
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        Ok(Side {
            plugin: Plugin::Trellis,
            binary,
            cni_path,
            config,
            allocations: Allocations::TrellisState(ipam_file),
            host_veth_prefix: "tp",
        })
    }

    fn reference(dir: &Path) -> anyhow::Result<Side> {
        let binary = Path::new(REFERENCE_DIR).join("bridge");
        if !binary.is_file() {
            bail!(
                "{} is missing: install Debian's containernetworking-plugins (or pass --plugins trellis)",
                binary.display()
            );
        }
        let data_dir = dir.join("host-local");
        let config = json!({
            "cniVersion": "1.0.0",
            "name": REFERENCE_NETWORK,
            "type": "bridge",
            "bridge": "cni-bench0",
            "isGateway": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": REFERENCE_POD_CIDR}]],
                "dataDir": data_dir,
            },
        });
        Ok(Side {
            plugin: Plugin::Reference,
            binary,
            cni_path: REFERENCE_DIR.into(),
            config,
            allocations: Allocations::HostLocalDir(data_dir.join(REFERENCE_NETWORK)),
            host_veth_prefix: "veth",
        })
    }

    /// Every address its state holds (an address twice if it is held twice).
    fn allocated(&self) -> anyhow::Result<Vec<IpAddr>> {
        match &self.allocations {
            Allocations::TrellisState(file) => trellis_allocated(file),
            Allocations::HostLocalDir(dir) => host_local_allocated(dir),
        }
    }

    /// CNI 1.1 GC with no valid attachment: everything the plugin still holds is stale.
    fn gc_config(&self) -> Value {
        let mut config = self.config.clone();
        config["cni.dev/valid-attachments"] = json!([]);
        config
    }
}

fn trellis_allocated(file: &Path) -> anyhow::Result<Vec<IpAddr>> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        // No allocation was ever written.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let state: Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", file.display()))?;
    let addresses = state["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    Ok(addresses)
}

/// host-local's files besides its addresses (`lock`, `last_reserved_ip.0`) do not parse as
/// addresses.
fn host_local_allocated(dir: &Path) -> anyhow::Result<Vec<IpAddr>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// The addresses of a successful ADD's result (`ips[].address`, with prefix lengths).
fn result_addresses(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.parse::<ipnet::IpNet>().ok())
        .map(|net| net.addr())
        .collect()
}

/// How many addresses appear more than once.
fn held_twice(addresses: &[IpAddr]) -> usize {
    let mut seen = BTreeMap::<IpAddr, usize>::new();
    for a in addresses {
        *seen.entry(*a).or_default() += 1;
    }
    seen.values().filter(|n| **n > 1).count()
}

/// How many of `after`'s addresses `before` did not hold, counting each holding: an
/// address held once before and twice after counts once.
fn held_since(before: &[IpAddr], after: &[IpAddr]) -> usize {
    let mut held = BTreeMap::<IpAddr, usize>::new();
    for a in before {
        *held.entry(*a).or_default() += 1;
    }
    after
        .iter()
        .filter(|a| match held.get_mut(a) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .count()
}

/// xorshift64*: enough to spread the kills, and a seed replays the choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // The state must never be zero; any seed, zero included, maps to a good one.
        Rng((seed ^ 0x9e37_79b9_7f4a_7c15).max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    fn fraction(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn percent(&mut self, percent: u8) -> bool {
        self.below(100) < usize::from(percent)
    }

    /// A container ID as runtimes make them: 64 hex digits.
    fn container_id(&mut self) -> String {
        (0..4).map(|_| format!("{:016x}", self.next())).collect()
    }
}

/// A pod: its own network namespace and a container ID.
struct Pod {
    id: String,
    netns: String,
    /// `CNI_NETNS`.
    path: String,
}

/// One plugin call, and whether the bench killed it before it exited.
struct Attempt {
    outcome: Outcome,
    killed: bool,
}

impl Attempt {
    fn ms(&self) -> f64 {
        self.outcome.elapsed.as_secs_f64() * 1000.0
    }
}

/// The durations and errors of one plugin's calls of one verb.
#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
}

impl Samples {
    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            let mut text = format!("{e:#}");
            text.truncate(400);
            self.first_error = Some(text);
        }
    }

    /// The median, or `fallback` when nothing was measured.
    fn median(&self, fallback: Duration) -> Duration {
        let mut sorted = self.ms.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            fallback
        } else {
            Duration::from_secs_f64(percentile(&sorted, 0.5) / 1000.0)
        }
    }

    fn row(&self, plugin: Plugin, verb: &str) -> Row {
        let mut sorted = self.ms.clone();
        sorted.sort_by(f64::total_cmp);
        let measured = !sorted.is_empty();
        let at = |p| measured.then(|| microseconds(percentile(&sorted, p)));
        Row {
            plugin,
            verb: verb.into(),
            calls: sorted.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: sorted.last().copied().map(microseconds),
            errors: self.errors,
            first_error: self.first_error.clone(),
            churn: None,
            abandon: None,
        }
    }
}

/// Milliseconds rounded to the microsecond: the clock's noise is larger than that.
fn microseconds(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

/// A plugin's ADD and DEL samples.
#[derive(Default)]
struct Latency {
    add: Samples,
    del: Samples,
}

/// How long a plugin's calls typically take: the churn kills within that span.
#[derive(Clone, Copy)]
struct Typical {
    add: Duration,
    del: Duration,
}

/// Used only if not a single call succeeded: kills then land within the first 20 ms.
const TYPICAL_FALLBACK: Duration = Duration::from_millis(20);

struct Rig {
    name: String,
    /// The node's namespace, where the plugins run.
    node: String,
    sides: Vec<Side>,
    rng: Rng,
    pods_made: usize,
    stop: Arc<AtomicBool>,
}

impl Rig {
    async fn build(args: &CniArgs, seed: u64) -> anyhow::Result<Rig> {
        let dir = state::dir(&args.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut sides = Vec::new();
        for plugin in Plugin::ALL {
            if args.plugins.contains(&plugin) {
                sides.push(match plugin {
                    Plugin::Trellis => Side::trellis(&dir)?,
                    Plugin::Reference => Side::reference(&dir)?,
                });
            }
        }
        if sides.is_empty() {
            bail!("no plugin to measure");
        }
        let node = format!("{}node", crate::spec::netns_prefix(&args.name));
        netns::create(&node)?;
        Netlink::connect_in(&node)?.set_up("lo").await?;
        Ok(Rig {
            name: args.name.clone(),
            node,
            sides,
            rng: Rng::new(seed),
            pods_made: 0,
            stop: Arc::default(),
        })
    }

    fn measure(&mut self, args: &CniArgs, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        let latencies = self.latency(args.iterations)?;
        // Without timed rounds these are the warm-up's: good enough to aim the churn's
        // kills, not to be reported.
        if args.iterations > 0 {
            for (side, latency) in self.sides.iter().zip(&latencies) {
                rows.push(latency.add.row(side.plugin, "ADD"));
                rows.push(latency.del.row(side.plugin, "DEL"));
            }
        }
        for (s, latency) in latencies.iter().enumerate() {
            if args.churn > 0 {
                let typical = Typical {
                    add: latency.add.median(TYPICAL_FALLBACK),
                    del: latency.del.median(TYPICAL_FALLBACK),
                };
                rows.push(self.churn(s, args, typical)?);
            }
            // After the churn's accounting, so that its numbers do not include this phase.
            if args.abandon > 0 {
                rows.push(self.abandon(s, args.abandon)?);
            }
        }
        Ok(())
    }

    fn check_stop(&self) -> anyhow::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            bail!("stopped");
        }
        Ok(())
    }

    fn new_pod(&mut self) -> anyhow::Result<Pod> {
        self.check_stop()?;
        self.pods_made += 1;
        let netns = format!(
            "{}p{}",
            crate::spec::netns_prefix(&self.name),
            self.pods_made
        );
        netns::create(&netns)?;
        Ok(Pod {
            id: self.rng.container_id(),
            path: format!("{}/{netns}", netns::NETNS_RUN_DIR),
            netns,
        })
    }

    fn remove_pod(&self, pod: Pod) -> anyhow::Result<()> {
        netns::delete(&pod.netns)?;
        Ok(())
    }

    /// Calls `side` for `pod` as a runtime does; with `kill_after`, kills it with SIGKILL
    /// at that instant if it is still running.
    fn invoke(
        &self,
        side: &Side,
        command: &str,
        pod: &Pod,
        kill_after: Option<Duration>,
    ) -> anyhow::Result<Attempt> {
        self.check_stop()?;
        let call = Call {
            plugin: &side.binary,
            runtime_netns: &self.node,
            command,
            container_id: &pod.id,
            netns_path: &pod.path,
            ifname: IFNAME,
            cni_path: &side.cni_path,
            args: "",
            config: &side.config,
        };
        let started = Instant::now();
        let mut child = cni::start(&call)?;
        let sent_kill = match kill_after {
            Some(after) => kill_at(&mut child, started + after)?,
            None => false,
        };
        let outcome = cni::finish(child, started, cni::CALL_TIMEOUT)?;
        // A plugin that exited just as the kill went out was not killed.
        let killed = sent_kill && outcome.status.is_none();
        Ok(Attempt { outcome, killed })
    }

    // ---- latency ----

    fn latency(&mut self, iterations: usize) -> anyhow::Result<Vec<Latency>> {
        let sides = self.sides.len();
        let mut timed: Vec<Latency> = (0..sides).map(|_| Latency::default()).collect();
        let mut warmup: Vec<Latency> = (0..sides).map(|_| Latency::default()).collect();
        let rounds = WARMUP_ROUNDS + iterations;
        for round in 0..rounds {
            for k in 0..sides {
                // Swapped every round: A B, B A, ...
                let s = (round + k) % sides;
                let into = if round < WARMUP_ROUNDS {
                    &mut warmup[s]
                } else {
                    &mut timed[s]
                };
                self.add_then_del(s, into)?;
            }
            if (round + 1) % 50 == 0 || round + 1 == rounds {
                eprintln!("cni bench: latency {}/{rounds} rounds", round + 1);
            }
        }
        // Without timed rounds the churn still needs typical durations.
        if iterations == 0 {
            return Ok(warmup);
        }
        Ok(timed)
    }

    /// ADD on a new pod, then DEL; the DEL is timed only after a successful ADD (deleting
    /// nothing is not the same work).
    fn add_then_del(&mut self, s: usize, into: &mut Latency) -> anyhow::Result<()> {
        let pod = self.new_pod()?;
        let side = &self.sides[s];
        let add = self.invoke(side, "ADD", &pod, None)?;
        let added = match add.outcome.result() {
            Ok(_) => {
                into.add.ms.push(add.ms());
                true
            }
            Err(e) => {
                into.add.error(&e.context("ADD"));
                false
            }
        };
        let del = self.invoke(side, "DEL", &pod, None)?;
        match del.outcome.result() {
            Ok(_) if added => into.del.ms.push(del.ms()),
            Ok(_) => {}
            Err(e) => into.del.error(&e.context("DEL")),
        }
        self.remove_pod(pod)
    }

    // ---- churn ----

    fn churn(&mut self, s: usize, args: &CniArgs, typical: Typical) -> anyhow::Result<Row> {
        let plugin = self.sides[s].plugin;
        let mut tally = Tally::default();
        let mut live: Vec<(Pod, Vec<IpAddr>)> = Vec::new();
        for cycle in 0..args.churn {
            if let Some(pod) = self.churn_add(s, args.kill_percent, typical, &live, &mut tally)? {
                live.push(pod);
            }
            if live.len() > CHURN_WINDOW {
                let (pod, _) = live.swap_remove(self.rng.below(live.len()));
                self.churn_del(s, pod, args.kill_percent, typical, &mut tally)?;
            }
            if (cycle + 1) % 100 == 0 {
                eprintln!(
                    "cni bench: churn {}: {}/{} cycles, {} calls killed",
                    plugin.name(),
                    cycle + 1,
                    args.churn,
                    tally.churn.killed
                );
            }
        }
        for (pod, _) in live {
            self.churn_del(s, pod, args.kill_percent, typical, &mut tally)?;
        }
        tally.churn.cycles = args.churn;
        self.account(s, tally)
    }

    /// A kill instant for one call, if this call is to be killed.
    fn lottery(&mut self, percent: u8, typical: Duration) -> Option<Duration> {
        self.rng
            .percent(percent)
            .then(|| typical.mul_f64(self.rng.fraction()))
    }

    /// ADD on a new pod: the pod and its addresses if it succeeded; otherwise the pod is
    /// deleted (as kubelet deletes a sandbox whose network setup failed).
    fn churn_add(
        &mut self,
        s: usize,
        percent: u8,
        typical: Typical,
        live: &[(Pod, Vec<IpAddr>)],
        tally: &mut Tally,
    ) -> anyhow::Result<Option<(Pod, Vec<IpAddr>)>> {
        let pod = self.new_pod()?;
        let kill = self.lottery(percent, typical.add);
        let add = self.invoke(&self.sides[s], "ADD", &pod, kill)?;
        tally.calls += 1;
        let failure = if add.killed {
            tally.churn.killed += 1;
            None
        } else {
            match add.outcome.result() {
                Ok(result) => {
                    let addresses = result_addresses(&result);
                    if !addresses.is_empty() {
                        let held: BTreeSet<IpAddr> =
                            live.iter().flat_map(|(_, a)| a.iter().copied()).collect();
                        tally.churn.duplicates +=
                            addresses.iter().filter(|a| held.contains(a)).count();
                        return Ok(Some((pod, addresses)));
                    }
                    Some(anyhow::anyhow!(
                        "ADD succeeded without an address: {result}"
                    ))
                }
                Err(e) => Some(e.context("ADD")),
            }
        };
        if let Some(e) = failure {
            tally.samples.error(&e);
        }
        self.churn_del(s, pod, percent, typical, tally)?;
        Ok(None)
    }

    /// DEL until it succeeds (the last attempt is not killed), then the pod's namespace
    /// goes; first, whether the DEL left the pod's interface behind.
    fn churn_del(
        &mut self,
        s: usize,
        pod: Pod,
        percent: u8,
        typical: Typical,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        let mut deleted = false;
        for attempt in 1..=DEL_ATTEMPTS {
            let kill = if attempt < DEL_ATTEMPTS {
                self.lottery(percent, typical.del)
            } else {
                None
            };
            let del = self.invoke(&self.sides[s], "DEL", &pod, kill)?;
            tally.calls += 1;
            if del.killed {
                tally.churn.killed += 1;
                continue;
            }
            match del.outcome.result() {
                Ok(_) => {
                    deleted = true;
                    break;
                }
                Err(e) => tally.samples.error(&e.context("DEL")),
            }
        }
        if !deleted {
            tally.churn.undeleted += 1;
        } else if !link_gone_within(&pod.netns, IFNAME, LINK_GONE_WITHIN)? {
            tally.churn.pod_links_left += 1;
        }
        self.remove_pod(pod)
    }

    /// After the churn: GC (Trellis), then what the plugin's state and the node still hold.
    fn account(&self, s: usize, mut tally: Tally) -> anyhow::Result<Row> {
        let side = &self.sides[s];
        let mut allocated = side.allocated()?;
        if side.plugin == Plugin::Trellis {
            tally.churn.leaked_before_gc = Some(allocated.len());
            self.gc(side, &mut tally)?;
            allocated = side.allocated()?;
        }
        tally.churn.leaked = allocated.len();
        tally.churn.duplicates += held_twice(&allocated);
        tally.churn.host_veths_left = self.links_left(side.host_veth_prefix)?;
        Ok(Row {
            plugin: side.plugin,
            verb: "churn".into(),
            calls: tally.calls,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            errors: tally.samples.errors,
            first_error: tally.samples.first_error,
            churn: Some(tally.churn),
            abandon: None,
        })
    }

    fn gc(&self, side: &Side, tally: &mut Tally) -> anyhow::Result<()> {
        self.check_stop()?;
        let config = side.gc_config();
        let call = Call {
            plugin: &side.binary,
            runtime_netns: &self.node,
            command: "GC",
            container_id: "",
            netns_path: "",
            ifname: "",
            cni_path: &side.cni_path,
            args: "",
            config: &config,
        };
        tally.calls += 1;
        if let Err(e) = cni::call(&call)?.result() {
            tally.samples.error(&e.context("GC"));
        }
        Ok(())
    }

    /// The node's links whose names begin with `prefix`, once the kernel has finished
    /// removing those of deleted pod namespaces (or [`LINKS_SETTLE`] has passed).
    fn links_left(&self, prefix: &str) -> anyhow::Result<usize> {
        let deadline = Instant::now() + LINKS_SETTLE;
        loop {
            let left = link_names(&self.node)?
                .iter()
                .filter(|n| n.starts_with(prefix))
                .count();
            if left == 0 || Instant::now() > deadline {
                return Ok(left);
            }
            self.check_stop()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // ---- abandon ----

    /// `k` pods added, then gone without any DEL, as after a node's reboot or a runtime's
    /// crash; then what the plugin's world offers to get their addresses back, and what it
    /// still holds. Its calls and errors are this row's, not the churn's.
    fn abandon(&mut self, s: usize, k: usize) -> anyhow::Result<Row> {
        let plugin = self.sides[s].plugin;
        // What the churn left (the reference's leaks) is the churn's, not this phase's.
        let before = self.sides[s].allocated()?;
        let mut tally = Tally::default();
        let mut abandon = Abandon::default();
        let mut pods = Vec::new();
        let mut handed = Vec::new();
        for _ in 0..k {
            if let Some((pod, addresses)) = self.abandon_add(s, &mut tally)? {
                handed.extend(addresses);
                pods.push(pod);
            }
        }
        abandon.abandoned = pods.len();
        abandon.duplicates_after_abandon = held_twice(&handed);
        // They vanish: their namespaces go, and the kernel removes their veths with them.
        // No plugin is called.
        for pod in pods {
            self.remove_pod(pod)?;
        }
        let side = &self.sides[s];
        let mut allocated = side.allocated()?;
        if plugin == Plugin::Trellis {
            abandon.leaked_after_abandon_before_gc = Some(held_since(&before, &allocated));
            // A runtime back after its crash collects with the attachments it still has:
            // none. After a real reboot even this is not needed: the allocation file is on
            // tmpfs (`/run`, docs/cni.md) and goes with the pods; the bench keeps it on
            // disk and does not simulate that.
            self.gc(side, &mut tally)?;
            allocated = side.allocated()?;
        }
        // The reference gets nothing: host-local has no GC, and the bridge plugin's DEL,
        // the only thing that frees its addresses, is never called for a vanished pod.
        abandon.leaked_after_abandon = held_since(&before, &allocated);
        abandon.duplicates_after_abandon += held_twice(&allocated);
        abandon.host_veths_after_abandon = self.links_left(side.host_veth_prefix)?;
        eprintln!(
            "cni bench: abandon {}: {} pods gone without DEL, {} addresses still allocated",
            plugin.name(),
            abandon.abandoned,
            abandon.leaked_after_abandon
        );
        Ok(Row {
            plugin,
            verb: "abandon".into(),
            calls: tally.calls,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            errors: tally.samples.errors,
            first_error: tally.samples.first_error,
            churn: None,
            abandon: Some(abandon),
        })
    }

    /// ADD on a new pod, never killed: the pod and its addresses if it succeeded. A pod
    /// whose ADD failed is deleted (DEL, then its namespace) and not abandoned: only pods
    /// that hold addresses can leak them.
    fn abandon_add(
        &mut self,
        s: usize,
        tally: &mut Tally,
    ) -> anyhow::Result<Option<(Pod, Vec<IpAddr>)>> {
        let pod = self.new_pod()?;
        let add = self.invoke(&self.sides[s], "ADD", &pod, None)?;
        tally.calls += 1;
        let failure = match add.outcome.result() {
            Ok(result) => {
                let addresses = result_addresses(&result);
                if !addresses.is_empty() {
                    return Ok(Some((pod, addresses)));
                }
                anyhow::anyhow!("ADD succeeded without an address: {result}")
            }
            Err(e) => e.context("ADD"),
        };
        tally.samples.error(&failure);
        let del = self.invoke(&self.sides[s], "DEL", &pod, None)?;
        tally.calls += 1;
        if let Err(e) = del.outcome.result() {
            tally.samples.error(&e.context("DEL"));
        }
        self.remove_pod(pod)?;
        Ok(None)
    }
}

/// A phase's calls and errors; the churn also fills in its [`Churn`] counts.
#[derive(Default)]
struct Tally {
    calls: usize,
    samples: Samples,
    churn: Churn,
}

/// Kills `child` with SIGKILL at `instant` unless it exits first; whether the kill was
/// sent.
fn kill_at(child: &mut Child, instant: Instant) -> anyhow::Result<bool> {
    loop {
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        let now = Instant::now();
        if now >= instant {
            child.kill().context("killing the plugin")?;
            return Ok(true);
        }
        std::thread::sleep((instant - now).min(KILL_POLL));
    }
}

/// The names of the links of a namespace (`if_nameindex` on a thread inside it).
fn link_names(ns: &str) -> anyhow::Result<Vec<String>> {
    let names = netns::run_in(ns, || {
        // SAFETY: if_nameindex returns an array ended by a zeroed entry, or null; it is
        // read before if_freenameindex releases it.
        unsafe {
            let list = libc::if_nameindex();
            if list.is_null() {
                return Err(std::io::Error::last_os_error());
            }
            let mut names = Vec::new();
            let mut entry = list;
            while (*entry).if_index != 0 {
                let name = std::ffi::CStr::from_ptr((*entry).if_name);
                names.push(name.to_string_lossy().into_owned());
                entry = entry.add(1);
            }
            libc::if_freenameindex(list);
            Ok(names)
        }
    })?;
    names.with_context(|| format!("listing the links of {ns}"))
}

fn has_link(ns: &str, name: &str) -> anyhow::Result<bool> {
    Ok(link_names(ns)?.iter().any(|n| n == name))
}

/// How long a pod's interface may outlive its successful DEL before it counts as left.
const LINK_GONE_WITHIN: Duration = Duration::from_millis(500);

/// Whether the link is gone from `ns` within `limit`.
fn link_gone_within(ns: &str, name: &str, limit: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if !has_link(ns, name)? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Trellis over the reference, per verb, when both were measured.
fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let find = |plugin, verb: &str| {
        rows.iter()
            .find(|r| r.plugin == plugin && r.verb == verb)
            .and_then(|r| Some((r.p50_ms?, r.p99_ms?)))
    };
    ["ADD", "DEL"]
        .into_iter()
        .filter_map(|verb| {
            let (t50, t99) = find(Plugin::Trellis, verb)?;
            let (r50, r99) = find(Plugin::Reference, verb)?;
            let (p50, p99) = (hundredths(t50 / r50), hundredths(t99 / r99));
            Some(Ratio {
                verb: verb.into(),
                p50,
                p99,
                goal_met: p50 <= 0.5 && p99 <= 0.5,
            })
        })
        .collect()
}

/// Ratios are printed and compared with two digits.
fn hundredths(ratio: f64) -> f64 {
    (ratio * 100.0).round() / 100.0
}

pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let churn: Vec<&Row> = report.rows.iter().filter(|r| r.churn.is_some()).collect();
    let abandon: Vec<&Row> = report.rows.iter().filter(|r| r.abandon.is_some()).collect();
    let latency: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.churn.is_none() && r.abandon.is_none())
        .collect();
    if !latency.is_empty() {
        let _ = writeln!(
            out,
            "ADD and DEL latency, {} rounds per plugin (spawn to exit):\n\n| plugin | verb | calls | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|---|---|",
            report.iterations
        );
        for r in &latency {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.plugin.description(),
                r.verb,
                r.calls,
                ms(r.p50_ms),
                ms(r.p99_ms),
                ms(r.max_ms),
                r.errors
            );
        }
        out.push('\n');
    }
    for r in &report.ratios {
        let _ = writeln!(
            out,
            "trellis / reference, {}: p50 {:.2}×, p99 {:.2}× (goal ≤ 0.5×: {})",
            r.verb,
            r.p50,
            r.p99,
            if r.goal_met { "met" } else { "not met" }
        );
    }
    if !report.ratios.is_empty() {
        out.push('\n');
    }
    if !churn.is_empty() {
        let _ = writeln!(
            out,
            "Churn: {} ADD/DEL cycles per plugin, {}% of calls killed with SIGKILL, seed {}:\n\n| plugin | calls | killed | errors | undeleted | leaked addresses | duplicates | host veths left | pod links left |\n|---|---|---|---|---|---|---|---|---|",
            report.churn_cycles, report.kill_percent, report.seed
        );
        for r in &churn {
            let Some(c) = &r.churn else { continue };
            let leaked = leaked_cell(c.leaked, c.leaked_before_gc);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {leaked} | {} | {} | {} |",
                r.plugin.description(),
                r.calls,
                c.killed,
                r.errors,
                c.undeleted,
                c.duplicates,
                c.host_veths_left,
                c.pod_links_left
            );
        }
    }
    if !abandon.is_empty() {
        abandon_table(&mut out, report, &abandon, !churn.is_empty());
    }
    // The first error of each row, so a failing plugin says why.
    for r in report.rows.iter().filter(|r| r.first_error.is_some()) {
        let _ = write!(
            out,
            "\n{} {}: first error: {}",
            r.plugin.description(),
            r.verb,
            r.first_error.as_deref().unwrap_or_default()
        );
    }
    if report.rows.iter().any(|r| r.first_error.is_some()) {
        out.push('\n');
    }
    out
}

/// Addresses leaked, and how many were held before GC (`None`: the plugin has no GC).
fn leaked_cell(leaked: usize, before_gc: Option<usize>) -> String {
    match before_gc {
        Some(before) => format!("{leaked} ({before} before GC)"),
        None => format!("{leaked} (no GC)"),
    }
}

/// The abandon phase's rows, after the churn's table if there is one.
fn abandon_table(out: &mut String, report: &Report, rows: &[&Row], after_churn: bool) {
    if after_churn {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Abandon: {} pods per plugin added, then gone without any DEL (their namespaces deleted, as by a reboot or a crashed runtime); then trellis-cni gets a GC naming no attachment, the reference nothing (host-local has no GC):\n\n| plugin | abandoned | calls | errors | leaked addresses | duplicates | host veths left |\n|---|---|---|---|---|---|---|",
        report.abandon_pods
    );
    for r in rows {
        let Some(a) = &r.abandon else { continue };
        let leaked = leaked_cell(a.leaked_after_abandon, a.leaked_after_abandon_before_gc);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {leaked} | {} | {} |",
            r.plugin.description(),
            a.abandoned,
            r.calls,
            r.errors,
            a.duplicates_after_abandon,
            a.host_veths_after_abandon
        );
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_replays_a_seed_and_stays_in_range() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..100).map(|_| rng.below(7)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        assert!(draw(0).iter().all(|n| *n < 7));
        let mut rng = Rng::new(0);
        assert!(
            (0..1000)
                .map(|_| rng.fraction())
                .all(|f| (0.0..1.0).contains(&f))
        );
        let id = rng.container_id();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn addresses_are_read_from_results_and_from_both_states() {
        let result = json!({"ips": [{"address": "10.202.0.5/16", "gateway": "10.202.0.1"},
                                    {"address": "fd00::5/128"}]});
        assert_eq!(
            result_addresses(&result),
            vec![
                "10.202.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(result_addresses(&Value::Null).is_empty());

        let dir = std::env::temp_dir().join(format!("trellis-bench-cni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["lock", "last_reserved_ip.0", "10.202.0.7", "10.202.0.9"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let mut held = host_local_allocated(&dir).unwrap();
        held.sort();
        assert_eq!(
            held,
            vec![
                "10.202.0.7".parse::<IpAddr>().unwrap(),
                "10.202.0.9".parse().unwrap()
            ]
        );
        let state = dir.join("ipam.json");
        std::fs::write(
            &state,
            r#"{"version":1,"attachments":[
                {"container_id":"a","ifname":"eth0","addresses":["10.201.0.2"]},
                {"container_id":"b","ifname":"eth0","addresses":["10.201.0.2","fd00::3"]}],
               "last":[["10.201.0.0/16","10.201.0.2"]]}"#,
        )
        .unwrap();
        let held = trellis_allocated(&state).unwrap();
        assert_eq!(held.len(), 3);
        assert_eq!(held_twice(&held), 1);
        assert!(
            trellis_allocated(&dir.join("none.json"))
                .unwrap()
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn latency_row(plugin: Plugin, verb: &str, p50: f64, p99: f64) -> Row {
        Row {
            plugin,
            verb: verb.into(),
            calls: 10,
            p50_ms: Some(p50),
            p99_ms: Some(p99),
            max_ms: Some(p99),
            errors: 0,
            first_error: None,
            churn: None,
            abandon: None,
        }
    }

    fn abandon_row(plugin: Plugin, leaked: usize, before_gc: Option<usize>) -> Row {
        Row {
            calls: 21,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            abandon: Some(Abandon {
                abandoned: 20,
                leaked_after_abandon: leaked,
                leaked_after_abandon_before_gc: before_gc,
                ..Abandon::default()
            }),
            ..latency_row(plugin, "abandon", 0.0, 0.0)
        }
    }

    #[test]
    fn ratios_and_the_table_compare_trellis_with_the_reference() {
        let churn = Row {
            churn: Some(Churn {
                cycles: 10,
                killed: 3,
                leaked: 0,
                leaked_before_gc: Some(1),
                ..Churn::default()
            }),
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            ..latency_row(Plugin::Trellis, "churn", 0.0, 0.0)
        };
        let rows = vec![
            latency_row(Plugin::Trellis, "ADD", 2.0, 4.0),
            latency_row(Plugin::Trellis, "DEL", 2.0, 30.0),
            latency_row(Plugin::Reference, "ADD", 10.0, 20.0),
            latency_row(Plugin::Reference, "DEL", 20.0, 40.0),
            churn,
            abandon_row(Plugin::Trellis, 0, Some(20)),
            abandon_row(Plugin::Reference, 20, None),
        ];
        let r = ratios(&rows);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].p50, r[0].p99, r[0].goal_met), (0.2, 0.2, true));
        assert_eq!((r[1].p50, r[1].p99, r[1].goal_met), (0.1, 0.75, false));
        let report = Report {
            seed: 7,
            iterations: 10,
            churn_cycles: 10,
            kill_percent: 25,
            abandon_pods: 20,
            rows,
            ratios: r,
        };
        assert!(report.passed());
        let t = table(&report);
        assert!(
            t.contains("| trellis-cni | ADD | 10 | 2.0 | 4.0 | 4.0 | 0 |"),
            "{t}"
        );
        assert!(
            t.contains("trellis / reference, DEL: p50 0.10×, p99 0.75× (goal ≤ 0.5×: not met)"),
            "{t}"
        );
        assert!(
            t.contains("| trellis-cni | 10 | 3 | 0 | 0 | 0 (1 before GC) | 0 | 0 | 0 |"),
            "{t}"
        );
        assert!(
            t.contains("| trellis-cni | 20 | 21 | 0 | 0 (20 before GC) | 0 | 0 |"),
            "{t}"
        );
        assert!(
            t.contains("| reference (bridge + host-local) | 20 | 21 | 0 | 20 (no GC) | 0 | 0 |"),
            "{t}"
        );
        // The latency table shows only latency rows.
        assert!(!t.contains("| abandon |"), "{t}");
        let json = serde_json::to_value(&report).unwrap();
        let churn = &json["rows"][4];
        assert_eq!(churn["verb"], "churn");
        assert_eq!(churn["leaked"], 0);
        assert_eq!(churn["duplicates"], 0);
        assert!(churn["p50_ms"].is_null());
        assert_eq!(json["rows"][0]["plugin"], "trellis");
        assert!(json["rows"][0].get("leaked").is_none());
        let abandon = &json["rows"][6];
        assert_eq!(abandon["verb"], "abandon");
        assert_eq!(abandon["abandoned"], 20);
        assert_eq!(abandon["leaked_after_abandon"], 20);
        assert!(abandon["leaked_after_abandon_before_gc"].is_null());
        assert!(abandon.get("leaked").is_none());
        assert!(churn.get("abandoned").is_none());
        assert_eq!(json["abandon_pods"], 20);

        // What the reference leaks is reported, not judged; Trellis's fails the run.
        let mut leaky = report;
        leaky.rows[5] = abandon_row(Plugin::Trellis, 1, Some(20));
        assert!(!leaky.passed());
    }

    #[test]
    fn only_what_a_phase_added_counts_as_its_leak() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let before = [ip("10.202.0.2"), ip("10.202.0.3")];
        let after = [
            ip("10.202.0.2"),
            ip("10.202.0.3"),
            ip("10.202.0.3"),
            ip("10.202.0.9"),
        ];
        assert_eq!(held_since(&before, &after), 2);
        assert_eq!(held_since(&before, &before[..1]), 0);
        assert_eq!(held_since(&[], &after), 4);
    }

    /// The whole bench against the reference plugin, briefly: the rig comes up, every
    /// verb and kill path runs, and everything is removed. Needs root and Debian's
    /// containernetworking-plugins (scripts/test.sh installs it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_against_the_reference_measures_and_removes_everything() {
        let args = CniArgs {
            name: "tbcni".into(),
            iterations: 3,
            churn: 12,
            kill_percent: 50,
            abandon: 3,
            seed: Some(3),
            plugins: vec![Plugin::Reference],
        };
        let outcome = run(&args).await;
        if let Some(e) = &outcome.stopped {
            panic!("the bench stopped: {e:#}");
        }
        let rows = &outcome.report.rows;
        let find = |verb: &str| rows.iter().find(|r| r.verb == verb).unwrap();
        assert_eq!(find("ADD").calls, 3, "{rows:?}");
        assert_eq!(find("DEL").calls, 3, "{rows:?}");
        let churn = find("churn").churn.as_ref().unwrap();
        assert_eq!(churn.cycles, 12);
        assert_eq!(churn.undeleted, 0, "{rows:?}");
        // host-local keeps the addresses of pods that vanished without a DEL.
        let abandon = find("abandon").abandon.as_ref().unwrap();
        assert_eq!(abandon.abandoned, 3, "{rows:?}");
        assert_eq!(abandon.leaked_after_abandon, 3, "{rows:?}");
        assert!(
            netns::list().iter().all(|n| !n.starts_with("tl-tbcni-")),
            "{:?}",
            netns::list()
        );
        assert!(!state::dir("tbcni").exists());
    }
}
