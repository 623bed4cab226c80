//! End-to-end tests: real labs of network namespaces running the real agent binary, one
//! lab per feature, each lab's steps in sequence. What the planner's and the prober's own
//! tests prove (every granularity, every timing case) is not re-proven here. Needs root.
//! Every lab here is named `t…` and removed by a guard, also on failure.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{Lab, lab_namespaces, ok, serial, sh, text, trellis, wait_until};

/// Prints the step a long test is at, so a failure says where it happened.
fn step(name: &str) {
    eprintln!("== {name}");
}

/// The default lab (`location` granularity, two gateways per location), asked everything a
/// user asks of a running lab, then made to repair itself and to lose its store.
#[test]
fn a_running_lab_answers_every_command_and_repairs_itself() {
    let _serial = serial();
    let lab = Lab::up("tcli", &["--agent-resync", "1"]);
    lab.check();
    an_idle_mesh_leaves_the_store_alone(&lab);
    status_json_has_the_documented_shape(&lab);
    state_commands_and_wg_show_read_the_lab(&lab);
    etcdctl_reads_and_watches_the_embedded_store(&lab);
    a_route_deleted_by_someone_else_comes_back(&lab);
    bulk_tcp_between_locations_moves_in_64k_pieces(&lab);
    wireguard_go_configured_from_showconf_reaches_every_pod(&lab);
    pods_come_and_go_through_the_cni_plugin(&lab);
    cni_status_follows_the_agent(&lab);
    the_mesh_keeps_forwarding_while_the_store_is_down(&lab);
}

/// `lab pod add|del`: a pod made through `trellis-cni` joins the mesh; removed, it leaves
/// no link and no allocation behind.
fn pods_come_and_go_through_the_cni_plugin(lab: &Lab) {
    step("lab pod add, lab pod del");
    let added = ok(&["lab", "pod", "add", "a1", "web", "--name", &lab.name]);
    assert!(added.contains("pod web on a1 at 10.244.0."), "{added}");
    let ipam = format!("/run/trellis/labs/{}/nodes/a1/cni/ipam.json", lab.name);
    let held = |id_prefix: &str| {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ipam).unwrap()).unwrap();
        state["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["container_id"].as_str().unwrap().starts_with(id_prefix))
            .count()
    };
    assert_eq!(held("web-"), 1, "the allocation is recorded");
    // The new pod is in the all-pairs check at once (the echo server follows too).
    lab.check();
    let veths = || {
        let out = sh(&format!("ip -n {} -o link show", lab.netns("a1")));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(": tp"))
            .count()
    };
    assert_eq!(veths(), 2, "a1-p0's and web's host ends");
    let out = lab.run(&["lab", "pod", "add", "a1", "web"]);
    assert!(
        !out.status.success() && text(&out).contains("already has a pod named \"web\""),
        "{}",
        text(&out)
    );
    ok(&["lab", "pod", "del", "web", "--name", &lab.name]);
    // DEL leaves the veth's teardown to a detached helper: gone moments later.
    wait_until("web's veth to go", Duration::from_secs(5), || veths() == 1);
    assert_eq!(held("web-"), 0, "web's address is released");
    assert!(
        !lab_namespaces(&lab.name)
            .iter()
            .any(|n| n.ends_with("-web"))
    );
}

/// STATUS answers 0 while the node's agent keeps its data plane, 50 soon after the agent
/// is killed, 0 again once it is back: read from the ready file alone.
fn cni_status_follows_the_agent(lab: &Lab) {
    step("CNI STATUS follows the agent");
    let plugin = std::path::Path::new(env!("CARGO_BIN_EXE_trellis")).with_file_name("trellis-cni");
    let config = format!(
        r#"{{"cniVersion":"1.1.0","name":"t","type":"trellis-cni","nodeFile":"/var/lib/trellis/labs/{0}/a1/cni/node.json","ipamFile":"/run/trellis/labs/{0}/nodes/a1/cni/ipam.json","readyFile":"/run/trellis/labs/{0}/nodes/a1/cni/ready"}}"#,
        lab.name
    );
    let status = || {
        let out = sh(&format!(
            "echo '{config}' | ip netns exec {} env CNI_COMMAND=STATUS {}",
            lab.netns("a1"),
            plugin.display()
        ));
        let answer = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.code(), answer)
    };
    wait_until("STATUS 0 on a ready node", Duration::from_secs(10), || {
        status().0 == Some(0)
    });
    ok(&["lab", "fault", "--name", &lab.name, "a1", "kill"]);
    wait_until(
        "STATUS 50 once the agent is gone",
        Duration::from_secs(10),
        || {
            let (code, answer) = status();
            code == Some(1) && answer.contains("\"code\":50")
        },
    );
    ok(&["lab", "heal", "--name", &lab.name, "a1"]);
    wait_until(
        "STATUS 0 with the agent back",
        Duration::from_secs(20),
        || status().0 == Some(0),
    );
    lab.wait_connected("a1 back in the mesh", Duration::from_secs(20));
}

/// Status reports must not trigger each other: once settled, the store's revision stays.
fn an_idle_mesh_leaves_the_store_alone(lab: &Lab) {
    step("an idle mesh leaves the store alone");
    // Settled first: start-up writes (pod CIDRs, first observations after a handshake
    // retry) may go on for a few seconds on a slow machine.
    let mut last = (lab.revision(), Instant::now());
    wait_until("the store to settle", Duration::from_secs(30), || {
        let now = lab.revision();
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= Duration::from_secs(1)
    });
    let before = lab.revision();
    // agents resync every second here: four passes each, none of which may write
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        lab.revision(),
        before,
        "agents kept writing to an idle store"
    );
}

fn status_json_has_the_documented_shape(lab: &Lab) {
    step("lab status --json");
    ok(&["lab", "host", "add", "laptop", "--name", &lab.name]);
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
        assert!(pods[0]["netns"].as_str().unwrap().starts_with("tl-tcli-"));
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
    assert_eq!(hosts[0]["name"], "laptop");
    assert_eq!(hosts[0]["ip"], "198.18.100.10");
    let store = &status["store"];
    assert_eq!(store["kind"], "embedded");
    assert_eq!(
        store["endpoint"], "unix:///run/trellis/labs/tcli/store.sock",
        "{store}"
    );
    assert!(
        store["etcdctl"].as_str().unwrap().contains("etcdctl"),
        "{store}"
    );
}

/// The commands that read cluster state, against a running lab's store, and `wg show`
/// reading the embedded device's control socket.
fn state_commands_and_wg_show_read_the_lab(lab: &Lab) {
    step("status, graph, showconf, peer, lab metrics, wg show");
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

/// `etcdctl`, etcd's own client, lists and watches the lab's embedded store: it speaks the
/// etcd v3 API on the lab's Unix socket.
fn etcdctl_reads_and_watches_the_embedded_store(lab: &Lab) {
    step("etcdctl against the embedded store");
    let status = lab.status_json();
    let listed = sh(status["store"]["etcdctl"].as_str().unwrap());
    let keys = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(keys.contains("/trellis/nodes/a1"), "{keys}");
    assert!(keys.contains("/trellis/status/b3"), "{keys}");
    // A watch sees a write made through Trellis. (etcdctl reaches a Unix socket only by a
    // name relative to its working directory.)
    let out = std::env::temp_dir().join(format!("trellis-watch-{}", std::process::id()));
    let mut watch = Command::new("etcdctl")
        .current_dir("/run/trellis/labs/tcli")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            "unix://store.sock",
            "watch",
            "--prefix",
            "/trellis/peers/",
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcdctl (apt-get install etcd-client)");
    // the watch is in place once etcdctl holds its connection; a put before that is
    // replayed neither, so retry the write until the watch reports it
    wait_until(
        "etcdctl watch to see a peer written by trellis",
        Duration::from_secs(15),
        || {
            let _ = trellis(&[
                "peer",
                "add",
                "watched",
                "--lab",
                "tcli",
                "--public-key",
                "Hh1YYb9vXE8BYyYEoq9vGk4lUSfnz3zWKM1f/cM1mTM=",
                "--allowed-ips",
                "10.5.0.9/32",
            ]);
            std::fs::read_to_string(&out).is_ok_and(|w| w.contains("/trellis/peers/watched"))
        },
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = std::fs::remove_file(&out);
    ok(&["peer", "remove", "watched", "--lab", "tcli"]);
}

fn a_route_deleted_by_someone_else_comes_back(lab: &Lab) {
    step("a deleted route comes back");
    let ns = lab.netns("a3");
    // a3 reaches b1's pods through its gateway (route protocol 116 = trellis)
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

/// Bulk TCP from a pod in one location to a pod in the other (iperf3) crosses the tunnel
/// between the gateways in whole sends: the sending agent reads 64 KB sends from its TUN
/// device and sends each run of datagrams as one, the receiving agent writes merged packets.
fn bulk_tcp_between_locations_moves_in_64k_pieces(lab: &Lab) {
    step("bulk TCP across locations uses the userspace offloads");
    let b1 = lab.node("b1");
    let b1_pod = b1["pods"][0]["ip"].as_str().expect("b1's pod address");
    let sample = |node: &str, name: &str| -> f64 {
        lab.metric(node, &format!("trellis_userspace_{name}_total{{"))
            .iter()
            .sum()
    };
    let before = (
        sample("a1", "tun_reads_segmented"),
        sample("a1", "udp_sends_segmented"),
        sample("b1", "tun_writes_coalesced"),
    );
    let server = sh(&format!(
        "ip netns exec {}-p0 iperf3 -s -D -1",
        lab.netns("b1")
    ));
    assert!(server.status.success(), "{}", text(&server));
    std::thread::sleep(Duration::from_millis(300));
    let client = sh(&format!(
        "ip netns exec {}-p0 iperf3 -c {b1_pod} -n 16M",
        lab.netns("a1")
    ));
    assert!(
        client.status.success(),
        "iperf3 a1-p0 → b1-p0: {}",
        text(&client)
    );
    let after = (
        sample("a1", "tun_reads_segmented"),
        sample("a1", "udp_sends_segmented"),
        sample("b1", "tun_writes_coalesced"),
    );
    assert!(
        after.0 > before.0,
        "a1 read whole sends: {before:?} → {after:?}"
    );
    assert!(
        after.1 > before.1,
        "a1 sent runs as one: {before:?} → {after:?}"
    );
    assert!(
        after.2 > before.2,
        "b1 wrote merged packets: {before:?} → {after:?}"
    );
    assert_eq!(
        lab.metric("a1", "trellis_userspace_offload_granted{"),
        vec![1.0, 1.0],
        "this kernel grants TSO and USO"
    );
}

/// A real WireGuard peer (Debian's wireguard-go, set up by wg-quick) configured only from
/// `trellis showconf peer` reaches every pod of the mesh; adding it restarts no other
/// session (peers are updated one by one).
fn wireguard_go_configured_from_showconf_reaches_every_pod(lab: &Lab) {
    step("wireguard-go from showconf; other sessions untouched");
    let handshake_age = |a: &str, b: &str| -> f64 {
        let node = lab.node(a);
        let peer = node["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == b)
            .unwrap()
            .clone();
        peer["last_handshake_s"]
            .as_f64()
            .expect("the gateways have a session")
    };
    let before = handshake_age("a1", "b1");
    let private = sh("wg genkey");
    assert!(private.status.success(), "wg genkey: {}", text(&private));
    let private = String::from_utf8(private.stdout)
        .unwrap()
        .trim()
        .to_string();
    let public = sh(&format!("echo {private} | wg pubkey"));
    let public = String::from_utf8(public.stdout).unwrap().trim().to_string();
    ok(&[
        "peer",
        "add",
        "laptop",
        "--lab",
        "tcli",
        "--public-key",
        &public,
        "--allowed-ips",
        "10.5.0.1/32",
    ]);
    let conf = ok(&["showconf", "peer", "laptop", "--lab", "tcli"]);
    let placeholder = conf
        .lines()
        .find(|l| l.starts_with("PrivateKey"))
        .expect("a PrivateKey line")
        .to_string();
    let conf = conf.replace(&placeholder, &format!("PrivateKey = {private}"));
    // the file name is the interface name; tw-tcli- makes `lab down` remove its socket
    let dir = std::env::temp_dir().join(format!("trellis-wg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tw-tcli-lap.conf");
    std::fs::write(&path, &conf).unwrap();
    let up = sh(&format!(
        "ip netns exec tl-tcli-h-laptop env WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go WG_SUDO=1 wg-quick up {}",
        path.display()
    ));
    assert!(
        up.status.success(),
        "wg-quick up: {}\nconfig:\n{conf}",
        text(&up)
    );
    for node in lab.status_json()["nodes"].as_array().unwrap() {
        let ip = node["pods"][0]["ip"].as_str().unwrap();
        let ping = sh(&format!(
            "ip netns exec tl-tcli-h-laptop ping -c 1 -W 1 {ip} || ip netns exec tl-tcli-h-laptop ping -c 3 -W 1 {ip}"
        ));
        assert!(
            ping.status.success(),
            "laptop cannot reach pod {ip} of {}: {}\nconfig:\n{conf}",
            node["name"],
            text(&ping)
        );
    }
    let _ = sh(&format!(
        "ip netns exec tl-tcli-h-laptop wg-quick down {}",
        path.display()
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    let after = handshake_age("a1", "b1");
    assert!(
        after > before,
        "the a1-b1 session was restarted: handshake age {before} s before, {after} s after"
    );
    lab.check();
}

/// The data plane never depends on the store being up: with the lab's store killed, every
/// agent keeps running and every pod still reaches every other; a gateway's agent
/// restarted meanwhile plans from its cached state.
fn the_mesh_keeps_forwarding_while_the_store_is_down(lab: &Lab) {
    step("the store killed");
    let status = lab.status_json();
    let store_pid = status["store"]["pid"].as_i64().expect("store running");
    let agents: Vec<i64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_i64().unwrap())
        .collect();
    assert!(sh(&format!("kill -9 {store_pid}")).status.success());
    wait_until(
        "status to see the store gone",
        Duration::from_secs(10),
        || {
            let status = lab.status_json();
            status["store"]["pid"].is_null()
                && status["warnings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w.as_str().unwrap().contains("store unreachable"))
        },
    );
    // resync passes (every second) and store retries go by
    std::thread::sleep(Duration::from_secs(3));
    lab.check();
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
    lab.wait_connected(
        "every pod to reach every other through the restarted gateway",
        Duration::from_secs(20),
    );
    let log = std::fs::read_to_string("/run/trellis/labs/tcli/logs/a1.log").unwrap();
    assert!(
        log.contains("store unreachable at start: planning from the last known state"),
        "{log}"
    );
}

/// Beyond the default: three locations, `hybrid` (public nodes tunnel directly, private
/// ones through their gateway), two gateways each. Every granularity's plans are proven
/// hop by hop by the planner's property tests; this proves the kernel agrees for one.
#[test]
fn a_hybrid_mesh_of_twelve_nodes_in_three_locations_connects() {
    let _serial = serial();
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
            "hybrid",
        ],
    );
    lab.check();
    let gateways = lab.status_json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["gateway"] == true)
        .count();
    assert_eq!(gateways, 6, "two gateways in each of three locations");
}

/// `--dual-stack`: every node gets an IPv6 pod CIDR beside its IPv4 one and every pod an
/// IPv6 address from the CNI plugin. The mesh carries both families: `lab check` reaches
/// every pair in each, nodes behind a gateway send IPv6 to its link-local stand-in on the
/// internal network (Linux has no IPv6 route to an IPv4 gateway), and an IPv6 Service
/// reaches IPv6 pod endpoints in both locations from pods in both. Every granularity's
/// IPv6 routes are proven hop by hop by the planner's tests; this proves the kernel and
/// the userspace WireGuard device agree for the one with the most hops.
#[test]
fn a_dual_stack_lab_carries_ipv6_between_every_pair_of_pods_and_to_ipv6_services() {
    let _serial = serial();
    let lab = Lab::up("tds", &["--nodes", "5", "--gateways", "1", "--dual-stack"]);
    let out = lab.run(&["lab", "check", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for family in ["ipv4", "ipv6"] {
        assert_eq!(
            report["families"][family],
            serde_json::json!({"pairs": 20, "reachable": 20}),
            "every ordered pair of 5 pods, {family}: {report:#}"
        );
    }
    let matrix = ok(&["lab", "check", "--name", "tds"]);
    assert!(
        matrix.contains("40 of 40 pairs reachable (IPv4 20 of 20, IPv6 20 of 20)"),
        "{matrix}"
    );

    // site-a's nodes that are not its gateway reach site-b through it, IPv6 included
    let status = lab.status_json();
    let nodes = status["nodes"].as_array().unwrap();
    let ip6 = |pod_of: &str| -> String {
        let node = nodes.iter().find(|n| n["name"] == pod_of).unwrap();
        node["pods"][0]["ip6"]
            .as_str()
            .expect("an IPv6 address")
            .to_string()
    };
    let behind: Vec<&str> = nodes
        .iter()
        .filter(|n| n["location"] == "site-a" && n["gateway"] == false)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(behind.len(), 2, "{status:#}");
    for node in &behind {
        let routes = text(&sh(&format!(
            "ip -n {} -6 route show proto 116",
            lab.netns(node)
        )));
        assert!(
            routes.contains("fd00:10:244:3::/64 via fe80::ac14:") && routes.contains("dev int0"),
            "{node} routes site-b's IPv6 pods to its gateway's stand-in: {routes}"
        );
        // iputils' ping as an independent witness
        assert!(
            lab.reach(&format!("{node}-p0"), &ip6("b2")),
            "{node}-p0 pings b2-p0 over IPv6"
        );
    }

    // an IPv6 ClusterIP with endpoints in both locations, from pods in both
    let web6 = add_service(
        &lab,
        "web6",
        &[
            "--port",
            "80",
            "--backends",
            "a1-p0,b2-p0",
            "--ip-families",
            "ipv6",
        ],
    );
    let cluster_ip = web6["cluster_ip"].as_str().unwrap().to_string();
    assert!(cluster_ip.starts_with("fd00:10:96::"), "{web6:#}");
    assert_eq!(web6["backends"][1]["ip"], ip6("b2"), "{web6:#}");
    let target = format!("[{cluster_ip}]:80");
    for from in [behind[0], "b1"] {
        wait_answered_by(
            &lab,
            &format!("{from}-p0"),
            &target,
            &["--count", "20"],
            &["a1-p0", "b2-p0"],
        );
    }
}

/// Every fault kind, each on the gateway that serves a private node (`a4` or `b4`) at the
/// time, on one lab with a standby gateway per location: the private node is reachable
/// from the other location again within seconds, the standby takes exactly the failed
/// gateway's slot, no healthy gateway is demoted, and the healed gateway is measured up
/// again (after the hold-down) and stays a standby: slots are sticky.
#[test]
fn every_gateway_fault_is_routed_around_by_measured_forwarding() {
    let _serial = serial();
    let lab = Lab::up(
        "tflt",
        &["--nodes", "8", "--public", "3", "--gateways", "2"],
    );
    lab.check();
    let faults: [&[&str]; 5] = [
        &["blackhole-forward"],
        &["blackhole-forward", "--new-flows-only"],
        &["kill"],
        &["partition"],
        &["loss", "60"],
    ];
    for (i, fault) in faults.iter().enumerate() {
        // alternate locations, so no gateway is faulted often enough to be damped
        let (private, other_pod) = if i % 2 == 0 {
            ("a4", "b4-p0")
        } else {
            ("b4", "a4-p0")
        };
        one_fault_is_routed_around(&lab, fault, private, other_pod);
    }
}

fn one_fault_is_routed_around(lab: &Lab, fault: &[&str], private: &str, other_pod: &str) {
    step(&format!("{fault:?} on the gateway of {private}"));
    let status = lab.status_json();
    let nodes = status["nodes"].as_array().unwrap().clone();
    let broken = nodes.iter().find(|n| n["name"] == private).unwrap()["served_by"]
        .as_str()
        .expect("the private node is served by a gateway")
        .to_string();
    let healthy: Vec<String> = nodes
        .iter()
        .filter(|n| n["gateway"] == true && n["name"] != broken.as_str())
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(healthy.len(), 3, "{status}");
    let private_ip = nodes.iter().find(|n| n["name"] == private).unwrap()["pods"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let other_ip = nodes
        .iter()
        .find(|n| format!("{}-p0", n["name"].as_str().unwrap()) == other_pod)
        .unwrap()["pods"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();

    let mut args = vec!["lab", "fault", broken.as_str()];
    args.extend_from_slice(fault);
    let out = lab.run(&args);
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
            && lab.reach(other_pod, &private_ip)
            && lab.reach(&format!("{private}-p0"), &other_ip)
        {
            recovered = Some(started.elapsed());
        }
        if recovered.is_some() && started.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovered = recovered
        .unwrap_or_else(|| panic!("{fault:?} on {broken}: {private} never became reachable again"));
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
        || lab.node(&broken)["forwarding"] == "down",
    );
    let standby = lab.node(private)["served_by"].as_str().unwrap().to_string();
    assert!(
        !healthy.contains(&standby) || healthy.len() == 3,
        "{standby}"
    );
    assert_ne!(
        standby, broken,
        "{private} is served by another gateway now"
    );
    assert!(
        trellis(&["lab", "heal", "--name", &lab.name, &broken])
            .status
            .success()
    );
    wait_until(
        "the healed gateway to be measured up again (after the hold-down)",
        Duration::from_secs(20),
        || lab.node(&broken)["forwarding"] == "up",
    );
    lab.check();
}

/// Kilo issue 188: two public nodes whose direct tunnel breaks while both still reach
/// everyone else. Trellis measures the path, relays the pair through a gateway both ends
/// reach, and goes back to the direct tunnel once the path works again.
#[test]
fn a_broken_direct_path_falls_back_through_a_gateway_and_returns() {
    let _serial = serial();
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
                && reach("10.244.3.2")
                && reach("10.244.5.2")
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

/// `lab demo --json`: the demo ran, its step-by-step narrative went to stderr, and stdout
/// holds nothing but the summary as one JSON object, which is returned.
fn demo_summary(lab: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["lab", "demo", "--json", "--name", lab];
    all.extend_from_slice(args);
    let out = trellis(&all);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SUMMARY"),
        "the narrative and its table go to stderr: {printed}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {printed}"));
    eprintln!("{summary:#}");
    assert_eq!(summary["passed"], true, "{printed}");
    assert!(lab_namespaces(lab).is_empty(), "the demo tore its lab down");
    assert!(
        summary["removed_namespaces"].as_u64() > Some(0),
        "it says what it removed: {summary}"
    );
    summary
}

fn ms(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} did not happen: {summary:#}"))
}

/// The README's first command: seed 000 on a lab, detected, routed around, healed, failed
/// back, summarised, torn down.
#[test]
fn the_demo_replays_seed_000_and_cleans_up() {
    let _serial = serial();
    let s = demo_summary("tdemo", &[]);
    assert_eq!(s["seed"], "000");
    assert_eq!(s["fault"], "blackhole-forward --new-flows-only", "{s:#}");
    assert_eq!(s["pairs_ok"], true, "every pod reached every other first");
    // Detected by an observer, then by the majority, and routed around in seconds.
    assert!(s["first_observer"].is_string(), "{s:#}");
    let (verdict, replaced, restored) = (
        ms(&s, "verdict_down_ms"),
        ms(&s, "replaced_ms"),
        ms(&s, "restored_ms"),
    );
    assert!(ms(&s, "first_observer_ms") <= verdict, "{s:#}");
    assert!(
        verdict <= 5_000 && replaced <= 5_000 && restored <= 5_000,
        "{s:#}"
    );
    let replacement = s["replaced_by"].as_str().expect("replaced_by");
    assert_ne!(
        replacement, s["gateway"],
        "replaced by another gateway: {s:#}"
    );
    // New connections fail only while the stream is down: one every 20 ms, with room for
    // the timer catching up after a busy moment.
    let lost = ms(&s, "connections_lost");
    assert!(lost <= ms(&s, "connections_attempted"), "{s:#}");
    assert!(
        lost <= restored / 10 + 20,
        "{lost} lost in {restored} ms: {s:#}"
    );
    // Healed, it takes its share back, not before the hold-down and almost losslessly.
    let failback = ms(&s, "failback_ms");
    assert!(failback >= ms(&s, "hold_down_ms"), "{s:#}");
    // Every observer saw it forward again (sampled apart from the failback: no order).
    ms(&s, "observers_up_ms");
    assert!(
        ms(&s, "connections_lost_after_heal") * 20 <= ms(&s, "connections_attempted_after_heal"),
        "{s:#}"
    );
}

/// Seed 001 as a demo, on etcd: the leader stops at its renew deadline while the store is
/// frozen, no agent restarts, every node stays ready, no connection fails, a leader returns.
#[test]
fn the_demo_replays_seed_001_and_cleans_up() {
    let _serial = serial();
    let s = demo_summary("tdm1", &["--seed", "001"]);
    assert_eq!(s["seed"], "001");
    assert_eq!(s["pairs_ok"], true, "every pod reached every other first");
    assert!(s["leader"].as_str().is_some_and(|l| !l.is_empty()), "{s:#}");
    assert!(
        ms(&s, "stopped_ms") <= ms(&s, "renew_deadline_ms") + 1_000,
        "the leader stopped at its renew deadline: {s:#}"
    );
    assert_eq!(ms(&s, "restarts"), 0, "{s:#}");
    assert!(ms(&s, "readiness_samples") > 0, "{s:#}");
    assert_eq!(ms(&s, "unready_samples"), 0, "{s:#}");
    assert!(ms(&s, "connections_attempted") > 0, "{s:#}");
    assert_eq!(ms(&s, "connections_lost"), 0, "{s:#}");
    ms(&s, "back_ms");
    assert!(s["next_leader"].is_string(), "{s:#}");
    assert!(
        ms(&s, "next_epoch") >= ms(&s, "epoch"),
        "epochs never go back: {s:#}"
    );
}

/// Seed 002 as a demo: a backend pod is deleted under steady connections from both
/// locations and gets no new connection once its endpoint is terminating, none fails; a
/// node's proxy rules tampered with are repaired by its own audit, and no connection fails
/// after that.
#[test]
fn the_demo_replays_seed_002_and_cleans_up() {
    let _serial = serial();
    let s = demo_summary("tdm2", &["--seed", "002"]);
    assert_eq!(s["seed"], "002");
    assert_eq!(s["every_backend_reached"], true, "{s:#}");
    // The proxies take the terminating endpoint out within moments (programming is
    // milliseconds; the bound leaves room for a loaded machine).
    assert!(ms(&s, "stopped_ms") <= 2_000, "{s:#}");
    assert_eq!(ms(&s, "connections_failed_pod_deleted"), 0, "{s:#}");
    // Repaired by the next audit (every 2 s here).
    assert!(ms(&s, "repaired_ms") <= 3 * 2_000 + 1_000, "{s:#}");
    assert!(
        ms(&s, "drift_repaired") >= 3,
        "chain, elements, foreign chain: {s:#}"
    );
    assert!(ms(&s, "connections_attempted_after_repair") > 0, "{s:#}");
    assert_eq!(ms(&s, "connections_failed_after_repair"), 0, "{s:#}");
    assert_eq!(ms(&s, "answered_by_victim_after_repair"), 0, "{s:#}");
}

/// Seed 003: every node reboots at once with the store down. Pods through a chain that
/// needs the API's ClusterIP get nothing until the store is back; pods through
/// `trellis-cni` all get their addresses and reach each other with the store down.
#[test]
fn the_demo_replays_seed_003_and_cleans_up() {
    let _serial = serial();
    let s = demo_summary("tdm3", &["--seed", "003"]);
    assert_eq!(s["seed"], "003");
    assert_eq!(s["pods"], 6, "{s:#}");
    assert_eq!(ms(&s, "gated_addressed_during_outage"), 0, "{s:#}");
    assert!(s["gated_all_addressed_after_store_ms"].is_u64(), "{s:#}");
    assert_eq!(ms(&s, "trellis_addressed"), 6, "{s:#}");
    // Addresses come from the node's own files: within moments of power-on (the bounds
    // leave room for a loaded machine).
    assert!(ms(&s, "trellis_all_addressed_ms") <= 5_000, "{s:#}");
    assert!(ms(&s, "trellis_all_pairs_ms") <= 15_000, "{s:#}");
    assert_eq!(s["store_back"], true, "{s:#}");
}

/// `lab connect FROM TARGET --json ARGS`: who answered how often, and the failures.
fn exchanges(lab: &Lab, from: &str, target: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["lab", "connect", from, target, "--json"];
    all.extend_from_slice(args);
    let out = lab.run(&all);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

/// The pods that answered, and the failures by kind.
fn answered_by(tally: &serde_json::Value) -> (Vec<String>, serde_json::Value) {
    let pods = tally["answers"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    (pods, tally["failures"].clone())
}

/// One Service of `lab service list --json`.
fn lab_service(lab: &Lab, name: &str) -> serde_json::Value {
    let out = lab.run(&["lab", "service", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name}: {all:#}"))
        .clone()
}

/// `lab service add NAME ARGS`; returns the Service as listed.
fn add_service(lab: &Lab, name: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["lab", "service", "add", name];
    all.extend_from_slice(args);
    let out = lab.run(&all);
    assert!(out.status.success(), "service add {name}: {}", text(&out));
    lab_service(lab, name)
}

/// A node's public address, from the lab's state.
fn public_ip(lab: &Lab, node: &str) -> String {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("/run/trellis/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    let node = state["spec"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()
        .clone();
    let ip = node["public_ip"].as_str().expect("a public node");
    ip.split('/').next().unwrap().to_string()
}

/// Waits until `count` exchanges from `from` to `target` are all answered, by exactly the
/// pods `expected`; the proxies program a new Service within moments of its write.
fn wait_answered_by(lab: &Lab, from: &str, target: &str, args: &[&str], expected: &[&str]) {
    let mut last = serde_json::Value::Null;
    let expected: Vec<String> = expected.iter().map(|p| p.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        last = exchanges(lab, from, target, args);
        let (pods, failures) = answered_by(&last);
        if pods == expected && failures.as_object().is_some_and(|f| f.is_empty()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{from} -> {target} {args:?}: expected answers from {expected:?}, last saw {last:#}");
}

/// Services end to end, on one lab of six nodes in two locations whose agents all run the
/// service proxy. Every pod answers TCP and UDP echo with its name, so each client tells
/// which backend it reached. Proven here: a ClusterIP reaches every backend from pods of
/// both locations (TCP and UDP); a NodePort answers a host outside the cluster; ClientIP
/// affinity keeps a client on one backend; the Local external policy answers only from the
/// node's own endpoints and drops on a node without one, the Local internal policy keeps
/// a pod on its own node's endpoints; a Service without endpoints, and a port no Service
/// serves, are refused at once (REJECT: connection refused, not a timeout); tampering with
/// a node's proxy rules from outside is repaired by its audit. The lab's pods are IPv4
/// only, so dual-stack is proven by the planner's tests and `proxy_kernel`, not here.
#[test]
fn services_reach_their_backends_through_every_agents_proxy() {
    let _serial = serial();
    let lab = Lab::up("tsvc", &["--agent-resync", "1"]);
    let all = ["a1-p0", "a2-p0", "b1-p0", "b2-p0"];

    step("bad input is refused, naming the flag and value");
    for (args, says) in [
        (
            &["lab", "service", "add", "bad", "--port", "0"][..],
            "--port 0",
        ),
        (
            &[
                "lab",
                "service",
                "add",
                "bad",
                "--port",
                "80",
                "--target-port",
                "70000",
            ][..],
            "--target-port 70000",
        ),
        (
            &[
                "lab",
                "service",
                "add",
                "bad",
                "--port",
                "80",
                "--backends",
                "a1-p0,zz-p0",
            ][..],
            "--backends \"zz-p0\"",
        ),
    ] {
        let out = lab.run(args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out)
        );
    }

    step("a ClusterIP reaches every backend from pods of both locations, TCP and UDP");
    let web = add_service(&lab, "web", &["--port", "80", "--backends", &all.join(",")]);
    let web_ip = web["cluster_ip"].as_str().unwrap().to_string();
    let web_addr = format!("{web_ip}:80");
    for client in ["a3-p0", "b3-p0"] {
        wait_answered_by(&lab, client, &web_addr, &["--count", "60"], &all);
    }
    let dns = add_service(
        &lab,
        "dns",
        &[
            "--port",
            "53",
            "--protocol",
            "udp",
            "--backends",
            "a1-p0,b2-p0",
        ],
    );
    let dns_addr = format!("{}:53", dns["cluster_ip"].as_str().unwrap());
    for client in ["a3-p0", "b3-p0"] {
        wait_answered_by(
            &lab,
            client,
            &dns_addr,
            &["--protocol", "udp", "--count", "30"],
            &["a1-p0", "b2-p0"],
        );
    }
    let out = lab.state(&["get", "services"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&web_ip),
        "trellis get services lists it: {}",
        text(&out)
    );

    step("a NodePort answers a host outside the cluster, on any node's public address");
    ok(&["lab", "host", "add", "laptop", "--name", &lab.name]);
    let np = add_service(
        &lab,
        "webnp",
        &[
            "--type",
            "NodePort",
            "--port",
            "80",
            "--backends",
            "a1-p0,b1-p0",
        ],
    );
    let node_port = np["node_port"].as_u64().expect("a node port").to_string();
    // a2 has no endpoint of its own: Cluster policy sends to both, masqueraded.
    wait_answered_by(
        &lab,
        "laptop",
        &format!("{}:{node_port}", public_ip(&lab, "a2")),
        &["--count", "30"],
        &["a1-p0", "b1-p0"],
    );

    step("ClientIP affinity keeps each client on one backend");
    let sticky = add_service(
        &lab,
        "sticky",
        &["--port", "80", "--affinity", "--backends", &all.join(",")],
    );
    let sticky_addr = format!("{}:80", sticky["cluster_ip"].as_str().unwrap());
    assert_eq!(sticky["affinity"], true);
    for client in ["a3-p0", "b3-p0"] {
        let mut seen = Vec::new();
        wait_until(
            "the sticky service answers",
            Duration::from_secs(15),
            || {
                let (pods, failures) =
                    answered_by(&exchanges(&lab, client, &sticky_addr, &["--count", "30"]));
                seen = pods;
                failures.as_object().is_some_and(|f| f.is_empty())
            },
        );
        assert_eq!(seen.len(), 1, "{client} stayed on one backend: {seen:?}");
    }

    step("Local external policy: only the node's own endpoints, nothing on a node without one");
    let local = add_service(
        &lab,
        "local",
        &[
            "--type",
            "NodePort",
            "--external-traffic-policy",
            "Local",
            "--port",
            "80",
            "--backends",
            "a1-p0,b1-p0",
        ],
    );
    let local_port = local["node_port"].as_u64().unwrap();
    for (node, pod) in [("a1", "a1-p0"), ("b1", "b1-p0")] {
        let target = format!("{}:{local_port}", public_ip(&lab, node));
        wait_answered_by(&lab, "laptop", &target, &["--count", "20"], &[pod]);
    }
    let dropped = exchanges(
        &lab,
        "laptop",
        &format!("{}:{local_port}", public_ip(&lab, "a2")),
        &["--count", "2", "--timeout-ms", "500"],
    );
    assert_eq!(
        dropped["failures"],
        serde_json::json!({"timeout": 2}),
        "a node without a local endpoint drops: {dropped:#}"
    );
    add_service(
        &lab,
        "inside",
        &[
            "--port",
            "80",
            "--internal-traffic-policy",
            "Local",
            "--backends",
            "a1-p0,b1-p0",
        ],
    );
    let inside = lab_service(&lab, "inside");
    let inside_addr = format!("{}:80", inside["cluster_ip"].as_str().unwrap());
    // From a1's own pod (and so back to itself, masqueraded): a1's endpoint only.
    wait_answered_by(&lab, "a1-p0", &inside_addr, &["--count", "20"], &["a1-p0"]);

    step("no endpoints, or a port no Service serves: refused at once, not a timeout");
    let empty = add_service(&lab, "empty", &["--port", "80"]);
    let empty_addr = format!("{}:80", empty["cluster_ip"].as_str().unwrap());
    // One client per case: the kernel rate-limits the ICMP errors a REJECT sends to one
    // destination (a burst of 6, then one a second), and a SYN whose error was held back
    // is refused only on its retransmission.
    for (what, client, target, args) in [
        (
            "a Service without endpoints",
            "b3-p0",
            empty_addr.as_str(),
            &[][..],
        ),
        (
            "a UDP port of it",
            "a3-p0",
            empty_addr.as_str(),
            &["--protocol", "udp"][..],
        ),
        (
            "an unknown port of a ClusterIP",
            "b2-p0",
            &format!("{web_ip}:81")[..],
            &[][..],
        ),
    ] {
        let mut args = args.to_vec();
        args.extend_from_slice(&["--count", "3", "--timeout-ms", "3000"]);
        let started = Instant::now();
        let tally = exchanges(&lab, client, target, &args);
        let (pods, failures) = answered_by(&tally);
        assert!(pods.is_empty(), "{what}: {tally:#}");
        assert_eq!(
            failures,
            serde_json::json!({"refused": 3}),
            "{what}: {tally:#}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: refused at once, not after a timeout"
        );
    }

    step("tampering with a node's proxy rules is repaired by its audit");
    let tamper = ok(&["lab", "fault", "a3", "proxy-tamper", "--name", &lab.name]);
    assert!(tamper.contains("tamper-dead-pod"), "{tamper}");
    let healed = ok(&["lab", "heal", "a3", "--name", &lab.name]);
    assert!(healed.contains("repaired"), "{healed}");
    assert!(
        lab.metric("a3", "trellis_proxy_drift_repaired_total")
            .iter()
            .sum::<f64>()
            >= 3.0,
        "the chain, the elements and the foreign chain are counted"
    );
    wait_answered_by(&lab, "a3-p0", &web_addr, &["--count", "60"], &all);

    step("a Service removed is gone from the store");
    ok(&["lab", "service", "rm", "web", "--name", &lab.name]);
    let out = lab.state(&["get", "services"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&web_ip),
        "{}",
        text(&out)
    );
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

/// Seed 001 on a real etcd: the store frozen for 15 s (past the 10 s election lease), killed and restarted, one node
/// partitioned from it, and most of its traffic dropped; then a leader paused past its
/// lease is replaced. No agent exits, every pod keeps
/// reaching every other, the leader stops acting within its renew deadline while the
/// store is silent, and a leader is back soon after the store is.
#[test]
fn store_faults_on_etcd_stop_leader_work_and_nothing_else() {
    let _serial = serial();
    let lab = Lab::up("tse", &["--store", "etcd", "--agent-resync", "2"]);
    assert_eq!(lab.status_json()["store"]["kind"], "etcd");
    step("store faults");
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
    std::thread::sleep(Duration::from_secs(15).saturating_sub(frozen.elapsed()));
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
    // Last, as it pauses a node (a gateway, perhaps) and leaves it recovering.
    a_paused_leader_is_replaced_and_etcdctl_shares_the_election(&lab);
}

/// A leader paused past its lease (SIGSTOP) loses the election to another node and steps
/// down when it resumes; `etcdctl elect` sees the same leader and can join the race.
fn a_paused_leader_is_replaced_and_etcdctl_shares_the_election(lab: &Lab) {
    step("a paused leader is replaced; etcdctl elect shares the election");
    let store_ns = format!("tl-{}-store", lab.name);
    let etcdctl = |args: &str| {
        sh(&format!(
            "ip netns exec {store_ns} env ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 {args}"
        ))
    };
    // `elect -l` keeps observing: it prints the leader, then waits for changes. Read it
    // with the agents' own view until both agree: just after the previous scenario's heal
    // the leadership may still move once.
    let observe = || {
        sh(&format!(
            "timeout 3 ip netns exec {store_ns} env ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 elect -l /trellis/election"
        ))
    };
    let mut leader = None;
    let mut listed = observe();
    wait_until(
        "a leader that etcdctl sees too",
        Duration::from_secs(30),
        || {
            leader = leader_of(lab);
            listed = observe();
            leader.as_ref().is_some_and(|(name, _)| {
                String::from_utf8_lossy(&listed.stdout).contains(name.as_str())
            })
        },
    );
    let (paused, epoch) = leader.unwrap();
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
        successor = leader_of(lab).filter(|(n, _)| *n != paused);
        successor.is_some()
    });
    let (successor, next_epoch) = successor.unwrap();
    assert!(next_epoch > epoch);
    assert!(sh(&format!("kill -CONT {pid}")).status.success());
    // The resumed leader finds its renew deadline long past: it stops at once.
    wait_until(
        "the paused leader to step down",
        Duration::from_secs(5),
        || !leads(lab, &paused),
    );
    assert!(leads(lab, &successor));

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
        leader_of(lab).map(|(n, _)| n),
        Some(successor),
        "the leader held"
    );
    lab.check();
}
#[test]
fn down_removes_everything_even_after_up_crashed() {
    let _serial = serial();
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
    let procs =
        sh("pgrep -f '[s]erve-store --name=tcr|[s]erve-pods --name=tcr|[l]abs/tcr/' || true");
    assert!(
        procs.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

#[test]
fn bad_input_is_named_and_nothing_starts() {
    let base = [
        "agent",
        "--node",
        "a1",
        "--location",
        "site-a",
        "--internal-ip",
        "172.20.0.2/24",
        "--overlay-ip",
        "100.64.0.1",
        "--store",
        "unix:/nonexistent.sock",
        "--key-file",
        "/tmp/trellis-test-badinput.key",
    ];
    let refused = |extra: &[&str], says: &[&str]| {
        let out = trellis(&[&base[..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}: {err}");
        for part in says {
            assert!(err.contains(part), "{extra:?}: {part} not named: {err}");
        }
    };
    refused(
        &["--pod-cidr", "10.244.1.7/24"],
        &["--pod-cidr", "10.244.1.7/24"],
    );
    // A location prefix that is the node's own pod CIDR.
    refused(
        &[
            "--pod-cidr",
            "10.244.1.0/24",
            "--location-prefix",
            "10.244.1.0/25",
        ],
        &["--location-prefix", "10.244.1.0/25"],
    );
    let _ = std::fs::remove_file("/tmp/trellis-test-badinput.key");
    // A flag that only Kubernetes can fill in, missing elsewhere.
    let out = trellis(&[&base[..3], &base[5..]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--location is required"),
        "{err}"
    );

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
    let _serial = serial();
    let first = Lab::up("tco1", &["--nodes", "4"]);
    let second = Lab::up("tco2", &["--nodes", "4", "--granularity", "full"]);
    first.check();
    second.check();
    drop(first);
    assert!(lab_namespaces("tco1").is_empty());
    second.check();
}

/// `kubectl` for a lab on Kubernetes, run in the API's namespace (the host's never joins
/// the lab's networks): `$KUBECTL` (Debian's kubernetes-client where another package owns
/// /usr/bin/kubectl), else `kubectl` on the PATH.
fn kubectl(lab: &Lab, args: &str) -> std::process::Output {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    sh(&format!(
        "ip netns exec tl-{}-store {kubectl} -s http://127.0.0.1:6443 {args}",
        lab.name
    ))
}

fn kubectl_ok(lab: &Lab, args: &str) -> String {
    let out = kubectl(lab, args);
    assert!(out.status.success(), "kubectl {args}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab on Trellis's Kubernetes backend, against the API double: the mesh, measured
/// failover and the leadership scenarios pass as on etcd; kubectl lists and describes what
/// the agents keep in the API, and what it applies (a Service and its EndpointSlice, a Kilo
/// Peer) reaches every agent.
#[test]
fn a_lab_on_kubernetes_meshes_fails_over_and_elects_through_the_api() {
    let _serial = serial();
    let lab = Lab::up("tk8s", &["--store", "kubernetes", "--agent-resync", "2"]);
    assert_eq!(lab.status_json()["store"]["kind"], "kubernetes");
    lab.check();
    let agents = agent_pids(&lab);

    step("kubectl reads what the agents keep in the API");
    let nodes = kubectl_ok(&lab, "get nodes -o name");
    assert_eq!(nodes.lines().count(), 6, "{nodes}");
    let described = kubectl_ok(&lab, "describe node a1");
    assert!(
        described.contains("trellis.network/public-key"),
        "{described}"
    );
    let leases = kubectl_ok(&lab, "-n trellis-system get leases");
    for lease in ["leader", "node.a1", "node.b3"] {
        assert!(leases.contains(lease), "{leases}");
    }
    let locations = kubectl_ok(&lab, "get locations");
    assert!(
        locations.contains("ACTIVE") && locations.contains("site-a"),
        "{locations}"
    );

    step("kubectl apply reaches the agents");
    let manifests =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/kubernetes-lab.yaml");
    kubectl_ok(
        &lab,
        &format!("apply --validate=false -f {}", manifests.display()),
    );
    let cluster_ip = kubectl_ok(&lab, "get service echo -o jsonpath={.spec.clusterIP}");
    let target = format!("{}:80", cluster_ip.trim());
    let mut tally = serde_json::Value::Null;
    wait_until("the Service answers", Duration::from_secs(15), || {
        tally = exchanges(&lab, "a1-p0", &target, &[]);
        answered_by(&tally).0 == ["b1-p0"]
    });
    wait_until(
        "the Kilo Peer on a gateway",
        Duration::from_secs(15),
        || {
            lab.node("a1")["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "laptop"))
        },
    );
    assert!(kubectl_ok(&lab, "get peers").contains("laptop"));

    step("a NetworkPolicy applied with kubectl is enforced from the API's Pods");
    let b1_pod = lab.node("b1")["pods"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: serve-only, namespace: default}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 9377}]\n";
    let file = std::env::temp_dir().join("trt-k8s-policy.yaml");
    std::fs::write(&file, policy).unwrap();
    kubectl_ok(
        &lab,
        &format!("apply --validate=false -f {}", file.display()),
    );
    let reaches = |port: u16| {
        let target = format!("{}:{port}", b1_pod.split('/').next().unwrap());
        lab.run(&[
            "lab",
            "connect",
            "a1-p0",
            &target,
            "--count",
            "1",
            "--timeout-ms",
            "500",
        ])
        .status
        .success()
    };
    wait_until("9376 to be refused", Duration::from_secs(15), || {
        !reaches(9376)
    });
    assert!(reaches(9377), "the admitted port");
    kubectl_ok(&lab, &format!("delete -f {}", file.display()));
    std::fs::remove_file(&file).unwrap();
    wait_until("9376 to be open again", Duration::from_secs(15), || {
        reaches(9376)
    });
    for (what, says) in [
        ("describe peer laptop", "10.5.0.1/32"),
        ("describe location site-a", "Opinions"),
        ("-n trellis-system describe lease leader", "Holder Identity"),
        (
            "-n trellis-system describe lease node.a1",
            "trellis.network/status",
        ),
    ] {
        let described = kubectl_ok(&lab, what);
        assert!(described.contains(says), "kubectl {what}: {described}");
    }

    one_fault_is_routed_around(&lab, &["blackhole-forward"], "a3", "b3-p0");
    let failover = kubectl_ok(&lab, "get locations -o json");
    assert!(failover.contains("lastFailover"), "{failover}");

    step("the API frozen: the leader stops acting, the data plane stays");
    let mut leader = None;
    wait_until("a leader", Duration::from_secs(20), || {
        leader = leader_of(&lab).filter(|(n, _)| leads(&lab, n));
        leader.is_some()
    });
    let (first, _) = leader.unwrap();
    let transitions = |lab: &Lab| -> u64 {
        kubectl_ok(
            lab,
            "-n trellis-system get lease leader -o jsonpath={.spec.leaseTransitions}",
        )
        .trim()
        .parse()
        .unwrap_or(0)
    };
    let kept = transitions(&lab);
    assert!(
        lab.run(&["lab", "fault", "store", "freeze"])
            .status
            .success()
    );
    let frozen = Instant::now();
    wait_until("the leader to stop acting", Duration::from_secs(9), || {
        !leads(&lab, &first)
    });
    assert!(
        frozen.elapsed() <= Duration::from_secs(8),
        "{:?}",
        frozen.elapsed()
    );
    std::thread::sleep(Duration::from_secs(15).saturating_sub(frozen.elapsed()));
    lab.check();
    assert_eq!(unready(&lab), Vec::<String>::new(), "frozen API");
    assert!(lab.run(&["lab", "heal", "store"]).status.success());
    let mut back = None;
    wait_until("a leader after the freeze", Duration::from_secs(25), || {
        back = leader_of(&lab).filter(|(n, _)| leads(&lab, n));
        back.is_some()
    });
    // Nobody could see the Lease expire while nobody could see it renewed: the leader
    // resumes the Lease it kept, as a session etcd kept through an outage.
    assert_eq!(back.as_ref().map(|(n, _)| n.as_str()), Some(first.as_str()));
    assert_eq!(transitions(&lab), kept, "the same term's Lease, resumed");

    step("a paused leader is replaced and steps down when it resumes");
    let (paused, _) = back.unwrap();
    let before = transitions(&lab);
    let pid = lab.node(&paused)["agent_pid"].as_i64().unwrap();
    assert!(sh(&format!("kill -STOP {pid}")).status.success());
    let mut successor = None;
    wait_until("a successor", Duration::from_secs(25), || {
        successor = leader_of(&lab)
            .filter(|(n, _)| *n != paused)
            .map(|(n, _)| n);
        successor.is_some()
    });
    assert!(sh(&format!("kill -CONT {pid}")).status.success());
    wait_until(
        "the paused leader to step down",
        Duration::from_secs(5),
        || !leads(&lab, &paused),
    );
    let successor = successor.unwrap();
    wait_until("the successor leads", Duration::from_secs(10), || {
        leads(&lab, &successor)
    });
    assert!(transitions(&lab) > before, "the Lease changed hands");
    lab.check();
    assert_eq!(agent_pids(&lab), agents, "no agent exited or restarted");
}

/// `lab pod add NODE POD --namespace NS ARGS...`; the pod's IPv4 address.
fn add_policy_pod(lab: &Lab, node: &str, pod: &str, namespace: &str, args: &[&str]) -> String {
    let mut all = vec!["lab", "pod", "add", node, pod, "--namespace", namespace];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--name", &lab.name]);
    let added = ok(&all);
    let ip = added.split(" at ").nth(1).and_then(|r| r.split('/').next());
    ip.unwrap_or_else(|| panic!("no address in {added:?}"))
        .to_string()
}

/// Whether each ordered pair of `pods` (name, address) connects on each of `ports`, every
/// probe at once (a dropped one costs its timeout, not the matrix's sum).
fn observed_matrix<'a>(
    lab: &Lab,
    pods: &'a [(&'a str, String)],
    ports: &[u16],
) -> std::collections::BTreeMap<(&'a str, &'a str, u16), bool> {
    std::thread::scope(|s| {
        let mut probes = Vec::new();
        for (from, _) in pods {
            for (to, ip) in pods.iter().filter(|p| p.0 != *from) {
                for &port in ports {
                    let target = format!("{ip}:{port}");
                    let probe = s.spawn(move || {
                        let args = [
                            "lab",
                            "connect",
                            from,
                            &target,
                            "--count",
                            "1",
                            "--timeout-ms",
                            "500",
                        ];
                        lab.run(&args).status.success()
                    });
                    probes.push(((*from, *to, port), probe));
                }
            }
        }
        (probes.into_iter())
            .map(|(pair, probe)| (pair, probe.join().unwrap()))
            .collect()
    })
}

/// Waits (20 s at most) until the observed matrix is the one `allowed` says.
fn wait_matrix(
    lab: &Lab,
    what: &str,
    pods: &[(&str, String)],
    ports: &[u16],
    allowed: &dyn Fn(&str, &str, u16) -> bool,
) {
    step(what);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let wrong: Vec<String> = observed_matrix(lab, pods, ports)
            .into_iter()
            .filter(|((from, to, port), got)| *got != allowed(from, to, *port))
            .map(|((from, to, port), got)| format!("{from}->{to}:{port} {got}"))
            .collect();
        if wrong.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: observed differs: {wrong:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// NetworkPolicy across locations: pods made through the CNI plugin with a namespace and
/// labels, a policy applied with `trellis apply`, and every ordered pair of those pods
/// probed on the echo port against the expected matrix — before the policy, under it,
/// after a pod is relabelled and after the policy is deleted.
#[test]
fn network_policy_is_enforced_across_locations_from_the_pods_cni_attachments() {
    let _serial = serial();
    let lab = Lab::up("tpol", &["--agent-resync", "1"]);
    let mut pods: Vec<(&str, String)> = Vec::new();
    for (node, pod, labels) in [
        ("a1", "web", "app=web"),
        ("a2", "other", "app=other"),
        ("b1", "db", "app=db"),
    ] {
        pods.push((
            pod,
            add_policy_pod(&lab, node, pod, "shop", &["--labels", labels]),
        ));
    }
    let ip = |pod: &str| pods.iter().find(|p| p.0 == pod).unwrap().1.clone();
    let matrix = |what: &str, allowed: &dyn Fn(&str, &str, u16) -> bool| {
        wait_matrix(&lab, what, &pods, &[9376], allowed)
    };
    matrix("no policy: every pair", &|_, _, _| true);

    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: shop, name: db-from-web}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 9376}]
"#;
    let file = std::env::temp_dir().join("trt-policy-db-from-web.yaml");
    std::fs::write(&file, policy).unwrap();
    let applied = lab.state(&["apply", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(applied.status.success(), "{}", text(&applied));
    let isolated = |from: &str, to: &str, _| (from, to) != ("other", "db");
    matrix("db admits web only (across locations)", &isolated);
    // Drops are read from the kernel's counters at each audit (every second here).
    wait_until(
        "other's drops to be counted",
        Duration::from_secs(10),
        || {
            let dropped = lab.metric(
            "b1",
            "trellis_policy_dropped_packets_total{node=\"b1\",policy=\"shop/db-from-web\",direction=\"ingress\"}",
        );
            dropped.iter().sum::<f64>() > 0.0
        },
    );

    step("policy-tamper: a deny removed and a stale allow added from outside, repaired");
    let drift = |lab: &Lab| -> f64 {
        lab.metric("b1", "trellis_policy_drift_repaired_total")
            .iter()
            .sum()
    };
    let before = drift(&lab);
    let tampered = ok(&["lab", "fault", "b1", "policy-tamper", "--name", &lab.name]);
    assert!(
        tampered.contains("a deny gone") && tampered.contains("a stale allow"),
        "{tampered}"
    );
    wait_until("the audit to repair both", Duration::from_secs(10), || {
        drift(&lab) >= before + 2.0
    });
    matrix("repaired: db admits web only again", &isolated);
    let healed = ok(&["lab", "heal", "b1", "--name", &lab.name]);
    assert!(healed.contains("nothing to undo"), "{healed}");

    step("a pod's labels come from its attachment: a new pod labelled web is admitted");
    let web2 = add_policy_pod(&lab, "a2", "web2", "shop", &["--labels", "app=web"]);
    // ADD returned once a2's agent had the pod's rules in place: its first connection
    // (to a pod of its own node, which no remote set needs to know) gets through.
    let other = format!("{}:9376", ip("other"));
    let first = lab.run(&["lab", "connect", "web2", &other, "--count", "1"]);
    assert!(
        first.status.success(),
        "web2's first connection: {}",
        text(&first)
    );
    // An address a pod was not given gets nowhere: the guard on pod interfaces counts it.
    let pod_ns = format!("tl-{}-a2-web2", lab.name);
    sh(&format!(
        "ip -n {pod_ns} address add 10.244.1.250/32 dev eth0"
    ));
    let spoofed = sh(&format!(
        "ip netns exec {pod_ns} ping -c 1 -W 1 -I 10.244.1.250 {}",
        ip("other")
    ));
    assert!(!spoofed.status.success(), "a spoofed source is dropped");
    let forward = text(&sh(&format!(
        "ip netns exec {} nft list chain ip trellis-policy forward",
        lab.netns("a2")
    )));
    assert!(
        forward
            .lines()
            .any(|l| l.contains("not a programmed pod") && !l.contains("packets 0 ")),
        "{forward}"
    );
    assert_ne!(web2, "10.244.1.250");
    wait_until("web2 to reach db", Duration::from_secs(20), || {
        let target = format!("{}:9376", ip("db"));
        lab.run(&["lab", "connect", "web2", &target, "--count", "1"])
            .status
            .success()
    });
    ok(&["lab", "pod", "del", "web2", "--name", &lab.name]);

    let deleted = lab.state(&[
        "delete",
        "networkpolicy",
        "db-from-web",
        "--namespace",
        "shop",
    ]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    matrix("policy deleted: every pair again", &|_, _, _| true);
}

/// NetworkPolicy in the style of the upstream conformance matrix: pods in three namespaces
/// and both locations (one behind a gateway), every ordered pair × two ports probed at once,
/// the observed matrix compared with the expected one — default deny, namespace isolation,
/// a peer with both selectors, ipBlock with except, egress, and named ports both ways.
#[test]
fn network_policy_conformance_matrix_across_namespaces_and_locations() {
    let _serial = serial();
    let lab = Lab::up("tnpm", &["--agent-resync", "1"]);
    // (pod, namespace, node, label pod=)
    let pods = [
        ("xa", "x", "a1", "a"),
        ("xb", "x", "b1", "b"),
        ("ya", "y", "a2", "a"),
        ("yb", "y", "b3", "b"),
        ("za", "z", "a3", "a"),
    ];
    let mut addressed: Vec<(&str, String)> = Vec::new();
    for (pod, ns, node, label) in pods {
        let args = [
            "--labels",
            &format!("pod={label}"),
            "--port",
            "echo=9376",
            "--port",
            "serve=9377",
        ];
        addressed.push((pod, add_policy_pod(&lab, node, pod, ns, &args)));
    }
    let ns_of = |pod: &str| pods.iter().find(|p| p.0 == pod).unwrap().1;
    let ya = addressed.iter().find(|p| p.0 == "ya").unwrap().1.clone();
    // A Namespace object with its own labels, applied with the policy (and deleted with it).
    let labelled_y =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {team: blue}}\n---\n";
    let expect = |what: &str, policy: &str, allowed: &dyn Fn(&str, &str, u16) -> bool| {
        let file = std::env::temp_dir().join("trt-conformance-policy.yaml");
        if !policy.is_empty() {
            std::fs::write(&file, policy).unwrap();
            let applied = lab.state(&["apply", "-f", file.to_str().unwrap()]);
            assert!(applied.status.success(), "{what}: {}", text(&applied));
        }
        wait_matrix(&lab, what, &addressed, &[9376, 9377], allowed);
        if !policy.is_empty() {
            let deleted = lab.state(&["delete", "-f", file.to_str().unwrap()]);
            assert!(deleted.status.success(), "{what}: {}", text(&deleted));
            std::fs::remove_file(&file).unwrap();
        }
    };
    let policy = |ns: &str, spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{namespace: {ns}, name: case}}\nspec:\n{spec}"
        )
    };

    expect("no policy: everything", "", &|_, _, _| true);
    expect(
        "default deny ingress in x",
        &policy("x", "  podSelector: {}\n  policyTypes: [Ingress]\n"),
        &|_, to, _| ns_of(to) != "x",
    );
    expect(
        "namespace isolation: x admits x only",
        &policy(
            "x",
            "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]\n",
        ),
        &|from, to, _| ns_of(to) != "x" || ns_of(from) == "x",
    );
    expect(
        "both selectors in one peer: x admits pod=b of namespace y",
        &policy(
            "x",
            "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: b}}}]\n",
        ),
        &|from, to, _| ns_of(to) != "x" || from == "yb",
    );
    expect(
        "a namespace's own labels: x admits namespaces labelled team=blue (y)",
        &format!(
            "{labelled_y}{}",
            policy(
                "x",
                "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]\n",
            )
        ),
        &|from, to, _| ns_of(to) != "x" || ns_of(from) == "y",
    );
    expect(
        "ipBlock with except: x admits the pod network but ya",
        &policy(
            "x",
            &format!(
                "  podSelector: {{}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{ya}/32]}}}}]\n"
            ),
        ),
        &|from, to, _| ns_of(to) != "x" || from != "ya",
    );
    expect(
        "egress: y sends to 9377 only",
        &policy(
            "y",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: 9377}]\n",
        ),
        &|from, _, port| ns_of(from) != "y" || port == 9377,
    );
    expect(
        "named port, ingress: x admits its port 'serve' only",
        &policy(
            "x",
            "  podSelector: {}\n  ingress:\n  - ports: [{port: serve}]\n",
        ),
        &|_, to, port| ns_of(to) != "x" || port == 9377,
    );
    expect(
        "named port, egress: z sends to its destinations' port 'echo' only",
        &policy(
            "z",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: echo}]\n",
        ),
        &|from, _, port| ns_of(from) != "z" || port == 9376,
    );
}
