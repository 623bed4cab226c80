//! Faults injected into a lab node, the incidents Trellis exists for. Network faults are
//! nftables rules programmed over netlink by Trellis itself: forwarding and partition faults
//! in the node's namespace (table `inet trellis_fault`), loss on the node's links where they
//! meet the fabric's bridges (table `bridge trellis_loss_NODE` in the fabric namespace), so
//! that a lost packet vanishes silently as on a real link. `heal` removes both and restarts
//! a killed agent.
//!
//! `proxy-tamper` (seed 002) is different: it changes the agent's own service proxy rules
//! (table `ip trellis-proxy`) from outside, over netlink, as another program or a person
//! with `nft` would. There is nothing to heal: the agent's proxy trusts only the kernel,
//! finds the difference in its next audit and repairs it ([`wait_proxy_repaired`]).

use crate::processes;
use crate::state::{self, LabState};
use anyhow::bail;

pub use crate::incident::{Fault, FaultKind};

pub const FAULT_TABLE: &str = "trellis_fault";

pub async fn inject(lab: &str, node: &str, fault: Fault) -> anyhow::Result<()> {
    let mut state = LabState::load(lab)?;
    let spec = state.spec.node(node)?.clone();
    match fault.kind {
        FaultKind::Kill => {
            let Some(pid) = state
                .agent_pids
                .get(node)
                .copied()
                .filter(|p| processes::is_alive(*p))
            else {
                bail!("the agent of {node} is not running");
            };
            // Reaped if we are its parent (a test or the demo), so it does not linger.
            processes::kill_and_reap(pid);
            // Not our child: wait until it is really gone, so a `heal` right after it
            // finds it dead and starts a new one.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while processes::is_alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // Loss and cut paths belong to the links, not the node: they are made on the
        // fabric's bridge ports, where a dropped frame is as silent to the sender as on a
        // real link (a drop in the node's own output path would return an error to the
        // sending socket instead).
        _ if fault.on_links() => {
            if let Some(peer) = &fault.peer {
                if peer == node {
                    bail!("invalid PEER {peer:?}: a path joins two different nodes");
                }
                state.spec.node(peer)?;
            }
            let mut link_faults: Vec<Fault> = state
                .faults
                .get(node)
                .into_iter()
                .flatten()
                .filter(|f| f.on_links())
                .cloned()
                .collect();
            link_faults.push(fault.clone());
            let fabric = crate::spec::fabric_netns(lab);
            rules::program_links(&fabric, node, &link_faults).await?
        }
        FaultKind::ProxyTamper => {
            proxy::tamper(&spec, None).await?;
        }
        FaultKind::PolicyTamper => {
            let addresses = state.spec.all_pods().map(|(_, p)| p.ip.addr()).collect();
            let netns = spec.netns.clone();
            tokio::task::spawn_blocking(move || policy::tamper(&netns, addresses)).await??;
        }
        _ => rules::program(&spec.netns, &fault).await?,
    }
    state
        .faults
        .entry(node.to_string())
        .or_default()
        .push(fault);
    state.save()
}

/// `policy-tamper` on `node`, saying what was changed.
pub async fn tamper_policy(lab: &str, node: &str) -> anyhow::Result<String> {
    let mut state = LabState::load(lab)?;
    let netns = state.spec.node(node)?.netns.clone();
    let addresses = state.spec.all_pods().map(|(_, p)| p.ip.addr()).collect();
    let said = tokio::task::spawn_blocking(move || policy::tamper(&netns, addresses)).await??;
    state
        .faults
        .entry(node.to_string())
        .or_default()
        .push(Fault::new(FaultKind::PolicyTamper, false, None)?);
    state.save()?;
    Ok(said)
}

/// `proxy-tamper` on `node`, saying what was changed. `dead` is the address the
/// tampered element now leads to; `None`: an address of the node's pod network no pod has.
pub async fn tamper_proxy(
    lab: &str,
    node: &str,
    dead: Option<std::net::Ipv4Addr>,
) -> anyhow::Result<Tampered> {
    let mut state = LabState::load(lab)?;
    let spec = state.spec.node(node)?.clone();
    let tampered = proxy::tamper(&spec, dead).await?;
    state
        .faults
        .entry(node.to_string())
        .or_default()
        .push(Fault::new(FaultKind::ProxyTamper, false, None)?);
    state.save()?;
    Ok(tampered)
}

/// Whether `node`'s proxy rules are whole again after a `proxy-tamper`: the foreign chain
/// is gone and every service and shape chain has its rules.
pub async fn proxy_repaired(lab: &str, node: &str) -> anyhow::Result<bool> {
    let state = LabState::load(lab)?;
    let netns = state.spec.node(node)?.netns.clone();
    tokio::task::spawn_blocking(move || proxy::repaired(&netns)).await?
}

/// Waits until [`proxy_repaired`]; how long that took, or `None` after `timeout`.
pub async fn wait_proxy_repaired(
    lab: &str,
    node: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<Option<std::time::Duration>> {
    let started = std::time::Instant::now();
    loop {
        if proxy_repaired(lab, node).await? {
            return Ok(Some(started.elapsed()));
        }
        if started.elapsed() > timeout {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub async fn heal(lab: &str, node: &str) -> anyhow::Result<Vec<Fault>> {
    let mut state = LabState::load(lab)?;
    let spec = state.spec.node(node)?.clone();
    rules::clear(&spec.netns).await?;
    rules::clear_links(&crate::spec::fabric_netns(lab), node).await?;
    let alive = state
        .agent_pids
        .get(node)
        .is_some_and(|p| processes::is_alive(*p));
    if !alive {
        let pid = processes::spawn_in(
            &spec.netns,
            &processes::agent_args(&state.spec, &spec),
            &state::log_path(lab, node),
        )?;
        state.agent_pids.insert(node.to_string(), pid);
    }
    let healed = state.faults.remove(node).unwrap_or_default();
    state.save()?;
    Ok(healed)
}

/// Removes the fault tables a node's links carry in the fabric (a cold boot forgets the
/// node's faults: its own namespace, and the tables in it, are made anew).
pub(crate) async fn clear_link_faults(lab: &str, node: &str) -> anyhow::Result<()> {
    rules::clear_links(&crate::spec::fabric_netns(lab), node).await
}

mod rules {
    use super::{FAULT_TABLE, Fault, FaultKind};
    use trellis_dataplane::nftables::{
        BaseChain, Batch, ChainKind, CtState, Family, Hook, Nft, Policy, dsl,
    };

    /// The node's links to the lab's networks.
    const LINKS: [&str; 2] = ["int0", "pub0"];

    fn chain(b: &mut Batch, name: &str, hook: Hook, priority: i32) {
        let base = BaseChain {
            hook,
            priority,
            kind: ChainKind::Filter,
            policy: Policy::Accept,
        };
        b.add_chain(Family::Inet, FAULT_TABLE, name, Some(base));
    }

    /// The rules of one fault, added to the node's fault table (created if missing).
    pub fn batch(fault: &Fault, table_exists: bool) -> Batch {
        let mut b = Batch::new();
        if !table_exists {
            b.add_table(Family::Inet, FAULT_TABLE);
        }
        let comment = fault.to_string();
        let rule = |b: &mut Batch, chain: &str, exprs: Vec<Vec<_>>| {
            b.add_rule(
                Family::Inet,
                FAULT_TABLE,
                chain,
                [exprs, vec![dsl::counter(), dsl::drop()]].concat().concat(),
                Some(&comment),
            );
        };
        match fault.kind {
            FaultKind::BlackholeForward => {
                // Forwarded traffic only: the node itself still answers pings and
                // WireGuard handshakes, which is what made seed 000 invisible.
                chain(&mut b, "forward", Hook::Forward, -10);
                if fault.new_flows_only {
                    rule(&mut b, "forward", vec![dsl::ct_state(CtState::NEW)]);
                } else {
                    rule(&mut b, "forward", vec![]);
                }
            }
            FaultKind::Partition => {
                for (name, hook) in [
                    ("input", Hook::Input),
                    ("forward", Hook::Forward),
                    ("output", Hook::Output),
                ] {
                    chain(&mut b, &format!("partition_{name}"), hook, -10);
                    for link in LINKS {
                        if hook != Hook::Output {
                            rule(
                                &mut b,
                                &format!("partition_{name}"),
                                vec![dsl::iifname(link)],
                            );
                        }
                        if hook != Hook::Input {
                            rule(
                                &mut b,
                                &format!("partition_{name}"),
                                vec![dsl::oifname(link)],
                            );
                        }
                    }
                }
            }
            FaultKind::Loss | FaultKind::CutPath => {} // on the fabric's ports: program_links
            FaultKind::Kill | FaultKind::Freeze | FaultKind::Throttle => {}
            FaultKind::ProxyTamper | FaultKind::PolicyTamper => {} // the agent's own tables
        }
        b
    }

    pub async fn program(netns: &str, fault: &Fault) -> anyhow::Result<()> {
        let (netns, fault) = (netns.to_string(), fault.clone());
        tokio::task::spawn_blocking(move || {
            let nft = Nft::connect_in(&netns)?;
            let exists = nft.table_exists(Family::Inet, FAULT_TABLE)?;
            nft.apply(&batch(&fault, exists))
        })
        .await?
        .map_err(anyhow::Error::from)
    }

    fn links_table(node: &str) -> String {
        format!("trellis_links_{node}")
    }

    /// The node's link faults as one bridge table in the fabric namespace, replaced whole:
    /// random loss on both directions of its internal and public ports, and for each cut
    /// path every frame between its public port and the peer's.
    pub async fn program_links(fabric: &str, node: &str, faults: &[Fault]) -> anyhow::Result<()> {
        let (fabric, node, faults) = (fabric.to_string(), node.to_string(), faults.to_vec());
        tokio::task::spawn_blocking(move || {
            let nft = Nft::connect_in(&fabric)?;
            let table = links_table(&node);
            let mut b = Batch::new();
            if nft.table_exists(Family::Bridge, &table)? {
                b.delete_table(Family::Bridge, &table);
            }
            b.add_table(Family::Bridge, &table);
            let base = BaseChain {
                hook: Hook::Forward,
                priority: 0,
                kind: ChainKind::Filter,
                policy: Policy::Accept,
            };
            b.add_chain(Family::Bridge, &table, "forward", Some(base));
            for fault in &faults {
                let comment = format!("{fault} on the links of {node}");
                let mut matches: Vec<Vec<_>> = Vec::new();
                match (fault.kind, &fault.peer) {
                    (FaultKind::Loss, _) => {
                        let percent = u32::from(fault.percent.unwrap_or(0));
                        for port in [format!("i-{node}"), format!("p-{node}")] {
                            for side in [dsl::iifname(&port), dsl::oifname(&port)] {
                                matches
                                    .push([side, dsl::numgen_random_below(100, percent)].concat());
                            }
                        }
                    }
                    (FaultKind::CutPath, Some(peer)) => {
                        let (mine, theirs) = (format!("p-{node}"), format!("p-{peer}"));
                        matches.push([dsl::iifname(&mine), dsl::oifname(&theirs)].concat());
                        matches.push([dsl::iifname(&theirs), dsl::oifname(&mine)].concat());
                    }
                    _ => {}
                }
                for m in matches {
                    let exprs = [m, dsl::counter(), dsl::drop()].concat();
                    b.add_rule(Family::Bridge, &table, "forward", exprs, Some(&comment));
                }
            }
            nft.apply(&b)
        })
        .await?
        .map_err(anyhow::Error::from)
    }

    pub async fn clear_links(fabric: &str, node: &str) -> anyhow::Result<()> {
        let (fabric, table) = (fabric.to_string(), links_table(node));
        tokio::task::spawn_blocking(move || {
            let nft = Nft::connect_in(&fabric)?;
            if nft.table_exists(Family::Bridge, &table)? {
                let mut b = Batch::new();
                b.delete_table(Family::Bridge, &table);
                nft.apply(&b)?;
            }
            anyhow::Ok(())
        })
        .await?
    }

    pub async fn clear(netns: &str) -> anyhow::Result<()> {
        let netns = netns.to_string();
        tokio::task::spawn_blocking(move || {
            let nft = Nft::connect_in(&netns)?;
            if nft.table_exists(Family::Inet, FAULT_TABLE)? {
                let mut b = Batch::new();
                b.delete_table(Family::Inet, FAULT_TABLE);
                nft.apply(&b)?;
            }
            anyhow::Ok(())
        })
        .await?
    }
}

/// What `proxy-tamper` did to a node's proxy rules.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tampered {
    /// The service port whose rules were changed, `ADDR . PROTO . PORT`.
    pub destination: String,
    pub flushed_chain: String,
    /// `SET: KEY` of every element deleted.
    pub deleted: Vec<String>,
    /// The chain `service-ips` now sends the destination to, and where it DNATs.
    pub chain: String,
    pub dead: std::net::SocketAddrV4,
}

impl std::fmt::Display for Tampered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "flushed chain {}; deleted {}; added service-ips element {} : goto {} (dnat to {}, a dead pod's address)",
            self.flushed_chain,
            self.deleted.join(", "),
            self.destination,
            self.chain,
            self.dead
        )
    }
}

/// `policy-tamper`: changes the agent's table `ip trellis-policy` from outside, over netlink.
mod policy {
    use anyhow::bail;
    use std::net::Ipv4Addr;
    use trellis_agent::policy::render::TABLE;
    use trellis_dataplane::nftables::{Batch, Family, Nft, SetElem};

    /// Removes the first element of the ingress map and adds, to the first selector set,
    /// the first of `addresses` (the lab's pods) it does not hold.
    pub fn tamper(netns: &str, addresses: Vec<Ipv4Addr>) -> anyhow::Result<String> {
        let nft = Nft::connect_in(netns)?;
        if !nft.table_exists(Family::Ip, TABLE)? {
            bail!("no table ip {TABLE}: is the agent running with network policy?");
        }
        let Some(isolated) = nft
            .elements(Family::Ip, TABLE, "ingress")?
            .into_iter()
            .next()
        else {
            bail!(
                "no pod is isolated for ingress here: apply a NetworkPolicy that selects one of its pods first"
            );
        };
        let mut sets: Vec<String> = (nft.sets(Family::Ip, TABLE)?.into_iter())
            .map(|s| s.name)
            .filter(|n| n.starts_with("peers-"))
            .collect();
        sets.sort();
        let mut b = Batch::new();
        b.delete_elements(Family::Ip, TABLE, "ingress", vec![isolated.key.clone()]);
        let mut said = vec![format!(
            "removed {}'s ingress check (a deny gone)",
            key_address(&isolated.key)
        )];
        if let Some(set) = sets.first() {
            let held: Vec<Vec<u8>> = (nft.elements(Family::Ip, TABLE, set)?.into_iter())
                .map(|e| e.key)
                .collect();
            if let Some(stale) = addresses
                .into_iter()
                .find(|a| !held.contains(&a.octets().to_vec()))
            {
                b.add_elements(
                    Family::Ip,
                    TABLE,
                    set,
                    vec![SetElem::key(stale.octets().to_vec())],
                );
                said.push(format!("added {stale} to {set} (a stale allow)"));
            }
        }
        nft.apply(&b)?;
        Ok(said.join("; "))
    }

    fn key_address(key: &[u8]) -> String {
        match key {
            [a, b, c, d, ..] => Ipv4Addr::new(*a, *b, *c, *d).to_string(),
            _ => format!("{key:?}"),
        }
    }
}

/// `proxy-tamper`: changes the agent's table `ip trellis-proxy` from outside, over netlink.
mod proxy {
    use super::Tampered;
    use crate::spec::NodeSpec;
    use anyhow::{Context, bail};
    use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
    use trellis_agent::proxy::render::TABLE;
    use trellis_dataplane::nftables::{ElemValue, Family, Nft, SetElem, Verdict, dsl};

    const SERVICE_IPS: &str = "service-ips";
    const CLUSTER_ENDPOINTS: &str = "cluster-endpoints";
    /// The foreign chain the tampered element leads to.
    pub const CHAIN: &str = "tamper-dead-pod";

    /// `daddr . l4proto . dport` of an IPv4 `service-ips` key (each field padded to 4
    /// bytes).
    fn destination(key: &[u8]) -> Option<(Ipv4Addr, u8, u16)> {
        if key.len() < 12 {
            return None;
        }
        let addr = Ipv4Addr::new(key[0], key[1], key[2], key[3]);
        Some((addr, key[4], u16::from_be_bytes([key[8], key[9]])))
    }

    fn goto_chain(value: &Option<ElemValue>) -> Option<&str> {
        match value {
            Some(ElemValue::Verdict(Verdict::Goto(c) | Verdict::Jump(c))) => Some(c),
            _ => None,
        }
    }

    /// An address in the node's pod network that no pod has.
    fn unused_pod_address(node: &NodeSpec) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(node.pod_cidr.network()) + 250)
    }

    pub async fn tamper(node: &NodeSpec, dead: Option<Ipv4Addr>) -> anyhow::Result<Tampered> {
        let dead = dead.unwrap_or_else(|| unused_pod_address(node));
        let (netns, name) = (node.netns.clone(), node.name.clone());
        tokio::task::spawn_blocking(move || tamper_in(&netns, &name, dead)).await?
    }

    fn tamper_in(netns: &str, node: &str, dead: Ipv4Addr) -> anyhow::Result<Tampered> {
        let nft = Nft::connect_in(netns)?;
        if !nft.table_exists(Family::Ip, TABLE)? {
            bail!("{node} has no table ip {TABLE}: is its agent running with the service proxy?");
        }
        let mut services: Vec<(Vec<u8>, String)> = nft
            .elements(Family::Ip, TABLE, SERVICE_IPS)?
            .into_iter()
            .filter_map(|e| {
                let chain = goto_chain(&e.value)?.to_string();
                (chain.starts_with("shape-") || chain.starts_with("service-"))
                    .then_some((e.key, chain))
            })
            .collect();
        services.sort();
        let Some((key, chain)) = services.into_iter().next() else {
            bail!(
                "{node}'s proxy has no service with endpoints to tamper with: add one first (`trellis lab service add`)"
            );
        };
        let (addr, proto, port) = destination(&key).with_context(|| {
            format!(
                "an element of {SERVICE_IPS} with a key of {} bytes",
                key.len()
            )
        })?;
        let chains = nft.chains(Family::Ip, TABLE)?;
        // The service's endpoints (`daddr . l4proto . dport . index` → `addr . port`):
        // deleted, and their port is the pods' port.
        let endpoints: Vec<(Vec<u8>, Option<ElemValue>)> = nft
            .elements(Family::Ip, TABLE, CLUSTER_ENDPOINTS)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.key.starts_with(&key))
            .map(|e| (e.key, e.value))
            .collect();
        let target = endpoints
            .iter()
            .find_map(|(_, v)| match v {
                Some(ElemValue::Data(d)) if d.len() >= 6 => Some(u16::from_be_bytes([d[4], d[5]])),
                _ => None,
            })
            .unwrap_or(crate::pods::ECHO_PORT);
        let protocol = match proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            132 => "sctp".to_string(),
            other => other.to_string(),
        };
        let destination = format!("{addr} . {protocol} . {port}");
        let mut deleted = vec![format!("{SERVICE_IPS}: {destination}")];
        if !endpoints.is_empty() {
            deleted.push(format!(
                "{CLUSTER_ENDPOINTS}: {} endpoint(s) of {destination}",
                endpoints.len()
            ));
        }
        let mut b = trellis_dataplane::nftables::Batch::new();
        b.flush_chain(Family::Ip, TABLE, &chain);
        b.delete_elements(Family::Ip, TABLE, SERVICE_IPS, vec![key.clone()]);
        if !endpoints.is_empty() {
            b.delete_elements(
                Family::Ip,
                TABLE,
                CLUSTER_ENDPOINTS,
                endpoints.into_iter().map(|(k, _)| k),
            );
        }
        if chains.iter().any(|c| c.name == CHAIN) {
            b.flush_chain(Family::Ip, TABLE, CHAIN);
        } else {
            b.add_chain(Family::Ip, TABLE, CHAIN, None);
        }
        b.add_rule(
            Family::Ip,
            TABLE,
            CHAIN,
            [
                dsl::l4proto(proto),
                dsl::counter(),
                dsl::dnat_ip_port(IpAddr::V4(dead), target),
            ]
            .concat(),
            Some("trellis lab fault proxy-tamper"),
        );
        b.add_elements(
            Family::Ip,
            TABLE,
            SERVICE_IPS,
            vec![SetElem::verdict(key, Verdict::Goto(CHAIN.into()))],
        );
        nft.apply(&b)
            .with_context(|| format!("tampering with {node}'s proxy rules"))?;
        Ok(Tampered {
            destination,
            flushed_chain: chain,
            deleted,
            chain: CHAIN.into(),
            dead: SocketAddrV4::new(dead, target),
        })
    }

    /// No foreign chain left, and no service or shape chain without rules.
    pub fn repaired(netns: &str) -> anyhow::Result<bool> {
        let nft = Nft::connect_in(netns)?;
        if !nft.table_exists(Family::Ip, TABLE)? {
            return Ok(false);
        }
        let chains = nft.chains(Family::Ip, TABLE)?;
        if chains.iter().any(|c| c.name == CHAIN) {
            return Ok(false);
        }
        let rules = nft.dump_rules(Family::Ip, TABLE, None)?;
        Ok(chains
            .iter()
            .filter(|c| c.name.starts_with("service-") || c.name.starts_with("shape-"))
            .all(|c| rules.iter().any(|r| r.chain == c.name)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use trellis_dataplane::nftables::{Datum, concat};

        #[test]
        fn service_keys_decode() {
            let key = concat(&[
                Datum::Ipv4(Ipv4Addr::new(10, 96, 0, 10)),
                Datum::Proto(6),
                Datum::Port(80),
            ]);
            assert_eq!(
                destination(&key),
                Some((Ipv4Addr::new(10, 96, 0, 10), 6, 80))
            );
            assert_eq!(destination(&key[..4]), None);
        }
    }
}
