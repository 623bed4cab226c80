//! The double's API semantics over HTTP, as a client of the real API relies on them.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use trellis_kube_double::{KubeDouble, Options};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";

fn lease(name: &str, holder: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": {"app": "trellis"}},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z"},
    })
}

async fn start() -> trellis_kube_double::KubeDoubleHandle {
    KubeDouble::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn start_with(options: Options) -> trellis_kube_double::KubeDoubleHandle {
    KubeDouble::new(options)
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn list_then_watch_resumes_from_the_list_version() {
    let api = start().await;
    let a = api.addr();
    let (code, created) = post(a, LEASES, &lease("n1", "n1")).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["metadata"]["namespace"], "kube-node-lease");
    assert!(
        created["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(
        created["metadata"]["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(created["metadata"]["generation"], 1);

    let (code, list) = get(a, LEASES).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "LeaseList");
    assert_eq!(list["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let listed = rv(&list);

    // Changes after the list, before the watch: a resumed watch gets them all, in order.
    post(a, LEASES, &lease("n2", "n2")).await;
    let (code, _) = patch(
        a,
        &format!("{LEASES}/n1"),
        "application/merge-patch+json",
        &json!({"spec": {"holderIdentity": "x"}}),
    )
    .await;
    assert_eq!(code, 200);
    let mut w = Watch::open(a, &format!("{LEASES}?watch=1&resourceVersion={listed}")).await;
    let e = w.next().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("n2"))
    );
    assert_eq!(e["object"]["kind"], "Lease");
    let e = w.next().await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["object"]["spec"]["holderIdentity"].as_str()
        ),
        (Some("MODIFIED"), Some("x"))
    );
    let last = rv(&e["object"]);

    // Then live events.
    let (code, _) = call(
        a,
        "DELETE",
        &format!("{LEASES}/n2"),
        "application/json",
        None,
    )
    .await;
    assert_eq!(code, 200);
    let e = w.next().await;
    assert_eq!(e["type"], "DELETED");
    assert!(rv(&e["object"]) > last, "a deletion has its own version");
    assert!(w.next_within(Duration::from_millis(300)).await.is_none());

    // Without a version: the current state as ADDED events, then live ones.
    let mut w = Watch::open(a, &format!("{LEASES}?watch=true")).await;
    let e = w.next().await;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("n1"))
    );
    // A cluster-wide watch sees every namespace.
    let mut all = Watch::open(a, "/apis/coordination.k8s.io/v1/leases?watch=1").await;
    assert_eq!(all.next().await["object"]["metadata"]["name"], "n1");
    post(
        a,
        "/apis/coordination.k8s.io/v1/namespaces/trellis/leases",
        &lease("leader", "n1"),
    )
    .await;
    assert_eq!(
        all.next().await["object"]["metadata"]["namespace"],
        "trellis"
    );
    assert!(
        w.next_within(Duration::from_millis(300)).await.is_none(),
        "another namespace's lease"
    );
}

#[tokio::test]
async fn a_watch_from_a_future_version_waits_for_it() {
    let api = start().await;
    let a = api.addr();
    let next = api.resource_version() + 1;
    let mut w = Watch::open(a, &format!("{LEASES}?watch=1&resourceVersion={next}")).await;
    post(a, LEASES, &lease("at-next", "a")).await;
    post(a, LEASES, &lease("after-next", "a")).await;
    assert_eq!(w.next().await["object"]["metadata"]["name"], "after-next");
}

#[tokio::test]
async fn a_watch_ends_at_its_timeout() {
    let api = start().await;
    let mut w = Watch::open(api.addr(), "/api/v1/nodes?watch=1&timeoutSeconds=1").await;
    let started = std::time::Instant::now();
    assert!(w.next_within(Duration::from_secs(5)).await.is_none());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn bookmarks_carry_the_current_version() {
    let api = start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let a = api.addr();
    let (_, list) = get(a, LEASES).await;
    let mut w = Watch::open(
        a,
        &format!(
            "{LEASES}?watch=1&allowWatchBookmarks=true&resourceVersion={}",
            rv(&list)
        ),
    )
    .await;
    // Another resource's change moves the version; the bookmark tells the lease watcher.
    let (_, node) = post(a, "/api/v1/nodes", &json!({"metadata": {"name": "n1"}})).await;
    let e = w.next().await;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(e["object"]["kind"], "Lease");
    assert_eq!(e["object"]["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(rv(&e["object"]), rv(&node));
    // No bookmarks unless asked for.
    let mut quiet = Watch::open(
        a,
        &format!("{LEASES}?watch=1&resourceVersion={}", rv(&node)),
    )
    .await;
    assert!(
        quiet
            .next_within(Duration::from_millis(600))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn resuming_from_a_forgotten_version_is_410_gone() {
    let api = start_with(Options {
        history: 3,
        ..Options::default()
    })
    .await;
    let a = api.addr();
    let (_, first) = post(a, LEASES, &lease("l0", "a")).await;
    for i in 1..6 {
        post(a, LEASES, &lease(&format!("l{i}"), "a")).await;
    }
    let mut w = Watch::open(
        a,
        &format!("{LEASES}?watch=1&resourceVersion={}", rv(&first)),
    )
    .await;
    let e = w.next().await;
    assert_eq!(e["type"], "ERROR");
    let status = &e["object"];
    assert_eq!(
        (status["kind"].as_str(), status["apiVersion"].as_str()),
        (Some("Status"), Some("v1"))
    );
    assert_eq!(
        (
            status["status"].as_str(),
            status["reason"].as_str(),
            status["code"].as_u64()
        ),
        (Some("Failure"), Some("Expired"), Some(410))
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("too old resource version"),
        "{status}"
    );
    assert!(
        w.next_within(Duration::from_secs(1)).await.is_none(),
        "the stream ends after the error"
    );

    // A recent version still resumes; after a compaction it does not.
    let current = api.resource_version();
    let mut w = Watch::open(
        a,
        &format!("{LEASES}?watch=1&resourceVersion={}", current - 1),
    )
    .await;
    assert_eq!(w.next().await["type"], "ADDED");
    api.compact();
    let mut w = Watch::open(
        a,
        &format!("{LEASES}?watch=1&resourceVersion={}", current - 1),
    )
    .await;
    assert_eq!(w.next().await["object"]["code"], 410);
    let mut w = Watch::open(a, &format!("{LEASES}?watch=1&resourceVersion={current}")).await;
    assert!(
        w.next_within(Duration::from_millis(300)).await.is_none(),
        "the newest version is still resumable"
    );
}

#[tokio::test]
async fn a_stale_update_is_409_conflict() {
    let api = start().await;
    let a = api.addr();
    let (_, v1) = post(a, LEASES, &lease("n1", "n1")).await;
    let url = format!("{LEASES}/n1");
    let mut renewed = v1.clone();
    renewed["spec"]["renewTime"] = json!("2026-01-01T00:00:10.000000Z");
    let (code, v2) = put(a, &url, &renewed).await;
    assert_eq!(code, 200, "{v2}");
    assert!(rv(&v2) > rv(&v1));
    assert_eq!(v2["metadata"]["generation"], 2);
    assert_eq!(v2["metadata"]["uid"], v1["metadata"]["uid"]);

    // A competitor that read v1 loses.
    let mut stolen = v1.clone();
    stolen["spec"]["holderIdentity"] = json!("n2");
    let (code, status) = put(a, &url, &stolen).await;
    assert_eq!(code, 409);
    assert_eq!(
        (
            status["kind"].as_str(),
            status["reason"].as_str(),
            status["code"].as_u64()
        ),
        (Some("Status"), Some("Conflict"), Some(409))
    );
    assert_eq!(
        status["message"],
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"n1\": the object has been modified; please apply your changes to the latest version and try again"
    );
    assert_eq!(status["details"]["name"], "n1");
    let (_, now) = get(a, &url).await;
    assert_eq!(now["spec"]["holderIdentity"], "n1");

    // A no-op write changes nothing, not even the version.
    let (code, same) = put(a, &url, &now).await;
    assert_eq!((code, rv(&same)), (200, rv(&now)));
    // Without a version the update is unconditional.
    let mut blind = now.clone();
    blind["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    blind["spec"]["holderIdentity"] = json!("n3");
    let (code, _) = put(a, &url, &blind).await;
    assert_eq!(code, 200);
    // Missing objects are 404 Status; duplicates 409 AlreadyExists.
    let (code, status) = put(a, &format!("{LEASES}/none"), &lease("none", "x")).await;
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(
        status["message"],
        "leases.coordination.k8s.io \"none\" not found"
    );
    let (code, status) = post(a, LEASES, &lease("n1", "n1")).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (409, Some("AlreadyExists"))
    );
}

#[tokio::test]
async fn merge_json_and_strategic_patches() {
    let api = start().await;
    let a = api.addr();
    let (_, node) = post(a, "/api/v1/nodes", &json!({"metadata": {"name": "n1", "labels": {"a": "1"}}, "spec": {"podCIDRs": ["10.0.1.0/24"]}})).await;
    let url = "/api/v1/nodes/n1";
    let annotate = json!({"metadata": {"annotations": {"trellis.dev/public-key": "k1"}, "labels": {"a": null}}});
    let (code, patched) = patch(a, url, "application/merge-patch+json", &annotate).await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(
        patched["metadata"]["annotations"]["trellis.dev/public-key"],
        "k1"
    );
    assert!(patched["metadata"]["labels"].get("a").is_none());
    assert_eq!(
        patched["metadata"]["generation"], 1,
        "metadata changes keep the generation"
    );

    // A merge patch carrying a stale version is refused: it is a precondition.
    let stale = json!({"metadata": {"resourceVersion": node["metadata"]["resourceVersion"], "annotations": {"x": "y"}}});
    let (code, status) = patch(a, url, "application/merge-patch+json", &stale).await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));

    // JSON patch, with a test as a precondition.
    let ops = json!([
        {"op": "test", "path": "/metadata/annotations/trellis.dev~1public-key", "value": "k1"},
        {"op": "replace", "path": "/metadata/annotations/trellis.dev~1public-key", "value": "k2"},
    ]);
    let (code, patched) = patch(a, url, "application/json-patch+json", &ops).await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(
        patched["metadata"]["annotations"]["trellis.dev/public-key"],
        "k2"
    );
    let (code, status) = patch(a, url, "application/json-patch+json", &ops).await;
    assert_eq!((code, status["kind"].as_str()), (422, Some("Status")));

    // Strategic merge patch of a built-in kind (approximated as a merge patch).
    // (podCIDRs is a `patchStrategy: merge` list: a union, minus what is deleted from it.)
    let smp = json!({"spec": {"$setElementOrder/podCIDRs": ["10.0.2.0/24"], "podCIDRs": ["10.0.2.0/24"],
                              "$deleteFromPrimitiveList/podCIDRs": ["10.0.1.0/24"]}});
    let (code, patched) = patch(a, url, "application/strategic-merge-patch+json", &smp).await;
    assert_eq!(code, 200, "{patched}");
    assert_eq!(patched["spec"]["podCIDRs"], json!(["10.0.2.0/24"]));
    assert!(patched.get("$setElementOrder/podCIDRs").is_none());
    assert_eq!(patched["metadata"]["generation"], 2);

    // Node status only through the subresource.
    let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    let (_, unchanged) = patch(a, url, "application/merge-patch+json", &ready).await;
    assert!(
        unchanged
            .get("status")
            .is_none_or(|s| s["conditions"].is_null()),
        "{unchanged}"
    );
    let (code, with_status) = patch(
        a,
        &format!("{url}/status"),
        "application/merge-patch+json",
        &ready,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(with_status["status"]["conditions"][0]["type"], "Ready");

    let (code, status) = patch(a, url, "application/apply-patch+yaml", &json!({})).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, _) = patch(
        a,
        "/api/v1/nodes/none",
        "application/merge-patch+json",
        &json!({}),
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_lease_campaign() {
    let api = start().await;
    let a = api.addr();
    let url = "/apis/coordination.k8s.io/v1/namespaces/trellis/leases";
    let leader = json!({
        "metadata": {"name": "trellis-leader"},
        "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 15, "acquireTime": "2026-01-01T00:00:00.000000Z",
                 "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 0},
    });
    let (code, held) = post(a, url, &leader).await;
    assert_eq!(code, 201);
    // Both candidates read it; the first takeover wins, the second is fenced off.
    let take = |who: &str| {
        let mut l = held.clone();
        l["spec"]["holderIdentity"] = json!(who);
        l["spec"]["leaseTransitions"] = json!(1);
        l
    };
    let (c1, won) = put(a, &format!("{url}/trellis-leader"), &take("n2")).await;
    let (c2, lost) = put(a, &format!("{url}/trellis-leader"), &take("n3")).await;
    assert_eq!((c1, c2), (200, 409), "{lost}");
    assert_eq!(won["spec"]["holderIdentity"], "n2");
    assert_eq!(
        won["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z",
        "microtimes are kept as written"
    );
    // Label and field selectors on lists.
    let (_, list) = get(
        a,
        &format!("{url}?fieldSelector=metadata.name%3Dtrellis-leader"),
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, list) = get(
        a,
        &format!("{url}?fieldSelector=metadata.name%3Dother&limit=10"),
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    post(a, LEASES, &lease("n1", "n1")).await;
    let (_, list) = get(
        a,
        "/apis/coordination.k8s.io/v1/leases?labelSelector=app%3Dtrellis",
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let (_, list) = get(a, "/apis/coordination.k8s.io/v1/leases?labelSelector=app").await;
    assert_eq!(list["items"][0]["metadata"]["name"], "n1");
}

#[tokio::test]
async fn a_selector_watch_sees_objects_enter_and_leave() {
    let api = start().await;
    let a = api.addr();
    let (_, l) = post(a, LEASES, &lease("n1", "n1")).await;
    let mut w = Watch::open(
        a,
        &format!(
            "{LEASES}?watch=1&labelSelector=app%3Dtrellis&resourceVersion={}",
            rv(&l)
        ),
    )
    .await;
    patch(
        a,
        &format!("{LEASES}/n1"),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"app": "other"}}}),
    )
    .await;
    assert_eq!(w.next().await["type"], "DELETED");
    patch(
        a,
        &format!("{LEASES}/n1"),
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"app": "trellis"}}}),
    )
    .await;
    assert_eq!(w.next().await["type"], "ADDED");
}

#[tokio::test]
async fn deletion_preconditions() {
    let api = start().await;
    let a = api.addr();
    let (_, l) = post(a, LEASES, &lease("n1", "n1")).await;
    let url = format!("{LEASES}/n1");
    let stale = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": "1"}});
    let (code, status) = call(a, "DELETE", &url, "application/json", Some(&stale)).await;
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")));
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("Precondition failed: ResourceVersion in precondition: 1"),
        "{status}"
    );
    let wrong_uid = json!({"preconditions": {"uid": "nope"}});
    let (code, _) = call(a, "DELETE", &url, "application/json", Some(&wrong_uid)).await;
    assert_eq!(code, 409);
    let fresh = json!({"preconditions": {"resourceVersion": l["metadata"]["resourceVersion"], "uid": l["metadata"]["uid"]}});
    let (code, deleted) = call(a, "DELETE", &url, "application/json", Some(&fresh)).await;
    assert_eq!(
        (code, deleted["metadata"]["name"].as_str()),
        (200, Some("n1"))
    );
    let (code, _) = get(a, &url).await;
    assert_eq!(code, 404);
    let (code, _) = call(a, "DELETE", &url, "application/json", None).await;
    assert_eq!(code, 404);
}

fn location_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "locations.example.trellis.dev"},
        "spec": {
            "group": "example.trellis.dev",
            "scope": "Cluster",
            "names": {"plural": "locations", "singular": "location", "kind": "Location", "listKind": "LocationList", "shortNames": ["loc"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Active", "type": "string", "jsonPath": ".status.active"},
                    {"name": "Standby", "type": "string", "jsonPath": ".status.standby.node"},
                    {"name": "Slots", "type": "integer", "jsonPath": ".spec.slots"},
                    {"name": "Failover", "type": "date", "jsonPath": ".status.lastFailover"},
                ],
            }],
        },
    })
}

#[tokio::test]
async fn a_crd_registers_its_custom_resource() {
    let api = start().await;
    let a = api.addr();
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    let (code, crd) = post(a, crds, &location_crd()).await;
    assert_eq!(code, 201, "{crd}");
    let established = crd["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{crd}");

    let (_, groups) = get(a, "/apis").await;
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "example.trellis.dev"),
        "{groups}"
    );
    let (code, resources) = get(a, "/apis/example.trellis.dev/v1alpha1").await;
    assert_eq!(code, 200);
    let names: Vec<&str> = resources["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["locations", "locations/status"]);
    assert_eq!(resources["resources"][0]["namespaced"], false);
    assert_eq!(resources["resources"][0]["shortNames"], json!(["loc"]));

    let url = "/apis/example.trellis.dev/v1alpha1/locations";
    let loc = json!({"apiVersion": "example.trellis.dev/v1alpha1", "kind": "Location", "metadata": {"name": "west"},
                     "spec": {"slots": 2}, "status": {"active": "ignored"}});
    let (code, created) = post(a, url, &loc).await;
    assert_eq!(code, 201, "{created}");
    assert!(
        created.get("status").is_none(),
        "status is dropped on create with a status subresource"
    );
    let status = json!({"status": {"active": "n1,n2", "standby": {"node": "n3"}, "lastFailover": "2026-01-01T00:00:00Z"}});
    let (code, with_status) = patch(
        a,
        &format!("{url}/west/status"),
        "application/merge-patch+json",
        &status,
    )
    .await;
    assert_eq!(code, 200, "{with_status}");
    assert_eq!(
        with_status["metadata"]["generation"], 1,
        "a status write keeps the generation"
    );
    let (code, status) = patch(
        a,
        &format!("{url}/west"),
        "application/strategic-merge-patch+json",
        &json!({}),
    )
    .await;
    assert_eq!(
        (code, status["code"].as_u64()),
        (415, Some(415)),
        "no strategic merge patch for custom resources"
    );

    // The table kubectl asks for: NAME and the printer columns, dates as ages.
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
    let (code, t) = call_accept(a, "GET", url, "application/json", accept, None).await;
    assert_eq!(code, 200);
    assert_eq!(
        (t["kind"].as_str(), t["apiVersion"].as_str()),
        (Some("Table"), Some("meta.k8s.io/v1"))
    );
    let columns: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, ["Name", "Active", "Standby", "Slots", "Failover"]);
    let cells = &t["rows"][0]["cells"];
    assert_eq!(
        (&cells[0], &cells[1], &cells[2], &cells[3]),
        (&json!("west"), &json!("n1,n2"), &json!("n3"), &json!(2))
    );
    assert!(
        cells[4].as_str().unwrap().ends_with('d'),
        "an age: {}",
        cells[4]
    );
    assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");

    // Deleting the CRD deletes its objects and its resource.
    let mut w = Watch::open(
        a,
        &format!("{url}?watch=1&resourceVersion={}", rv(&with_status)),
    )
    .await;
    let (code, _) = call(
        a,
        "DELETE",
        &format!("{crds}/locations.example.trellis.dev"),
        "application/json",
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(w.next().await["type"], "DELETED");
    let (code, _) = get(a, url).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn discovery_and_errors() {
    let api = start().await;
    let a = api.addr();
    let (_, v) = get(a, "/version").await;
    assert_eq!(v["major"], "1");
    let (_, core) = get(a, "/api").await;
    assert_eq!(core["versions"], json!(["v1"]));
    let (_, v1) = get(a, "/api/v1").await;
    let node = v1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "nodes")
        .unwrap()
        .clone();
    assert_eq!(
        (node["kind"].as_str(), node["namespaced"].as_bool()),
        (Some("Node"), Some(false))
    );
    let (_, group) = get(a, "/apis/coordination.k8s.io").await;
    assert_eq!(
        group["preferredVersion"]["groupVersion"],
        "coordination.k8s.io/v1"
    );
    let (_, ns) = get(a, "/api/v1/namespaces/kube-node-lease").await;
    assert_eq!(ns["status"]["phase"], "Active");
    let (code, status) = get(a, "/apis/nope.example/v1/things").await;
    assert_eq!(
        (code, status["kind"].as_str(), status["status"].as_str()),
        (404, Some("Status"), Some("Failure"))
    );
    let (code, _) = get(a, "/openapi/v2").await;
    assert_eq!(code, 404);
    let (code, status) = call(
        a,
        "POST",
        LEASES,
        "application/json",
        Some(&json!("not an object")),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    let (code, status) = get(a, "/api/v1/nodes?labelSelector=a%20b").await;
    assert_eq!(code, 400, "{status}");
    // A service gets the defaults the real API gives it.
    let svc = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
    let (code, svc) = post(a, "/api/v1/namespaces/default/services", &svc).await;
    assert_eq!(code, 201);
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert!(
        svc["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .starts_with("10.96.")
    );
    assert_eq!(
        svc["spec"]["ports"][0],
        json!({"port": 80, "protocol": "TCP", "targetPort": 80})
    );
    let (code, named) = post(
        a,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"generateName": "cfg-"}}),
    )
    .await;
    assert_eq!(code, 201);
    assert!(
        named["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("cfg-")
    );
    let (code, _) = post(
        a,
        "/api/v1/namespaces/default/configmaps",
        &json!({"kind": "Secret", "metadata": {"name": "x"}}),
    )
    .await;
    assert_eq!(code, 400);
}
