//! Compiles etcd's v3 protos (copied verbatim from etcd 3.4.23, Debian's
//! golang-etcd-server-dev) into the Rust code under crates/store/src/etcd/proto: clients
//! (for `EtcdStore`) and server traits (for serving the embedded store over etcd's own
//! protocol). No transport code: the store crate brings its own connectors and listeners.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let includes = [root.join("proto")];
    let files = ["etcd/etcdserver/etcdserverpb/rpc.proto"];
    let descriptors = protox::compile(files, includes)?;
    let out = root.join("../../crates/store/src/etcd/proto");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_transport(false)
        .out_dir(&out)
        .compile_fds(descriptors)?;
    // Option-only packages generate empty or unused modules: keep only what the client uses.
    for unused in ["gogoproto.rs", "google.api.rs", "google.protobuf.rs"] {
        let _ = std::fs::remove_file(out.join(unused));
    }
    Ok(())
}
