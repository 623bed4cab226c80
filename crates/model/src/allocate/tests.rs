use super::*;
use crate::meta::Protocol;
use crate::service::{TrafficPolicy, tests::service};
use crate::{PortRange, Validate};
use proptest::prelude::*;

fn v4_only() -> ServiceSettings {
    ServiceSettings {
        cidrs: vec!["10.96.0.0/24".parse().unwrap()],
        node_port_range: None,
    }
}

fn alloc(
    svc: &mut Service,
    settings: &ServiceSettings,
    taken: &Claims,
) -> Result<(), InvalidField> {
    svc.set_defaults();
    svc.validate()?;
    allocate(svc, None, settings, taken, 0)?;
    svc.validate()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_cluster_ip_service_gets_one_address_of_the_primary_family() {
    let mut svc = service("web");
    alloc(&mut svc, &ServiceSettings::default(), &Claims::default()).unwrap();
    let [addr] = svc.cluster_ips()[..] else {
        panic!("{:?}", svc.spec)
    };
    let range: IpNet = "10.96.0.0/12".parse().unwrap();
    assert!(range.contains(&addr) && addr != range.network() && addr != range.broadcast());
    assert_eq!(svc.spec.cluster_ip, Some(addr.to_string()));
    assert_eq!(svc.spec.ip_families, [IpFamily::IPv4]);
    assert_eq!(svc.spec.ip_family_policy, Some(IpFamilyPolicy::SingleStack));
    assert!(svc.spec.ports[0].node_port.is_none());
    let again = {
        let mut s = service("web");
        alloc(&mut s, &ServiceSettings::default(), &Claims::default()).unwrap();
        s
    };
    assert_eq!(again, svc, "the same inputs give the same answer");
}

#[test]
fn dual_stack_follows_the_policy_and_the_configured_ranges() {
    let dual = ServiceSettings::default();
    let mut prefer = service("web");
    prefer.spec.ip_family_policy = Some(IpFamilyPolicy::PreferDualStack);
    alloc(&mut prefer, &dual, &Claims::default()).unwrap();
    assert_eq!(prefer.spec.ip_families, [IpFamily::IPv4, IpFamily::IPv6]);
    assert!(prefer.cluster_ips()[1].is_ipv6());

    let mut v6_first = service("web");
    v6_first.spec.ip_families = vec![IpFamily::IPv6];
    v6_first.spec.ip_family_policy = Some(IpFamilyPolicy::RequireDualStack);
    alloc(&mut v6_first, &dual, &Claims::default()).unwrap();
    assert_eq!(v6_first.spec.ip_families, [IpFamily::IPv6, IpFamily::IPv4]);
    assert!(v6_first.cluster_ips()[0].is_ipv6());

    let mut prefer_on_v4 = service("web");
    prefer_on_v4.spec.ip_family_policy = Some(IpFamilyPolicy::PreferDualStack);
    alloc(&mut prefer_on_v4, &v4_only(), &Claims::default()).unwrap();
    assert_eq!(prefer_on_v4.spec.ip_families, [IpFamily::IPv4]);

    let mut require = service("web");
    require.spec.ip_family_policy = Some(IpFamilyPolicy::RequireDualStack);
    let e = alloc(&mut require, &v4_only(), &Claims::default()).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.value.as_str()),
        ("spec.ipFamilyPolicy", "RequireDualStack")
    );

    let mut v6 = service("web");
    v6.spec.ip_families = vec![IpFamily::IPv6];
    let e = alloc(&mut v6, &v4_only(), &Claims::default()).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.value.as_str()),
        ("spec.ipFamilies[0]", "IPv6")
    );
}

#[test]
fn requested_addresses_must_be_free_and_in_range() {
    let taken = Claims {
        ips: [ip("10.96.0.10")].into(),
        ..Claims::default()
    };
    let ask = |addr: &str| {
        let mut svc = service("dns");
        svc.spec.cluster_ip = Some(addr.into());
        alloc(&mut svc, &v4_only(), &taken).map(|()| svc)
    };
    assert_eq!(ask("10.96.0.11").unwrap().cluster_ips(), [ip("10.96.0.11")]);
    for (addr, says) in [
        ("10.96.0.10", "already allocated"),
        ("10.97.0.1", "not in the service range 10.96.0.0/24"),
        ("10.96.0.0", "not in the service range"),
        ("10.96.0.255", "not in the service range"),
        ("fd00:10:96::1", "this cluster has no service CIDR"),
    ] {
        let e = ask(addr).unwrap_err();
        assert!(e.field.starts_with("spec.clusterIP"), "{e}");
        assert!(e.to_string().contains(says), "{addr}: {e}");
    }
}

#[test]
fn a_full_range_is_reported_not_looped_over() {
    let tiny = ServiceSettings {
        cidrs: vec!["10.96.0.0/30".parse().unwrap()],
        node_port_range: None,
    };
    let mut taken = Claims::default();
    for name in ["a", "b"] {
        let mut svc = service(name);
        alloc(&mut svc, &tiny, &taken).unwrap();
        taken.extend(&svc.claims());
    }
    assert_eq!(taken.ips, [ip("10.96.0.1"), ip("10.96.0.2")].into());
    let e = alloc(&mut service("c"), &tiny, &taken).unwrap_err();
    assert!(e.reason.contains("no free address"), "{e}");
}

#[test]
fn headless_services_get_no_address_but_families() {
    let mut with_selector = service("db");
    with_selector.spec.cluster_ip = Some("None".into());
    alloc(
        &mut with_selector,
        &ServiceSettings::default(),
        &Claims::default(),
    )
    .unwrap();
    assert_eq!(with_selector.spec.cluster_ips, ["None"]);
    assert_eq!(with_selector.spec.ip_families, [IpFamily::IPv4]);
    assert!(with_selector.claims().is_empty());

    let mut selectorless = service("db");
    selectorless.spec.cluster_ip = Some("None".into());
    selectorless.spec.selector.clear();
    selectorless.spec.ports.clear();
    alloc(
        &mut selectorless,
        &ServiceSettings::default(),
        &Claims::default(),
    )
    .unwrap();
    assert_eq!(
        selectorless.spec.ip_family_policy,
        Some(IpFamilyPolicy::RequireDualStack)
    );
    assert_eq!(
        selectorless.spec.ip_families,
        [IpFamily::IPv4, IpFamily::IPv6]
    );
}

#[test]
fn node_ports_are_allocated_shared_across_protocols_and_checked() {
    let mut dns = service("dns");
    dns.spec.type_ = ServiceType::NodePort;
    dns.spec.ports = vec![
        ServicePort::new("dns-udp", 53),
        ServicePort::new("dns-tcp", 53),
    ];
    dns.spec.ports[0].protocol = Protocol::Udp;
    dns.spec.ports.push(ServicePort::new("metrics", 9153));
    alloc(&mut dns, &v4_only(), &Claims::default()).unwrap();
    let ports: Vec<u16> = dns
        .spec
        .ports
        .iter()
        .filter_map(|p| p.node_port())
        .collect();
    assert_eq!(ports.len(), 3);
    assert_eq!(ports[0], ports[1], "53/UDP and 53/TCP share one node port");
    assert_ne!(ports[0], ports[2]);
    assert!(ports.iter().all(|p| (30000..=32767).contains(p)));
    // The upper part of the range first: the lower one is for hand-picked ports.
    assert!(ports.iter().all(|p| *p >= 30086), "{ports:?}");

    let taken = Claims {
        node_ports: [30080].into(),
        ..Claims::default()
    };
    let ask = |port: i32| {
        let mut svc = service("web");
        svc.spec.type_ = ServiceType::NodePort;
        svc.spec.ports[0].node_port = Some(port);
        alloc(&mut svc, &v4_only(), &taken).map(|()| svc)
    };
    assert_eq!(ask(30081).unwrap().spec.ports[0].node_port, Some(30081));
    let e = ask(30080).unwrap_err();
    assert_eq!(
        (e.field.as_str(), e.value.as_str()),
        ("spec.ports[0].nodePort", "30080")
    );
    let e = ask(8080).unwrap_err();
    assert!(e.reason.contains("30000-32767"), "{e}");
}

#[test]
fn load_balancers_get_node_ports_and_a_health_check_port_as_configured() {
    let mut local = service("lb");
    local.spec.type_ = ServiceType::LoadBalancer;
    local.spec.external_traffic_policy = Some(TrafficPolicy::Local);
    alloc(&mut local, &v4_only(), &Claims::default()).unwrap();
    let hc = local.health_check_node_port().expect("a health check port");
    assert_ne!(Some(hc), local.spec.ports[0].node_port());
    assert_eq!(local.claims().node_ports.len(), 2);

    let mut no_node_ports = service("lb");
    no_node_ports.spec.type_ = ServiceType::LoadBalancer;
    no_node_ports.spec.allocate_load_balancer_node_ports = Some(false);
    alloc(&mut no_node_ports, &v4_only(), &Claims::default()).unwrap();
    assert_eq!(no_node_ports.spec.ports[0].node_port, None);
    assert_eq!(no_node_ports.health_check_node_port(), None);
}

#[test]
fn an_update_keeps_what_was_allocated() {
    let settings = ServiceSettings::default();
    let mut old = service("web");
    old.spec.type_ = ServiceType::LoadBalancer;
    old.spec.external_traffic_policy = Some(TrafficPolicy::Local);
    old.spec.ip_family_policy = Some(IpFamilyPolicy::PreferDualStack);
    alloc(&mut old, &settings, &Claims::default()).unwrap();

    let manifest = || {
        let mut new = service("web");
        new.spec.type_ = ServiceType::LoadBalancer;
        new.spec.external_traffic_policy = Some(TrafficPolicy::Local);
        new.set_defaults();
        new
    };
    let mut same = manifest();
    allocate(&mut same, Some(&old), &settings, &Claims::default(), 5).unwrap();
    assert_eq!(same, old, "a re-applied manifest changes nothing");

    let mut moved = manifest();
    moved.spec.cluster_ip = Some("10.96.0.99".into());
    let e = allocate(&mut moved, Some(&old), &settings, &Claims::default(), 0).unwrap_err();
    assert_eq!(e.field, "spec.clusterIP");
    assert!(e.reason.contains("immutable"), "{e}");

    let mut single = manifest();
    single.spec.ip_family_policy = Some(IpFamilyPolicy::SingleStack);
    allocate(&mut single, Some(&old), &settings, &Claims::default(), 0).unwrap();
    assert_eq!(
        single.cluster_ips(),
        old.cluster_ips()[..1],
        "the secondary is given up"
    );
    assert_eq!(single.spec.ip_families, [IpFamily::IPv4]);

    let mut cluster_ip = service("web");
    cluster_ip.set_defaults();
    allocate(
        &mut cluster_ip,
        Some(&old),
        &settings,
        &Claims::default(),
        0,
    )
    .unwrap();
    let claims = cluster_ip.claims();
    assert!(
        claims.node_ports.is_empty(),
        "a ClusterIP Service holds no node ports"
    );
    assert_eq!(claims.ips, old.claims().ips, "but keeps its addresses");
}

fn small_range() -> ServiceSettings {
    ServiceSettings {
        cidrs: vec![
            "10.96.0.0/27".parse().unwrap(),
            "fd00::/123".parse().unwrap(),
        ],
        node_port_range: Some(PortRange {
            first: 30000,
            last: 30040,
        }),
    }
}

prop_compose! {
    /// A Service in a deliberately small range, sometimes asking for specific values.
    fn any_service()(
        name in "[a-z]{1,6}",
        type_ in prop_oneof![
            Just(ServiceType::ClusterIP),
            Just(ServiceType::NodePort),
            Just(ServiceType::LoadBalancer)
        ],
        policy in prop_oneof![
            Just(None),
            Just(Some(IpFamilyPolicy::SingleStack)),
            Just(Some(IpFamilyPolicy::PreferDualStack)),
            Just(Some(IpFamilyPolicy::RequireDualStack))
        ],
        asked_ip in proptest::option::of(0u32..34),
        ports in proptest::collection::btree_map(1u16..20, proptest::option::of(29995i32..30045), 1..4),
        local in any::<bool>(),
    ) -> Service {
        let mut svc = service(&name);
        svc.spec.type_ = type_;
        svc.spec.ip_family_policy = policy;
        svc.spec.cluster_ip = asked_ip.map(|n| Ipv4Addr::from(0x0a60_0000 + n).to_string());
        svc.spec.ports = ports
            .into_iter()
            .map(|(port, node_port)| {
                let mut p = ServicePort::new(&format!("p{port}"), port);
                p.node_port = node_port.filter(|_| type_ != ServiceType::ClusterIP);
                p
            })
            .collect();
        if local && type_ != ServiceType::ClusterIP {
            svc.spec.external_traffic_policy = Some(TrafficPolicy::Local);
        }
        svc
    }
}

fn arbitrary_claims() -> impl Strategy<Value = Claims> {
    (
        proptest::collection::btree_set(0u32..32, 0..32),
        proptest::collection::btree_set(0u128..32, 0..32),
        proptest::collection::btree_set(30000u16..=30040, 0..41),
    )
        .prop_map(|(v4, v6, node_ports)| Claims {
            ips: v4
                .into_iter()
                .map(|n| IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + n)))
                .chain(
                    v6.into_iter()
                        .map(|n| IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) + n))),
                )
                .collect(),
            node_ports,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_hands_out_a_taken_or_out_of_range_value_and_keeps_requests(
        mut svc in any_service(),
        taken in arbitrary_claims(),
        salt in any::<u64>(),
    ) {
        let settings = small_range();
        let asked = svc.clone();
        svc.set_defaults();
        prop_assume!(svc.validate().is_ok());
        match allocate(&mut svc, None, &settings, &taken, salt) {
            Ok(()) => {
                prop_assert!(svc.validate().is_ok(), "{:?}", svc.validate());
                let claims = svc.claims();
                for addr in &claims.ips {
                    prop_assert!(!taken.ips.contains(addr), "{addr} was taken");
                    let cidr = settings.cidr_for(IpFamily::of(addr)).unwrap();
                    prop_assert!(cidr.contains(addr));
                    prop_assert!(*addr != cidr.network() && *addr != cidr.broadcast());
                }
                for port in &claims.node_ports {
                    prop_assert!(!taken.node_ports.contains(port), "{port} was taken");
                    prop_assert!(settings.node_port_range().contains(*port));
                }
                if let Some(asked) = &asked.spec.cluster_ip {
                    prop_assert_eq!(svc.spec.cluster_ip.as_ref(), Some(asked));
                }
                let node_ports_needed = svc.uses_node_ports();
                for (before, after) in asked.spec.ports.iter().zip(&svc.spec.ports) {
                    if before.node_port.is_some() {
                        prop_assert_eq!(before.node_port, after.node_port);
                    }
                    prop_assert_eq!(after.node_port.is_some(), node_ports_needed);
                }
                // Distinct service ports get distinct node ports; the health check its own.
                let distinct: BTreeSet<u16> =
                    svc.spec.ports.iter().filter_map(ServicePort::node_port).collect();
                if node_ports_needed {
                    prop_assert_eq!(distinct.len(), svc.spec.ports.len());
                }
                prop_assert_eq!(
                    svc.health_check_node_port().is_some(),
                    svc.needs_health_check_node_port()
                );
            }
            Err(e) => {
                // Refused only for a reason it names: a requested value, or a full range.
                let names_request = asked.spec.cluster_ip.as_deref() == Some(e.value.as_str())
                    || asked.spec.ports.iter().any(|p| p.node_port.map(|n| n.to_string()) == Some(e.value.clone()));
                let full = e.reason.starts_with("no free");
                let policy = e.field == "spec.ipFamilyPolicy";
                prop_assert!(names_request || full || policy, "{e}");
            }
        }
    }

    #[test]
    fn requested_values_that_are_free_and_in_range_are_granted(
        n in 1u32..31,
        port in 30000i32..=30040,
        salt in any::<u64>(),
    ) {
        let mut svc = service("web");
        svc.spec.type_ = ServiceType::NodePort;
        svc.spec.cluster_ip = Some(Ipv4Addr::from(0x0a60_0000 + n).to_string());
        svc.spec.ports[0].node_port = Some(port);
        let asked = svc.clone();
        svc.set_defaults();
        allocate(&mut svc, None, &small_range(), &Claims::default(), salt).unwrap();
        prop_assert_eq!(&svc.spec.cluster_ip, &asked.spec.cluster_ip);
        prop_assert_eq!(svc.spec.ports[0].node_port, Some(port));
    }
}
