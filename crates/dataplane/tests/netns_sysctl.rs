//! sysctl values are per network namespace: setting one inside a namespace
//! leaves the host's alone.

use trellis_testkit::netns as netns_support;

use netns_support::scratch_netns;
use trellis_dataplane::{netns, sysctl};

#[test]
fn ip_forward_set_inside_a_namespace_leaves_the_host_unchanged() {
    let host_before = sysctl::get("net.ipv4.ip_forward").expect("host value");
    let namespace = scratch_netns("sysctl");

    let inside = netns::run_in(namespace.name(), || {
        let fresh = sysctl::get("net.ipv4.ip_forward")?;
        sysctl::set("net.ipv4.ip_forward", "1")?;
        let after = sysctl::get("net/ipv4/ip_forward")?;
        Ok::<_, trellis_dataplane::Error>((fresh, after))
    })
    .expect("run_in")
    .expect("sysctl inside the namespace");

    assert_eq!(inside.0, "0", "a new namespace starts with forwarding off");
    assert_eq!(inside.1, "1");
    assert_eq!(
        sysctl::get("net.ipv4.ip_forward").expect("host value"),
        host_before
    );
    let seen_by_iproute = netns_support::ip(&[
        "netns",
        "exec",
        namespace.name(),
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    assert_eq!(seen_by_iproute.trim(), "1");
}

#[test]
fn unknown_sysctl_errors_name_it() {
    let namespace = scratch_netns("sysctl-bad");
    let err = netns::run_in(namespace.name(), || {
        sysctl::set("net.ipv4.no_such_knob", "1")
    })
    .expect("run_in")
    .expect_err("setting a missing sysctl");
    assert!(
        format!("{err:#}").contains("net.ipv4.no_such_knob"),
        "{err:#}"
    );
}
