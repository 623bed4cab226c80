//! From service ports, their endpoints and one node to the planned tables. Pure and
//! per-port: [`plan_port`] depends on one service port and its endpoints only, so the
//! reconciler replans just the ports an event touched; [`plan`] is their union.

use crate::endpoints::{Usable, usable};
use crate::input::{Endpoint, IpFamily, NodeView, ServicePort, TrafficPolicy};
use crate::ruleset::{
    Backend, Destination, Frontend, HealthCheck, NodePort, Plan, Refusal, Role, Rule, ServiceRules,
    Table, chain,
};
use crate::shape::{Shape, role_of};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// A service port with its endpoints.
pub type PortWithEndpoints = (ServicePort, Vec<Endpoint>);

/// The plan for `node`: every port's rules in both families and the health checks.
pub fn plan(ports: &[PortWithEndpoints], node: &NodeView) -> Plan {
    let mut plan = Plan {
        v4: node_table(IpFamily::V4, node),
        v6: node_table(IpFamily::V6, node),
        health_checks: BTreeMap::new(),
    };
    for (port, endpoints) in ports {
        for family in IpFamily::BOTH {
            let rules = plan_port(port, endpoints, node, family);
            if !rules.is_empty() {
                plan.table_mut(family)
                    .services
                    .insert(port.name.clone(), rules);
            }
        }
        if let Some((hc_port, check)) = health_check(port, endpoints, node) {
            plan.health_checks.entry(hc_port).or_insert(check);
        }
    }
    plan
}

/// A family's table with the node's own parts and no services yet.
pub fn node_table(family: IpFamily, node: &NodeView) -> Table {
    let mut table = Table::new(family);
    table.node_port_addresses = node
        .node_port_addresses
        .iter()
        .copied()
        .filter(|a| IpFamily::of(*a) == family && !family.loopback().contains(a))
        .collect();
    table.cluster_cidrs = node
        .cluster_cidrs
        .iter()
        .copied()
        .filter(|n| IpFamily::of_net(n) == family)
        .collect();
    table
}

/// What one service port contributes to `family`'s table on `node`. Empty when the port
/// has no ClusterIP of that family (a single-stack service of the other family).
pub fn plan_port(
    port: &ServicePort,
    endpoints: &[Endpoint],
    node: &NodeView,
    family: IpFamily,
) -> ServiceRules {
    let mut rules = ServiceRules::default();
    let Some(cluster_ip) = port
        .cluster_ips
        .iter()
        .copied()
        .find(|a| IpFamily::of(*a) == family)
    else {
        return rules;
    };
    let name = &port.name;
    let proto = name.protocol;
    let dest = |addr: IpAddr| Destination {
        addr,
        protocol: proto,
        port: port.port,
    };
    let usable = usable(endpoints, family, &node.name);
    let internal = verdict(&usable, port.internal_policy);
    // External traffic is refused outright only without any endpoint: a Local policy
    // without a local one still serves pods and the node itself (kube-proxy's
    // short-circuit), and drops the rest in its external chain.
    let external = verdict(&usable, TrafficPolicy::Cluster);

    // Chains exist only where something goes to them.
    let mut uses_cluster_chain = false;
    let mut uses_local_chain = false;
    let policy_chain = |policy: TrafficPolicy| match policy {
        TrafficPolicy::Cluster => chain::cluster(name),
        TrafficPolicy::Local => chain::local(name),
    };

    // Internal traffic: the ClusterIP.
    rules.cluster_ips.insert(cluster_ip);
    // Ports without affinity share shape chains; with it, each has kube-proxy's chains
    // (a client's endpoint is remembered in a set per endpoint).
    let shared = port.affinity_seconds.is_none();
    let cluster_pool = backends(&usable.cluster);
    let local_pool = backends(&usable.local);
    let from_cluster = !node.cluster_cidrs.is_empty();
    match internal {
        Ok(()) if shared => {
            let role = role_of(port.internal_policy);
            let shape = Shape::ClusterIp {
                policy: port.internal_policy,
                count: pool_len(role, &cluster_pool, &local_pool),
            };
            rules.service_ips.insert(dest(cluster_ip), shape.name());
            rules
                .frontends
                .get_or_insert_with(Frontend::Address(dest(cluster_ip)), Default::default)
                .extend(shape.roles());
            rules.shapes.insert(shape.name(), shape.rules(from_cluster));
        }
        Ok(()) => {
            rules
                .service_ips
                .insert(dest(cluster_ip), policy_chain(port.internal_policy));
            match port.internal_policy {
                TrafficPolicy::Cluster => uses_cluster_chain = true,
                TrafficPolicy::Local => uses_local_chain = true,
            }
        }
        Err(refusal) => {
            rules.no_endpoint_services.insert(dest(cluster_ip), refusal);
        }
    }

    // External traffic: external IPs, load-balancer IPs, the NodePort.
    let external_ips: BTreeSet<IpAddr> = port
        .external_ips
        .iter()
        .chain(&port.load_balancer_ips)
        .copied()
        .filter(|a| IpFamily::of(*a) == family)
        .collect();
    let node_port = port.node_port.map(|p| NodePort {
        protocol: proto,
        port: p,
    });
    let has_external = !external_ips.is_empty() || node_port.is_some();
    if has_external {
        match external {
            Ok(()) if shared => {
                let mut frontends: Vec<Frontend> = external_ips
                    .iter()
                    .map(|a| Frontend::Address(dest(*a)))
                    .collect();
                frontends.extend(node_port.map(Frontend::NodePort));
                for frontend in frontends {
                    let kind = frontend.kind();
                    let shape = match port.external_policy {
                        TrafficPolicy::Cluster => Shape::ExternalCluster {
                            kind,
                            count: cluster_pool.len(),
                        },
                        TrafficPolicy::Local => Shape::ExternalLocal {
                            kind,
                            cluster: cluster_pool.len(),
                            local: local_pool.len(),
                        },
                    };
                    match frontend {
                        Frontend::Address(d) => rules.service_ips.insert(d, shape.name()),
                        Frontend::NodePort(np) => rules.node_ports.insert(np, shape.name()),
                    };
                    rules
                        .frontends
                        .get_or_insert_with(frontend, Default::default)
                        .extend(shape.roles());
                    rules.shapes.insert(shape.name(), shape.rules(from_cluster));
                }
            }
            Ok(()) => {
                let external_chain = chain::external(name);
                for addr in &external_ips {
                    rules
                        .service_ips
                        .insert(dest(*addr), external_chain.clone());
                }
                if let Some(np) = node_port {
                    rules.node_ports.insert(np, external_chain.clone());
                }
                let body = match port.external_policy {
                    TrafficPolicy::Cluster => {
                        uses_cluster_chain = true;
                        vec![Rule::Masquerade, Rule::Goto(chain::cluster(name))]
                    }
                    TrafficPolicy::Local => {
                        // Pods and the node itself are inside the cluster: they may use
                        // any endpoint (there are some, or this would be refused).
                        uses_cluster_chain = true;
                        let mut body = Vec::new();
                        if !node.cluster_cidrs.is_empty() {
                            body.push(Rule::GotoIfFromCluster(chain::cluster(name)));
                        }
                        body.extend([
                            Rule::MasqueradeIfLocalSource,
                            Rule::GotoIfLocalSource(chain::cluster(name)),
                        ]);
                        if usable.local.is_empty() {
                            body.push(Rule::Drop);
                        } else {
                            uses_local_chain = true;
                            body.push(Rule::Goto(chain::local(name)));
                        }
                        body
                    }
                };
                rules.chains.insert(external_chain, body);
            }
            Err(refusal) => {
                for addr in &external_ips {
                    rules.no_endpoint_services.insert(dest(*addr), refusal);
                }
                if let Some(np) = node_port {
                    rules.no_endpoint_node_ports.insert(np, refusal);
                }
            }
        }
    }

    // Source ranges guard the load-balancer IPs, whatever their endpoints.
    if !port.source_ranges.is_empty() {
        let lb_ips: BTreeSet<IpAddr> = port
            .load_balancer_ips
            .iter()
            .copied()
            .filter(|a| IpFamily::of(*a) == family)
            .collect();
        if !lb_ips.is_empty() {
            let firewall = chain::firewall(name);
            for addr in lb_ips {
                rules.firewall_ips.insert(dest(addr), firewall.clone());
            }
            let ranges = port
                .source_ranges
                .iter()
                .copied()
                .filter(|n| IpFamily::of_net(n) == family)
                .collect();
            rules
                .chains
                .insert(firewall, vec![Rule::DropUnlessSourceIn(ranges)]);
        }
    }

    // A connection from an endpoint to itself through its service must be masqueraded,
    // or the endpoint would answer itself directly. Only this node's pods (and the node)
    // open one here: another node's pods go through their own node's proxy.
    for e in usable.cluster.iter().chain(&usable.local) {
        if e.node.as_deref().is_none_or(|n| n == node.name) {
            rules.hairpin.insert(e.addr);
        }
    }
    for (role, pool) in [(Role::Cluster, cluster_pool), (Role::Local, local_pool)] {
        if rules.frontends.values().any(|roles| roles.contains(&role)) {
            rules.pools.insert(role, pool);
        }
    }

    let masquerade_cluster_ip = Rule::MasqueradeFromOutsideCluster {
        addr: cluster_ip,
        port: port.port,
    };
    if uses_cluster_chain {
        let mut body = Vec::new();
        if port.internal_policy == TrafficPolicy::Cluster {
            body.push(masquerade_cluster_ip.clone());
        }
        body.extend(balance(port, &usable.cluster));
        rules.chains.insert(chain::cluster(name), body);
        add_endpoint_chains(&mut rules, port, &usable.cluster);
    }
    if uses_local_chain {
        let mut body = Vec::new();
        if port.internal_policy == TrafficPolicy::Local {
            body.push(masquerade_cluster_ip);
        }
        body.extend(balance(port, &usable.local));
        rules.chains.insert(chain::local(name), body);
        add_endpoint_chains(&mut rules, port, &usable.local);
    }
    rules
}

/// A pool: the endpoints' addresses and ports in order, each once (two slices may list
/// one endpoint).
fn backends(endpoints: &[&Endpoint]) -> Vec<Backend> {
    let mut out: Vec<Backend> = endpoints
        .iter()
        .map(|e| Backend {
            addr: e.addr,
            port: e.port,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn pool_len(role: Role, cluster: &[Backend], local: &[Backend]) -> usize {
    match role {
        Role::Cluster => cluster.len(),
        Role::Local => local.len(),
    }
}

/// Whether traffic under `policy` has endpoints, or how it is refused: rejected without any
/// endpoint, dropped under a Local policy without a local one.
fn verdict(usable: &Usable, policy: TrafficPolicy) -> Result<(), Refusal> {
    if usable.cluster.is_empty() {
        Err(Refusal::Reject)
    } else if usable.under(policy).is_empty() {
        Err(Refusal::Drop)
    } else {
        Ok(())
    }
}

/// Affinity lookups, then a uniform random choice of endpoint chain.
fn balance(port: &ServicePort, endpoints: &[&Endpoint]) -> Vec<Rule> {
    let mut body = Vec::new();
    if port.affinity_seconds.is_some() {
        for e in endpoints {
            body.push(Rule::GotoIfAffine {
                set: chain::affinity(&port.name, e.addr, e.port),
                chain: chain::endpoint(&port.name, e.addr, e.port),
            });
        }
    }
    body.push(Rule::Balance(
        endpoints
            .iter()
            .map(|e| chain::endpoint(&port.name, e.addr, e.port))
            .collect(),
    ));
    body
}

fn add_endpoint_chains(rules: &mut ServiceRules, port: &ServicePort, endpoints: &[&Endpoint]) {
    for e in endpoints {
        let mut body = Vec::new();
        if let Some(timeout) = port.affinity_seconds {
            let set = chain::affinity(&port.name, e.addr, e.port);
            rules.affinity_sets.insert(set.clone(), timeout);
            body.push(Rule::RememberClient { set });
        }
        body.push(Rule::Dnat {
            addr: e.addr,
            port: e.port,
        });
        rules
            .chains
            .insert(chain::endpoint(&port.name, e.addr, e.port), body);
    }
}

/// The health check a LoadBalancer service with a Local policy answers on this node: the
/// number of this node's ready endpoints, in either family.
pub fn health_check(
    port: &ServicePort,
    endpoints: &[Endpoint],
    node: &NodeView,
) -> Option<(u16, HealthCheck)> {
    let hc_port = port.health_check_node_port?;
    let local: BTreeSet<IpAddr> = endpoints
        .iter()
        .filter(|e| e.ready && e.node.as_deref() == Some(node.name.as_str()))
        .map(|e| e.addr)
        .collect();
    Some((
        hc_port,
        HealthCheck {
            service: format!("{}/{}", port.name.namespace, port.name.name),
            local_endpoints: local.len(),
        },
    ))
}
