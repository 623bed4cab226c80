//! Which connection-tracking entries a plan makes stale.
//!
//! A UDP "connection" lives in conntrack for as long as packets keep coming, and its NAT
//! decision is never revisited: a client that kept sending while a service had no
//! endpoint holds an untranslated entry and stays blackholed after endpoints appear
//! (kubernetes issue 139628: 13 hours), and one translated to a pod that has gone keeps
//! sending into the void. TCP needs none of this: a dead endpoint resets or times out,
//! and a terminating one should finish its established connections.
//!
//! The test is level-based, like the rest of the proxy: an entry is judged against the
//! current plan, not against the event that changed it, so a missed event or a restart
//! cannot leave a stale entry behind. An entry whose original destination is a service's
//! (a service IP and port, or a NodePort on a node address) is stale unless it was
//! translated to an endpoint the service can still choose for that destination.

use crate::input::Protocol;
use crate::ruleset::{Destination, NodePort, Rule, ServiceRules, Table};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The parts of a conntrack entry that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: Protocol,
    /// Where the client sent it.
    pub original_dst: IpAddr,
    pub original_dport: u16,
    /// Who answers: the endpoint after DNAT, or the original destination without it.
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// Judges flows against one family's planned table; build once per sweep.
pub struct FlowJudge {
    /// Service destinations and the endpoints they may be translated to (empty: none).
    services: BTreeMap<Destination, BTreeSet<(IpAddr, u16)>>,
    node_ports: BTreeMap<NodePort, BTreeSet<(IpAddr, u16)>>,
    node_port_addresses: BTreeSet<IpAddr>,
}

impl FlowJudge {
    pub fn new(table: &Table) -> FlowJudge {
        let mut services = BTreeMap::new();
        let mut node_ports = BTreeMap::new();
        for rules in table.services.values() {
            for (dest, chain) in &rules.service_ips {
                services
                    .entry(*dest)
                    .or_insert_with(|| endpoints_from(rules, chain));
            }
            for dest in rules.no_endpoint_services.keys() {
                services.entry(*dest).or_insert_with(BTreeSet::new);
            }
            for (port, chain) in &rules.node_ports {
                node_ports
                    .entry(*port)
                    .or_insert_with(|| endpoints_from(rules, chain));
            }
            for port in rules.no_endpoint_node_ports.keys() {
                node_ports.entry(*port).or_insert_with(BTreeSet::new);
            }
        }
        FlowJudge {
            services,
            node_ports,
            node_port_addresses: table.node_port_addresses.clone(),
        }
    }

    /// Whether the entry should be deleted so that the flow's next packet is judged anew.
    pub fn is_stale(&self, flow: &Flow) -> bool {
        if flow.protocol != Protocol::Udp {
            return false;
        }
        let dest = Destination {
            addr: flow.original_dst,
            protocol: flow.protocol,
            port: flow.original_dport,
        };
        let allowed = match self.services.get(&dest) {
            Some(allowed) => allowed,
            None if self.node_port_addresses.contains(&flow.original_dst) => {
                match self.node_ports.get(&NodePort {
                    protocol: flow.protocol,
                    port: flow.original_dport,
                }) {
                    Some(allowed) => allowed,
                    None => return false,
                }
            }
            None => return false,
        };
        !allowed.contains(&(flow.reply_src, flow.reply_sport))
    }
}

/// Every endpoint a packet sent to `chain` can be translated to.
fn endpoints_from(rules: &ServiceRules, chain: &str) -> BTreeSet<(IpAddr, u16)> {
    let mut found = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![chain];
    while let Some(name) = todo.pop() {
        if !seen.insert(name) {
            continue;
        }
        let body = rules.chains.get(name).or_else(|| rules.shapes.get(name));
        for rule in body.into_iter().flatten() {
            match rule {
                Rule::Dnat { addr, port } => {
                    found.insert((*addr, *port));
                }
                Rule::Pick { role, .. } => {
                    for b in rules.pools.get(role).into_iter().flatten() {
                        found.insert((b.addr, b.port));
                    }
                }
                _ => {}
            }
            todo.extend(rule.targets());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{Endpoint, NodeView, ServicePort, ServicePortName};
    use crate::plan;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn dns() -> ServicePort {
        let mut svc = ServicePort::cluster_ip(
            ServicePortName {
                namespace: "kube-system".into(),
                name: "dns".into(),
                port: "dns".into(),
                protocol: Protocol::Udp,
            },
            ip("10.96.0.10"),
            53,
        );
        svc.node_port = Some(30053);
        svc
    }

    fn node() -> NodeView {
        NodeView {
            name: "a".into(),
            node_port_addresses: vec![ip("172.20.0.1")],
            cluster_cidrs: vec![],
        }
    }

    fn flow(dst: &str, dport: u16, reply: &str, sport: u16) -> Flow {
        Flow {
            protocol: Protocol::Udp,
            original_dst: ip(dst),
            original_dport: dport,
            reply_src: ip(reply),
            reply_sport: sport,
        }
    }

    #[test]
    fn untranslated_flows_to_a_service_are_stale_once_it_has_endpoints_again() {
        let plan = plan(
            &[(dns(), vec![Endpoint::ready(ip("10.244.1.5"), 5353, "b")])],
            &node(),
        );
        let judge = FlowJudge::new(&plan.v4);
        assert!(judge.is_stale(&flow("10.96.0.10", 53, "10.96.0.10", 53)));
        assert!(!judge.is_stale(&flow("10.96.0.10", 53, "10.244.1.5", 5353)));
        assert!(judge.is_stale(&flow("172.20.0.1", 30053, "172.20.0.1", 30053)));
        assert!(!judge.is_stale(&flow("172.20.0.1", 30053, "10.244.1.5", 5353)));
    }

    #[test]
    fn flows_to_a_gone_endpoint_or_a_service_scaled_to_zero_are_stale() {
        let plan = plan(
            &[(dns(), vec![Endpoint::ready(ip("10.244.1.6"), 5353, "b")])],
            &node(),
        );
        let judge = FlowJudge::new(&plan.v4);
        assert!(judge.is_stale(&flow("10.96.0.10", 53, "10.244.1.5", 5353)));

        let judge = FlowJudge::new(&plan::plan(&[(dns(), vec![])], &node()).v4);
        assert!(judge.is_stale(&flow("10.96.0.10", 53, "10.244.1.6", 5353)));
        assert!(judge.is_stale(&flow("10.96.0.10", 53, "10.96.0.10", 53)));
    }

    #[test]
    fn other_flows_are_left_alone() {
        let plan = plan(&[(dns(), vec![])], &node());
        let judge = FlowJudge::new(&plan.v4);
        assert!(!judge.is_stale(&flow("10.96.0.11", 53, "10.244.1.5", 53)));
        assert!(
            !judge.is_stale(&flow("10.244.1.5", 30053, "10.244.1.5", 30053)),
            "the NodePort number on a pod address is not the NodePort"
        );
        let mut tcp = flow("10.96.0.10", 53, "10.244.1.5", 5353);
        tcp.protocol = Protocol::Tcp;
        assert!(!judge.is_stale(&tcp), "TCP flows finish on their own");
    }
}
