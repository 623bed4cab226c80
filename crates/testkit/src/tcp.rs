//! TCP through test namespaces: a server that answers every connection with a fixed text,
//! and a client that says what it got (or why it got nothing), and a store write of JSON.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;
use trellis_dataplane::netns;
use trellis_store::Store;

/// A server bound to `addr` inside namespace `ns` that answers each connection with
/// `answer` and closes it; runs until the test process ends.
pub fn serve(ns: &str, addr: &'static str, answer: &'static str) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("entering the server's namespace");
        let listener = TcpListener::bind(addr).expect("binding the server");
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(answer.as_bytes());
        }
    });
}

/// Connects from namespace `ns` to `to` and reads the answer; the error is why not
/// (`timed out` for a dropped connection, `connection refused` for a rejected one).
pub fn exchange(ns: &str, to: &str, timeout: Duration) -> Result<String, String> {
    let to: SocketAddr = to.parse().expect("an address and port");
    netns::run_in(ns, move || {
        let mut stream =
            TcpStream::connect_timeout(&to, timeout).map_err(|e| e.kind().to_string())?;
        stream.set_read_timeout(Some(timeout)).unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| e.to_string())?;
        Ok(answer)
    })
    .expect("entering the client's namespace")
}

/// Writes `value` as JSON under `key`.
pub async fn put_json(store: &dyn Store, key: &str, value: serde_json::Value) {
    store
        .put(key, serde_json::to_vec(&value).unwrap())
        .await
        .unwrap();
}
