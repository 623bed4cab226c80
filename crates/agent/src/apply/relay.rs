//! The gateway side of forwarding probes: probes that arrive through the tunnel at this
//! node's probe address are relayed by the kernel to a node behind it (DNAT, chosen by the
//! ICMP id range) and the answers come back through here (SNAT to the internal address).
//! So a probe crosses this node's prerouting, forward and postrouting paths both ways, as a
//! new flow each time, exactly like user traffic. Programmed as one nftables table that is
//! replaced atomically whenever it differs from the plan.

use std::net::IpAddr;
use trellis_dataplane::nftables::{
    BaseChain, Batch, ChainKind, Family, Hook, Policy, Ruleset, dsl,
};
use trellis_plan::RelayTarget;

pub const TABLE: &str = "trellis";
const PRE: &str = "relay_pre";
const POST: &str = "relay_post";
/// Conntrack mark of relayed probes ("tr"), so only they are source-NATed.
const RELAY_MARK: u32 = 0x7472;
const ICMP_ECHO_REQUEST: u8 = 8;

/// What the relay table must hold, as (chain, comment) pairs: the comments name every
/// rule's parameters, so comparing them with the kernel's tells whether anything drifted.
fn desired(
    interface: &str,
    probe_ip: IpAddr,
    internal_ip: IpAddr,
    relay: &[RelayTarget],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = relay
        .iter()
        .map(|r| {
            (
                PRE.to_string(),
                format!(
                    "relay {probe_ip} ids {}-{} from {interface} to {} ({})",
                    r.ids.0, r.ids.1, r.to, r.node
                ),
            )
        })
        .collect();
    if !relay.is_empty() {
        out.push((
            POST.to_string(),
            format!("answers of relayed probes leave as {internal_ip}"),
        ));
    }
    out
}

fn batch(
    interface: &str,
    probe_ip: IpAddr,
    internal_ip: IpAddr,
    relay: &[RelayTarget],
    exists: bool,
) -> Batch {
    let mut b = Batch::new();
    if exists {
        b.delete_table(Family::Inet, TABLE);
    }
    if relay.is_empty() {
        return b;
    }
    b.add_table(Family::Inet, TABLE);
    let nat = |hook, priority| BaseChain {
        hook,
        priority,
        kind: ChainKind::Nat,
        policy: Policy::Accept,
    };
    b.add_chain(Family::Inet, TABLE, PRE, Some(nat(Hook::Prerouting, -100)));
    b.add_chain(Family::Inet, TABLE, POST, Some(nat(Hook::Postrouting, 100)));
    let wanted = desired(interface, probe_ip, internal_ip, relay);
    for (r, (_, comment)) in relay.iter().zip(&wanted) {
        let exprs = [
            dsl::iifname(interface),
            dsl::ip_daddr(probe_ip),
            dsl::icmp_id_range(ICMP_ECHO_REQUEST, r.ids.0, r.ids.1),
            dsl::set_ct_mark(RELAY_MARK),
            dsl::dnat_ip(r.to),
        ]
        .concat();
        b.add_rule(Family::Inet, TABLE, PRE, exprs, Some(comment));
    }
    let (_, comment) = wanted
        .last()
        .expect("a non-empty relay has a postrouting rule");
    b.add_rule(
        Family::Inet,
        TABLE,
        POST,
        [dsl::ct_mark(RELAY_MARK), dsl::snat_ip(internal_ip)].concat(),
        Some(comment),
    );
    b
}

/// The batch that brings the table from `current` (its rules as (chain, comment) pairs, or
/// `None` when there is no table) to the plan; `None` when nothing differs. The table is
/// replaced whole, atomically, whenever anything differs.
pub fn plan(
    current: Option<&[(String, String)]>,
    interface: &str,
    probe_ip: Option<IpAddr>,
    internal_ip: IpAddr,
    relay: &[RelayTarget],
) -> Option<Batch> {
    let relay = match probe_ip {
        Some(_) => relay,
        None => &[],
    };
    let probe_ip = probe_ip.unwrap_or(internal_ip);
    let wanted = desired(interface, probe_ip, internal_ip, relay);
    match current {
        Some(have) if have == wanted.as_slice() => None,
        None if wanted.is_empty() => None,
        _ => Some(batch(
            interface,
            probe_ip,
            internal_ip,
            relay,
            current.is_some(),
        )),
    }
}

/// Reads the table back, and applies [`plan`]'s batch if anything differs; returns whether
/// anything was changed. Blocking (netlink): call it off the async threads.
pub fn reconcile(
    ruleset: &dyn Ruleset,
    interface: &str,
    probe_ip: Option<IpAddr>,
    internal_ip: IpAddr,
    relay: &[RelayTarget],
) -> trellis_dataplane::Result<bool> {
    let current = if ruleset.table_exists(Family::Inet, TABLE)? {
        let mut have = Vec::new();
        for chain in [PRE, POST] {
            let rules = ruleset
                .rules(Family::Inet, TABLE, chain)
                .unwrap_or_default();
            have.extend(
                rules
                    .into_iter()
                    .map(|r| (chain.to_string(), r.comment.unwrap_or_default())),
            );
        }
        Some(have)
    } else {
        None
    };
    match plan(current.as_deref(), interface, probe_ip, internal_ip, relay) {
        None => Ok(false),
        Some(batch) => {
            ruleset.apply(&batch)?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_dataplane::fake::FakeRuleset;

    fn targets() -> Vec<RelayTarget> {
        vec![
            RelayTarget {
                node: "a3".into(),
                to: "172.20.0.12".parse().unwrap(),
                ids: (0, 16383),
            },
            RelayTarget {
                node: "a2".into(),
                to: "172.20.0.11".parse().unwrap(),
                ids: (16384, 32767),
            },
        ]
    }

    #[test]
    fn the_table_is_written_when_it_differs_and_left_alone_when_not() {
        let ruleset = FakeRuleset::default();
        let (probe, internal) = (
            Some("100.65.0.1".parse().unwrap()),
            "172.20.0.10".parse().unwrap(),
        );
        assert!(reconcile(&ruleset, "wg0", probe, internal, &targets()).unwrap());
        assert_eq!(
            ruleset.comments(Family::Inet, TABLE, PRE),
            [
                "relay 100.65.0.1 ids 0-16383 from wg0 to 172.20.0.12 (a3)",
                "relay 100.65.0.1 ids 16384-32767 from wg0 to 172.20.0.11 (a2)"
            ]
        );
        assert_eq!(
            ruleset.comments(Family::Inet, TABLE, POST),
            ["answers of relayed probes leave as 172.20.0.10"]
        );
        assert!(!reconcile(&ruleset, "wg0", probe, internal, &targets()).unwrap());
        assert_eq!(
            ruleset.applied().len(),
            1,
            "an unchanged plan writes nothing"
        );

        // one target fewer: the table is replaced whole, in one batch
        assert!(reconcile(&ruleset, "wg0", probe, internal, &targets()[..1]).unwrap());
        assert_eq!(ruleset.comments(Family::Inet, TABLE, PRE).len(), 1);
        // not a gateway candidate any more (no probe address): the table goes
        assert!(reconcile(&ruleset, "wg0", None, internal, &targets()).unwrap());
        assert!(!ruleset.table_exists(Family::Inet, TABLE).unwrap());
        assert!(!reconcile(&ruleset, "wg0", None, internal, &[]).unwrap());
    }
}
