//! The edge to the API server, over kube-rs: list, watch from a resource version, and
//! merge patches, each bounded in time, for the handful of kinds Trellis reads and
//! writes. Objects go in and out as `serde_json::Value`, so the pure mapping
//! ([`crate::node`], [`crate::peer`], [`crate::location`]) never depends on this.
//!
//! A watch resumes from the last version it saw (bookmarks included). The API answers a
//! version it no longer has with an `ERROR` event holding a 410 `Status` in the stream;
//! that becomes [`KubeError::Expired`], the caller's cue to list afresh. Nothing else
//! re-lists.
//!
//! Credentials ([`Kube::connect`]): the pod's service account when there is one (its token
//! and CA, with the address chosen, never the service address it would imply: RBAC grants
//! Trellis its rights to it), else the kubeconfig's when the address came from one (Trellis
//! run as a host service), else none (the test double, over plain HTTP).

use crate::api_address::{ApiAddress, Source};
use futures::{Stream, StreamExt};
use kube::api::{
    Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, WatchEvent, WatchParams,
};
use serde_json::Value;
use std::future::Future;
use std::time::Duration;

/// A kind of object Trellis reads or writes.
#[derive(Clone, Debug)]
pub struct Kind {
    resource: ApiResource,
    namespaced: bool,
}

impl Kind {
    fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Kind {
        let api_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Kind {
            resource: ApiResource {
                group: group.into(),
                version: version.into(),
                api_version,
                kind: kind.into(),
                plural: plural.into(),
            },
            namespaced,
        }
    }

    pub fn node() -> Kind {
        Kind::new("", "v1", "Node", "nodes", false)
    }
    pub fn lease() -> Kind {
        Kind::new("coordination.k8s.io", "v1", "Lease", "leases", true)
    }
    pub fn service() -> Kind {
        Kind::new("", "v1", "Service", "services", true)
    }
    pub fn endpoint_slice() -> Kind {
        Kind::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            true,
        )
    }
    pub fn kilo_peer() -> Kind {
        Kind::new("kilo.squat.ai", "v1alpha1", "Peer", "peers", false)
    }
    pub fn custom_resource_definition() -> Kind {
        Kind::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
    }
    pub fn network_policy() -> Kind {
        Kind::new(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            true,
        )
    }
    pub fn pod() -> Kind {
        Kind::new("", "v1", "Pod", "pods", true)
    }
    pub fn namespace() -> Kind {
        Kind::new("", "v1", "Namespace", "namespaces", false)
    }
    pub fn config_map() -> Kind {
        Kind::new("", "v1", "ConfigMap", "configmaps", true)
    }
    pub fn location() -> Kind {
        use crate::location::{GROUP, KIND, PLURAL, VERSION};
        Kind::new(GROUP, VERSION, KIND, PLURAL, false)
    }

    pub fn name(&self) -> &str {
        &self.resource.plural
    }
}

/// What a watch saw.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Added or modified: the object as it is now.
    Applied(Value),
    Deleted(Value),
    /// Nothing changed up to the event's version.
    Bookmark,
}

/// One watch event and the version to resume after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub change: Change,
    pub resource_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{what}: the API server did not answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what}: resource version {version} is gone (410): list afresh")]
    Expired { what: String, version: String },
    #[error("{what}: {code} {reason}: {message}")]
    Refused {
        what: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {why}")]
    Decode { what: String, why: String },
}

/// A client of one API server.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    timeout: Duration,
}

impl Kube {
    /// A client of the API server at `address` without credentials (a test double over
    /// plain HTTP); each call may take up to `timeout`.
    pub fn new(address: &ApiAddress, timeout: Duration) -> Result<Kube, KubeError> {
        let config = kube::Config::new(parse_url(address)?);
        Kube::with_config(config, address, timeout)
    }

    /// `config` pointed at `address` (whatever the credentials' source implied), each call
    /// bounded by `timeout`.
    fn with_config(
        mut config: kube::Config,
        address: &ApiAddress,
        timeout: Duration,
    ) -> Result<Kube, KubeError> {
        config.cluster_url = parse_url(address)?;
        config.read_timeout = Some(timeout);
        config.connect_timeout = Some(timeout);
        let client = kube::Client::try_from(config).map_err(|source| KubeError::Transport {
            what: format!("connecting to {}", address.url),
            source,
        })?;
        Ok(Kube { client, timeout })
    }

    /// A client of the API server at `address`, with the credentials that go with how it
    /// was found (module doc).
    pub async fn connect(address: &ApiAddress, timeout: Duration) -> Result<Kube, KubeError> {
        let what = format!("credentials for {}", address.url);
        // The pod's service account is what RBAC grants Trellis its rights to; the
        // kubelet's own certificate is limited by the Node authorizer to what a kubelet may
        // do (no Leases in Trellis's namespace, no Locations). So the kubeconfig's
        // credentials are used only where there is no service account (Trellis run as a
        // host service with a kubeconfig of its own).
        if let Ok(config) = kube::Config::incluster_env() {
            return Kube::with_config(config, address, timeout);
        }
        match &address.source {
            Source::KubeletKubeconfig(path) => {
                let file =
                    kube::config::Kubeconfig::read_from(path).map_err(|e| KubeError::Decode {
                        what: format!("kubeconfig {path}"),
                        why: e.to_string(),
                    })?;
                let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| KubeError::Decode {
                        what: what.clone(),
                        why: e.to_string(),
                    })?;
                Kube::with_config(config, address, timeout)
            }
            _ => Kube::new(address, timeout),
        }
    }

    fn api(&self, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        match (kind.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &kind.resource),
            _ => Api::all_with(self.client.clone(), &kind.resource),
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(KubeError::Timeout {
                what: what.into(),
                after: self.timeout,
            }),
            Ok(Err(kube::Error::Api(status))) => Err(refused(what, &status)),
            Ok(Err(source)) => Err(KubeError::Transport {
                what: what.into(),
                source,
            }),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// Every object of `kind` (in `namespace`, or all), and the version to watch from.
    pub async fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
    ) -> Result<(Vec<Value>, String), KubeError> {
        let what = format!("listing {}", kind.name());
        let api = self.api(kind, namespace);
        let list = self
            .bounded(&what, api.list(&ListParams::default()))
            .await?;
        let version = list.metadata.resource_version.clone().unwrap_or_default();
        let objects = list
            .items
            .into_iter()
            .map(|o| to_value(&what, &o))
            .collect::<Result<_, _>>()?;
        Ok((objects, version))
    }

    /// Changes to `kind` after version `from`, with bookmarks, until the server ends the
    /// watch (then the caller watches again from the last version it saw).
    pub async fn watch(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        from: &str,
    ) -> Result<impl Stream<Item = Result<Event, KubeError>> + use<>, KubeError> {
        let what = format!("watching {}", kind.name());
        let api = self.api(kind, namespace);
        let params = WatchParams::default().timeout(290);
        let stream = self.bounded(&what, api.watch(&params, from)).await?;
        let from = from.to_string();
        Ok(stream.map(move |item| event(&what, &from, item)))
    }

    /// Creates `object` (a Lease, a Location the first time it is needed); a conflict is
    /// `Refused` with code 409.
    pub async fn create(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<Value, KubeError> {
        let what = format!("creating {}", kind.name());
        let typed: DynamicObject =
            serde_json::from_value(object.clone()).map_err(|e| KubeError::Decode {
                what: what.clone(),
                why: e.to_string(),
            })?;
        let api = self.api(kind, namespace);
        let created = self
            .bounded(&what, api.create(&Default::default(), &typed))
            .await?;
        to_value(&what, &created)
    }

    /// One object, or `None` when there is none.
    pub async fn get(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Value>, KubeError> {
        let what = format!("reading {} {name}", kind.name());
        let api = self.api(kind, namespace);
        match self.bounded(&what, api.get_opt(name)).await? {
            Some(object) => Ok(Some(to_value(&what, &object)?)),
            None => Ok(None),
        }
    }

    /// Deletes one object; one that is already gone is not an error.
    pub async fn delete(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), KubeError> {
        let what = format!("deleting {} {name}", kind.name());
        let api = self.api(kind, namespace);
        match self
            .bounded(&what, api.delete(name, &Default::default()))
            .await
        {
            Ok(_) => Ok(()),
            Err(KubeError::Refused { code: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A JSON merge patch of one object (or of its status), returning it as it is now.
    pub async fn merge_patch(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
        status: bool,
    ) -> Result<Value, KubeError> {
        let what = format!("patching {} {name}", kind.name());
        let api = self.api(kind, namespace);
        let params = PatchParams::default();
        let patched = if status {
            self.bounded(&what, api.patch_status(name, &params, &Patch::Merge(patch)))
                .await?
        } else {
            self.bounded(&what, api.patch(name, &params, &Patch::Merge(patch)))
                .await?
        };
        to_value(&what, &patched)
    }
}

fn event(
    what: &str,
    from: &str,
    item: Result<WatchEvent<DynamicObject>, kube::Error>,
) -> Result<Event, KubeError> {
    let applied = |o: &DynamicObject, deleted: bool| -> Result<Event, KubeError> {
        let value = to_value(what, o)?;
        Ok(Event {
            resource_version: o.metadata.resource_version.clone().unwrap_or_default(),
            change: if deleted {
                Change::Deleted(value)
            } else {
                Change::Applied(value)
            },
        })
    };
    match item {
        Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => applied(&o, false),
        Ok(WatchEvent::Deleted(o)) => applied(&o, true),
        Ok(WatchEvent::Bookmark(b)) => Ok(Event {
            change: Change::Bookmark,
            resource_version: b.metadata.resource_version,
        }),
        Ok(WatchEvent::Error(status)) if status.code == 410 => Err(KubeError::Expired {
            what: what.into(),
            version: from.into(),
        }),
        Ok(WatchEvent::Error(status)) => Err(refused(what, &status)),
        Err(source) => Err(KubeError::Transport {
            what: what.into(),
            source,
        }),
    }
}

/// The address as a URI (of whatever type the client's config takes).
fn parse_url<U: std::str::FromStr>(address: &ApiAddress) -> Result<U, KubeError>
where
    U::Err: std::fmt::Display,
{
    address.url.parse().map_err(|e| KubeError::Decode {
        what: format!("API server address {}", address.url),
        why: format!("{e}"),
    })
}

/// The API's `Status` of a refusal, as an error naming what was asked.
fn refused(what: &str, status: &kube::core::Status) -> KubeError {
    KubeError::Refused {
        what: what.into(),
        code: status.code,
        reason: status.reason.clone(),
        message: status.message.clone(),
    }
}

fn to_value(what: &str, object: &DynamicObject) -> Result<Value, KubeError> {
    serde_json::to_value(object).map_err(|e| KubeError::Decode {
        what: what.into(),
        why: e.to_string(),
    })
}
