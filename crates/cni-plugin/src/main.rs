//! `trellis-cni`: the CNI 1.1 plugin (issue 10, seed 003). Everything it needs is on the
//! node: the network configuration on stdin, the node-local file the agent keeps on
//! persistent disk, its own allocation state, and the kernel. No API server, store,
//! ClusterIP or DNS is on its path, so it works after a cold reboot with the control plane
//! down, and DEL works with the agent gone.
//!
//! This file only wires the edges — environment, stdin, files, netlink ([`links`]) — to
//! the pure verbs of `trellis_cni`, and prints the result or the error as the
//! specification says (error JSON on stdout, non-zero exit).

mod links;

use links::NetlinkLinks;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};
use trellis_cni::ipam::Attachment;
use trellis_cni::node::NodeNetwork;
use trellis_cni::spec::{
    CNI_VERSION, CniError, Invocation, NetConf, Verb, chained, code, version_answer,
};
use trellis_cni::{state, verbs};

/// How long a call waits for another call's lock on the allocation state before it
/// answers "try again later".
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one netlink request may take.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
/// The agent refreshes the ready file every second while the data plane is programmed;
/// older than this, it is stale (the agent is gone or stuck).
const READY_FRESH: Duration = Duration::from_secs(5);
/// More configuration than any conflist needs.
const MAX_STDIN: u64 = 1 << 20;

fn main() {
    if let Ok(job) = std::env::var(links::UNPLUG_ENV) {
        std::process::exit(unplug_helper(&job));
    }
    let mut version = CNI_VERSION.to_string();
    let outcome = run(&mut version);
    let mut out = std::io::stdout().lock();
    let code = match outcome {
        Ok(Some(answer)) => {
            let _ = writeln!(out, "{answer}");
            0
        }
        Ok(None) => 0,
        Err(mut error) => {
            error.cni_version = version;
            let _ = writeln!(out, "{}", serde_json::to_string(&error).unwrap_or_default());
            1
        }
    };
    let _ = out.flush();
    std::process::exit(code);
}

fn run(version: &mut String) -> Result<Option<Value>, CniError> {
    let invocation = Invocation::from_env(|name| std::env::var(name).ok())?;
    if invocation.verb == Verb::Version {
        return Ok(Some(version_answer()));
    }
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN)
        .read_to_end(&mut stdin)
        .map_err(|e| CniError::new(code::IO_FAILURE, "reading stdin", e.to_string()))?;
    let conf = NetConf::parse(&stdin)?;
    version.clone_from(&conf.cni_version);
    let who = || Attachment {
        container_id: invocation.container_id.clone().unwrap_or_default(),
        ifname: invocation.ifname.clone().unwrap_or_default(),
    };
    let netns = invocation.netns.clone().unwrap_or_default();
    let ipam = Path::new(&conf.ipam_file);
    match invocation.verb {
        Verb::Add => {
            let node = node_network(&conf)?;
            let mut links = NetlinkLinks::connect(NETLINK_TIMEOUT, &conf.ipam_file)?;
            let pod = invocation.pod(&conf.labels, &conf.ports);
            let result = with_state(ipam, |s| {
                let result = verbs::add(s, &mut links, &node, &who(), &netns)?;
                s.identify(&who(), pod);
                Ok(result)
            })?;
            wait_for_policy(&conf, &who().to_string());
            Ok(Some(chained(
                conf.prev_result.as_ref(),
                result.encode(&conf.cni_version),
            )))
        }
        Verb::Del => {
            // Without the node file the links are still found by name.
            let node = node_network(&conf).ok();
            let mut links = NetlinkLinks::connect(NETLINK_TIMEOUT, &conf.ipam_file)?;
            match with_state(ipam, |s| verbs::del(s, &mut links, node.as_ref(), &who())) {
                Ok(()) => Ok(None),
                // Held by another call: the runtime retries, and the address is released
                // then rather than leaked now.
                Err(e) if e.code == code::TRY_AGAIN_LATER => Err(e),
                // An unreadable state cannot hold this attachment's address anyone can
                // use; the links go, and DEL succeeds as the specification requires.
                Err(_) => {
                    let _ = verbs::del(&mut Default::default(), &mut links, node.as_ref(), &who());
                    Ok(None)
                }
            }
        }
        Verb::Check => {
            let node = node_network(&conf)?;
            let mut links = NetlinkLinks::connect(NETLINK_TIMEOUT, &conf.ipam_file)?;
            let allocations = state::read(ipam)?;
            verbs::check(
                &allocations,
                &mut links,
                &node,
                &who(),
                &netns,
                conf.prev_result.as_ref(),
            )?;
            Ok(None)
        }
        Verb::Gc => {
            let Some(valid) = &conf.valid_attachments else {
                // Nothing says what is valid: collecting would free live pods' addresses.
                return Ok(None);
            };
            let valid = valid
                .iter()
                .map(|v| Attachment {
                    container_id: v.container_id.clone(),
                    ifname: v.ifname.clone(),
                })
                .collect();
            let node = node_network(&conf).ok();
            let mut links = NetlinkLinks::connect(NETLINK_TIMEOUT, &conf.ipam_file)?;
            with_state(ipam, |s| {
                Ok(verbs::gc(s, &mut links, node.as_ref(), &valid))
            })?;
            Ok(None)
        }
        Verb::Status => {
            verbs::status(is_fresh(Path::new(&conf.ready_file)))?;
            Ok(None)
        }
        Verb::Version => Ok(Some(version_answer())),
    }
}

/// The detached helper DEL and GC start to remove a host end (`INDEX NAME`).
fn unplug_helper(job: &str) -> i32 {
    let Some((index, name)) = job
        .split_once(' ')
        .and_then(|(i, n)| Some((i.parse::<u32>().ok()?, n)))
    else {
        return 2;
    };
    match NetlinkLinks::connect(NETLINK_TIMEOUT, "")
        .and_then(|links| links.delete_if_named(index, name))
    {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The allocations under their lock, with those of an earlier boot forgotten first (their
/// containers cannot exist any more; on tmpfs, the default, the file is gone anyway).
fn with_state<T>(
    path: &Path,
    change: impl FnOnce(&mut trellis_cni::ipam::Allocations) -> Result<T, CniError>,
) -> Result<T, CniError> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    state::with_state(path, LOCK_TIMEOUT, |s| {
        if !boot.trim().is_empty() {
            s.since_boot(boot.trim());
        }
        change(s)
    })
}

/// The node-local file, with the configuration's MTU over the overlay's if it has one.
fn node_network(conf: &NetConf) -> Result<NodeNetwork, CniError> {
    let bytes = std::fs::read(&conf.node_file).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the node's network file {} cannot be read: the agent has not written it yet",
                conf.node_file
            ),
            e.to_string(),
        )
    })?;
    let mut node = NodeNetwork::parse(&bytes, &conf.node_file)?;
    if let Some(mtu) = conf.mtu {
        node.mtu = mtu;
    }
    Ok(node)
}

/// Waits, at most the configured time, until the agent says the attachment's network
/// policy is in place, so that the workload does not start before its rules (until then
/// the agent refuses its traffic). No wait when the agent does not enforce policy or is
/// not running (a cold boot with the agent still down): the pod gets its address, and its
/// traffic waits for the agent.
fn wait_for_policy(conf: &NetConf, attachment: &str) {
    let file = Path::new(&conf.policy_file);
    if conf.policy_wait.is_zero() || !file.exists() || !is_fresh(Path::new(&conf.ready_file)) {
        return;
    }
    let deadline = std::time::Instant::now() + conf.policy_wait;
    loop {
        let programmed = std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .is_some_and(|v| {
                v["attachments"]
                    .as_array()
                    .is_some_and(|list| list.iter().any(|a| a.as_str() == Some(attachment)))
            });
        if programmed {
            return;
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "trellis-cni: {attachment}: network policy not in place after {:?}; its traffic is refused until it is",
                conf.policy_wait
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn is_fresh(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .is_some_and(|age| age <= READY_FRESH)
}
