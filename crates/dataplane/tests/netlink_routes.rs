//! Route reconcile over netlink, checked with `ip -j route`: our protocol's
//! routes converge on the desired set, everything else is left alone.

use trellis_testkit::netns as netns_support;

use std::collections::BTreeSet;

use netns_support::{ip, ip_json, scratch_netns};
use trellis_dataplane::Error;
use trellis_dataplane::netlink::{Netlink, RouteSpec, reconcile_routes};
use trellis_dataplane::netns::{self, OwnedNetns};
use trellis_dataplane::routes::RouteTable;
use trellis_dataplane::sysctl;

const OURS: u8 = 99;

fn route(dst: &str, via: Option<&str>, dev: Option<&str>, src: Option<&str>) -> RouteSpec {
    RouteSpec {
        dst: dst.parse().expect("dst"),
        via: via.map(|text| text.parse().expect("via")),
        dev: dev.map(str::to_owned),
        src: src.map(|text| text.parse().expect("src")),
        protocol: OURS,
    }
}

/// A namespace with link `r0` (10.77.0.1/24, fd77::1/64) whose neighbours
/// 10.77.0.2 / fd77::2 serve as gateways; `r1` is r0's veth peer.
async fn routed_namespace(tag: &str) -> (OwnedNetns, Netlink) {
    let namespace = scratch_netns(tag);
    // Without DAD the IPv6 address is usable (as a route source) at once.
    netns::run_in(namespace.name(), || {
        sysctl::set("net.ipv6.conf.all.accept_dad", "0")?;
        sysctl::set("net.ipv6.conf.default.accept_dad", "0")
    })
    .expect("run_in")
    .expect("disable DAD");
    let nl = Netlink::connect_in(namespace.name()).expect("netlink");
    nl.create_veth("r0", "r1").await.expect("veth");
    nl.add_address("r0", "10.77.0.1/24".parse().expect("net"))
        .await
        .expect("v4 address");
    nl.add_address("r0", "fd77::1/64".parse().expect("net"))
        .await
        .expect("v6 address");
    for link in ["r0", "r1"] {
        nl.set_up(link).await.expect("up");
    }
    (namespace, nl)
}

/// `dst via gateway src prefsrc` for every route of a protocol, both families,
/// as `ip -j route show` reports them.
fn routes_seen_by_iproute(netns_name: &str, protocol: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for family in ["-4", "-6"] {
        let json = ip_json(&["-n", netns_name, family, "route", "show", "proto", protocol]);
        for entry in json.as_array().into_iter().flatten() {
            let field = |name: &str| entry[name].as_str().unwrap_or("-").to_owned();
            seen.insert(format!(
                "{} via {} src {}",
                field("dst"),
                field("gateway"),
                field("prefsrc")
            ));
        }
    }
    seen
}

fn lines(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

#[tokio::test]
async fn reconcile_converges_restores_and_removes_only_its_own_routes() {
    let (namespace, nl) = routed_namespace("routes").await;
    let ns = namespace.name();
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "10.203.0.0/24",
        "via",
        "10.77.0.2",
        "proto",
        "static",
    ]);

    let mut desired = vec![
        route("10.201.0.0/24", Some("10.77.0.2"), None, Some("10.77.0.1")),
        route(
            "10.202.0.0/24",
            Some("10.77.0.2"),
            Some("r0"),
            Some("10.77.0.1"),
        ),
        route("fd99:1::/64", Some("fd77::2"), None, Some("fd77::1")),
    ];
    let first = reconcile_routes(&nl, OURS, &desired)
        .await
        .expect("first reconcile");
    assert_eq!(first.added.len(), 3, "{first:?}");
    assert!(first.removed.is_empty(), "{first:?}");
    let all_three = lines(&[
        "10.201.0.0/24 via 10.77.0.2 src 10.77.0.1",
        "10.202.0.0/24 via 10.77.0.2 src 10.77.0.1",
        "fd99:1::/64 via fd77::2 src fd77::1",
    ]);
    assert_eq!(routes_seen_by_iproute(ns, "99"), all_three);
    assert_eq!(nl.routes(OURS).await.expect("read back").len(), 3);

    let again = reconcile_routes(&nl, OURS, &desired)
        .await
        .expect("second reconcile");
    assert!(
        again.is_empty(),
        "a second reconcile must change nothing: {again:?}"
    );

    ip(&["-n", ns, "route", "del", "10.201.0.0/24", "proto", "99"]);
    let restored = reconcile_routes(&nl, OURS, &desired)
        .await
        .expect("restoring reconcile");
    assert_eq!(restored.added, [desired[0].clone()], "{restored:?}");
    assert!(restored.removed.is_empty(), "{restored:?}");
    assert_eq!(routes_seen_by_iproute(ns, "99"), all_three);

    let dropped = desired.remove(2);
    let shrunk = reconcile_routes(&nl, OURS, &desired)
        .await
        .expect("shrinking reconcile");
    assert!(shrunk.added.is_empty(), "{shrunk:?}");
    assert_eq!(shrunk.removed.len(), 1, "{shrunk:?}");
    assert_eq!(shrunk.removed[0].dst, dropped.dst);
    assert_eq!(
        shrunk.removed[0].dev.as_deref(),
        Some("r0"),
        "routes read back carry their device"
    );
    assert_eq!(
        routes_seen_by_iproute(ns, "99"),
        lines(&[
            "10.201.0.0/24 via 10.77.0.2 src 10.77.0.1",
            "10.202.0.0/24 via 10.77.0.2 src 10.77.0.1"
        ])
    );

    assert!(
        reconcile_routes(&nl, OURS, &desired)
            .await
            .expect("settled")
            .is_empty()
    );
    reconcile_routes(&nl, OURS, &[])
        .await
        .expect("emptying reconcile");
    assert!(routes_seen_by_iproute(ns, "99").is_empty());

    assert_eq!(
        routes_seen_by_iproute(ns, "static"),
        lines(&["10.203.0.0/24 via 10.77.0.2 src -"]),
        "another protocol's route must survive every reconcile"
    );
}

#[tokio::test]
async fn a_changed_route_is_swapped_in_place() {
    let (namespace, nl) = routed_namespace("swap").await;
    let ns = namespace.name();
    let before = [
        route("10.210.0.0/24", Some("10.77.0.2"), None, None),
        // Host bits in a desired destination are ignored, not an error.
        route("10.211.0.9/24", None, Some("r0"), None),
    ];
    reconcile_routes(&nl, OURS, &before).await.expect("initial");
    assert_eq!(
        routes_seen_by_iproute(ns, "99"),
        lines(&[
            "10.210.0.0/24 via 10.77.0.2 src -",
            "10.211.0.0/24 via - src -"
        ])
    );
    assert!(
        reconcile_routes(&nl, OURS, &before)
            .await
            .expect("stable")
            .is_empty()
    );

    let after = [
        route("10.210.0.0/24", Some("10.77.0.3"), None, Some("10.77.0.1")),
        before[1].clone(),
    ];
    let swapped = reconcile_routes(&nl, OURS, &after).await.expect("swap");
    assert_eq!(swapped.added, [after[0].clone()], "{swapped:?}");
    assert_eq!(swapped.removed.len(), 1, "{swapped:?}");
    assert_eq!(swapped.removed[0].via, before[0].via);
    assert_eq!(
        routes_seen_by_iproute(ns, "99"),
        lines(&[
            "10.210.0.0/24 via 10.77.0.3 src 10.77.0.1",
            "10.211.0.0/24 via - src -"
        ])
    );
}

#[tokio::test]
async fn one_bad_route_does_not_block_the_others() {
    let (namespace, nl) = routed_namespace("partial").await;
    let ns = namespace.name();
    // Someone else owns this destination; we must not take it over.
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "10.220.0.0/24",
        "via",
        "10.77.0.2",
        "proto",
        "static",
    ]);

    let desired = [
        route("10.220.0.0/24", Some("10.77.0.2"), None, None),
        route("10.221.0.0/24", Some("10.99.99.99"), None, None), // gateway not reachable
        route(
            "10.222.0.0/24",
            Some("10.77.0.2"),
            Some("no-such-dev"),
            None,
        ),
        route("10.223.0.0/24", Some("10.77.0.2"), None, None),
        RouteSpec {
            protocol: 42,
            ..route("10.224.0.0/24", Some("10.77.0.2"), None, None)
        },
    ];
    let err = reconcile_routes(&nl, OURS, &desired)
        .await
        .expect_err("some routes cannot be added");
    let message = format!("{err:#}");
    for culprit in [
        "10.220.0.0/24",
        "10.221.0.0/24",
        "no-such-dev",
        "10.224.0.0/24",
    ] {
        assert!(
            message.contains(culprit),
            "the error should mention {culprit}: {message}"
        );
    }
    assert!(
        message.starts_with("4 of the route changes failed"),
        "{message}"
    );
    // Some steps failed, as opposed to the kernel not even being readable.
    let Error::Partial { failures, .. } = &err else {
        panic!("not a partial failure: {err:?}");
    };
    assert_eq!(failures.len(), 4, "{failures:#?}");

    // The route of another protocol in the way is a kind of its own, naming the namespace.
    let err = nl
        .install(&desired[0], false)
        .await
        .expect_err("another protocol's route is in the way");
    assert!(
        matches!(&err, Error::AlreadyExists { scope, .. } if scope == &format!("netns {ns}")),
        "{err:?}"
    );
    assert!(err.has_errno(libc::EEXIST), "{err:?}");
    // A missing device is NotFound, saying which route wanted it.
    let err = nl
        .install(&desired[2], false)
        .await
        .expect_err("no such dev");
    assert!(
        matches!(&err, Error::NotFound { what, .. } if what == "link no-such-dev"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("adding route 10.222.0.0/24"),
        "{err}"
    );

    assert_eq!(
        routes_seen_by_iproute(ns, "99"),
        lines(&["10.223.0.0/24 via 10.77.0.2 src -"])
    );
    assert_eq!(
        routes_seen_by_iproute(ns, "static"),
        lines(&["10.220.0.0/24 via 10.77.0.2 src -"])
    );
}

#[tokio::test]
async fn add_route_replaces_and_del_route_is_idempotent() {
    let (_namespace, nl) = routed_namespace("addel").await;
    let first = route("10.230.0.0/24", Some("10.77.0.2"), None, None);
    nl.add_route(&first).await.expect("add");
    nl.add_route(&first).await.expect("adding again replaces");
    let moved = route("10.230.0.0/24", Some("10.77.0.3"), None, None);
    nl.add_route(&moved).await.expect("replace");
    let ours = nl.routes(OURS).await.expect("routes");
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].via, moved.via);

    nl.del_route(&ours[0]).await.expect("delete");
    nl.del_route(&ours[0])
        .await
        .expect("deleting a missing route is fine");
    assert!(nl.routes(OURS).await.expect("routes").is_empty());
}

/// How the agent carries IPv6 over an IPv4-only internal network, on a real kernel: Linux
/// refuses an IPv6 route to an IPv4 gateway, so each node answers at a link-local stand-in
/// of its IPv4 address (added without DAD, so usable at once) and IPv6 routes name that
/// address and the device. Two namespaces on one veth, as two nodes on their location's
/// network, each with an IPv6 "pod" address behind it: the ping crosses both ways at once.
/// Beside it, the converse that Linux does have: an IPv4 route to an IPv6 gateway
/// (RTA_VIA), read back as installed.
#[tokio::test]
async fn ipv6_crosses_an_ipv4_network_through_link_local_stand_ins() {
    let (one, two) = (scratch_netns("v6a"), scratch_netns("v6b"));
    let nl1 = Netlink::connect_in(one.name()).expect("netlink");
    let nl2 = Netlink::connect_in(two.name()).expect("netlink");
    nl1.create_veth("int0", "peer0").await.expect("veth");
    let two_fd = std::fs::File::open(format!("/run/netns/{}", two.name())).expect("netns");
    nl1.move_link_to_netns("peer0", &two_fd)
        .await
        .expect("move");
    let nets = [
        (
            &nl1,
            "int0",
            "10.77.0.1/24",
            "fe80::a4d:1/64",
            "fd99:1::1/128",
        ),
        (
            &nl2,
            "peer0",
            "10.77.0.2/24",
            "fe80::a4d:2/64",
            "fd99:2::1/128",
        ),
    ];
    for (nl, link, v4, stand_in, pod) in nets {
        nl.add_address(link, v4.parse().unwrap()).await.expect("v4");
        nl.add_address(link, stand_in.parse().unwrap())
            .await
            .expect("stand-in");
        nl.add_address("lo", pod.parse().unwrap())
            .await
            .expect("pod");
        nl.set_up(link).await.expect("up");
        nl.set_up("lo").await.expect("lo up");
    }
    assert_eq!(
        nl1.link_with_address("10.77.0.1".parse().unwrap())
            .await
            .expect("lookup"),
        Some("int0".to_owned())
    );
    assert_eq!(
        nl1.link_with_address("10.77.0.9".parse().unwrap())
            .await
            .expect("lookup"),
        None
    );
    let seen = ip_json(&["-n", one.name(), "-6", "addr", "show", "dev", "int0"]);
    let stand_in = seen[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["local"] == "fe80::a4d:1")
        .cloned()
        .expect("stand-in listed");
    assert!(
        stand_in.get("tentative").is_none() && stand_in.get("nodad") == Some(&true.into()),
        "added without DAD, usable at once: {stand_in}"
    );

    let there = [route(
        "fd99:2::/64",
        Some("fe80::a4d:2"),
        Some("int0"),
        None,
    )];
    let back = [route(
        "fd99:1::/64",
        Some("fe80::a4d:1"),
        Some("peer0"),
        None,
    )];
    reconcile_routes(&nl1, OURS, &there).await.expect("there");
    reconcile_routes(&nl2, OURS, &back).await.expect("back");
    assert_eq!(
        routes_seen_by_iproute(one.name(), "99"),
        lines(&["fd99:2::/64 via fe80::a4d:2 src -"])
    );
    assert!(
        reconcile_routes(&nl1, OURS, &there)
            .await
            .expect("again")
            .is_empty(),
        "read back as desired"
    );
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            one.name(),
            "ping",
            "-6",
            "-c",
            "1",
            "-W",
            "2",
        ])
        .args(["-I", "fd99:1::1", "fd99:2::1"])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // what Linux refuses (the request is not even sent), so that the planner never asks
    // for it
    let refused = nl1
        .install(
            &route("fd99:3::/64", Some("10.77.0.2"), Some("int0"), None),
            false,
        )
        .await
        .expect_err("an IPv6 route to an IPv4 gateway");
    assert!(refused.to_string().contains("fd99:3::/64"), "{refused}");
    // and what it takes: an IPv4 route to an IPv6 gateway (RFC 5549)
    nl2.add_address("peer0", "fd77::2/64".parse().unwrap())
        .await
        .expect("v6 on the link");
    // without a device, as the agent asks for it: the kernel finds it from the gateway
    let rfc5549 = [route("10.240.0.0/24", Some("fd77::1"), None, None)];
    reconcile_routes(&nl2, OURS, &rfc5549)
        .await
        .expect("RTA_VIA");
    assert!(
        reconcile_routes(&nl2, OURS, &rfc5549)
            .await
            .expect("again")
            .is_empty(),
        "read back as desired"
    );
}
