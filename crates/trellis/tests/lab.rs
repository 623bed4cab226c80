//! End-to-end tests: real labs of network namespaces running the real agent binary.
//! Needs root. Every lab here is named `t…` and removed by a guard, also on failure.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Labs share two cores: one at a time keeps timings honest and failures readable.
static SERIAL: Mutex<()> = Mutex::new(());

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_LOG", "warn")
        .output()
        .expect("running trellis")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// A running lab, removed on drop.
struct Lab {
    name: String,
}

impl Lab {
    fn up(name: &str, extra: &[&str]) -> Lab {
        let _ = trellis(&["lab", "down", "--name", name]);
        let mut args = vec!["lab", "up", "--name", name];
        args.extend_from_slice(extra);
        let out = trellis(&args);
        let lab = Lab {
            name: name.to_string(),
        };
        assert!(
            out.status.success(),
            "lab up {extra:?} failed: {}",
            text(&out)
        );
        lab
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--name", &self.name]);
        trellis(&all)
    }

    fn check(&self) {
        let out = self.run(&["lab", "check"]);
        assert!(
            out.status.success(),
            "lab check of {} failed: {}",
            self.name,
            text(&out)
        );
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.run(&["lab", "status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// The values of the samples of `node`'s metrics whose line starts with `prefix`.
    fn metric(&self, node: &str, prefix: &str) -> Vec<f64> {
        let out = self.run(&["lab", "metrics", node]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    fn netns(&self, node: &str) -> String {
        format!("tl-{}-{node}", self.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test shows what the agents warned about: in CI that is all there is.
        if std::thread::panicking() {
            let logs = format!("/run/trellis/labs/{}/logs", self.name);
            for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in log.lines().filter(|l| !l.contains(" INFO ")) {
                    eprintln!("{}: {line}", entry.file_name().to_string_lossy());
                }
            }
        }
        let out = trellis(&["lab", "down", "--name", &self.name]);
        if !out.status.success() {
            eprintln!("lab down {} failed: {}", self.name, text(&out));
        }
    }
}

fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("tl-{name}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[test]
fn every_granularity_connects_six_nodes_in_two_locations() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for g in ["full", "location", "cross", "hybrid"] {
        let lab = Lab::up(
            "tg6",
            &["--nodes", "6", "--locations", "2", "--granularity", g],
        );
        lab.check();
    }
}

#[test]
fn every_granularity_connects_twelve_nodes_in_three_locations_with_two_gateways() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for g in ["full", "location", "cross", "hybrid"] {
        let lab = Lab::up(
            "tg12",
            &[
                "--nodes",
                "12",
                "--locations",
                "3",
                "--gateways",
                "2",
                "--granularity",
                g,
            ],
        );
        lab.check();
        if g == "location" {
            let status = lab.status_json();
            let gateways = status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["gateway"] == true)
                .count();
            assert_eq!(gateways, 6, "two gateways in each of three locations");
        }
    }
    let lab = Lab::up(
        "tg12",
        &["--nodes", "12", "--locations", "3", "--gateways", "1"],
    );
    lab.check();
}

#[test]
fn status_json_has_the_documented_shape() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tjs", &[]);
    let out = lab.run(&["lab", "host", "add", "probe"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = lab.status_json();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6);
    for n in nodes {
        assert!(n["name"].is_string() && n["location"].is_string() && n["netns"].is_string());
        assert!(n["gateway"].is_boolean());
        assert!(n["agent_pid"].is_number(), "agent running: {n}");
        assert_eq!(n["ready"], true, "data plane applied: {n}");
        let pods = n["pods"].as_array().unwrap();
        assert_eq!(pods.len(), 1);
        assert!(pods[0]["ip"].as_str().unwrap().starts_with("10.244."));
        assert!(pods[0]["netns"].as_str().unwrap().starts_with("tl-tjs-"));
    }
    let a1 = nodes.iter().find(|n| n["name"] == "a1").unwrap();
    assert_eq!(a1["gateway"], true);
    let peers: Vec<&str> = a1["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(peers.contains(&"b1"), "{peers:?}");
    assert_eq!(status["broken_paths"], serde_json::json!([]));
    let hosts = status["hosts"].as_array().unwrap();
    assert_eq!(hosts[0]["name"], "probe");
    assert_eq!(hosts[0]["ip"], "198.18.100.10");
}

#[test]
fn down_removes_everything_even_after_up_crashed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = trellis(&["lab", "down", "--name", "tcr"]);
    let mut up = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "lab",
            "up",
            "--name",
            "tcr",
            "--nodes",
            "12",
            "--locations",
            "3",
        ])
        .spawn()
        .unwrap();
    // Kill it half-way: namespaces exist, some agents may be running.
    wait_until("a few namespaces", Duration::from_secs(20), || {
        lab_namespaces("tcr").len() >= 6
    });
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(!lab_namespaces("tcr").is_empty());
    let out = trellis(&["lab", "down", "--name", "tcr"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab_namespaces("tcr").is_empty(),
        "{:?}",
        lab_namespaces("tcr")
    );
    assert!(!Path::new("/run/trellis/labs/tcr").exists());
    let sockets = sh("ls /var/run/wireguard 2>/dev/null | grep '^tw-tcr-' || true");
    assert!(
        sockets.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&sockets.stdout)
    );
    // (the brackets keep pgrep from matching the shell that runs it)
    let procs = sh("pgrep -f '[s]erve-store --name=tcr|[l]abs/tcr/' || true");
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

#[test]
fn a_route_deleted_by_someone_else_comes_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("trt", &["--agent-resync", "1"]);
    let ns = lab.netns("a3");
    // a3 reaches b1's pods through its gateway a1 (route protocol 116 = trellis)
    let show = format!("ip -n {ns} route show 10.244.3.0/24 proto 116");
    assert!(
        !sh(&show).stdout.is_empty(),
        "route missing before the test"
    );
    let repaired = || {
        lab.metric("a3", "trellis_routes_repaired_total{")
            .iter()
            .sum::<f64>()
    };
    let before = repaired();
    let del = sh(&format!("ip -n {ns} route del 10.244.3.0/24"));
    assert!(del.status.success(), "{}", text(&del));
    // The agent may put it back before a second `ip` runs: its repair counter says it did.
    wait_until("the route to come back", Duration::from_secs(10), || {
        !sh(&show).stdout.is_empty() && repaired() > before
    });
    lab.check();
}

/// Peers are updated one by one: adding a peer must not restart the sessions of others.
#[test]
fn changing_one_peer_keeps_the_other_sessions() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tps", &["--granularity", "full"]);
    lab.check();
    let handshake_of_b1 = |lab: &Lab| -> f64 {
        let status = lab.status_json();
        let a1 = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "a1")
            .unwrap()
            .clone();
        let peer = a1["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "b1")
            .unwrap()
            .clone();
        peer["last_handshake_s"]
            .as_f64()
            .expect("a1 and b1 have a session")
    };
    let before = handshake_of_b1(&lab);
    let out = trellis(&[
        "peer",
        "add",
        "--lab",
        "tps",
        "laptop",
        "--public-key",
        "Hh1YYb9vXE8BYyYEoq9vGk4lUSfnz3zWKM1f/cM1mTM=",
        "--allowed-ips",
        "10.5.0.1/32",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // the new peer reaches a1's device (a1 is public, so it peers with externals)
    wait_until(
        "a1 to have the laptop peer",
        Duration::from_secs(10),
        || {
            lab.status_json()["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| {
                    n["name"] == "a1"
                        && n["peers"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|p| p["name"] == "laptop")
                })
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    lab.check();
    let after = handshake_of_b1(&lab);
    assert!(
        after >= before + 1.5,
        "session with b1 was restarted: handshake age {before} s before, {after} s after"
    );
}

#[test]
fn bad_input_is_named_and_nothing_starts() {
    let out = trellis(&[
        "agent",
        "--node",
        "a1",
        "--location",
        "site-a",
        "--internal-ip",
        "172.20.0.2/24",
        "--overlay-ip",
        "100.64.0.1",
        "--pod-cidr",
        "10.244.1.7/24",
        "--store",
        "unix:/nonexistent.sock",
        "--key-file",
        "/tmp/trellis-test-badinput.key",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pod-cidr") && err.contains("10.244.1.7/24"),
        "{err}"
    );
    let _ = std::fs::remove_file("/tmp/trellis-test-badinput.key");

    let out = trellis(&["lab", "up", "--name", "Bad_Name"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--name \"Bad_Name\""));

    let out = trellis(&["lab", "up", "--name", "tbad", "--granularity", "mesh"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("full, location, cross, hybrid"));
    assert!(lab_namespaces("tbad").is_empty());

    let out = trellis(&["status", "--store", "tcp://1.2.3.4"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store \"tcp://1.2.3.4\""));
}

#[test]
fn two_labs_coexist_and_one_goes_without_the_other() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let first = Lab::up("tco1", &["--nodes", "4"]);
    let second = Lab::up("tco2", &["--nodes", "4", "--granularity", "full"]);
    first.check();
    second.check();
    drop(first);
    assert!(lab_namespaces("tco1").is_empty());
    second.check();
}

/// A real WireGuard peer (Debian's wireguard-go, set up by wg-quick) configured only from
/// `trellis showconf peer` reaches every pod of the mesh.
#[test]
fn wireguard_go_configured_from_showconf_reaches_every_pod() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for granularity in ["location", "full"] {
        let lab = Lab::up("twg", &["--granularity", granularity]);
        let out = lab.run(&["lab", "host", "add", "laptop"]);
        assert!(out.status.success(), "{}", text(&out));
        let private = sh("wg genkey");
        assert!(private.status.success(), "wg genkey: {}", text(&private));
        let private = String::from_utf8(private.stdout)
            .unwrap()
            .trim()
            .to_string();
        let public = sh(&format!("echo {private} | wg pubkey"));
        let public = String::from_utf8(public.stdout).unwrap().trim().to_string();

        let out = trellis(&[
            "peer",
            "add",
            "laptop",
            "--lab",
            "twg",
            "--public-key",
            &public,
            "--allowed-ips",
            "10.5.0.1/32",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let conf = trellis(&["showconf", "peer", "laptop", "--lab", "twg"]);
        assert!(conf.status.success(), "{}", text(&conf));
        let conf = String::from_utf8(conf.stdout).unwrap();
        let placeholder = conf
            .lines()
            .find(|l| l.starts_with("PrivateKey"))
            .expect("a PrivateKey line")
            .to_string();
        let conf = conf.replace(&placeholder, &format!("PrivateKey = {private}"));

        // the file name is the interface name; tw-twg- makes `lab down` remove its socket
        let dir = std::env::temp_dir().join(format!("trellis-wg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tw-twg-lap.conf");
        std::fs::write(&path, &conf).unwrap();
        let up = sh(&format!(
            "ip netns exec tl-twg-h-laptop env WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go WG_SUDO=1 wg-quick up {}",
            path.display()
        ));
        assert!(
            up.status.success(),
            "wg-quick up: {}\nconfig:\n{conf}",
            text(&up)
        );

        let status = lab.status_json();
        for node in status["nodes"].as_array().unwrap() {
            let ip = node["pods"][0]["ip"].as_str().unwrap();
            let ping = sh(&format!(
                "ip netns exec tl-twg-h-laptop ping -c 1 -W 1 {ip} || ip netns exec tl-twg-h-laptop ping -c 3 -W 1 {ip}"
            ));
            assert!(
                ping.status.success(),
                "{granularity}: laptop cannot reach pod {ip} of {}: {}\nconfig:\n{conf}",
                node["name"],
                text(&ping)
            );
        }
        let _ = sh(&format!(
            "ip netns exec tl-twg-h-laptop wg-quick down {}",
            path.display()
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The commands that read cluster state, against a running lab's store, and `wg show`
/// reading the embedded device's control socket.
#[test]
fn state_commands_and_wg_show_read_a_running_lab() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tcli", &[]);
    lab.check();

    wait_until("a leader", Duration::from_secs(15), || {
        let out = trellis(&["status", "--lab", "tcli", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|j| j["leader"]["node"].is_string())
    });
    let out = trellis(&["status", "--lab", "tcli"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert!(table.contains("granularity location"), "{table}");
    assert!(
        table.contains(", leader "),
        "every agent campaigns: {table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains("applied rev")).count(),
        6,
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&trellis(&["status", "--lab", "tcli", "--json"]).stdout).unwrap();
    let mut site_a: Vec<&str> = json["gateways"]["site-a"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    site_a.sort();
    assert_eq!(site_a, ["a1", "a2"], "the public nodes serve: {json}");
    assert!(
        json["leader"]["node"].is_string() && json["leader"]["epoch"].as_u64() > Some(0),
        "{json}"
    );

    let dot = String::from_utf8(trellis(&["graph", "--lab", "tcli"]).stdout).unwrap();
    assert!(
        dot.starts_with("graph trellis {") && dot.contains("\"a1\" -- \"b1\";"),
        "{dot}"
    );

    let conf =
        String::from_utf8(trellis(&["showconf", "node", "a1", "--lab", "tcli"]).stdout).unwrap();
    // b1 (the other gateway) plus the probe peers: observers and observed candidates
    assert!(conf.contains("# node b1\n[Peer]"), "{conf}");
    assert!(conf.contains("Endpoint = 198.18.0.13:51820"), "{conf}");
    assert!(
        conf.contains("AllowedIPs = 100.65."),
        "probe addresses travel between observers and gateways: {conf}"
    );

    // `wg` talks to our device through the standard control socket
    let wg = sh("ip netns exec tl-tcli-a1 wg show tw-tcli-a1");
    let shown = String::from_utf8_lossy(&wg.stdout);
    assert!(wg.status.success(), "{}", text(&wg));
    assert!(
        shown.contains("listening port: 51820") && shown.contains("latest handshake"),
        "{shown}"
    );
    assert!(
        shown.contains("allowed ips: ") && shown.contains("10.244.3.0/24"),
        "{shown}"
    );

    // every agent serves its measurements; an observer has probed and timed its gateways
    // (a first round may go unanswered while a WireGuard handshake is retried)
    wait_until(
        "b3 to have timed an answer from each gateway",
        Duration::from_secs(15),
        || {
            let timed = lab.metric("b3", "trellis_probe_rtt_seconds_count{node=\"b3\"");
            !timed.is_empty() && timed.iter().all(|n| *n > 0.0)
        },
    );
    let out = trellis(&["lab", "metrics", "--name", "tcli", "b3"]);
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    let value = |prefix: &str| -> Vec<f64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect()
    };
    let sent = value("trellis_probes_sent_total{node=\"b3\"");
    let answered = value("trellis_probes_answered_total{node=\"b3\"");
    assert!(
        !sent.is_empty() && sent.iter().all(|n| *n > 0.0),
        "{metrics}"
    );
    assert!(answered.iter().all(|n| *n > 0.0), "{metrics}");
    assert!(
        value("trellis_probe_rtt_seconds_count{node=\"b3\"")
            .iter()
            .all(|n| *n > 0.0),
        "{metrics}"
    );
    assert_eq!(
        value("trellis_gateways_down{node=\"b3\"}"),
        [0.0],
        "{metrics}"
    );
    assert!(metrics.contains("trellis_seconds_since_last_failover{node=\"b3\"} NaN"));
    let bad = trellis(&["lab", "metrics", "--name", "tcli", "zz9"]);
    assert!(
        !bad.status.success() && text(&bad).contains("zz9"),
        "{}",
        text(&bad)
    );

    let key = "Hh1YYb9vXE8BYyYEoq9vGk4lUSfnz3zWKM1f/cM1mTM=";
    let add_phone = |allowed: &str| {
        trellis(&[
            "peer",
            "add",
            "phone",
            "--lab",
            "tcli",
            "--public-key",
            key,
            "--allowed-ips",
            allowed,
        ])
    };
    let add = add_phone("10.244.0.0/16");
    assert!(
        !add.status.success(),
        "a peer overlapping pod CIDRs must be refused"
    );
    assert!(
        String::from_utf8_lossy(&add.stderr).contains("overlap"),
        "{}",
        text(&add)
    );
    let add = add_phone("10.5.0.2/32");
    assert!(add.status.success(), "{}", text(&add));
    let list = String::from_utf8(trellis(&["peer", "list", "--lab", "tcli"]).stdout).unwrap();
    assert!(
        list.starts_with("phone\t") && list.contains("10.5.0.2/32"),
        "{list}"
    );
    assert!(
        trellis(&["peer", "remove", "phone", "--lab", "tcli"])
            .status
            .success()
    );
    assert!(
        trellis(&["peer", "list", "--lab", "tcli"])
            .stdout
            .is_empty()
    );
    let missing = trellis(&["showconf", "peer", "phone", "--lab", "tcli"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no external peer named \"phone\""));
}

/// The data plane never depends on the store being up: with the lab's store killed, every
/// agent keeps running and every pod still reaches every other pod.
#[test]
fn the_mesh_keeps_forwarding_while_the_store_is_down_and_a_restarted_agent_too() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tsd", &["--agent-resync", "1"]);
    let status = lab.status_json();
    let store_pid = status["store"]["pid"].as_i64().expect("store running");
    let agents: Vec<i64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_i64().unwrap())
        .collect();
    assert!(sh(&format!("kill -9 {store_pid}")).status.success());
    // several resync passes and store retries go by
    std::thread::sleep(Duration::from_secs(4));
    lab.check();
    let status = lab.status_json();
    assert!(status["store"]["pid"].is_null(), "store is down");
    assert!(
        status["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("store unreachable")),
        "{status}"
    );
    for pid in agents {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "agent {pid} exited while the store was down"
        );
    }

    // A gateway's agent restarted during the outage (its device goes with it) rebuilds its
    // data plane from the state it cached: the verdicts cannot move its nodes elsewhere
    // while the store is down, so without the cache they would stay cut off.
    for step in [["fault", "a1", "kill"].as_slice(), &["heal", "a1"]] {
        let mut args = vec!["lab"];
        args.extend_from_slice(step);
        let out = lab.run(&args);
        assert!(out.status.success(), "{}", text(&out));
    }
    wait_until(
        "every pod to reach every other through the restarted gateway",
        Duration::from_secs(20),
        || {
            lab.run(&["lab", "check", "--attempts", "1"])
                .status
                .success()
        },
    );
    let log = std::fs::read_to_string("/run/trellis/labs/tsd/logs/a1.log").unwrap();
    assert!(
        log.contains("store unreachable at start: planning from the last known state"),
        "{log}"
    );
}

/// Kilo issue 188: two public nodes whose direct tunnel breaks while both still reach
/// everyone else. Trellis measures the path, relays the pair through a gateway both ends
/// reach, and goes back to the direct tunnel once the path works again.
#[test]
fn a_broken_direct_path_falls_back_through_a_gateway_and_returns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tcut", &["--granularity", "full"]);
    lab.check();
    let gateways = |status: &serde_json::Value| -> Vec<String> {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["gateway"] == true)
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    let gateways_before = gateways(&lab.status_json());
    for (bad, named) in [(Some("a1"), "a1"), (Some("zz9"), "zz9"), (None, "PEER")] {
        let mut args = vec!["lab", "fault", "--name", "tcut", "a1", "cut-path"];
        args.extend(bad);
        let out = trellis(&args);
        assert!(
            !out.status.success() && text(&out).contains(named),
            "{}",
            text(&out)
        );
    }
    let out = trellis(&["lab", "fault", "--name", "tcut", "a1", "cut-path", "b1"]);
    assert!(out.status.success(), "{}", text(&out));
    let reach = |to: &str| {
        sh(&format!("ip netns exec tl-tcut-a1-p0 ping -c 1 -W 1 {to}"))
            .status
            .success()
    };
    let broken = |status: &serde_json::Value| -> Vec<serde_json::Value> {
        status["broken_paths"].as_array().unwrap().clone()
    };
    wait_until(
        "a1 and b1 (and b3 behind b1) to reach each other through a relay",
        Duration::from_secs(10),
        || {
            broken(&lab.status_json()) == [serde_json::json!(["a1", "b1"])]
                && reach("10.244.3.10")
                && reach("10.244.5.10")
        },
    );
    // the direct peer stays, carrying the probe addresses only, so the repair is seen
    let wg = sh("ip netns exec tl-tcut-a1 wg show tw-tcut-a1 allowed-ips");
    let shown = String::from_utf8_lossy(&wg.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.trim_end().ends_with("\t100.65.0.4/32")),
        "a1 keeps b1 as a probe-only peer: {shown}"
    );
    assert_eq!(
        gateways(&lab.status_json()),
        gateways_before,
        "a broken path demotes no gateway"
    );
    lab.check();

    let out = trellis(&["lab", "heal", "--name", "tcut", "a1"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "the direct tunnel to carry a1-b1 traffic again (after the hold-down)",
        Duration::from_secs(20),
        || {
            let wg = sh("ip netns exec tl-tcut-a1 wg show tw-tcut-a1 allowed-ips");
            broken(&lab.status_json()).is_empty()
                && String::from_utf8_lossy(&wg.stdout)
                    .lines()
                    .any(|l| l.contains("10.244.3.0/24") && l.contains("100.65.0.4/32"))
        },
    );
    lab.check();
}

/// The README's first command: seed 000 on a lab, detected, routed around, healed, failed
/// back, summarised, torn down.
#[test]
fn the_demo_replays_seed_000_and_cleans_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = trellis(&["lab", "demo", "--name", "tdemo"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    for step in [
        "blackhole-forward --new-flows-only",
        "majority verdict: ",
        "new connections succeed again",
        "failback: ",
        "SUMMARY",
        "demo passed",
    ] {
        assert!(printed.contains(step), "missing {step:?} in\n{printed}");
    }
    assert!(
        lab_namespaces("tdemo").is_empty(),
        "the demo tore its lab down"
    );
}

/// Seed 001 as a demo, on etcd: the leader stops at its renew deadline while the store is
/// frozen, no agent restarts, every node stays ready, no connection fails, a leader returns.
#[test]
fn the_demo_replays_seed_001_and_cleans_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = trellis(&["lab", "demo", "--seed", "001", "--name", "tdm1"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    for step in [
        "store freeze",
        "stops leader-only work",
        "a leader acts again: ",
        "demo passed",
    ] {
        assert!(printed.contains(step), "missing {step:?} in\n{printed}");
    }
    // the summary's value column, by row label
    let row = |label: &str| -> String {
        let line = printed.lines().find(|l| l.starts_with(label));
        line.map_or(String::new(), |l| l[label.len()..].trim().to_string())
    };
    assert_eq!(
        row("agent processes that exited or restarted"),
        "0",
        "{printed}"
    );
    assert!(
        row("new TCP connections between all pod pairs that failed").starts_with("0 of "),
        "{printed}"
    );
    assert!(
        row("node readiness samples that were not ready").starts_with("0 of "),
        "{printed}"
    );
    assert!(
        lab_namespaces("tdm1").is_empty(),
        "the demo tore its lab down"
    );
}

/// An idle mesh does not write to the store: status reports must not trigger each other.
#[test]
fn an_idle_mesh_leaves_the_store_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tid", &[]);
    let revision = || -> i64 {
        let out = trellis(&["status", "--lab", "tid", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["revision"]
            .as_i64()
            .unwrap()
    };
    // Settled first: start-up writes (pod CIDRs, first observations after a handshake
    // retry) may go on for a few seconds on a slow machine.
    let mut last = (revision(), Instant::now());
    wait_until("the store to settle", Duration::from_secs(20), || {
        let now = revision();
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= Duration::from_secs(1)
    });
    let before = revision();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(revision(), before, "agents kept writing to an idle store");
    drop(lab);
}

/// A gateway whose agent and device die is caught by the forwarding probes of its
/// observers and replaced; the nodes it served are reachable again through the other one.
#[test]
fn a_dead_gateway_is_replaced_by_measured_forwarding() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // One gateway per location: it serves all of its site, so its loss is felt until another
    // takes over. Which node holds a slot depends on the order the agents registered in.
    let lab = Lab::up("tkl", &["--gateways", "1"]);
    lab.check();
    let status = lab.status_json();
    let nodes = status["nodes"].as_array().unwrap().clone();
    let gateway_of = |site: &str| -> serde_json::Value {
        let found: Vec<&serde_json::Value> = nodes
            .iter()
            .filter(|n| n["location"] == site && n["gateway"] == true)
            .collect();
        assert_eq!(found.len(), 1, "one gateway in {site}: {status}");
        found[0].clone()
    };
    let dead = gateway_of("site-a");
    let other_site = gateway_of("site-b")["name"].as_str().unwrap().to_string();
    let dead_name = dead["name"].as_str().unwrap().to_string();
    let pid = dead["agent_pid"].as_i64().unwrap();
    assert!(sh(&format!("kill -9 {pid}")).status.success());
    // the dead gateway's site-mates serve their pods again through a new gateway
    let survivors: Vec<(String, String)> = nodes
        .iter()
        .filter(|n| n["location"] == "site-a" && n["name"] != dead_name.as_str())
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["pods"][0]["ip"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let observer = nodes
        .iter()
        .find(|n| n["location"] == "site-b" && n["name"] != other_site.as_str())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let reach = |from: &str, to: &str| {
        sh(&format!(
            "ip netns exec tl-tkl-{from}-p0 ping -c 1 -W 1 {to}"
        ))
        .status
        .success()
    };
    let started = Instant::now();
    wait_until(
        "the dead gateway's site-mates to be reachable from the other site again",
        Duration::from_secs(10),
        || survivors.iter().all(|(_, ip)| reach(&observer, ip)),
    );
    eprintln!("recovered {:?} after the kill", started.elapsed());
    let status = lab.status_json();
    let gateway = |name: &str| {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()["gateway"]
            .clone()
    };
    assert_eq!(gateway(&dead_name), false);
    assert!(
        survivors.iter().any(|(n, _)| gateway(n) == true),
        "a site-mate took over: {status}"
    );
    assert_eq!(
        gateway(&other_site),
        true,
        "the healthy gateway of the other location stays"
    );
}

/// Inject `fault` into the gateway serving a3 (two gateways per location), then assert
/// that a3's pod is reachable from the other location again within a few seconds and
/// that the healthy gateways kept their role the whole time.
fn fault_is_routed_around(lab_name: &str, fault: &[&str]) {
    let lab = Lab::up(lab_name, &["--gateways", "2"]);
    lab.check();
    let status: serde_json::Value =
        serde_json::from_slice(&trellis(&["status", "--lab", lab_name, "--json"]).stdout).unwrap();
    let node = |name: &str| {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()
            .clone()
    };
    let broken = node("a3")["served_by"]
        .as_str()
        .expect("a3 is served by a gateway")
        .to_string();
    let healthy: Vec<String> = ["a1", "a2", "b1", "b2"]
        .iter()
        .filter(|g| **g != broken)
        .map(|g| g.to_string())
        .collect();
    for g in &healthy {
        assert_eq!(node(g)["gateway"], true, "{g} starts as a gateway");
    }

    let mut args = vec!["lab", "fault", "--name", lab_name, broken.as_str()];
    args.extend_from_slice(fault);
    let out = trellis(&args);
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    let mut demoted = Vec::new();
    let mut recovered = None;
    while started.elapsed() < Duration::from_secs(8) {
        let status = lab.status_json();
        for g in &healthy {
            let n = status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["name"] == g.as_str())
                .unwrap();
            if n["gateway"] != true {
                demoted.push(g.clone());
            }
        }
        if recovered.is_none()
            && sh(&format!(
                "ip netns exec tl-{lab_name}-b2-p0 ping -c 1 -W 1 10.244.2.10"
            ))
            .status
            .success()
            && sh(&format!(
                "ip netns exec tl-{lab_name}-a3-p0 ping -c 1 -W 1 10.244.4.10"
            ))
            .status
            .success()
        {
            recovered = Some(started.elapsed());
        }
        if recovered.is_some() && started.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovered = recovered
        .unwrap_or_else(|| panic!("{fault:?} on {broken}: a3 never became reachable again"));
    eprintln!("{fault:?} on {broken}: traffic recovered within {recovered:?}");
    assert!(
        demoted.is_empty(),
        "{fault:?}: healthy gateways were demoted: {demoted:?}"
    );
    // Under partial loss the pings may get through before a majority of observers has
    // seen three failed rounds in a row: the verdict can trail the recovery a little.
    wait_until(
        &format!("{broken} to be measured down"),
        Duration::from_secs(10),
        || {
            lab.status_json()["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == broken.as_str() && n["forwarding"] == "down")
        },
    );
    // healing brings the gateway back after the hold-down (5 s) into its old slot
    assert!(
        trellis(&["lab", "heal", "--name", lab_name, &broken])
            .status
            .success()
    );
    wait_until(
        "the healed gateway to take its slot back",
        Duration::from_secs(15),
        || {
            let status = lab.status_json();
            let b = status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["name"] == broken.as_str())
                .unwrap()
                .clone();
            b["gateway"] == true && b["forwarding"] == "up"
        },
    );
    lab.check();
}

#[test]
fn blackhole_forward_is_routed_around() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fault_is_routed_around("tfbh", &["blackhole-forward"]);
}

#[test]
fn blackhole_of_new_flows_only_is_routed_around() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fault_is_routed_around("tfnf", &["blackhole-forward", "--new-flows-only"]);
}

#[test]
fn a_killed_gateway_is_routed_around() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fault_is_routed_around("tfkl", &["kill"]);
}

#[test]
fn a_partitioned_gateway_is_routed_around() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fault_is_routed_around("tfpt", &["partition"]);
}

#[test]
fn a_gateway_losing_most_packets_is_routed_around() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    fault_is_routed_around("tfls", &["loss", "60"]);
}

fn leader_of(lab: &Lab) -> Option<(String, u64)> {
    let status = lab.status_json();
    let leader = &status["leader"];
    Some((
        leader["node"].as_str()?.to_string(),
        leader["epoch"].as_u64()?,
    ))
}

fn agent_pids(lab: &Lab) -> Vec<i64> {
    lab.status_json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_i64().expect("agent running"))
        .collect()
}

/// Nodes whose agent does not report its data plane ready on `/readyz`.
fn unready(lab: &Lab) -> Vec<String> {
    lab.status_json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["ready"] != true)
        .map(|n| format!("{}: ready={}", n["name"], n["ready"]))
        .collect()
}

fn leads(lab: &Lab, node: &str) -> bool {
    lab.metric(node, "trellis_leader{") == [1.0]
}

/// Seed 001 on a real etcd: the store frozen for 30 s, killed and restarted, one node
/// partitioned from it, and most of its traffic dropped. No agent exits, every pod keeps
/// reaching every other, the leader stops acting within its renew deadline while the
/// store is silent, and a leader is back soon after the store is.
#[test]
fn store_faults_on_etcd_stop_leader_work_and_nothing_else() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tse", &["--store", "etcd", "--agent-resync", "2"]);
    assert_eq!(lab.status_json()["store"]["kind"], "etcd");
    let agents = agent_pids(&lab);
    let mut leader = None;
    wait_until("a leader", Duration::from_secs(20), || {
        leader = leader_of(&lab);
        leader.is_some()
    });
    let (first, epoch) = leader.unwrap();
    assert!(leads(&lab, &first), "{first} says it leads");

    // Frozen: connections hang, nothing errors.
    let fault = lab.run(&["lab", "fault", "store", "freeze"]);
    assert!(fault.status.success(), "{}", text(&fault));
    let frozen = Instant::now();
    wait_until("the leader to stop acting", Duration::from_secs(9), || {
        !leads(&lab, &first)
    });
    let stopped = frozen.elapsed();
    assert!(
        stopped <= Duration::from_secs(8),
        "stopped after {stopped:?}"
    );
    lab.check();
    std::thread::sleep(Duration::from_secs(30).saturating_sub(frozen.elapsed()));
    lab.check();
    // readiness is the data plane's: neither the store nor leadership takes a node out
    assert_eq!(unready(&lab), Vec::<String>::new(), "frozen store");
    assert!(lab.run(&["lab", "heal", "store"]).status.success());
    let healed = Instant::now();
    let mut next = None;
    wait_until("a leader after the freeze", Duration::from_secs(25), || {
        next = leader_of(&lab);
        next.is_some()
    });
    let (_, next_epoch) = next.unwrap();
    assert!(next_epoch > epoch, "a new term: {next_epoch} > {epoch}");
    eprintln!("leader back {:?} after the heal", healed.elapsed());

    // Killed and restarted on the same data.
    assert!(lab.run(&["lab", "fault", "store", "kill"]).status.success());
    std::thread::sleep(Duration::from_secs(5));
    lab.check();
    assert!(lab.run(&["lab", "heal", "store"]).status.success());
    wait_until(
        "a leader after the restart",
        Duration::from_secs(25),
        || leader_of(&lab).is_some(),
    );

    // One node cut off from the store, then most store traffic dropped for everyone.
    assert!(
        lab.run(&["lab", "fault", "store", "partition", "a1"])
            .status
            .success()
    );
    assert!(
        lab.run(&["lab", "fault", "store", "throttle"])
            .status
            .success()
    );
    assert_eq!(
        lab.status_json()["store"]["faults"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    std::thread::sleep(Duration::from_secs(10));
    lab.check();
    assert_eq!(unready(&lab), Vec::<String>::new(), "partitioned a1");
    assert!(lab.run(&["lab", "heal", "store"]).status.success());
    wait_until(
        "a leader after partition and throttling",
        Duration::from_secs(25),
        || leader_of(&lab).is_some(),
    );
    lab.check();
    assert_eq!(agent_pids(&lab), agents, "no agent exited or restarted");
}

/// A leader paused past its lease (SIGSTOP) loses the election to another node and steps
/// down when it resumes; `etcdctl elect` sees the same leader and can join the race.
#[test]
fn a_paused_leader_is_replaced_and_etcdctl_shares_the_election() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::up("tsp", &["--store", "etcd"]);
    let mut leader = None;
    wait_until("a leader", Duration::from_secs(20), || {
        leader = leader_of(&lab);
        leader.is_some()
    });
    let (paused, epoch) = leader.unwrap();
    let store_ns = format!("tl-{}-store", lab.name);
    let etcdctl = |args: &str| {
        sh(&format!(
            "ip netns exec {store_ns} env ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 {args}"
        ))
    };
    // `elect -l` keeps observing: it prints the leader, then waits for changes.
    let listed = sh(&format!(
        "timeout 3 ip netns exec {store_ns} env ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 elect -l /trellis/election"
    ));
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&paused),
        "etcdctl sees the same leader: {}",
        text(&listed)
    );

    let pid = lab.status_json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == paused.as_str())
        .unwrap()["agent_pid"]
        .as_i64()
        .unwrap();
    assert!(sh(&format!("kill -STOP {pid}")).status.success());
    let mut successor = None;
    wait_until("a successor", Duration::from_secs(25), || {
        successor = leader_of(&lab).filter(|(n, _)| *n != paused);
        successor.is_some()
    });
    let (successor, next_epoch) = successor.unwrap();
    assert!(next_epoch > epoch);
    assert!(sh(&format!("kill -CONT {pid}")).status.success());
    // The resumed leader finds its renew deadline long past: it stops at once.
    wait_until(
        "the paused leader to step down",
        Duration::from_secs(5),
        || !leads(&lab, &paused),
    );
    assert!(leads(&lab, &successor));

    // etcdctl as a competing candidate: it waits behind the Trellis leader.
    let mut rival = Command::new("ip")
        .args([
            "netns",
            "exec",
            &store_ns,
            "etcdctl",
            "--endpoints=http://127.0.0.1:2379",
        ])
        .args(["elect", "/trellis/election", "rival"])
        .env("ETCDCTL_API", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcdctl elect");
    std::thread::sleep(Duration::from_secs(3));
    let keys = etcdctl("get --prefix /trellis/election/");
    let keys = String::from_utf8_lossy(&keys.stdout).into_owned();
    let _ = rival.kill();
    let _ = rival.wait();
    assert!(keys.contains("rival"), "etcdctl's candidate joined: {keys}");
    assert_eq!(
        leader_of(&lab).map(|(n, _)| n),
        Some(successor),
        "the leader held"
    );
    lab.check();
}
