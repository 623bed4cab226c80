//! This node's pods as the CNI plugin made them: the allocation file read whenever it
//! changes (its writes are atomic renames, so a read sees one whole version), each
//! attachment the runtime named becoming a pod with its addresses and labels. That is how
//! network policy knows a pod from its ADD on, with no store or API server involved; on
//! stores Trellis owns, [`publish`] also writes these pods for the other nodes' sets.

use crate::backoff::Backoff;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use trellis_model::Pod;
use trellis_model::keys::{Key, PODS};
use trellis_store::Store;

/// How often the allocation file's identity (inode, size, modification time) is looked at.
/// A stat of a tmpfs file: cheap enough to make a new pod's wait for its rules short.
pub const POLL: Duration = Duration::from_millis(50);

/// This node's pods, by `namespace/name`.
pub type LocalPods = BTreeMap<String, Pod>;

/// This node's pods and, for each, its attachments (`container_id/ifname`): what the
/// agent tells the plugin it has programmed ([`write_programmed`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    pub pods: LocalPods,
    pub attachments: BTreeMap<String, Vec<String>>,
    /// Attachments the runtime did not name (podman, a plain host's containers), by id:
    /// no policy can select them, but their addresses are the node's known ones, not
    /// strangers for the guard to refuse.
    pub unnamed: BTreeMap<String, Vec<IpAddr>>,
}

/// The pods of an allocation file, on `node`: attachments without a pod's name (a runtime
/// that did not say) are not pods network policy can select; they are kept apart.
pub fn pods_of(allocations: &trellis_cni::ipam::Allocations, node: &str) -> LocalState {
    let mut state = LocalState::default();
    for (who, addresses) in allocations.iter() {
        let Some(identity) = allocations.pod(who) else {
            state.unnamed.insert(who.to_string(), addresses.to_vec());
            continue;
        };
        let key = format!("{}/{}", identity.namespace, identity.name);
        (state.attachments.entry(key.clone()).or_default()).push(who.to_string());
        let pod = state.pods.entry(key).or_insert_with(|| Pod {
            namespace: identity.namespace.clone(),
            name: identity.name.clone(),
            labels: identity.labels.clone(),
            ips: Vec::new(),
            node: node.to_string(),
            ports: named_ports(&identity.ports),
        });
        pod.ips.extend(addresses.iter().copied());
        pod.ips.sort();
        pod.ips.dedup();
    }
    state
}

/// The plugin's named ports as the model's (the plugin checked their protocols).
fn named_ports(ports: &[trellis_cni::ipam::PodPort]) -> Vec<trellis_model::NamedPort> {
    (ports.iter())
        .filter_map(|p| {
            Some(trellis_model::NamedPort {
                name: p.name.clone(),
                protocol: serde_json::from_value(serde_json::json!(p.protocol)).ok()?,
                port: p.port,
            })
        })
        .collect()
}

/// What the plugin's ADD waits for: the attachments whose pods' rules are in the kernel,
/// as JSON `{"attachments": ["CONTAINER_ID/IFNAME", ...]}`, replaced atomically.
pub fn write_programmed(path: &std::path::Path, attachments: &[String]) -> std::io::Result<()> {
    let body = serde_json::json!({ "attachments": attachments });
    trellis_cni::state::write_atomically(path, body.to_string().as_bytes(), 0o644)
}

/// Follows the allocation file at `path` forever, sending this node's pods on `tx` each
/// time they change.
pub async fn follow(path: PathBuf, node: String, tx: watch::Sender<Option<LocalState>>) {
    let mut seen: Option<(u64, u64, SystemTime)> = None;
    let mut warned = false;
    loop {
        let stamp = std::fs::metadata(&path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (
                m.ino(),
                m.len(),
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            )
        });
        if stamp != seen || tx.borrow().is_none() {
            match trellis_cni::state::read(&path) {
                Ok(allocations) => {
                    seen = stamp;
                    warned = false;
                    let pods = pods_of(&allocations, &node);
                    tx.send_if_modified(|have| {
                        let changed = have.as_ref() != Some(&pods);
                        *have = Some(pods);
                        changed
                    });
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(path = %path.display(), "network policy: reading the CNI allocations: {}", e.msg);
                }
                Err(_) => {}
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Keeps the store's `pods/` records of this node equal to `pods` (stores Trellis owns; on
/// Kubernetes the API server has the pods). Writes only what changed; a failed write is
/// retried with backoff, and the next change supersedes it.
pub async fn publish(
    store: Arc<dyn Store>,
    node: String,
    mut pods: watch::Receiver<Option<LocalState>>,
) {
    let mut written: Option<BTreeMap<String, Vec<u8>>> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let wanted: Option<BTreeMap<String, Vec<u8>>> =
            pods.borrow_and_update().as_ref().map(|p| {
                p.pods
                    .values()
                    .map(|pod| {
                        let key = Key::Pod {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                        }
                        .to_string();
                        (key, serde_json::to_vec(pod).expect("a pod encodes"))
                    })
                    .collect()
            });
        if let Some(wanted) = wanted {
            match sync(store.as_ref(), &node, &wanted, written.as_ref()).await {
                Ok(()) => {
                    backoff.reset();
                    written = Some(wanted);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(retry_in = ?delay, "network policy: publishing this node's pods: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        changed = pods.changed() => if changed.is_err() { return } else { continue },
                    }
                }
            }
        }
        if pods.changed().await.is_err() {
            return;
        }
    }
}

/// Puts what differs from `written` and deletes what is gone. The first time (`written`
/// unknown), this node's records are listed, so pods that went while the agent was away
/// are deleted too.
async fn sync(
    store: &dyn Store,
    node: &str,
    wanted: &BTreeMap<String, Vec<u8>>,
    written: Option<&BTreeMap<String, Vec<u8>>>,
) -> Result<(), trellis_store::StoreError> {
    let listed;
    let before: BTreeMap<&str, &[u8]> = match written {
        Some(w) => w.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect(),
        None => {
            listed = store.list(PODS).await?.0;
            (listed.iter())
                .filter(|kv| serde_json::from_slice::<Pod>(&kv.value).is_ok_and(|p| p.node == node))
                .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
                .collect()
        }
    };
    for (key, value) in wanted {
        if before.get(key.as_str()) != Some(&value.as_slice()) {
            store.put(key, value.clone()).await?;
        }
    }
    for key in before.keys().filter(|k| !wanted.contains_key(**k)) {
        store.delete(key).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_cni::ipam::{Allocations, Attachment, PodIdentity};
    use trellis_store::embedded::EmbeddedStore;

    fn attachment(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn allocations() -> Allocations {
        let mut a = Allocations::new();
        let pools = [
            "10.244.1.0/24".parse().unwrap(),
            "fd00::/64".parse().unwrap(),
        ];
        for (id, name) in [("c1", Some("web")), ("c2", None)] {
            a.allocate(&attachment(id), &pools).unwrap();
            a.identify(
                &attachment(id),
                name.map(|n| PodIdentity {
                    namespace: "shop".into(),
                    name: n.into(),
                    labels: [("app".to_string(), n.to_string())].into(),
                    ports: vec![trellis_cni::ipam::PodPort {
                        name: "http".into(),
                        protocol: "TCP".into(),
                        port: 8080,
                    }],
                }),
            );
        }
        a
    }

    #[test]
    fn named_attachments_are_pods_with_every_address() {
        let local = pods_of(&allocations(), "a1");
        assert_eq!(local.pods.len(), 1, "the unnamed attachment is no pod");
        assert_eq!(
            local.unnamed["c2/eth0"].len(),
            2,
            "but its addresses are known"
        );
        assert_eq!(local.attachments["shop/web"], ["c1/eth0"]);
        let web = &local.pods["shop/web"];
        assert_eq!(web.ips.len(), 2);
        assert_eq!(web.node, "a1");
        assert_eq!(web.labels["app"], "web");
        assert_eq!(
            web.named_port("http", trellis_model::Protocol::Tcp),
            Some(8080)
        );
    }

    #[tokio::test]
    async fn publishing_writes_changes_only_and_removes_what_went_while_away() {
        let store = EmbeddedStore::new();
        let stale = Pod {
            namespace: "shop".into(),
            name: "old".into(),
            labels: BTreeMap::new(),
            ips: vec!["10.244.1.9".parse().unwrap()],
            node: "a1".into(),
            ports: Vec::new(),
        };
        let elsewhere = Pod {
            node: "b1".into(),
            name: "other".into(),
            ..stale.clone()
        };
        for p in [&stale, &elsewhere] {
            store
                .put(
                    &format!("pods/shop/{}", p.name),
                    serde_json::to_vec(p).unwrap(),
                )
                .await
                .unwrap();
        }
        let (tx, rx) = watch::channel(Some(pods_of(&allocations(), "a1")));
        let task = tokio::spawn(publish(store.clone() as Arc<dyn Store>, "a1".into(), rx));
        let keys = || async {
            let (records, _) = store.list(PODS).await.unwrap();
            records.into_iter().map(|kv| kv.key).collect::<Vec<_>>()
        };
        trellis_testkit::wait_for(
            "the pods to be published",
            Duration::from_secs(5),
            || async { (keys().await == ["pods/shop/other", "pods/shop/web"]).then_some(()) },
        )
        .await;
        tx.send_replace(Some(LocalState::default()));
        trellis_testkit::wait_for("web's record to go", Duration::from_secs(5), || async {
            (keys().await == ["pods/shop/other"]).then_some(())
        })
        .await;
        task.abort();
    }
}
