//! The gateway side of forwarding probes: probes that arrive through the tunnel at this
//! node's probe address are relayed by the kernel to a node behind it (DNAT, chosen by the
//! ICMP id range) and the answers come back through here (SNAT to the internal address).
//! So a probe crosses this node's prerouting, forward and postrouting paths both ways, as a
//! new flow each time, exactly like user traffic. Programmed as one nftables table that is
//! replaced atomically whenever it differs from the plan.

use anyhow::Context;
use std::net::IpAddr;
use trellis_dataplane::nftables::{BaseChain, Batch, ChainKind, Family, Hook, Nft, Policy, dsl};
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

/// Bring the relay table to the plan; returns whether anything was changed.
pub fn reconcile(
    nft: &Nft,
    interface: &str,
    probe_ip: Option<IpAddr>,
    internal_ip: IpAddr,
    relay: &[RelayTarget],
) -> anyhow::Result<bool> {
    let relay = match probe_ip {
        Some(_) => relay,
        None => &[],
    };
    let probe_ip = probe_ip.unwrap_or(internal_ip);
    let exists = nft.table_exists(Family::Inet, TABLE)?;
    let wanted = desired(interface, probe_ip, internal_ip, relay);
    if exists {
        let mut have = Vec::new();
        for chain in [PRE, POST] {
            let rules = nft.rules(Family::Inet, TABLE, chain).unwrap_or_default();
            have.extend(
                rules
                    .into_iter()
                    .map(|r| (chain.to_string(), r.comment.unwrap_or_default())),
            );
        }
        if have == wanted {
            return Ok(false);
        }
    } else if wanted.is_empty() {
        return Ok(false);
    }
    nft.apply(&batch(interface, probe_ip, internal_ip, relay, exists))
        .context("programming the probe relay")?;
    Ok(true)
}
