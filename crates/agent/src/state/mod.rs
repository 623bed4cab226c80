//! Store → cluster state: the store's records decoded, validated and keyed by what they
//! describe, with the revision they reflect. The agent keeps one current with a
//! list-then-watch loop that survives store outages ([`sync`]); commands take one snapshot
//! ([`load`]). [`ClusterState::topology`] is the one way from a state to a topology, used by
//! the agent and by every command, so two commands never show two different meshes.

pub mod cache;
mod inputs;
mod sync;

pub use inputs::{HealthInputs, PlanInputs};
pub use sync::{CACHE_GRACE, sync_forever};

use std::collections::BTreeMap;
use trellis_model::keys::Key;
use trellis_model::{
    AgentStatus, ClusterSettings, ExternalPeer, GatewaySet, InvalidField, Node, Observation,
    PathReport, PodCidrAllocation, decode,
};
use trellis_plan::{Settings, Topology};
use trellis_store::{Event, KeyValue, Revision, Store};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub revision: Revision,
    pub nodes: BTreeMap<String, Node>,
    pub peers: BTreeMap<String, ExternalPeer>,
    /// Stored gateway choice per location, with the record's mod revision for updates.
    pub gateways: BTreeMap<String, (GatewaySet, Revision)>,
    pub settings: Option<ClusterSettings>,
    pub status: BTreeMap<String, AgentStatus>,
    /// `observations[gateway][observer] = up`.
    pub observations: BTreeMap<String, BTreeMap<String, bool>>,
    /// `paths[(from, to)] = up`: direct tunnels as measured from one end.
    pub paths: BTreeMap<(String, String), bool>,
    /// Pod CIDRs the leader gave nodes that registered without one.
    pub pod_cidrs: BTreeMap<String, PodCidrAllocation>,
}

/// One consistent snapshot of the cluster.
pub async fn load(store: &dyn Store) -> Result<ClusterState, trellis_store::StoreError> {
    let (kvs, revision) = store.list("").await?;
    Ok(ClusterState::from_list(&kvs, revision))
}

impl ClusterState {
    pub fn from_list(kvs: &[KeyValue], revision: Revision) -> Self {
        let mut state = ClusterState {
            revision,
            ..Default::default()
        };
        for kv in kvs {
            state.put(kv);
        }
        state
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Put(kv) => self.put(kv),
            Event::Delete { key, .. } => {
                if let Some(key) = Key::parse(key) {
                    self.remove(&key);
                }
            }
        }
        self.revision = self.revision.max(event.revision());
    }

    /// Decode one record. A record that fails validation is dropped with a warning that
    /// names it, and replaces what its key held before: one bad write by someone else must
    /// not stop the mesh, and stale data its owner no longer stands behind must not stay.
    fn put(&mut self, kv: &KeyValue) {
        let Some(key) = Key::parse(&kv.key) else {
            return; // not one of Trellis's records
        };
        if let Err(e) = self.insert(&key, &kv.value, kv.mod_revision) {
            tracing::warn!(
                key = %kv.key,
                revision = kv.mod_revision,
                "ignoring invalid record: {e}"
            );
            self.remove(&key);
        }
    }

    fn insert(&mut self, key: &Key, value: &[u8], revision: Revision) -> Result<(), InvalidField> {
        let named = |what: &str, of: &str, in_record: &str| {
            if of == in_record {
                Ok(())
            } else {
                Err(InvalidField::new(
                    what,
                    in_record,
                    format!("does not match its key {key}"),
                ))
            }
        };
        match key {
            Key::Node(name) => {
                let node = decode::<Node>(&format!("node {name}"), value)?;
                named("name", name, &node.name)?;
                self.nodes.insert(name.clone(), node);
            }
            Key::Peer(name) => {
                let peer = decode::<ExternalPeer>(&format!("peer {name}"), value)?;
                named("name", name, &peer.name)?;
                self.peers.insert(name.clone(), peer);
            }
            Key::Gateways(location) => {
                let set = decode::<GatewaySet>(&format!("gateways of {location}"), value)?;
                self.gateways.insert(location.clone(), (set, revision));
            }
            Key::Status(name) => {
                let status = decode::<AgentStatus>(&format!("status of {name}"), value)?;
                self.status.insert(name.clone(), status);
            }
            Key::Settings => {
                self.settings = Some(decode::<ClusterSettings>("cluster settings", value)?);
            }
            Key::Observation { gateway, observer } => {
                let o = decode::<Observation>(&format!("observation {gateway}/{observer}"), value)?;
                named(
                    "observation",
                    &format!("{gateway}/{observer}"),
                    &format!("{}/{}", o.gateway, o.observer),
                )?;
                self.observations
                    .entry(o.gateway)
                    .or_default()
                    .insert(o.observer, o.up);
            }
            Key::Path { from, to } => {
                let p = decode::<PathReport>(&format!("path {from}/{to}"), value)?;
                named(
                    "path",
                    &format!("{from}/{to}"),
                    &format!("{}/{}", p.from, p.to),
                )?;
                self.paths.insert((p.from, p.to), p.up);
            }
            Key::PodCidr(name) => {
                let a = decode::<PodCidrAllocation>(&format!("pod CIDR of {name}"), value)?;
                named("node", name, &a.node)?;
                self.pod_cidrs.insert(name.clone(), a);
            }
            Key::Candidate(_) => {} // the election reads its own keys
            // Services, slices and their claims are not the mesh's: the proxy reads them;
            // NetworkPolicies, pods and namespaces are the policy enforcer's.
            Key::Service { .. }
            | Key::EndpointSlice { .. }
            | Key::NetworkPolicy { .. }
            | Key::Pod { .. }
            | Key::Namespace(_)
            | Key::ServiceIp(_)
            | Key::NodePort(_) => {}
        }
        Ok(())
    }

    fn remove(&mut self, key: &Key) {
        match key {
            Key::Node(name) => drop(self.nodes.remove(name)),
            Key::Peer(name) => drop(self.peers.remove(name)),
            Key::Gateways(location) => drop(self.gateways.remove(location)),
            Key::Status(name) => drop(self.status.remove(name)),
            Key::Settings => self.settings = None,
            Key::Observation { gateway, observer } => {
                if let Some(seen) = self.observations.get_mut(gateway) {
                    seen.remove(observer);
                    if seen.is_empty() {
                        self.observations.remove(gateway);
                    }
                }
            }
            Key::Path { from, to } => drop(self.paths.remove(&(from.clone(), to.clone()))),
            Key::PodCidr(name) => drop(self.pod_cidrs.remove(name)),
            Key::Candidate(_)
            | Key::Service { .. }
            | Key::EndpointSlice { .. }
            | Key::NetworkPolicy { .. }
            | Key::Pod { .. }
            | Key::Namespace(_)
            | Key::ServiceIp(_)
            | Key::NodePort(_) => {}
        }
    }

    /// The planner settings: the stored ones, else `defaults`.
    pub fn plan_settings(&self, defaults: &Settings) -> Settings {
        match &self.settings {
            Some(s) => Settings {
                granularity: s.granularity,
                gateways_per_location: s.gateways_per_location,
                persistent_keepalive: s.persistent_keepalive,
            },
            None => defaults.clone(),
        }
    }

    /// The cluster-wide topology this state calls for, health included: what the agent
    /// plans from and what every command shows.
    pub fn topology(&self, defaults: &Settings) -> Topology {
        self.plan_inputs(defaults).topology()
    }

    /// The nodes, each without a pod CIDR of its own given the one the leader allocated,
    /// if that still makes a valid node.
    fn nodes_with_allocations(&self) -> BTreeMap<String, Node> {
        let mut nodes = self.nodes.clone();
        for (name, node) in nodes.iter_mut() {
            let Some(allocation) = self.pod_cidrs.get(name) else {
                continue;
            };
            if !node.pod_cidrs.is_empty() {
                continue;
            }
            let mut with = node.clone();
            with.pod_cidrs = vec![allocation.cidr];
            match trellis_model::Validate::validate(&with) {
                Ok(()) => *node = with,
                Err(e) => tracing::warn!(node = %name, "ignoring allocated pod CIDR: {e}"),
            }
        }
        nodes
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) fn kv(key: &str, value: &str, rev: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: None,
        }
    }

    #[test]
    fn invalid_records_are_dropped_not_fatal() {
        let good = r#"{"name":"a1","location":"site-a","internal_ip":"172.20.0.2/24","listen_port":51820,"overlay_ip":"100.64.0.1"}"#;
        let renamed = good.replace("\"a1\"", "\"zz\"");
        let mut state = ClusterState::from_list(
            &[
                kv("nodes/a1", good, 2),
                kv("nodes/a2", &renamed, 3),
                kv("nodes/a3", "{not json", 4),
                kv(
                    "settings",
                    r#"{"granularity":"mesh","gateways_per_location":1}"#,
                    5,
                ),
            ],
            5,
        );
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), ["a1"]);
        assert!(state.settings.is_none());
        // a later invalid update removes the previously valid record instead of keeping
        // stale data that its owner no longer stands behind
        state.apply(&Event::Put(kv("nodes/a1", "{}", 6)));
        assert!(state.nodes.is_empty());
        assert_eq!(state.revision, 6);
    }

    #[test]
    fn path_reports_break_pairs_only_when_valid_and_in_forwarding_mode() {
        let report = |from: &str, to: &str, up: bool| {
            format!(r#"{{"from":"{from}","to":"{to}","up":{up}}}"#)
        };
        let mut state = ClusterState::from_list(
            &[
                kv("paths/a1/b1", &report("a1", "b1", false), 1),
                kv("paths/a2/b2", &report("a2", "b2", true), 2),
                kv("paths/a3/b3", &report("a9", "b3", false), 3), // key and record disagree
                kv("paths/a4/a4", &report("a4", "a4", false), 4), // not a path
            ],
            4,
        );
        let defaults = Settings {
            granularity: trellis_model::Granularity::Full,
            gateways_per_location: 2,
            persistent_keepalive: None,
        };
        let broken = |s: &ClusterState| s.plan_inputs(&defaults).broken_paths();
        assert_eq!(
            broken(&state),
            [("a1".to_string(), "b1".to_string())].into()
        );
        state.apply(&Event::Delete {
            key: "paths/a1/b1".into(),
            revision: 5,
        });
        assert!(broken(&state).is_empty(), "an expired lease heals the path");
        state.apply(&Event::Put(kv(
            "paths/b1/a1",
            &report("b1", "a1", false),
            6,
        )));
        state.apply(&Event::Put(kv(
            "settings",
            r#"{"granularity":"full","gateways_per_location":2,"gateway_health":"liveness"}"#,
            7,
        )));
        assert!(
            broken(&state).is_empty(),
            "the liveness baseline measures nothing"
        );
    }

    /// Only verdicts are plan inputs: one dissenting observer re-plans nobody, a majority
    /// does.
    #[test]
    fn plan_inputs_change_with_verdicts_not_with_single_opinions() {
        let node = |name: &str, loc: &str, i: u8| {
            format!(
                r#"{{"name":"{name}","location":"{loc}","internal_ip":"172.20.{}.{i}/24","endpoint":"198.18.0.{i}:51820","listen_port":51820,"public_key":"{}","overlay_ip":"100.64.0.{i}","probe_ip":"100.65.0.{i}"}}"#,
                if loc == "site-a" { 0 } else { 1 },
                trellis_model::PublicKey([i; 32]),
            )
        };
        let mut kvs = Vec::new();
        for (i, (name, loc)) in [
            ("a1", "site-a"),
            ("a2", "site-a"),
            ("b1", "site-b"),
            ("b2", "site-b"),
        ]
        .into_iter()
        .enumerate()
        {
            kvs.push(kv(
                &format!("nodes/{name}"),
                &node(name, loc, i as u8 + 1),
                i as u64 + 1,
            ));
        }
        let mut state = ClusterState::from_list(&kvs, 4);
        let defaults = Settings::default();
        let observers: Vec<String> = state.topology(&defaults).observers["a1"].clone();
        assert_eq!(observers.len(), 3, "{observers:?}");
        let opinion = |observer: &str, up: bool| {
            Event::Put(kv(
                &format!("observations/a1/{observer}"),
                &format!(r#"{{"gateway":"a1","observer":"{observer}","up":{up}}}"#),
                10,
            ))
        };
        for o in &observers {
            state.apply(&opinion(o, true)); // every observer starts out saying "up"
        }
        let before = state.plan_inputs(&defaults);
        state.apply(&opinion(&observers[0], false));
        assert_eq!(
            state.plan_inputs(&defaults),
            before,
            "one dissenting observer"
        );
        state.apply(&opinion(&observers[1], false));
        let after = state.plan_inputs(&defaults);
        assert_ne!(after, before, "a majority holds a1 down");
        assert!(after.measured_down().contains("a1"));
    }
}
