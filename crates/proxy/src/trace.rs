//! A packet tracer over a planned table: where the first packet of a new connection goes,
//! following the same hooks, priorities and lookups the rendered nftables table uses:
//!
//! - from the network: `filter-prerouting` (firewall), `nat-prerouting` (services), then
//!   `filter-input` (no-endpoint NodePorts and services) or `filter-forward` (no-endpoint
//!   services, unknown ClusterIP ports), then `nat-postrouting` (masquerade);
//! - from a process on the node: `filter-output` (no-endpoint services, firewall),
//!   `nat-output` (services), `filter-output-post-dnat` (unknown ClusterIP ports),
//!   `nat-postrouting`, and when the destination is the node's own, `filter-input` as the
//!   packet loops back.
//!
//! It answers every fate the packet can meet (the random endpoint choice makes several),
//! which is what the planner's tests compare with Kubernetes' rules. The renderer's
//! end-to-end tests then hold the kernel to the same answers.

use crate::input::{IpFamily, Protocol};
use crate::ruleset::{
    Backend, Condition, Destination, Frontend, FrontendKind, NodePort, Refusal, Role, Rule, Table,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Where a packet enters the node's netfilter hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// It arrived on an interface (from a pod, another node, the outside).
    Network,
    /// A process on the node sent it.
    LocalProcess,
}

/// The first packet of a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub origin: Origin,
}

/// What becomes of a packet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fate {
    /// Sent to an endpoint (DNAT), with its source masqueraded or kept. `remembered` names
    /// the affinity set the connection is recorded in, if any.
    Endpoint {
        addr: IpAddr,
        port: u16,
        masqueraded: bool,
        remembered: Option<String>,
    },
    Rejected,
    Dropped,
    /// Not a service: the proxy leaves it alone.
    Untouched,
}

/// A tracer for one table and what the kernel would know besides it.
pub struct Tracer<'a> {
    table: &'a Table,
    /// The node's local addresses (`fib … type local`), loopback included.
    local: BTreeSet<IpAddr>,
    /// Clients each affinity set has remembered.
    affinity: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The endpoint maps: a frontend's pool of each role.
    endpoints: BTreeMap<(Role, Frontend), &'a [Backend]>,
    hairpin: BTreeSet<IpAddr>,
    service_ips: BTreeMap<Destination, String>,
    node_ports: BTreeMap<NodePort, String>,
    no_endpoint_services: BTreeMap<Destination, Refusal>,
    no_endpoint_node_ports: BTreeMap<NodePort, Refusal>,
    firewall_ips: BTreeMap<Destination, String>,
    cluster_ips: BTreeSet<IpAddr>,
    chains: BTreeMap<&'a str, &'a [Rule]>,
}

/// A packet part-way through the nat chains.
#[derive(Clone, Debug)]
struct Flow {
    dnat: Option<(IpAddr, u16)>,
    marked: bool,
    remembered: Option<String>,
    dropped: bool,
}

impl<'a> Tracer<'a> {
    /// `local_addresses` are the node's own addresses (loopback is added).
    pub fn new(table: &'a Table, local_addresses: &[IpAddr]) -> Tracer<'a> {
        let mut local: BTreeSet<IpAddr> = local_addresses.iter().copied().collect();
        local.insert("127.0.0.1".parse().expect("literal"));
        local.insert("::1".parse().expect("literal"));
        // First port by name wins a frontend, as in the merged maps.
        let mut endpoints = BTreeMap::new();
        for rules in table.services.values() {
            for (frontend, roles) in &rules.frontends {
                for role in roles {
                    if let Some(pool) = rules.pools.get(role) {
                        endpoints
                            .entry((*role, *frontend))
                            .or_insert(pool.as_slice());
                    }
                }
            }
        }
        Tracer {
            table,
            local,
            affinity: BTreeMap::new(),
            endpoints,
            hairpin: table
                .services
                .values()
                .flat_map(|s| s.hairpin.iter().copied())
                .collect(),
            service_ips: table.merged(|s| &s.service_ips),
            node_ports: table.merged(|s| &s.node_ports),
            no_endpoint_services: table.merged(|s| &s.no_endpoint_services),
            no_endpoint_node_ports: table.merged(|s| &s.no_endpoint_node_ports),
            firewall_ips: table.merged(|s| &s.firewall_ips),
            cluster_ips: table
                .services
                .values()
                .flat_map(|s| s.cluster_ips.iter().copied())
                .collect(),
            chains: table
                .chains()
                .map(|(name, rules)| (name.as_str(), rules.as_slice()))
                .collect(),
        }
    }

    /// Records that `client` was sent through an endpoint chain that remembers it in
    /// `set`, as the kernel's `update @set` does.
    pub fn remember(&mut self, set: &str, client: IpAddr) {
        self.affinity
            .entry(set.to_string())
            .or_default()
            .insert(client);
    }

    /// Every fate the packet can meet.
    pub fn trace(&self, p: &Packet) -> BTreeSet<Fate> {
        assert_eq!(
            IpFamily::of(p.src),
            self.table.family,
            "a packet is traced through its own family's table"
        );
        let dest = Destination {
            addr: p.dst,
            protocol: p.protocol,
            port: p.port,
        };
        // Filter before NAT: the firewall from both origins; no-endpoint services from
        // local processes (in filter-output, which runs before nat-output).
        if let Some(firewall) = self.firewall_ips.get(&dest)
            && let Some(refusal) = self.run_filter_chain(firewall, p)
        {
            return [refusal].into();
        }
        if p.origin == Origin::LocalProcess
            && let Some(refusal) = self.no_endpoint_services.get(&dest)
        {
            return [fate_of(*refusal)].into();
        }

        let flows = self.services(p, dest);
        flows
            .into_iter()
            .map(|flow| self.after_nat(p, flow))
            .collect()
    }

    /// The filter chains after NAT, then masquerading.
    fn after_nat(&self, p: &Packet, flow: Flow) -> Fate {
        if flow.dropped {
            return Fate::Dropped;
        }
        let (daddr, dport) = flow.dnat.unwrap_or((p.dst, p.port));
        let dest = Destination {
            addr: daddr,
            protocol: p.protocol,
            port: dport,
        };
        let input = |dest: &Destination| {
            // filter-input.
            if self.table.node_port_addresses.contains(&dest.addr)
                && let Some(r) = self.no_endpoint_node_ports.get(&NodePort {
                    protocol: dest.protocol,
                    port: dest.port,
                })
            {
                return Some(fate_of(*r));
            }
            self.no_endpoint_services.get(dest).map(|r| fate_of(*r))
        };
        match p.origin {
            Origin::Network if self.local.contains(&daddr) => {
                if let Some(fate) = input(&dest) {
                    return fate;
                }
            }
            Origin::Network => {
                // filter-forward.
                if let Some(r) = self.no_endpoint_services.get(&dest) {
                    return fate_of(*r);
                }
                if self.cluster_ips.contains(&daddr) {
                    return Fate::Rejected;
                }
            }
            Origin::LocalProcess => {
                // filter-output-post-dnat.
                if self.cluster_ips.contains(&daddr) {
                    return Fate::Rejected;
                }
                // A packet to one of the node's own addresses loops back through the
                // input hook.
                if self.local.contains(&daddr)
                    && let Some(fate) = input(&dest)
                {
                    return fate;
                }
            }
        }
        match flow.dnat {
            Some((addr, port)) => Fate::Endpoint {
                addr,
                port,
                // `masquerading`: marked, or an endpoint reaching itself.
                masqueraded: flow.marked || (p.src == addr && self.hairpin.contains(&addr)),
                remembered: flow.remembered,
            },
            None => Fate::Untouched,
        }
    }

    /// The `services` chain: the service-ips map, then NodePorts on the node's addresses.
    fn services(&self, p: &Packet, dest: Destination) -> Vec<Flow> {
        let start = Flow {
            dnat: None,
            marked: false,
            remembered: None,
            dropped: false,
        };
        if let Some(chain) = self.service_ips.get(&dest) {
            return self.run_nat_chain(chain, p, start, 0);
        }
        if self.table.node_port_addresses.contains(&p.dst)
            && let Some(chain) = self.node_ports.get(&NodePort {
                protocol: p.protocol,
                port: p.port,
            })
        {
            return self.run_nat_chain(chain, p, start, 0);
        }
        vec![start]
    }

    /// Runs a nat chain reached by `goto`: each rule in turn; a goto continues in the
    /// target and does not come back; DNAT ends the chain; falling off the end leaves the
    /// packet as it is.
    fn run_nat_chain(&self, name: &str, p: &Packet, mut flow: Flow, depth: usize) -> Vec<Flow> {
        assert!(depth < 16, "chain loop at {name}");
        let rules = self
            .chains
            .get(name)
            .unwrap_or_else(|| panic!("a rule goes to chain {name}, which the plan lacks"));
        for rule in *rules {
            match rule {
                Rule::MasqueradeFromOutsideCluster { addr, port } => {
                    if p.dst == *addr && p.port == *port && !self.is_in_cluster(p.src) {
                        flow.marked = true;
                    }
                }
                Rule::Masquerade => flow.marked = true,
                Rule::MasqueradeUnlessFromCluster => {
                    if !self.is_in_cluster(p.src) {
                        flow.marked = true;
                    }
                }
                Rule::Pick {
                    when,
                    masquerade,
                    role,
                    frontend,
                    count,
                } => {
                    let applies = match when {
                        Condition::Always => true,
                        Condition::FromCluster => self.is_in_cluster(p.src),
                        Condition::LocalSource => self.local.contains(&p.src),
                    };
                    if applies {
                        return self.pick(p, flow, *masquerade, *role, *frontend, *count);
                    }
                }
                Rule::MasqueradeIfLocalSource => {
                    if self.local.contains(&p.src) {
                        flow.marked = true;
                    }
                }
                Rule::GotoIfFromCluster(chain) => {
                    if self.is_in_cluster(p.src) {
                        return self.run_nat_chain(chain, p, flow, depth + 1);
                    }
                }
                Rule::GotoIfLocalSource(chain) => {
                    if self.local.contains(&p.src) {
                        return self.run_nat_chain(chain, p, flow, depth + 1);
                    }
                }
                Rule::GotoIfAffine { set, chain } => {
                    if self.affinity.get(set).is_some_and(|c| c.contains(&p.src)) {
                        return self.run_nat_chain(chain, p, flow, depth + 1);
                    }
                }
                Rule::Balance(chains) => {
                    return chains
                        .iter()
                        .flat_map(|c| self.run_nat_chain(c, p, flow.clone(), depth + 1))
                        .collect();
                }
                Rule::RememberClient { set } => flow.remembered = Some(set.clone()),
                Rule::Dnat { addr, port } => {
                    flow.dnat = Some((*addr, *port));
                    return vec![flow];
                }
                Rule::Goto(chain) => return self.run_nat_chain(chain, p, flow, depth + 1),
                Rule::Drop => {
                    flow.dropped = true;
                    return vec![flow];
                }
                Rule::DropUnlessSourceIn(_) => {
                    panic!("firewall rule in nat chain {name}")
                }
            }
        }
        vec![flow]
    }

    /// A pick rule: `numgen random mod COUNT` over the frontend's pool of `role`.
    fn pick(
        &self,
        p: &Packet,
        flow: Flow,
        masquerade: bool,
        role: Role,
        kind: FrontendKind,
        count: u32,
    ) -> Vec<Flow> {
        let frontend = match kind {
            FrontendKind::Address => Frontend::Address(Destination {
                addr: p.dst,
                protocol: p.protocol,
                port: p.port,
            }),
            FrontendKind::NodePort => Frontend::NodePort(NodePort {
                protocol: p.protocol,
                port: p.port,
            }),
        };
        let pool = self
            .endpoints
            .get(&(role, frontend))
            .copied()
            .unwrap_or(&[]);
        assert_eq!(
            pool.len(),
            count as usize,
            "the shape picks among {count} endpoints, the pool of {frontend:?} has {}",
            pool.len()
        );
        pool.iter()
            .map(|b| Flow {
                dnat: Some((b.addr, b.port)),
                marked: flow.marked || masquerade,
                ..flow.clone()
            })
            .collect()
    }

    /// Runs a firewall chain; `Some` when it ends the packet.
    fn run_filter_chain(&self, name: &str, p: &Packet) -> Option<Fate> {
        for rule in *self.chains.get(name)? {
            if let Rule::DropUnlessSourceIn(ranges) = rule
                && !ranges.iter().any(|r| r.contains(&p.src))
            {
                return Some(Fate::Dropped);
            }
        }
        None
    }

    fn is_in_cluster(&self, addr: IpAddr) -> bool {
        // No cluster CIDRs known: nothing counts as inside, so all is masqueraded.
        self.table.cluster_cidrs.iter().any(|n| n.contains(&addr))
    }
}

fn fate_of(refusal: Refusal) -> Fate {
    match refusal {
        Refusal::Reject => Fate::Rejected,
        Refusal::Drop => Fate::Dropped,
    }
}
