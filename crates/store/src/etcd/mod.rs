//! `EtcdStore`: the `Store` on an etcd v3 cluster, over gRPC.
//!
//! The `Store` model is etcd's own, so the mapping is direct: keys live under a
//! configurable prefix, revisions are etcd's, `watch(after)` is a watch from `after + 1`,
//! leases and transactions are etcd's. What this layer adds is what a node agent needs
//! from a store that may hang or vanish:
//! - every unary call has a deadline, and a frozen server (connections open, no answers)
//!   costs a caller at most that long: `StoreError::Timeout`;
//! - HTTP/2 keep-alive pings end a watch whose server stopped answering, so the watcher
//!   sees `Unavailable` within seconds and resumes from its last revision;
//! - the connection is re-established lazily on the next call after any failure, and an
//!   auth token that expired is replaced on the next call;
//! - with several members, calls stick to one until a call to it fails or times out, then
//!   move on to the next ([`Members`]), so a lost member costs one failed call.
//!
//! Members are reached over TCP (`http://`, `https://`) or a Unix socket (`unix:///path`),
//! which is how agents reach an embedded store that [`server`] serves with etcd's
//! protocol: one client path whatever the store.

pub mod proto;
pub mod server;

use crate::{
    Compare, Event, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch,
    prefix_end,
};
use async_trait::async_trait;
use futures::StreamExt;
use proto::etcdserverpb as pb;
use proto::etcdserverpb::auth_client::AuthClient;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::lease_client::LeaseClient;
use proto::etcdserverpb::watch_client::WatchClient;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Live events a watcher may have unread before it is cut off with `WatchLagged`.
const WATCH_BUFFER: usize = 1024;

/// How often an idle connection is pinged, and how long a ping may go unanswered before
/// the connection (and every watch on it) counts as dead.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a TCP connection to a member. The lab's tools use one that connects from inside
/// the lab's network namespace; blocking, run off the async threads.
pub type Dialer =
    Arc<dyn Fn(std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> + Send + Sync>;

/// Where the etcd cluster is and how to talk to it.
#[derive(Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members: `http://host:port`, `https://host:port`, or
    /// `unix:///path/to/socket` (plaintext; e.g. an embedded store served by
    /// [`server::serve_unix`]).
    pub endpoints: Vec<String>,
    /// Prepended to every key; keeps Trellis's keys apart from other users of the cluster.
    pub prefix: String,
    pub tls: Option<TlsFiles>,
    pub credentials: Option<Credentials>,
    /// Longest a unary call may take.
    pub call_timeout: Duration,
    /// How to connect, when not simply from this process's network namespace. Only with
    /// a single endpoint given as IP:PORT.
    pub dialer: Option<Dialer>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.tls)
            .field("credentials", &self.credentials)
            .field("call_timeout", &self.call_timeout)
            .field("dialer", &self.dialer.is_some())
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed the members' server certificates (PEM).
    pub ca: PathBuf,
    /// A client certificate and its key (PEM), for clusters with --client-cert-auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A configuration error, naming what is wrong: the store cannot even be tried.
#[derive(Debug, thiserror::Error)]
#[error("{field} {value:?}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

fn config_error(
    field: &'static str,
    value: impl Into<String>,
    reason: impl ToString,
) -> ConfigError {
    ConfigError {
        field,
        value: value.into(),
        reason: reason.to_string(),
    }
}

/// One lazily connected channel per member, and the one calls use now.
///
/// Not tonic's balancer: its reconnecting endpoints report themselves ready while their
/// member is down and fail the call they are given, so about one call in N failed for as
/// long as a member of N was gone (seen in the three-member test).
struct Members {
    channels: Vec<Channel>,
    current: AtomicUsize,
}

impl Members {
    fn pick(&self) -> (usize, Channel) {
        let index = self.current.load(Ordering::Relaxed) % self.channels.len();
        (index, self.channels[index].clone())
    }

    /// A call to member `index` failed: later calls go to the next member. Concurrent
    /// failures of the same member move on once, not once each.
    fn failed(&self, index: usize) {
        let next = (index + 1) % self.channels.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

pub struct EtcdStore {
    members: Arc<Members>,
    prefix: String,
    credentials: Option<Credentials>,
    /// The auth token, when the cluster has authentication on; `None` until the first call.
    token: Mutex<Option<String>>,
    call_timeout: Duration,
}

impl EtcdStore {
    /// Checks the configuration and reads the TLS files; connects on the first call (and
    /// again after any failure), so a cluster that is down now is not an error here.
    pub fn new(config: EtcdConfig) -> std::result::Result<Arc<EtcdStore>, ConfigError> {
        if config.endpoints.is_empty() {
            return Err(config_error(
                "endpoints",
                "",
                "at least one etcd URL is needed",
            ));
        }
        let tls = config.tls.as_ref().map(tls_config).transpose()?;
        if config.dialer.is_some() && config.endpoints.len() != 1 {
            return Err(config_error(
                "endpoints",
                config.endpoints.join(","),
                "a custom dialer takes exactly one endpoint",
            ));
        }
        let mut channels = Vec::new();
        for url in &config.endpoints {
            if let Some(path) = url.strip_prefix("unix://") {
                channels.push(unix_channel(url, path, &config, tls.is_some())?);
                continue;
            }
            let https = url.starts_with("https://");
            if !https && !url.starts_with("http://") {
                return Err(config_error(
                    "endpoint",
                    url,
                    "expected http://HOST:PORT, https://HOST:PORT or unix:///PATH",
                ));
            }
            if https != tls.is_some() {
                return Err(config_error(
                    "endpoint",
                    url,
                    if https {
                        "https needs a CA certificate (--etcd-ca)"
                    } else {
                        "TLS files were given: use https://"
                    },
                ));
            }
            let mut endpoint = endpoint(url, &config)?.tcp_nodelay(true);
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| config_error("endpoint", url, e))?;
            }
            channels.push(match config.dialer.clone() {
                Some(dialer) => endpoint.connect_with_connector_lazy(dialing(dialer)),
                None => endpoint.connect_lazy(),
            });
        }
        Ok(Arc::new(EtcdStore {
            members: Arc::new(Members {
                channels,
                current: AtomicUsize::new(0),
            }),
            prefix: config.prefix,
            credentials: config.credentials,
            token: Mutex::new(None),
            call_timeout: config.call_timeout,
        }))
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    fn key_value(&self, kv: proto::mvccpb::KeyValue) -> Result<KeyValue> {
        key_value(&self.prefix, kv)
    }

    /// The request with the auth token attached, authenticating first if needed.
    async fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = self.token().await? {
            let value = token
                .parse()
                .map_err(|_| StoreError::Protocol("the auth token is not valid ASCII".into()))?;
            request.metadata_mut().insert("token", value);
        }
        Ok(request)
    }

    async fn token(&self) -> Result<Option<String>> {
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        if let Some(token) = self.lock_token().clone() {
            return Ok(Some(token));
        }
        let request = pb::AuthenticateRequest {
            name: credentials.user.clone(),
            password: credentials.password.clone(),
        };
        let response = self
            .call(|channel| async { AuthClient::new(channel).authenticate(request).await })
            .await?;
        let token = response.into_inner().token;
        *self.lock_token() = Some(token.clone());
        Ok(Some(token))
    }

    fn lock_token(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.token.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one call on the current member under the deadline; a member that fails it
    /// or lets it time out is left for the next.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let (member, channel) = self.members.pick();
        let answer = self.deadline(call(channel)).await;
        if let Err(StoreError::Timeout(_) | StoreError::Unavailable(_)) = &answer {
            self.members.failed(member);
        }
        answer
    }

    /// Runs one call under the deadline, mapping gRPC failures onto `StoreError`.
    async fn deadline<T>(
        &self,
        call: impl Future<Output = std::result::Result<T, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Err(_) => Err(StoreError::Timeout(self.call_timeout)),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(status)) => Err(self.store_error(status)),
        }
    }

    fn store_error(&self, status: tonic::Status) -> StoreError {
        let error = status_error(&status);
        if matches!(error, StoreError::Denied(_)) && status.message().contains("token") {
            // An expired or revoked token: the next call authenticates again.
            *self.lock_token() = None;
        }
        error
    }

    async fn range(&self, range: pb::RangeRequest) -> Result<pb::RangeResponse> {
        let request = self.request(range).await?;
        Ok(self
            .call(|channel| async { KvClient::new(channel).range(request).await })
            .await?
            .into_inner())
    }

    async fn keep_alive_once(&self, lease: LeaseId) -> Result<i64> {
        let request = self
            .request(futures::stream::iter([pb::LeaseKeepAliveRequest {
                id: lease as i64,
            }]))
            .await?;
        let mut answers = self
            .call(|channel| async { LeaseClient::new(channel).lease_keep_alive(request).await })
            .await?
            .into_inner();
        match self.deadline(answers.message()).await? {
            Some(answer) => Ok(answer.ttl),
            None => Err(StoreError::Unavailable(
                "etcd closed the keep-alive stream without an answer".into(),
            )),
        }
    }
}

/// The endpoint for `url` with the deadlines and keep-alive pings every member gets.
fn endpoint(url: &str, config: &EtcdConfig) -> std::result::Result<Endpoint, ConfigError> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| config_error("endpoint", url, e))?
        .connect_timeout(config.call_timeout)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// A channel to a member listening on the Unix socket at `path` (`unix:///abs/path`, or
/// `unix://rel/path` relative to the working directory, as etcdctl reads them): plaintext,
/// and reachable from any network namespace that sees the file.
fn unix_channel(
    url: &str,
    path: &str,
    config: &EtcdConfig,
    tls: bool,
) -> std::result::Result<Channel, ConfigError> {
    if path.is_empty() {
        return Err(config_error("endpoint", url, "expected unix:///PATH"));
    }
    if tls {
        return Err(config_error(
            "endpoint",
            url,
            "TLS over a Unix socket is not supported: the socket file's permissions guard it",
        ));
    }
    if config.dialer.is_some() {
        return Err(config_error(
            "endpoint",
            url,
            "a custom dialer takes an IP:PORT endpoint, not a Unix socket",
        ));
    }
    let path = PathBuf::from(path);
    // The URI only names the HTTP/2 authority ("localhost", as gRPC does for Unix sockets).
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display()))
            })?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(endpoint("http://localhost", config)?.connect_with_connector_lazy(connector))
}

/// A connector that hands the dialer the URI's IP:PORT.
fn dialing(
    dialer: Dialer,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>>
             + Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let dialer = dialer.clone();
        async move {
            let invalid = || {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{uri} is not IP:PORT"),
                )
            };
            let host = uri.host().ok_or_else(invalid)?.trim_matches(['[', ']']);
            let ip: std::net::IpAddr = host.parse().map_err(|_| invalid())?;
            let addr = std::net::SocketAddr::new(ip, uri.port_u16().ok_or_else(invalid)?);
            let stream = tokio::task::spawn_blocking(move || dialer(addr))
                .await
                .map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::TcpStream::from_std(stream)?,
            ))
        }
    })
}

/// An etcd key-value as the `Store` model has it: the key relative to `prefix`.
fn key_value(prefix: &str, kv: proto::mvccpb::KeyValue) -> Result<KeyValue> {
    let key = std::str::from_utf8(&kv.key)
        .map_err(|_| StoreError::Protocol("a key is not UTF-8".into()))?;
    let key = key
        .strip_prefix(prefix)
        .ok_or_else(|| StoreError::Protocol(format!("key {key:?} is outside the prefix")))?
        .to_string();
    Ok(KeyValue {
        key,
        value: kv.value,
        create_revision: revision(kv.create_revision),
        mod_revision: revision(kv.mod_revision),
        lease: (kv.lease != 0).then_some(kv.lease as LeaseId),
    })
}

fn revision(r: i64) -> Revision {
    r.max(0) as Revision
}

fn header_revision(header: Option<&pb::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| revision(h.revision))
        .ok_or_else(|| StoreError::Protocol("etcd answered without a header".into()))
}

fn status_error(status: &tonic::Status) -> StoreError {
    use tonic::Code;
    let message = status.message();
    match status.code() {
        Code::NotFound if message.contains("lease not found") => StoreError::LeaseNotFound(0),
        Code::OutOfRange if message.contains("compacted") => StoreError::Compacted {
            requested: 0,
            oldest: 0,
        },
        Code::Unauthenticated | Code::PermissionDenied => {
            StoreError::Denied(format!("etcd: {message}"))
        }
        // etcd 3.4 reports a missing or bad token as InvalidArgument.
        Code::InvalidArgument
            if ["user name", "token", "authentication", "password"]
                .iter()
                .any(|m| message.contains(m)) =>
        {
            StoreError::Denied(format!("etcd: {message}"))
        }
        Code::Unavailable | Code::Cancelled | Code::Unknown | Code::DeadlineExceeded => {
            StoreError::Unavailable(format!("etcd: {}", describe(status)))
        }
        _ => StoreError::Protocol(format!("etcd: {}", describe(status))),
    }
}

/// The status with its cause chain, which is where a TLS or DNS failure explains itself.
fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn tls_config(files: &TlsFiles) -> std::result::Result<ClientTlsConfig, ConfigError> {
    let read = |field: &'static str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| config_error(field, path.display().to_string(), e))
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--etcd-ca", &files.ca)?));
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read("--etcd-cert", cert)?,
                read("--etcd-key", key)?,
            ));
        }
        (None, None) => {}
        (Some(cert), None) => {
            return Err(config_error(
                "--etcd-cert",
                cert.display().to_string(),
                "needs --etcd-key too",
            ));
        }
        (None, Some(key)) => {
            return Err(config_error(
                "--etcd-key",
                key.display().to_string(),
                "needs --etcd-cert too",
            ));
        }
    }
    Ok(tls)
}

fn compare(store: &EtcdStore, c: Compare) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let (key, target, union, result) = match c {
        // A key that does not exist has create_revision 0.
        Compare::Absent(key) => (
            key,
            CompareTarget::Create,
            TargetUnion::CreateRevision(0),
            CompareResult::Equal,
        ),
        // The trait asks for an existing key, whose revisions are never 0, while etcd
        // would take a missing key for revision 0: ask for what no key has instead.
        Compare::ModRevision(key, 0) | Compare::CreateRevision(key, 0) => (
            key,
            CompareTarget::Create,
            TargetUnion::CreateRevision(0),
            CompareResult::Less,
        ),
        Compare::ModRevision(key, r) => (
            key,
            CompareTarget::Mod,
            TargetUnion::ModRevision(r as i64),
            CompareResult::Equal,
        ),
        Compare::CreateRevision(key, r) => (
            key,
            CompareTarget::Create,
            TargetUnion::CreateRevision(r as i64),
            CompareResult::Equal,
        ),
        Compare::Value(key, v) => (
            key,
            CompareTarget::Value,
            TargetUnion::Value(v),
            CompareResult::Equal,
        ),
    };
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: store.full_key(&key),
        range_end: Vec::new(),
        target_union: Some(union),
    }
}

fn request_op(store: &EtcdStore, op: Op) -> pb::RequestOp {
    use pb::request_op::Request;
    let request = match op {
        Op::Put { key, value, lease } => Request::RequestPut(pb::PutRequest {
            key: store.full_key(&key),
            value,
            lease: lease.map_or(0, |l| l as i64),
            ..Default::default()
        }),
        Op::Delete { key } => Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: store.full_key(&key),
            ..Default::default()
        }),
    };
    pb::RequestOp {
        request: Some(request),
    }
}

fn lease_of(ops: &[Op]) -> LeaseId {
    ops.iter()
        .find_map(|op| match op {
            Op::Put { lease: Some(l), .. } => Some(*l),
            _ => None,
        })
        .unwrap_or(0)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let answer = self
            .range(pb::RangeRequest {
                key: self.full_key(key),
                ..Default::default()
            })
            .await?;
        answer
            .kvs
            .into_iter()
            .next()
            .map(|kv| self.key_value(kv))
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let key = self.full_key(prefix);
        let answer = self
            .range(pb::RangeRequest {
                range_end: prefix_end(&key),
                key,
                ..Default::default()
            })
            .await?;
        let revision = header_revision(answer.header.as_ref())?;
        let kvs = answer
            .kvs
            .into_iter()
            .map(|kv| self.key_value(kv))
            .collect::<Result<Vec<_>>>()?;
        Ok((kvs, revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        let lease = lease_of(&ops);
        let request = self
            .request(pb::TxnRequest {
                compare: compares.into_iter().map(|c| compare(self, c)).collect(),
                success: ops.into_iter().map(|op| request_op(self, op)).collect(),
                failure: Vec::new(),
            })
            .await?;
        let answer = self
            .call(|channel| async { KvClient::new(channel).txn(request).await })
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease),
                other => other,
            })?
            .into_inner();
        Ok(TxnResult {
            succeeded: answer.succeeded,
            revision: header_revision(answer.header.as_ref())?,
        })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch> {
        let key = self.full_key(prefix);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    range_end: prefix_end(&key),
                    key,
                    start_revision: after as i64 + 1,
                    ..Default::default()
                },
            )),
        };
        // The request stream stays open for as long as the watch lives: closing it would
        // let etcd end the watch.
        let (requests, request_stream) = futures::channel::mpsc::channel(1);
        let mut requests = requests;
        requests
            .try_send(create)
            .map_err(|_| StoreError::Protocol("queueing the watch request".into()))?;
        let request = self.request(request_stream).await?;
        let (member, channel) = self.members.pick();
        // The first answer says whether the watch exists, so that a compacted start
        // revision is an error of this call rather than of the stream.
        let opened = async {
            let mut answers = self
                .deadline(async { WatchClient::new(channel).watch(request).await })
                .await?
                .into_inner();
            let first = self
                .deadline(answers.message())
                .await?
                .ok_or_else(|| StoreError::Unavailable("etcd closed the watch stream".into()))?;
            Ok((answers, first))
        };
        let (mut answers, first) = match opened.await {
            Ok(opened) => opened,
            Err(e) => {
                if let StoreError::Timeout(_) | StoreError::Unavailable(_) = e {
                    self.members.failed(member);
                }
                return Err(e);
            }
        };
        if let Some(error) = cancelled(&first, after) {
            return Err(error);
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let events = WatchEvents {
            prefix: self.prefix.clone(),
            after,
        };
        let members = self.members.clone();
        tokio::spawn(async move {
            let _keep_open = requests;
            if !events.forward(first, &tx) {
                return;
            }
            loop {
                let delivered = match answers.next().await {
                    Some(Ok(answer)) => events.forward(answer, &tx),
                    Some(Err(status)) => {
                        let error = status_error(&status);
                        if matches!(error, StoreError::Unavailable(_)) {
                            members.failed(member); // so the re-watch goes elsewhere
                        }
                        deliver_last(&tx, error);
                        false
                    }
                    None => {
                        deliver_last(&tx, StoreError::Unavailable("etcd ended the watch".into()));
                        false
                    }
                };
                if !delivered {
                    return;
                }
            }
        });
        Ok(Watch { rx })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts in whole seconds; round up so a lease never lives shorter than asked.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let request = self
            .request(pb::LeaseGrantRequest {
                ttl: seconds.max(1) as i64,
                id: 0,
            })
            .await?;
        let answer = self
            .call(|channel| async { LeaseClient::new(channel).lease_grant(request).await })
            .await?
            .into_inner();
        if !answer.error.is_empty() {
            return Err(StoreError::Protocol(format!(
                "etcd lease grant: {}",
                answer.error
            )));
        }
        Ok(answer.id as LeaseId)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // A lease that is gone is answered with TTL 0, not with an error.
        match self.keep_alive_once(lease).await {
            Ok(ttl) if ttl > 0 => Ok(()),
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(e),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let request = self
            .request(pb::LeaseRevokeRequest { id: lease as i64 })
            .await?;
        match self
            .call(|channel| async { LeaseClient::new(channel).lease_revoke(request).await })
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::LeaseNotFound(_)) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(e),
        }
    }
}

/// Why a watch answer ended the watch, if it did.
fn cancelled(answer: &pb::WatchResponse, after: Revision) -> Option<StoreError> {
    if answer.compact_revision > 0 {
        return Some(StoreError::Compacted {
            requested: after,
            oldest: revision(answer.compact_revision),
        });
    }
    answer.canceled.then(|| {
        let reason = &answer.cancel_reason;
        if reason.contains(server::LAGGED_REASON) {
            // Our own server cut the watch off for falling behind.
            StoreError::WatchLagged
        } else if reason.contains("user name")
            || reason.contains("permission")
            || reason.contains("token")
        {
            StoreError::Denied(format!("etcd cancelled the watch: {reason}"))
        } else {
            StoreError::Unavailable(format!("etcd cancelled the watch: {reason}"))
        }
    })
}

/// Hands the watcher the error that ends its stream, once it has room for it: a watcher
/// whose buffer is full still learns why its stream ended, and nobody waits for it.
fn deliver_last(tx: &mpsc::Sender<Result<Event>>, error: StoreError) {
    if let Err(mpsc::error::TrySendError::Full(last)) = tx.try_send(Err(error)) {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(last).await;
        });
    }
}

struct WatchEvents {
    prefix: String,
    after: Revision,
}

impl WatchEvents {
    /// Hands the answer's events to the watcher; false when the watch is over (cancelled,
    /// watcher gone, or watcher too far behind).
    fn forward(&self, mut answer: pb::WatchResponse, tx: &mpsc::Sender<Result<Event>>) -> bool {
        for event in std::mem::take(&mut answer.events) {
            let event = self.event(event);
            match tx.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    deliver_last(tx, StoreError::WatchLagged);
                    return false;
                }
            }
        }
        if let Some(error) = cancelled(&answer, self.after) {
            deliver_last(tx, error);
            return false;
        }
        true
    }

    fn event(&self, event: proto::mvccpb::Event) -> Result<Event> {
        use proto::mvccpb::event::EventType;
        let kv = event
            .kv
            .ok_or_else(|| StoreError::Protocol("a watch event without a key".into()))?;
        let kv = key_value(&self.prefix, kv)?;
        if event.r#type == EventType::Delete as i32 {
            Ok(Event::Delete {
                key: kv.key,
                revision: kv.mod_revision,
            })
        } else {
            Ok(Event::Put(kv))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"/trellis/"), b"/trellis0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn bad_configuration_names_the_field_and_value() {
        let config = |endpoint: &str| EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            prefix: "/trellis/".into(),
            tls: None,
            credentials: None,
            call_timeout: Duration::from_secs(1),
            dialer: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let e = EtcdStore::new(config("127.0.0.1:2379"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("endpoint \"127.0.0.1:2379\""), "{e}");
        let e = EtcdStore::new(config("https://127.0.0.1:2379"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
        let mut with_tls = config("https://127.0.0.1:2379");
        with_tls.tls = Some(TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: None,
            key: None,
        });
        let e = EtcdStore::new(with_tls).err().unwrap().to_string();
        assert!(e.contains("--etcd-ca \"/nonexistent/ca.pem\""), "{e}");
        assert!(EtcdStore::new(config("http://127.0.0.1:2379")).is_ok());
    }

    #[test]
    fn unix_endpoints_are_plaintext_and_take_no_dialer() {
        let config = |endpoints: &[&str]| EtcdConfig {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: "/trellis/".into(),
            tls: None,
            credentials: None,
            call_timeout: Duration::from_secs(1),
            dialer: None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        assert!(EtcdStore::new(config(&["unix:///run/trellis/store.sock"])).is_ok());
        assert!(EtcdStore::new(config(&["unix:///a.sock", "http://127.0.0.1:2379"])).is_ok());
        let e = EtcdStore::new(config(&["unix://"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unix:///PATH"), "{e}");
        let mut with_tls = config(&["unix:///a.sock"]);
        with_tls.tls = Some(TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: None,
            key: None,
        });
        // The CA is read first; with a readable one the Unix endpoint is refused.
        let ca = std::env::temp_dir().join(format!("trt-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "").unwrap();
        with_tls.tls.as_mut().unwrap().ca = ca.clone();
        let e = EtcdStore::new(with_tls).err().map(|e| e.to_string());
        let _ = std::fs::remove_file(&ca);
        let e = e.unwrap();
        assert!(e.contains("TLS over a Unix socket"), "{e}");
        let mut with_dialer = config(&["unix:///a.sock"]);
        with_dialer.dialer = Some(Arc::new(
            std::net::TcpStream::connect::<std::net::SocketAddr>,
        ));
        let e = EtcdStore::new(with_dialer).err().unwrap().to_string();
        assert!(e.contains("dialer"), "{e}");
    }
}
