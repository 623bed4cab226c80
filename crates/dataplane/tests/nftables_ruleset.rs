//! nf_tables over netlink, checked with the `nft` binary as an independent
//! reader: structure, encodings (against nft's own for the same rule text),
//! transactions, listing and deleting rules, errors.

use trellis_testkit::netns as netns_support;
use trellis_testkit::nft as nft_support;

use netns_support::{scratch_name, scratch_netns};
use nft_support::{bytecode, chain, nft, objects, rules, ruleset_json};
use serde_json::{Value, json};
use trellis_dataplane::Error;
use trellis_dataplane::nftables::dsl::{self, *};
use trellis_dataplane::nftables::{
    BaseChain, Batch, ChainKind, CtState, Expr, Family, Hook, Nft, Policy, RuleInfo,
};

const TABLE: &str = "trellis_test";

fn base(hook: Hook, priority: i32, kind: ChainKind, policy: Policy) -> Option<BaseChain> {
    Some(BaseChain {
        hook,
        priority,
        kind,
        policy,
    })
}

#[test]
fn tables_chains_and_commented_rules_are_what_nft_lists() {
    let namespace = scratch_netns("nft-structure");
    let ns = namespace.name();
    let nft_handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;

    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(
            inet,
            TABLE,
            "forward",
            base(Hook::Forward, 0, ChainKind::Filter, Policy::Accept),
        )
        .add_chain(
            inet,
            TABLE,
            "input",
            base(Hook::Input, -5, ChainKind::Filter, Policy::Drop),
        )
        .add_chain(
            inet,
            TABLE,
            "prerouting",
            base(Hook::Prerouting, -100, ChainKind::Nat, Policy::Accept),
        )
        .add_chain(
            inet,
            TABLE,
            "postrouting",
            base(Hook::Postrouting, 100, ChainKind::Nat, Policy::Accept),
        )
        .add_chain(inet, TABLE, "extra", None)
        .add_rule(
            inet,
            TABLE,
            "forward",
            [iifname("int0"), dsl::drop()].concat(),
            Some("drop from int0"),
        )
        .add_rule(
            inet,
            TABLE,
            "forward",
            [
                ip_saddr_in("10.1.2.0/24".parse().unwrap()),
                counter(),
                accept(),
            ]
            .concat(),
            Some("lan"),
        )
        .add_rule(
            inet,
            TABLE,
            "forward",
            [ct_state(CtState::ESTABLISHED | CtState::RELATED), accept()].concat(),
            None,
        )
        .add_rule(
            inet,
            TABLE,
            "forward",
            [icmp_id_range(8, 100, 200), dsl::drop()].concat(),
            Some("probes"),
        )
        .add_rule(inet, TABLE, "forward", jump("extra"), None)
        .add_rule(
            inet,
            TABLE,
            "extra",
            [oifname("eth0"), dsl::return_()].concat(),
            None,
        )
        .add_rule(
            inet,
            TABLE,
            "prerouting",
            [
                ip_daddr("10.0.0.1".parse().unwrap()),
                udp_dport(5555),
                dnat_ip("10.0.0.2".parse().unwrap()),
            ]
            .concat(),
            Some("service"),
        )
        .add_rule(
            inet,
            TABLE,
            "postrouting",
            [oifname("ext0"), masquerade()].concat(),
            Some("out"),
        );
    nft_handle.apply(&batch).expect("apply");

    let ruleset = ruleset_json(ns);
    let tables = objects(&ruleset, "table");
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(tables[0]["family"], "inet");
    assert_eq!(tables[0]["name"], TABLE);

    for (name, kind, hook, prio, policy) in [
        ("forward", "filter", "forward", 0, "accept"),
        ("input", "filter", "input", -5, "drop"),
        ("prerouting", "nat", "prerouting", -100, "accept"),
        ("postrouting", "nat", "postrouting", 100, "accept"),
    ] {
        let c = chain(&ruleset, "inet", TABLE, name);
        assert_eq!(c["type"], kind, "{c}");
        assert_eq!(c["hook"], hook, "{c}");
        assert_eq!(c["prio"], prio, "{c}");
        assert_eq!(c["policy"], policy, "{c}");
    }
    let extra = chain(&ruleset, "inet", TABLE, "extra");
    assert!(extra.get("hook").is_none(), "regular chain: {extra}");

    let forward = rules(&ruleset, "inet", TABLE, "forward");
    let exprs = |rule: &Value| rule["expr"].clone();
    let comment = |rule: &Value| rule.get("comment").cloned().unwrap_or(Value::Null);
    assert_eq!(forward.len(), 5, "{forward:#?}");
    assert_eq!(
        exprs(forward[0]),
        json!([
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "int0"}},
            {"drop": null}
        ])
    );
    assert_eq!(comment(forward[0]), "drop from int0");
    assert_eq!(
        exprs(forward[1]),
        json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": "10.1.2.0", "len": 24}}}},
            {"counter": {"packets": 0, "bytes": 0}},
            {"accept": null}
        ])
    );
    assert_eq!(comment(forward[1]), "lan");
    assert_eq!(
        exprs(forward[2]),
        json!([
            {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                       "right": ["established", "related"]}},
            {"accept": null}
        ])
    );
    assert_eq!(comment(forward[2]), Value::Null);
    // An echo request with an id in 100..=200, after the implicit ipv4/icmp dependencies.
    assert_eq!(
        exprs(forward[3]),
        json!([
            {"match": {"op": "==",
                       "left": {"payload": {"protocol": "icmp", "field": "type"}},
                       "right": "echo-request"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "icmp", "field": "id"}},
                       "right": {"range": [100, 200]}}},
            {"drop": null}
        ])
    );
    assert_eq!(comment(forward[3]), "probes");
    assert_eq!(exprs(forward[4]), json!([{"jump": {"target": "extra"}}]));

    assert_eq!(
        exprs(rules(&ruleset, "inet", TABLE, "extra")[0]),
        json!([
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}},
            {"return": null}
        ])
    );
    let prerouting = rules(&ruleset, "inet", TABLE, "prerouting");
    assert_eq!(
        exprs(prerouting[0]),
        json!([
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": "10.0.0.1"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                       "right": 5555}},
            {"dnat": {"family": "ip", "addr": "10.0.0.2"}}
        ])
    );
    assert_eq!(comment(prerouting[0]), "service");
    let postrouting = rules(&ruleset, "inet", TABLE, "postrouting");
    assert_eq!(
        exprs(postrouting[0]),
        json!([
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "ext0"}},
            {"masquerade": null}
        ])
    );

    // And as text, the way an operator sees it.
    let text = nft(ns, &["list", "chain", "inet", TABLE, "forward"]);
    assert!(
        text.contains(r#"iifname "int0" drop comment "drop from int0""#),
        "{text}"
    );
}

/// Each rule built here must be exactly what nft generates for the same
/// rule text: compared as nft reads the kernel's bytecode back
/// (`nft --debug=netlink list chain`), comments included.
#[test]
fn encodings_equal_those_nft_generates_for_the_same_rules() {
    let namespace = scratch_netns("nft-encodings");
    let ns = namespace.name();
    let addr = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    let filter_rules: Vec<(&str, Vec<Expr>, Option<&str>)> = vec![
        (
            r#"iifname "int0" drop"#,
            [iifname("int0"), dsl::drop()].concat(),
            None,
        ),
        (
            r#"oifname "eth0" meta mark 0x7 accept"#,
            [oifname("eth0"), meta_mark(7), accept()].concat(),
            None,
        ),
        (
            "ip saddr 10.1.2.0/24 accept",
            [ip_saddr_in("10.1.2.0/24".parse().unwrap()), accept()].concat(),
            None,
        ),
        (
            "ip saddr 10.1.0.0/20 accept",
            [ip_saddr_in("10.1.0.0/20".parse().unwrap()), accept()].concat(),
            None,
        ),
        (
            "ip daddr 10.1.2.3 accept",
            [ip_daddr(addr("10.1.2.3")), accept()].concat(),
            None,
        ),
        (
            "ip6 saddr fd00::/64 accept",
            [ip_saddr_in("fd00::/64".parse().unwrap()), accept()].concat(),
            None,
        ),
        (
            "ip6 daddr fd00::1 accept",
            [ip_daddr(addr("fd00::1")), accept()].concat(),
            None,
        ),
        (
            "meta l4proto 6 accept",
            [l4proto(6), accept()].concat(),
            None,
        ),
        (
            "icmp type 8 accept",
            [icmp_type(8), accept()].concat(),
            None,
        ),
        (
            r#"udp dport 5555 counter accept comment "hello world""#,
            [udp_dport(5555), counter(), accept()].concat(),
            Some("hello world"),
        ),
        (
            "tcp dport 443 accept",
            [tcp_dport(443), accept()].concat(),
            None,
        ),
        (
            "ct state new drop",
            [ct_state(CtState::NEW), dsl::drop()].concat(),
            None,
        ),
        (
            "ct state established,related accept",
            [ct_state(CtState::ESTABLISHED | CtState::RELATED), accept()].concat(),
            None,
        ),
        (
            "ct mark 0x10 accept",
            [ct_mark(0x10), accept()].concat(),
            None,
        ),
        ("ct mark set 0x10", set_ct_mark(0x10), None),
        ("meta mark set 0x10", set_meta_mark(0x10), None),
        (
            "numgen random mod 100 < 50 drop",
            [numgen_random_below(100, 50), dsl::drop()].concat(),
            None,
        ),
        ("jump extra", jump("extra"), None),
        ("goto extra", goto("extra"), None),
        ("return", dsl::return_(), None),
    ];
    let nat_rules: Vec<(&str, Vec<Expr>, Option<&str>)> = vec![
        (
            "ip daddr 10.0.0.1 udp dport 5555 dnat ip to 10.0.0.2",
            [
                ip_daddr(addr("10.0.0.1")),
                udp_dport(5555),
                dnat_ip(addr("10.0.0.2")),
            ]
            .concat(),
            None,
        ),
        (
            "udp dport 5555 dnat ip to 10.0.0.2:6666",
            [udp_dport(5555), dnat_ip_port(addr("10.0.0.2"), 6666)].concat(),
            None,
        ),
        (
            "tcp dport 5555 dnat ip6 to [fd00::2]:6666",
            [tcp_dport(5555), dnat_ip_port(addr("fd00::2"), 6666)].concat(),
            None,
        ),
    ];
    let post_rules: Vec<(&str, Vec<Expr>, Option<&str>)> = vec![
        ("snat ip to 10.0.0.9", snat_ip(addr("10.0.0.9")), None),
        (
            r#"oifname "ext0" masquerade comment "out""#,
            [oifname("ext0"), masquerade()].concat(),
            Some("out"),
        ),
    ];

    // The reference: nft's own encoding.
    let mut script = String::from(
        "add table inet ref\n\
         add chain inet ref filter { type filter hook forward priority 0; policy accept; }\n\
         add chain inet ref nat { type nat hook prerouting priority -100; policy accept; }\n\
         add chain inet ref post { type nat hook postrouting priority 100; policy accept; }\n\
         add chain inet ref extra\n",
    );
    let groups = [
        ("filter", &filter_rules),
        ("nat", &nat_rules),
        ("post", &post_rules),
    ];
    for (chain_name, group) in groups {
        for (text, _, _) in group {
            script.push_str(&format!("add rule inet ref {chain_name} {text}\n"));
        }
    }
    let script_path = std::env::temp_dir().join(format!("{ns}.nft"));
    std::fs::write(&script_path, &script).expect("writing the nft script");
    let loaded = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f"])
        .arg(&script_path)
        .output()
        .expect("running nft -f");
    let _ = std::fs::remove_file(&script_path);
    assert!(
        loaded.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );

    // Ours.
    let inet = Family::Inet;
    let mut batch = Batch::new();
    batch
        .add_table(inet, "ours")
        .add_chain(
            inet,
            "ours",
            "filter",
            base(Hook::Forward, 0, ChainKind::Filter, Policy::Accept),
        )
        .add_chain(
            inet,
            "ours",
            "nat",
            base(Hook::Prerouting, -100, ChainKind::Nat, Policy::Accept),
        )
        .add_chain(
            inet,
            "ours",
            "post",
            base(Hook::Postrouting, 100, ChainKind::Nat, Policy::Accept),
        )
        .add_chain(inet, "ours", "extra", None);
    for (chain_name, group) in groups {
        for (_, exprs, comment) in group {
            batch.add_rule(inet, "ours", chain_name, exprs.clone(), *comment);
        }
    }
    Nft::connect_in(ns)
        .expect("connect")
        .apply(&batch)
        .expect("apply");

    for (chain_name, group) in groups {
        let texts: Vec<&str> = group.iter().map(|rule| rule.0).collect();
        let reference = bytecode(ns, "inet", "ref", chain_name);
        let ours = bytecode(ns, "inet", "ours", chain_name);
        assert_eq!(reference.len(), texts.len(), "{reference:#?}");
        assert_eq!(ours.len(), texts.len(), "{ours:#?}");
        for ((text, want), got) in texts.iter().zip(&reference).zip(&ours) {
            assert!(
                !want.is_empty(),
                "nft printed no bytecode for `{text}`: {want:?}"
            );
            assert_eq!(got, want, "encoding of `{text}` differs from nft's");
        }
    }
}

#[test]
fn a_batch_with_a_failing_op_applies_nothing() {
    let namespace = scratch_netns("nft-atomic");
    let ns = namespace.name();
    let nft_handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;

    // Valid ops first, then a rule for a chain that does not exist.
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(
            inet,
            TABLE,
            "forward",
            base(Hook::Forward, 0, ChainKind::Filter, Policy::Accept),
        )
        .add_rule(inet, TABLE, "forward", accept(), Some("fine"))
        .add_rule(inet, TABLE, "missing", dsl::drop(), None);
    let err = nft_handle.apply(&batch).expect_err("the last op must fail");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "adding rule to inet {TABLE}/missing in netns {ns}"
        )),
        "{text}"
    );
    assert!(
        matches!(&err, Error::Kernel { errno, .. } if *errno == libc::ENOENT),
        "{err:?}"
    );
    assert!(!nft_handle.table_exists(inet, TABLE).expect("lookup"));
    assert_eq!(nft_handle.tables().expect("tables"), vec![]);
    assert!(objects(&ruleset_json(ns), "table").is_empty());

    // A kernel refusal other than "missing": jumping to a base chain.
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(
            inet,
            TABLE,
            "forward",
            base(Hook::Forward, 0, ChainKind::Filter, Policy::Accept),
        )
        .add_chain(
            inet,
            TABLE,
            "input",
            base(Hook::Input, 0, ChainKind::Filter, Policy::Accept),
        )
        .add_rule(inet, TABLE, "forward", jump("input"), None);
    let err = nft_handle.apply(&batch).expect_err("jump to a base chain");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "adding rule to inet {TABLE}/forward in netns {ns}: Operation not supported (os error 95)"
        )),
        "{text}"
    );
    assert!(!nft_handle.table_exists(inet, TABLE).expect("lookup"));

    // Refused before sending: a comparison longer than what was loaded.
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(inet, TABLE, "c", None)
        .add_rule(inet, TABLE, "c", iifname("much-too-long-ifname"), None);
    let text = format!("{:#}", nft_handle.apply(&batch).expect_err("bad rule"));
    assert!(
        text.contains(&format!("adding rule to inet {TABLE}/c in netns {ns}")),
        "{text}"
    );
    assert!(text.contains("holds only 16"), "{text}");
    assert!(!nft_handle.table_exists(inet, TABLE).expect("lookup"));

    // The same handle still works afterwards.
    let mut batch = Batch::new();
    batch.add_table(inet, TABLE);
    nft_handle.apply(&batch).expect("valid batch");
    assert!(nft_handle.table_exists(inet, TABLE).expect("lookup"));
}

#[test]
fn rules_lists_handles_and_comments_and_rules_can_be_deleted_by_handle() {
    let namespace = scratch_netns("nft-rules");
    let ns = namespace.name();
    let nft_handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;

    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_table(Family::Ip, "other")
        .add_chain(inet, TABLE, "c", None)
        .add_rule(
            inet,
            TABLE,
            "c",
            [udp_dport(1), accept()].concat(),
            Some("one"),
        )
        .add_rule(inet, TABLE, "c", [udp_dport(2), accept()].concat(), None)
        .add_rule(
            inet,
            TABLE,
            "c",
            [udp_dport(3), accept()].concat(),
            Some("three"),
        );
    nft_handle.apply(&batch).expect("apply");

    assert_eq!(
        nft_handle.tables().expect("tables"),
        vec![
            (Family::Inet, TABLE.to_owned()),
            (Family::Ip, "other".to_owned())
        ]
    );
    assert!(nft_handle.table_exists(inet, TABLE).expect("lookup"));
    assert!(!nft_handle.table_exists(Family::Ip, TABLE).expect("lookup"));

    let listed = nft_handle.rules(inet, TABLE, "c").expect("rules");
    let comments: Vec<Option<&str>> = listed.iter().map(|r| r.comment.as_deref()).collect();
    assert_eq!(comments, vec![Some("one"), None, Some("three")]);
    // The handles are the ones nft sees.
    let ruleset = ruleset_json(ns);
    let nft_handles: Vec<u64> = rules(&ruleset, "inet", TABLE, "c")
        .iter()
        .map(|r| r["handle"].as_u64().expect("handle"))
        .collect();
    let handles: Vec<u64> = listed.iter().map(|r| r.handle).collect();
    assert_eq!(handles, nft_handles);

    let mut batch = Batch::new();
    batch.delete_rule(inet, TABLE, "c", listed[1].handle);
    nft_handle.apply(&batch).expect("delete rule");
    assert_eq!(
        nft_handle.rules(inet, TABLE, "c").expect("rules"),
        vec![listed[0].clone(), listed[2].clone()]
    );
    let remaining = rules(&ruleset_json(ns), "inet", TABLE, "c")
        .iter()
        .map(|r| r["expr"][0]["match"]["right"].clone())
        .collect::<Vec<_>>();
    assert_eq!(remaining, vec![json!(1), json!(3)]);

    // Deleting it again fails, naming the handle.
    let text = format!("{:#}", nft_handle.apply(&batch).expect_err("gone"));
    assert!(
        text.contains(&format!(
            "deleting rule {} from inet {TABLE}/c in netns {ns}",
            listed[1].handle
        )),
        "{text}"
    );

    // Flushing keeps the chain and drops its rules.
    let mut batch = Batch::new();
    batch.flush_table(inet, TABLE);
    nft_handle.apply(&batch).expect("flush");
    assert_eq!(
        nft_handle.rules(inet, TABLE, "c").expect("rules"),
        Vec::<RuleInfo>::new()
    );

    // A chain that does not exist is an error, not an empty list.
    let err = nft_handle.rules(inet, TABLE, "nope").expect_err("no chain");
    assert!(
        format!("{err:#}").contains(&format!("listing rules of inet {TABLE}/nope in netns {ns}")),
        "{err:#}"
    );
    assert!(
        matches!(&err, Error::NotFound { what, .. } if *what == format!("chain inet {TABLE}/nope")),
        "{err:?}"
    );

    let mut batch = Batch::new();
    batch
        .delete_table(inet, TABLE)
        .delete_table(Family::Ip, "other");
    nft_handle.apply(&batch).expect("delete tables");
    assert_eq!(nft_handle.tables().expect("tables"), vec![]);
    // An empty batch is a no-op.
    nft_handle.apply(&Batch::new()).expect("empty batch");
}

/// Thousands of ops in one transaction (the kernel acknowledges each), and
/// a rule dump that spans many datagrams.
#[test]
fn large_batches_and_long_listings_work() {
    let namespace = scratch_netns("nft-large");
    let ns = namespace.name();
    let nft_handle = Nft::connect_in(ns).expect("connect");
    let inet = Family::Inet;
    let count: u16 = 3000;
    let mut batch = Batch::new();
    batch
        .add_table(inet, TABLE)
        .add_chain(inet, TABLE, "c", None);
    for port in 1..=count {
        let comment = format!("rule for port {port}");
        batch.add_rule(
            inet,
            TABLE,
            "c",
            [udp_dport(port), counter(), accept()].concat(),
            Some(&comment),
        );
    }
    nft_handle.apply(&batch).expect("apply");
    let listed = nft_handle.rules(inet, TABLE, "c").expect("rules");
    assert_eq!(listed.len(), usize::from(count));
    assert_eq!(listed[0].comment.as_deref(), Some("rule for port 1"));
    assert_eq!(
        listed.last().and_then(|rule| rule.comment.as_deref()),
        Some("rule for port 3000")
    );
}

#[test]
fn connect_in_a_missing_namespace_names_it() {
    let name = scratch_name("nft-missing");
    let err = Nft::connect_in(&name).expect_err("no such namespace");
    assert!(format!("{err:#}").contains(&name), "{err:#}");
}
