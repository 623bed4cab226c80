//! `lab service`: Services whose backends are lab pods, written into the lab's store as the
//! API server and the EndpointSlice controller would write them: the Service through
//! [`trellis_agent::ctl::objects::apply`] (which allocates its ClusterIP and node ports
//! from the cluster's ranges), and one EndpointSlice, `NAME-lab`, with an endpoint per
//! backend pod (its address, `nodeName` its node, conditions ready). Every agent's proxy
//! follows them from the store. All of them live in namespace `default`.
//!
//! In a dual-stack lab a Service may have an IPv6 ClusterIP (from the default
//! fd00:10:96::/108) or one of each family (`--ip-families ipv6|dual`); the pods' IPv6
//! addresses are then the endpoints of a second slice, `NAME-lab-ipv6` (a slice holds
//! one address type). Pods reach an IPv6 ClusterIP; nodes and hosts do not: they have no
//! IPv6 address a reply could come back to, so NodePorts and load-balancer addresses stay
//! IPv4.

use crate::pods::{ECHO_PORT, L4};
use crate::spec::{LOAD_BALANCER_RANGE, LabSpec};
use crate::state::LabState;
use anyhow::{Context, bail};
use clap::ValueEnum;
use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use trellis_agent::ctl::objects::{self, ObjectRef};
use trellis_model::endpoint_slice::AddressType;
use trellis_model::endpoint_slice::EndpointSlice;
use trellis_model::service::{Service, ServiceType, SessionAffinity, TrafficPolicy};
use trellis_model::{Kind, Object, validate_name};

pub const NAMESPACE: &str = "default";
/// The one port of a lab Service, and of its slice.
const PORT_NAME: &str = "echo";
/// Marks what the lab wrote (as Kubernetes' `managed-by` labels).
const MANAGED_BY: &str = "trellis-lab";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Type {
    #[value(name = "ClusterIP")]
    ClusterIP,
    #[value(name = "NodePort")]
    NodePort,
    #[value(name = "LoadBalancer")]
    LoadBalancer,
}

/// The families a lab Service has ClusterIPs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Families {
    /// One IPv4 ClusterIP (the cluster's primary family).
    #[default]
    #[value(name = "ipv4")]
    Ipv4,
    /// One IPv6 ClusterIP, endpoints the pods' IPv6 addresses.
    #[value(name = "ipv6")]
    Ipv6,
    /// One of each (`RequireDualStack`, IPv4 first).
    #[value(name = "dual")]
    Dual,
}

impl Families {
    fn address_types(self) -> &'static [AddressType] {
        match self {
            Families::Ipv4 => &[AddressType::IPv4],
            Families::Ipv6 => &[AddressType::IPv6],
            Families::Dual => &[AddressType::IPv4, AddressType::IPv6],
        }
    }

    /// The families of the ClusterIPs a Service has.
    fn of(cluster_ips: &[IpAddr]) -> Families {
        match (
            cluster_ips.iter().any(IpAddr::is_ipv4),
            cluster_ips.iter().any(IpAddr::is_ipv6),
        ) {
            (true, true) => Families::Dual,
            (false, true) => Families::Ipv6,
            _ => Families::Ipv4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
pub enum Policy {
    #[value(name = "Cluster")]
    Cluster,
    #[value(name = "Local")]
    Local,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Cluster => "Cluster",
            Policy::Local => "Local",
        }
    }
}

/// What `lab service add` asks for.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: String,
    /// Checked here (1-65535), so that the refusal names the flag.
    pub port: u32,
    /// The pods' port; `None`: [`ECHO_PORT`], where every lab pod answers.
    pub target_port: Option<u32>,
    pub protocol: L4,
    pub type_: Type,
    /// Pod names (`a1-p0`); none: a Service without endpoints.
    pub backends: Vec<String>,
    /// ClientIP session affinity.
    pub affinity: bool,
    pub external_traffic_policy: Option<Policy>,
    pub internal_traffic_policy: Option<Policy>,
    /// The families of its ClusterIPs (and so of its endpoints).
    pub families: Families,
}

/// An endpoint's conditions, as an EndpointSlice carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    pub const READY: Conditions = Conditions {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// A pod being deleted that still serves: no new connections while others are ready.
    pub const TERMINATING: Conditions = Conditions {
        ready: false,
        serving: true,
        terminating: true,
    };
}

/// One backend of a lab Service, as its EndpointSlice says.
#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    /// The pod with this address, or the address itself when no pod has it.
    pub pod: String,
    pub ip: IpAddr,
    pub node: Option<String>,
    #[serde(flatten)]
    pub conditions: Conditions,
}

/// A lab Service as `lab service list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LabService {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// The first (primary) of `cluster_ips`.
    pub cluster_ip: Option<IpAddr>,
    /// One per family: two for a dual-stack Service.
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub target_port: String,
    pub protocol: String,
    pub node_port: Option<u16>,
    pub load_balancer_ip: Option<IpAddr>,
    pub affinity: bool,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub backends: Vec<Backend>,
}

/// The lab's slice of a Service's endpoints of one address type.
fn slice_name(service: &str, address_type: AddressType) -> String {
    match address_type {
        AddressType::IPv6 => format!("{service}-lab-ipv6"),
        _ => format!("{service}-lab"),
    }
}

/// The lab's slices of a Service, every address type.
fn slice_refs(service: &str) -> Vec<ObjectRef> {
    [AddressType::IPv4, AddressType::IPv6]
        .into_iter()
        .map(|t| ObjectRef {
            kind: Kind::EndpointSlice,
            namespace: NAMESPACE.into(),
            name: slice_name(service, t),
        })
        .collect()
}

fn port_number(flag: &str, value: u32) -> anyhow::Result<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => bail!("invalid {flag} {value}: ports are 1-65535"),
    }
}

/// The pods named by `--backends`, each with its node and its address of each of
/// `address_types` (in that order), in the order given.
fn backends<'a>(
    spec: &'a LabSpec,
    names: &[String],
    address_types: &[AddressType],
) -> anyhow::Result<Vec<(&'a str, Vec<IpAddr>)>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for name in names {
        let Some((node, pod)) = spec.all_pods().find(|(_, p)| p.name == *name) else {
            let pods: Vec<&str> = spec.all_pods().map(|(_, p)| p.name.as_str()).collect();
            bail!(
                "invalid --backends {name:?}: lab {} has no pod of that name (pods: {})",
                spec.name,
                pods.join(", ")
            );
        };
        if !seen.insert(name.as_str()) {
            bail!("invalid --backends {name:?}: given twice");
        }
        let mut addresses = Vec::with_capacity(address_types.len());
        for t in address_types {
            addresses.push(match t {
                AddressType::IPv6 => IpAddr::V6(pod.ip6.map(|a| a.addr()).with_context(|| {
                    format!(
                        "invalid --backends {name:?}: the pod has no IPv6 address (an IPv6 Service needs a lab made with `lab up --dual-stack`)"
                    )
                })?),
                _ => IpAddr::V4(pod.ip.addr()),
            });
        }
        out.push((node.name.as_str(), addresses));
    }
    Ok(out)
}

/// One slice per address type, each with every backend's address of that type.
fn slice_manifests(
    service: &str,
    l4: L4,
    target_port: u16,
    address_types: &[AddressType],
    backends: &[(&str, Vec<IpAddr>, Conditions)],
) -> Vec<Value> {
    (address_types.iter().enumerate())
        .map(|(i, t)| {
            let endpoints: Vec<(&str, IpAddr, Conditions)> = (backends.iter())
                .map(|(node, ips, c)| (*node, ips[i], *c))
                .collect();
            slice_manifest(service, *t, l4, target_port, &endpoints)
        })
        .collect()
}

/// `lab service add`: creates the Service and its EndpointSlice, or updates them (the
/// ClusterIP and node port stay). Bad input is refused before anything is written.
pub async fn add(lab: &str, request: &Request) -> anyhow::Result<LabService> {
    let state = LabState::load(lab)?;
    let spec = &state.spec;
    validate_name("NAME", &request.name)?;
    let port = port_number("--port", request.port)?;
    let target_port = match request.target_port {
        Some(p) => port_number("--target-port", p)?,
        None => ECHO_PORT,
    };
    if request.external_traffic_policy.is_some() && request.type_ == Type::ClusterIP {
        bail!(
            "invalid --external-traffic-policy {}: only for --type NodePort or LoadBalancer (a ClusterIP has no external traffic)",
            request.external_traffic_policy.map_or("", |p| p.name())
        );
    }
    let address_types = request.families.address_types();
    let backends = backends(spec, &request.backends, address_types)?;
    let store = crate::open_store(lab)?;
    let load_balancer_ip = match request.type_ {
        Type::LoadBalancer => Some(load_balancer_ip(store.as_ref(), &request.name).await?),
        _ => None,
    };
    let service = service_manifest(request, port, target_port, load_balancer_ip);
    let endpoints: Vec<(&str, Vec<IpAddr>, Conditions)> = backends
        .into_iter()
        .map(|(node, ips)| (node, ips, Conditions::READY))
        .collect();
    let slices = slice_manifests(
        &request.name,
        request.protocol,
        target_port,
        address_types,
        &endpoints,
    );
    let mut objects = vec![decode(service)?];
    for slice in slices {
        objects.push(decode(slice)?);
    }
    objects::apply(store.as_ref(), objects).await?;
    // A family the Service no longer has: its slice goes.
    let dropped: Vec<ObjectRef> = (slice_refs(&request.name).into_iter())
        .zip([AddressType::IPv4, AddressType::IPv6])
        .filter(|(_, t)| !address_types.contains(t))
        .map(|(r, _)| r)
        .collect();
    objects::delete(store.as_ref(), &dropped).await?;
    list(lab)
        .await?
        .into_iter()
        .find(|s| s.name == request.name)
        .with_context(|| {
            format!(
                "service {} is not in the store after the apply",
                request.name
            )
        })
}

fn decode(value: Value) -> anyhow::Result<Object> {
    Object::from_value(value).map_err(anyhow::Error::from)
}

fn service_manifest(
    request: &Request,
    port: u16,
    target_port: u16,
    load_balancer_ip: Option<Ipv4Addr>,
) -> Value {
    let type_ = match request.type_ {
        Type::ClusterIP => "ClusterIP",
        Type::NodePort => "NodePort",
        Type::LoadBalancer => "LoadBalancer",
    };
    let mut spec = json!({
        "type": type_,
        "ports": [{
            "name": PORT_NAME,
            "protocol": protocol(request.protocol),
            "port": port,
            "targetPort": target_port,
        }],
    });
    if request.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    if let Some(p) = request.external_traffic_policy {
        spec["externalTrafficPolicy"] = json!(p.name());
    }
    if let Some(p) = request.internal_traffic_policy {
        spec["internalTrafficPolicy"] = json!(p.name());
    }
    match request.families {
        Families::Ipv4 => {} // the cluster's primary family, as the API server defaults it
        Families::Ipv6 => {
            spec["ipFamilyPolicy"] = json!("SingleStack");
            spec["ipFamilies"] = json!(["IPv6"]);
        }
        Families::Dual => {
            spec["ipFamilyPolicy"] = json!("RequireDualStack");
            spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
        }
    }
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": request.name,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "spec": spec,
    });
    if let Some(ip) = load_balancer_ip {
        service["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}});
    }
    service
}

fn protocol(l4: L4) -> &'static str {
    match l4 {
        L4::Tcp => "TCP",
        L4::Udp => "UDP",
    }
}

fn slice_manifest(
    service: &str,
    address_type: AddressType,
    l4: L4,
    target_port: u16,
    endpoints: &[(&str, IpAddr, Conditions)],
) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(node, ip, c)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": c.ready, "serving": c.serving, "terminating": c.terminating},
                "nodeName": node,
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(service, address_type),
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "addressType": address_type.to_string(),
        "ports": [{"name": PORT_NAME, "protocol": protocol(l4), "port": target_port}],
        "endpoints": endpoints,
    })
}

/// The Service's load-balancer address: the one it has, else the lowest of
/// [`LOAD_BALANCER_RANGE`] no Service holds.
async fn load_balancer_ip(
    store: &dyn trellis_store::Store,
    name: &str,
) -> anyhow::Result<Ipv4Addr> {
    let range: Ipv4Net = LOAD_BALANCER_RANGE.parse()?;
    let listing = objects::get(store, Kind::Service, None, None).await?;
    let mut taken = BTreeSet::new();
    for object in &listing.objects {
        let Object::Service(s) = object else { continue };
        for ip in s.load_balancer_ips() {
            let IpAddr::V4(ip) = ip else { continue };
            if !range.contains(&ip) {
                continue;
            }
            if s.metadata.namespace == NAMESPACE && s.metadata.name == name {
                return Ok(ip);
            }
            taken.insert(ip);
        }
    }
    range
        .hosts()
        .find(|ip| !taken.contains(ip))
        .with_context(|| format!("every address of {LOAD_BALANCER_RANGE} is taken"))
}

/// `lab service rm`: the Service and its slice; `false` when there was no such Service.
pub async fn remove(lab: &str, name: &str) -> anyhow::Result<bool> {
    LabState::load(lab)?;
    let store = crate::open_store(lab)?;
    let mut refs = vec![ObjectRef {
        kind: Kind::Service,
        namespace: NAMESPACE.into(),
        name: name.into(),
    }];
    refs.extend(slice_refs(name));
    let deleted = objects::delete(store.as_ref(), &refs).await?;
    Ok(deleted.first().is_some_and(|(_, d)| *d))
}

/// Sets the endpoints of a lab Service's slice: each backend pod with its conditions; a
/// pod left out is gone from the slice. The Service itself is left as it is.
pub async fn set_endpoints(
    lab: &str,
    name: &str,
    endpoints: &[(&str, Conditions)],
) -> anyhow::Result<()> {
    let state = LabState::load(lab)?;
    let current = list(lab)
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("lab {lab} has no service {name:?}"))?;
    let names: Vec<String> = endpoints.iter().map(|(p, _)| p.to_string()).collect();
    let address_types = Families::of(&current.cluster_ips).address_types();
    let pods = backends(&state.spec, &names, address_types)?;
    let with: Vec<(&str, Vec<IpAddr>, Conditions)> = pods
        .into_iter()
        .zip(endpoints)
        .map(|((node, ips), (_, c))| (node, ips, *c))
        .collect();
    let target_port = current.target_port.parse().unwrap_or(ECHO_PORT);
    let l4 = if current.protocol == "UDP" {
        L4::Udp
    } else {
        L4::Tcp
    };
    let slices = slice_manifests(name, l4, target_port, address_types, &with);
    let store = crate::open_store(lab)?;
    let slices = slices
        .into_iter()
        .map(decode)
        .collect::<anyhow::Result<_>>()?;
    objects::apply(store.as_ref(), slices).await?;
    Ok(())
}

/// Every Service in the lab's namespace `default`, with the backends of its slices.
pub async fn list(lab: &str) -> anyhow::Result<Vec<LabService>> {
    let state = LabState::load(lab)?;
    let store = crate::open_store(lab)?;
    let services = objects::get(store.as_ref(), Kind::Service, Some(NAMESPACE), None).await?;
    let slices = objects::get(store.as_ref(), Kind::EndpointSlice, Some(NAMESPACE), None).await?;
    let slices: Vec<&EndpointSlice> = slices
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(s.as_ref()),
            _ => None,
        })
        .collect();
    Ok(services
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) => Some(view(&state.spec, s, &slices)),
            _ => None,
        })
        .collect())
}

fn view(spec: &LabSpec, s: &Service, slices: &[&EndpointSlice]) -> LabService {
    let port = s.spec.ports.first();
    let backends = slices
        .iter()
        .filter(|slice| slice.service_name() == Some(s.metadata.name.as_str()))
        .flat_map(|slice| slice.endpoints.iter())
        .filter_map(|e| {
            let ip = e.ip()?;
            let pod = spec
                .all_pods()
                .find(|(_, p)| {
                    IpAddr::V4(p.ip.addr()) == ip
                        || p.ip6.is_some_and(|a| IpAddr::V6(a.addr()) == ip)
                })
                .map_or(ip.to_string(), |(_, p)| p.name.clone());
            Some(Backend {
                pod,
                ip,
                node: e.node_name.clone(),
                conditions: Conditions {
                    ready: e.is_ready(),
                    serving: e.is_serving(),
                    terminating: e.is_terminating(),
                },
            })
        })
        .collect();
    let policy = |p: Option<TrafficPolicy>| {
        p.map(|p| match p {
            TrafficPolicy::Cluster => "Cluster".to_string(),
            TrafficPolicy::Local => "Local".to_string(),
        })
    };
    LabService {
        name: s.metadata.name.clone(),
        type_: s.spec.type_.to_string(),
        cluster_ip: s.cluster_ips().first().copied(),
        cluster_ips: s.cluster_ips(),
        port: port.map_or(0, |p| p.port()),
        target_port: port.map_or(String::new(), |p| p.target_port().to_string()),
        protocol: port.map_or(String::new(), |p| p.protocol.to_string()),
        node_port: port.and_then(|p| p.node_port()),
        load_balancer_ip: if s.spec.type_ == ServiceType::LoadBalancer {
            s.load_balancer_ips().first().copied()
        } else {
            None
        },
        affinity: s.spec.session_affinity == SessionAffinity::ClientIP,
        external_traffic_policy: if s.uses_node_ports() {
            policy(s.spec.external_traffic_policy)
        } else {
            None
        },
        internal_traffic_policy: policy(s.spec.internal_traffic_policy),
        backends,
    }
}

/// One line per Service, as a person reads them.
pub fn table(services: &[LabService]) -> String {
    let mut rows = vec![
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "PORT",
            "NODE-PORT",
            "LB-IP",
            "AFFINITY",
            "POLICY ext/int",
            "BACKENDS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for s in services {
        let mut shown = BTreeSet::new();
        let backends: Vec<String> = s
            .backends
            .iter()
            // a dual-stack Service has each pod once per family: named once
            .filter(|b| shown.insert((&b.pod, b.conditions.ready, b.conditions.terminating)))
            .map(|b| {
                if b.conditions == Conditions::READY {
                    b.pod.clone()
                } else if b.conditions.terminating {
                    format!("{}(terminating)", b.pod)
                } else {
                    format!("{}(not ready)", b.pod)
                }
            })
            .collect();
        rows.push(vec![
            s.name.clone(),
            s.type_.clone(),
            if s.cluster_ips.is_empty() {
                "-".into()
            } else {
                let ips: Vec<String> = s.cluster_ips.iter().map(IpAddr::to_string).collect();
                ips.join(",")
            },
            format!("{}/{}->{}", s.port, s.protocol, s.target_port),
            or_dash(s.node_port.map(|p| p.to_string())),
            or_dash(s.load_balancer_ip.map(|i| i.to_string())),
            if s.affinity { "ClientIP" } else { "None" }.into(),
            format!(
                "{}/{}",
                s.external_traffic_policy.as_deref().unwrap_or("-"),
                s.internal_traffic_policy.as_deref().unwrap_or("Cluster")
            ),
            if backends.is_empty() {
                "(none: connections are refused)".into()
            } else {
                backends.join(",")
            },
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::LabParams;
    use trellis_model::{GatewayHealth, Granularity, Validate};

    fn spec() -> LabSpec {
        LabParams {
            name: "lab".into(),
            nodes: 4,
            locations: 2,
            granularity: Granularity::Location,
            gateways: 1,
            public_per_location: 1,
            pods_per_node: 1,
            agent_resync: 10,
            gateway_health: GatewayHealth::Forwarding,
            store: Default::default(),
            dual_stack: false,
        }
        .spec()
        .unwrap()
    }

    fn request() -> Request {
        Request {
            name: "web".into(),
            port: 80,
            target_port: None,
            protocol: L4::Tcp,
            type_: Type::LoadBalancer,
            backends: vec!["a1-p0".into(), "b1-p0".into()],
            affinity: true,
            external_traffic_policy: Some(Policy::Local),
            internal_traffic_policy: Some(Policy::Local),
            families: Families::Ipv4,
        }
    }

    #[test]
    fn manifests_are_objects_the_api_server_accepts() {
        let spec = spec();
        let r = request();
        let service = decode(service_manifest(
            &r,
            80,
            ECHO_PORT,
            Some(Ipv4Addr::new(198, 19, 0, 1)),
        ))
        .unwrap();
        let mut service = match service {
            Object::Service(s) => s,
            _ => unreachable!(),
        };
        service.set_defaults();
        service.validate().unwrap();
        assert_eq!(
            service.load_balancer_ips(),
            [IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))]
        );
        let pods = backends(&spec, &r.backends, &[AddressType::IPv4]).unwrap();
        let endpoints: Vec<_> = pods
            .iter()
            .map(|(n, ips)| (*n, ips[0], Conditions::TERMINATING))
            .collect();
        let slice = decode(slice_manifest(
            "web",
            AddressType::IPv4,
            L4::Udp,
            53,
            &endpoints,
        ))
        .unwrap();
        slice.validate().unwrap();
        let Object::EndpointSlice(slice) = slice else {
            unreachable!()
        };
        assert_eq!(slice.service_name(), Some("web"));
        let e = &slice.endpoints[1];
        assert_eq!(e.node_name.as_deref(), Some("b1"));
        assert!(!e.is_ready() && e.is_serving() && e.is_terminating());
        let view = view(&spec, &service, &[&slice]);
        assert_eq!(view.backends[1].pod, "b1-p0");
        assert!(table(&[view]).contains("b1-p0(terminating)"));
    }

    #[test]
    fn bad_input_names_the_flag_and_value() {
        let spec = spec();
        let v4 = &[AddressType::IPv4];
        let e = backends(&spec, &["zz-p0".into()], v4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--backends \"zz-p0\"") && e.contains("a1-p0"),
            "{e}"
        );
        let e = backends(&spec, &["a1-p0".into(), "a1-p0".into()], v4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
        let e = backends(&spec, &["a1-p0".into()], &[AddressType::IPv6])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no IPv6 address") && e.contains("--dual-stack"),
            "{e}"
        );
        for (flag, value) in [("--port", 0), ("--port", 65536), ("--target-port", 70000)] {
            let e = port_number(flag, value).unwrap_err().to_string();
            assert!(e.contains(&format!("{flag} {value}")), "{e}");
        }
        assert_eq!(port_number("--port", 65535).unwrap(), 65535);
    }
}
