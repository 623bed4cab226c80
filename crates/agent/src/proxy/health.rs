//! Health-check node ports (`healthCheckNodePort`): a cloud load balancer in front of a
//! LoadBalancer service with `externalTrafficPolicy: Local` asks every node whether it has
//! a ready endpoint of the service, and sends traffic only to nodes that answer 200. In
//! seed 002 the load balancers were the first to notice stale nodes; here they are told
//! the truth from the plan: 200 with the count of local ready endpoints, 503 without any,
//! and 503 on every port while the proxy's last successful sync is too old (a node whose
//! rules may be stale should be drained, whatever it once had).
//!
//! Each port is served by its own task, so a port that cannot be bound (another process
//! holds it) is retried with backoff and never holds up the others.

use crate::backoff::Backoff;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_proxy::HealthCheck;

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The body kube-proxy answers with, so existing load-balancer tooling reads it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceRef<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The answer for one health-check port.
pub fn answer(check: Option<&HealthCheck>, proxy_healthy: bool) -> (StatusCode, String) {
    let Some(check) = check else {
        return (
            StatusCode::NOT_FOUND,
            "no service uses this health-check port\n".into(),
        );
    };
    let (namespace, name) = check
        .service
        .split_once('/')
        .unwrap_or(("", &check.service));
    let body = Body {
        service: ServiceRef { namespace, name },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let status = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        serde_json::to_string(&body).expect("plain struct serialises"),
    )
}

/// What the servers answer from: the current checks and the proxy's health.
#[derive(Clone, Default)]
pub struct Shared {
    checks: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
}

impl Shared {
    fn get(&self, port: u16) -> Option<HealthCheck> {
        self.checks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .cloned()
    }
}

/// Keeps one server per health-check port on each of `addresses`, following `desired`;
/// `healthy` says whether the proxy's last sync is recent. Runs until `desired` closes.
pub async fn serve(
    addresses: Vec<IpAddr>,
    mut desired: watch::Receiver<BTreeMap<u16, HealthCheck>>,
    healthy: watch::Receiver<bool>,
) {
    let shared = Shared::default();
    let mut servers: BTreeMap<(IpAddr, u16), JoinHandle<()>> = BTreeMap::new();
    loop {
        let checks = desired.borrow_and_update().clone();
        let wanted: Vec<(IpAddr, u16)> = checks
            .keys()
            .flat_map(|port| addresses.iter().map(move |a| (*a, *port)))
            .collect();
        *shared.checks.write().unwrap_or_else(|e| e.into_inner()) = checks;
        servers.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
                tracing::info!(addr = %key.0, port = key.1, "health-check port closed");
            }
            keep
        });
        for key in wanted {
            servers.entry(key).or_insert_with(|| {
                tokio::spawn(serve_port(
                    SocketAddr::new(key.0, key.1),
                    shared.clone(),
                    healthy.clone(),
                ))
            });
        }
        if desired.changed().await.is_err() {
            break;
        }
    }
    for task in servers.values() {
        task.abort();
    }
}

async fn serve_port(addr: SocketAddr, shared: Shared, healthy: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(e) => {
                tracing::warn!(%addr, "health-check port cannot be bound, retrying: {e}");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    tracing::info!(%addr, "health-check port open");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        let healthy = healthy.clone();
        let port = addr.port();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let (status, body) = answer(shared.get(port).as_ref(), *healthy.borrow());
                let mut response = Response::new(Full::new(Bytes::from(body)));
                *response.status_mut() = status;
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(2))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            service: "shop/web".into(),
            local_endpoints,
        }
    }

    #[test]
    fn a_node_with_local_endpoints_is_healthy_and_one_without_is_not() {
        let (status, body) = answer(Some(&check(2)), true);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
        );
        assert_eq!(
            answer(Some(&check(0)), true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn a_proxy_whose_rules_may_be_stale_drains_every_service() {
        let (status, body) = answer(Some(&check(3)), false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""serviceProxyHealthy":false"#));
    }

    #[test]
    fn unknown_ports_say_so() {
        assert_eq!(answer(None, true).0, StatusCode::NOT_FOUND);
    }

    /// The status code a GET gets, waiting up to a second for the port to open.
    async fn status_of(addr: SocketAddr) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..50 {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
                stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
                let mut reply = Vec::new();
                stream.read_to_end(&mut reply).await.ok()?;
                let line = String::from_utf8_lossy(&reply);
                return line.split(' ').nth(1)?.parse().ok();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    #[tokio::test]
    async fn ports_are_opened_and_closed_as_the_checks_change() {
        let (tx, rx) = watch::channel(BTreeMap::new());
        let (_healthy_tx, healthy) = watch::channel(true);
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        // A free port, found by binding and releasing it.
        let port = std::net::TcpListener::bind((loopback, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = tokio::spawn(serve(vec![loopback], rx, healthy));
        tx.send(BTreeMap::from([(port, check(1))])).unwrap();
        let status = status_of(SocketAddr::new(loopback, port)).await;
        assert_eq!(status, Some(200));
        tx.send(BTreeMap::from([(port, check(0))])).unwrap();
        let mut seen = None;
        for _ in 0..50 {
            seen = status_of(SocketAddr::new(loopback, port)).await;
            if seen == Some(503) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, Some(503));
        tx.send(BTreeMap::new()).unwrap();
        let mut closed = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect((loopback, port))
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "the port closes when no service needs it");
        drop(tx);
        server.await.unwrap();
    }
}
