//! Which endpoints a service port's traffic may reach, as Kubernetes defines it
//! (KEP-1669, "ProxyTerminatingEndpoints"): ready endpoints first; only when none is ready,
//! endpoints that are still serving while they terminate, so that a rolling update with
//! slow shutdowns does not drop traffic. The rule applies separately to the cluster-wide
//! set and to this node's set, so a Local policy falls back to local terminating endpoints
//! rather than to remote ready ones.

use crate::input::{Endpoint, IpFamily, TrafficPolicy};

/// The endpoints of one family that each kind of traffic may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usable<'a> {
    /// For traffic under the Cluster policy.
    pub cluster: Vec<&'a Endpoint>,
    /// This node's share, for traffic under the Local policy.
    pub local: Vec<&'a Endpoint>,
}

impl<'a> Usable<'a> {
    /// The endpoints traffic under `policy` may reach.
    pub fn under(&self, policy: TrafficPolicy) -> &[&'a Endpoint] {
        match policy {
            TrafficPolicy::Cluster => &self.cluster,
            TrafficPolicy::Local => &self.local,
        }
    }
}

/// Sorts a service port's endpoints of `family` into what cluster and local traffic may
/// use. The result is sorted and free of duplicates, so the same endpoints always give the
/// same rules.
pub fn usable<'a>(endpoints: &'a [Endpoint], family: IpFamily, node: &str) -> Usable<'a> {
    let mut of_family: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| IpFamily::of(e.addr) == family)
        .collect();
    of_family.sort();
    // One address and port listed twice (two slices during a handover) is one endpoint;
    // keep the entry with the best conditions.
    of_family.dedup_by(|later, kept| {
        if later.addr == kept.addr && later.port == kept.port {
            if rank(later) > rank(kept) {
                *kept = *later;
            }
            true
        } else {
            false
        }
    });
    let local: Vec<&Endpoint> = of_family
        .iter()
        .copied()
        .filter(|e| e.node.as_deref() == Some(node))
        .collect();
    Usable {
        cluster: preferred(&of_family),
        local: preferred(&local),
    }
}

/// Ready endpoints, or if there are none, serving terminating ones.
fn preferred<'a>(endpoints: &[&'a Endpoint]) -> Vec<&'a Endpoint> {
    let ready: Vec<&Endpoint> = endpoints.iter().copied().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .copied()
        .filter(|e| e.serving && e.terminating)
        .collect()
}

fn rank(e: &Endpoint) -> u8 {
    if e.ready {
        2
    } else if e.serving && e.terminating {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ep(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse::<IpAddr>().unwrap(),
            port: 80,
            ready,
            serving,
            terminating,
            node: Some(node.into()),
        }
    }

    fn addrs(list: &[&Endpoint]) -> Vec<String> {
        list.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let eps = [
            ep("10.0.0.1", "a", true, true, false),
            ep("10.0.0.2", "b", false, true, true),
        ];
        let u = usable(&eps, IpFamily::V4, "a");
        assert_eq!(addrs(&u.cluster), ["10.0.0.1"]);
        assert_eq!(addrs(&u.local), ["10.0.0.1"]);
    }

    #[test]
    fn serving_terminating_endpoints_are_the_fallback_when_none_is_ready() {
        let eps = [
            ep("10.0.0.1", "a", false, true, true),
            ep("10.0.0.2", "b", false, false, true),
            ep("10.0.0.3", "b", false, false, false),
        ];
        let u = usable(&eps, IpFamily::V4, "a");
        assert_eq!(addrs(&u.cluster), ["10.0.0.1"], "not serving: never");
    }

    #[test]
    fn local_traffic_falls_back_to_local_terminating_endpoints_not_remote_ready_ones() {
        let eps = [
            ep("10.0.0.1", "a", false, true, true),
            ep("10.0.0.2", "b", true, true, false),
        ];
        let u = usable(&eps, IpFamily::V4, "a");
        assert_eq!(addrs(&u.cluster), ["10.0.0.2"]);
        assert_eq!(addrs(&u.local), ["10.0.0.1"]);
    }

    #[test]
    fn families_are_kept_apart_and_duplicates_merged() {
        let eps = [
            ep("10.0.0.1", "a", false, true, true),
            ep("10.0.0.1", "a", true, true, false),
            ep("fd00::1", "a", true, true, false),
        ];
        let u = usable(&eps, IpFamily::V4, "a");
        assert_eq!(addrs(&u.cluster), ["10.0.0.1"]);
        assert!(u.cluster[0].ready, "the better of the two entries is kept");
        assert_eq!(addrs(&usable(&eps, IpFamily::V6, "a").cluster), ["fd00::1"]);
    }
}
