//! Faults injected into a lab node, the incidents Trellis exists for. Network faults are
//! nftables rules programmed over netlink by Trellis itself: forwarding and partition faults
//! in the node's namespace (table `inet trellis_fault`), loss on the node's links where they
//! meet the fabric's bridges (table `bridge trellis_loss_NODE` in the fabric namespace), so
//! that a lost packet vanishes silently as on a real link. `heal` removes both and restarts
//! a killed agent.

use crate::processes;
use crate::state::{self, LabState};
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
    /// The public path between the node and another node (give PEER) drops everything:
    /// their direct tunnel breaks while both still reach everyone else.
    CutPath,
    /// The store only (`lab fault store freeze`): etcd stopped with SIGSTOP.
    Freeze,
    /// The store only (`lab fault store throttle`): most store traffic dropped.
    Throttle,
}

/// One injected fault, as recorded in the lab state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub kind: FaultKind,
    #[serde(default)]
    pub new_flows_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl Fault {
    pub fn new(kind: FaultKind, new_flows_only: bool, percent: Option<u8>) -> anyhow::Result<Self> {
        if kind == FaultKind::CutPath {
            bail!("cut-path needs a PEER, e.g. `trellis lab fault a1 cut-path b1`");
        }
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
        if matches!(kind, FaultKind::Freeze | FaultKind::Throttle) {
            bail!(
                "{kind:?} is a fault of the store: `trellis lab fault store {}`",
                if kind == FaultKind::Freeze {
                    "freeze"
                } else {
                    "throttle"
                }
            );
        }
        if new_flows_only && kind != FaultKind::BlackholeForward {
            bail!("--new-flows-only applies to blackhole-forward only");
        }
        Ok(Self {
            kind,
            new_flows_only,
            percent,
            peer: None,
        })
    }

    /// The fault from the command line's words: `loss PERCENT`, `cut-path PEER`, or a kind
    /// that takes no value.
    pub fn parse(
        kind: FaultKind,
        new_flows_only: bool,
        value: Option<&str>,
    ) -> anyhow::Result<Self> {
        match (kind, value) {
            (FaultKind::CutPath, Some(peer)) => {
                if new_flows_only {
                    bail!("--new-flows-only applies to blackhole-forward only");
                }
                Ok(Self::cut_path(peer))
            }
            (FaultKind::Loss, Some(v)) => {
                let percent = v
                    .parse::<u8>()
                    .map_err(|_| anyhow::anyhow!("invalid PERCENT {v:?}: 1-100"))?;
                Self::new(kind, new_flows_only, Some(percent))
            }
            (FaultKind::Loss | FaultKind::CutPath, None) => Self::new(kind, new_flows_only, None),
            (_, Some(v)) => bail!("{kind:?} takes no value (got {v:?})"),
            (_, None) => Self::new(kind, new_flows_only, None),
        }
    }

    pub fn cut_path(peer: &str) -> Self {
        Self {
            kind: FaultKind::CutPath,
            new_flows_only: false,
            percent: None,
            peer: Some(peer.to_string()),
        }
    }

    /// Faults made on the fabric's bridge ports rather than in the node's namespace.
    fn on_links(&self) -> bool {
        matches!(self.kind, FaultKind::Loss | FaultKind::CutPath)
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
            FaultKind::CutPath => write!(f, "cut-path {}", self.peer.as_deref().unwrap_or("?")),
            FaultKind::Freeze => f.write_str("freeze"),
            FaultKind::Throttle => f.write_str("throttle"),
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
