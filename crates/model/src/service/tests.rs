use super::*;
use crate::Validate;

/// A valid ClusterIP Service with one port and a selector, as tests elsewhere start from.
pub(crate) fn service(name: &str) -> Service {
    let mut svc = Service::new("default", name);
    svc.spec.selector.insert("app".into(), name.into());
    svc.spec.ports = vec![ServicePort::new("http", 80)];
    svc
}

/// What people write, and what `kubectl get -o yaml` prints back, with every field kind.
const MANIFEST: &str = r#"{
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "web",
        "labels": {"app.kubernetes.io/name": "web"},
        "annotations": {"example.com/owner": "team a"},
        "creationTimestamp": null,
        "finalizers": ["service.kubernetes.io/load-balancer-cleanup"]
    },
    "spec": {
        "type": "LoadBalancer",
        "selector": {"app": "web"},
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053},
            {"name": "h2", "port": 443, "appProtocol": "kubernetes.io/h2c"}
        ],
        "sessionAffinity": "ClientIP",
        "externalIPs": ["198.51.100.7"],
        "externalTrafficPolicy": "Local",
        "internalTrafficPolicy": "Cluster",
        "loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8::/64"],
        "ipFamilyPolicy": "PreferDualStack",
        "publishNotReadyAddresses": false,
        "trafficDistribution": "PreferClose"
    },
    "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9", "ipMode": "VIP"},
                                            {"hostname": "lb.example.com"}]}}
}"#;

fn manifest() -> Service {
    serde_json::from_str(MANIFEST).unwrap()
}

#[test]
fn a_full_manifest_decodes_validates_and_round_trips() {
    let svc = manifest();
    svc.validate().unwrap();
    assert_eq!(svc.metadata.namespace, "default");
    assert_eq!(svc.spec.type_, ServiceType::LoadBalancer);
    assert_eq!(svc.spec.ports[1].protocol, crate::Protocol::Udp);
    assert_eq!(svc.spec.ports[1].node_port(), Some(30053));
    assert_eq!(
        svc.external_ips(),
        ["198.51.100.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        svc.load_balancer_ips(),
        ["203.0.113.9".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(svc.source_ranges().len(), 2);
    let back: Service = serde_json::from_value(serde_json::to_value(&svc).unwrap()).unwrap();
    assert_eq!(back, svc, "nothing is lost on a round trip");
    let json = serde_json::to_value(&svc).unwrap();
    assert_eq!(
        json["metadata"]["finalizers"][0],
        "service.kubernetes.io/load-balancer-cleanup"
    );
}

#[test]
fn defaulting_fills_what_the_api_server_fills() {
    let mut svc = manifest();
    svc.set_defaults();
    let ports = &svc.spec.ports;
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("http".into()))
    );
    assert_eq!(
        ports[2].target_port,
        Some(IntOrString::Int(443)),
        "targetPort = port"
    );
    assert_eq!(ports[2].protocol, crate::Protocol::Tcp);
    assert_eq!(svc.affinity_timeout_seconds(), Some(10800));
    assert_eq!(svc.spec.allocate_load_balancer_node_ports, Some(true));
    svc.validate().unwrap();

    let mut plain = service("web");
    plain.set_defaults();
    assert_eq!(
        plain.spec.internal_traffic_policy,
        Some(TrafficPolicy::Cluster)
    );
    assert_eq!(
        plain.spec.external_traffic_policy, None,
        "only for NodePort and LoadBalancer"
    );
    assert_eq!(plain.affinity_timeout_seconds(), None);
    let mut node_port = service("web");
    node_port.spec.type_ = ServiceType::NodePort;
    node_port.set_defaults();
    assert_eq!(node_port.external_traffic_policy(), TrafficPolicy::Cluster);
}

#[test]
fn helpers_the_proxy_reads() {
    let mut svc = service("web");
    assert!(!svc.is_headless());
    assert_eq!(svc.proxy_name(), None);
    svc.spec.cluster_ip = Some("None".into());
    assert!(svc.is_headless());
    assert!(svc.cluster_ips().is_empty());
    svc.metadata
        .labels
        .insert(SERVICE_PROXY_NAME_LABEL.into(), "other-proxy".into());
    assert_eq!(svc.proxy_name(), Some("other-proxy"));
    svc.spec.cluster_ips = vec!["10.96.0.10".into(), "fd00:10:96::a".into()];
    assert_eq!(svc.cluster_ips().len(), 2);
}

type Change = fn(&mut Service);

#[test]
fn invalid_services_are_refused_naming_field_and_value() {
    let cases: Vec<(Change, &str, &str)> = vec![
        (|s| s.metadata.name = "1web".into(), "metadata.name", "1web"),
        (
            |s| s.metadata.namespace = "Prod".into(),
            "metadata.namespace",
            "Prod",
        ),
        (|s| s.spec.ports.clear(), "spec.ports", ""),
        (
            |s| s.spec.ports[1].target_port = Some(IntOrString::String("Http!".into())),
            "spec.ports[1].targetPort",
            "Http!",
        ),
        (
            |s| s.spec.ports[1].target_port = Some(IntOrString::String("8080".into())),
            "spec.ports[1].targetPort",
            "8080",
        ),
        (
            |s| s.spec.ports[0].port = 70000,
            "spec.ports[0].port",
            "70000",
        ),
        (
            |s| s.spec.ports[2].target_port = Some(IntOrString::Int(-1)),
            "spec.ports[2].targetPort",
            "-1",
        ),
        (
            |s| s.spec.ports[1].name = String::new(),
            "spec.ports[1].name",
            "",
        ),
        (
            |s| s.spec.ports[1].name = "http".into(),
            "spec.ports[1].name",
            "http",
        ),
        (
            |s| s.spec.ports[1].name = "DNS".into(),
            "spec.ports[1].name",
            "DNS",
        ),
        (
            |s| {
                s.spec.ports[2].port = 80;
                s.spec.ports[2].protocol = crate::Protocol::Tcp;
            },
            "spec.ports[2]",
            "80/TCP",
        ),
        (
            |s| s.spec.type_ = ServiceType::ClusterIP,
            "spec.ports[1].nodePort",
            "30053",
        ),
        (
            |s| {
                s.spec.type_ = ServiceType::NodePort;
                s.spec.external_traffic_policy = None;
                s.spec.health_check_node_port = None;
            },
            "spec.loadBalancerSourceRanges[0]",
            "192.0.2.0/24",
        ),
        (
            |s| s.spec.cluster_ip = Some("10.96.0.300".into()),
            "spec.clusterIP",
            "10.96.0.300",
        ),
        (
            |s| s.spec.cluster_ip = Some("None".into()),
            "spec.clusterIP",
            "None",
        ),
        (
            |s| {
                s.spec.cluster_ip = Some("10.96.0.10".into());
                s.spec.cluster_ips = vec!["10.96.0.11".into()];
            },
            "spec.clusterIPs[0]",
            "10.96.0.11",
        ),
        (
            |s| s.spec.cluster_ips = vec!["10.96.0.10".into(), "10.96.0.11".into()],
            "spec.clusterIPs[1]",
            "10.96.0.11",
        ),
        (
            |s| {
                s.spec.cluster_ips = vec!["10.96.0.10".into()];
                s.spec.ip_families = vec![IpFamily::IPv6];
            },
            "spec.ipFamilies[0]",
            "IPv6",
        ),
        (
            |s| {
                s.spec.ip_family_policy = Some(IpFamilyPolicy::SingleStack);
                s.spec.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
            },
            "spec.ipFamilies",
            "[IPv4, IPv6]",
        ),
        (
            |s| {
                s.spec.session_affinity_config = Some(SessionAffinityConfig {
                    client_ip: Some(ClientIpConfig {
                        timeout_seconds: Some(86401),
                    }),
                })
            },
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "86401",
        ),
        (
            |s| {
                s.spec.session_affinity = SessionAffinity::None;
                s.spec.session_affinity_config = Some(SessionAffinityConfig::default());
            },
            "spec.sessionAffinityConfig",
            "",
        ),
        (
            |s| s.spec.external_ips[0] = "198.51.100.300".into(),
            "spec.externalIPs[0]",
            "198.51.100.300",
        ),
        (
            |s| s.spec.external_ips[0] = "127.0.0.1".into(),
            "spec.externalIPs[0]",
            "127.0.0.1",
        ),
        (
            |s| s.spec.load_balancer_source_ranges[1] = "2001:db8::/129".into(),
            "spec.loadBalancerSourceRanges[1]",
            "2001:db8::/129",
        ),
        (
            |s| {
                s.spec.type_ = ServiceType::NodePort;
                s.spec.load_balancer_source_ranges.clear();
                s.spec.health_check_node_port = Some(30100);
            },
            "spec.healthCheckNodePort",
            "30100",
        ),
        (
            |s| {
                s.spec.type_ = ServiceType::ClusterIP;
                s.spec.ports[1].node_port = None;
                s.spec.load_balancer_source_ranges.clear();
            },
            "spec.externalTrafficPolicy",
            "Local",
        ),
        (
            |s| s.spec.external_traffic_policy = Some(TrafficPolicy::Cluster),
            "spec.healthCheckNodePort",
            "31000",
        ),
        (
            |s| s.spec.traffic_distribution = Some("Nearby".into()),
            "spec.trafficDistribution",
            "Nearby",
        ),
        (
            |s| {
                s.spec.selector.insert("app".into(), "web server".into());
            },
            "spec.selector[app]",
            "web server",
        ),
        (
            |s| s.status.load_balancer.ingress[0].ip = Some("203.0.113".into()),
            "status.loadBalancer.ingress[0].ip",
            "203.0.113",
        ),
        (|s| s.kind = "Endpoints".into(), "kind", "Endpoints"),
    ];
    for (i, (change, field, value)) in cases.into_iter().enumerate() {
        let mut svc = manifest();
        svc.spec.health_check_node_port = Some(31000);
        change(&mut svc);
        let e = svc.validate().unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            (field, value),
            "case {i}: {e}"
        );
    }
}

#[test]
fn external_name_services_have_no_addresses() {
    let mut svc = Service::new("default", "db");
    svc.spec.type_ = ServiceType::ExternalName;
    svc.spec.external_name = Some("db.example.com.".into());
    svc.set_defaults();
    svc.validate().unwrap();
    assert_eq!(svc.spec.internal_traffic_policy, None);
    svc.spec.cluster_ip = Some("10.96.0.10".into());
    assert_eq!(svc.validate().unwrap_err().field, "spec.clusterIP");
    svc.spec.cluster_ip = None;
    svc.spec.external_name = Some("not a name".into());
    assert_eq!(svc.validate().unwrap_err().field, "spec.externalName");
}

#[test]
fn typos_in_spec_are_refused_like_strict_field_validation() {
    for (typo, key) in [
        (r#""clusterIp": "None""#, "clusterIp"),
        (r#""sessionAfinity": "None""#, "sessionAfinity"),
    ] {
        let text = MANIFEST.replace(r#""trafficDistribution": "PreferClose""#, typo);
        let e = serde_json::from_str::<Service>(&text).unwrap_err();
        assert!(
            e.to_string().contains(&format!("unknown field `{key}`")),
            "{e}"
        );
    }
    let bad_enum = MANIFEST.replace(r#""Local""#, r#""local""#);
    assert!(serde_json::from_str::<Service>(&bad_enum).is_err());
}
