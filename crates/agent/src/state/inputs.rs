//! The part of the cluster state a plan depends on. The agent compares it between passes
//! and re-plans only when it changed, so someone else's status write costs nothing.

use super::ClusterState;
use std::collections::{BTreeMap, BTreeSet};
use trellis_model::{ExternalPeer, GatewayHealth, Node};
use trellis_plan::health::{Verdict, candidates, verdicts};
use trellis_plan::{Settings, Slots, Topology};

#[derive(Clone, Debug, PartialEq)]
pub struct PlanInputs {
    pub nodes: BTreeMap<String, Node>,
    pub peers: BTreeMap<String, ExternalPeer>,
    pub gateways: BTreeMap<String, Slots>,
    pub settings: Settings,
    pub health: HealthInputs,
}

/// What the cluster's health measurements amount to, by its health mode. Only the derived
/// verdicts are plan inputs, not the raw opinions: one observer changing its mind without
/// changing a verdict re-plans nobody.
#[derive(Clone, Debug, PartialEq)]
pub enum HealthInputs {
    /// Forwarding probes: the gateway candidates a majority of their observers hold down,
    /// and the direct paths either end reports broken.
    Forwarding {
        down: BTreeSet<String>,
        broken_paths: BTreeSet<(String, String)>,
    },
    /// The liveness baseline (Kilo's model, for comparison): a gateway is down only when its
    /// agent's status lease expired; paths are never measured.
    Liveness { down: BTreeSet<String> },
}

impl ClusterState {
    pub fn plan_inputs(&self, defaults: &Settings) -> PlanInputs {
        let mode = self
            .settings
            .as_ref()
            .map_or(GatewayHealth::Forwarding, |s| s.gateway_health);
        let nodes = self.nodes_with_allocations();
        let health = match mode {
            GatewayHealth::Liveness => HealthInputs::Liveness {
                down: candidates(nodes.values())
                    .into_iter()
                    .filter(|n| !self.status.contains_key(&n.name))
                    .map(|n| n.name.clone())
                    .collect(),
            },
            GatewayHealth::Forwarding => HealthInputs::Forwarding {
                down: verdicts(nodes.values(), &self.observations)
                    .into_iter()
                    .filter(|(_, v)| *v == Verdict::Down)
                    .map(|(g, _)| g)
                    .collect(),
                broken_paths: self
                    .paths
                    .iter()
                    .filter(|(_, up)| !**up)
                    .map(|((from, to), _)| (from.clone(), to.clone()))
                    .collect(),
            },
        };
        PlanInputs {
            nodes,
            peers: self.peers.clone(),
            gateways: self
                .gateways
                .iter()
                .map(|(loc, (g, _))| (loc.clone(), g.slots.clone()))
                .collect(),
            settings: self.plan_settings(defaults),
            health,
        }
    }
}

impl PlanInputs {
    /// The gateway candidates held down: by a majority of their observers, or in liveness
    /// mode because their agent's lease expired.
    pub fn measured_down(&self) -> BTreeSet<String> {
        match &self.health {
            HealthInputs::Forwarding { down, .. } | HealthInputs::Liveness { down } => down.clone(),
        }
    }

    /// Direct paths either end reports broken (none in liveness mode).
    pub fn broken_paths(&self) -> BTreeSet<(String, String)> {
        match &self.health {
            HealthInputs::Forwarding { broken_paths, .. } => broken_paths.clone(),
            HealthInputs::Liveness { .. } => BTreeSet::new(),
        }
    }

    pub fn topology(&self) -> Topology {
        let broken = self.broken_paths();
        Topology::build_with_health(
            self.settings.clone(),
            self.nodes.values().cloned(),
            self.peers.values().cloned(),
            &self.gateways,
            &self.measured_down(),
        )
        .with_broken_paths(broken.iter().map(|(a, b)| (a.as_str(), b.as_str())))
    }
}
