//! Sharing one `Store` between processes over a Unix domain socket.
//!
//! The lab runs each agent in its own network namespace, and CLI commands run beside them;
//! a path-based Unix socket is reachable from every namespace, so one process serves its
//! `EmbeddedStore` with [`serve`] and the others use it through [`RemoteStore`].
//!
//! Wire format: one JSON value per line, in both directions.
//! - Client to server: `{"id":7,"call":{"get":{"key":"nodes/a1"}}}` (see `Call`).
//! - Server to client: `{"response":{"id":7,"result":{"Ok":{"value":...}}}}`, or for an open
//!   watch `{"watch_event":{"watch":9,"event":{"Ok":{"Put":...}}}}` and, if the server-side
//!   stream ends without an error, `{"watch_ended":{"watch":9}}` (see `Frame`).
//!
//! Errors travel as `StoreError` itself, so a client sees the same variant the server's
//! store returned. A watch's id is the id of the request that opened it, which lets the
//! client route events that arrive right after the acknowledgement. Calls on one connection
//! are answered in whatever order they finish.

use crate::{
    Compare, Event, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// Longest request line the server reads; a client sending more is cut off.
pub const MAX_REQUEST_LINE: usize = 4 * 1024 * 1024;

/// Longest line the client reads. Larger than requests because one listing of a big
/// cluster is legitimately large; the bound only stops a runaway server.
const MAX_RESPONSE_LINE: usize = 256 * 1024 * 1024;

/// Lines queued for one connection's writer before senders wait.
const OUTGOING_LINES: usize = 1024;

/// Unread events a client-side watch may hold before it is cut off with `WatchLagged`.
const WATCH_BUFFER: usize = 1024;

/// Calls one connection may have in flight; past it the server stops reading its requests
/// until some are answered, so a client that never reads answers cannot pile up tasks.
const MAX_CALLS_IN_FLIGHT: usize = 1024;

/// Watches one connection may have open.
const MAX_WATCHES_PER_CONNECTION: usize = 4096;

/// Pause after a failed accept (out of file descriptors, say) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    id: u64,
    call: Call,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Call {
    Get {
        key: String,
    },
    List {
        prefix: String,
    },
    Txn {
        compares: Vec<Compare>,
        ops: Vec<Op>,
    },
    /// Opens a watch whose id is this request's id.
    Watch {
        prefix: String,
        after: Revision,
    },
    CancelWatch {
        watch: u64,
    },
    GrantLease {
        ttl: Duration,
    },
    KeepAlive {
        lease: LeaseId,
    },
    RevokeLease {
        lease: LeaseId,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Value(Option<KeyValue>),
    Listing {
        kvs: Vec<KeyValue>,
        revision: Revision,
    },
    Txn(TxnResult),
    WatchStarted {
        watch: u64,
    },
    Lease(LeaseId),
    Done,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Frame {
    Response {
        id: u64,
        result: std::result::Result<Reply, StoreError>,
    },
    WatchEvent {
        watch: u64,
        event: std::result::Result<Event, StoreError>,
    },
    WatchEnded {
        watch: u64,
    },
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// Serves `store` on the Unix socket `path` until the returned task is aborted, which also
/// closes every connection (and so every watch) it accepted.
///
/// A leftover socket file from a dead server is replaced; a live server on `path`, or a
/// file that is not a socket, is an error.
pub async fn serve(store: Arc<dyn Store>, path: &Path) -> io::Result<JoinHandle<()>> {
    remove_stale_socket(path).await?;
    let listener = UnixListener::bind(path)
        .map_err(|e| with_context(e, format!("binding store socket {}", path.display())))?;
    // Owner only: the store holds the cluster's state. There is a short window between
    // bind and chmod; the socket's directory is what really guards it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| with_context(e, format!("restricting store socket {}", path.display())))?;
    tracing::info!(path = %path.display(), "serving store");
    Ok(tokio::spawn(accept_forever(
        listener,
        store,
        path.to_path_buf(),
    )))
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

async fn accept_forever(listener: UnixListener, store: Arc<dyn Store>, path: PathBuf) {
    // Owning the connection tasks here is what makes aborting the server close them all.
    let mut connections = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                connections.spawn(serve_connection(stream, store.clone()));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "accepting a store client failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
        reap_finished(&mut connections);
    }
}

fn reap_finished(tasks: &mut JoinSet<()>) {
    while let Some(outcome) = tasks.try_join_next() {
        if let Err(e) = outcome
            && e.is_panic()
        {
            tracing::error!(error = %e, "a store server task panicked");
        }
    }
}

/// One client connection. Every task it starts lives in its `JoinSet`, so returning from
/// here stops them all: its writer, its in-flight calls and its watches.
async fn serve_connection(stream: UnixStream, store: Arc<dyn Store>) {
    let (read_half, write_half) = stream.into_split();
    let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_LINES);
    let mut connection = ServerConnection {
        store,
        outgoing,
        tasks: JoinSet::new(),
        watches: HashMap::new(),
        call_slots: Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT)),
    };
    connection
        .tasks
        .spawn(write_server_lines(write_half, outgoing_rx));
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    while let Some(request) = next_request(&mut reader, &mut line).await {
        // The semaphore is never closed, so this only ever waits.
        let Ok(slot) = connection.call_slots.clone().acquire_owned().await else {
            return;
        };
        connection.start(request, slot);
        reap_finished(&mut connection.tasks);
    }
}

/// The next request, or `None` when the connection must close (end of input, or a client
/// that does not speak the protocol: it is cut off rather than guessed at).
async fn next_request(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Option<Request> {
    loop {
        match read_bounded_line(reader, line, MAX_REQUEST_LINE).await {
            Ok(LineRead::Complete) if line.trim_ascii().is_empty() => continue,
            Ok(LineRead::Complete) => {}
            Ok(LineRead::Eof) => return None,
            Ok(LineRead::TooLong) => {
                tracing::warn!(
                    "store client sent a line over {MAX_REQUEST_LINE} bytes; closing its connection"
                );
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading from a store client failed; closing its connection");
                return None;
            }
        }
        return match serde_json::from_slice(line) {
            Ok(request) => Some(request),
            Err(e) => {
                tracing::warn!(error = %e, "store client sent a malformed request; closing its connection");
                None
            }
        };
    }
}

async fn write_server_lines(half: OwnedWriteHalf, lines: mpsc::Receiver<String>) {
    if let Err(e) = write_lines(half, lines).await {
        tracing::debug!(error = %e, "writing to a store client failed");
    }
}

struct ServerConnection {
    store: Arc<dyn Store>,
    outgoing: mpsc::Sender<String>,
    tasks: JoinSet<()>,
    /// Open watches by id, to cancel them on request.
    watches: HashMap<u64, AbortHandle>,
    call_slots: Arc<Semaphore>,
}

impl ServerConnection {
    /// Starts answering one request in its own task, so that a slow call (or a watch,
    /// which never finishes) does not hold up the others on this connection.
    /// `slot` is held until the answer is queued; a watch, which never finishes, gives it
    /// back at once (watches are limited by count instead).
    fn start(&mut self, Request { id, call }: Request, slot: OwnedSemaphorePermit) {
        match call {
            Call::Watch { prefix, after } => self.start_watch(id, prefix, after, slot),
            Call::CancelWatch { watch } => {
                if let Some(task) = self.watches.remove(&watch) {
                    task.abort();
                }
                self.respond_later(id, Ok(Reply::Done), slot);
            }
            call => {
                let store = self.store.clone();
                let outgoing = self.outgoing.clone();
                self.tasks.spawn(async move {
                    let result = answer(store.as_ref(), call).await;
                    send_frame(&outgoing, &Frame::Response { id, result }).await;
                    drop(slot);
                });
            }
        }
    }

    fn start_watch(
        &mut self,
        id: u64,
        prefix: String,
        after: Revision,
        slot: OwnedSemaphorePermit,
    ) {
        self.watches.retain(|_, task| !task.is_finished());
        if let Some(refusal) = self.refuse_watch(id) {
            self.respond_later(id, Err(refusal), slot);
            return;
        }
        let task = self.tasks.spawn(run_watch(
            self.store.clone(),
            id,
            prefix,
            after,
            self.outgoing.clone(),
        ));
        self.watches.insert(id, task);
    }

    fn refuse_watch(&self, id: u64) -> Option<StoreError> {
        if self.watches.contains_key(&id) {
            return Some(StoreError::Protocol(format!(
                "watch id {id} is already open on this connection"
            )));
        }
        if self.watches.len() >= MAX_WATCHES_PER_CONNECTION {
            return Some(StoreError::Protocol(format!(
                "too many watches on one connection (at most {MAX_WATCHES_PER_CONNECTION})"
            )));
        }
        None
    }

    fn respond_later(&mut self, id: u64, result: Result<Reply>, slot: OwnedSemaphorePermit) {
        let outgoing = self.outgoing.clone();
        self.tasks.spawn(async move {
            send_frame(&outgoing, &Frame::Response { id, result }).await;
            drop(slot);
        });
    }
}

async fn answer(store: &dyn Store, call: Call) -> Result<Reply> {
    Ok(match call {
        Call::Get { key } => Reply::Value(store.get(&key).await?),
        Call::List { prefix } => {
            let (kvs, revision) = store.list(&prefix).await?;
            Reply::Listing { kvs, revision }
        }
        Call::Txn { compares, ops } => Reply::Txn(store.txn(compares, ops).await?),
        Call::GrantLease { ttl } => Reply::Lease(store.grant_lease(ttl).await?),
        Call::KeepAlive { lease } => {
            store.keep_alive(lease).await?;
            Reply::Done
        }
        Call::RevokeLease { lease } => {
            store.revoke_lease(lease).await?;
            Reply::Done
        }
        Call::Watch { .. } | Call::CancelWatch { .. } => {
            return Err(StoreError::Protocol(
                "watch calls are handled by the connection, not answered".to_string(),
            ));
        }
    })
}

/// Acknowledges the watch, then forwards its events until it ends, fails, or is aborted.
async fn run_watch(
    store: Arc<dyn Store>,
    id: u64,
    prefix: String,
    after: Revision,
    outgoing: mpsc::Sender<String>,
) {
    let mut watch = match store.watch(&prefix, after).await {
        Ok(watch) => watch,
        Err(error) => {
            send_frame(
                &outgoing,
                &Frame::Response {
                    id,
                    result: Err(error),
                },
            )
            .await;
            return;
        }
    };
    let ack = Frame::Response {
        id,
        result: Ok(Reply::WatchStarted { watch: id }),
    };
    if !send_frame(&outgoing, &ack).await {
        return;
    }
    loop {
        let (frame, last) = match watch.next().await {
            Some(event) => {
                let last = event.is_err();
                (Frame::WatchEvent { watch: id, event }, last)
            }
            None => (Frame::WatchEnded { watch: id }, true),
        };
        if !send_frame(&outgoing, &frame).await || last {
            return;
        }
    }
}

/// False when the connection's writer is gone, i.e. the connection is closing.
async fn send_frame(outgoing: &mpsc::Sender<String>, frame: &Frame) -> bool {
    match encode_line(frame) {
        Ok(line) => outgoing.send(line).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a store frame; dropping it");
            true
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// A `Store` served by [`serve`] on a Unix socket, possibly in another process.
///
/// Connects on first use and again on the first call after the connection broke. Every
/// call gives up after `call_timeout` with `StoreError::Timeout`; an unreachable server
/// gives `StoreError::Unavailable`. When the connection breaks, its open watches yield
/// `Err(Unavailable)` and end: resume them with a new watch from the last seen revision.
/// Watches share the connection, so dropping the `RemoteStore` ends them the same way.
pub struct RemoteStore {
    path: PathBuf,
    call_timeout: Duration,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl RemoteStore {
    /// Does not connect yet: the first call does, so this never fails.
    pub fn connect(path: impl Into<PathBuf>, call_timeout: Duration) -> RemoteStore {
        RemoteStore {
            path: path.into(),
            call_timeout,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call(&self, call: Call) -> Result<Reply> {
        self.call_feeding_watch(call, None).await
    }

    /// `watch_events` receives the events of the watch this call opens, if it is one.
    async fn call_feeding_watch(
        &self,
        call: Call,
        watch_events: Option<mpsc::Sender<Result<Event>>>,
    ) -> Result<Reply> {
        let attempt = async {
            let connection = self.connection().await?;
            connection.call(call, watch_events).await
        };
        tokio::time::timeout(self.call_timeout, attempt)
            .await
            .map_err(|_| StoreError::Timeout(self.call_timeout))?
    }

    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| !c.is_broken()) {
            return Ok(connection.clone());
        }
        *slot = None;
        let connection = Arc::new(Connection::open(&self.path).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }
}

#[async_trait]
impl Store for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        match self
            .call(Call::Get {
                key: key.to_string(),
            })
            .await?
        {
            Reply::Value(kv) => Ok(kv),
            other => Err(unexpected("get", &other)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let call = Call::List {
            prefix: prefix.to_string(),
        };
        match self.call(call).await? {
            Reply::Listing { kvs, revision } => Ok((kvs, revision)),
            other => Err(unexpected("list", &other)),
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        match self.call(Call::Txn { compares, ops }).await? {
            Reply::Txn(result) => Ok(result),
            other => Err(unexpected("txn", &other)),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        let (events, rx) = mpsc::channel(WATCH_BUFFER);
        let call = Call::Watch {
            prefix: prefix.to_string(),
            after,
        };
        match self.call_feeding_watch(call, Some(events)).await? {
            Reply::WatchStarted { .. } => Ok(Watch { rx }),
            other => Err(unexpected("watch", &other)),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        match self.call(Call::GrantLease { ttl }).await? {
            Reply::Lease(lease) => Ok(lease),
            other => Err(unexpected("grant_lease", &other)),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        match self.call(Call::KeepAlive { lease }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("keep_alive", &other)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.call(Call::RevokeLease { lease }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected("revoke_lease", &other)),
        }
    }
}

fn unexpected(call: &str, reply: &Reply) -> StoreError {
    StoreError::Protocol(format!("the server answered {call} with {reply:?}"))
}

/// One connection to the server: a writer task fed through `outgoing`, and a reader task
/// that routes responses and watch events through `shared`.
struct Connection {
    outgoing: mpsc::Sender<String>,
    shared: Arc<Shared>,
}

impl Connection {
    async fn open(path: &Path) -> Result<Connection> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to store socket {}: {e}",
                path.display()
            ))
        })?;
        let (read_half, write_half) = stream.into_split();
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_LINES);
        let shared = Arc::new(Shared::new(path));
        tokio::spawn(write_client_lines(write_half, outgoing_rx, shared.clone()));
        // A weak sender, so that dropping the RemoteStore ends the writer, which closes
        // the socket, which ends the reader.
        tokio::spawn(read_frames(read_half, shared.clone(), outgoing.downgrade()));
        Ok(Connection { outgoing, shared })
    }

    fn is_broken(&self) -> bool {
        self.outgoing.is_closed() || self.shared.calls().broken.is_some()
    }

    async fn call(
        &self,
        call: Call,
        watch_events: Option<mpsc::Sender<Result<Event>>>,
    ) -> Result<Reply> {
        let id = self.shared.next_id();
        let opens_watch = watch_events.is_some();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.shared.register(id, reply_tx, watch_events)?;
        // From here on, dropping this future (timeout) must unregister the call.
        let mut in_flight = InFlight {
            shared: self.shared.clone(),
            outgoing: self.outgoing.clone(),
            id,
            opens_watch,
            answered: false,
            watch_started: false,
        };
        let line = encode_line(&Request { id, call })?;
        if self.outgoing.send(line).await.is_err() {
            return Err(self.shared.unavailable());
        }
        let result = reply_rx
            .await
            .unwrap_or_else(|_| Err(self.shared.unavailable()));
        in_flight.answered = true;
        in_flight.watch_started = matches!(result, Ok(Reply::WatchStarted { .. }));
        result
    }
}

/// Unregisters a call when it finishes or is abandoned (timeout, caller dropped it).
struct InFlight {
    shared: Arc<Shared>,
    outgoing: mpsc::Sender<String>,
    id: u64,
    opens_watch: bool,
    answered: bool,
    watch_started: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut calls = self.shared.calls();
        calls.pending.remove(&self.id);
        if !self.opens_watch || self.watch_started {
            return;
        }
        calls.watches.remove(&self.id);
        let connection_alive = calls.broken.is_none();
        drop(calls);
        if !self.answered && connection_alive {
            // The server may start the watch after we stopped waiting; best effort, as
            // events for an unknown watch are ignored anyway.
            if let Some(line) = self.shared.cancel_watch_line(self.id) {
                let _ = self.outgoing.try_send(line);
            }
        }
    }
}

/// What the reader task and the callers of one connection share.
struct Shared {
    path: PathBuf,
    next_id: AtomicU64,
    calls: Mutex<Calls>,
}

#[derive(Default)]
struct Calls {
    /// Why the connection broke; once set, nothing new is registered.
    broken: Option<String>,
    pending: HashMap<u64, oneshot::Sender<Result<Reply>>>,
    watches: HashMap<u64, mpsc::Sender<Result<Event>>>,
}

impl Shared {
    fn new(path: &Path) -> Shared {
        Shared {
            path: path.to_path_buf(),
            next_id: AtomicU64::new(1),
            calls: Mutex::new(Calls::default()),
        }
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        // Every critical section is a few map operations that cannot panic halfway.
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn register(
        &self,
        id: u64,
        reply: oneshot::Sender<Result<Reply>>,
        watch_events: Option<mpsc::Sender<Result<Event>>>,
    ) -> Result<()> {
        let mut calls = self.calls();
        if let Some(reason) = &calls.broken {
            return Err(self.unavailable_because(reason));
        }
        calls.pending.insert(id, reply);
        if let Some(events) = watch_events {
            calls.watches.insert(id, events);
        }
        Ok(())
    }

    fn unavailable(&self) -> StoreError {
        let reason = self.calls().broken.clone();
        self.unavailable_because(reason.as_deref().unwrap_or("connection closed"))
    }

    fn unavailable_because(&self, reason: &str) -> StoreError {
        StoreError::Unavailable(format!("store socket {}: {reason}", self.path.display()))
    }

    fn cancel_watch_line(&self, watch: u64) -> Option<String> {
        let request = Request {
            id: self.next_id(),
            call: Call::CancelWatch { watch },
        };
        encode_line(&request)
            .inspect_err(|e| tracing::error!(error = %e, "cannot encode a watch cancellation"))
            .ok()
    }

    fn dispatch(&self, frame: Frame, outgoing: &mpsc::WeakSender<String>) {
        match frame {
            Frame::Response { id, result } => {
                let reply = self.calls().pending.remove(&id);
                // No one waiting means the caller gave up (timeout): nothing to do.
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Frame::WatchEvent { watch, event } => self.forward(watch, event, outgoing),
            Frame::WatchEnded { watch } => {
                self.calls().watches.remove(&watch);
            }
        }
    }

    /// Hands a watch event to its consumer without ever waiting for it: a consumer that
    /// does not keep up would otherwise stall every call on this connection.
    fn forward(&self, watch: u64, event: Result<Event>, outgoing: &mpsc::WeakSender<String>) {
        let mut calls = self.calls();
        let Some(events) = calls.watches.get(&watch) else {
            return; // cancelled on our side; the server will stop soon
        };
        if event.is_err() {
            if let Some(events) = calls.watches.remove(&watch) {
                deliver_last(events, event);
            }
            return;
        }
        match events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if let Some(events) = calls.watches.remove(&watch) {
                    tracing::warn!(
                        watch,
                        "remote watch fell {WATCH_BUFFER} events behind; cutting it off"
                    );
                    deliver_last(events, Err(StoreError::WatchLagged));
                }
                drop(calls);
                self.cancel_on_server(watch, outgoing);
            }
            Err(TrySendError::Closed(_)) => {
                calls.watches.remove(&watch);
                drop(calls);
                self.cancel_on_server(watch, outgoing);
            }
        }
    }

    fn cancel_on_server(&self, watch: u64, outgoing: &mpsc::WeakSender<String>) {
        let (Some(outgoing), Some(line)) = (outgoing.upgrade(), self.cancel_watch_line(watch))
        else {
            return;
        };
        tokio::spawn(async move {
            // Failing means the connection is closing, which cancels the watch anyway.
            let _ = outgoing.send(line).await;
        });
    }

    /// Fails every pending call and open watch with `Unavailable`; later calls reconnect.
    fn break_connection(&self, reason: String) {
        let (pending, watches) = {
            let mut calls = self.calls();
            if calls.broken.is_some() {
                return;
            }
            tracing::debug!(path = %self.path.display(), %reason, "store connection lost");
            calls.broken = Some(reason.clone());
            (
                std::mem::take(&mut calls.pending),
                std::mem::take(&mut calls.watches),
            )
        };
        let error = self.unavailable_because(&reason);
        for reply in pending.into_values() {
            let _ = reply.send(Err(error.clone()));
        }
        for events in watches.into_values() {
            deliver_last(events, Err(error.clone()));
        }
    }
}

/// Sends the final item of a watch stream, waiting in a task if the consumer is behind;
/// the stream ends once `events` is dropped after it.
fn deliver_last(events: mpsc::Sender<Result<Event>>, last: Result<Event>) {
    // Without a runtime (it is shutting down) the stream just ends, without the error.
    if let Err(TrySendError::Full(last)) = events.try_send(last)
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        runtime.spawn(async move {
            // An error only means the consumer is gone: nobody left to tell.
            let _ = events.send(last).await;
        });
    }
}

/// Breaks the connection when one of its tasks stops, however it stops (including being
/// dropped with its runtime), so that no caller ever waits on a connection nobody serves.
struct BreakOnExit {
    shared: Arc<Shared>,
    reason: String,
}

impl Drop for BreakOnExit {
    fn drop(&mut self) {
        self.shared
            .break_connection(std::mem::take(&mut self.reason));
    }
}

async fn write_client_lines(
    half: OwnedWriteHalf,
    lines: mpsc::Receiver<String>,
    shared: Arc<Shared>,
) {
    let mut exit = BreakOnExit {
        shared,
        reason: "the connection's writer stopped".to_string(),
    };
    exit.reason = match write_lines(half, lines).await {
        Ok(()) => "the client closed the connection".to_string(),
        Err(e) => format!("writing to the server failed: {e}"),
    };
}

async fn read_frames(half: OwnedReadHalf, shared: Arc<Shared>, outgoing: mpsc::WeakSender<String>) {
    let mut exit = BreakOnExit {
        shared: shared.clone(),
        reason: "the connection's reader stopped".to_string(),
    };
    exit.reason = route_frames_until_broken(half, &shared, &outgoing).await;
}

/// Routes every frame from the server; returns why the connection can no longer be used.
async fn route_frames_until_broken(
    half: OwnedReadHalf,
    shared: &Shared,
    outgoing: &mpsc::WeakSender<String>,
) -> String {
    let mut reader = BufReader::new(half);
    let mut line = Vec::new();
    loop {
        match read_bounded_line(&mut reader, &mut line, MAX_RESPONSE_LINE).await {
            Ok(LineRead::Complete) => {}
            Ok(LineRead::Eof) => return "the server closed the connection".to_string(),
            Ok(LineRead::TooLong) => {
                return format!("the server sent a line over {MAX_RESPONSE_LINE} bytes");
            }
            Err(e) => return format!("reading from the server failed: {e}"),
        }
        match serde_json::from_slice::<Frame>(&line) {
            Ok(frame) => shared.dispatch(frame, outgoing),
            Err(e) => return format!("the server sent a malformed frame: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Framing, shared by both ends
// ---------------------------------------------------------------------------------------

enum LineRead {
    /// `line` holds one line, without its newline.
    Complete,
    /// The peer closed the connection (a final line without newline is dropped: the peer
    /// died mid-write).
    Eof,
    /// The line is longer than allowed; the rest of it was not read.
    TooLong,
}

async fn read_bounded_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    line.clear();
    // One byte more than allowed, so that a line of exactly `max` bytes still fits with
    // its newline, and anything longer is detected without reading it all.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    (&mut *reader).take(limit).read_until(b'\n', line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(LineRead::Complete);
    }
    if line.len() > max {
        return Ok(LineRead::TooLong);
    }
    Ok(LineRead::Eof)
}

/// Writes lines as they come, flushing whenever the queue runs dry so that bursts (a watch
/// replay) go out in few writes without delaying a lone response.
async fn write_lines(half: OwnedWriteHalf, mut lines: mpsc::Receiver<String>) -> io::Result<()> {
    let mut writer = BufWriter::new(half);
    while let Some(line) = lines.recv().await {
        writer.write_all(line.as_bytes()).await?;
        if lines.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await
}

fn encode_line<T: Serialize>(value: &T) -> Result<String> {
    let mut line = serde_json::to_string(value)
        .map_err(|e| StoreError::Protocol(format!("encoding a store message: {e}")))?;
    line.push('\n');
    Ok(line)
}

fn with_context(error: io::Error, context: String) -> io::Error {
    io::Error::new(error.kind(), format!("{context}: {error}"))
}
