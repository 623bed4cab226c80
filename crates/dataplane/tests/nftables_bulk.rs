//! How fast a service proxy's whole ruleset goes in: 10,000 services of 10
//! endpoints each in kube-proxy's shape (a verdict map keyed by address .
//! protocol . port, a chain per service choosing an endpoint chain with
//! `numgen`, a chain per endpoint with its DNAT), and how fast it reads
//! back. Ignored by default (it is a measurement, not a check):
//!
//! ```text
//! cargo test --release -p trellis-dataplane --test nftables_bulk -- --ignored --nocapture
//! ```
//!
//! `TRELLIS_BULK_SERVICES` and `TRELLIS_BULK_ENDPOINTS` change the sizes,
//! `TRELLIS_BULK_MAX_OPS` the bound per transaction (0: one transaction),
//! `TRELLIS_BULK_SHAPE=anonymous` an anonymous map per service instead of
//! a rule per endpoint ([`dsl::one_in`]).

use trellis_testkit::netns as netns_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netns_support::scratch_netns;
use trellis_dataplane::nftables::dsl::{self, Field};
use trellis_dataplane::nftables::{
    BaseChain, Batch, ChainKind, Datum, Expr, Family, Hook, Nft, NumgenKind, Policy, SetElem,
    SetSpec, Verdict, concat,
};

const TABLE: &str = "trellis_bulk";
const SERVICES_MAP: &str = "services";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn service_ip(s: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + s as u32) // 10.96.0.0/12
}

fn endpoint_ip(s: usize, e: usize, endpoints: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + (s * endpoints + e) as u32) // 10.128.0.0/9
}

/// The whole ruleset as one list of ops, in the order a cold start sends it.
/// `anonymous`: endpoint choice with an anonymous verdict map per service
/// (`numgen random mod N vmap { ... }`) rather than a rule per endpoint
/// ([`dsl::one_in`]).
fn ruleset(services: usize, endpoints: usize, anonymous: bool) -> Batch {
    let ip = Family::Ip;
    let key = [Field::IpDaddr, Field::L4Proto, Field::ThDport];
    let mut batch = Batch::new();
    batch
        .add_table(ip, TABLE)
        .add_chain(
            ip,
            TABLE,
            "prerouting",
            Some(BaseChain {
                hook: Hook::Prerouting,
                priority: -100,
                kind: ChainKind::Nat,
                policy: Policy::Accept,
            }),
        )
        .add_set(ip, TABLE, SERVICES_MAP, SetSpec::vmap(&dsl::key_type(&key)));
    for s in 0..services {
        for e in 0..endpoints {
            let chain = format!("ep-{s}-{e}");
            batch.add_chain(ip, TABLE, &chain, None).add_rule(
                ip,
                TABLE,
                &chain,
                [
                    dsl::l4proto(6),
                    dsl::dnat_ip_port(endpoint_ip(s, e, endpoints).into(), 8080),
                ]
                .concat(),
                None,
            );
        }
        let chain = format!("svc-{s}");
        batch.add_chain(ip, TABLE, &chain, None);
        let goto = |e: usize| Verdict::Goto(format!("ep-{s}-{e}"));
        let comment = format!("service {s}");
        if anonymous {
            let targets = (0..endpoints).map(goto).collect();
            let rule = dsl::numgen_vmap(NumgenKind::Random, targets);
            batch.add_rule(ip, TABLE, &chain, rule, Some(&comment));
        } else {
            for e in 0..endpoints {
                let mut rule = Vec::new();
                if e + 1 < endpoints {
                    rule = dsl::one_in((endpoints - e) as u32);
                }
                rule.push(Expr::Verdict(goto(e)));
                batch.add_rule(ip, TABLE, &chain, rule, Some(&comment));
            }
        }
    }
    let elements = (0..services)
        .map(|s| {
            let key = concat(&[Datum::Ipv4(service_ip(s)), Datum::Proto(6), Datum::Port(80)]);
            SetElem::verdict(key, Verdict::Goto(format!("svc-{s}")))
        })
        .collect();
    batch
        .add_elements(ip, TABLE, SERVICES_MAP, elements)
        .add_rule(ip, TABLE, "prerouting", dsl::vmap(&key, SERVICES_MAP), None);
    batch
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn bulk_programming_of_a_service_proxy_ruleset() {
    let services = env_or("TRELLIS_BULK_SERVICES", 10_000);
    let endpoints = env_or("TRELLIS_BULK_ENDPOINTS", 10);
    let max_ops = env_or("TRELLIS_BULK_MAX_OPS", 50_000);
    let anonymous = std::env::var("TRELLIS_BULK_SHAPE").as_deref() == Ok("anonymous");
    let namespace = scratch_netns("nft-bulk");
    let nft = Nft::connect_in(namespace.name())
        .expect("connect")
        .with_timeout(Duration::from_secs(120));

    let started = Instant::now();
    let batch = ruleset(services, endpoints, anonymous);
    let built = started.elapsed();
    let weight = batch.weight();

    let started = Instant::now();
    let transactions = if max_ops == 0 {
        nft.apply(&batch).expect("apply");
        1
    } else {
        nft.apply_in_batches(&batch, max_ops).expect("apply")
    };
    let applied = started.elapsed();

    if std::env::var("TRELLIS_BULK_READ").as_deref() == Ok("0") {
        println!(
            "applied {} ops in {applied:?} as {transactions} transaction(s)",
            batch.len()
        );
        return;
    }
    let started = Instant::now();
    let rules = nft.dump_rules(Family::Ip, TABLE, None).expect("dump rules");
    let read_rules = started.elapsed();
    let chains = nft.chains(Family::Ip, TABLE).expect("chains");
    let read_chains = started.elapsed() - read_rules;
    let elements = nft
        .elements(Family::Ip, TABLE, SERVICES_MAP)
        .expect("elements");
    let read = started.elapsed();
    let rules_per_service = if anonymous { 1 } else { endpoints };
    assert_eq!(rules.len(), services * (endpoints + rules_per_service) + 1);
    assert_eq!(chains.len(), services * (endpoints + 1) + 1);
    assert_eq!(elements.len(), services);

    println!(
        "{services} services x {endpoints} endpoints ({}): {} ops (weight {weight}) built in {built:?}, \
         applied in {applied:?} as {transactions} transaction(s) of at most {max_ops}; \
         read back ({} rules, {} chains, {} elements) in {read:?} (rules {read_rules:?}, \
         chains {read_chains:?})",
        if anonymous {
            "an anonymous map per service"
        } else {
            "a rule per endpoint"
        },
        batch.len(),
        rules.len(),
        chains.len(),
        elements.len()
    );
}
