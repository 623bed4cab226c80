//! Links and addresses over netlink, checked with iproute2: a bridge and a
//! veth pair in one namespace, the veth's far end in a second one, and the
//! two namespaces reaching each other across it.

use trellis_testkit::netns as netns_support;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use netns_support::{ip, ip_json, ip_succeeds, scratch_netns};
use trellis_dataplane::Error;
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::netns;

fn net(text: &str) -> IpNet {
    text.parse().expect("test address")
}

/// `local/prefixlen` of every address `ip -j addr` reports for a link,
/// except the IPv6 link-local one the kernel adds by itself.
fn addresses_seen_by_iproute(netns_name: &str, link: &str) -> Vec<String> {
    let json = ip_json(&["-n", netns_name, "addr", "show", "dev", link]);
    json.as_array()
        .into_iter()
        .flatten()
        .flat_map(|entry| entry["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|info| info["scope"] != "link")
        .map(|info| {
            format!(
                "{}/{}",
                info["local"].as_str().unwrap_or("?"),
                info["prefixlen"]
            )
        })
        .collect()
}

fn link_seen_by_iproute(netns_name: &str, link: &str) -> serde_json::Value {
    let json = ip_json(&["-n", netns_name, "link", "show", "dev", link]);
    json.as_array()
        .and_then(|links| links.first())
        .cloned()
        .expect("link listed")
}

/// A datagram sent from inside one namespace arrives at a socket inside the
/// other: the two really are connected. Needs no tool outside this crate.
fn udp_reaches(from_netns: &str, to_netns: &str, to: SocketAddr) {
    let receiver = netns::run_in(to_netns, move || UdpSocket::bind(to))
        .expect("run_in")
        .expect("bind receiver");
    receiver
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    netns::run_in(from_netns, move || {
        let sender = UdpSocket::bind("0.0.0.0:0")?;
        sender.send_to(b"trellis", to).map(drop)
    })
    .expect("run_in")
    .expect("send");
    let mut buffer = [0u8; 16];
    let (length, _) = receiver
        .recv_from(&mut buffer)
        .expect("datagram across the veth");
    assert_eq!(&buffer[..length], b"trellis");
}

fn ping_works(netns_name: &str, address: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", netns_name, "ping", "-c1", "-W1", address])
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

fn ping_available() -> bool {
    Command::new("ping").arg("-V").output().is_ok()
}

#[tokio::test]
async fn bridge_and_veth_connect_two_namespaces() {
    let hub = scratch_netns("hub");
    let leaf = scratch_netns("leaf");
    let hub_nl = Netlink::connect_in(hub.name()).expect("netlink in hub");
    let leaf_nl = Netlink::connect_in(leaf.name()).expect("netlink in leaf");

    hub_nl.create_bridge("br-t").await.expect("bridge");
    hub_nl.create_veth("v-hub", "v-leaf").await.expect("veth");
    let leaf_file = netns::open(leaf.name()).expect("open leaf");
    hub_nl
        .move_link_to_netns("v-leaf", &leaf_file)
        .await
        .expect("move");
    assert_eq!(
        hub_nl.link_index("v-leaf").await.expect("lookup"),
        None,
        "moved end still in hub"
    );
    assert!(
        leaf_nl
            .link_index("v-leaf")
            .await
            .expect("lookup")
            .is_some(),
        "moved end not in leaf"
    );

    hub_nl.set_master("v-hub", "br-t").await.expect("master");
    hub_nl.set_mtu("v-hub", 1400).await.expect("mtu");
    for link in ["br-t", "v-hub", "lo"] {
        hub_nl.set_up(link).await.expect("hub link up");
    }
    for link in ["v-leaf", "lo"] {
        leaf_nl.set_up(link).await.expect("leaf link up");
    }
    hub_nl
        .add_address("br-t", net("10.66.0.1/24"))
        .await
        .expect("hub address");
    leaf_nl
        .add_address("v-leaf", net("10.66.0.2/24"))
        .await
        .expect("leaf address");
    leaf_nl
        .add_address("v-leaf", net("10.66.0.2/24"))
        .await
        .expect("adding the same address again is fine");

    let mut hub_links = hub_nl.link_names().await.expect("names");
    hub_links.sort();
    assert_eq!(hub_links, ["br-t", "lo", "v-hub"]);

    let port = link_seen_by_iproute(hub.name(), "v-hub");
    assert_eq!(port["master"], "br-t");
    assert_eq!(port["mtu"], 1400);
    assert!(
        port["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .any(|flag| flag == "UP")
    );
    assert_eq!(
        addresses_seen_by_iproute(hub.name(), "br-t"),
        ["10.66.0.1/24"]
    );
    assert_eq!(
        addresses_seen_by_iproute(leaf.name(), "v-leaf"),
        ["10.66.0.2/24"]
    );
    assert!(
        leaf_nl
            .addresses("v-leaf")
            .await
            .expect("addresses")
            .contains(&net("10.66.0.2/24"))
    );

    udp_reaches(
        hub.name(),
        leaf.name(),
        "10.66.0.2:40001".parse().expect("addr"),
    );
    udp_reaches(
        leaf.name(),
        hub.name(),
        "10.66.0.1:40002".parse().expect("addr"),
    );
    if ping_available() {
        assert!(ping_works(hub.name(), "10.66.0.2"), "hub cannot ping leaf");
        assert!(ping_works(leaf.name(), "10.66.0.1"), "leaf cannot ping hub");
    } else {
        eprintln!("ping is not installed: checked reachability with UDP only");
    }
}

#[tokio::test]
async fn addresses_can_be_removed_and_links_deleted_idempotently() {
    let namespace = scratch_netns("addr");
    let nl = Netlink::connect_in(namespace.name()).expect("netlink");
    nl.create_veth("va", "vb").await.expect("veth");
    nl.add_address("va", net("10.67.0.1/24")).await.expect("v4");
    nl.add_address("va", net("fd67::1/64")).await.expect("v6");
    let addresses = nl.addresses("va").await.expect("list");
    assert!(
        addresses.contains(&net("10.67.0.1/24")) && addresses.contains(&net("fd67::1/64")),
        "{addresses:?}"
    );

    nl.del_address("va", net("10.67.0.1/24"))
        .await
        .expect("del v4");
    nl.del_address("va", net("10.67.0.1/24"))
        .await
        .expect("deleting a missing address is fine");
    let seen = addresses_seen_by_iproute(namespace.name(), "va");
    assert!(!seen.contains(&"10.67.0.1/24".to_owned()), "{seen:?}");
    assert!(seen.contains(&"fd67::1/64".to_owned()), "{seen:?}");

    nl.delete_link("va").await.expect("delete");
    nl.delete_link("va")
        .await
        .expect("deleting a missing link is fine");
    assert!(
        !ip_succeeds(&["-n", namespace.name(), "link", "show", "vb"]),
        "the peer goes with it"
    );
    assert_eq!(nl.link_index("vb").await.expect("lookup"), None);
}

#[tokio::test]
async fn errors_name_the_link_and_the_namespace() {
    let namespace = scratch_netns("errs");
    let nl = Netlink::connect_in(namespace.name()).expect("netlink");
    let err = nl.set_up("no-such-link").await.expect_err("missing link");
    let message = format!("{err:#}");
    assert!(
        message.contains("no-such-link") && message.contains(namespace.name()),
        "{message}"
    );
    assert!(
        matches!(&err, Error::NotFound { what, .. } if what == "link no-such-link"),
        "{err:?}"
    );

    nl.create_bridge("br-dup").await.expect("bridge");
    let err = nl
        .create_bridge("br-dup")
        .await
        .expect_err("duplicate bridge");
    assert!(format!("{err:#}").contains("br-dup"), "{err:#}");
    // The kernel's refusal, with its errno.
    assert!(
        matches!(err, Error::Kernel { errno, .. } if errno == libc::EEXIST),
        "{err:?}"
    );

    let err = nl
        .create_veth("a-name-that-is-too-long", "x")
        .await
        .expect_err("name too long");
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "link name",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_in_a_missing_namespace_fails() {
    let err = Netlink::connect_in("trt-does-not-exist").expect_err("no such namespace");
    assert!(format!("{err:#}").contains("trt-does-not-exist"), "{err:#}");
    assert!(err.is_not_found(), "{err:?}");
    // The helper itself must not have created anything in the host.
    assert!(!ip_succeeds(&["link", "show", "br-t"]));
    let _ = ip(&["netns", "list"]);
}
