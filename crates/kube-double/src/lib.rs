//! An in-process Kubernetes API server double, over plain HTTP/1.1 on loopback, for testing
//! Trellis's Kubernetes backend and for pointing Debian's `kubectl` at a lab.
//!
//! # What it implements
//! Following the Kubernetes API conventions (api-conventions.md, "Concurrency Control and
//! Consistency", "Resource Versions", "Efficient detection of changes") and JSON as the real
//! API serves it:
//! - **Storage** of any object as JSON, keyed by group, resource, namespace and name, with one
//!   global resource version counter (served as opaque strings); the server sets
//!   `metadata.resourceVersion`, `uid`, `creationTimestamp` and `generation` (bumped when
//!   anything but `metadata` and `status` changes). A write that changes nothing keeps the
//!   version and emits no event.
//! - **Resources**: core `v1` nodes, namespaces (`default`, `kube-system`, `kube-public`,
//!   `kube-node-lease` exist from the start), services (type and cluster IP defaulted),
//!   pods, configmaps, events; `discovery.k8s.io/v1` endpointslices;
//!   `networking.k8s.io/v1` networkpolicies; `coordination.k8s.io/v1` leases; `apiextensions.k8s.io/v1` customresourcedefinitions —
//!   creating one registers its resource (every served version, scope, names, short names,
//!   `status` subresource, `additionalPrinterColumns`) and marks it `Established`; deleting one
//!   deletes its objects.
//! - **Verbs**: get; list (with `labelSelector` — equality, existence and set requirements —
//!   and `fieldSelector` on any dotted path, `metadata.name` included); watch (`watch=1|true`,
//!   `resourceVersion` to resume, `allowWatchBookmarks`, `timeoutSeconds`, the same
//!   selectors) streamed as newline-delimited `{"type","object"}` events; create (`409
//!   AlreadyExists`, `generateName`); update with the `metadata.resourceVersion` precondition
//!   (`409 Conflict`); patch (merge, JSON, strategic: see the `patch` module); delete with
//!   `preconditions.resourceVersion` and `uid` (`409 Conflict`); the `status` subresource for
//!   nodes, services, pods, namespaces and CRDs that declare it (writes to the object keep the
//!   status, writes to `/status` change only the status). Errors are `Status` objects.
//! - **Watch semantics**: a bounded, global event history; resuming from a version older than it
//!   (or one dropped by [`KubeDoubleHandle::compact`]) is answered with a `200` stream holding
//!   one `ERROR` event whose object is a `410 Expired` Status ("too old resource version"), as
//!   the real API does; a watcher that falls too far behind gets the same. A bookmark carries
//!   the current version and is sent only after every event up to it. A watch from a version
//!   not reached yet waits for it. With a selector, an object modified into the selection
//!   arrives as `ADDED` and one modified out of it as `DELETED`.
//! - **Discovery** (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/{g}`, `/apis/{g}/{v}`) and
//!   **Tables** (`Accept: …;as=Table;v=v1;g=meta.k8s.io`, on gets, lists and watches, as
//!   `kubectl get [-w]` asks) so that `kubectl get`, `get -w`, `describe` and `apply` work:
//!   tested with Debian's kubectl 1.20 (package kubernetes-client) and kubectl 1.32.
//!
//! # What it approximates or leaves out (plainly)
//! - The event history is one for all resources (as etcd's revisions are), not one per
//!   resource as in the real API's watch cache: heavy writes to one resource expire another's
//!   old versions sooner. Size it with [`Options::history`].
//! - A list always returns the newest state: `resourceVersion`/`resourceVersionMatch` on a list
//!   are accepted and ignored, and so are `limit` and `continue` (one page, no token).
//! - Strategic merge patch merges by key only the lists named in a small table (service
//!   ports, conditions, addresses, containers, finalizers, pod CIDRs, …): other lists are
//!   replaced whole. Server-side apply (`apply-patch+yaml`) is refused with 415.
//! - No validation against schemas (a CRD's `openAPIV3Schema` is stored, not enforced), no
//!   defaulting beyond what is listed above, no admission, no finalizers or
//!   `deletionTimestamp` (deletion is immediate), no garbage collection, no cascading deletion
//!   of a namespace's contents, objects may be created in namespaces that do not exist.
//! - Field selectors are accepted on any path (the real API accepts a few fields per kind and
//!   refuses the others). No `deletecollection`, no legacy `/api/v1/watch/…` paths. A create
//!   of a namespaced kind on the cluster-wide path goes to the body's namespace (or
//!   `default`) instead of being refused.
//! - `/openapi/v2` and `/openapi/v3` answer 404: `kubectl apply` needs `--validate=false`.
//! - Aggregated discovery is not served: clients asking for it get the plain documents.
//! - Built-in kinds' table columns approximate the real printers (nodes: Status, Roles, Age,
//!   Version; services: Type, Cluster-IP, Port(s), Age; endpointslices: AddressType, Ports,
//!   Endpoints, Age; leases: Holder, Age); `date` cells are ages, as the server renders them.
//! - JSON only (no protobuf, no YAML bodies), plain HTTP, no authentication or authorization.

mod clock;
mod discovery;
mod patch;
mod resources;
mod router;
mod select;
mod status;
mod store;
mod strategic;
mod table;
mod watch;
mod watchstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::router::Shared;
use crate::store::State;

/// Tunables of a double.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events kept for watches that resume from a version (the rest are forgotten: 410).
    pub history: usize,
    /// How often a watch that allows bookmarks gets one (the real API: about a minute).
    pub bookmark_interval: Duration,
    /// How long a watch without `timeoutSeconds` lasts.
    pub watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history: 1000,
            bookmark_interval: Duration::from_secs(1),
            watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// The API server double.
#[derive(Debug, Clone, Default)]
pub struct KubeDouble {
    options: Options,
}

impl KubeDouble {
    pub fn new(options: Options) -> Self {
        KubeDouble { options }
    }

    /// Serves a double with the default options on `addr` (port 0 for any).
    pub async fn start(addr: SocketAddr) -> std::io::Result<KubeDoubleHandle> {
        Self::default().serve(addr).await
    }

    /// Serves this double on `addr` until the handle is dropped.
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<KubeDoubleHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(self.options.history)),
            options: self.options,
            server: addr.to_string(),
            watch_generation: tokio::sync::watch::channel(0).0,
        });
        let task = tokio::spawn(accept_forever(shared.clone(), async move || {
            listener.accept().await.map(|(stream, _)| stream)
        }));
        Ok(KubeDoubleHandle {
            addr,
            shared,
            tasks: vec![task],
        })
    }
}

/// Serves every connection `accept` yields until the task is dropped, which aborts them all.
async fn accept_forever<S, A>(shared: Arc<Shared>, mut accept: A)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    A: AsyncFnMut() -> std::io::Result<S>,
{
    let mut connections = JoinSet::new();
    loop {
        let Ok(stream) = accept().await else {
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| router::handle(shared.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("kube-double connection: {e}");
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

/// A running double; dropping it stops it.
pub struct KubeDoubleHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeDoubleHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeDoubleHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves the same API on a Unix socket too (replacing a stale socket file): how tools
    /// outside a network namespace reach a double that listens inside one.
    pub fn listen_unix(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        self.tasks.push(tokio::spawn(accept_forever(
            self.shared.clone(),
            async move || listener.accept().await.map(|(stream, _)| stream),
        )));
        Ok(())
    }

    /// The newest resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().resource_version()
    }

    /// Forgets the event history, as an etcd compaction does: watches resuming from any
    /// older version get `410 Expired`.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Ends every open watch, as a restart of the API server does: clients watch again
    /// from the last version they saw (with [`Self::compact`] first, they get 410).
    pub fn end_watches(&self) {
        self.shared.watch_generation.send_modify(|g| *g += 1);
    }

    /// A kubeconfig for this double (no credentials: the double has no authentication).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: double\n\
             current-context: double\nusers:\n- name: double\n  user: {{}}\n",
            self.url()
        )
    }
}
