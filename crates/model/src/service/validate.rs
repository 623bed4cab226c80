//! The API server's validation of a Service (`ValidateService`), the rules that matter to
//! a proxy and to `kubectl` users. Context-free: whether an address is in the service
//! range, or a node port in the node port range, is the allocator's to say.

use super::{
    CLUSTER_IP_NONE, IpFamily, IpFamilyPolicy, MAX_AFFINITY_TIMEOUT_SECONDS, SERVICE_API_VERSION,
    SERVICE_KIND, Service, ServiceSpec, ServiceStatus, ServiceType, SessionAffinity,
};
use crate::meta::{IntOrString, expect, port_number};
use crate::{InvalidField, Validate, dns};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// `trafficDistribution` values the API server knows.
const TRAFFIC_DISTRIBUTIONS: [&str; 3] = ["PreferClose", "PreferSameZone", "PreferSameNode"];

impl Validate for Service {
    fn validate(&self) -> Result<(), InvalidField> {
        expect("apiVersion", &self.api_version, SERVICE_API_VERSION)?;
        expect("kind", &self.kind, SERVICE_KIND)?;
        self.metadata.validate_with(dns::dns1035_label)?;
        let spec = &self.spec;
        addresses(spec)?;
        ports(spec)?;
        affinity(spec)?;
        external(spec)?;
        load_balancer(spec)?;
        dns::labels("spec.selector", &spec.selector)?;
        if let Some(d) = &spec.traffic_distribution
            && !TRAFFIC_DISTRIBUTIONS.contains(&d.as_str())
        {
            return Err(InvalidField::new(
                "spec.trafficDistribution",
                d,
                format!("supported values: {}", TRAFFIC_DISTRIBUTIONS.join(", ")),
            ));
        }
        status(&self.status)
    }
}

fn ip(field: &str, text: &str) -> Result<IpAddr, InvalidField> {
    text.parse().map_err(|_| {
        InvalidField::new(
            field,
            text,
            "must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff)",
        )
    })
}

fn forbidden_unless(
    allowed: bool,
    field: &str,
    value: impl ToString,
    when: &str,
) -> Result<(), InvalidField> {
    if allowed {
        return Ok(());
    }
    Err(InvalidField::new(
        field,
        value,
        format!("may only be set when {when}"),
    ))
}

/// clusterIP(s), IP families and the policy, and the ExternalName that replaces them.
fn addresses(spec: &ServiceSpec) -> Result<(), InvalidField> {
    if spec.type_ == ServiceType::ExternalName {
        let name = spec.external_name.as_deref().unwrap_or_default();
        // A trailing dot (a fully qualified name) is accepted, as by the API server.
        dns::subdomain("spec.externalName", name.strip_suffix('.').unwrap_or(name))?;
        if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()) {
            return Err(InvalidField::new(
                "spec.clusterIP",
                ip,
                "may not be set for ExternalName services",
            ));
        }
        if let Some(ip) = spec.cluster_ips.first() {
            return Err(InvalidField::new(
                "spec.clusterIPs",
                ip,
                "may not be set for ExternalName services",
            ));
        }
        if let Some(f) = spec.ip_families.first() {
            return Err(InvalidField::new(
                "spec.ipFamilies",
                f,
                "may not be set for ExternalName services",
            ));
        }
        if let Some(p) = spec.ip_family_policy {
            return Err(InvalidField::new(
                "spec.ipFamilyPolicy",
                format!("{p:?}"),
                "may not be set for ExternalName services",
            ));
        }
        return Ok(());
    }
    let headless = spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
    if headless && spec.type_ != ServiceType::ClusterIP {
        return Err(InvalidField::new(
            "spec.clusterIP",
            CLUSTER_IP_NONE,
            format!("may not be set to 'None' for {} services", spec.type_),
        ));
    }
    if let Some(cluster_ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|c| !c.is_empty() && !headless)
    {
        ip("spec.clusterIP", cluster_ip)?;
    }
    if let (Some(primary), Some(first)) = (&spec.cluster_ip, spec.cluster_ips.first())
        && !primary.is_empty()
        && primary != first
    {
        return Err(InvalidField::new(
            "spec.clusterIPs[0]",
            first,
            format!("must match clusterIP {primary:?}"),
        ));
    }
    if spec.cluster_ips.len() > 2 {
        return Err(InvalidField::new(
            "spec.clusterIPs",
            spec.cluster_ips.join(","),
            "may hold at most two addresses, one per IP family",
        ));
    }
    let mut families = Vec::new();
    for (i, text) in spec.cluster_ips.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if text == CLUSTER_IP_NONE {
            if spec.cluster_ips.len() > 1 {
                return Err(InvalidField::new(
                    field,
                    text,
                    "'None' must be the only clusterIPs entry",
                ));
            }
            continue;
        }
        let family = IpFamily::of(&ip(&field, text)?);
        if families.contains(&family) {
            return Err(InvalidField::new(
                field,
                text,
                "may specify no more than one IP for each IP family",
            ));
        }
        families.push(family);
    }
    if spec.ip_families.len() > 2 {
        return Err(InvalidField::new(
            "spec.ipFamilies",
            format!("{:?}", spec.ip_families),
            "may hold at most two families",
        ));
    }
    for (i, family) in spec.ip_families.iter().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        if spec.ip_families[..i].contains(family) {
            return Err(InvalidField::new(field, family, "duplicate family"));
        }
        if let Some(of_ip) = families.get(i).filter(|f| *f != family) {
            return Err(InvalidField::new(
                field,
                family,
                format!(
                    "must match the family of clusterIPs[{i}] {:?} ({of_ip})",
                    spec.cluster_ips[i]
                ),
            ));
        }
    }
    if spec.ip_family_policy == Some(IpFamilyPolicy::SingleStack) {
        if spec.ip_families.len() > 1 {
            return Err(InvalidField::new(
                "spec.ipFamilies",
                format!("{:?}", spec.ip_families),
                "must hold one family when ipFamilyPolicy is SingleStack",
            ));
        }
        if families.len() > 1 {
            return Err(InvalidField::new(
                "spec.clusterIPs",
                spec.cluster_ips.join(","),
                "must hold one address when ipFamilyPolicy is SingleStack",
            ));
        }
    }
    Ok(())
}

fn ports(spec: &ServiceSpec) -> Result<(), InvalidField> {
    let headless = spec.cluster_ip.as_deref() == Some(CLUSTER_IP_NONE);
    if spec.ports.is_empty() && !headless && spec.type_ != ServiceType::ExternalName {
        return Err(InvalidField::new(
            "spec.ports",
            "",
            "required: a Service that is not headless needs at least one port",
        ));
    }
    let node_ports_allowed = matches!(
        spec.type_,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    let mut names = BTreeSet::new();
    let mut port_protocols = BTreeSet::new();
    let mut node_port_protocols = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        if p.name.is_empty() {
            if spec.ports.len() > 1 {
                return Err(InvalidField::new(
                    field("name"),
                    "",
                    "required when a Service has more than one port",
                ));
            }
        } else {
            dns::label(&field("name"), &p.name)?;
            if !names.insert(&p.name) {
                return Err(InvalidField::new(field("name"), &p.name, "duplicate name"));
            }
        }
        let port = port_number(&field("port"), p.port)?;
        if !port_protocols.insert((port, p.protocol)) {
            return Err(InvalidField::new(
                format!("spec.ports[{i}]"),
                format!("{port}/{}", p.protocol),
                "duplicate port and protocol",
            ));
        }
        match &p.target_port {
            None => {}
            Some(IntOrString::Int(0)) => {}
            Some(IntOrString::Int(n)) => drop(port_number(&field("targetPort"), *n)?),
            Some(IntOrString::String(s)) if s.is_empty() => {}
            Some(IntOrString::String(s)) => dns::iana_service_name(&field("targetPort"), s)?,
        }
        if let Some(node_port) = p.node_port.filter(|n| *n != 0) {
            forbidden_unless(
                node_ports_allowed,
                &field("nodePort"),
                node_port,
                "type is NodePort or LoadBalancer",
            )?;
            let node_port = port_number(&field("nodePort"), node_port)?;
            if !node_port_protocols.insert((node_port, p.protocol)) {
                return Err(InvalidField::new(
                    field("nodePort"),
                    node_port,
                    format!("duplicate node port for {}", p.protocol),
                ));
            }
        }
        if let Some(a) = &p.app_protocol {
            dns::qualified_name(&field("appProtocol"), a)?;
        }
    }
    Ok(())
}

fn affinity(spec: &ServiceSpec) -> Result<(), InvalidField> {
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref()?.timeout_seconds);
    match spec.session_affinity {
        SessionAffinity::None => {
            if spec.session_affinity_config.is_some() {
                return Err(InvalidField::new(
                    "spec.sessionAffinityConfig",
                    timeout.map(|t| t.to_string()).unwrap_or_default(),
                    "must not be set when sessionAffinity is None",
                ));
            }
        }
        SessionAffinity::ClientIP => {
            if let Some(t) = timeout
                && !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t)
            {
                return Err(InvalidField::new(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    t,
                    format!("must be between 1 and {MAX_AFFINITY_TIMEOUT_SECONDS}"),
                ));
            }
        }
    }
    Ok(())
}

/// What makes a Service reachable from outside: external IPs, policies, the health check.
fn external(spec: &ServiceSpec) -> Result<(), InvalidField> {
    for (i, text) in spec.external_ips.iter().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        let addr = ip(&field, text)?;
        let special = if addr.is_unspecified() {
            Some("may not be unspecified (0.0.0.0 or ::)")
        } else if addr.is_loopback() {
            Some("may not be in the loopback range (127.0.0.0/8, ::1/128)")
        } else if addr.is_multicast() {
            Some("may not be a multicast address")
        } else if is_link_local(&addr) {
            Some("may not be in the link-local range (169.254.0.0/16, fe80::/10)")
        } else {
            None
        };
        if let Some(reason) = special {
            return Err(InvalidField::new(field, text, reason));
        }
    }
    let external_type = matches!(
        spec.type_,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    if let Some(p) = spec.external_traffic_policy {
        forbidden_unless(
            external_type,
            "spec.externalTrafficPolicy",
            format!("{p:?}"),
            "type is NodePort or LoadBalancer",
        )?;
    }
    if let Some(port) = spec.health_check_node_port.filter(|p| *p != 0) {
        forbidden_unless(
            spec.type_ == ServiceType::LoadBalancer
                && spec.external_traffic_policy == Some(super::TrafficPolicy::Local),
            "spec.healthCheckNodePort",
            port,
            "type is LoadBalancer and externalTrafficPolicy is Local",
        )?;
        port_number("spec.healthCheckNodePort", port)?;
    }
    Ok(())
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn load_balancer(spec: &ServiceSpec) -> Result<(), InvalidField> {
    let lb = spec.type_ == ServiceType::LoadBalancer;
    for (i, range) in spec.load_balancer_source_ranges.iter().enumerate() {
        let field = format!("spec.loadBalancerSourceRanges[{i}]");
        forbidden_unless(lb, &field, range, "type is LoadBalancer")?;
        if range.trim().parse::<ipnet::IpNet>().is_err() {
            return Err(InvalidField::new(
                field,
                range,
                "must be a CIDR (e.g. 192.0.2.0/24 or 2001:db8::/64)",
            ));
        }
    }
    if let Some(class) = &spec.load_balancer_class {
        forbidden_unless(lb, "spec.loadBalancerClass", class, "type is LoadBalancer")?;
        dns::qualified_name("spec.loadBalancerClass", class)?;
    }
    if let Some(allocate) = spec.allocate_load_balancer_node_ports {
        forbidden_unless(
            lb,
            "spec.allocateLoadBalancerNodePorts",
            allocate,
            "type is LoadBalancer",
        )?;
    }
    if let Some(text) = spec.load_balancer_ip.as_deref().filter(|t| !t.is_empty()) {
        ip("spec.loadBalancerIP", text)?;
    }
    Ok(())
}

fn status(status: &ServiceStatus) -> Result<(), InvalidField> {
    for (i, ingress) in status.load_balancer.ingress.iter().enumerate() {
        let field = |f: &str| format!("status.loadBalancer.ingress[{i}].{f}");
        match (&ingress.ip, ingress.ip_mode) {
            (Some(text), _) => drop(ip(&field("ip"), text)?),
            (None, Some(mode)) => {
                return Err(InvalidField::new(
                    field("ipMode"),
                    format!("{mode:?}"),
                    "may only be set when ip is set",
                ));
            }
            (None, None) => {}
        }
        if let Some(host) = &ingress.hostname {
            dns::subdomain(&field("hostname"), host)?;
        }
        for (j, p) in ingress.ports.iter().enumerate() {
            port_number(&field(&format!("ports[{j}].port")), p.port)?;
        }
    }
    Ok(())
}
