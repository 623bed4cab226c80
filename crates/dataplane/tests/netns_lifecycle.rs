//! Named network namespaces: lifecycle, iproute2 compatibility, running code
//! and processes inside them.

use trellis_testkit::netns as netns_support;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use netns_support::{
    DeleteOnDrop, current_thread_netns, host_netns, ip, ip_succeeds, netns_identity, scratch_name,
    scratch_netns,
};
use trellis_dataplane::netlink::Netlink;
use trellis_dataplane::netns;

#[test]
fn create_exists_list_delete_round_trip() {
    let name = scratch_name("life");
    let _cleanup = DeleteOnDrop(name.clone());
    assert!(!netns::exists(&name));

    netns::create(&name).expect("create");
    assert!(netns::exists(&name));
    assert!(netns::list().contains(&name), "list() lacks {name}");

    netns::delete(&name).expect("delete");
    assert!(!netns::exists(&name));
    assert!(!netns::list().contains(&name));
}

#[test]
fn creating_twice_fails_naming_the_namespace() {
    let namespace = scratch_netns("twice");
    let err = netns::create(namespace.name()).expect_err("second create must fail");
    assert!(
        matches!(err, trellis_dataplane::Error::AlreadyExists { .. }),
        "{err:?}"
    );
    let message = format!("{err:#}");
    assert!(
        message.contains(namespace.name()),
        "error does not name the namespace: {message}"
    );
    assert!(
        netns::exists(namespace.name()),
        "the failed create must not remove the existing one"
    );
}

#[test]
fn deleting_a_missing_namespace_is_ok() {
    netns::delete(&scratch_name("never")).expect("deleting a missing namespace");
}

#[test]
fn names_that_escape_the_netns_folder_are_refused() {
    for bad in ["", ".", "..", "a/b", "../etc"] {
        assert!(netns::create(bad).is_err(), "create({bad:?}) should fail");
        assert!(!netns::exists(bad));
    }
}

#[test]
fn iproute2_sees_and_uses_our_namespaces() {
    let namespace = scratch_netns("ipsees");
    let listed = ip(&["netns", "list"]);
    assert!(
        listed
            .lines()
            .any(|line| line.split_whitespace().next() == Some(namespace.name())),
        "{listed}"
    );
    // `ip -n` enters it: a fresh namespace has nothing but lo.
    let links = ip(&["-n", namespace.name(), "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains(": lo:"), "{links}");

    let name = namespace.name().to_owned();
    drop(namespace);
    assert!(!ip(&["netns", "list"]).contains(&name));
    assert!(!ip_succeeds(&["-n", &name, "link", "show"]));
}

#[test]
fn run_in_runs_inside_the_namespace() {
    let namespace = scratch_netns("runin");
    let namespace_file = format!("{}/{}", netns::NETNS_RUN_DIR, namespace.name());
    let expected = netns_identity(&namespace_file);

    let bridge_made = netns::run_in(namespace.name(), move || {
        let here = current_thread_netns();
        // Never create anything unless we are really in the test namespace.
        assert_eq!(here, expected, "run_in thread is not in the namespace");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let nl = Netlink::connect().expect("connect");
            nl.create_bridge("trt-runin").await
        })
    })
    .expect("run_in");
    bridge_made.expect("creating a bridge inside the namespace");

    assert!(ip_succeeds(&[
        "-n",
        namespace.name(),
        "link",
        "show",
        "trt-runin"
    ]));
    assert!(
        !ip_succeeds(&["link", "show", "trt-runin"]),
        "the bridge leaked into the host namespace"
    );
    assert_ne!(
        current_thread_netns(),
        expected,
        "the caller's thread must not move"
    );
}

#[test]
fn run_in_a_missing_namespace_fails_without_running() {
    let result = netns::run_in(&scratch_name("missing"), || panic!("must not run"));
    assert!(result.is_err_and(|err| err.is_not_found()));
}

#[test]
fn run_in_passes_panics_on() {
    let namespace = scratch_netns("panic");
    let name = namespace.name().to_owned();
    let outcome = std::panic::catch_unwind(move || netns::run_in(&name, || panic!("boom inside")));
    assert!(
        outcome.is_err(),
        "the panic inside run_in should reach the caller"
    );
}

#[test]
fn enter_moves_only_the_calling_thread() {
    let namespace = scratch_netns("enter");
    let expected = netns_identity(&format!("{}/{}", netns::NETNS_RUN_DIR, namespace.name()));
    let name = namespace.name().to_owned();
    let inside = std::thread::spawn(move || {
        netns::enter(&name).expect("enter");
        current_thread_netns()
    })
    .join()
    .expect("thread");
    assert_eq!(inside, expected);
    assert_eq!(current_thread_netns(), host_netns());
}

/// Kills the child on drop so a failing assertion leaves no `sleep` behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pids_in_finds_a_child_started_in_the_namespace() {
    let namespace = scratch_netns("pids");
    let namespace_file = netns::open(namespace.name()).expect("open");
    let fd = namespace_file.as_raw_fd();
    let mut command = Command::new("sleep");
    command.arg("30");
    // SAFETY: enter_fd only calls setns, which is async-signal-safe.
    unsafe {
        command.pre_exec(move || netns::enter_fd(fd));
    }
    let child = KillOnDrop(command.spawn().expect("spawning sleep"));
    let pid = i32::try_from(child.0.id()).expect("pid fits i32");

    // The child is in the namespace from its first instruction, but allow
    // for /proc lagging behind the fork on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !netns::pids_in(namespace.name()).contains(&pid) {
        assert!(Instant::now() < deadline, "pids_in never listed {pid}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!netns::pids_in(namespace.name()).contains(&(std::process::id() as i32)));

    let iproute_pids = ip(&["netns", "pids", namespace.name()]);
    assert!(
        iproute_pids
            .lines()
            .any(|line| line.trim() == pid.to_string()),
        "{iproute_pids}"
    );
}

#[test]
fn pids_in_a_missing_namespace_is_empty() {
    assert!(netns::pids_in(&scratch_name("nopids")).is_empty());
}
