//! `trellis lab demo`: an incident replayed on a lab of its own, narrated step by step
//! with a summary table (or, with `--json`, a JSON summary on stdout):
//!
//! - [`seed000`]: a gateway stops forwarding new flows while it still answers pings and
//!   handshakes; it is detected, replaced, healed and given its share back;
//! - [`seed001`]: the store (etcd) stops answering; the leader stops its leader-only work and
//!   nothing else stops;
//! - [`seed002`]: a Service's backend pod is deleted and another node's proxy rules are
//!   tampered with; no new connection goes to the dead pod, the drift is repaired;
//! - [`seed003`]: every node reboots at once with the store down: pods through a plugin
//!   chain that needs the API server's ClusterIP get no address, pods through `trellis-cni`
//!   all do, and reach each other, within a second or two.

mod lab;
mod seed000;
mod seed001;
mod seed002;
mod seed003;

use crate::{build, state};
use std::io::Write;
use trellis_model::Granularity;

/// The incidents the demo replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seed {
    /// A gateway stops forwarding new flows while it still answers pings and handshakes.
    Gateway000,
    /// The store stops answering; the leader must stop without taking anything down.
    Lease001,
    /// A Service's backend pod dies and a node's proxy rules are tampered with: proxy
    /// rules must never lead to a dead pod for long.
    Proxy002,
    /// Every node reboots at once with the store down; pods must still get addresses.
    ColdBoot003,
}

/// Replays one incident on a lab of its own, narrates each step and a summary table, and
/// removes the lab. With `json`, the narrative goes to stderr and the summary is printed
/// on stdout as one JSON object. `Ok(true)` when the demo passed.
///
/// Interrupted (Ctrl-C, SIGTERM, SIGHUP), the demo is dropped wherever it is and the lab
/// it was building or running is removed by the command's guard ([`crate::guard`]).
pub async fn run(
    name: &str,
    granularity: Granularity,
    seed: Seed,
    json: bool,
) -> anyhow::Result<bool> {
    let name = name.to_string();
    crate::spec::validate_lab_name(&name)?;
    crate::narrate::to_stderr(json);
    if state::dir(&name).join("lab.json").exists() {
        say!("== removing a leftover lab {name}");
        build::teardown(&name)?;
    }
    let result = async {
        anyhow::Ok(if seed == Seed::Lease001 {
            let s = seed001::scenario(&name).await?;
            (
                s.table(),
                s.passed(),
                SEED_001_PASSED,
                serde_json::to_value(&s)?,
            )
        } else if seed == Seed::ColdBoot003 {
            let s = seed003::scenario(&name).await?;
            (
                s.table(),
                s.passed(),
                SEED_003_PASSED,
                serde_json::to_value(&s)?,
            )
        } else if seed == Seed::Proxy002 {
            let s = seed002::scenario(&name).await?;
            (
                s.table(),
                s.passed(),
                SEED_002_PASSED,
                serde_json::to_value(&s)?,
            )
        } else {
            let s = seed000::scenario(&name, granularity).await?;
            (
                s.table(),
                s.passed(),
                SEED_000_PASSED,
                serde_json::to_value(&s)?,
            )
        })
    }
    .await;
    say!("\n== trellis lab down --name {name}");
    let removed = match build::teardown(&name) {
        Ok(d) => {
            say!(
                "removed {} namespaces and {} processes",
                d.namespaces,
                d.processes
            );
            Some(d)
        }
        Err(e) => {
            eprintln!("teardown failed: {e:#}");
            None
        }
    };
    let (table, passed, success, summary) = result?;
    say!("\n{table}");
    if passed {
        say!("{success}");
    } else {
        say!("demo FAILED: see the steps above");
    }
    if json {
        let mut out = serde_json::json!({
            "seed": seed.number(),
            "lab": name,
            "passed": passed,
            "removed_namespaces": removed.as_ref().map(|d| d.namespaces),
            "removed_processes": removed.as_ref().map(|d| d.processes),
        });
        if let (Some(out), serde_json::Value::Object(fields)) = (out.as_object_mut(), summary) {
            out.extend(fields);
        }
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
    }
    Ok(passed)
}

impl Seed {
    /// As on the command line: `--seed 000`.
    pub fn number(self) -> &'static str {
        match self {
            Seed::Gateway000 => "000",
            Seed::Lease001 => "001",
            Seed::Proxy002 => "002",
            Seed::ColdBoot003 => "003",
        }
    }
}

const SEED_000_PASSED: &str = "demo passed: the gateway that stopped forwarding was routed around and took its share back after the hold-down";
const SEED_001_PASSED: &str = "demo passed: the leader stopped at its renew deadline, nothing else stopped, and a leader came back with the store";
const SEED_002_PASSED: &str = "demo passed: no new connection went to the deleted pod once its endpoint was terminating, none failed, and the tampered rules were repaired by the proxy's own audit";
const SEED_003_PASSED: &str = "demo passed: after a cold boot with the store down every pod got its address from trellis-cni and every pair of pods reached each other, while a chain that needs the API's ClusterIP addressed none";
