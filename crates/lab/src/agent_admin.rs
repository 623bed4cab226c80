//! Reading a node agent's admin endpoint (metrics, readiness, state) over HTTP/1 with
//! hyper. The connection is opened from inside the node's own namespace, where the agent
//! listens on loopback: the host's namespace is never connected to it.

use crate::processes;
use crate::state::LabState;
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use trellis_dataplane::netns;

/// The longest one request may take: a SIGSTOPped agent's kernel still accepts the
/// connection, and only a deadline tells it is silent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A node agent's metrics (OpenMetrics text).
pub async fn metrics(lab: &LabState, node: &str) -> anyhow::Result<String> {
    match page(lab, node, "/metrics").await? {
        (200, body) => Ok(body),
        (status, body) => bail!("{node}'s agent answered /metrics with {status}: {body:.200}"),
    }
}

/// A node agent's readiness: `Ok(true)` when `/readyz` answers 200, `Ok(false)` on 503.
pub async fn ready(lab: &LabState, node: &str) -> anyhow::Result<bool> {
    match page(lab, node, "/readyz").await? {
        (200, _) => Ok(true),
        (503, _) => Ok(false),
        (status, body) => bail!("{node}'s agent answered /readyz with {status}: {body:.200}"),
    }
}

/// One page: status code and body.
async fn page(lab: &LabState, node: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let netns = lab.spec.node(node)?.netns.clone();
    let exchange = async {
        let stream = netns::run_in(&netns, || {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], processes::METRICS_PORT));
            let stream = std::net::TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
            stream.set_nonblocking(true)?;
            std::io::Result::Ok(stream)
        })??;
        let stream = tokio::net::TcpStream::from_std(stream)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))
        .and_then(|r| r)
        .with_context(|| format!("reading {path} of {node}'s agent"))
}
