//! The admin endpoint over HTTP/1 with hyper. Requests are answered by [`respond`], a
//! plain function of the shared state; the server around it bounds every connection in
//! time, so a client that stalls is dropped and never blocks the next.

use super::Admin;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The longest one connection may live: scrapes take milliseconds.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";

/// Serves until the process ends; binding is retried (the address may not exist yet).
pub async fn serve(addr: SocketAddr, admin: Admin) {
    let listener = crate::backoff::until_ok(
        &format!("admin listener on {addr}"),
        Duration::from_millis(200),
        Duration::from_secs(30),
        || tokio::net::TcpListener::bind(addr),
    )
    .await;
    tracing::info!(%addr, "serving /metrics, /readyz, /healthz, /healthz/proxy and /debug/state");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: pause rather than spin.
                tracing::warn!("admin listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(&admin, req.method(), req.uri().path(), Instant::now());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// The answer to one request.
pub fn respond(admin: &Admin, method: &Method, path: &str, now: Instant) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            format!("{method} is not served here: use GET\n"),
        );
    }
    match path {
        "/" | "/metrics" => reply(StatusCode::OK, OPENMETRICS, admin.metrics.render(now)),
        "/readyz" => judged(admin.readiness(now), "ready", "not ready"),
        "/healthz" => judged(admin.liveness(now), "alive", "not alive"),
        "/healthz/proxy" => judged(
            admin.metrics.proxy().last_sync.judge(now),
            "proxy healthy",
            "proxy unhealthy",
        ),
        "/debug/state" => reply(StatusCode::OK, JSON, admin.debug_json()),
        other => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            format!(
                "no page {other:?}: try /metrics, /readyz, /healthz, /healthz/proxy or /debug/state\n"
            ),
        ),
    }
}

fn judged(verdict: Result<String, String>, yes: &str, no: &str) -> Response<Full<Bytes>> {
    match verdict {
        Ok(why) => reply(StatusCode::OK, TEXT, format!("{yes}: {why}\n")),
        Err(why) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("{no}: {why}\n"),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::DebugState;
    use http_body_util::BodyExt;

    async fn body(r: Response<Full<Bytes>>) -> String {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn requests_are_routed_by_path_and_judged_by_the_last_pass() {
        let admin = Admin::new("n1", Duration::from_secs(60));
        let now = Instant::now();
        let get = |path: &str| respond(&admin, &Method::GET, path, now);
        assert_eq!(get("/readyz").status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get("/healthz").status(), StatusCode::OK, "waiting is alive");
        admin.pass(
            now,
            DebugState {
                revision: 9,
                health: "forwarding",
                ..Default::default()
            },
        );
        let ready = get("/readyz");
        assert_eq!(ready.status(), StatusCode::OK);
        assert!(body(ready).await.contains("revision 9"));
        let metrics = get("/metrics");
        assert_eq!(metrics.headers()[CONTENT_TYPE], OPENMETRICS);
        let text = body(metrics).await;
        assert!(
            text.contains("trellis_data_plane_applied{node=\"n1\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let state: serde_json::Value =
            serde_json::from_str(&body(get("/debug/state")).await).unwrap();
        assert_eq!(state["node"], "n1");
        assert_eq!(state["last_pass"]["revision"], 9);
        assert_eq!(get("/").status(), StatusCode::OK);
        assert_eq!(get("/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&admin, &Method::POST, "/metrics", now).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        admin.pass(
            now,
            DebugState {
                revision: 10,
                errors: vec!["route 10.244.3.0/24: EPERM".into()],
                ..Default::default()
            },
        );
        let unready = get("/readyz");
        assert_eq!(unready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(unready).await.contains("EPERM"));
        assert_eq!(
            get("/healthz").status(),
            StatusCode::OK,
            "failing is not dead"
        );
    }

    #[tokio::test]
    async fn serves_over_tcp_and_drops_a_silent_client() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let admin = Admin::new("n1", Duration::from_secs(60));
        let server = tokio::spawn(serve(addr, admin));
        let connect = || async {
            loop {
                if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        // A client that connects and says nothing does not hold up the next one.
        let _silent = connect().await;
        let mut client = connect().await;
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut answer))
            .await
            .expect("answered while another client stalls")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.abort();
    }
}
