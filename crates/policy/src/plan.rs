//! From policies, pods and namespaces to what one node enforces for its own pods: the
//! shape the nftables state will take, as values (the kernel edge comes on top).
//!
//! Per local pod address, an ingress check and an egress check: absent when no policy
//! isolates the pod in that direction, else the list of what its isolating policies allow —
//! each an address match (every address, a named set of pod addresses, or a CIDR with
//! exceptions) and the ports, resolved: a named port is a number here, the destination
//! pod's. Packets are looked up by address (a verdict map per direction), so the cost per
//! packet is the pod's own rules, whatever the number of policies elsewhere.
//!
//! Egress to named ports depends on each destination pod's numbering, so such a rule becomes
//! a set of (address, protocol, port) elements, one per destination pod and name.
//! [`trace`] runs a packet through the planned checks; tests hold it equal to
//! [`crate::evaluate`].

use crate::cluster::{Cluster, Pod};
use crate::evaluate::PolicyRef;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use trellis_model::network_policy::{NetworkPolicy, PolicyPeer, PolicyPort, PolicyType};
use trellis_model::{IntOrString, IpNet, Protocol};

/// What one node enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePolicy {
    /// The node's own addresses: its traffic to its pods is never checked.
    pub own: BTreeSet<IpAddr>,
    /// Named sets of pod addresses (the pods a selector peer picks).
    pub sets: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Named sets of (address, protocol, port): destinations of egress to named ports.
    pub port_sets: BTreeMap<String, BTreeSet<(IpAddr, Protocol, u16)>>,
    /// Per local pod address: its ingress check (`None`: not isolated).
    pub ingress: BTreeMap<IpAddr, Option<Check>>,
    pub egress: BTreeMap<IpAddr, Option<Check>>,
}

/// What an isolated pod admits in one direction; anything else is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The policies that isolate it (rule `None`), which a drop is counted against.
    pub isolated_by: Vec<PolicyRef>,
    pub allows: Vec<Allow>,
}

/// One thing a pod's check admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    /// The other end's address.
    pub peer: PeerMatch,
    /// Empty: every port of every protocol.
    pub ports: Vec<PortSpan>,
    pub by: PolicyRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatch {
    Anywhere,
    Set(String),
    Block {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    /// The destination's (address, protocol, port) is in the named set; `ports` is unused.
    PortSet(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortSpan {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// What `node` enforces, whose pods are `pods` filtered by node, with `own` its addresses.
pub fn plan(
    cluster: &Cluster,
    pods: &[Pod],
    node: &str,
    own: impl IntoIterator<Item = IpAddr>,
) -> NodePolicy {
    let mut out = NodePolicy {
        own: own.into_iter().collect(),
        ..NodePolicy::default()
    };
    // Pods alike (namespace, labels, named ports) have the same checks: computed once.
    type Alike<'a> = (
        &'a str,
        &'a BTreeMap<String, String>,
        &'a [trellis_model::NamedPort],
        PolicyType,
    );
    let mut checks: HashMap<Alike<'_>, Option<Check>> = HashMap::new();
    let index = Pods::new(pods);
    for pod in pods.iter().filter(|p| p.node == node) {
        for direction in [PolicyType::Ingress, PolicyType::Egress] {
            let alike = (
                pod.namespace.as_str(),
                &pod.labels,
                pod.ports.as_slice(),
                direction,
            );
            let check = match checks.get(&alike) {
                Some(check) => check.clone(),
                None => {
                    let check = pod_check(cluster, &index, pod, direction, &mut out);
                    checks.insert(alike, check.clone());
                    check
                }
            };
            let by_address = match direction {
                PolicyType::Ingress => &mut out.ingress,
                PolicyType::Egress => &mut out.egress,
            };
            for ip in &pod.ips {
                by_address.insert(*ip, check.clone());
            }
        }
    }
    out
}

fn pod_check(
    cluster: &Cluster,
    pods: &Pods<'_>,
    pod: &Pod,
    direction: PolicyType,
    out: &mut NodePolicy,
) -> Option<Check> {
    let isolating: Vec<&NetworkPolicy> = cluster.isolating(pod, direction).collect();
    if isolating.is_empty() {
        return None;
    }
    let isolated_by = (isolating.iter())
        .map(|p| PolicyRef {
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone(),
            rule: None,
        })
        .collect();
    let mut allows = Vec::new();
    for policy in isolating {
        let rules: Vec<(&[PolicyPeer], &[PolicyPort])> = match direction {
            PolicyType::Ingress => (policy.spec.ingress.iter())
                .map(|r| (r.from.as_slice(), r.ports.as_slice()))
                .collect(),
            PolicyType::Egress => (policy.spec.egress.iter())
                .map(|r| (r.to.as_slice(), r.ports.as_slice()))
                .collect(),
        };
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            let by = PolicyRef {
                namespace: policy.metadata.namespace.clone(),
                name: policy.metadata.name.clone(),
                rule: Some(i),
            };
            let set_prefix = format!(
                "{}/{}/{}{i}",
                policy.metadata.namespace,
                policy.metadata.name,
                if direction == PolicyType::Ingress {
                    "in"
                } else {
                    "out"
                }
            );
            let peer_matches: Vec<PeerMatch> = if peers.is_empty() {
                vec![PeerMatch::Anywhere]
            } else {
                (peers.iter())
                    .map(|peer| peer_match(cluster, pods, policy, peer, out))
                    .collect()
            };
            let (numeric, named) = split_ports(ports, direction, pod);
            if ports.is_empty() || !numeric.is_empty() {
                for peer in &peer_matches {
                    allows.push(Allow {
                        peer: peer.clone(),
                        ports: numeric.clone(),
                        by: by.clone(),
                    });
                }
            }
            if direction == PolicyType::Egress && !named.is_empty() {
                let name = format!("{set_prefix}/named");
                if out.port_sets.contains_key(&name) {
                    allows.push(Allow {
                        peer: PeerMatch::PortSet(name),
                        ports: Vec::new(),
                        by: by.clone(),
                    });
                    continue;
                }
                // Each destination's addresses the peer matches: an ipBlock matches only
                // those it holds (a dual-stack pod's other family is not in it).
                let mut destinations: Vec<(&Pod, Vec<IpAddr>)> = Vec::new();
                for peer in peers {
                    for dest in matched_pods(cluster, pods, policy, peer) {
                        let ips = (dest.ips.iter().copied())
                            .filter(|ip| peer.ip_block.as_ref().is_none_or(|b| b.contains(*ip)))
                            .collect();
                        destinations.push((dest, ips));
                    }
                }
                if peers.is_empty() {
                    destinations.extend(pods.all.iter().map(|p| (p, p.ips.clone())));
                }
                let mut elements = BTreeSet::new();
                for (dest, ips) in destinations {
                    for (protocol, port_name) in &named {
                        if let Some(n) = dest.named_port(port_name, *protocol) {
                            elements.extend(ips.iter().map(|ip| (*ip, *protocol, n)));
                        }
                    }
                }
                out.port_sets.insert(name.clone(), elements);
                allows.push(Allow {
                    peer: PeerMatch::PortSet(name),
                    ports: Vec::new(),
                    by: by.clone(),
                });
            }
        }
    }
    Some(Check {
        isolated_by,
        allows,
    })
}

/// The rule's ports as spans, and (for egress) the named ones left to resolve per
/// destination. For ingress a name is the pod's own port; a name it lacks matches nothing.
fn split_ports(
    ports: &[PolicyPort],
    direction: PolicyType,
    pod: &Pod,
) -> (Vec<PortSpan>, Vec<(Protocol, String)>) {
    let mut spans = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        let protocol = p.protocol();
        match &p.port {
            None => spans.push(PortSpan {
                protocol,
                first: 1,
                last: u16::MAX,
            }),
            Some(IntOrString::Int(n)) => {
                let first = *n as u16;
                let last = p.end_port.map_or(first, |e| e as u16);
                spans.push(PortSpan {
                    protocol,
                    first,
                    last,
                });
            }
            Some(IntOrString::String(name)) => match direction {
                PolicyType::Ingress => {
                    if let Some(n) = pod.named_port(name, protocol) {
                        spans.push(PortSpan {
                            protocol,
                            first: n,
                            last: n,
                        });
                    }
                }
                PolicyType::Egress => named.push((protocol, name.clone())),
            },
        }
    }
    (spans, named)
}

/// A selector peer's set is named after what it selects, so every rule of every policy
/// selecting the same pods shares one set (and it is computed once):
/// `NAMESPACE/POD-SELECTOR` for pods of the policy's namespace, `ns:NS-SELECTOR/POD-SELECTOR`
/// for a namespace selector, in kubectl's selector syntax, `all` for an empty selector.
fn peer_match(
    cluster: &Cluster,
    pods: &Pods<'_>,
    policy: &NetworkPolicy,
    peer: &PolicyPeer,
    out: &mut NodePolicy,
) -> PeerMatch {
    if let Some((cidr, except)) = peer.ip_block.as_ref().and_then(|b| b.prefixes()) {
        return PeerMatch::Block { cidr, except };
    }
    let text = |s: &trellis_model::LabelSelector| {
        let t = s.to_string();
        if t.is_empty() { "all".to_string() } else { t }
    };
    let namespaces = match &peer.namespace_selector {
        None => policy.metadata.namespace.clone(),
        Some(s) => format!("ns:{}", text(s)),
    };
    let pods_part = peer.pod_selector.as_ref().map_or("all".to_string(), text);
    let name = format!("{namespaces}/{pods_part}");
    if !out.sets.contains_key(&name) {
        let members = matched_pods(cluster, pods, policy, peer)
            .into_iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        out.sets.insert(name.clone(), members);
    }
    PeerMatch::Set(name)
}

/// The pods, and by namespace: a selector peer looks only at the namespaces it can pick.
struct Pods<'a> {
    all: &'a [Pod],
    by_namespace: BTreeMap<&'a str, Vec<&'a Pod>>,
}

impl<'a> Pods<'a> {
    fn new(all: &'a [Pod]) -> Pods<'a> {
        let mut by_namespace: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        for pod in all {
            by_namespace.entry(&pod.namespace).or_default().push(pod);
        }
        Pods { all, by_namespace }
    }
}

/// The pods a peer picks (for an `ipBlock`: the pods whose address it holds). A selector
/// peer's namespaces are judged once each, and only their pods' labels are looked at.
fn matched_pods<'a>(
    cluster: &Cluster,
    pods: &Pods<'a>,
    policy: &NetworkPolicy,
    peer: &PolicyPeer,
) -> Vec<&'a Pod> {
    if let Some(block) = &peer.ip_block {
        return (pods.all.iter())
            .filter(|pod| pod.ips.iter().any(|ip| block.contains(*ip)))
            .collect();
    }
    let labels_ok = |pod: &Pod| (peer.pod_selector.as_ref()).is_none_or(|s| s.matches(&pod.labels));
    (pods.by_namespace.iter())
        .filter(|(ns, _)| cluster.selects_namespace(policy, peer, ns))
        .flat_map(|(_, in_namespace)| in_namespace.iter().copied())
        .filter(|pod| labels_ok(pod))
        .collect()
}

/// A packet through the planned checks of the nodes (by name): egress where its source is
/// a local pod, ingress where its destination is.
pub fn trace(
    plans: &BTreeMap<String, NodePolicy>,
    from: IpAddr,
    to: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let egress_ok = plans.values().all(|plan| match plan.egress.get(&from) {
        None | Some(None) => true,
        Some(Some(check)) => (check.allows.iter()).any(|a| admits(plan, a, to, to, protocol, port)),
    });
    let ingress_ok = plans.values().all(|plan| match plan.ingress.get(&to) {
        None | Some(None) => true,
        Some(Some(_)) if plan.own.contains(&from) => true,
        Some(Some(check)) => {
            (check.allows.iter()).any(|a| admits(plan, a, from, to, protocol, port))
        }
    });
    egress_ok && ingress_ok
}

/// Whether `allow` admits a packet whose other end is `peer`, destined to `to`.
fn admits(
    plan: &NodePolicy,
    allow: &Allow,
    peer: IpAddr,
    to: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let peer_ok = match &allow.peer {
        PeerMatch::Anywhere => true,
        PeerMatch::Set(name) => plan.sets.get(name).is_some_and(|s| s.contains(&peer)),
        PeerMatch::Block { cidr, except } => {
            cidr.contains(&peer) && !except.iter().any(|e| e.contains(&peer))
        }
        PeerMatch::PortSet(name) => {
            return plan
                .port_sets
                .get(name)
                .is_some_and(|s| s.contains(&(to, protocol, port)));
        }
    };
    peer_ok
        && (allow.ports.is_empty()
            || allow
                .ports
                .iter()
                .any(|s| s.protocol == protocol && (s.first..=s.last).contains(&port)))
}

#[cfg(test)]
mod tests;
