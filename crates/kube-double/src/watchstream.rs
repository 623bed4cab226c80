//! One watch: the events after a resource version (or, without one, a synthetic `ADDED` per
//! existing object), then live events, streamed as newline-delimited JSON
//! `{"type": …, "object": …}` until `timeoutSeconds` or the client leaves; `BOOKMARK`s carry
//! the current version when asked for, and a resume from a forgotten version (or a watcher
//! too slow to keep up) ends with an `ERROR` event holding a `410 Expired` Status.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Response, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::resources::ResourceDef;
use crate::router::{Body, Shared};
use crate::select::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::present;
use crate::table;
use crate::watch::{Event, EventType};

/// Which events a watch gets.
pub struct WatchFilter {
    pub def: ResourceDef,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub bookmarks: bool,
    /// Events' objects as Tables, with this `includeObject`.
    pub table: Option<String>,
}

impl WatchFilter {
    fn matches(&self, o: &Value) -> bool {
        self.labels.matches(o) && self.fields.matches(o)
    }

    /// The event as this watcher sees it: a modification that takes an object into the
    /// selection is an `ADDED`, one that takes it out a `DELETED`.
    fn translate(&self, e: &Event) -> Option<Bytes> {
        if e.group != self.def.group || e.resource != self.def.resource {
            return None;
        }
        if self.namespace.as_deref().is_some_and(|n| n != e.namespace) {
            return None;
        }
        let now = self.matches(&e.object);
        let kind = match (e.kind, e.prev.as_ref().map(|p| self.matches(p))) {
            (EventType::Modified, Some(true)) if now => EventType::Modified,
            (EventType::Modified, Some(false)) if now => EventType::Added,
            (EventType::Modified, Some(true)) => EventType::Deleted,
            (EventType::Modified, _) => return None,
            (k, _) if now => k,
            _ => return None,
        };
        let object = present(&self.def, &e.object);
        match &self.table {
            // `kubectl get -w` watches with the Table Accept header: one-row tables.
            Some(include) => Some(line(
                kind.as_str(),
                &table::table(&self.def, &[object], e.rv, include),
            )),
            None => Some(line(kind.as_str(), &object)),
        }
    }

    fn bookmark(&self, rv: u64) -> Bytes {
        line(
            "BOOKMARK",
            &json!({"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": {"resourceVersion": rv.to_string()}}),
        )
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn expired(requested: u64, oldest: u64) -> Bytes {
    line("ERROR", &ApiError::expired(requested, oldest).to_status())
}

/// A response body fed by a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Starts a watch from `from` (`None`: the current state as `ADDED` events first).
pub fn start(
    shared: Arc<Shared>,
    filter: WatchFilter,
    from: Option<u64>,
    timeout: Option<Duration>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut first: Vec<Bytes> = Vec::new();
    let mut events;
    let mut last;
    let mut failed = false;
    {
        let state = shared.lock();
        events = state.hub.subscribe();
        last = state.resource_version();
        match from {
            None => {
                for o in state.list(
                    &filter.def,
                    filter.namespace.as_deref(),
                    &filter.labels,
                    &filter.fields,
                ) {
                    first.push(match &filter.table {
                        Some(include) => {
                            line("ADDED", &table::table(&filter.def, &[o], last, include))
                        }
                        None => line("ADDED", &o),
                    });
                }
            }
            Some(rv) => match state.hub.since(rv) {
                // A version from the future: nothing until the store passes it.
                Ok(_) if rv > last => last = rv,
                Ok(history) => first.extend(history.iter().filter_map(|e| filter.translate(e))),
                Err(oldest) => {
                    first.push(expired(rv, oldest));
                    failed = true;
                }
            },
        }
    }
    let bookmark_every = shared.options.bookmark_interval;
    let mut ended = shared.watch_generation.subscribe();
    ended.mark_unchanged();
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        if failed {
            return;
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(shared.options.watch_timeout));
        tokio::pin!(deadline);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
        loop {
            tokio::select! {
                _ = ended.changed() => return,
                received = events.recv() => match received {
                    Ok(e) if e.rv > last => {
                        last = e.rv;
                        if let Some(b) = filter.translate(&e)
                            && tx.send(b).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let current = shared.lock().resource_version();
                        let _ = tx.send(expired(last, current)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if filter.bookmarks => {
                    // Everything up to the version the bookmark carries must be sent first:
                    // events are published under the lock, so draining under it is enough.
                    let mut pending = Vec::new();
                    let mut lagged = false;
                    let current = {
                        let _state = shared.lock();
                        loop {
                            match events.try_recv() {
                                Ok(e) if e.rv > last => {
                                    last = e.rv;
                                    pending.extend(filter.translate(&e));
                                }
                                Ok(_) => {}
                                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                    pending.push(expired(last, _state.resource_version()));
                                    lagged = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        _state.resource_version()
                    };
                    if lagged {
                        for b in pending {
                            let _ = tx.send(b).await;
                        }
                        return;
                    }
                    last = last.max(current);
                    pending.push(filter.bookmark(current));
                    for b in pending {
                        if tx.send(b).await.is_err() {
                            return;
                        }
                    }
                }
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(ChannelBody(rx).boxed())
        .expect("a response of a valid status and header")
}
