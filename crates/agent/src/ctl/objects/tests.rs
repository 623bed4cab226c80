//! Apply, delete and get against the embedded store, and the allocation race against a
//! real etcd: what is written, that a refused object leaves the store as it was, that a
//! re-apply writes nothing, that claims follow their Services, and that concurrent
//! writers never share an address.

use super::*;
use async_trait::async_trait;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use trellis_model::service::Service;
use trellis_store::embedded::EmbeddedStore;
use trellis_store::{KeyValue, LeaseId, Revision, TxnResult, Watch};

fn web(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    })
}

fn slice(name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.10"], "nodeName": "a1"}],
        "ports": [{"name": "http", "port": 8080}]
    })
}

fn objects(values: &[Value]) -> Vec<Object> {
    values
        .iter()
        .map(|v| Object::from_value(v.clone()).unwrap())
        .collect()
}

async fn service(store: &dyn Store, name: &str) -> Service {
    let listing = get(store, Kind::Service, Some("default"), Some(name))
        .await
        .unwrap();
    match listing.objects.into_iter().next() {
        Some(Object::Service(s)) => *s,
        other => panic!("{other:?}"),
    }
}

async fn claim_holder(store: &dyn Store, key: &str) -> Option<String> {
    let kv = store.get(key).await.unwrap()?;
    let holder: ClaimHolder = serde_json::from_slice(&kv.value).unwrap();
    Some(format!("{}/{}", holder.namespace, holder.name))
}

async fn store_revision(store: &dyn Store) -> Revision {
    store.list("").await.unwrap().1
}

fn outcomes(applied: &[Applied]) -> Vec<String> {
    applied.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn apply_allocates_claims_and_a_re_apply_writes_nothing() {
    let store = EmbeddedStore::new();
    let applied = apply(
        store.as_ref(),
        objects(&[web("web"), slice("web-1", "web")]),
    )
    .await
    .unwrap();
    assert_eq!(
        outcomes(&applied),
        [
            "service/web created",
            "endpointslice.discovery.k8s.io/web-1 created"
        ]
    );
    let svc = service(store.as_ref(), "web").await;
    let [ip] = svc.cluster_ips()[..] else {
        panic!("{:?}", svc.spec)
    };
    assert!(
        "10.96.0.0/12"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&ip)
    );
    assert!(svc.metadata.uid.is_some() && svc.metadata.creation_timestamp.is_some());
    assert_eq!(
        claim_holder(store.as_ref(), &keys::service_ip(ip))
            .await
            .as_deref(),
        Some("default/web")
    );

    let revision = store_revision(store.as_ref()).await;
    let again = apply(
        store.as_ref(),
        objects(&[web("web"), slice("web-1", "web")]),
    )
    .await
    .unwrap();
    assert_eq!(
        outcomes(&again),
        [
            "service/web unchanged",
            "endpointslice.discovery.k8s.io/web-1 unchanged"
        ]
    );
    assert_eq!(
        store_revision(store.as_ref()).await,
        revision,
        "nothing written"
    );

    let mut changed = web("web");
    changed["spec"]["ports"][0]["port"] = json!(81);
    let applied = apply(store.as_ref(), objects(&[changed])).await.unwrap();
    assert_eq!(outcomes(&applied), ["service/web configured"]);
    let svc = service(store.as_ref(), "web").await;
    assert_eq!(svc.cluster_ips(), [ip], "the ClusterIP is kept on update");
}

#[tokio::test]
async fn a_refused_object_leaves_the_store_as_it_was() {
    let store = EmbeddedStore::new();
    let mut first = web("first");
    first["spec"]["clusterIP"] = json!("10.96.0.10");
    apply(store.as_ref(), objects(&[first])).await.unwrap();
    let revision = store_revision(store.as_ref()).await;

    let mut thief = web("thief");
    thief["spec"]["clusterIP"] = json!("10.96.0.10");
    let err = apply(
        store.as_ref(),
        objects(&[web("fine"), slice("fine-1", "fine"), thief]),
    )
    .await
    .unwrap_err();
    let CtlError::InvalidObject {
        index,
        object,
        error,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*index, 2);
    assert_eq!(object, "Service default/thief");
    assert_eq!(
        (error.field.as_str(), error.value.as_str()),
        ("spec.clusterIP", "10.96.0.10")
    );
    assert!(error.reason.contains("already allocated"), "{err}");
    assert_eq!(
        store_revision(store.as_ref()).await,
        revision,
        "nothing of the batch was written"
    );
    assert!(store.get("services/default/fine").await.unwrap().is_none());

    let mut moved = web("first");
    moved["spec"]["clusterIP"] = json!("10.96.0.11");
    let err = apply(store.as_ref(), objects(&[moved])).await.unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");
}

#[tokio::test]
async fn objects_of_one_apply_never_share_a_value() {
    let store = EmbeddedStore::new();
    let tiny = json!({"granularity": "location", "gateways_per_location": 1,
        "services": {"cidrs": ["10.96.0.0/29"], "node_port_range": "30000-30003"}});
    store
        .put(keys::SETTINGS, serde_json::to_vec(&tiny).unwrap())
        .await
        .unwrap();
    let node_port = |name: &str| {
        let mut v = web(name);
        v["spec"]["type"] = json!("NodePort");
        v
    };
    let batch: Vec<Value> = ["a", "b", "c", "d"].map(node_port).to_vec();
    apply(store.as_ref(), objects(&batch)).await.unwrap();
    let mut ips = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for name in ["a", "b", "c", "d"] {
        let svc = service(store.as_ref(), name).await;
        ips.extend(svc.cluster_ips());
        ports.extend(svc.spec.ports[0].node_port());
    }
    assert_eq!(ips.len(), 4, "{ips:?}");
    assert_eq!(
        ports,
        (30000..=30003).collect(),
        "every node port, once each"
    );
    let err = apply(store.as_ref(), objects(&[node_port("e")]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no free port"), "{err}");
}

#[tokio::test]
async fn claims_follow_their_services_through_updates_and_deletes() {
    let store = EmbeddedStore::new();
    let mut lb = web("edge");
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["externalTrafficPolicy"] = json!("Local");
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}});
    apply(store.as_ref(), objects(&[lb])).await.unwrap();
    let svc = service(store.as_ref(), "edge").await;
    let node_port = svc.spec.ports[0].node_port().unwrap();
    let health = svc.health_check_node_port().unwrap();
    for port in [node_port, health] {
        assert_eq!(
            claim_holder(store.as_ref(), &keys::node_port(port))
                .await
                .as_deref(),
            Some("default/edge")
        );
    }

    // The manifest without status or allocated values changes nothing.
    let mut same = web("edge");
    same["spec"]["type"] = json!("LoadBalancer");
    same["spec"]["externalTrafficPolicy"] = json!("Local");
    let applied = apply(store.as_ref(), objects(&[same])).await.unwrap();
    assert_eq!(outcomes(&applied), ["service/edge unchanged"]);
    assert_eq!(
        service(store.as_ref(), "edge").await.load_balancer_ips(),
        ["203.0.113.9".parse::<IpAddr>().unwrap()]
    );

    // Back to ClusterIP: the node ports go, the address stays.
    apply(store.as_ref(), objects(&[web("edge")]))
        .await
        .unwrap();
    for port in [node_port, health] {
        assert_eq!(
            claim_holder(store.as_ref(), &keys::node_port(port)).await,
            None
        );
    }
    let ip = service(store.as_ref(), "edge").await.cluster_ips()[0];
    assert!(store.get(&keys::service_ip(ip)).await.unwrap().is_some());

    let edge = ObjectRef {
        kind: Kind::Service,
        namespace: "default".into(),
        name: "edge".into(),
    };
    let gone = ObjectRef {
        name: "gone".into(),
        ..edge.clone()
    };
    let deleted = delete(store.as_ref(), &[edge.clone(), gone.clone()])
        .await
        .unwrap();
    assert_eq!(deleted, [(edge, true), (gone, false)]);
    let (left, _) = store.list("").await.unwrap();
    assert!(left.is_empty(), "no record or claim left: {left:?}");

    // The address is free again, for anyone who asks.
    let mut reuse = web("other");
    reuse["spec"]["clusterIP"] = json!(ip.to_string());
    apply(store.as_ref(), objects(&[reuse])).await.unwrap();
}

#[tokio::test]
async fn services_without_addresses_hold_no_claims() {
    let store = EmbeddedStore::new();
    let mut headless = web("db");
    headless["spec"]["clusterIP"] = json!("None");
    let external = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "db.example.com"}});
    apply(store.as_ref(), objects(&[headless, external]))
        .await
        .unwrap();
    assert!(service(store.as_ref(), "db").await.is_headless());
    let (claims, _) = store.list(keys::SERVICE_IPS).await.unwrap();
    assert!(claims.is_empty(), "{claims:?}");
}

#[tokio::test]
async fn an_apply_too_large_for_one_transaction_is_refused_whole() {
    let store = EmbeddedStore::new();
    // Each new Service is two writes (itself and its address's claim).
    let many: Vec<Value> = (0..65).map(|i| web(&format!("s{i}"))).collect();
    let err = apply(store.as_ref(), objects(&many)).await.unwrap_err();
    assert!(err.to_string().contains("smaller groups"), "{err}");
    let (left, _) = store.list("").await.unwrap();
    assert!(left.is_empty());
    apply(store.as_ref(), objects(&many[..64])).await.unwrap();
}

#[tokio::test]
async fn resource_version_is_the_records_revision_and_a_precondition() {
    let store = EmbeddedStore::new();
    apply(store.as_ref(), objects(&[web("web")])).await.unwrap();
    let svc = service(store.as_ref(), "web").await;
    let version = svc.metadata.resource_version.clone().unwrap();
    let kv = store.get("services/default/web").await.unwrap().unwrap();
    assert_eq!(version, kv.mod_revision.to_string());
    assert!(
        !String::from_utf8_lossy(&kv.value).contains("resourceVersion"),
        "never stored"
    );

    // What `get` printed applies back unchanged; once the object moved on, it is refused.
    let printed = Object::Service(Box::new(svc));
    let applied = apply(store.as_ref(), vec![printed.clone()]).await.unwrap();
    assert_eq!(outcomes(&applied), ["service/web unchanged"]);
    let mut changed = web("web");
    changed["spec"]["ports"][0]["port"] = json!(81);
    apply(store.as_ref(), objects(&[changed])).await.unwrap();
    let err = apply(store.as_ref(), vec![printed]).await.unwrap_err();
    assert!(
        err.to_string().contains("metadata.resourceVersion"),
        "{err}"
    );
}

#[tokio::test]
async fn get_lists_by_namespace_and_names_bad_records() {
    let store = EmbeddedStore::new();
    let mut other = web("api");
    other["metadata"]["namespace"] = json!("prod");
    apply(
        store.as_ref(),
        objects(&[web("web"), other, slice("web-1", "web")]),
    )
    .await
    .unwrap();
    store
        .put(
            "services/default/broken",
            b"{\"kind\":\"Service\"}".to_vec(),
        )
        .await
        .unwrap();
    let names =
        |l: &Listing| -> Vec<String> { l.objects.iter().map(ToString::to_string).collect() };
    let all = get(store.as_ref(), Kind::Service, None, None)
        .await
        .unwrap();
    assert_eq!(names(&all), ["Service default/web", "Service prod/api"]);
    assert_eq!(all.invalid.len(), 1);
    assert!(
        all.invalid[0].starts_with("services/default/broken"),
        "{:?}",
        all.invalid
    );
    let prod = get(store.as_ref(), Kind::Service, Some("prod"), None)
        .await
        .unwrap();
    assert_eq!(names(&prod), ["Service prod/api"]);
    let slices = get(store.as_ref(), Kind::EndpointSlice, Some("default"), None)
        .await
        .unwrap();
    assert_eq!(names(&slices), ["EndpointSlice default/web-1"]);
    let err = get(store.as_ref(), Kind::Service, Some("default"), Some("nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, CtlError::NotFound { .. }), "{err}");
}

/// A store where another writer claims, just before this apply's first transaction, the
/// very address that transaction claims: the apply must lose, read again and take another.
struct Racing {
    inner: Arc<EmbeddedStore>,
    raced: AtomicBool,
}

#[async_trait]
impl Store for Racing {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<(Vec<KeyValue>, Revision)> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> trellis_store::Result<TxnResult> {
        if !self.raced.swap(true, Ordering::SeqCst) {
            let claim = ops
                .iter()
                .find_map(|op| match op {
                    Op::Put { key, .. } if key.starts_with(keys::SERVICE_IPS) => Some(key.clone()),
                    _ => None,
                })
                .expect("the apply claims an address");
            let rival = ClaimHolder {
                namespace: "default".into(),
                name: "rival".into(),
            };
            self.inner.put(&claim, rival.to_bytes()).await?;
        }
        self.inner.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str, after: Revision) -> trellis_store::Result<Watch> {
        self.inner.watch(prefix, after).await
    }
    async fn grant_lease(&self, ttl: Duration) -> trellis_store::Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> trellis_store::Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> trellis_store::Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

#[tokio::test]
async fn a_lost_race_for_an_address_is_retried_with_another() {
    let store = Racing {
        inner: EmbeddedStore::new(),
        raced: AtomicBool::new(false),
    };
    apply(&store, objects(&[web("web")])).await.unwrap();
    let svc = service(&store, "web").await;
    let ip = svc.cluster_ips()[0];
    assert_eq!(
        claim_holder(&store, &keys::service_ip(ip)).await.as_deref(),
        Some("default/web"),
        "the rival kept its address; web got another"
    );
    let (claims, _) = store.list(keys::SERVICE_IPS).await.unwrap();
    assert_eq!(claims.len(), 2);
}

/// Many writers at once, each applying its own Service into a range with room for all of
/// them and little more: every one succeeds and no two share an address.
async fn concurrent_writers_get_distinct_addresses(stores: Vec<Arc<dyn Store>>) {
    let tiny = json!({"granularity": "location", "gateways_per_location": 1,
        "services": {"cidrs": ["10.96.0.0/27"]}});
    stores[0]
        .put(keys::SETTINGS, serde_json::to_vec(&tiny).unwrap())
        .await
        .unwrap();
    let writers: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let store = store.clone();
            tokio::spawn(
                async move { apply(store.as_ref(), objects(&[web(&format!("s{i}"))])).await },
            )
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let listing = get(stores[0].as_ref(), Kind::Service, None, None)
        .await
        .unwrap();
    let ips: BTreeSet<IpAddr> = listing
        .objects
        .iter()
        .flat_map(|o| match o {
            Object::Service(s) => s.cluster_ips(),
            Object::EndpointSlice(_) | Object::NetworkPolicy(_) | Object::Namespace(_) => {
                Vec::new()
            }
        })
        .collect();
    assert_eq!(listing.objects.len(), stores.len());
    assert_eq!(ips.len(), stores.len(), "{ips:?}");
    let (claims, _) = stores[0].list(keys::SERVICE_IPS).await.unwrap();
    assert_eq!(
        claims.len(),
        stores.len(),
        "one claim per address, none leaked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_the_embedded_store() {
    let store: Arc<dyn Store> = EmbeddedStore::new();
    concurrent_writers_get_distinct_addresses(vec![store; 12]).await;
}

/// The same race on a real etcd, each writer with its own client: the compares that
/// refuse the loser are etcd's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_etcd() {
    let etcd = trellis_testkit::etcd::Etcd::start();
    let stores: Vec<Arc<dyn Store>> = (0..12)
        .map(|_| etcd.store("/trellis/") as Arc<dyn Store>)
        .collect();
    trellis_testkit::etcd::wait_answering(stores[0].as_ref()).await;
    concurrent_writers_get_distinct_addresses(stores).await;
}
