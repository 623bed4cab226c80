//! Reading a node agent's admin endpoint (metrics, readiness) from inside the node's own
//! namespace, where it listens on loopback: the host's namespace is never connected to it.

use crate::processes;
use crate::state::LabState;
use anyhow::{Context, bail};
use std::time::Duration;
use trellis_dataplane::netns;

/// A node agent's metrics page (Prometheus text).
pub fn metrics_of(lab: &LabState, node: &str) -> anyhow::Result<String> {
    match agent_page(lab, node, "/metrics")? {
        (200, body) => Ok(body),
        (status, body) => bail!("{node}'s agent answered /metrics with {status}: {body:.200}"),
    }
}

/// A node agent's readiness: `Ok(true)` when `/readyz` answers 200, `Ok(false)` on 503.
pub fn ready_of(lab: &LabState, node: &str) -> anyhow::Result<bool> {
    match agent_page(lab, node, "/readyz")? {
        (200, _) => Ok(true),
        (503, _) => Ok(false),
        (status, body) => bail!("{node}'s agent answered /readyz with {status}: {body:.200}"),
    }
}

/// One page of a node agent's HTTP endpoint: status code and body.
fn agent_page(lab: &LabState, node: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let netns = lab.spec.node(node)?.netns.clone();
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let fetched = netns::run_in(&netns, move || -> std::io::Result<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], processes::METRICS_PORT));
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        // A SIGSTOPped agent's kernel still accepts: only the read tells it is silent.
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })?
    .with_context(|| format!("reading {path} of {node}'s agent"))?;
    let status = fetched
        .strip_prefix("HTTP/1.0 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match (status, fetched.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Ok((status, body.to_string())),
        _ => bail!("unexpected answer from {node}'s agent for {path}: {fetched:.200}"),
    }
}
