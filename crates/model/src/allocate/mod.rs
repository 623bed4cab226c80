//! The API server's allocation of a Service's ClusterIPs and node ports, as a pure
//! function: a Service (defaulted and validated), the stored version it replaces, the
//! cluster's ranges and what other Services hold in, the Service with every value filled
//! in, or the field and value that cannot be had. Kept values, requested values and free
//! values follow the API server's rules:
//!
//! - on update, an allocated ClusterIP is kept (it is immutable), and node ports and the
//!   health check node port are carried over when the manifest leaves them out;
//! - IP families follow `ipFamilyPolicy` against the configured service CIDRs;
//! - a requested address or port must be in range and free, or is refused by name;
//! - the first and last address of a range are never handed out.
//!
//! Making the result stick across concurrent writers is the store's part: each value is a
//! claim key created only if absent, in the transaction that writes the Service.

mod pick;

use crate::service::{
    CLUSTER_IP_NONE, IpFamily, IpFamilyPolicy, Service, ServicePort, ServiceType,
};
use crate::{InvalidField, ServiceSettings};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What a claim key (`serviceips/…`, `nodeports/…`) holds: the Service holding the value.
/// Written in the same transaction as the Service, so a claim and its holder never
/// disagree unless someone edits the store by hand.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimHolder {
    pub namespace: String,
    pub name: String,
}

impl ClaimHolder {
    pub fn of(service: &Service) -> ClaimHolder {
        ClaimHolder {
            namespace: service.metadata.namespace.clone(),
            name: service.metadata.name.clone(),
        }
    }

    /// The record's bytes; one holder always encodes the same way, so a transaction can
    /// compare a claim's value with them.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a claim holder serialises")
    }
}

impl crate::Validate for ClaimHolder {
    fn validate(&self) -> Result<(), InvalidField> {
        crate::dns::label("namespace", &self.namespace)?;
        crate::dns::dns1035_label("name", &self.name)
    }
}

/// Values held in the shared ranges: by one Service, or (as `taken`) by all the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    pub ips: BTreeSet<IpAddr>,
    pub node_ports: BTreeSet<u16>,
}

impl Claims {
    pub fn extend(&mut self, other: &Claims) {
        self.ips.extend(&other.ips);
        self.node_ports.extend(&other.node_ports);
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.node_ports.is_empty()
    }
}

impl Service {
    /// What this Service holds: its ClusterIPs, node ports and health check node port.
    pub fn claims(&self) -> Claims {
        Claims {
            ips: self.cluster_ips().into_iter().collect(),
            node_ports: self
                .spec
                .ports
                .iter()
                .filter_map(ServicePort::node_port)
                .chain(self.health_check_node_port())
                .collect(),
        }
    }
}

/// Fills in `service`'s ClusterIPs, IP families and policy, node ports and health check
/// node port. `previous` is the stored version being replaced; `taken` is what every
/// other Service holds; `salt` varies the choice between attempts after a lost race.
pub fn allocate(
    service: &mut Service,
    previous: Option<&Service>,
    settings: &ServiceSettings,
    taken: &Claims,
    salt: u64,
) -> Result<(), InvalidField> {
    if let Some(old) = previous {
        carry_over(service, old)?;
    }
    let seed_name = format!("{}/{}", service.metadata.namespace, service.metadata.name);
    let seed = pick::seed(&seed_name, salt);
    addresses(service, settings, taken, seed)?;
    node_ports(service, settings, taken, pick::mix(seed, u64::MAX - 1))
}

fn immutable(field: &str, value: impl ToString, was: &str) -> InvalidField {
    InvalidField::new(field, value, format!("field is immutable (it is {was:?})"))
}

/// What the API server keeps from the stored Service (`patchAllocatedValues`), and the
/// immutability of the ClusterIP.
fn carry_over(new: &mut Service, old: &Service) -> Result<(), InvalidField> {
    let has_ip = |s: &Service| s.spec.type_ != ServiceType::ExternalName;
    if has_ip(old) && has_ip(new) {
        let (n, o) = (&mut new.spec, &old.spec);
        let families_given = !n.ip_families.is_empty() || !n.cluster_ips.is_empty();
        if n.cluster_ip.is_none() {
            n.cluster_ip = o.cluster_ip.clone();
        }
        if n.cluster_ips.is_empty() && n.cluster_ip == o.cluster_ip {
            n.cluster_ips = o.cluster_ips.clone();
        }
        if n.ip_families.is_empty() {
            n.ip_families = o.ip_families.clone();
        }
        if n.ip_family_policy.is_none() {
            n.ip_family_policy = o.ip_family_policy;
        }
        // Asking for SingleStack is how a dual-stack Service gives up its secondary.
        if n.ip_family_policy == Some(IpFamilyPolicy::SingleStack) && !families_given {
            n.ip_families.truncate(1);
            n.cluster_ips.truncate(1);
        }
        if let Some(was) = &o.cluster_ip
            && n.cluster_ip.as_ref() != Some(was)
        {
            let now = n.cluster_ip.clone().unwrap_or_default();
            return Err(immutable("spec.clusterIP", now, was));
        }
        // The secondary may be added or removed (a change of policy), not replaced.
        if let (Some(was), Some(now)) = (o.cluster_ips.get(1), n.cluster_ips.get(1))
            && was != now
        {
            return Err(immutable("spec.clusterIPs[1]", now, was));
        }
    }
    let has_node_ports = |s: &Service| {
        matches!(
            s.spec.type_,
            ServiceType::NodePort | ServiceType::LoadBalancer
        )
    };
    if has_node_ports(old) && has_node_ports(new) {
        let named: BTreeMap<&str, i32> = old
            .spec
            .ports
            .iter()
            .filter_map(|p| Some((p.name.as_str(), p.node_port?)))
            .collect();
        let asked: BTreeSet<i32> = new.spec.ports.iter().filter_map(|p| p.node_port).collect();
        for p in &mut new.spec.ports {
            if p.node_port.is_none()
                && let Some(np) = named.get(p.name.as_str()).filter(|np| !asked.contains(np))
            {
                p.node_port = Some(*np);
            }
        }
    }
    if old.needs_health_check_node_port()
        && new.needs_health_check_node_port()
        && new.spec.health_check_node_port.is_none()
    {
        new.spec.health_check_node_port = old.spec.health_check_node_port;
    }
    Ok(())
}

/// The families a Service gets, in order, per its policy and the configured CIDRs.
fn families(service: &Service, configured: &[IpFamily]) -> Result<Vec<IpFamily>, InvalidField> {
    let spec = &service.spec;
    let selectorless_headless = service.is_headless() && spec.selector.is_empty();
    let (requested, field): (Vec<IpFamily>, &str) = if spec.ip_families.is_empty() {
        let ips = given_ips(service)
            .into_iter()
            .map(|(_, ip)| IpFamily::of(&ip))
            .collect();
        (ips, "spec.clusterIPs")
    } else {
        (spec.ip_families.clone(), "spec.ipFamilies")
    };
    // Headless Services without selectors have no addresses to allocate: they take every
    // family the cluster has unless told otherwise.
    if selectorless_headless {
        return Ok(if requested.is_empty() {
            configured.to_vec()
        } else {
            requested
        });
    }
    for (i, family) in requested.iter().enumerate() {
        if !configured.contains(family) {
            return Err(InvalidField::new(
                format!("{field}[{i}]"),
                family,
                "this cluster has no service CIDR of that family",
            ));
        }
    }
    let policy = spec.ip_family_policy.unwrap_or(IpFamilyPolicy::SingleStack);
    if requested.len() > 1 && policy == IpFamilyPolicy::SingleStack {
        return Err(InvalidField::new(
            "spec.ipFamilyPolicy",
            "SingleStack",
            "must be PreferDualStack or RequireDualStack for two IP families",
        ));
    }
    let mut out = requested;
    if out.is_empty() {
        out.push(configured[0]);
    }
    match policy {
        IpFamilyPolicy::SingleStack => out.truncate(1),
        IpFamilyPolicy::PreferDualStack | IpFamilyPolicy::RequireDualStack => {
            if let Some(other) = configured.iter().find(|f| !out.contains(f)) {
                out.push(*other);
            }
            if out.len() < 2 && policy == IpFamilyPolicy::RequireDualStack {
                return Err(InvalidField::new(
                    "spec.ipFamilyPolicy",
                    "RequireDualStack",
                    "this cluster has a service CIDR of one family only",
                ));
            }
        }
    }
    Ok(out)
}

/// The addresses the Service asks for, with the field each came from.
fn given_ips(service: &Service) -> Vec<(String, IpAddr)> {
    let spec = &service.spec;
    if spec.cluster_ips.is_empty() {
        spec.cluster_ip
            .iter()
            .filter_map(|ip| Some(("spec.clusterIP".to_string(), ip.parse().ok()?)))
            .collect()
    } else {
        spec.cluster_ips
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| Some((format!("spec.clusterIPs[{i}]"), ip.parse().ok()?)))
            .collect()
    }
}

fn addresses(
    service: &mut Service,
    settings: &ServiceSettings,
    taken: &Claims,
    seed: u64,
) -> Result<(), InvalidField> {
    if service.spec.type_ == ServiceType::ExternalName {
        return Ok(());
    }
    let configured: Vec<IpFamily> = settings.cidrs().iter().map(IpFamily::of_net).collect();
    let families = families(service, &configured)?;
    let policy = service.spec.ip_family_policy.unwrap_or(
        if service.is_headless() && service.spec.selector.is_empty() {
            IpFamilyPolicy::RequireDualStack
        } else {
            IpFamilyPolicy::SingleStack
        },
    );
    if service.is_headless() {
        service.spec.cluster_ips = vec![CLUSTER_IP_NONE.to_string()];
    } else {
        let given = given_ips(service);
        let mut ips = Vec::with_capacity(families.len());
        for (i, family) in families.iter().enumerate() {
            let cidr = settings
                .cidr_for(*family)
                .expect("families are configured ones");
            let ip = match given.get(i) {
                Some((field, ip)) => requested_ip(field, *ip, *family, cidr, taken)?,
                None => free_ip(cidr, taken, pick::mix(seed, i as u64)).ok_or_else(|| {
                    InvalidField::new(
                        "spec.clusterIPs",
                        family,
                        format!("no free address left in the service range {cidr}"),
                    )
                })?,
            };
            ips.push(ip.to_string());
        }
        service.spec.cluster_ip = ips.first().cloned();
        service.spec.cluster_ips = ips;
    }
    service.spec.ip_families = families;
    service.spec.ip_family_policy = Some(policy);
    Ok(())
}

fn requested_ip(
    field: &str,
    ip: IpAddr,
    family: IpFamily,
    cidr: IpNet,
    taken: &Claims,
) -> Result<IpAddr, InvalidField> {
    if IpFamily::of(&ip) != family {
        return Err(InvalidField::new(
            field,
            ip,
            format!("is not an {family} address, as ipFamilies asks"),
        ));
    }
    if !cidr.contains(&ip) || ip == cidr.network() || ip == cidr.broadcast() {
        return Err(InvalidField::new(
            field,
            ip,
            format!(
                "is not in the service range {cidr} (its first and last addresses are never used)"
            ),
        ));
    }
    if taken.ips.contains(&ip) {
        return Err(InvalidField::new(
            field,
            ip,
            "is already allocated to another Service",
        ));
    }
    Ok(ip)
}

/// A free address of `cidr`, neither its first nor its last.
fn free_ip(cidr: IpNet, taken: &Claims, seed: u64) -> Option<IpAddr> {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    let size = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
    let usable = size.checked_sub(2)?;
    let base = ip_to_u128(cidr.network()) + 1;
    let at = |offset: u128| u128_to_ip(cidr.network(), base + offset);
    let band = pick::static_band(usable, 16, 256);
    pick::free_offset(usable, band, seed, taken.ips.len(), |o| {
        !taken.ips.contains(&at(o))
    })
    .map(at)
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

fn u128_to_ip(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

fn node_ports(
    service: &mut Service,
    settings: &ServiceSettings,
    taken: &Claims,
    seed: u64,
) -> Result<(), InvalidField> {
    let range = settings.node_port_range();
    let in_range = |field: &str, port: i32| -> Result<u16, InvalidField> {
        u16::try_from(port)
            .ok()
            .filter(|p| range.contains(*p))
            .ok_or_else(|| {
                InvalidField::new(
                    field,
                    port,
                    format!("is not in the node port range {range}"),
                )
            })
    };
    // A node port belongs to one service port number (several protocols may share it).
    let mut mine: BTreeMap<u16, i32> = BTreeMap::new();
    for (i, p) in service.spec.ports.iter().enumerate() {
        if let Some(np) = p.node_port {
            let field = format!("spec.ports[{i}].nodePort");
            let np = in_range(&field, np)?;
            let holder = *mine.entry(np).or_insert(p.port);
            if taken.node_ports.contains(&np) || holder != p.port {
                return Err(InvalidField::new(
                    field,
                    np,
                    "is already allocated to another port or Service",
                ));
            }
        }
    }
    if service.uses_node_ports() {
        for (i, p) in service.spec.ports.iter_mut().enumerate() {
            if p.node_port.is_some() {
                continue;
            }
            let port = p.port;
            let shared = mine.iter().find(|(_, p)| **p == port).map(|(np, _)| *np);
            let np = match shared {
                Some(np) => np,
                None => {
                    free_port(range, taken, &mine, pick::mix(seed, i as u64)).ok_or_else(|| {
                        InvalidField::new(
                            format!("spec.ports[{i}].nodePort"),
                            "",
                            format!("no free port left in the node port range {range}"),
                        )
                    })?
                }
            };
            mine.insert(np, port);
            p.node_port = Some(np.into());
        }
    }
    if service.needs_health_check_node_port() {
        let field = "spec.healthCheckNodePort";
        let np = match service.spec.health_check_node_port {
            Some(np) => {
                let np = in_range(field, np)?;
                if taken.node_ports.contains(&np) || mine.contains_key(&np) {
                    return Err(InvalidField::new(
                        field,
                        np,
                        "is already allocated to another port or Service",
                    ));
                }
                np
            }
            None => free_port(range, taken, &mine, pick::mix(seed, u64::MAX)).ok_or_else(|| {
                InvalidField::new(
                    field,
                    "",
                    format!("no free port left in the node port range {range}"),
                )
            })?,
        };
        service.spec.health_check_node_port = Some(np.into());
    }
    Ok(())
}

fn free_port(
    range: crate::PortRange,
    taken: &Claims,
    mine: &BTreeMap<u16, i32>,
    seed: u64,
) -> Option<u16> {
    let len = range.len() as u128;
    let at = |offset: u128| range.first + offset as u16;
    let held = taken.node_ports.len() + mine.len();
    pick::free_offset(len, pick::static_band(len, 32, 128), seed, held, |o| {
        let port = at(o);
        !taken.node_ports.contains(&port) && !mine.contains_key(&port)
    })
    .map(at)
}

#[cfg(test)]
mod tests;
