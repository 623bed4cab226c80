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

/// What decides that a gateway (or a direct path) is down, by the cluster's health mode.
#[derive(Clone, Debug, PartialEq)]
pub enum HealthInputs {
    /// Forwarding probes: each gateway candidate's observers' opinions
    /// (`observations[gateway][observer] = up`), and the direct paths either end reports
    /// broken.
    Forwarding {
        observations: BTreeMap<String, BTreeMap<String, bool>>,
        broken_paths: BTreeSet<(String, String)>,
    },
    /// The liveness baseline (Kilo's model, for comparison): a gateway is down only when its
    /// agent's status lease expired; paths are never measured.
    Liveness { live_agents: BTreeSet<String> },
}

impl ClusterState {
    pub fn plan_inputs(&self, defaults: &Settings) -> PlanInputs {
        let mode = self
            .settings
            .as_ref()
            .map_or(GatewayHealth::Forwarding, |s| s.gateway_health);
        let health = match mode {
            GatewayHealth::Liveness => HealthInputs::Liveness {
                live_agents: self.status.keys().cloned().collect(),
            },
            GatewayHealth::Forwarding => HealthInputs::Forwarding {
                observations: self.observations.clone(),
                broken_paths: self
                    .paths
                    .iter()
                    .filter(|(_, up)| !**up)
                    .map(|((from, to), _)| (from.clone(), to.clone()))
                    .collect(),
            },
        };
        PlanInputs {
            nodes: self.nodes_with_allocations(),
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
            HealthInputs::Liveness { live_agents } => candidates(self.nodes.values())
                .into_iter()
                .filter(|n| !live_agents.contains(&n.name))
                .map(|n| n.name.clone())
                .collect(),
            HealthInputs::Forwarding { observations, .. } => {
                verdicts(self.nodes.values(), observations)
                    .into_iter()
                    .filter(|(_, v)| *v == Verdict::Down)
                    .map(|(g, _)| g)
                    .collect()
            }
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
