//! The synthetic cluster of the programming case: `pods` pods on `pods / 100` nodes (100
//! each), 20 namespaces, `policies` NetworkPolicies, as the store records a cluster's
//! agents and `trellis apply` write (`pods/NS/NAME`, `namespaces/NAME`,
//! `networkpolicies/NS/NAME`, the latter in Kubernetes' own shape).
//!
//! - Namespace `s` (`ns0` … `ns19`) is labelled `team: team{s % 4}` and `env: prod|dev`.
//! - Pod `p` runs on node `p / 100` (`node0000` is the bench's node), in namespace
//!   `(p % 100) % 20`, labelled `app: app{a}` and `tier: web|api|db` (from `a % 3`), with
//!   `a = ((p % 100) / 20 + node) % 10`: every node holds 5 of the 10 apps of each
//!   namespace, the whole cluster 50 pods of each app in each namespace. Its address is
//!   10.128.0.0/10 + node · 256 + (p % 100) + 2.
//! - Policy `j` lives in namespace `j % 20` and selects `app: app{k % 10}` (`k = j / 20`):
//!   at 1,000 policies each pod is isolated by 5 of them. What it admits depends on
//!   `(k / 10 + k + s) % 4`: pods of another app of its namespace on one port; pods of an
//!   app in the namespaces of another team (namespaceSelector and podSelector) on two
//!   ports; an ipBlock with an exception on a port range; or, on every port, pods of
//!   another app and pods of its own app in the next namespace (by
//!   `kubernetes.io/metadata.name`). Policies with `k / 10 == 4` isolate egress too: to
//!   pods of another app on 5432/TCP and to anything outside 10.0.0.0/8 on 53/UDP.
//!
//! About half the policies select pods of the bench's node (the other apps are elsewhere),
//! as on any node of a real cluster.

use anyhow::bail;
use serde_json::{Value, json};
use std::net::{IpAddr, Ipv4Addr};

pub const NAMESPACES: usize = 20;
pub const APPS: usize = 10;
pub const PODS_PER_NODE: usize = 100;
/// The node whose pods the bench's agent enforces for.
pub const BENCH_NODE: &str = "node0000";
/// Pod addresses: 10.128.0.0/10, a /24 per node.
const POD_BASE: u32 = 0x0a80_0000;
/// At most this many changes of each kind (added pods take the free addresses of their
/// node's /24).
pub const MAX_CHANGES: usize = 150;
const TIERS: [&str; 3] = ["web", "api", "db"];

#[derive(Clone, Debug)]
pub struct Synth {
    pub pods: usize,
    pub policies: usize,
}

impl Synth {
    pub fn new(pods: usize, policies: usize) -> anyhow::Result<Synth> {
        if !(2 * PODS_PER_NODE..=PODS_PER_NODE * 16_000).contains(&pods) {
            bail!(
                "--pods must be {} to {} (two nodes at least, 100 pods each)",
                2 * PODS_PER_NODE,
                PODS_PER_NODE * 16_000
            );
        }
        if policies == 0 || policies > 100_000 {
            bail!("--policies must be 1 to 100000");
        }
        Ok(Synth { pods, policies })
    }

    pub fn nodes(&self) -> usize {
        self.pods.div_ceil(PODS_PER_NODE)
    }

    pub fn node_name(n: usize) -> String {
        format!("node{n:04}")
    }

    pub fn namespace(s: usize) -> String {
        format!("ns{s}")
    }

    fn address(node: usize, slot: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(
            POD_BASE + (node as u32) * 256 + slot as u32 + 2,
        ))
    }

    fn app_of(node: usize, slot: usize) -> usize {
        (slot / NAMESPACES + node) % APPS
    }

    fn pod_json(namespace: &str, name: &str, app: usize, ip: IpAddr, node: usize) -> Value {
        json!({"namespace": namespace, "name": name,
               "labels": {"app": format!("app{app}"), "tier": TIERS[app % 3]},
               "ips": [ip.to_string()], "node": Synth::node_name(node)})
    }

    /// Pod `p`'s key, record and address.
    pub fn pod(&self, p: usize) -> (String, Value, IpAddr) {
        let (node, slot) = (p / PODS_PER_NODE, p % PODS_PER_NODE);
        let ns = Synth::namespace(slot % NAMESPACES);
        let name = format!("pod-{p:05}");
        let ip = Synth::address(node, slot);
        let value = Synth::pod_json(&ns, &name, Synth::app_of(node, slot), ip, node);
        (format!("pods/{ns}/{name}"), value, ip)
    }

    pub fn namespace_record(s: usize) -> (String, Value) {
        let name = Synth::namespace(s);
        let env = if s.is_multiple_of(2) { "prod" } else { "dev" };
        (
            format!("namespaces/{name}"),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": name, "labels": {"team": format!("team{}", s % 4), "env": env}}}),
        )
    }

    /// Policy `j`'s key and record.
    pub fn policy(&self, j: usize) -> (String, Value) {
        let (s, k) = (j % NAMESPACES, j / NAMESPACES);
        let a = k % APPS;
        let ns = Synth::namespace(s);
        let app = |x: usize| json!({"matchLabels": {"app": format!("app{}", x % APPS)}});
        let tcp = |port: u16| json!({"protocol": "TCP", "port": port});
        let ingress = match Synth::variant(j) {
            0 => json!([{"from": [{"podSelector": app(a + 1)}], "ports": [tcp(8080)]}]),
            1 => json!([{"from": [{
                    "namespaceSelector": {"matchLabels": {"team": format!("team{}", (s + 1) % 4)}},
                    "podSelector": app(a + 2)}],
                 "ports": [tcp(8443), tcp(9090)]}]),
            2 => json!([{"from": [{"ipBlock": {
                    "cidr": format!("172.{}.0.0/16", 16 + j % 16),
                    "except": [format!("172.{}.{}.0/24", 16 + j % 16, k % 256)]}}],
                 "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9100}]}]),
            _ => json!([{"from": [
                    {"podSelector": app(a + 3)},
                    {"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": Synth::namespace((s + 1) % NAMESPACES)}},
                     "podSelector": app(a)}]}]),
        };
        let mut spec = json!({"podSelector": app(a), "ingress": ingress});
        if k / APPS == 4 {
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
            spec["egress"] = json!([
                {"to": [{"podSelector": app(a + 4)}], "ports": [tcp(5432)]},
                {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                 "ports": [{"protocol": "UDP", "port": 53}]}
            ]);
        }
        let name = format!("pol-{j:05}");
        (
            format!("networkpolicies/{ns}/{name}"),
            policy_json(&ns, &name, spec),
        )
    }

    /// Every record of the cluster, namespaces first.
    pub fn records(&self) -> impl Iterator<Item = (String, Value)> + '_ {
        (0..NAMESPACES)
            .map(Synth::namespace_record)
            .chain((0..self.pods).map(|p| {
                let (key, value, _) = self.pod(p);
                (key, value)
            }))
            .chain((0..self.policies).map(|j| self.policy(j)))
    }

    /// What policy `j` admits (0 to 3, see the module's documentation).
    fn variant(j: usize) -> usize {
        let (s, k) = (j % NAMESPACES, j / NAMESPACES);
        (k / APPS + k + s) % 4
    }

    /// The `c`th of the policies that select an app of the bench's node (apps 0 to 4 in
    /// every namespace) and admit pods of another app of their namespace (variant 0), in
    /// turn; its namespace and app. `None` when there is no such policy.
    fn local_target(&self, c: usize) -> Option<(usize, usize)> {
        let targets: Vec<usize> = (0..self.policies)
            .filter(|j| Synth::variant(*j) == 0 && (j / NAMESPACES) % APPS < 5)
            .collect();
        let j = *targets.get(c % targets.len().max(1))?;
        Some((j % NAMESPACES, (j / NAMESPACES) % APPS))
    }

    /// The `c`th pod added on another node: of the app a policy isolating pods of the
    /// bench's node admits from, so it joins one of its address sets.
    pub fn remote_pod(&self, c: usize) -> (String, Value, IpAddr) {
        let others = self.nodes() - 1;
        let node = 1 + c % others;
        let slot = PODS_PER_NODE + c / others;
        let (s, a) = self.local_target(c).unwrap_or((c % NAMESPACES, c % 5));
        let ns = Synth::namespace(s);
        let name = format!("remote-{c}");
        let ip = Synth::address(node, slot);
        let value = Synth::pod_json(&ns, &name, (a + 1) % APPS, ip, node);
        (format!("pods/{ns}/{name}"), value, ip)
    }

    /// The `c`th pod added on the bench's node, of an app a policy isolates.
    pub fn local_pod(&self, c: usize) -> (String, Value, IpAddr) {
        let slot = PODS_PER_NODE + c;
        let (s, a) = self.local_target(c).unwrap_or((c % NAMESPACES, c % 5));
        let ns = Synth::namespace(s);
        let name = format!("local-{c}");
        let ip = Synth::address(0, slot);
        let value = Synth::pod_json(&ns, &name, a, ip, 0);
        (format!("pods/{ns}/{name}"), value, ip)
    }

    /// The `c`th policy change: even `c` adds a policy selecting an app of the bench's
    /// node, odd `c` changes the port the one added before admits. Its key, record and
    /// name.
    pub fn policy_change(&self, c: usize) -> (String, Value, String) {
        let i = c / 2;
        let ns = Synth::namespace(i % NAMESPACES);
        let name = format!("change-{i}");
        let port = 7000 + c as u16;
        let spec = json!({"podSelector": {"matchLabels": {"app": format!("app{}", i % 5)}},
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                                       "ports": [{"protocol": "TCP", "port": port}]}]});
        (
            format!("networkpolicies/{ns}/{name}"),
            policy_json(&ns, &name, spec),
            format!("{ns}/{name}"),
        )
    }
}

pub fn policy_json(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"namespace": namespace, "name": name},
           "spec": spec})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use trellis_model::{Namespace, NetworkPolicy, Pod};
    use trellis_policy::Cluster;
    use trellis_policy::plan::{NodePolicy, plan};

    fn decode<T: serde::de::DeserializeOwned + trellis_model::Validate>(v: &Value) -> T {
        trellis_model::decode("synthetic record", &serde_json::to_vec(v).unwrap())
            .unwrap_or_else(|e| panic!("{e}: {v}"))
    }

    struct Decoded {
        namespaces: Vec<Namespace>,
        pods: Vec<Pod>,
        policies: Vec<NetworkPolicy>,
    }

    fn decoded(records: impl IntoIterator<Item = (String, Value)>) -> Decoded {
        let mut d = Decoded {
            namespaces: Vec::new(),
            pods: Vec::new(),
            policies: Vec::new(),
        };
        let mut keys = BTreeSet::new();
        for (key, value) in records {
            assert!(keys.insert(key.clone()), "{key} twice");
            match key.split('/').next() {
                Some("namespaces") => d
                    .namespaces
                    .push(decode::<trellis_model::NamespaceObject>(&value).namespace()),
                Some("pods") => d.pods.push(decode(&value)),
                Some("networkpolicies") => d.policies.push(decode(&value)),
                _ => panic!("unexpected key {key}"),
            }
        }
        d
    }

    fn node_plan(d: &Decoded) -> NodePolicy {
        let cluster = Cluster::new(d.namespaces.clone(), d.policies.clone());
        plan(&cluster, &d.pods, BENCH_NODE, [])
    }

    /// Small enough to run in the suite: 2,000 pods, 200 policies; the shape is the
    /// defaults' (the counts scale with the arguments).
    #[test]
    fn the_cluster_has_its_counts_and_isolates_every_pod_of_the_bench_node() {
        let synth = Synth::new(2_000, 200).unwrap();
        assert_eq!(synth.nodes(), 20);
        let d = decoded(synth.records());
        assert_eq!(
            (d.namespaces.len(), d.pods.len(), d.policies.len()),
            (20, 2_000, 200)
        );
        let addresses: BTreeSet<IpAddr> = d.pods.iter().flat_map(|p| p.ips.clone()).collect();
        assert_eq!(
            addresses.len(),
            2_000,
            "every pod has an address of its own"
        );
        let local: Vec<&Pod> = d.pods.iter().filter(|p| p.node == BENCH_NODE).collect();
        assert_eq!(local.len(), 100);

        let node = node_plan(&d);
        // 200 policies: 10 per namespace, one per app; each pod of the node is isolated
        // for ingress by the policy of its app.
        for pod in &local {
            let check = node.ingress[&pod.ips[0]]
                .as_ref()
                .unwrap_or_else(|| panic!("{}/{} is not isolated", pod.namespace, pod.name));
            assert_eq!(check.isolated_by.len(), 1);
        }
        assert!(
            node.sets.values().all(|s| !s.is_empty()),
            "every selector picks pods"
        );

        // At the defaults' 50 policies per namespace, a pod is isolated by 5 (one of them
        // for egress too).
        let synth = Synth::new(2_000, 1_000).unwrap();
        let d = decoded(synth.records());
        let node = node_plan(&d);
        let isolated_by: BTreeMap<usize, usize> = (node.ingress.values())
            .map(|c| c.as_ref().map_or(0, |c| c.isolated_by.len()))
            .fold(BTreeMap::new(), |mut m, n| {
                *m.entry(n).or_default() += 1;
                m
            });
        assert_eq!(isolated_by, [(5, 100)].into());
        assert_eq!(node.egress.values().filter(|c| c.is_some()).count(), 100);
        let elements: usize = node.sets.values().map(BTreeSet::len).sum();
        assert!(elements > 2_000, "{elements} set elements");
    }

    /// Each change the bench times changes the bench node's tables: a remote pod joins a
    /// set, a local pod gets checks, a policy change makes new checks.
    #[test]
    fn every_change_changes_what_the_bench_node_enforces() {
        // Four nodes (the plan's cost grows with the pods); few policies and the defaults'.
        for policies in [100, 1_000] {
            let synth = Synth::new(400, policies).unwrap();
            let base: Vec<(String, Value)> = synth.records().collect();
            for c in 0..5 {
                let (key, value, ip) = synth.remote_pod(c);
                let after = node_plan(&decoded(base.iter().cloned().chain([(key, value)])));
                assert!(
                    after.sets.values().any(|s| s.contains(&ip)),
                    "{policies} policies: remote pod {c} ({ip}) joins no set"
                );

                let (key, value, ip) = synth.local_pod(c);
                let after = node_plan(&decoded(base.iter().cloned().chain([(key, value)])));
                assert!(
                    after.ingress[&ip].is_some() && after.egress.contains_key(&ip),
                    "{policies} policies: local pod {c} is not isolated"
                );
            }
        }
        let synth = Synth::new(400, 1_000).unwrap();
        let base: Vec<(String, Value)> = synth.records().collect();
        let mut records = base;
        let mut before = node_plan(&decoded(records.clone()));
        for c in 0..5 {
            let (key, value, _) = synth.policy_change(c);
            records.retain(|(k, _)| *k != key);
            records.push((key, value));
            let after = node_plan(&decoded(records.clone()));
            assert_ne!(after.ingress, before.ingress, "policy change {c}");
            before = after;
        }
    }
}
