//! The incidents a lab can inject, as data: what the command line names and the lab's state
//! records. Injecting and healing them is [`crate::fault`]'s (nodes) and
//! [`crate::store`]'s (the store) job.

use anyhow::bail;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Share of the store's packets `store throttle` drops, in percent.
pub const THROTTLE_PERCENT: u32 = 90;

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
    /// The node's service proxy rules are changed from outside (seed 002): a service chain
    /// flushed, map elements deleted, and the service's `service-ips` element sent to a
    /// chain that DNATs to a dead pod's address. Nothing to heal: the proxy's audit
    /// repairs it.
    ProxyTamper,
    /// The node's network policy rules are changed from outside (seed 002's first half): an
    /// isolated pod's element removed from the ingress map (a deny gone) and another pod's
    /// address added to a selector's set (a stale allow, as for an address a new pod was
    /// given). Nothing to heal: the agent's audit repairs it.
    PolicyTamper,
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
    pub(crate) fn on_links(&self) -> bool {
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
            FaultKind::ProxyTamper => f.write_str("proxy-tamper"),
            FaultKind::PolicyTamper => f.write_str("policy-tamper"),
            FaultKind::Freeze => f.write_str("freeze"),
            FaultKind::Throttle => f.write_str("throttle"),
        }
    }
}

/// A fault of the store itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreFault {
    /// etcd stopped with SIGSTOP: connections stay open, nothing answers.
    Freeze,
    /// etcd killed; `heal store` starts it again on the same data.
    Kill,
    /// One node's traffic to and from the store is dropped.
    Partition(String),
    /// Most packets to and from the store are dropped, for every node.
    Throttle,
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreFault::Freeze => f.write_str("store freeze"),
            StoreFault::Kill => f.write_str("store kill"),
            StoreFault::Partition(node) => write!(f, "store partition {node}"),
            StoreFault::Throttle => write!(f, "store throttle ({THROTTLE_PERCENT}% dropped)"),
        }
    }
}

impl StoreFault {
    pub fn parse(kind: FaultKind, value: Option<&str>) -> anyhow::Result<Self> {
        Ok(match (kind, value) {
            (FaultKind::Freeze, None) => StoreFault::Freeze,
            (FaultKind::Kill, None) => StoreFault::Kill,
            (FaultKind::Throttle, None) => StoreFault::Throttle,
            (FaultKind::Partition, Some(node)) => StoreFault::Partition(node.to_string()),
            (FaultKind::Partition, None) => {
                bail!("store partition needs a NODE, e.g. `trellis lab fault store partition a1`")
            }
            (k, _) => bail!(
                "the store takes freeze, kill, partition NODE or throttle (got {k:?}{})",
                value.map(|v| format!(" {v}")).unwrap_or_default()
            ),
        })
    }
}
