//! What the demos share: their lab (brought up and checked pair by pair, each step
//! printed) and their closing table.

use crate::check;
use crate::spec::LabParams;
use crate::state::LabState;
use std::time::Duration;
use trellis_model::{GatewayHealth, Granularity};

/// A demo's closing table: what happened, and when or how much.
pub(super) fn summary_table(rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{:width$}  {}\n", "SUMMARY", "");
    for (k, v) in rows {
        out.push_str(&format!("{k:width$}  {v}\n"));
    }
    out
}

/// The demos' lab: 6 nodes in 2 locations, 2 gateways each, brought up and checked
/// pair by pair, with each step printed. Returns the lab and whether every pair answered.
pub(super) async fn up_and_check(
    name: &str,
    granularity: Granularity,
    store: crate::store::StoreKind,
) -> anyhow::Result<(LabState, bool)> {
    up_and_check_with(name, granularity, store, DEFAULT_RESYNC).await
}

/// The agents' default resync (and proxy audit) interval in the demos' labs, in seconds.
const DEFAULT_RESYNC: u64 = 10;

/// [`up_and_check`] with agents that resync (and audit their proxy rules) every
/// `agent_resync` seconds.
pub(super) async fn up_and_check_with(
    name: &str,
    granularity: Granularity,
    store: crate::store::StoreKind,
    agent_resync: u64,
) -> anyhow::Result<(LabState, bool)> {
    let resync = if agent_resync == DEFAULT_RESYNC {
        String::new()
    } else {
        format!(" --agent-resync {agent_resync}")
    };
    say!(
        "== trellis lab up --name {name} --nodes 6 --locations 2 --gateways 2 --granularity {granularity} --store {}{resync}",
        store.name()
    );
    let params = LabParams {
        name: name.to_string(),
        nodes: 6,
        locations: 2,
        granularity,
        gateways: 2,
        public_per_location: 2,
        pods_per_node: 1,
        agent_resync,
        gateway_health: GatewayHealth::Forwarding,
        store,
        dual_stack: false,
    };
    let up = crate::up::up(&params, Duration::from_secs(60)).await?;
    say!("{}", crate::up::summary(&up));
    say!("{}", crate::status::show(name, false).await?.trim_end());
    let lab = LabState::load(name)?;
    say!("\n== trellis lab check --name {name}   (ICMP between every pair of pods)");
    let report = check::all_pairs(&lab.spec, 3, Duration::from_secs(1)).await?;
    say!("{}", check::matrix(&report).trim_end());
    Ok((lab, report.ok))
}

/// UTC time of day with milliseconds, for lining the demo up with the agents' logs.
pub(super) fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, ms) = (now.as_secs() % 86_400, now.subsec_millis());
    format!(
        "{:02}:{:02}:{:02}.{ms:03} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}
