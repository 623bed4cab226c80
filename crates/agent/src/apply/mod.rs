//! Plan → kernel. Computes this node's plan from the cluster state and brings the kernel
//! to it through small reconcilers, each a pure diff followed by its operations and read
//! back: WireGuard peers, the interface, routes, the probe relay; and records the
//! location's gateway choice in the store. The kernel is reached through traits
//! ([`Kernel`]), so a whole pass is tested against in-memory fakes.

mod gateway_slots;
pub mod relay;
#[cfg(test)]
mod tests;

use crate::report::transition::Health;
use crate::state::{ClusterState, PlanInputs};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use trellis_dataplane::interface::{InterfaceControl, reconcile_interface, reconcile_one_address};
use trellis_dataplane::nftables::Ruleset;
use trellis_dataplane::routes::{RouteSpec, RouteTable, reconcile_routes};
use trellis_dataplane::wireguard::{PeerConfig, WireGuardDevice, reconcile_peers};
use trellis_model::{AgentStatus, Host, Node};
use trellis_plan::{NextHop, Plan, Topology};
use trellis_store::{Op, Store};

/// Routes the agent installs carry this protocol number, so it recognises its own routes
/// and never touches anyone else's (`ip route show proto 116`).
pub const ROUTE_PROTOCOL: u8 = 116;

/// WireGuard adds 60 (IPv4) to 80 (IPv6) bytes to a 1500-byte underlay packet.
pub const TUNNEL_MTU: u32 = 1420;
const DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

pub fn prepare_kernel() -> trellis_dataplane::Result<()> {
    // Gateways forward for their location, and replies may come back on another interface
    // than the request left on, which strict reverse-path filtering would drop.
    ensure_sysctl("net.ipv4.ip_forward", "1")?;
    ensure_sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    ensure_sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    if let Err(e) = ensure_sysctl("net.ipv6.conf.all.forwarding", "1") {
        tracing::debug!("IPv6 forwarding not set (IPv6 disabled?): {e:#}");
    }
    Ok(())
}

/// Writes a kernel parameter only when it differs: an agent in a container whose /proc/sys
/// is read-only (an unprivileged pod) runs on a node prepared by its operator.
fn ensure_sysctl(name: &str, value: &str) -> trellis_dataplane::Result<()> {
    use trellis_dataplane::sysctl;
    if sysctl::get(name).is_ok_and(|have| have == value) {
        return Ok(());
    }
    sysctl::set(name, value)
}

/// The parts of the kernel a pass writes, each behind its reconciler's trait.
#[derive(Clone)]
pub struct Kernel {
    pub device: Arc<dyn WireGuardDevice>,
    pub interfaces: Arc<dyn InterfaceControl>,
    pub routes: Arc<dyn RouteTable>,
    pub ruleset: Arc<dyn Ruleset>,
    /// The service proxy's kernel interfaces (`None`: no service proxy).
    pub service_proxy: Option<Arc<crate::proxy::run::ProxyKernel>>,
    /// Network policy's nftables connection (`None`: NetworkPolicy not enforced).
    pub network_policy: Option<Arc<trellis_dataplane::nftables::Nft>>,
}

pub struct Reconciler {
    node: Node,
    interface: String,
    kernel: Kernel,
    store: Arc<dyn Store>,
    /// The routes the last pass left in place: one of them missing now was removed by
    /// someone else, whatever else changed since.
    routes_in_place: Vec<RouteSpec>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    plan: Option<Plan>,
    health: Option<Health>,
    nodes: usize,
    warnings: Vec<String>,
    errors: Vec<String>,
    /// Routes the last pass had in place that this pass found missing and put back.
    routes_repaired: usize,
}

impl Outcome {
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn routes_repaired(&self) -> usize {
        self.routes_repaired
    }

    pub fn health(&self) -> Option<&Health> {
        self.health.as_ref()
    }

    pub fn status(&self, node: &str, revision: u64) -> AgentStatus {
        AgentStatus {
            node: node.to_string(),
            revision,
            nodes: self.nodes,
            peers: self.plan.as_ref().map_or(0, |p| p.peers.len()),
            routes: self.plan.as_ref().map_or(0, |p| p.routes.len()),
            gateway: self.plan.as_ref().is_some_and(|p| p.is_gateway),
            applied: self.plan.is_some() && self.errors.is_empty(),
            error: (!self.errors.is_empty()).then(|| self.errors.join("; ")),
            warnings: self.warnings.clone(),
        }
    }
}

/// How many of the routes that were in place after the last pass had to be installed
/// again: someone else removed (or changed) them.
pub fn repaired(in_place: &[RouteSpec], installed: &[RouteSpec]) -> usize {
    let in_place: std::collections::HashSet<&RouteSpec> = in_place.iter().collect();
    installed.iter().filter(|r| in_place.contains(r)).count()
}

impl Reconciler {
    pub fn new(node: Node, interface: String, kernel: Kernel, store: Arc<dyn Store>) -> Self {
        Self {
            node,
            interface,
            kernel,
            store,
            routes_in_place: Vec::new(),
        }
    }

    /// One pass: plan, record the location's gateway choice, apply, verify. Each step's
    /// failure is reported and the others still run: a broken route must not keep the
    /// peers from being updated, nor the other way round.
    pub async fn reconcile(
        &mut self,
        state: &ClusterState,
        inputs: &PlanInputs,
        inputs_changed: bool,
    ) -> Outcome {
        let topology = inputs.topology();
        let mut outcome = Outcome {
            nodes: topology.nodes.len(),
            warnings: topology.warnings.clone(),
            health: Some(Health {
                down: topology.down.clone(),
                gateways: topology.gateways.clone(),
            }),
            ..Default::default()
        };
        let plan = match topology.plan_for(&self.node.name) {
            Ok(plan) => plan,
            Err(e) => {
                outcome.errors.push(e.to_string());
                return outcome;
            }
        };
        if inputs_changed {
            tracing::info!(
                revision = state.revision,
                nodes = topology.nodes.len(),
                peers = plan.peers.len(),
                routes = plan.routes.len(),
                gateway = plan.is_gateway,
                "new plan"
            );
            for w in &topology.warnings {
                tracing::warn!("{w}");
            }
        }
        if let Err(e) = self.record_gateway_choice(state, &topology).await {
            tracing::debug!("recording gateway choice: {e:#}");
        }
        let addresses: Vec<IpNet> = std::iter::once(plan.address)
            .chain(plan.probe_address)
            .collect();
        if let Err(e) = reconcile_interface(
            self.kernel.interfaces.as_ref(),
            &self.interface,
            &addresses,
            TUNNEL_MTU,
        )
        .await
        {
            outcome
                .errors
                .push(format!("interface {}: {e:#}", self.interface));
        }
        let peers = peer_configs(&plan, &mut outcome.warnings).await;
        match tokio::time::timeout(
            DEVICE_TIMEOUT,
            reconcile_peers(self.kernel.device.as_ref(), &peers),
        )
        .await
        {
            Ok(Ok(changes)) if !changes.is_empty() => tracing::info!(
                added = changes.added.len(),
                updated = changes.updated.len(),
                removed = changes.removed.len(),
                "WireGuard peers updated"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => outcome.errors.push(format!("{e:#}")),
            Err(_) => outcome.errors.push(format!(
                "WireGuard device did not answer within {DEVICE_TIMEOUT:?}"
            )),
        }
        let internal_link = match self.reconcile_internal_link_local(&plan).await {
            Ok(link) => link,
            Err(e) => {
                outcome.errors.push(e);
                None
            }
        };
        let routes = route_specs(&plan, &self.interface, internal_link.as_deref());
        match reconcile_routes(self.kernel.routes.as_ref(), ROUTE_PROTOCOL, &routes).await {
            Ok(changes) => {
                let restored = repaired(&self.routes_in_place, &changes.added);
                if restored > 0 {
                    outcome.routes_repaired = restored;
                    tracing::warn!(restored, "routes had drifted; repaired");
                }
                if changes.added.len() > restored || !changes.removed.is_empty() {
                    tracing::info!(
                        added = changes.added.len() - restored,
                        removed = changes.removed.len(),
                        "routes updated"
                    );
                }
                self.routes_in_place = routes;
            }
            Err(e) => {
                // What is in place is unknown now: nothing counts as drift next time.
                self.routes_in_place.clear();
                outcome.errors.push(format!("{e:#}"));
            }
        }
        let ruleset = self.kernel.ruleset.clone();
        let (interface, probe_ip, internal_ip) = (
            self.interface.clone(),
            plan.probe_address.map(|a| a.addr()),
            self.node.internal_ip.addr(),
        );
        let relay = plan.relay.clone();
        let programmed = tokio::task::spawn_blocking(move || {
            relay::reconcile(ruleset.as_ref(), &interface, probe_ip, internal_ip, &relay)
        })
        .await;
        match programmed {
            Ok(Ok(true)) => tracing::info!(targets = plan.relay.len(), "probe relay programmed"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => outcome.errors.push(format!("{e:#}")),
            Err(e) => outcome.errors.push(format!("probe relay task: {e}")),
        }
        for e in &outcome.errors {
            tracing::warn!("apply: {e}");
        }
        outcome.plan = Some(plan);
        outcome
    }

    /// Puts the plan's [`Plan::internal_link_local`] on the link that holds this node's
    /// internal address (or takes it off once the mesh carries no IPv6), so that the other
    /// nodes of the location can route IPv6 through this one; every other address of that
    /// shared link stays as it is. Returns the link, which IPv6 routes over the internal
    /// network name (a link-local gateway needs its device); `None` when no link holds the
    /// internal address and none is needed.
    async fn reconcile_internal_link_local(&self, plan: &Plan) -> Result<Option<String>, String> {
        let IpAddr::V4(internal) = self.node.internal_ip.addr() else {
            return Ok(None); // IPv6 routes point at the internal address itself
        };
        let stand_in = trellis_plan::internal_link_local(internal);
        let wanted = plan.internal_link_local.is_some();
        let interfaces = self.kernel.interfaces.as_ref();
        let link = match interfaces.link_with_address(IpAddr::V4(internal)).await {
            Ok(Some(link)) => link,
            Ok(None) if !wanted => return Ok(None),
            Ok(None) => {
                return Err(format!(
                    "no link holds the internal address {internal}: IPv6 cannot be routed over the internal network"
                ));
            }
            Err(e) => return Err(format!("finding the internal link: {e:#}")),
        };
        let address = IpNet::new(IpAddr::V6(stand_in), 64).expect("64 is a valid IPv6 prefix");
        match reconcile_one_address(interfaces, &link, address, wanted).await {
            Ok(Some(change)) => {
                tracing::info!(link = %link, ?change, "internal link-local address")
            }
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "link-local address {address} on the internal link {link} (is IPv6 enabled on it?): {e:#}"
                ));
            }
        }
        Ok(Some(link))
    }

    /// Store the location's gateway choice when it differs from the stored record, so that
    /// the choice stays sticky (see [`gateway_slots`]).
    async fn record_gateway_choice(
        &self,
        state: &ClusterState,
        topology: &Topology,
    ) -> anyhow::Result<()> {
        let location = &self.node.location;
        let Some(chosen) = topology.slots.get(location) else {
            return Ok(());
        };
        let Some((compare, record)) =
            gateway_slots::write(location, state.gateways.get(location), chosen)
        else {
            return Ok(());
        };
        let result = self
            .store
            .txn(
                vec![compare],
                vec![Op::Put {
                    key: trellis_model::keys::gateways(location),
                    value: serde_json::to_vec(&record)?,
                    lease: None,
                }],
            )
            .await?;
        if result.succeeded {
            tracing::info!(location = %location, gateways = ?chosen, "recorded gateway choice");
        }
        Ok(())
    }
}

async fn peer_configs(plan: &Plan, warnings: &mut Vec<String>) -> Vec<PeerConfig> {
    let mut out = Vec::with_capacity(plan.peers.len());
    for peer in &plan.peers {
        let endpoint = match &peer.endpoint {
            None => None,
            Some(e) => match &e.host {
                Host::Ip(_) => e.socket_addr(),
                Host::Dns(name) => resolve(name, e.port).await.or_else(|| {
                    warnings.push(format!(
                        "endpoint {e} of peer {} does not resolve",
                        peer.name
                    ));
                    None
                }),
            },
        };
        out.push(PeerConfig {
            public_key: peer.public_key,
            endpoint,
            allowed_ips: peer
                .allowed_ips
                .iter()
                .copied()
                .collect::<BTreeSet<IpNet>>(),
            persistent_keepalive: peer.persistent_keepalive,
        });
    }
    out
}

async fn resolve(name: &str, port: u16) -> Option<std::net::SocketAddr> {
    let lookup = tokio::net::lookup_host((name, port));
    match tokio::time::timeout(DNS_TIMEOUT, lookup).await {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    }
}

/// The kernel routes of a plan: into the WireGuard `interface` for a tunnel, to the next
/// node's internal address otherwise — on `internal_link` when that address is link-local
/// (the IPv6 stand-in of an IPv4 one, see [`trellis_plan::internal_via`]), which the kernel
/// cannot resolve without the device. Without `internal_link` those routes are left out
/// (the pass reports why) rather than each refused by the kernel.
pub fn route_specs(plan: &Plan, interface: &str, internal_link: Option<&str>) -> Vec<RouteSpec> {
    plan.routes
        .iter()
        .filter_map(|r| {
            let (via, dev) = match &r.next_hop {
                NextHop::Tunnel { .. } => (None, Some(interface.to_string())),
                NextHop::Internal {
                    via: via @ IpAddr::V6(v6),
                    ..
                } if v6.is_unicast_link_local() => (Some(*via), Some(internal_link?.to_string())),
                NextHop::Internal { via, .. } => (Some(*via), None),
            };
            // Replies must come back to an address the mesh routes: the overlay one, not
            // the node's internal address, which other locations cannot reach. A source
            // must be of the destination's family: IPv6 routes leave the choice to the
            // kernel (pods' packets carry their own source anyway).
            let overlay = plan.address.addr();
            let src = (overlay.is_ipv4() == r.dst.addr().is_ipv4()).then_some(overlay);
            Some(RouteSpec {
                dst: r.dst,
                via,
                dev,
                src,
                protocol: ROUTE_PROTOCOL,
            })
        })
        .collect()
}
