//! Serves a double until interrupted, for poking at it with kubectl or curl:
//! `cargo run -p trellis-kube-double --example serve -- 127.0.0.1:6443`, then
//! `kubectl --server http://127.0.0.1:6443 get nodes`.

use trellis_kube_double::KubeDouble;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:6443".into());
    let api = KubeDouble::start(addr.parse().expect("an address such as 127.0.0.1:6443")).await?;
    println!("serving {}", api.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
