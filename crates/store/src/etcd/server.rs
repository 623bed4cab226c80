//! Serves an [`EmbeddedStore`] over etcd's own v3 gRPC API.
//!
//! Why it exists: the lab runs one store process and agents in other network namespaces
//! reach it over a path-based Unix socket. Speaking etcd's protocol there means agents have
//! ONE client path, [`EtcdStore`](super::EtcdStore), whatever the store behind it, and that
//! `etcdctl` can read, watch, and even take part (leases, `elect`) in a lab's store. The
//! embedded store stays the single source of truth; this module only translates.
//!
//! What is served, with etcd 3.4's semantics and error messages:
//! - KV: Range (single keys, `[key, range_end)`, `"\0"` for every key from `key` on,
//!   limit, sort, keys_only, count_only, min/max revision filters), Put (lease, prev_kv,
//!   ignore_value, ignore_lease), DeleteRange (prev_kv), Txn (every compare target and
//!   result, compares over ranges, nested txns, etcd's duplicate-key check), Compact.
//!   A read at a past revision is served when nothing in its range changed since then;
//!   otherwise it is answered Unimplemented (the store keeps no old versions of keys).
//! - Watch: create (key or range, start_revision, prev_kv, NOPUT/NODELETE filters, a
//!   client-chosen watch_id), cancel; events in revision order; a start revision older than
//!   the kept history is confirmed and then cancelled with `compact_revision`, as etcd does.
//!   Progress requests and `progress_notify` are ignored (no answer).
//! - Lease: Grant (with a client-chosen id too), Revoke, KeepAlive, TimeToLive, Leases.
//! - Maintenance: Status and Alarm listing (for `etcdctl endpoint status`); `endpoint
//!   health` is a plain read. Cluster: MemberList (this one member).
//! - Everything else (Auth, the rest of Maintenance and Cluster, other services) answers
//!   Unimplemented, naming what is missing.
//!
//! etcdctl 3.4 on a Unix socket: run it from the socket's directory with the bare file
//! name, `cd /dir/of/socket && ETCDCTL_API=3 etcdctl --endpoints unix://store.sock get
//! --prefix /trellis/`. With `unix:///abs/path` grpc-go sends the path as the HTTP/2
//! `:authority`, which this server's HTTP/2 stack (h2) rejects as malformed, and commands
//! that dial an endpoint directly (`endpoint status`) send `unix://store.sock` itself as the
//! authority: they work only over TCP, given as `127.0.0.1:PORT` without a scheme.
//!
//! Keys are the embedded store's raw key space: clients bring their own prefix (Trellis's
//! `EtcdStore` uses e.g. "/trellis/").
//!
//! Bounds: store operations are short synchronous steps under the store's lock, and a
//! range copies only shared pointers under it (messages are built after it is released),
//! so no request holds the others up for long. Every stream is bounded: a watcher that
//! falls [`WATCH_BUFFER`](crate::embedded::WATCH_BUFFER) events behind is cut off by the
//! store (writers never wait) and told so with a cancel whose reason is [`LAGGED_REASON`];
//! a client that stops reading only stops its own stream (bounded buffers, HTTP/2 flow
//! control); watches per stream are capped. Shutting down ends every stream and closes
//! the connections of clients that do not let go.

use super::proto::etcdserverpb as pb;
use super::proto::mvccpb;
use crate::embedded::{Change, ChangeKind, EmbeddedStore, Entry, Feed, KeyRange, Sink, State};
use crate::{LeaseId, Revision, StoreError};
use futures::Stream;
use pb::cluster_server::{Cluster, ClusterServer};
use pb::kv_server::{Kv, KvServer};
use pb::lease_server::{Lease, LeaseServer};
use pb::maintenance_server::{Maintenance, MaintenanceServer};
use pb::request_op::Request as OpRequest;
use pb::response_op::Response as OpResponse;
use pb::watch_server::{Watch, WatchServer};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tonic::codegen::{BoxFuture, http};
use tonic::{Request, Response, Status, Streaming};

/// The cancel reason of a watch cut off for falling behind; `EtcdStore` turns it back
/// into `StoreError::WatchLagged`.
pub(crate) const LAGGED_REASON: &str = "watch fell behind and was cancelled";

/// What the response headers say; etcdctl prints them. Any fixed non-zero values do.
const CLUSTER_ID: u64 = 0x7472_656c_6c69_7321; // "trellis!"
const MEMBER_ID: u64 = 0x656d_6265_6464_6564; // "embedded"
const RAFT_TERM: u64 = 1;

/// The etcd API level this server speaks (Maintenance.Status's version).
const VERSION: &str = "3.4.0";

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// etcd's longest lease TTL, in seconds.
const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Responses queued for one stream before its producers wait for the client to read.
const STREAM_BUFFER: usize = 16;

/// Events and bytes in one watch response; a revision is not split, so one revision's
/// events may exceed them. With [`STREAM_BUFFER`], this bounds what a stream queues.
const MAX_EVENTS_PER_RESPONSE: usize = 1000;
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Watches one stream may hold.
const MAX_WATCHES_PER_STREAM: usize = 4096;

/// Streams (calls, watch and keep-alive streams) one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Largest request accepted (etcd's is 1.5 MiB).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How long shutting down waits for connections to close by themselves, and then again
/// after closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Pings that find clients that vanished without closing their connections.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------

/// A running server. Dropping it stops it too, without waiting.
pub struct StoreServer {
    endpoint: String,
    socket: Option<PathBuf>,
    stop: watch::Sender<bool>,
    connections: Arc<Connections>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Serves `store` on a Unix socket at `path`, owner-only (0600).
///
/// A leftover socket file from a dead server is replaced; a live server on `path`, or a
/// file that is not a socket, is an error. Clients use [`StoreServer::endpoint`]
/// (`unix:///abs/path`) as an `EtcdConfig` endpoint.
pub async fn serve_unix(
    store: Arc<EmbeddedStore>,
    path: impl AsRef<Path>,
) -> io::Result<StoreServer> {
    let path = std::path::absolute(path.as_ref())?;
    remove_stale_socket(&path).await?;
    let listener = UnixListener::bind(&path)
        .map_err(|e| with_context(e, format!("binding store socket {}", path.display())))?;
    // Owner only: the store holds the cluster's state. There is a short window between
    // bind and chmod; the socket's directory is what really guards it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| with_context(e, format!("restricting store socket {}", path.display())))?;
    let connections = Arc::new(Connections::default());
    let incoming = {
        let connections = connections.clone();
        futures::stream::unfold(listener, move |listener| {
            let connections = connections.clone();
            async move {
                let accepted = match listener.accept().await {
                    Ok((stream, _)) => connections.track(stream),
                    Err(e) => Err(e),
                };
                Some((throttle_errors(accepted).await, listener))
            }
        })
    };
    tracing::info!(path = %path.display(), "serving the store over etcd's protocol");
    let endpoint = format!("unix://{}", path.display());
    Ok(StoreServer::start(
        store,
        endpoint,
        Some(path),
        incoming,
        connections,
    ))
}

/// Serves `store` on TCP at `addr` (port 0 picks a free one). Meant for loopback: no TLS
/// and no authentication.
pub async fn serve_tcp(store: Arc<EmbeddedStore>, addr: SocketAddr) -> io::Result<StoreServer> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| with_context(e, format!("binding {addr}")))?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let connections = Arc::new(Connections::default());
    let incoming = {
        let connections = connections.clone();
        futures::stream::unfold(listener, move |listener| {
            let connections = connections.clone();
            async move {
                let accepted = match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        connections.track(stream)
                    }
                    Err(e) => Err(e),
                };
                Some((throttle_errors(accepted).await, listener))
            }
        })
    };
    Ok(StoreServer::start(
        store,
        endpoint,
        None,
        incoming,
        connections,
    ))
}

async fn throttle_errors<T>(accepted: io::Result<T>) -> io::Result<T> {
    if let Err(e) = &accepted {
        tracing::warn!(error = %e, "accepting a store client failed");
        tokio::time::sleep(ACCEPT_RETRY).await;
    }
    accepted
}

impl StoreServer {
    fn start<S, I>(
        store: Arc<EmbeddedStore>,
        endpoint: String,
        socket: Option<PathBuf>,
        incoming: I,
        connections: Arc<Connections>,
    ) -> StoreServer
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        I: Stream<Item = io::Result<Tracked<S>>> + Send + 'static,
    {
        let (stop, stopping) = watch::channel(false);
        let etcd = Etcd {
            store,
            stopping: stopping.clone(),
            endpoint: endpoint.clone(),
        };
        let routes = Routes {
            kv: KvServer::new(etcd.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
            watch: WatchServer::new(etcd.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
            lease: LeaseServer::new(etcd.clone()),
            maintenance: MaintenanceServer::new(etcd.clone()),
            cluster: ClusterServer::new(etcd),
        };
        let mut signal = stopping;
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEP_ALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEP_ALIVE_TIMEOUT))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .serve_with_incoming_shutdown(routes, incoming, async move {
                let _ = signal.wait_for(|stop| *stop).await;
            });
        StoreServer {
            endpoint,
            socket,
            stop,
            connections,
            task: Some(tokio::spawn(server)),
        }
    }

    /// The URL clients connect to: `unix:///abs/path` or `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Resolves if the server stops by itself, which only a failure makes it do.
    pub async fn stopped(&mut self) -> io::Result<()> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let outcome = task.await;
        self.task = None;
        flatten(outcome)
    }

    /// Stops accepting clients, ends every stream (watches and keep-alives end as if the
    /// server went away), waits for the connections to close (closing those of clients
    /// that do not let go), and removes the socket file.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.stop.send_replace(true);
        let outcome = match self.task.take() {
            None => Ok(()),
            Some(mut task) => match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(outcome) => flatten(outcome),
                Err(_) => {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        "store clients still connected after shutdown; closing their connections"
                    );
                    self.connections.close_all();
                    match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                        Ok(outcome) => flatten(outcome),
                        Err(_) => {
                            task.abort();
                            Ok(())
                        }
                    }
                }
            },
        };
        self.remove_socket();
        outcome
    }

    fn remove_socket(&mut self) {
        if let Some(path) = self.socket.take()
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "removing the store socket");
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.send_replace(true);
            self.connections.close_all();
        }
        self.remove_socket();
    }
}

fn flatten(
    outcome: std::result::Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> io::Result<()> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(io::Error::other(e)),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(io::Error::other(e)),
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_context(e, format!("inspecting {}", path.display()))),
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another store server is listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
        .map_err(|e| with_context(e, format!("removing stale socket {}", path.display())))
}

fn with_context(error: io::Error, context: String) -> io::Error {
    io::Error::new(error.kind(), format!("{context}: {error}"))
}

/// The accepted connections, each with a duplicate of its socket by which shutting down
/// can close it even while tonic's connection task waits on a client that does not read.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Closer>>,
    next: AtomicU64,
}

enum Closer {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Connections {
    fn track<S: Duplicate>(self: &Arc<Self>, stream: S) -> io::Result<Tracked<S>> {
        let (io, closer) = stream.duplicate()?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, closer);
        Ok(Tracked {
            io,
            id,
            connections: self.clone(),
        })
    }

    fn close_all(&self) {
        for closer in self.lock().values() {
            // Both directions: the connection's reads end and its writes fail.
            let _ = match closer {
                Closer::Unix(s) => s.shutdown(std::net::Shutdown::Both),
                Closer::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Closer>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

trait Duplicate: Sized {
    fn duplicate(self) -> io::Result<(Self, Closer)>;
}

impl Duplicate for UnixStream {
    fn duplicate(self) -> io::Result<(Self, Closer)> {
        let stream = self.into_std()?;
        let closer = Closer::Unix(stream.try_clone()?);
        Ok((UnixStream::from_std(stream)?, closer))
    }
}

impl Duplicate for tokio::net::TcpStream {
    fn duplicate(self) -> io::Result<(Self, Closer)> {
        let stream = self.into_std()?;
        let closer = Closer::Tcp(stream.try_clone()?);
        Ok((tokio::net::TcpStream::from_std(stream)?, closer))
    }
}

/// An accepted connection; forgets (and so closes) its duplicate when dropped.
struct Tracked<S> {
    io: S,
    id: u64,
    connections: Arc<Connections>,
}

impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

impl<S> tonic::transport::server::Connected for Tracked<S> {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Sends each call to its service by the service name in its path; tonic's own router
/// would bring in axum for five lines.
#[derive(Clone)]
struct Routes {
    kv: KvServer<Etcd>,
    watch: WatchServer<Etcd>,
    lease: LeaseServer<Etcd>,
    maintenance: MaintenanceServer<Etcd>,
    cluster: ClusterServer<Etcd>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Routes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let service = request.uri().path().split('/').nth(1).unwrap_or_default();
        match service {
            pb::kv_server::SERVICE_NAME => self.kv.call(request),
            pb::watch_server::SERVICE_NAME => self.watch.call(request),
            pb::lease_server::SERVICE_NAME => self.lease.call(request),
            pb::maintenance_server::SERVICE_NAME => self.maintenance.call(request),
            pb::cluster_server::SERVICE_NAME => self.cluster.call(request),
            _ => {
                let status = unimplemented(&format!("the {service} service"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The services
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct Etcd {
    store: Arc<EmbeddedStore>,
    /// Turns true when the server shuts down: every stream ends.
    stopping: watch::Receiver<bool>,
    endpoint: String,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn stream_of<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> ResponseStream<T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn header(revision: Revision) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        cluster_id: CLUSTER_ID,
        member_id: MEMBER_ID,
        revision: revision as i64,
        raft_term: RAFT_TERM,
    })
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not implemented by Trellis's embedded store (it serves KV, Watch, Lease, \
         Maintenance.Status and Cluster.MemberList)"
    ))
}

fn key_value(entry: &Entry, keys_only: bool) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: entry.key.clone(),
        create_revision: entry.create_revision as i64,
        mod_revision: entry.mod_revision as i64,
        version: entry.version,
        value: if keys_only {
            Vec::new()
        } else {
            entry.value.to_vec()
        },
        lease: entry.lease.map_or(0, |l| l as i64),
    }
}

fn lease_of(id: i64) -> Option<LeaseId> {
    (id != 0).then_some(id as LeaseId)
}

mod errors {
    use tonic::Status;

    pub fn empty_key() -> Status {
        Status::invalid_argument("etcdserver: key is not provided")
    }
    pub fn lease_not_found() -> Status {
        Status::not_found("etcdserver: requested lease not found")
    }
    pub fn lease_exists() -> Status {
        Status::failed_precondition("etcdserver: lease already exists")
    }
    pub fn lease_ttl_too_large() -> Status {
        Status::out_of_range("etcdserver: too large lease TTL")
    }
    pub fn too_many_ops() -> Status {
        Status::invalid_argument("etcdserver: too many operations in txn request")
    }
    pub fn duplicate_key() -> Status {
        Status::invalid_argument("etcdserver: duplicate key given in txn request")
    }
    pub fn key_not_found() -> Status {
        Status::invalid_argument("etcdserver: key not found")
    }
    pub fn value_provided() -> Status {
        Status::invalid_argument("etcdserver: value is provided")
    }
    pub fn lease_provided() -> Status {
        Status::invalid_argument("etcdserver: lease is provided")
    }
    pub fn empty_request() -> Status {
        Status::invalid_argument("etcdserver: an operation in the txn is empty")
    }
    pub fn compacted() -> Status {
        Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
    }
    pub fn future_revision() -> Status {
        Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
    }
    pub fn bad_enum(what: &str) -> Status {
        Status::invalid_argument(format!("etcdserver: unknown {what}"))
    }
}

// --- KV --------------------------------------------------------------------------------

#[tonic::async_trait]
impl Kv for Etcd {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        check_key(&request.key)?;
        // Only shared pointers are copied under the lock; values after it.
        let (selection, revision) = {
            let state = self.store.lock();
            check_read_revision(&state, &request)?;
            (select(&state, &request)?, state.revision())
        };
        Ok(Response::new(selection.response(&request, revision)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let op = OpRequest::RequestPut(request.into_inner());
        match self.single_op(op)? {
            OpResponse::ResponsePut(put) => Ok(Response::new(put)),
            _ => Err(Status::internal("a put answered as something else")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let op = OpRequest::RequestDeleteRange(request.into_inner());
        match self.single_op(op)? {
            OpResponse::ResponseDeleteRange(deleted) => Ok(Response::new(deleted)),
            _ => Err(Status::internal("a delete answered as something else")),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let request = request.into_inner();
        check_txn(&request)?;
        let response = run_txn(&mut self.store.lock(), &request)?;
        Ok(Response::new(response))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let revision = request.into_inner().revision;
        let mut state = self.store.lock();
        if revision > state.revision() as i64 {
            return Err(errors::future_revision());
        }
        match state.compact(revision.max(0) as Revision) {
            Ok(()) => Ok(Response::new(pb::CompactionResponse {
                header: header(state.revision()),
            })),
            Err(StoreError::Compacted { .. }) => Err(errors::compacted()),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}

impl Etcd {
    /// A put or a delete: a txn of that one op, as etcd applies them.
    fn single_op(&self, op: OpRequest) -> Result<OpResponse, Status> {
        let txn = pb::TxnRequest {
            compare: Vec::new(),
            success: vec![pb::RequestOp { request: Some(op) }],
            failure: Vec::new(),
        };
        check_txn(&txn)?;
        let response = run_txn(&mut self.store.lock(), &txn)?;
        response
            .responses
            .into_iter()
            .next()
            .and_then(|r| r.response)
            .ok_or_else(|| Status::internal("a txn of one op answered nothing"))
    }
}

fn check_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        Err(errors::empty_key())
    } else {
        Ok(())
    }
}

/// Reads are at the current revision; one at a past revision is the same when nothing
/// in its range changed since, and is otherwise refused (no old versions are kept).
fn check_read_revision(state: &State, request: &pb::RangeRequest) -> Result<(), Status> {
    let revision = request.revision;
    let current = state.revision() as i64;
    if revision <= 0 || revision == current {
        return Ok(());
    }
    if revision > current {
        return Err(errors::future_revision());
    }
    let range = KeyRange::new(request.key.clone(), request.range_end.clone());
    match state.changed_since(&range, revision as Revision) {
        None => Err(errors::compacted()),
        Some(false) => Ok(()),
        Some(true) => Err(Status::unimplemented(format!(
            "reading at revision {revision}: keys in this range changed since, and \
             Trellis's embedded store keeps no old versions of keys; read at the current \
             revision ({current})"
        ))),
    }
}

/// The keys a range request selects, copied out of the store.
struct Selection {
    kvs: Vec<Entry>,
    count: usize,
    more: bool,
}

fn select(state: &State, request: &pb::RangeRequest) -> Result<Selection, Status> {
    use pb::range_request::{SortOrder, SortTarget};
    let order =
        SortOrder::try_from(request.sort_order).map_err(|_| errors::bad_enum("sort order"))?;
    let target =
        SortTarget::try_from(request.sort_target).map_err(|_| errors::bad_enum("sort target"))?;
    let range = KeyRange::new(request.key.clone(), request.range_end.clone());
    let within = |value: u64, min: i64, max: i64| {
        (min <= 0 || value as i64 >= min) && (max <= 0 || value as i64 <= max)
    };
    let mut count = 0;
    let mut kvs: Vec<&Entry> = state
        .range(&range)
        .inspect(|_| count += 1)
        .filter(|e| {
            within(
                e.mod_revision,
                request.min_mod_revision,
                request.max_mod_revision,
            ) && within(
                e.create_revision,
                request.min_create_revision,
                request.max_create_revision,
            )
        })
        .collect();
    if request.count_only {
        return Ok(Selection {
            kvs: Vec::new(),
            count,
            more: false,
        });
    }
    // Keys come sorted; another target with no order given means ascending (as etcd).
    let order = match (order, target) {
        (SortOrder::None, SortTarget::Key) => SortOrder::None,
        (SortOrder::None, _) => SortOrder::Ascend,
        (order, _) => order,
    };
    if order != SortOrder::None {
        let compare = |a: &&Entry, b: &&Entry| match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| compare(b, a));
        } else {
            kvs.sort_by(compare);
        }
    }
    let mut more = false;
    if request.limit > 0 && kvs.len() > request.limit as usize {
        kvs.truncate(request.limit as usize);
        more = true;
    }
    Ok(Selection {
        kvs: kvs.into_iter().cloned().collect(),
        count,
        more,
    })
}

impl Selection {
    fn response(self, request: &pb::RangeRequest, revision: Revision) -> pb::RangeResponse {
        pb::RangeResponse {
            header: header(revision),
            kvs: self
                .kvs
                .iter()
                .map(|e| key_value(e, request.keys_only))
                .collect(),
            more: self.more,
            count: self.count as i64,
        }
    }
}

/// What etcd checks before it looks at the store: sizes, keys, duplicate writes.
fn check_txn(txn: &pb::TxnRequest) -> Result<(), Status> {
    if [txn.compare.len(), txn.success.len(), txn.failure.len()]
        .iter()
        .any(|&n| n > MAX_TXN_OPS)
    {
        return Err(errors::too_many_ops());
    }
    for compare in &txn.compare {
        check_key(&compare.key)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            None => return Err(errors::empty_request()),
            Some(OpRequest::RequestRange(r)) => check_key(&r.key)?,
            Some(OpRequest::RequestDeleteRange(d)) => check_key(&d.key)?,
            Some(OpRequest::RequestPut(p)) => {
                check_key(&p.key)?;
                if p.ignore_value && !p.value.is_empty() {
                    return Err(errors::value_provided());
                }
                if p.ignore_lease && p.lease != 0 {
                    return Err(errors::lease_provided());
                }
            }
            Some(OpRequest::RequestTxn(inner)) => check_txn(inner)?,
        }
    }
    check_writes(&txn.success)?;
    check_writes(&txn.failure)?;
    Ok(())
}

/// etcd's rule that one txn writes a key at most once (its `checkIntervals`): returns the
/// keys these ops put and the ranges they delete, nested txns included.
fn check_writes(ops: &[pb::RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<KeyRange>), Status> {
    let mut deletes: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(OpRequest::RequestDeleteRange(d)) => {
                Some(KeyRange::new(d.key.clone(), d.range_end.clone()))
            }
            _ => None,
        })
        .collect();
    let deleted = |deletes: &[KeyRange], key: &[u8]| deletes.iter().any(|d| d.contains(key));
    let mut puts = HashSet::new();
    for op in ops {
        let Some(OpRequest::RequestTxn(inner)) = &op.request else {
            continue;
        };
        let (puts_then, deletes_then) = check_writes(&inner.success)?;
        let (puts_else, deletes_else) = check_writes(&inner.failure)?;
        for key in &puts_then {
            if puts.contains(key) || deleted(&deletes, key) {
                return Err(errors::duplicate_key());
            }
            puts.insert(key.clone());
        }
        for key in puts_else {
            // The two branches exclude each other: the same key in both is fine.
            if puts.contains(&key) && !puts_then.contains(&key) || deleted(&deletes, &key) {
                return Err(errors::duplicate_key());
            }
            puts.insert(key);
        }
        deletes.extend(deletes_then);
        deletes.extend(deletes_else);
    }
    for op in ops {
        if let Some(OpRequest::RequestPut(put)) = &op.request {
            if puts.contains(&put.key) || deleted(&deletes, &put.key) {
                return Err(errors::duplicate_key());
            }
            puts.insert(put.key.clone());
        }
    }
    Ok((puts, deletes))
}

/// The branch a txn (and each txn nested in it) takes, decided against the state before
/// anything is applied, as etcd does.
struct Plan<'a> {
    succeeded: bool,
    ops: &'a [pb::RequestOp],
    nested: Vec<Plan<'a>>,
}

fn plan<'a>(state: &State, txn: &'a pb::TxnRequest) -> Result<Plan<'a>, Status> {
    let mut succeeded = true;
    for compare in &txn.compare {
        if !holds(state, compare)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let mut nested = Vec::new();
    for op in ops {
        match &op.request {
            Some(OpRequest::RequestPut(put)) => {
                if put.lease != 0 && !state.leases.contains(put.lease as LeaseId) {
                    return Err(errors::lease_not_found());
                }
                if (put.ignore_value || put.ignore_lease) && state.get(&put.key).is_none() {
                    return Err(errors::key_not_found());
                }
            }
            Some(OpRequest::RequestRange(range)) => check_read_revision(state, range)?,
            Some(OpRequest::RequestTxn(inner)) => nested.push(plan(state, inner)?),
            Some(OpRequest::RequestDeleteRange(_)) | None => {}
        }
    }
    Ok(Plan {
        succeeded,
        ops,
        nested,
    })
}

/// Whether the compare holds for every key in its range (for a missing key: against
/// zero values, except that a value compare fails), as etcd evaluates it.
fn holds(state: &State, compare: &pb::Compare) -> Result<bool, Status> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let target =
        CompareTarget::try_from(compare.target).map_err(|_| errors::bad_enum("compare target"))?;
    let result =
        CompareResult::try_from(compare.result).map_err(|_| errors::bad_enum("compare result"))?;
    let number = |n: Option<i64>| n.unwrap_or(0);
    let ordering = |entry: Option<&Entry>| -> std::cmp::Ordering {
        let union = compare.target_union.as_ref();
        match target {
            CompareTarget::Value => {
                let wanted = match union {
                    Some(TargetUnion::Value(v)) => v.as_slice(),
                    _ => &[],
                };
                entry.map_or(&[][..], |e| &e.value[..]).cmp(wanted)
            }
            CompareTarget::Version => entry.map_or(0, |e| e.version).cmp(&number(match union {
                Some(TargetUnion::Version(v)) => Some(*v),
                _ => None,
            })),
            CompareTarget::Create => {
                entry
                    .map_or(0, |e| e.create_revision as i64)
                    .cmp(&number(match union {
                        Some(TargetUnion::CreateRevision(v)) => Some(*v),
                        _ => None,
                    }))
            }
            CompareTarget::Mod => {
                entry
                    .map_or(0, |e| e.mod_revision as i64)
                    .cmp(&number(match union {
                        Some(TargetUnion::ModRevision(v)) => Some(*v),
                        _ => None,
                    }))
            }
            CompareTarget::Lease => {
                entry
                    .and_then(|e| e.lease)
                    .map_or(0, |l| l as i64)
                    .cmp(&number(match union {
                        Some(TargetUnion::Lease(v)) => Some(*v),
                        _ => None,
                    }))
            }
        }
    };
    let matches = |o: std::cmp::Ordering| match result {
        CompareResult::Equal => o.is_eq(),
        CompareResult::Greater => o.is_gt(),
        CompareResult::Less => o.is_lt(),
        CompareResult::NotEqual => o.is_ne(),
    };
    let range = KeyRange::new(compare.key.clone(), compare.range_end.clone());
    let mut any = false;
    for entry in state.range(&range) {
        any = true;
        if !matches(ordering(Some(entry))) {
            return Ok(false);
        }
    }
    if any {
        Ok(true)
    } else if target == CompareTarget::Value {
        Ok(false)
    } else {
        Ok(matches(ordering(None)))
    }
}

/// Decides, applies and commits the txn (already checked by [`check_txn`]) in one step.
fn run_txn(state: &mut State, txn: &pb::TxnRequest) -> Result<pb::TxnResponse, Status> {
    let plan = plan(state, txn)?;
    // Nothing fails from here on: the txn applies whole.
    let revision = state.revision() + 1;
    let mut changes = Vec::new();
    let mut response = apply(state, &plan, revision, &mut changes);
    state.commit(revision, changes);
    fill_headers(&mut response, state.revision());
    Ok(response)
}

fn apply(
    state: &mut State,
    plan: &Plan<'_>,
    revision: Revision,
    changes: &mut Vec<Change>,
) -> pb::TxnResponse {
    let mut nested = plan.nested.iter();
    let mut responses = Vec::with_capacity(plan.ops.len());
    for op in plan.ops {
        let response = match &op.request {
            Some(OpRequest::RequestRange(range)) => {
                // Sees the txn's earlier writes; revisions were checked by `plan`.
                let selection = select(state, range).unwrap_or(Selection {
                    kvs: Vec::new(),
                    count: 0,
                    more: false,
                });
                OpResponse::ResponseRange(selection.response(range, revision))
            }
            Some(OpRequest::RequestPut(put)) => {
                OpResponse::ResponsePut(apply_put(state, put, revision, changes))
            }
            Some(OpRequest::RequestDeleteRange(delete)) => {
                OpResponse::ResponseDeleteRange(apply_delete(state, delete, revision, changes))
            }
            Some(OpRequest::RequestTxn(_)) => match nested.next() {
                Some(inner) => OpResponse::ResponseTxn(apply(state, inner, revision, changes)),
                None => continue, // cannot happen: `plan` made one per nested txn
            },
            None => continue, // refused by `check_txn`
        };
        responses.push(pb::ResponseOp {
            response: Some(response),
        });
    }
    pb::TxnResponse {
        header: None,
        succeeded: plan.succeeded,
        responses,
    }
}

fn apply_put(
    state: &mut State,
    put: &pb::PutRequest,
    revision: Revision,
    changes: &mut Vec<Change>,
) -> pb::PutResponse {
    let existing = state.get(&put.key);
    let value = match existing {
        Some(e) if put.ignore_value => e.value.clone(),
        _ => Arc::from(put.value.as_slice()),
    };
    let lease = match existing {
        Some(e) if put.ignore_lease => e.lease,
        _ => lease_of(put.lease),
    };
    let change = state.put(put.key.clone(), value, lease, revision);
    let prev_kv = if put.prev_kv {
        change.prev.as_ref().map(|e| key_value(e, false))
    } else {
        None
    };
    changes.push(change);
    pb::PutResponse {
        header: None,
        prev_kv,
    }
}

fn apply_delete(
    state: &mut State,
    delete: &pb::DeleteRangeRequest,
    revision: Revision,
    changes: &mut Vec<Change>,
) -> pb::DeleteRangeResponse {
    let range = KeyRange::new(delete.key.clone(), delete.range_end.clone());
    let keys: Vec<Vec<u8>> = state.range(&range).map(|e| e.key.clone()).collect();
    let mut prev_kvs = Vec::new();
    let mut deleted = 0;
    for key in keys {
        if let Some(change) = state.delete(&key, revision) {
            deleted += 1;
            if delete.prev_kv
                && let Some(prev) = &change.prev
            {
                prev_kvs.push(key_value(prev, false));
            }
            changes.push(change);
        }
    }
    pb::DeleteRangeResponse {
        header: None,
        deleted,
        prev_kvs,
    }
}

/// Every response in the txn gets the header (etcdctl reads nested ones too).
fn fill_headers(txn: &mut pb::TxnResponse, revision: Revision) {
    txn.header = header(revision);
    for op in &mut txn.responses {
        match &mut op.response {
            Some(OpResponse::ResponseRange(r)) => r.header = header(revision),
            Some(OpResponse::ResponsePut(r)) => r.header = header(revision),
            Some(OpResponse::ResponseDeleteRange(r)) => r.header = header(revision),
            Some(OpResponse::ResponseTxn(r)) => fill_headers(r, revision),
            None => {}
        }
    }
}

// --- Watch -----------------------------------------------------------------------------

#[tonic::async_trait]
impl Watch for Etcd {
    type WatchStream = ResponseStream<pb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let session = WatchSession {
            etcd: self.clone(),
            tx,
            forwarders: JoinSet::new(),
            watches: HashMap::new(),
            next_id: 0,
        };
        tokio::spawn(session.run(request.into_inner()));
        Ok(Response::new(stream_of(rx)))
    }
}

/// One client's watch stream: its requests, and a forwarding task per watch.
struct WatchSession {
    etcd: Etcd,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    /// Dropping them (when the stream ends) ends every watch of the stream.
    forwarders: JoinSet<i64>,
    watches: HashMap<i64, AbortHandle>,
    next_id: i64,
}

impl WatchSession {
    async fn run(mut self, mut requests: Streaming<pb::WatchRequest>) {
        let mut stopping = self.etcd.stopping.clone();
        loop {
            let request = tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => {
                    let _ = self.tx.try_send(Err(Status::unavailable("the store server is shutting down")));
                    return;
                }
                Some(finished) = self.forwarders.join_next(), if !self.forwarders.is_empty() => {
                    if let Ok(id) = finished {
                        self.watches.remove(&id);
                    }
                    continue;
                }
                request = requests.message() => request,
            };
            // The client closing its side ends the stream, as in etcd.
            let Ok(Some(request)) = request else { return };
            use pb::watch_request::RequestUnion;
            let keep_going = match request.request_union {
                Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
                Some(RequestUnion::CancelRequest(cancel)) => self.cancel(cancel.watch_id).await,
                Some(RequestUnion::ProgressRequest(_)) | None => {
                    tracing::debug!("ignoring a watch progress request");
                    true
                }
            };
            if !keep_going {
                return;
            }
        }
    }

    /// Queues a response, unless the client went away or the server is stopping.
    async fn send(&self, response: pb::WatchResponse) -> bool {
        send_or_stop(&self.tx, &self.etcd.stopping, Ok(response)).await
    }

    async fn create(&mut self, create: pb::WatchCreateRequest) -> bool {
        let revision = self.etcd.store.lock().revision();
        let refuse = |id: i64, reason: String| pb::WatchResponse {
            header: header(revision),
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..Default::default()
        };
        self.watches.retain(|_, watch| !watch.is_finished());
        if self.watches.len() >= MAX_WATCHES_PER_STREAM {
            let reason = format!("at most {MAX_WATCHES_PER_STREAM} watches per stream");
            return self.send(refuse(-1, reason)).await;
        }
        let id = if create.watch_id == 0 {
            while self.watches.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watches.contains_key(&create.watch_id) {
            let reason = "mvcc: duplicate watch ID provided on the WatchStream".to_string();
            return self.send(refuse(-1, reason)).await;
        } else {
            create.watch_id
        };
        use pb::watch_create_request::FilterType;
        let options = WatchOptions {
            prev_kv: create.prev_kv,
            no_put: create.filters.contains(&(FilterType::Noput as i32)),
            no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
        };
        let range = KeyRange::new(create.key, create.range_end);
        let after = (create.start_revision > 0).then(|| create.start_revision as Revision - 1);
        let opened = self.etcd.store.lock().watch(range, after, |capacity| {
            let (tx, rx) = mpsc::channel(capacity);
            (Sink::Changes(tx), rx)
        });
        match opened {
            Ok((revision, feed)) => {
                let created = pb::WatchResponse {
                    header: header(revision),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                };
                if !self.send(created).await {
                    return false;
                }
                // After the confirmation, so that no event can overtake it.
                let handle = self
                    .forwarders
                    .spawn(forward(id, feed, options, self.tx.clone()));
                self.watches.insert(id, handle);
                true
            }
            Err(StoreError::Compacted { oldest, .. }) => {
                // Confirmed, then cancelled: what etcd does and its clients expect.
                let revision = self.etcd.store.lock().revision();
                let created = pb::WatchResponse {
                    header: header(revision),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                };
                let compacted = pb::WatchResponse {
                    header: header(revision),
                    watch_id: id,
                    canceled: true,
                    compact_revision: oldest as i64,
                    cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
                    ..Default::default()
                };
                self.send(created).await && self.send(compacted).await
            }
            Err(e) => self.send(refuse(id, e.to_string())).await,
        }
    }

    async fn cancel(&mut self, id: i64) -> bool {
        let Some(watch) = self.watches.remove(&id) else {
            return true; // etcd does not answer for a watch it does not have
        };
        watch.abort();
        let revision = self.etcd.store.lock().revision();
        self.send(pb::WatchResponse {
            header: header(revision),
            watch_id: id,
            canceled: true,
            ..Default::default()
        })
        .await
    }
}

async fn send_or_stop<T>(
    tx: &mpsc::Sender<Result<T, Status>>,
    stopping: &watch::Receiver<bool>,
    item: Result<T, Status>,
) -> bool {
    let mut stopping = stopping.clone();
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        _ = stopping.wait_for(|stop| *stop) => false,
    }
}

#[derive(Clone, Copy)]
struct WatchOptions {
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
}

impl WatchOptions {
    fn event(&self, change: &Change) -> Option<mvccpb::Event> {
        use mvccpb::event::EventType;
        let kind = match change.kind {
            ChangeKind::Put if self.no_put => return None,
            ChangeKind::Delete if self.no_delete => return None,
            ChangeKind::Put => EventType::Put,
            ChangeKind::Delete => EventType::Delete,
        };
        Some(mvccpb::Event {
            r#type: kind as i32,
            kv: Some(key_value(&change.kv, false)),
            prev_kv: if self.prev_kv {
                change.prev.as_ref().map(|e| key_value(e, false))
            } else {
                None
            },
        })
    }
}

/// Moves one watch's changes from the store into the stream, batching what is queued; ends
/// when the store cut the watch off for lagging (telling the client) or the stream ended.
/// Returns the watch id, for the session's bookkeeping.
async fn forward(
    id: i64,
    mut feed: mpsc::Receiver<Feed>,
    options: WatchOptions,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
) -> i64 {
    let mut held: Option<Feed> = None;
    loop {
        let first = match held.take() {
            Some(item) => item,
            None => match feed.recv().await {
                Some(item) => item,
                None => {
                    let reason = "the store was closed".to_string();
                    let _ = tx.send(Ok(cancelled(id, 0, reason))).await;
                    return id;
                }
            },
        };
        let mut events = Vec::new();
        let mut bytes = 0;
        let mut last_revision = 0;
        let mut lagged = false;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Feed::Lagged => {
                    lagged = true;
                    break;
                }
                Feed::Change(change) => {
                    let revision = change.revision();
                    let full =
                        events.len() >= MAX_EVENTS_PER_RESPONSE || bytes >= MAX_RESPONSE_BYTES;
                    if full && revision != last_revision {
                        held = Some(Feed::Change(change));
                        break;
                    }
                    last_revision = revision;
                    if let Some(event) = options.event(&change) {
                        bytes += prost::Message::encoded_len(&event);
                        events.push(event);
                    }
                }
            }
            next = feed.try_recv().ok();
        }
        if !events.is_empty() {
            let response = pb::WatchResponse {
                header: header(last_revision),
                watch_id: id,
                events,
                ..Default::default()
            };
            if tx.send(Ok(response)).await.is_err() {
                return id;
            }
        }
        if lagged {
            let reason = format!("{LAGGED_REASON}; re-list and watch from a fresh revision");
            let _ = tx.send(Ok(cancelled(id, last_revision, reason))).await;
            return id;
        }
    }
}

fn cancelled(id: i64, revision: Revision, reason: String) -> pb::WatchResponse {
    pb::WatchResponse {
        header: header(revision),
        watch_id: id,
        canceled: true,
        cancel_reason: reason,
        ..Default::default()
    }
}

// --- Lease -----------------------------------------------------------------------------

#[tonic::async_trait]
impl Lease for Etcd {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let request = request.into_inner();
        if request.ttl > MAX_LEASE_TTL {
            return Err(errors::lease_ttl_too_large());
        }
        let ttl = request.ttl.max(1);
        let id = self
            .store
            .grant(Duration::from_secs(ttl as u64), lease_of(request.id))
            .ok_or_else(errors::lease_exists)?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: header(self.store.lock().revision()),
            id: id as i64,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let id = request.into_inner().id;
        let mut state = self.store.lock();
        if id == 0 || !state.remove_lease(id as LeaseId) {
            return Err(errors::lease_not_found());
        }
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: header(state.revision()),
        }))
    }

    type LeaseKeepAliveStream = ResponseStream<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let store = self.store.clone();
        let mut stopping = self.stopping.clone();
        let mut requests = request.into_inner();
        // One answer per request, each sent before the next request is read: a client
        // that does not read its answers stops being read.
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = stopping.wait_for(|stop| *stop) => return,
                    request = requests.message() => request,
                };
                let Ok(Some(request)) = request else { return };
                let (ttl, revision) = {
                    let mut state = store.lock();
                    let renewed = state
                        .leases
                        .renew(request.id as LeaseId, tokio::time::Instant::now());
                    // A lease that is gone is answered with TTL 0, as etcd does.
                    let ttl = renewed.map_or(0, |ttl| ttl.as_secs() as i64);
                    (ttl, state.revision())
                };
                let answer = pb::LeaseKeepAliveResponse {
                    header: header(revision),
                    id: request.id,
                    ttl,
                };
                if !send_or_stop(&tx, &stopping, Ok(answer)).await {
                    return;
                }
            }
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let request = request.into_inner();
        let state = self.store.lock();
        let info = state
            .leases
            .info(request.id as LeaseId, tokio::time::Instant::now());
        // A lease that is gone has TTL -1, as etcd answers (etcdctl: "already expired").
        let response = match info {
            None => pb::LeaseTimeToLiveResponse {
                header: header(state.revision()),
                id: request.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
            Some(info) => pb::LeaseTimeToLiveResponse {
                header: header(state.revision()),
                id: request.id,
                ttl: info.remaining.as_secs() as i64,
                granted_ttl: info.ttl.as_secs() as i64,
                keys: if request.keys { info.keys } else { Vec::new() },
            },
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let state = self.store.lock();
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: header(state.revision()),
            leases: state
                .leases
                .ids()
                .into_iter()
                .map(|id| pb::LeaseStatus { id: id as i64 })
                .collect(),
        }))
    }
}

// --- Maintenance and Cluster -----------------------------------------------------------

#[tonic::async_trait]
impl Maintenance for Etcd {
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        use pb::alarm_request::AlarmAction;
        if request.into_inner().action != AlarmAction::Get as i32 {
            return Err(unimplemented("Maintenance.Alarm (other than listing)"));
        }
        Ok(Response::new(pb::AlarmResponse {
            header: header(self.store.lock().revision()),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let state = self.store.lock();
        let revision = state.revision();
        let size = state.size() as i64;
        Ok(Response::new(pb::StatusResponse {
            header: header(revision),
            version: VERSION.into(),
            db_size: size,
            leader: MEMBER_ID,
            raft_index: revision,
            raft_term: RAFT_TERM,
            raft_applied_index: revision,
            errors: Vec::new(),
            db_size_in_use: size,
            is_learner: false,
        }))
    }

    async fn defragment(
        &self,
        _: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        Err(unimplemented("Maintenance.Defragment"))
    }

    async fn hash(
        &self,
        _: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        Err(unimplemented("Maintenance.Hash"))
    }

    async fn hash_kv(
        &self,
        _: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        Err(unimplemented("Maintenance.HashKV"))
    }

    type SnapshotStream = ResponseStream<pb::SnapshotResponse>;

    async fn snapshot(
        &self,
        _: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(unimplemented("Maintenance.Snapshot"))
    }

    async fn move_leader(
        &self,
        _: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        Err(unimplemented("Maintenance.MoveLeader"))
    }
}

#[tonic::async_trait]
impl Cluster for Etcd {
    async fn member_add(
        &self,
        _: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        Err(unimplemented("Cluster.MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        Err(unimplemented("Cluster.MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        Err(unimplemented("Cluster.MemberUpdate"))
    }

    async fn member_list(
        &self,
        _: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            header: header(self.store.lock().revision()),
            members: vec![pb::Member {
                id: MEMBER_ID,
                name: "trellis-embedded".into(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![self.endpoint.clone()],
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        Err(unimplemented("Cluster.MemberPromote"))
    }
}
