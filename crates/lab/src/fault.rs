//! Faults injected into a lab node, the incidents Trellis exists for. Network faults are
//! nftables rules programmed over netlink by Trellis itself: forwarding and partition faults
//! in the node's namespace (table `inet trellis_fault`), loss on the node's links where they
//! meet the fabric's bridges (table `bridge trellis_loss_NODE` in the fabric namespace), so
//! that a lost packet vanishes silently as on a real link. `heal` removes both and restarts
//! a killed agent.

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
        _ => rules::program(&spec.netns, &fault).await?,
    }
    state
        .faults
        .entry(node.to_string())
        .or_default()
        .push(fault);
    state.save()
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
