//! The Kubernetes backend (issue 11; design in docs/kubernetes.md): each Trellis record
//! as the native object the cluster already has, read and written through the API server,
//! never through a service address.
//!
//! The pure mapping has no IO, so every rule is tested by value:
//!
//! - [`api_address`]: where the agent reaches the API server: a flag, the kubelet's
//!   kubeconfig, and only then the in-cluster service address (seed 003);
//! - [`annotations`]: the annotation keys Trellis writes on its Node, and Kilo's, which it
//!   honours so that a Kilo cluster's configuration carries over;
//! - [`node`]: a Kubernetes `Node` object to Trellis's node record (what the agent
//!   published in Trellis's annotations, overridden by Kilo's user-set ones), and the
//!   merge patch an agent sends for its own Node, only when something changed;
//! - [`location`]: the per-location custom resource (its CRD, the leader's slots, the
//!   observers' conflict-free opinion patches);
//! - [`peer`]: Kilo's `kilo.squat.ai/v1alpha1` `Peer`, accepted unchanged, to an external
//!   peer.
//!
//! - [`client`]: the edge, over kube-rs: list, watch from a version (410 in the stream:
//!   list afresh), merge patches, each bounded in time.
//! - [`store`]: Trellis's `Store` on the API: a mirror kept by one reflector per kind,
//!   writes as the smallest patch of the object that holds the record, leases as Lease
//!   objects, the leader election on one Lease.
//!
//! Objects come in as `serde_json::Value`, as the API serves them: the client on top
//! decides how it fetches them, and these functions never depend on it. Every refusal
//! names the object, the field or annotation, and the value.

pub mod annotations;
pub mod api_address;
pub mod client;
pub mod location;
pub mod node;
pub mod peer;
pub mod store;

/// Checks (or, with `TRELLIS_WRITE_CRDS=1`, rewrites) `deploy/crds/NAME` against the
/// manifest the code defines, so the two cannot drift apart.
#[cfg(test)]
fn deploy_file_matches(name: &str, source: &str, manifest: &serde_json::Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/crds")
        .join(name);
    if std::env::var_os("TRELLIS_WRITE_CRDS").is_some() {
        let generated = format!(
            "# Generated from {source}; rewrite with TRELLIS_WRITE_CRDS=1 cargo test -p trellis-kube crd_in_deploy.\n{}",
            serde_yaml_ng::to_string(manifest).unwrap()
        );
        std::fs::write(&path, generated).unwrap();
    }
    let on_disk =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let parsed: serde_json::Value = serde_yaml_ng::from_str(&on_disk).unwrap();
    assert_eq!(&parsed, manifest, "{} is out of date", path.display());
}
