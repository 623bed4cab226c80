//! Interval maps of concatenations (the kernel's pipapo set type): ranges
//! added, listed by nft and by our own dump, deleted, refused where they
//! overlap, and looked up by a rule whose result packets obey;
//! checked with the `nft` binary as the independent reader.

use trellis_testkit::netns as netns_support;
use trellis_testkit::nft as nft_support;

use netns_support::scratch_netns;
use nft_support::{Routed, nft, ping, ping_works};
use serde_json::Value;
use trellis_dataplane::nftables::dsl;
use trellis_dataplane::nftables::{
    BaseChain, Batch, ByteorderOp, ChainKind, DataType, Datum, ElemKey, ElemValue, Expr, Family,
    Hook, LookupResult, MetaKey, Nft, NumgenKind, Policy, Reg, SetElem, SetFlags, SetRef, SetSpec,
    concat, concat_interval,
};

const TABLE: &str = "trellis_intervals";

/// `mark . mark : mark, flags interval`: what nft makes of `typeof meta
/// mark . meta mark : meta mark; flags interval`, and what a weighted
/// choice among a service's endpoints looks up (count of endpoints . a
/// random number below 65536 : index of the endpoint). Marks, not
/// integers: nft cannot print a concatenation of `integer`s (it has no
/// width; nft's own such sets carry `typeof` userdata), and aborts listing
/// one.
fn slots_spec() -> SetSpec {
    let mark = DataType::Mark;
    SetSpec::map(&[mark, mark], &[mark]).with_flags(SetFlags::INTERVAL)
}

/// The same with `integer`s: the kernel does not care, nft cannot list it.
fn integer_slots_spec() -> SetSpec {
    let int = DataType::Integer;
    SetSpec::map(&[int, int], &[int]).with_flags(SetFlags::INTERVAL)
}

/// `count . lo-hi : index`: keys in network order (see `concat_interval`),
/// the value in host order as for any map.
fn slot(count: u32, lo: u32, hi: u32, index: u32) -> SetElem {
    let key = concat_interval(&[Datum::Mark(count), Datum::Mark(lo)]);
    let end = concat_interval(&[Datum::Mark(count), Datum::Mark(hi)]);
    SetElem::range(key, end).with_value(concat(&[Datum::Mark(index)]))
}

/// Key, key end and value of an element.
type Listed = (Vec<u8>, Option<Vec<u8>>, Option<ElemValue>);

fn slot_key(count: u32, lo: u32, hi: u32) -> ElemKey {
    ElemKey::from(&slot(count, lo, hi, 0))
}

/// The elements of `nft -j list map` as (count, lo, hi, value).
fn nft_elements(ns: &str, map: &str) -> Vec<(u64, u64, u64, u64)> {
    let text = nft(ns, &["-j", "list", "map", "ip", TABLE, map]);
    let json: Value =
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("bad JSON ({err}): {text}"));
    let map = json["nftables"]
        .as_array()
        .and_then(|objects| objects.iter().find_map(|o| o.get("map")))
        .unwrap_or_else(|| panic!("no map in {text}"));
    let Some(elements) = map["elem"].as_array() else {
        return Vec::new();
    };
    let number = |v: &Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("not a number: {v} in {text}"))
    };
    let mut out: Vec<_> = elements
        .iter()
        .map(|pair| {
            let fields = pair[0]["concat"]
                .as_array()
                .unwrap_or_else(|| panic!("not a concatenation: {pair} in {text}"));
            let count = number(&fields[0]);
            // nft shows a range that is a prefix of the 32-bit mark as one.
            let (lo, hi) = match (fields[1].get("range"), fields[1].get("prefix")) {
                (Some(range), _) => (number(&range[0]), number(&range[1])),
                (_, Some(prefix)) => {
                    let lo = number(&prefix["addr"]);
                    (lo, lo + (1 << (32 - number(&prefix["len"]))) - 1)
                }
                _ => (number(&fields[1]), number(&fields[1])),
            };
            (count, lo, hi, number(&pair[1]))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn concat_interval_maps_hold_ranges_as_nft_lists_them() {
    let namespace = scratch_netns("nft-intervals-map");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let ip = Family::Ip;
    let elements = vec![
        slot(10, 0, 6553, 0),
        slot(10, 6554, 13106, 1),
        slot(10, 13107, 65535, 2),
        slot(3, 0, 65535, 7),
        // A range of one key.
        slot(1, 5, 5, 9),
    ];
    let mut batch = Batch::new();
    batch
        .add_table(ip, TABLE)
        .add_set(ip, TABLE, "slots", slots_spec())
        .add_elements(ip, TABLE, "slots", elements.clone())
        .add_set(ip, TABLE, "int-slots", integer_slots_spec())
        .add_elements(ip, TABLE, "int-slots", elements.clone());
    handle.apply(&batch).expect("apply");

    // nft reads the map as a concatenation of integers with ranges.
    let text = nft(ns, &["list", "map", "ip", TABLE, "slots"]);
    assert!(text.contains("flags interval"), "{text}");
    assert_eq!(
        nft_elements(ns, "slots"),
        [
            (1, 5, 5, 9),
            (3, 0, 65535, 7),
            (10, 0, 6553, 0),
            (10, 6554, 13106, 1),
            (10, 13107, 65535, 2),
        ],
        "{text}"
    );

    // The specs read back as they were added: interval kept, the kernel's
    // concat flag and field widths not exposed.
    let sets = handle.sets(ip, TABLE).expect("sets");
    let specs: Vec<(&str, &SetSpec, bool)> = sets
        .iter()
        .map(|s| (s.name.as_str(), &s.spec, s.anonymous))
        .collect();
    assert_eq!(
        specs,
        [
            ("slots", &slots_spec(), false),
            ("int-slots", &integer_slots_spec(), false)
        ]
    );

    // Our own dump: key, key end and value byte for byte.
    let mut want: Vec<_> = elements
        .iter()
        .map(|e| (e.key.clone(), e.key_end.clone(), e.value.clone()))
        .collect();
    want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    for map in ["slots", "int-slots"] {
        let mut listed: Vec<Listed> = handle
            .elements(ip, TABLE, map)
            .expect("elements")
            .into_iter()
            .map(|e| (e.key, e.key_end, e.value))
            .collect();
        listed.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        assert_eq!(listed, want, "{map}");
        assert_eq!(
            listed[0].1.as_deref(),
            Some(&[0, 0, 0, 1, 0, 0, 0, 5][..]),
            "keys of interval sets are big-endian"
        );
    }

    // Adding the same set again (same spec) keeps it and its elements.
    let mut batch = Batch::new();
    batch.add_set(ip, TABLE, "slots", slots_spec());
    handle.apply(&batch).expect("same spec again");
    assert_eq!(handle.elements(ip, TABLE, "slots").unwrap().len(), 5);
    // The same map without the interval flag is another type.
    let mut batch = Batch::new();
    let mut plain = slots_spec();
    plain.flags = SetFlags::NONE;
    batch.add_set(ip, TABLE, "slots", plain);
    let err = handle.apply(&batch).expect_err("another type");
    assert!(err.has_errno(libc::EEXIST), "{err:?}");
}

#[test]
fn range_elements_are_deleted_and_overlaps_refused() {
    let namespace = scratch_netns("nft-intervals-delete");
    let ns = namespace.name();
    let handle = Nft::connect_in(ns).expect("connect");
    let ip = Family::Ip;
    let mut batch = Batch::new();
    batch
        .add_table(ip, TABLE)
        .add_set(ip, TABLE, "slots", slots_spec())
        .add_elements(
            ip,
            TABLE,
            "slots",
            vec![
                slot(2, 0, 32767, 0),
                slot(2, 32768, 65535, 1),
                slot(3, 0, 65535, 0),
            ],
        );
    handle.apply(&batch).expect("apply");

    // Delete one range (named by both its ends, as nft does); destroying
    // one that is not there is fine.
    let mut batch = Batch::new();
    batch
        .delete_elements(ip, TABLE, "slots", [slot_key(2, 0, 32767)])
        .destroy_elements(ip, TABLE, "slots", [slot_key(7, 0, 65535)]);
    handle.apply(&batch).expect("delete and destroy");
    assert_eq!(
        nft_elements(ns, "slots"),
        [(2, 32768, 65535, 1), (3, 0, 65535, 0)]
    );
    let listed = handle.elements(ip, TABLE, "slots").expect("elements");
    assert_eq!(listed.len(), 2);

    // Deleting a range that is not there fails and names it, ends and all.
    let mut batch = Batch::new();
    batch.delete_elements(ip, TABLE, "slots", [slot_key(2, 0, 32767)]);
    let err = handle.apply(&batch).expect_err("no such range");
    assert!(err.has_errno(libc::ENOENT), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "deleting 1 element from set ip {TABLE}/slots (element 0, key 00000002 00000000 - \
             00000002 00007fff)"
        )),
        "{err}"
    );

    // A range overlapping another is refused (EEXIST), and the refused
    // element is named by its index; nothing of the batch is applied.
    let mut batch = Batch::new();
    batch.add_elements(
        ip,
        TABLE,
        "slots",
        vec![
            slot(4, 0, 100, 0),
            slot(2, 60000, 65535, 5),
            slot(5, 0, 100, 0),
        ],
    );
    let refused = handle.apply_detailed(&batch).expect_err("overlap");
    assert!(refused.error.has_errno(libc::EEXIST), "{:?}", refused.error);
    assert_eq!((refused.op, refused.element), (Some(0), Some(1)));
    assert!(
        refused
            .to_string()
            .contains("(element 1, key 00000002 0000ea60 - 00000002 0000ffff)"),
        "{refused}"
    );
    assert_eq!(handle.elements(ip, TABLE, "slots").unwrap().len(), 2);

    // Moving a boundary: delete and re-add in one batch.
    let mut batch = Batch::new();
    batch
        .delete_elements(ip, TABLE, "slots", [slot_key(2, 32768, 65535)])
        .add_elements(
            ip,
            TABLE,
            "slots",
            vec![slot(2, 0, 19999, 0), slot(2, 20000, 65535, 1)],
        );
    handle.apply(&batch).expect("moving a boundary");
    assert_eq!(
        nft_elements(ns, "slots"),
        [(2, 0, 19999, 0), (2, 20000, 65535, 1), (3, 0, 65535, 0)]
    );

    // The kernel deletes the range that holds the key given (the end is
    // sent, as nft sends it, but not compared): a key inside a range
    // deletes it. Hence stale ranges go before the ranges that replace
    // them, as above.
    let mut batch = Batch::new();
    batch.destroy_elements(
        ip,
        TABLE,
        "slots",
        [concat_interval(&[Datum::Mark(2), Datum::Mark(30000)])],
    );
    handle.apply(&batch).expect("deleting by a key inside");
    assert_eq!(
        nft_elements(ns, "slots"),
        [(2, 0, 19999, 0), (3, 0, 65535, 0)]
    );

    // Many ranges in bounded transactions, added and deleted: one range
    // weighs one element.
    let many: Vec<SetElem> = (100..400)
        .map(|count| slot(count, 0, 65535, count))
        .collect();
    let mut batch = Batch::new();
    batch.add_elements(ip, TABLE, "slots", many.clone());
    assert_eq!(batch.weight(), 300);
    assert_eq!(handle.apply_in_batches(&batch, 128).expect("adding"), 3);
    assert_eq!(handle.elements(ip, TABLE, "slots").unwrap().len(), 302);
    let mut batch = Batch::new();
    batch.destroy_elements(ip, TABLE, "slots", many.iter().map(ElemKey::from));
    assert_eq!(handle.apply_in_batches(&batch, 128).expect("deleting"), 3);
    assert_eq!(handle.elements(ip, TABLE, "slots").unwrap().len(), 2);
}

/// `meta mark set 10 . numgen random mod 65536 map @slots`, as nft would
/// generate it for a constant first field: the count as an immediate in
/// network order, the random number converted to network order after it,
/// the lookup's value into a register, the mark set from it.
fn mark_by_slot(count: u32) -> Vec<Expr> {
    let random = Reg::r32(1).expect("register");
    vec![
        Expr::Immediate {
            dreg: Reg::R1,
            data: count.to_be_bytes().to_vec(),
        },
        Expr::Numgen {
            kind: NumgenKind::Random,
            modulus: 65536,
            offset: 0,
            dreg: random,
        },
        Expr::Byteorder {
            sreg: random,
            dreg: random,
            op: ByteorderOp::Hton,
            len: 4,
            size: 4,
        },
        Expr::Lookup {
            sreg: Reg::R1,
            set: SetRef::Named("slots".into()),
            result: LookupResult::Value(Reg::R3),
        },
        Expr::MetaSet {
            key: MetaKey::Mark,
            sreg: Reg::R3,
        },
    ]
}

/// Pings from A through R, where R marks each packet by a lookup of `10 .
/// random` in the interval map and drops mark 1: the ranges decide how
/// many get through.
#[test]
fn a_rule_looks_a_random_number_up_in_an_interval_map() {
    let net = Routed::new("nft-intervals-rule");
    assert!(
        ping_works(net.a(), Routed::B),
        "A reaches B before any rule"
    );
    let handle = Nft::connect_in(net.r()).expect("connect to R");
    let ip = Family::Ip;
    let forward = Some(BaseChain {
        hook: Hook::Forward,
        priority: 0,
        kind: ChainKind::Filter,
        policy: Policy::Accept,
    });
    let mut batch = Batch::new();
    batch
        .add_table(ip, TABLE)
        .add_chain(ip, TABLE, "forward", forward)
        // Integers here (the kernel takes them as marks); nft still lists
        // the rule.
        .add_set(ip, TABLE, "slots", integer_slots_spec())
        // Every number maps to 1 for count 10.
        .add_elements(ip, TABLE, "slots", vec![slot(10, 0, 65535, 1)])
        // Only requests (from A): with replies too the loss would compound.
        .add_rule(
            ip,
            TABLE,
            "forward",
            [dsl::iifname(Routed::R_TO_A), mark_by_slot(10)].concat(),
            Some("mark by slot"),
        )
        .add_rule(
            ip,
            TABLE,
            "forward",
            [dsl::meta_mark(1), dsl::drop()].concat(),
            None,
        );
    handle.apply(&batch).expect("programming R");
    let listed = nft(net.r(), &["list", "chain", "ip", TABLE, "forward"]);
    assert!(
        listed.contains("numgen random mod 65536") && listed.contains("@slots"),
        "{listed}"
    );
    assert_eq!(ping(net.a(), Routed::B, 5, "0.01"), 0, "all marked 1");

    // Half the numbers map to 1, half to 2: about half get through.
    let mut batch = Batch::new();
    batch
        .delete_elements(ip, TABLE, "slots", [slot_key(10, 0, 65535)])
        .add_elements(
            ip,
            TABLE,
            "slots",
            vec![slot(10, 0, 32767, 1), slot(10, 32768, 65535, 2)],
        );
    handle.apply(&batch).expect("splitting the range");
    let sent = 200;
    let received = ping(net.a(), Routed::B, sent, "0.005");
    let lost = f64::from(sent - received) / f64::from(sent);
    assert!(
        (0.25..=0.75).contains(&lost),
        "lost {lost:.2} of {sent} pings, expected about half"
    );

    // The first field counts too: a map with only count 9 matches nothing
    // (the rule stops, the mark stays 0), so nothing is dropped.
    let mut batch = Batch::new();
    batch.flush_set(ip, TABLE, "slots").add_elements(
        ip,
        TABLE,
        "slots",
        vec![slot(9, 0, 65535, 1)],
    );
    handle.apply(&batch).expect("another count");
    assert_eq!(ping(net.a(), Routed::B, 5, "0.01"), 5, "none marked");
}

#[test]
fn single_field_interval_sets_are_refused_before_sending() {
    let namespace = scratch_netns("nft-intervals-refused");
    let handle = Nft::connect_in(namespace.name()).expect("connect");
    let mut batch = Batch::new();
    batch.add_table(Family::Ip, TABLE).add_set(
        Family::Ip,
        TABLE,
        "ports",
        SetSpec::set(&[DataType::InetService]).with_flags(SetFlags::INTERVAL),
    );
    let err = handle.apply(&batch).expect_err("single field");
    assert!(err.to_string().contains("two fields or more"), "{err}");
    assert!(!handle.table_exists(Family::Ip, TABLE).expect("lookup"));
}
