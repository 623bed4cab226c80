//! The service proxy against a real kernel: three namespaces, A — R — B, the proxy
//! programming R, a TCP server in B behind a ClusterIP and a NodePort, a client in A. What
//! the proxy wrote is read back with `nft` as an independent witness, tampered with from
//! outside, and must be repaired by the audit.

use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_agent::admin::Metrics;
use trellis_agent::proxy::run::{ProxyConfig, ProxyKernel, run};
use trellis_agent::state::ClusterState;
use trellis_dataplane::conntrack::Conntrack;
use trellis_dataplane::netns;
use trellis_dataplane::nftables::Nft;
use trellis_store::Store;
use trellis_store::embedded::EmbeddedStore;
use trellis_testkit::netns::Routed;
use trellis_testkit::nft::nft;
use trellis_testkit::wait_for;

fn serve_in(ns: &str, addr: &'static str, answer: &'static str) {
    trellis_testkit::tcp::serve(ns, addr, answer);
}

fn connect(ns: &str, to: &str) -> Result<String, String> {
    trellis_testkit::tcp::exchange(ns, to, Duration::from_millis(500))
}

async fn put(store: &EmbeddedStore, key: &str, value: serde_json::Value) {
    trellis_testkit::tcp::put_json(store, key, value).await;
}

fn service(node_port: bool) -> serde_json::Value {
    let mut spec = json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    if node_port {
        spec["type"] = json!("NodePort");
        spec["ports"][0]["nodePort"] = json!(30080);
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "shop"}, "spec": spec})
}

fn slice(addresses: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "nodeName": "other"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-1", "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": endpoints})
}

fn second_slice() -> serde_json::Value {
    let mut slice = slice(&[Routed::B]);
    slice["metadata"]["name"] = json!("web-2");
    slice["ports"][0]["port"] = json!(8081);
    slice
}

/// The proxy programming namespace `r` from `store`, auditing every 500 ms; with
/// `conntrack`, it sweeps stale entries; NodePorts answer on `node_port_address`.
fn start_proxy(
    store: &Arc<EmbeddedStore>,
    r: &str,
    conntrack: bool,
    node_port_address: Option<&str>,
) -> (tokio::task::JoinHandle<()>, Metrics) {
    let kernel = Arc::new(ProxyKernel {
        nft: Nft::connect_in(r).unwrap(),
        conntrack: conntrack.then(|| Conntrack::connect_in(r).unwrap()),
    });
    let metrics = Metrics::new("r");
    let (_state_tx, state_rx) = watch::channel(Arc::new(ClusterState::default()));
    let proxy = tokio::spawn(run(
        store.clone() as Arc<dyn Store>,
        kernel,
        ProxyConfig {
            node: "r".into(),
            node_port_addresses: node_port_address
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            audit_interval: Duration::from_millis(500),
            stale_after: Duration::from_secs(30),
        },
        state_rx,
        metrics.proxy(),
    ));
    (proxy, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_programmed_repaired_after_tampering_and_refused_without_endpoints() {
    let net = Routed::new("proxy");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    // A node has a default route: without one, a packet to an unknown ClusterIP port is
    // dropped by routing before the filter that rejects it.
    trellis_testkit::netns::ip(&["-n", &r, "route", "add", "default", "dev", "r1"]);
    serve_in(&b, "10.91.2.2:8080", "b");
    serve_in(&b, "10.91.2.2:8081", "b2");
    let store = EmbeddedStore::new();
    put(&store, "services/shop/web", service(true)).await;
    put(&store, "endpointslices/shop/web-1", slice(&[Routed::B])).await;

    let (proxy, metrics) = start_proxy(&store, &r, true, Some(Routed::R_A));

    let reach = |to: &'static str| {
        let a = a.clone();
        move || {
            let a = a.clone();
            async move { (connect(&a, to) == Ok("b".into())).then_some(()) }
        }
    };
    wait_for(
        "the ClusterIP to lead to B",
        Duration::from_secs(10),
        reach("10.96.0.10:80"),
    )
    .await;
    wait_for(
        "the NodePort to lead to B",
        Duration::from_secs(5),
        reach("10.91.1.1:30080"),
    )
    .await;
    assert!(
        metrics
            .proxy()
            .last_sync
            .judge(std::time::Instant::now())
            .is_ok(),
        "/healthz/proxy: synced"
    );
    let rendered = metrics.render(std::time::Instant::now());
    assert!(
        rendered.contains("trellis_proxy_failures_total{node=\"r\"} 0"),
        "the kernel took every change the first time: {rendered}"
    );
    assert_eq!(
        connect(&a, "10.96.0.10:81"),
        Err("connection refused".into()),
        "an unknown port of a ClusterIP is rejected"
    );

    // A second endpoint (another port of B, through a second slice): new connections
    // spread over both.
    put(&store, "endpointslices/shop/web-2", second_slice()).await;
    wait_for(
        "connections to reach both endpoints",
        Duration::from_secs(10),
        || {
            let a = a.clone();
            async move {
                let answers: std::collections::BTreeSet<_> = (0..40)
                    .filter_map(|_| connect(&a, "10.96.0.10:80").ok())
                    .collect();
                (answers == ["b".to_string(), "b2".to_string()].into()).then_some(())
            }
        },
    )
    .await;
    store.delete("endpointslices/shop/web-2").await.unwrap();

    // `nft`, reading independently, sees the service in the map, its endpoint, and the
    // shape chain that picks it.
    let listed = nft(&r, &["list", "table", "ip", "trellis-proxy"]);
    assert!(
        listed.contains("10.96.0.10 . tcp . 80 : goto shape-clusterip-cluster-1"),
        "{listed}"
    );
    assert!(
        listed.contains("10.96.0.10 . tcp . 80 . 0x00000000 : 10.91.2.2 . 8080"),
        "{listed}"
    );
    assert!(
        listed.contains(
            "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @cluster-endpoints"
        ),
        "{listed}"
    );

    // Tampering from outside, once an audit has found the tables verified (and so would
    // read nothing unless it notices someone else's commit): the shape chain flushed
    // and the map entry deleted.
    wait_for(
        "an audit with nothing to read",
        Duration::from_secs(10),
        || {
            let rendered = metrics.render(std::time::Instant::now());
            async move {
                (!rendered.contains("trellis_proxy_audits_unchanged_total{node=\"r\"} 0"))
                    .then_some(())
            }
        },
    )
    .await;
    nft(
        &r,
        &[
            "flush",
            "chain",
            "ip",
            "trellis-proxy",
            "shape-clusterip-cluster-1",
        ],
    );
    nft(
        &r,
        &[
            "delete",
            "element",
            "ip",
            "trellis-proxy",
            "service-ips",
            "{ 10.96.0.10 . tcp . 80 }",
        ],
    );
    assert!(
        connect(&a, "10.96.0.10:80").is_err(),
        "the tampering broke the service"
    );
    wait_for(
        "the next audit to repair the tampering",
        Duration::from_secs(3),
        reach("10.96.0.10:80"),
    )
    .await;
    let rendered = metrics.render(std::time::Instant::now());
    assert!(
        !rendered.contains("trellis_proxy_drift_repaired_total{node=\"r\"} 0"),
        "the repair is counted: {rendered}"
    );

    // No endpoints: refused at once, on the ClusterIP and the NodePort.
    put(&store, "endpointslices/shop/web-1", slice(&[])).await;
    let refused = |to: &'static str| {
        let a = a.clone();
        move || {
            let a = a.clone();
            async move { (connect(&a, to) == Err("connection refused".into())).then_some(()) }
        }
    };
    wait_for(
        "the ClusterIP to be refused",
        Duration::from_secs(5),
        refused("10.96.0.10:80"),
    )
    .await;
    wait_for(
        "the NodePort to be refused",
        Duration::from_secs(5),
        refused("10.91.1.1:30080"),
    )
    .await;

    // The service deleted: its chains and elements go, the table stays.
    store.delete("services/shop/web").await.unwrap();
    wait_for("the service's rules to go", Duration::from_secs(5), || {
        let r = r.clone();
        async move {
            let listed = nft(&r, &["list", "table", "ip", "trellis-proxy"]);
            (!listed.contains("shop/web")).then_some(())
        }
    })
    .await;
    proxy.abort();
}

/// A UDP server in B that answers every datagram with "b".
fn serve_udp_in(ns: &str, addr: &'static str) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("entering B");
        let socket = std::net::UdpSocket::bind(addr).expect("binding the UDP backend");
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(b"b", from);
        }
    });
}

fn dns_service() -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "dns", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.11",
                    "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}})
}

fn dns_slice(addresses: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = addresses
        .iter()
        .map(|a| json!({"addresses": [a]}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "dns-1", "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "dns"}},
           "addressType": "IPv4", "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
           "endpoints": endpoints})
}

/// Kubernetes issue 139628: a UDP client that keeps sending from one socket keeps its
/// conntrack entry alive, and with it a translation to an endpoint that is gone. The
/// proxy deletes such entries, so the client's next datagram is judged anew: refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flow_to_a_service_scaled_to_zero_is_refused_not_blackholed() {
    let net = Routed::new("udp");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    trellis_testkit::netns::ip(&["-n", &r, "route", "add", "default", "dev", "r1"]);
    serve_udp_in(&b, "10.91.2.2:5353");
    let store = EmbeddedStore::new();
    put(&store, "services/shop/dns", dns_service()).await;
    put(&store, "endpointslices/shop/dns-1", dns_slice(&[Routed::B])).await;
    let (proxy, metrics) = start_proxy(&store, &r, true, None);

    // One client socket in A, connected to the service, sending again and again: every
    // datagram after the first rides the same conntrack entry.
    let socket = netns::run_in(&a, || {
        let socket = std::net::UdpSocket::bind("10.91.1.2:40053").unwrap();
        socket.connect("10.96.0.11:53").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        socket
    })
    .unwrap();
    let ask = |socket: &std::net::UdpSocket| -> Result<String, std::io::ErrorKind> {
        socket.send(b"?").map_err(|e| e.kind())?;
        let mut buf = [0u8; 8];
        let n = socket.recv(&mut buf).map_err(|e| e.kind())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let socket = Arc::new(socket);
    wait_for("the service to answer", Duration::from_secs(10), || {
        let socket = socket.clone();
        async move { (ask(&socket) == Ok("b".into())).then_some(()) }
    })
    .await;

    // Scaled to zero. B still runs here, so a translation left in place would still be
    // answered: the client must instead be refused.
    put(&store, "endpointslices/shop/dns-1", dns_slice(&[])).await;
    wait_for("the client's flow to be refused", Duration::from_secs(10), || {
        let socket = socket.clone();
        async move {
            (ask(&socket) == Err(std::io::ErrorKind::ConnectionRefused)).then_some(())
        }
    })
    .await;
    let rendered = metrics.render(std::time::Instant::now());
    assert!(
        !rendered.contains("trellis_proxy_conntrack_removed_total{node=\"r\"} 0"),
        "the stale entry was deleted by the proxy: {rendered}"
    );

    // Endpoints again: the refused flow's next datagram reaches B at once.
    put(&store, "endpointslices/shop/dns-1", dns_slice(&[Routed::B])).await;
    wait_for(
        "the service to answer again",
        Duration::from_secs(10),
        || {
            let socket = socket.clone();
            async move { (ask(&socket) == Ok("b".into())).then_some(()) }
        },
    )
    .await;
    proxy.abort();
}

/// A dual-stack service: one ClusterIP per family, one EndpointSlice per family, each
/// family's table programmed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_service_is_reached_over_both_families() {
    let net = Routed::new("dual");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    serve_in(&b, "10.91.2.2:8080", "b");
    serve_in(&b, "[fd91:2::2]:8080", "b6");
    let store = EmbeddedStore::new();
    put(
        &store,
        "services/shop/web",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                        "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    )
    .await;
    put(&store, "endpointslices/shop/web-1", slice(&[Routed::B])).await;
    let mut v6 = slice(&[Routed::B6]);
    v6["metadata"]["name"] = json!("web-6");
    v6["addressType"] = json!("IPv6");
    put(&store, "endpointslices/shop/web-6", v6).await;
    let (proxy, _metrics) = start_proxy(&store, &r, false, None);
    for (to, answer) in [("10.96.0.10:80", "b"), ("[fd00:96::10]:80", "b6")] {
        wait_for(
            &format!("{to} to lead to B"),
            Duration::from_secs(10),
            || {
                let a = a.clone();
                async move { (connect(&a, to) == Ok(answer.into())).then_some(()) }
            },
        )
        .await;
    }
    let listed = nft(&r, &["list", "table", "ip6", "trellis-proxy"]);
    assert!(
        listed.contains("fd00:96::10 . tcp . 80 : goto shape-clusterip-cluster-1"),
        "{listed}"
    );
    proxy.abort();
}

/// A server that answers every line on a connection with its label, until the client
/// closes: an established flow that can be checked again later.
fn serve_lines_in(ns: &str, addr: &'static str, label: &'static str) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("entering B");
        let listener = TcpListener::bind(addr).expect("binding the backend");
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(label.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn lines_slice(name: &str, port: u16, terminating: bool) -> serde_json::Value {
    let conditions = if terminating {
        json!({"ready": false, "serving": true, "terminating": true})
    } else {
        json!({"ready": true, "serving": true, "terminating": false})
    };
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
           "endpoints": [{"addresses": [Routed::B], "conditions": conditions}]})
}

/// A terminating endpoint gets no new connections while its established ones go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_endpoint_keeps_its_connections_and_gets_no_new_ones() {
    let net = Routed::new("term");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    serve_lines_in(&b, "10.91.2.2:9000", "old");
    serve_lines_in(&b, "10.91.2.2:9001", "new");
    let store = EmbeddedStore::new();
    put(&store, "services/shop/web", service(false)).await;
    put(
        &store,
        "endpointslices/shop/web-old",
        lines_slice("web-old", 9000, false),
    )
    .await;
    let (proxy, _metrics) = start_proxy(&store, &r, true, None);

    // A long-lived connection, established to the one endpoint there is.
    let ask = |stream: &mut TcpStream| -> Option<String> {
        stream.write_all(b"?\n").ok()?;
        let mut buf = [0u8; 16];
        let n = stream.read(&mut buf).ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let mut long_lived = wait_for(
        "a connection to the service",
        Duration::from_secs(10),
        || {
            let a = a.clone();
            async move {
                netns::run_in(&a, || {
                    let to: SocketAddr = "10.96.0.10:80".parse().unwrap();
                    let s = TcpStream::connect_timeout(&to, Duration::from_millis(500)).ok()?;
                    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                    Some(s)
                })
                .unwrap()
            }
        },
    )
    .await;
    assert_eq!(ask(&mut long_lived).as_deref(), Some("old"));

    // The endpoint starts terminating while another is ready.
    put(
        &store,
        "endpointslices/shop/web-new",
        lines_slice("web-new", 9001, false),
    )
    .await;
    put(
        &store,
        "endpointslices/shop/web-old",
        lines_slice("web-old", 9000, true),
    )
    .await;
    let fresh = || {
        netns::run_in(&a, || {
            let to: SocketAddr = "10.96.0.10:80".parse().unwrap();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(500)).ok()?;
            s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
            s.write_all(b"?\n").ok()?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap()
    };
    wait_for(
        "new connections to go to the ready endpoint",
        Duration::from_secs(10),
        || {
            let answers: Vec<_> = (0..20).map(|_| fresh()).collect();
            async move {
                answers
                    .iter()
                    .all(|a| a.as_deref() == Some("new"))
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        ask(&mut long_lived).as_deref(),
        Some("old"),
        "the established connection to the terminating endpoint goes on"
    );
    proxy.abort();
}

/// ClientIP affinity: a client stays on the endpoint it first reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_keeps_a_client_on_one_endpoint() {
    let net = Routed::new("aff");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    serve_in(&b, "10.91.2.2:8080", "b");
    serve_in(&b, "10.91.2.2:8081", "b2");
    let store = EmbeddedStore::new();
    let mut svc = service(false);
    svc["spec"]["sessionAffinity"] = json!("ClientIP");
    put(&store, "services/shop/web", svc).await;
    put(&store, "endpointslices/shop/web-1", slice(&[Routed::B])).await;
    put(&store, "endpointslices/shop/web-2", second_slice()).await;
    let (proxy, _metrics) = start_proxy(&store, &r, false, None);
    // The table exists once the service answers; then both endpoints are programmed
    // (the affinity rules name both sets).
    wait_for("the service to answer", Duration::from_secs(10), || {
        let a = a.clone();
        async move { connect(&a, "10.96.0.10:80").ok() }
    })
    .await;
    wait_for(
        "both endpoints in the rules",
        Duration::from_secs(10),
        || {
            let r = r.clone();
            async move {
                let listed = nft(&r, &["list", "table", "ip", "trellis-proxy"]);
                (listed.matches("@affinity-").count() >= 2).then_some(())
            }
        },
    )
    .await;
    let first = connect(&a, "10.96.0.10:80").expect("the service answers");
    for _ in 0..30 {
        assert_eq!(
            connect(&a, "10.96.0.10:80").as_ref(),
            Ok(&first),
            "the client stays"
        );
    }
    let listed = nft(&r, &["list", "table", "ip", "trellis-proxy"]);
    assert!(
        listed.contains("10.91.1.2"),
        "the client is remembered in its endpoint's set: {listed}"
    );
    proxy.abort();
}

/// A restarted proxy does not flush: its first pass reads the kernel, finds its tables
/// right, and changes nothing, so connections never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_changes_nothing_in_a_kernel_that_is_already_right() {
    let net = Routed::new("restart");
    let (a, r, b) = (
        net.a.name().to_string(),
        net.r.name().to_string(),
        net.b.name().to_string(),
    );
    trellis_testkit::netns::ip(&["-n", &r, "route", "add", "default", "dev", "r1"]);
    serve_in(&b, "10.91.2.2:8080", "b");
    let store = EmbeddedStore::new();
    put(&store, "services/shop/web", service(true)).await;
    put(&store, "endpointslices/shop/web-1", slice(&[Routed::B])).await;
    let (first, _) = start_proxy(&store, &r, true, Some(Routed::R_A));
    wait_for(
        "the ClusterIP to lead to B",
        Duration::from_secs(10),
        || {
            let a = a.clone();
            async move { (connect(&a, "10.96.0.10:80") == Ok("b".into())).then_some(()) }
        },
    )
    .await;
    first.abort();
    let _ = first.await;
    let generation = Nft::connect_in(&r).unwrap().generation().unwrap();

    let (second, metrics) = start_proxy(&store, &r, true, Some(Routed::R_A));
    wait_for(
        "the new proxy's first sync",
        Duration::from_secs(10),
        || {
            let ok = metrics
                .proxy()
                .last_sync
                .judge(std::time::Instant::now())
                .is_ok();
            async move { ok.then_some(()) }
        },
    )
    .await;
    let rendered = metrics.render(std::time::Instant::now());
    assert!(
        rendered.contains("trellis_proxy_operations_total{node=\"r\"} 0"),
        "nothing written: {rendered}"
    );
    assert_eq!(
        Nft::connect_in(&r).unwrap().generation().unwrap(),
        generation,
        "no transaction committed"
    );
    assert_eq!(connect(&a, "10.96.0.10:80"), Ok("b".into()));
    second.abort();
}
