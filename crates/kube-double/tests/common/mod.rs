//! A plain HTTP/1.1 client for the double (hyper's connection API, as the lab reads agents).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    accept: &str,
    body: Option<&Value>,
) -> Response<Incoming> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the double");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let body = body
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", content_type)
        .header("accept", accept)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.send_request(req).await.expect("request")
}

/// A request with a JSON body; the status code and the JSON answer.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    call_accept(addr, method, path, content_type, "application/json", body).await
}

pub async fn call_accept(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    accept: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let resp = send(addr, method, path, content_type, accept, body).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    call(addr, "GET", path, "application/json", None).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    call(addr, "POST", path, "application/json", Some(body)).await
}

pub async fn put(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    call(addr, "PUT", path, "application/json", Some(body)).await
}

pub async fn patch(addr: SocketAddr, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
    call(addr, "PATCH", path, content_type, Some(body)).await
}

pub fn rv(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resourceVersion string")
        .parse()
        .unwrap()
}

/// A watch's newline-delimited JSON events.
pub struct Watch {
    body: Incoming,
    buf: Vec<u8>,
}

impl Watch {
    pub async fn open(addr: SocketAddr, path: &str) -> Watch {
        let resp = send(
            addr,
            "GET",
            path,
            "application/json",
            "application/json",
            None,
        )
        .await;
        assert_eq!(resp.status().as_u16(), 200, "watch {path}");
        Watch {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next event, or `None` if the stream ends or nothing comes within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=i).collect();
                    return Some(serde_json::from_slice(&line).expect("an event is one JSON line"));
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(5))
            .await
            .expect("an event within 5 s")
    }

    /// The next event that is not a bookmark.
    pub async fn next_change(&mut self) -> Value {
        loop {
            let e = self.next().await;
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }
}
