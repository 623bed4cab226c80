//! Kubernetes' NetworkPolicy semantics, evaluated directly for one packet.
//!
//! A packet passes two checks, one at each end that is a pod (the NetworkPolicy
//! documentation, "Isolated and non-isolated Pods"):
//! - **egress** at its source pod: if any policy of the pod's namespace selects it and has
//!   the `Egress` type, the pod is isolated for egress, and the packet must match a rule of
//!   one of those policies (`to` and `ports`);
//! - **ingress** at its destination pod, the same with `Ingress`, `from` and `ports`.
//!
//! Policies are additive: any rule of any selecting policy admits. A rule's empty `from`/`to`
//! matches every peer and its empty `ports` every port. A peer with `podSelector` alone means
//! pods of the *policy's* namespace; with `namespaceSelector` alone, every pod of the
//! namespaces it selects; with both, the pods matching the first in the namespaces matching
//! the second; an `ipBlock` matches the packet's address at that end (pod addresses too: the
//! API leaves that to implementations, and Trellis matches them like any address). A named
//! port is the destination pod's container port of that name and protocol. Traffic from the
//! node a pod runs on to that pod is never blocked ("What you can't do with network
//! policies": pods cannot block access from their resident node).

use crate::cluster::{Cluster, Pod};
use std::net::IpAddr;
use trellis_model::network_policy::{NetworkPolicy, PolicyPeer, PolicyPort, PolicyType};
use trellis_model::{IntOrString, Protocol};

/// One end of a packet.
#[derive(Clone, Copy, Debug)]
pub enum End<'a> {
    /// A pod, at one of its addresses.
    Pod { pod: &'a Pod, ip: IpAddr },
    /// A node's own address (host network), by the node's name.
    Node { node: &'a str, ip: IpAddr },
    /// Anything else: outside the cluster, another network.
    Address(IpAddr),
}

impl End<'_> {
    pub fn ip(&self) -> IpAddr {
        match self {
            End::Pod { ip, .. } | End::Node { ip, .. } => *ip,
            End::Address(ip) => *ip,
        }
    }

    pub fn pod(&self) -> Option<&Pod> {
        match self {
            End::Pod { pod, .. } => Some(pod),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    pub from: End<'a>,
    pub to: End<'a>,
    pub protocol: Protocol,
    pub port: u16,
}

/// A policy, and for one that admits, the index of its first rule that does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    pub rule: Option<usize>,
}

/// What one end's check decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// No check at this end: not a pod, or the packet comes from the pod's own node.
    NotApplicable,
    /// A pod no policy isolates in this direction.
    NotIsolated,
    /// Isolated; these policies admit the packet.
    Allowed(Vec<PolicyRef>),
    /// Isolated by these policies, none of which admits the packet.
    Denied(Vec<PolicyRef>),
}

impl Side {
    pub fn admits(&self) -> bool {
        !matches!(self, Side::Denied(_))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub egress: Side,
    pub ingress: Side,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.egress.admits() && self.ingress.admits()
    }
}

/// Whether the cluster's policies admit `packet`, and why.
pub fn evaluate(cluster: &Cluster, packet: &Packet) -> Decision {
    let egress = match packet.from.pod() {
        None => Side::NotApplicable,
        Some(pod) => check(cluster, pod, PolicyType::Egress, |policy| {
            rule_admits(
                policy
                    .spec
                    .egress
                    .iter()
                    .map(|r| (r.to.as_slice(), r.ports.as_slice())),
                cluster,
                policy,
                &packet.to,
                packet,
            )
        }),
    };
    let ingress = match (packet.to.pod(), packet.from) {
        (None, _) => Side::NotApplicable,
        (Some(pod), End::Node { node, .. }) if node == pod.node => Side::NotApplicable,
        (Some(pod), _) => check(cluster, pod, PolicyType::Ingress, |policy| {
            rule_admits(
                policy
                    .spec
                    .ingress
                    .iter()
                    .map(|r| (r.from.as_slice(), r.ports.as_slice())),
                cluster,
                policy,
                &packet.from,
                packet,
            )
        }),
    };
    Decision { egress, ingress }
}

/// The check at `pod` for `direction`: the policies that isolate it, and which admit.
fn check(
    cluster: &Cluster,
    pod: &Pod,
    direction: PolicyType,
    admitting_rule: impl Fn(&NetworkPolicy) -> Option<usize>,
) -> Side {
    let isolating: Vec<&NetworkPolicy> = cluster.isolating(pod, direction).collect();
    if isolating.is_empty() {
        return Side::NotIsolated;
    }
    let reference = |p: &NetworkPolicy, rule| PolicyRef {
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        rule,
    };
    let admitting: Vec<PolicyRef> = isolating
        .iter()
        .filter_map(|p| admitting_rule(p).map(|rule| reference(p, Some(rule))))
        .collect();
    if admitting.is_empty() {
        Side::Denied(isolating.iter().map(|p| reference(p, None)).collect())
    } else {
        Side::Allowed(admitting)
    }
}

/// The first of `rules` (peers, ports) that matches the packet's `other` end and port.
fn rule_admits<'r>(
    rules: impl Iterator<Item = (&'r [PolicyPeer], &'r [PolicyPort])>,
    cluster: &Cluster,
    policy: &NetworkPolicy,
    other: &End,
    packet: &Packet,
) -> Option<usize> {
    let mut rules = rules.enumerate();
    rules
        .find(|(_, (peers, ports))| {
            (peers.is_empty()
                || peers
                    .iter()
                    .any(|p| peer_matches(cluster, policy, p, other)))
                && (ports.is_empty() || ports.iter().any(|p| port_matches(p, packet)))
        })
        .map(|(i, _)| i)
}

fn peer_matches(cluster: &Cluster, policy: &NetworkPolicy, peer: &PolicyPeer, end: &End) -> bool {
    if let Some(block) = &peer.ip_block {
        return block.contains(end.ip());
    }
    // Selectors select pods only.
    end.pod()
        .is_some_and(|pod| cluster.selects(policy, peer, pod))
}

fn port_matches(port: &PolicyPort, packet: &Packet) -> bool {
    if port.protocol() != packet.protocol {
        return false;
    }
    match &port.port {
        None => true,
        Some(IntOrString::Int(first)) => {
            let last = port.end_port.unwrap_or(*first);
            (*first..=last).contains(&i32::from(packet.port))
        }
        Some(IntOrString::String(name)) => {
            packet
                .to
                .pod()
                .and_then(|pod| pod.named_port(name, packet.protocol))
                == Some(packet.port)
        }
    }
}

#[cfg(test)]
mod tests;
