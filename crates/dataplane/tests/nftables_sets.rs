//! Sets, maps, verdict maps and their elements, the expressions that use
//! them, deletes that treat "already gone" as done, reading back, and long
//! changes in bounded transactions; checked with the `nft` binary as the
//! independent reader.

use trellis_testkit::netns as netns_support;
use trellis_testkit::nft as nft_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use netns_support::scratch_netns;
use nft_support::{Routed, bytecode, nft};
use trellis_dataplane::nftables::dsl::{self, Field};
use trellis_dataplane::nftables::{
    BaseChain, Batch, ChainKind, DataType, Datum, ElemValue, Expr, Family, Hook, IcmpxCode,
    MapData, NatFamily, Nft, NumgenKind, Policy, RouteType, SetElem, SetFlags, SetSpec, Verdict,
    concat,
};
use trellis_dataplane::{Error, netns};

const TABLE: &str = "trellis_sets";
const SVC_KEY: [Field; 3] = [Field::IpDaddr, Field::L4Proto, Field::ThDport];

fn nat_chain(hook: Hook, priority: i32) -> Option<BaseChain> {
    Some(BaseChain {
        hook,
        priority,
        kind: ChainKind::Nat,
        policy: Policy::Accept,
    })
}

fn svc_key(addr: &str, proto: u8, port: u16) -> Vec<u8> {
    concat(&[
        Datum::Ipv4(addr.parse().unwrap()),
        Datum::Proto(proto),
        Datum::Port(port),
    ])
}

fn goto(chain: &str) -> Verdict {
    Verdict::Goto(chain.to_owned())
}

/// The sets of a kube-proxy-like table: a service verdict map keyed by
/// address . protocol . port, a set of cluster IPs, a dynamic affinity set
/// with a default timeout, a map of values, a set whose elements time out.
fn service_sets(batch: &mut Batch, family: Family, table: &str) {
    batch
        .add_set(
            family,
            table,
            "services",
            SetSpec::vmap(&dsl::key_type(&SVC_KEY)),
        )
        .add_set(
            family,
            table,
            "cluster-ips",
            SetSpec::set(&[DataType::Ipv4Addr]),
        )
        .add_set(
            family,
            table,
            "affinity",
            SetSpec::set(&[DataType::Ipv4Addr])
                .with_flags(SetFlags::DYNAMIC)
                .with_timeout(Duration::from_secs(3 * 3600)),
        )
        .add_set(
            family,
            table,
            "backends",
            SetSpec::map(
                &[DataType::Ipv4Addr, DataType::InetService],
                &[DataType::Ipv4Addr, DataType::InetService],
            ),
        )
        .add_set(
            family,
            table,
            "recent",
            SetSpec::set(&[DataType::Ipv4Addr]).with_flags(SetFlags::TIMEOUT),
        );
}

#[test]
fn sets_maps_elements_and_rules_list_as_the_intended_nft_text() {
    let namespace = scratch_netns("nft-sets-text");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(inet, TABLE, "pre", nat_chain(Hook::Prerouting, -100));
    for chain in ["svc", "ep-a", "ep-b", "ep-c"] {
        batch.add_chain(inet, TABLE, chain, None);
    }
    service_sets(&mut batch, inet, TABLE);
    batch
        .add_elements(
            inet,
            TABLE,
            "services",
            vec![
                SetElem::verdict(svc_key("10.96.0.1", 6, 80), goto("svc")),
                SetElem::verdict(svc_key("10.96.0.2", 17, 53), Verdict::Drop),
            ],
        )
        .add_elements(
            inet,
            TABLE,
            "cluster-ips",
            vec![SetElem::key(concat(&[Datum::Ipv4(
                "10.96.0.1".parse().unwrap(),
            )]))],
        )
        .add_elements(
            inet,
            TABLE,
            "recent",
            vec![SetElem::key(vec![10, 0, 0, 9]).with_timeout(Duration::from_secs(3600))],
        )
        .add_elements(
            inet,
            TABLE,
            "backends",
            vec![SetElem::mapping(
                concat(&[Datum::Ipv4("10.96.0.1".parse().unwrap()), Datum::Port(80)]),
                concat(&[Datum::Ipv4("10.1.0.5".parse().unwrap()), Datum::Port(8080)]),
            )],
        )
        .add_rule(inet, TABLE, "pre", dsl::vmap(&SVC_KEY, "services"), None)
        .add_rule(
            inet,
            TABLE,
            "svc",
            [
                dsl::in_set(&[Field::IpSaddr], "affinity"),
                dsl::goto("ep-a"),
            ]
            .concat(),
            Some("sticky"),
        )
        .add_rule(
            inet,
            TABLE,
            "svc",
            dsl::numgen_vmap(
                NumgenKind::Random,
                vec![goto("ep-a"), goto("ep-b"), goto("ep-c")],
            ),
            Some("choose"),
        )
        .add_rule(
            inet,
            TABLE,
            "ep-a",
            [
                dsl::update_set(
                    &[Field::IpSaddr],
                    "affinity",
                    Some(Duration::from_secs(3 * 3600)),
                ),
                dsl::l4proto(6),
                dsl::dnat_ip_port("10.1.0.5".parse().unwrap(), 8080),
            ]
            .concat(),
            None,
        )
        .add_rule(
            inet,
            TABLE,
            "ep-b",
            [
                dsl::not_in_set(&[Field::IpDaddr], "cluster-ips"),
                dsl::fib_daddr_type(RouteType::Local),
                dsl::accept(),
            ]
            .concat(),
            None,
        );
    handle.apply(&batch).expect("apply");

    let text = nft(ns, &["list", "table", "inet", TABLE]);
    for line in [
        "map services {",
        "type ipv4_addr . inet_proto . inet_service : verdict",
        "10.96.0.1 . tcp . 80 : goto svc",
        "10.96.0.2 . udp . 53 : drop",
        "set cluster-ips {",
        "elements = { 10.96.0.1 }",
        "set affinity {",
        "flags dynamic,timeout",
        "timeout 3h",
        "map backends {",
        "type ipv4_addr . inet_service : ipv4_addr . inet_service",
        "elements = { 10.96.0.1 . 80 : 10.1.0.5 . 8080 }",
        "set recent {",
        "elements = { 10.0.0.9 timeout 1h expires ",
        "ip daddr . meta l4proto . th dport vmap @services",
        r#"ip saddr @affinity goto ep-a comment "sticky""#,
        r#"numgen random mod 3 vmap { 0 : goto ep-a, 1 : goto ep-b, 2 : goto ep-c } comment "choose""#,
        "update @affinity { ip saddr timeout 3h }",
        "dnat ip to 10.1.0.5:8080",
        "ip daddr != @cluster-ips fib daddr type local accept",
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    // The anonymous map is part of its rule, not a listed set.
    assert!(!text.contains("__map"), "{text}");
}

/// Each rule built with the new fragments must be exactly what nft
/// generates for the same text (compared as nft reads the kernel's bytecode
/// back), with the same named sets in both tables.
#[test]
fn new_fragments_encode_as_nft_does() {
    let namespace = scratch_netns("nft-sets-encodings");
    let ns = namespace.name();
    let filter_rules: Vec<(&str, Vec<Expr>)> = vec![
        (
            "ip daddr . meta l4proto . th dport vmap @services",
            dsl::vmap(&SVC_KEY, "services"),
        ),
        (
            "ip6 daddr . meta l4proto . th dport vmap @services6",
            dsl::vmap(
                &[Field::Ip6Daddr, Field::L4Proto, Field::ThDport],
                "services6",
            ),
        ),
        (
            "ip saddr @cluster-ips accept",
            [dsl::in_set(&[Field::IpSaddr], "cluster-ips"), dsl::accept()].concat(),
        ),
        (
            "ip daddr != @cluster-ips drop",
            [
                dsl::not_in_set(&[Field::IpDaddr], "cluster-ips"),
                dsl::drop(),
            ]
            .concat(),
        ),
        (
            "update @affinity { ip saddr timeout 3h }",
            dsl::update_set(
                &[Field::IpSaddr],
                "affinity",
                Some(Duration::from_secs(10800)),
            ),
        ),
        (
            "add @affinity { ip saddr }",
            dsl::add_to_set(&[Field::IpSaddr], "affinity", None),
        ),
        (
            "th dport 80 accept",
            [dsl::th_dport(80), dsl::accept()].concat(),
        ),
        (
            "th sport 53 accept",
            [dsl::th_sport(53), dsl::accept()].concat(),
        ),
        (
            "fib daddr type local accept",
            [dsl::fib_daddr_type(RouteType::Local), dsl::accept()].concat(),
        ),
        (
            "reject with icmp type port-unreachable",
            dsl::reject_icmp(3),
        ),
        (
            "reject with icmpv6 type port-unreachable",
            dsl::reject_icmpv6(4),
        ),
        ("reject with icmpx type port-unreachable", dsl::reject()),
        (
            "reject with icmpx type admin-prohibited",
            dsl::reject_icmpx(IcmpxCode::AdminProhibited),
        ),
        ("reject with tcp reset", dsl::reject_tcp_reset()),
        (
            "numgen random mod 3 vmap { 0 : goto a, 1 : goto b, 2 : goto c }",
            dsl::numgen_vmap(NumgenKind::Random, vec![goto("a"), goto("b"), goto("c")]),
        ),
        (
            "meta l4proto { tcp, udp } accept",
            [
                dsl::in_anonymous_set(&[Field::L4Proto], vec![vec![6], vec![17]]),
                dsl::accept(),
            ]
            .concat(),
        ),
        (
            "numgen random mod 4 0 goto a",
            [dsl::one_in(4), dsl::goto("a")].concat(),
        ),
    ];
    let nat_rules: Vec<(&str, Vec<Expr>)> = vec![(
        "meta l4proto tcp dnat ip to ip daddr . th dport map @backends",
        [
            dsl::l4proto(6),
            dsl::dnat_map(
                &[Field::IpDaddr, Field::ThDport],
                "backends",
                NatFamily::Ipv4,
                true,
            ),
        ]
        .concat(),
    )];
    let post_rules: Vec<(&str, Vec<Expr>)> =
        vec![("masquerade fully-random", dsl::masquerade_fully_random())];

    let sets = "add map inet {t} services { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
         add map inet {t} services6 { type ipv6_addr . inet_proto . inet_service : verdict; }\n\
         add set inet {t} cluster-ips { type ipv4_addr; }\n\
         add set inet {t} affinity { type ipv4_addr; flags dynamic,timeout; timeout 3h; }\n\
         add map inet {t} backends { type ipv4_addr . inet_service : ipv4_addr . inet_service; }\n";
    let mut script = String::from(
        "add table inet ref\n\
         add chain inet ref filter { type filter hook input priority 0; policy accept; }\n\
         add chain inet ref nat { type nat hook prerouting priority -100; policy accept; }\n\
         add chain inet ref post { type nat hook postrouting priority 100; policy accept; }\n",
    );
    script.push_str(&sets.replace("{t}", "ref"));
    for chain in ["a", "b", "c"] {
        script.push_str(&format!("add chain inet ref {chain}\n"));
    }
    for (chain, group) in [
        ("filter", &filter_rules),
        ("nat", &nat_rules),
        ("post", &post_rules),
    ] {
        for (text, _) in group {
            script.push_str(&format!("add rule inet ref {chain} {text}\n"));
        }
    }
    load_script(ns, &script);

    let inet = Family::Inet;
    let mut batch = Batch::new();
    batch
        .add_table(inet, "ours")
        .add_chain(
            inet,
            "ours",
            "filter",
            Some(BaseChain {
                hook: Hook::Input,
                priority: 0,
                kind: ChainKind::Filter,
                policy: Policy::Accept,
            }),
        )
        .add_chain(inet, "ours", "nat", nat_chain(Hook::Prerouting, -100))
        .add_chain(inet, "ours", "post", nat_chain(Hook::Postrouting, 100));
    // The same sets, made by this module.
    let v6_key = [Field::Ip6Daddr, Field::L4Proto, Field::ThDport];
    let addr_port = [DataType::Ipv4Addr, DataType::InetService];
    batch
        .add_set(
            inet,
            "ours",
            "services",
            SetSpec::vmap(&dsl::key_type(&SVC_KEY)),
        )
        .add_set(
            inet,
            "ours",
            "services6",
            SetSpec::vmap(&dsl::key_type(&v6_key)),
        )
        .add_set(
            inet,
            "ours",
            "cluster-ips",
            SetSpec::set(&[DataType::Ipv4Addr]),
        )
        .add_set(
            inet,
            "ours",
            "affinity",
            SetSpec::set(&[DataType::Ipv4Addr])
                .with_flags(SetFlags::DYNAMIC)
                .with_timeout(Duration::from_secs(10800)),
        )
        .add_set(
            inet,
            "ours",
            "backends",
            SetSpec::map(&addr_port, &addr_port),
        );
    for chain in ["a", "b", "c"] {
        batch.add_chain(inet, "ours", chain, None);
    }
    for (chain, group) in [
        ("filter", &filter_rules),
        ("nat", &nat_rules),
        ("post", &post_rules),
    ] {
        for (_, exprs) in group {
            batch.add_rule(inet, "ours", chain, exprs.clone(), None);
        }
    }
    Nft::connect_in(ns)
        .expect("connect")
        .apply(&batch)
        .expect("apply");

    for (chain, group) in [
        ("filter", &filter_rules),
        ("nat", &nat_rules),
        ("post", &post_rules),
    ] {
        let reference = anonymise(bytecode(ns, "inet", "ref", chain));
        let ours = anonymise(bytecode(ns, "inet", "ours", chain));
        assert_eq!(reference.len(), group.len(), "{reference:#?}");
        assert_eq!(ours.len(), group.len(), "{ours:#?}");
        for (((text, _), want), got) in group.iter().zip(&reference).zip(&ours) {
            assert!(!want.is_empty(), "nft printed no bytecode for `{text}`");
            assert_eq!(got, want, "encoding of `{text}` differs from nft's");
        }
    }
}

/// Anonymous set names differ (the kernel numbers nft's, ours are random):
/// compare without them.
fn anonymise(rules: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rules
        .into_iter()
        .map(|rule| {
            rule.into_iter()
                .map(|line| {
                    line.split(' ')
                        .map(|word| {
                            if word.starts_with("__set") || word.starts_with("__map") {
                                "__anonymous"
                            } else {
                                word
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect()
        })
        .collect()
}

fn load_script(ns: &str, script: &str) {
    let path = std::env::temp_dir().join(format!("{ns}-{}.nft", script.len()));
    std::fs::write(&path, script).expect("writing the nft script");
    let loaded = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f"])
        .arg(&path)
        .output()
        .expect("running nft -f");
    let _ = std::fs::remove_file(&path);
    assert!(
        loaded.status.success(),
        "nft -f: {}\n{script}",
        String::from_utf8_lossy(&loaded.stderr)
    );
}

#[test]
fn dumps_read_back_chains_sets_elements_and_rules() {
    let namespace = scratch_netns("nft-sets-dumps");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;
    let mut batch = Batch::new();
    let pre = nat_chain(Hook::Prerouting, -100);
    batch
        .add_table(inet, TABLE)
        .add_chain(inet, TABLE, "pre", pre)
        .add_chain(inet, TABLE, "svc", None)
        .add_chain(inet, TABLE, "ep", None);
    service_sets(&mut batch, inet, TABLE);
    let elements = vec![
        SetElem::verdict(svc_key("10.96.0.1", 6, 80), goto("svc")),
        SetElem::verdict(svc_key("10.96.0.2", 17, 53), Verdict::Accept),
    ];
    batch
        .add_elements(inet, TABLE, "services", elements.clone())
        .add_elements(
            inet,
            TABLE,
            "recent",
            vec![SetElem::key(vec![10, 0, 0, 9]).with_timeout(Duration::from_secs(3600))],
        )
        .add_elements(
            inet,
            TABLE,
            "backends",
            vec![SetElem::mapping(
                vec![10, 96, 0, 1, 0, 80, 0, 0],
                vec![10, 1, 0, 5, 0x1f, 0x90, 0, 0],
            )],
        )
        .add_rule(
            inet,
            TABLE,
            "pre",
            dsl::vmap(&SVC_KEY, "services"),
            Some("services"),
        )
        .add_rule(
            inet,
            TABLE,
            "svc",
            dsl::numgen_vmap(NumgenKind::Random, vec![goto("ep")]),
            Some("choose"),
        )
        .add_rule(
            inet,
            TABLE,
            "ep",
            [
                dsl::l4proto(6),
                dsl::dnat_ip_port("10.1.0.5".parse().unwrap(), 8080),
            ]
            .concat(),
            Some("endpoint"),
        );
    handle.apply(&batch).expect("apply");

    let chains = handle.chains(inet, TABLE).expect("chains");
    let names: Vec<&str> = chains.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["pre", "svc", "ep"]);
    assert_eq!(chains[0].base, pre);
    assert!(chains[0].hooked && !chains[1].hooked && chains[1].base.is_none());

    let sets = handle.sets(inet, TABLE).expect("sets");
    let named: Vec<_> = sets.iter().filter(|s| !s.anonymous).collect();
    let mut expected = Batch::new();
    service_sets(&mut expected, inet, TABLE);
    assert_eq!(named.len(), expected.len(), "{sets:#?}");
    for (info, op) in named.iter().zip(expected.ops()) {
        let trellis_dataplane::nftables::Op::AddSet { name, spec, .. } = op else {
            unreachable!()
        };
        assert_eq!(&info.name, name);
        let mut spec = spec.clone();
        if spec.flags.contains(SetFlags::DYNAMIC) {
            // The kernel sizes dynamic sets itself.
            spec.size = info.spec.size;
        }
        assert_eq!(info.spec, spec, "{name}");
    }
    // The anonymous map of the numgen rule is listed too, as anonymous.
    let anonymous: Vec<_> = sets.iter().filter(|s| s.anonymous).collect();
    assert_eq!(anonymous.len(), 1, "{sets:#?}");
    assert_eq!(anonymous[0].spec.data, Some(MapData::Verdict));
    assert!(anonymous[0].spec.flags.contains(SetFlags::CONSTANT));

    let listed = handle.elements(inet, TABLE, "services").expect("elements");
    let mut pairs: Vec<(Vec<u8>, Option<ElemValue>)> = listed
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<_> = elements
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(pairs, want);
    let recent = handle.elements(inet, TABLE, "recent").expect("elements");
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].timeout, Some(Duration::from_secs(3600)));
    let left = recent[0].expires.expect("expiry");
    assert!(
        left <= Duration::from_secs(3600) && left > Duration::from_secs(3500),
        "{left:?}"
    );
    let backends = handle.elements(inet, TABLE, "backends").expect("elements");
    assert_eq!(
        backends[0].value,
        Some(ElemValue::Data(vec![10, 1, 0, 5, 0x1f, 0x90, 0, 0]))
    );

    // Whole table and one chain; comments and handles as nft sees them.
    let rules = handle.dump_rules(inet, TABLE, None).expect("rules");
    let summary: Vec<(&str, Option<&str>)> = rules
        .iter()
        .map(|r| (r.chain.as_str(), r.comment.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            ("pre", Some("services")),
            ("svc", Some("choose")),
            ("ep", Some("endpoint"))
        ]
    );
    let ep = handle.dump_rules(inet, TABLE, Some("ep")).expect("rules");
    assert_eq!(ep, rules[2..]);
    let json = nft(ns, &["-j", "list", "chain", "inet", TABLE, "ep"]);
    assert!(
        json.contains(&format!("\"handle\": {}", ep[0].handle)),
        "{json}"
    );

    // The same rule added by nft reads back as the same expression bytes:
    // what the proxy fingerprints rules with.
    load_script(
        ns,
        &format!(
            "add rule inet {TABLE} ep meta l4proto tcp dnat ip to 10.1.0.5:8080 comment \"by nft\"\n"
        ),
    );
    let ep = handle.dump_rules(inet, TABLE, Some("ep")).expect("rules");
    assert_eq!(ep.len(), 2);
    assert_eq!(ep[1].comment.as_deref(), Some("by nft"));
    assert_eq!(ep[0].exprs, ep[1].exprs, "same rule, same bytes");
    assert!(!ep[0].exprs.is_empty());

    // Missing objects are NotFound, naming them.
    let err = handle.elements(inet, TABLE, "nope").expect_err("no set");
    assert!(
        matches!(&err, Error::NotFound { what, .. } if what.contains("nope")),
        "{err:?}"
    );
    let err = handle.chains(inet, "nope").expect_err("no table");
    assert!(err.is_not_found(), "{err:?}");
    let err = handle
        .dump_rules(inet, TABLE, Some("nope"))
        .expect_err("no chain");
    assert!(err.is_not_found(), "{err:?}");
}

#[test]
fn destroy_treats_missing_objects_as_done_and_delete_does_not() {
    let namespace = scratch_netns("nft-sets-destroy");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;

    // Nothing exists: every destroy succeeds.
    let mut batch = Batch::new();
    batch
        .destroy_table(inet, "missing")
        .add_table(inet, TABLE)
        .destroy_chain(inet, TABLE, "missing")
        .destroy_set(inet, TABLE, "missing")
        .destroy_rule(inet, TABLE, "missing", 42)
        .add_set(inet, TABLE, "s", SetSpec::set(&[DataType::Ipv4Addr]))
        .destroy_elements(inet, TABLE, "s", vec![vec![10, 0, 0, 1]]);
    handle.apply(&batch).expect("destroying what is not there");
    // What holds the object must exist, even for destroy: the table of a
    // chain, set or rule, the set of elements.
    for batch in [
        Batch::new().destroy_chain(inet, "no-table", "c").clone(),
        Batch::new().destroy_set(inet, "no-table", "s").clone(),
        Batch::new().destroy_rule(inet, "no-table", "c", 1).clone(),
        Batch::new()
            .destroy_elements(inet, TABLE, "no-set", vec![vec![10, 0, 0, 1]])
            .clone(),
    ] {
        let err = handle.apply(&batch).expect_err("container missing");
        assert!(err.has_errno(libc::ENOENT), "{err:?}");
    }

    // Delete fails, naming what it deletes.
    let mut batch = Batch::new();
    batch.delete_elements(inet, TABLE, "s", vec![vec![10, 0, 0, 1]]);
    let err = handle.apply(&batch).expect_err("no such element");
    assert!(err.has_errno(libc::ENOENT), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "deleting 1 element from set inet {TABLE}/s (element 0, key 0a000001)"
        )),
        "{err}"
    );
    let mut batch = Batch::new();
    batch.delete_chain(inet, TABLE, "missing");
    let err = handle.apply(&batch).expect_err("no such chain");
    assert!(
        err.to_string().contains(&format!(
            "deleting chain inet {TABLE}/missing in netns {ns}"
        )),
        "{err}"
    );

    // Existing objects go: elements, a chain with its rules, a set, a table.
    let mut batch = Batch::new();
    batch
        .add_elements(
            inet,
            TABLE,
            "s",
            vec![
                SetElem::key(vec![10, 0, 0, 1]),
                SetElem::key(vec![10, 0, 0, 2]),
            ],
        )
        .add_chain(inet, TABLE, "c", None)
        .add_rule(inet, TABLE, "c", dsl::accept(), None)
        .add_chain(inet, TABLE, "d", None)
        .add_rule(inet, TABLE, "d", dsl::accept(), None);
    handle.apply(&batch).expect("adding");
    let mut batch = Batch::new();
    batch
        .destroy_elements(inet, TABLE, "s", vec![vec![10, 0, 0, 1], vec![10, 0, 0, 3]])
        .destroy_chain(inet, TABLE, "c")
        .flush_chain(inet, TABLE, "d");
    handle.apply(&batch).expect("destroying");
    let left = handle.elements(inet, TABLE, "s").expect("elements");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, [10, 0, 0, 2]);
    let chains: Vec<String> = handle
        .chains(inet, TABLE)
        .expect("chains")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(chains, ["d"]);
    assert!(handle.rules(inet, TABLE, "d").expect("rules").is_empty());
    let mut batch = Batch::new();
    batch.flush_set(inet, TABLE, "s");
    handle.apply(&batch).expect("flush set");
    assert!(
        handle
            .elements(inet, TABLE, "s")
            .expect("elements")
            .is_empty()
    );

    // A chain something jumps to cannot go until the jump has gone (in the
    // same batch is fine).
    let mut batch = Batch::new();
    batch.add_chain(inet, TABLE, "target", None).add_rule(
        inet,
        TABLE,
        "d",
        dsl::jump("target"),
        None,
    );
    handle.apply(&batch).expect("adding a jump");
    let mut batch = Batch::new();
    batch.destroy_chain(inet, TABLE, "target");
    let err = handle.apply(&batch).expect_err("still jumped to");
    assert!(err.has_errno(libc::EBUSY), "{err:?}");
    let mut batch = Batch::new();
    batch
        .flush_chain(inet, TABLE, "d")
        .destroy_chain(inet, TABLE, "target");
    handle.apply(&batch).expect("jump and chain together");

    let mut batch = Batch::new();
    batch
        .destroy_set(inet, TABLE, "s")
        .destroy_table(inet, TABLE);
    handle.apply(&batch).expect("destroying set and table");
    assert!(!handle.table_exists(inet, TABLE).expect("lookup"));
    assert!(nft(ns, &["list", "ruleset"]).trim().is_empty());
}

#[test]
fn a_refused_element_is_named_and_nothing_is_applied() {
    let namespace = scratch_netns("nft-sets-refused");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(inet, TABLE, "svc-0", None);
    service_sets(&mut batch, inet, TABLE);
    handle.apply(&batch).expect("setup");

    // Element 2 of 4 jumps to a chain that does not exist.
    let elements: Vec<SetElem> = (0..4)
        .map(|i| {
            let target = if i == 2 { "svc-missing" } else { "svc-0" };
            SetElem::verdict(svc_key(&format!("10.96.0.{i}"), 6, 80), goto(target))
        })
        .collect();
    let mut batch = Batch::new();
    batch
        .add_chain(inet, TABLE, "fine", None)
        .add_elements(inet, TABLE, "services", elements);
    let refused = handle.apply_detailed(&batch).expect_err("refused");
    assert_eq!(refused.op, Some(1));
    assert_eq!(refused.element, Some(2));
    let text = refused.to_string();
    assert!(
        text.contains(&format!(
            "adding 4 elements to set inet {TABLE}/services (element 2, key 0a600002 06000000 00500000) in netns {ns}"
        )),
        "{text}"
    );
    assert!(refused.error.has_errno(libc::ENOENT), "{:?}", refused.error);
    assert!(
        handle
            .elements(inet, TABLE, "services")
            .expect("elements")
            .is_empty()
    );
    assert!(
        handle
            .chains(inet, TABLE)
            .expect("chains")
            .iter()
            .all(|c| c.name != "fine")
    );

    // Refused before sending: a key of the wrong length for a set added in
    // the same batch, a timeout on a set without timeouts.
    let mut batch = Batch::new();
    batch
        .add_set(inet, TABLE, "fresh", SetSpec::set(&[DataType::InetService]))
        .add_elements(inet, TABLE, "fresh", vec![SetElem::key(vec![0, 80, 0])]);
    let err = handle.apply(&batch).expect_err("bad key");
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "element key",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("3 bytes, the set's key has 2"),
        "{err}"
    );
    let mut batch = Batch::new();
    batch.add_elements(
        inet,
        TABLE,
        "cluster-ips",
        vec![SetElem::key(vec![10, 0, 0, 1]).with_timeout(Duration::from_secs(5))],
    );
    let err = handle.apply(&batch).expect_err("no timeouts in this set");
    assert!(err.has_errno(libc::EINVAL), "{err:?}");
}

#[test]
fn long_changes_go_in_bounded_transactions() {
    let namespace = scratch_netns("nft-sets-chunks");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_set(inet, TABLE, "ips", SetSpec::set(&[DataType::Ipv4Addr]));
    for i in 0..50 {
        batch.add_chain(inet, TABLE, &format!("c{i}"), None);
    }
    // 5000 elements in one op: split across transactions (and messages).
    let elements: Vec<SetElem> = (0..5000u32)
        .map(|i| SetElem::key((0x0a00_0000 + i).to_be_bytes().to_vec()))
        .collect();
    batch.add_elements(inet, TABLE, "ips", elements);
    assert_eq!(batch.weight(), 2 + 50 + 5000);
    let chunks = batch.chunks(1000);
    assert_eq!(chunks.len(), 6);
    assert!(chunks.iter().all(|c| c.weight() <= 1000));
    let transactions = handle.apply_in_batches(&batch, 1000).expect("apply");
    assert_eq!(transactions, 6);
    assert_eq!(
        handle.elements(inet, TABLE, "ips").expect("elements").len(),
        5000
    );
    assert_eq!(handle.chains(inet, TABLE).expect("chains").len(), 50);

    // A failing part stops the rest; the parts before it stay.
    let mut batch = Batch::new();
    batch.add_chain(inet, TABLE, "early", None);
    for i in 0..10 {
        batch.add_chain(inet, TABLE, &format!("x{i}"), None);
    }
    batch.add_rule(inet, TABLE, "missing", dsl::accept(), None);
    batch.add_chain(inet, TABLE, "late", None);
    let err = handle
        .apply_in_batches(&batch, 5)
        .expect_err("a part fails");
    let text = err.to_string();
    assert!(
        text.contains(
            "(transaction 3 of 3; the 2 before it were applied, nothing after it was sent)"
        ),
        "{text}"
    );
    let chains: Vec<String> = handle
        .chains(inet, TABLE)
        .expect("chains")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert!(chains.contains(&"early".to_owned()) && !chains.contains(&"late".to_owned()));

    // Invalid ops anywhere are refused before anything is sent.
    let mut batch = Batch::new();
    batch.add_chain(inet, TABLE, "never", None);
    for i in 0..10 {
        batch.add_chain(inet, TABLE, &format!("y{i}"), None);
    }
    batch.add_chain(inet, TABLE, "", None);
    let err = handle.apply_in_batches(&batch, 2).expect_err("empty name");
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "chain name",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        handle
            .chains(inet, TABLE)
            .expect("chains")
            .iter()
            .all(|c| c.name != "never")
    );
}

/// A connection from A to a service address routed through R is sent by
/// R's concatenated verdict map to the service chain, by its numgen map to
/// an endpoint chain, and DNATed there to B's server: the data plane of a
/// service proxy, end to end. A service without endpoints rejects.
#[test]
fn a_service_vmap_and_numgen_dnat_deliver_a_connection() {
    let net = Routed::new("nft-sets-svc");
    let handle = Nft::connect_in(net.r()).expect("connect to R");
    let ip = Family::Ip;
    let table = "trellis_svc";
    let service = "10.96.0.10";
    let empty_service = "10.96.0.11";
    let mut batch = Batch::new();
    batch
        .add_table(ip, table)
        .add_chain(ip, table, "pre", nat_chain(Hook::Prerouting, -100))
        .add_chain(
            ip,
            table,
            "filter",
            Some(BaseChain {
                hook: Hook::Forward,
                priority: 0,
                kind: ChainKind::Filter,
                policy: Policy::Accept,
            }),
        )
        .add_chain(ip, table, "svc", None)
        .add_chain(ip, table, "ep-0", None)
        .add_chain(ip, table, "ep-1", None)
        .add_chain(ip, table, "no-endpoints", None)
        .add_set(
            ip,
            table,
            "services",
            SetSpec::vmap(&dsl::key_type(&SVC_KEY)),
        )
        .add_set(
            ip,
            table,
            "no-endpoints",
            SetSpec::vmap(&dsl::key_type(&SVC_KEY)),
        )
        .add_elements(
            ip,
            table,
            "services",
            vec![SetElem::verdict(svc_key(service, 6, 80), goto("svc"))],
        )
        .add_elements(
            ip,
            table,
            "no-endpoints",
            vec![SetElem::verdict(
                svc_key(empty_service, 6, 80),
                goto("no-endpoints"),
            )],
        )
        .add_rule(ip, table, "pre", dsl::vmap(&SVC_KEY, "services"), None)
        .add_rule(
            ip,
            table,
            "filter",
            dsl::vmap(&SVC_KEY, "no-endpoints"),
            None,
        )
        .add_rule(ip, table, "no-endpoints", dsl::reject_tcp_reset(), None)
        .add_rule(
            ip,
            table,
            "svc",
            dsl::numgen_vmap(NumgenKind::Random, vec![goto("ep-0"), goto("ep-1")]),
            None,
        );
    // Both endpoints are B's server (on two ports): either choice works.
    for (i, port) in [(0, 9090), (1, 9091)] {
        batch.add_rule(
            ip,
            table,
            &format!("ep-{i}"),
            [
                dsl::l4proto(6),
                dsl::dnat_ip_port(Routed::B.parse().unwrap(), port),
            ]
            .concat(),
            None,
        );
    }
    handle.apply(&batch).expect("programming the service");
    // A routes the service range via R, and R has a route for it (as nodes
    // have for service ranges), so unanswered services reach its forward
    // hook.
    netns_support::ip(&[
        "-n",
        net.a(),
        "route",
        "add",
        "10.96.0.0/16",
        "via",
        Routed::R_A,
    ]);
    netns_support::ip(&[
        "-n",
        net.r(),
        "route",
        "add",
        "10.96.0.0/16",
        "via",
        Routed::B,
    ]);

    let listeners: Vec<TcpListener> = [9090, 9091]
        .into_iter()
        .map(|port| {
            let addr: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
            let listener = netns::run_in(net.b(), move || TcpListener::bind(addr))
                .expect("entering B")
                .expect("listening in B");
            listener.set_nonblocking(true).expect("nonblocking");
            listener
        })
        .collect();
    let target: SocketAddr = format!("{service}:80").parse().unwrap();
    for round in 0..4 {
        let mut client = netns::run_in(net.a(), move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(2))
        })
        .expect("entering A")
        .unwrap_or_else(|err| panic!("connecting to the service (round {round}): {err}"));
        let mut server = accept_any(&listeners);
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        client.write_all(b"ping").expect("client write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).expect("server read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").expect("server write");
        client.read_exact(&mut buf).expect("client read");
        assert_eq!(&buf, b"pong");
    }

    // No endpoints: the client is refused at once (a reset), not left to
    // time out.
    let empty: SocketAddr = format!("{empty_service}:80").parse().unwrap();
    let refused = netns::run_in(net.a(), move || {
        TcpStream::connect_timeout(&empty, Duration::from_secs(2))
    })
    .expect("entering A");
    let err = refused.expect_err("no endpoints");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

fn accept_any(listeners: &[TcpListener]) -> TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        for listener in listeners {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    return stream;
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) => panic!("accept: {err}"),
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection arrived at B"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
