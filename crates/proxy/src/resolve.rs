//! From the Kubernetes objects to the planner's inputs, as kube-proxy reads them:
//!
//! - Services the proxy does not handle are skipped: ExternalName, headless, those
//!   without a ClusterIP, and those labelled `service.kubernetes.io/service-proxy-name`
//!   (handed to another proxy).
//! - A service port's endpoints come from the EndpointSlices labelled with the service's
//!   name in its namespace, through the slice port of the same name and protocol (the
//!   EndpointSlice controller has already resolved `targetPort`, by number or by name,
//!   into that port). FQDN slices are not proxied. Only an endpoint's first address is
//!   used: the API defines the others as interchangeable.
//! - NodePorts only for NodePort and LoadBalancer services, load-balancer IPs only in VIP
//!   mode, external traffic policy only where there is external traffic, the health
//!   check only for LoadBalancer services with the Local policy.

use crate::input::{Endpoint, Protocol, ServicePort, ServicePortName, TrafficPolicy};
use crate::plan::PortWithEndpoints;
use std::collections::BTreeMap;
use trellis_model::endpoint_slice::{AddressType, EndpointSlice};
use trellis_model::meta;
use trellis_model::service::{self, Service, ServiceType};

/// Every proxied service port with its endpoints, in a stable order.
pub fn resolve(services: &[Service], slices: &[EndpointSlice]) -> Vec<PortWithEndpoints> {
    let mut by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == AddressType::Fqdn {
            continue;
        }
        if let Some(service) = slice.service_name() {
            by_service
                .entry((slice.metadata.namespace.as_str(), service))
                .or_default()
                .push(slice);
        }
    }
    let mut ports = Vec::new();
    for svc in services {
        let key = (svc.metadata.namespace.as_str(), svc.metadata.name.as_str());
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        ports.extend(resolve_service(svc, slices));
    }
    ports.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    ports
}

/// One service's ports with their endpoints from `slices` (already the service's own).
pub fn resolve_service(svc: &Service, slices: &[&EndpointSlice]) -> Vec<PortWithEndpoints> {
    if svc.spec.type_ == ServiceType::ExternalName
        || svc.is_headless()
        || svc.proxy_name().is_some()
    {
        return Vec::new();
    }
    let cluster_ips = svc.cluster_ips();
    if cluster_ips.is_empty() {
        return Vec::new();
    }
    let external = svc.uses_node_ports()
        || !svc.external_ips().is_empty()
        || svc.spec.type_ == ServiceType::LoadBalancer;
    let load_balancer_ips = if svc.spec.type_ == ServiceType::LoadBalancer {
        svc.load_balancer_ips()
    } else {
        Vec::new()
    };
    let health_check_node_port = if svc.needs_health_check_node_port() {
        svc.health_check_node_port()
    } else {
        None
    };
    svc.spec
        .ports
        .iter()
        .filter(|p| p.port() != 0)
        .map(|p| {
            let protocol = protocol(p.protocol);
            let name = ServicePortName {
                namespace: svc.metadata.namespace.clone(),
                name: svc.metadata.name.clone(),
                port: p.name.clone(),
                protocol,
            };
            let port = ServicePort {
                name,
                cluster_ips: cluster_ips.clone(),
                port: p.port(),
                node_port: if svc.uses_node_ports() {
                    p.node_port()
                } else {
                    None
                },
                external_ips: svc.external_ips(),
                load_balancer_ips: load_balancer_ips.clone(),
                source_ranges: if load_balancer_ips.is_empty() {
                    Vec::new()
                } else {
                    svc.source_ranges()
                },
                affinity_seconds: svc.affinity_timeout_seconds(),
                external_policy: if external {
                    policy(svc.external_traffic_policy())
                } else {
                    TrafficPolicy::Cluster
                },
                internal_policy: policy(svc.internal_traffic_policy()),
                health_check_node_port,
            };
            let endpoints = endpoints(slices, &p.name, p.protocol);
            (port, endpoints)
        })
        .collect()
}

/// The endpoints behind the service port named `port_name`.
fn endpoints(slices: &[&EndpointSlice], port_name: &str, proto: meta::Protocol) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name && p.protocol == proto)
            .and_then(|p| p.port())
        else {
            continue;
        };
        for e in &slice.endpoints {
            let Some(addr) = e.ip() else { continue };
            out.push(Endpoint {
                addr,
                port: target,
                ready: e.is_ready(),
                serving: e.is_serving(),
                terminating: e.is_terminating(),
                node: e.node_name.clone(),
            });
        }
    }
    out
}

fn protocol(p: meta::Protocol) -> Protocol {
    match p {
        meta::Protocol::Tcp => Protocol::Tcp,
        meta::Protocol::Udp => Protocol::Udp,
        meta::Protocol::Sctp => Protocol::Sctp,
    }
}

fn policy(p: service::TrafficPolicy) -> TrafficPolicy {
    match p {
        service::TrafficPolicy::Cluster => TrafficPolicy::Cluster,
        service::TrafficPolicy::Local => TrafficPolicy::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::IpAddr;

    fn service(spec: serde_json::Value, status: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn slice(
        name: &str,
        ns: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_come_through_the_slice_port_of_the_same_name() {
        let svc = service(
            json!({"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "metrics", "port": 9090, "protocol": "TCP"},
            ]}),
            json!({}),
        );
        let slices = [
            slice(
                "web-1",
                "shop",
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
                json!([
                    {"addresses": ["10.244.1.5", "10.244.1.50"], "nodeName": "b1"},
                    {"addresses": ["10.244.2.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                ]),
            ),
            slice(
                "web-other-ns",
                "other",
                json!([{"name": "http", "port": 1, "protocol": "TCP"}]),
                json!([
                    {"addresses": ["10.244.9.9"]},
                ]),
            ),
        ];
        let ports = resolve(&[svc], &slices);
        assert_eq!(ports.len(), 2);
        let (http, eps) = ports.iter().find(|(p, _)| p.name.port == "http").unwrap();
        assert_eq!(http.port, 80);
        assert_eq!(http.cluster_ips, [ip("10.96.0.10")]);
        assert_eq!(
            eps.iter()
                .map(|e| (e.addr, e.port, e.ready, e.terminating))
                .collect::<Vec<_>>(),
            [
                (ip("10.244.1.5"), 8080, true, false),
                (ip("10.244.2.5"), 8080, false, true)
            ],
            "first address only; conditions defaulted; other namespaces ignored"
        );
        assert_eq!(eps[0].node.as_deref(), Some("b1"));
        let (_, metrics) = ports
            .iter()
            .find(|(p, _)| p.name.port == "metrics")
            .unwrap();
        assert!(
            metrics.is_empty(),
            "no slice port of that name: no endpoints"
        );
    }

    #[test]
    fn services_another_proxy_or_dns_handles_are_skipped() {
        let headless = service(
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            json!({}),
        );
        let external_name = service(
            json!({"type": "ExternalName", "externalName": "db.example.com"}),
            json!({}),
        );
        let mut foreign = service(
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
            json!({}),
        );
        foreign.metadata.labels.insert(
            "service.kubernetes.io/service-proxy-name".into(),
            "other".into(),
        );
        let unallocated = service(json!({"ports": [{"port": 80}]}), json!({}));
        assert!(resolve(&[headless, external_name, foreign, unallocated], &[]).is_empty());
    }

    #[test]
    fn external_addresses_policies_and_health_checks_follow_the_service_type() {
        let lb = service(
            json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                   "ports": [{"port": 80, "nodePort": 30080}],
                   "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                   "loadBalancerSourceRanges": ["198.18.0.0/16"],
                   "sessionAffinity": "ClientIP"}),
            json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "198.51.100.2", "ipMode": "Proxy"}]}}),
        );
        let ports = resolve(&[lb], &[]);
        let (p, _) = &ports[0];
        assert_eq!(p.node_port, Some(30080));
        assert_eq!(
            p.load_balancer_ips,
            [ip("198.51.100.1")],
            "Proxy mode: the LB is the destination"
        );
        assert_eq!(p.external_policy, TrafficPolicy::Local);
        assert_eq!(p.health_check_node_port, Some(32000));
        assert_eq!(p.source_ranges.len(), 1);
        assert_eq!(p.affinity_seconds, Some(10800));

        let cluster_ip = service(
            json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}], "internalTrafficPolicy": "Local"}),
            json!({}),
        );
        let (p, _) = &resolve(&[cluster_ip], &[])[0];
        assert_eq!(
            (p.node_port, p.external_policy, p.internal_policy),
            (None, TrafficPolicy::Cluster, TrafficPolicy::Local)
        );
    }
}
