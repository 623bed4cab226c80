//! The services both sides program: N ClusterIP services of one TCP port, each with M ready
//! endpoints on other nodes, as Kubernetes objects (so the proxy's own resolver reads them,
//! in the worker as in the real loop) and as the `nft -f` text kube-proxy's nftables mode
//! writes for them (the peer).
//!
//! Service `i` is `ns<i/100>/svc<i>` at ClusterIP 10.96.0.1 + i, port 80, named port
//! `http`; its endpoints are 10.128.0.0 + i·M + e (in 10.128.0.0/10, which no lab uses),
//! port 8080. With a real backend (the connection case), service 0's endpoints are the
//! backend's addresses instead. An endpoint added by the change case comes from
//! 10.192.0.0/10.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use trellis_model::{EndpointSlice, Service};
use trellis_proxy::PortWithEndpoints;

pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// The pod network of the bench's cluster: traffic from it keeps its source.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Endpoints of the synthetic services live in 10.128.0.0/10.
const ENDPOINTS_BASE: u32 = 0x0a80_0000;
const ENDPOINTS_SPACE: usize = 1 << 22;
/// Endpoints added by the change case live in 10.192.0.0/10.
const EXTRA_BASE: u32 = 0x0ac0_0000;
const CLUSTER_IP_BASE: u32 = 0x0a60_0001;
/// 10.96.0.0/12 holds this many ClusterIPs from 10.96.0.1.
const MAX_SERVICES: usize = (1 << 20) - 2;

#[derive(Clone, Debug)]
pub struct Synth {
    pub services: usize,
    pub endpoints: usize,
    /// Service 0's endpoints are this address and the next ones (a real backend).
    pub backend: Option<Ipv4Addr>,
}

impl Synth {
    pub fn new(
        services: usize,
        endpoints: usize,
        backend: Option<Ipv4Addr>,
    ) -> anyhow::Result<Synth> {
        if services == 0 || services > MAX_SERVICES {
            bail!("--services must be 1 to {MAX_SERVICES} (ClusterIPs come from 10.96.0.0/12)");
        }
        if endpoints == 0 || endpoints > 250 {
            bail!("--endpoints must be 1 to 250");
        }
        if services.saturating_mul(endpoints) > ENDPOINTS_SPACE {
            bail!("{services} services × {endpoints} endpoints do not fit in 10.128.0.0/10");
        }
        Ok(Synth {
            services,
            endpoints,
            backend,
        })
    }

    pub fn namespace(i: usize) -> String {
        format!("ns{}", i / 100)
    }

    pub fn name(i: usize) -> String {
        format!("svc{i}")
    }

    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(CLUSTER_IP_BASE + i as u32)
    }

    /// The addresses of service `i`'s endpoints, with the extra one of the change case.
    pub fn endpoint_addrs(&self, i: usize, extra: bool) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = (0..self.endpoints)
            .map(|e| match self.backend {
                Some(b) if i == 0 => Ipv4Addr::from(u32::from(b) + e as u32),
                _ => Ipv4Addr::from(ENDPOINTS_BASE + (i * self.endpoints + e) as u32),
            })
            .collect();
        if extra {
            out.push(Synth::extra_endpoint(i));
        }
        out
    }

    pub fn extra_endpoint(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(EXTRA_BASE + i as u32)
    }

    pub fn service_key(i: usize) -> String {
        format!("services/{}/{}", Synth::namespace(i), Synth::name(i))
    }

    pub fn slice_key(i: usize) -> String {
        format!(
            "endpointslices/{}/{}-1",
            Synth::namespace(i),
            Synth::name(i)
        )
    }

    pub fn service_json(i: usize) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": Synth::name(i), "namespace": Synth::namespace(i)},
               "spec": {"clusterIP": Synth::cluster_ip(i).to_string(),
                        "ports": [{"name": "http", "port": SERVICE_PORT,
                                   "targetPort": TARGET_PORT, "protocol": "TCP"}]}})
    }

    pub fn slice_json(&self, i: usize, extra: bool) -> Value {
        let endpoints: Vec<Value> = self
            .endpoint_addrs(i, extra)
            .iter()
            .map(|a| {
                json!({"addresses": [a.to_string()], "conditions": {"ready": true},
                            "nodeName": "elsewhere"})
            })
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": format!("{}-1", Synth::name(i)), "namespace": Synth::namespace(i),
                            "labels": {"kubernetes.io/service-name": Synth::name(i)}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
               "endpoints": endpoints})
    }

    /// Service `i` as the proxy's view resolves it from the store's records.
    pub fn resolved(&self, i: usize) -> anyhow::Result<Vec<PortWithEndpoints>> {
        let svc: Service = trellis_model::decode(
            "synthetic service",
            &serde_json::to_vec(&Synth::service_json(i))?,
        )
        .context("decoding a synthetic service")?;
        let slice: EndpointSlice = trellis_model::decode(
            "synthetic endpointslice",
            &serde_json::to_vec(&self.slice_json(i, false))?,
        )
        .context("decoding a synthetic endpointslice")?;
        Ok(trellis_proxy::resolve::resolve_service(&svc, &[&slice]))
    }

    /// Every service port with its endpoints, in name order (as the planner's `resolve`).
    pub fn ports(&self) -> anyhow::Result<Vec<PortWithEndpoints>> {
        let mut out = Vec::with_capacity(self.services);
        for i in 0..self.services {
            out.extend(self.resolved(i)?);
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// The cluster's pod network, as the planner takes it.
    pub fn cluster_cidrs() -> Vec<ipnet::IpNet> {
        vec![CLUSTER_CIDR.parse().expect("literal")]
    }

    // ---- the peer: kube-proxy's nftables text ----

    /// The whole ruleset as kube-proxy's nftables proxier writes a full sync from
    /// nothing (one `nft -f` transaction): the table, its fixed chains, sets and maps,
    /// then per service port `ensureChain` (add + flush) for its endpoint chains and its
    /// service chain, its `service-ips` and `cluster-ips` elements, the service chain's
    /// masquerade and `numgen random mod M vmap` rules, and each endpoint chain's hairpin
    /// masquerade and DNAT.
    pub fn peer_ruleset(&self) -> String {
        let mut out = String::with_capacity(self.services * self.endpoints * 260 + 4096);
        out.push_str(PEER_FIXED);
        for i in 0..self.services {
            self.peer_service(&mut out, i, false, true);
        }
        out
    }

    /// What kube-proxy's partial sync writes when service `i` gains (`add`) or loses its
    /// extra endpoint: the new endpoint chain with its rules, or the old one flushed and
    /// deleted, and the service chain rewritten.
    pub fn peer_change(&self, i: usize, add: bool) -> String {
        let mut out = String::new();
        let svc = peer_service_chain(i);
        let extra = Synth::extra_endpoint(i);
        let extra_chain = peer_endpoint_chain(i, extra);
        if add {
            let _ = writeln!(out, "add chain ip kube-proxy {extra_chain}");
            let _ = writeln!(out, "flush chain ip kube-proxy {extra_chain}");
        }
        let _ = writeln!(out, "add chain ip kube-proxy {svc}");
        let _ = writeln!(out, "flush chain ip kube-proxy {svc}");
        self.peer_service_rules(&mut out, i, add);
        if add {
            peer_endpoint_rules(&mut out, &extra_chain, extra);
        } else {
            let _ = writeln!(out, "flush chain ip kube-proxy {extra_chain}");
            let _ = writeln!(out, "delete chain ip kube-proxy {extra_chain}");
        }
        out
    }

    fn peer_service(&self, out: &mut String, i: usize, extra: bool, elements: bool) {
        let svc = peer_service_chain(i);
        let addrs = self.endpoint_addrs(i, extra);
        for a in &addrs {
            let chain = peer_endpoint_chain(i, *a);
            let _ = writeln!(out, "add chain ip kube-proxy {chain}");
            let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
        }
        let _ = writeln!(out, "add chain ip kube-proxy {svc}");
        let _ = writeln!(out, "flush chain ip kube-proxy {svc}");
        if elements {
            let cip = Synth::cluster_ip(i);
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-ips {{ {cip} . tcp . {SERVICE_PORT} : goto {svc} }}"
            );
            let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {cip} }}");
        }
        self.peer_service_rules(out, i, extra);
        for a in &addrs {
            peer_endpoint_rules(out, &peer_endpoint_chain(i, *a), *a);
        }
    }

    fn peer_service_rules(&self, out: &mut String, i: usize, extra: bool) {
        let svc = peer_service_chain(i);
        let cip = Synth::cluster_ip(i);
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {svc} ip daddr {cip} tcp dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
        );
        let addrs = self.endpoint_addrs(i, extra);
        let _ = write!(
            out,
            "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ ",
            addrs.len()
        );
        for (n, a) in addrs.iter().enumerate() {
            if n > 0 {
                out.push_str(" , ");
            }
            let _ = write!(out, "{n} : goto {}", peer_endpoint_chain(i, *a));
        }
        out.push_str(" }\n");
    }
}

fn peer_endpoint_rules(out: &mut String, chain: &str, addr: Ipv4Addr) {
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip saddr {addr} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} meta l4proto tcp dnat to {addr}:{TARGET_PORT}"
    );
}

/// The `c`-th change of the change case among `services`: pairs on services spread over
/// the table, the extra endpoint added (even `c`), then removed.
pub fn change_target(c: usize, services: usize) -> (usize, bool) {
    ((c / 2 * 7919 + 1) % services, c.is_multiple_of(2))
}

/// kube-proxy's chain names: `service-HASH-ns/name/tcp/port`, where HASH is the first 8
/// characters of a base32 hash of the rest (here FNV-1a, not SHA-256: only the shape and
/// length matter).
fn peer_service_chain(i: usize) -> String {
    let base = format!("{}/{}/tcp/http", Synth::namespace(i), Synth::name(i));
    format!("service-{}-{base}", hash8(&base))
}

fn peer_endpoint_chain(i: usize, addr: Ipv4Addr) -> String {
    let base = format!(
        "{}/{}/tcp/http__{}/{TARGET_PORT}",
        Synth::namespace(i),
        Synth::name(i),
        IpAddr::V4(addr)
    );
    format!("endpoint-{}-{base}", hash8(&base))
}

fn hash8(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..8)
        .map(|_| {
            let c = ALPHABET[(h & 31) as usize] as char;
            h >>= 5;
            c
        })
        .collect()
}

/// kube-proxy's fixed part (`setupNFTables`), for IPv4, as knftables writes it.
const PEER_FIXED: &str = r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy mark-for-masquerade
flush chain ip kube-proxy mark-for-masquerade
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add chain ip kube-proxy masquerading
flush chain ip kube-proxy masquerading
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add chain ip kube-proxy services
flush chain ip kube-proxy services
add chain ip kube-proxy firewall-check
flush chain ip kube-proxy firewall-check
add chain ip kube-proxy service-endpoints-check
flush chain ip kube-proxy service-endpoints-check
add chain ip kube-proxy nodeport-endpoints-check
flush chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy cluster-ips-check
flush chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
flush chain ip kube-proxy reject-chain
add rule ip kube-proxy reject-chain reject
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
flush chain ip kube-proxy filter-prerouting
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }
flush chain ip kube-proxy filter-input
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
flush chain ip kube-proxy filter-forward
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
flush chain ip kube-proxy filter-output
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump firewall-check
add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
flush chain ip kube-proxy filter-output-post-dnat
add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
flush chain ip kube-proxy nat-output
add rule ip kube-proxy nat-output jump services
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
flush chain ip kube-proxy nat-postrouting
add rule ip kube-proxy nat-postrouting jump masquerading
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
flush chain ip kube-proxy nat-prerouting
add rule ip kube-proxy nat-prerouting jump services
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
flush set ip kube-proxy cluster-ips
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
flush set ip kube-proxy nodeport-ips
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
flush map ip kube-proxy no-endpoint-services
flush map ip kube-proxy no-endpoint-nodeports
flush map ip kube-proxy firewall-ips
flush map ip kube-proxy service-ips
flush map ip kube-proxy service-nodeports
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_resolve_to_one_port_with_their_endpoints() {
        let synth = Synth::new(3, 4, None).unwrap();
        let ports = synth.ports().unwrap();
        assert_eq!(ports.len(), 3);
        let (port, endpoints) = &ports[0];
        assert_eq!(port.name.to_string(), "ns0/svc0/tcp/http");
        assert_eq!(port.cluster_ips, vec![IpAddr::V4(Synth::cluster_ip(0))]);
        assert_eq!(endpoints.len(), 4);
        assert!(endpoints.iter().all(|e| e.port == TARGET_PORT && e.ready));
    }

    #[test]
    fn a_real_backend_replaces_service_zeros_endpoints_only() {
        let synth = Synth::new(2, 2, Some(Ipv4Addr::new(10, 244, 2, 2))).unwrap();
        assert_eq!(
            synth.endpoint_addrs(0, false),
            vec![Ipv4Addr::new(10, 244, 2, 2), Ipv4Addr::new(10, 244, 2, 3)]
        );
        assert_eq!(
            synth.endpoint_addrs(1, false)[0],
            Ipv4Addr::new(10, 128, 0, 2)
        );
    }

    #[test]
    fn the_peer_writes_kube_proxys_shape() {
        let synth = Synth::new(1, 2, None).unwrap();
        let text = synth.peer_ruleset();
        let svc = peer_service_chain(0);
        assert!(
            svc.starts_with("service-") && svc.ends_with("-ns0/svc0/tcp/http"),
            "{svc}"
        );
        assert!(text.contains(&format!(
            "add element ip kube-proxy service-ips {{ 10.96.0.1 . tcp . 80 : goto {svc} }}"
        )));
        assert!(
            text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"),
            "{text}"
        );
        assert!(
            text.contains("meta l4proto tcp dnat to 10.128.0.1:8080"),
            "{text}"
        );
        let change = synth.peer_change(0, false);
        assert!(
            change.contains("delete chain ip kube-proxy endpoint-"),
            "{change}"
        );
        assert!(change.contains("numgen random mod 2 vmap"), "{change}");
        assert!(
            synth
                .peer_change(0, true)
                .contains("numgen random mod 3 vmap")
        );
    }
}
