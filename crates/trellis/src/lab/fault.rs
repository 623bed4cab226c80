//! Faults injected into a lab node, the incidents Trellis exists for. Network faults are
//! nftables rules programmed over netlink by Trellis itself: forwarding and partition faults
//! in the node's namespace (table `inet trellis_fault`), loss on the node's links where they
//! meet the fabric's bridges (table `bridge trellis_loss_NODE` in the fabric namespace), so
//! that a lost packet vanishes silently as on a real link. `heal` removes both and restarts
//! a killed agent.

use super::processes;
use super::state::{self, LabState};
use anyhow::bail;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt;

pub const FAULT_TABLE: &str = "trellis_fault";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The node stops forwarding; it still answers pings and WireGuard handshakes.
    BlackholeForward,
    /// The node's agent and WireGuard device stop, as in a crash.
    Kill,
    /// The node loses its public and internal networks.
    Partition,
    /// Random loss on the node's links (give PERCENT).
    Loss,
}

/// One injected fault, as recorded in the lab state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    #[serde(default)]
    pub new_flows_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
}

impl Fault {
    pub fn new(kind: FaultKind, new_flows_only: bool, percent: Option<u8>) -> anyhow::Result<Self> {
        match (kind, percent) {
            (FaultKind::Loss, None) => {
                bail!("loss needs a PERCENT, e.g. `trellis lab fault a1 loss 5`")
            }
            (FaultKind::Loss, Some(p)) if !(1..=100).contains(&p) => {
                bail!("invalid PERCENT {p}: 1-100")
            }
            (FaultKind::Loss, Some(_)) => {}
            (_, Some(p)) => bail!("{kind:?} takes no PERCENT (got {p})"),
            _ => {}
        }
        if new_flows_only && kind != FaultKind::BlackholeForward {
            bail!("--new-flows-only applies to blackhole-forward only");
        }
        Ok(Self {
            kind,
            new_flows_only,
            percent,
        })
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::BlackholeForward if self.new_flows_only => {
                f.write_str("blackhole-forward --new-flows-only")
            }
            FaultKind::BlackholeForward => f.write_str("blackhole-forward"),
            FaultKind::Kill => f.write_str("kill"),
            FaultKind::Partition => f.write_str("partition"),
            FaultKind::Loss => write!(f, "loss {}%", self.percent.unwrap_or(0)),
        }
    }
}

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
            // SAFETY: kill(2) on the pid the lab started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // Reap it if we are its parent (a test or the demo), so it does not linger.
            // SAFETY: waitpid on a pid that is either our child or not (then it returns -1).
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        // Loss belongs to the links, not the node: it is made on the fabric's bridge ports,
        // where a dropped frame is as silent to the sender as on a real lossy link (a drop in
        // the node's own output path would return an error to the sending socket instead).
        FaultKind::Loss => {
            let fabric = super::spec::fabric_netns(lab);
            rules::program_link_loss(&fabric, node, fault.percent.unwrap_or(0)).await?
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
    rules::clear_link_loss(&super::spec::fabric_netns(lab), node).await?;
    let alive = state
        .agent_pids
        .get(node)
        .is_some_and(|p| processes::is_alive(*p));
    if !alive {
        let pid = processes::spawn_in(
            &spec.netns,
            &processes::agent_args(lab, &spec, state.spec.agent_resync),
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
            FaultKind::Loss => {} // on the fabric's ports, see program_link_loss
            FaultKind::Kill => {}
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
    }

    fn loss_table(node: &str) -> String {
        format!("trellis_loss_{node}")
    }

    /// Random loss on both directions of the node's fabric ports (internal and public).
    pub async fn program_link_loss(fabric: &str, node: &str, percent: u8) -> anyhow::Result<()> {
        let (fabric, node) = (fabric.to_string(), node.to_string());
        tokio::task::spawn_blocking(move || {
            let nft = Nft::connect_in(&fabric)?;
            let table = loss_table(&node);
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
            let comment = format!("loss {percent}% on the links of {node}");
            for port in [format!("i-{node}"), format!("p-{node}")] {
                for side in [dsl::iifname(&port), dsl::oifname(&port)] {
                    let exprs = [
                        side,
                        dsl::numgen_random_below(100, u32::from(percent)),
                        dsl::counter(),
                        dsl::drop(),
                    ]
                    .concat();
                    b.add_rule(Family::Bridge, &table, "forward", exprs, Some(&comment));
                }
            }
            nft.apply(&b)
        })
        .await?
    }

    pub async fn clear_link_loss(fabric: &str, node: &str) -> anyhow::Result<()> {
        let (fabric, table) = (fabric.to_string(), loss_table(node));
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
