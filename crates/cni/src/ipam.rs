//! Node-local address allocation for pods: the node's pod CIDRs (one per family) are the
//! pools, and every address belongs to at most one *attachment* — a container ID and an
//! interface name, as the CNI specification keys them.
//!
//! Pure and total: the state is a value ([`Allocations`]) that the plugin reads from its
//! file under a lock, changes with these functions, and writes back atomically, so a crash
//! at any instant leaves either the old state or the new one. The rules:
//!
//! - ADD is idempotent: an attachment that already has addresses gets the same ones back
//!   (a runtime retrying an ADD that failed half-way gets what it was given before);
//! - DEL is idempotent and never fails: releasing an unknown attachment releases nothing;
//! - GC releases every attachment the runtime no longer names as valid
//!   (`cni.dev/valid-attachments`), which is also how addresses of containers that died
//!   with a reboot come back;
//! - addresses are handed out round-robin after the last one given in each pool, so an
//!   address released a moment ago is the last to be reused (a late packet for a deleted
//!   pod does not reach its successor);
//! - the network address, the gateway (the pool's first address, which the node keeps)
//!   and, in IPv4, the broadcast address are never handed out.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

/// What an address is allocated to: the CNI specification's key for an attachment.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id, self.ifname)
    }
}

/// Why an allocation could not be made. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamError {
    /// Every usable address of the pool is taken.
    Exhausted { pool: IpNet, allocated: usize },
    /// The pool has no address to hand out at all (a /31, /32, /127 or /128).
    TooSmall { pool: IpNet },
}

impl fmt::Display for IpamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpamError::Exhausted { pool, allocated } => write!(
                f,
                "pod CIDR {pool}: every address is allocated ({allocated} attachments)"
            ),
            IpamError::TooSmall { pool } => write!(
                f,
                "pod CIDR {pool}: too small to hold a gateway and a pod (a /30 or /126 at least)"
            ),
        }
    }
}

impl std::error::Error for IpamError {}

/// The allocation state of one node, as the plugin keeps it on persistent disk (as
/// [`StateFile`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "StateFile", from = "StateFile")]
pub struct Allocations {
    /// Each attachment's addresses, one per pool it was given from.
    attachments: BTreeMap<Attachment, Vec<IpAddr>>,
    /// The last address handed out from each pool: the next search starts after it.
    last: BTreeMap<IpNet, IpAddr>,
    /// The kernel's boot the attachments were made in (`/proc/sys/kernel/random/boot_id`).
    boot: Option<String>,
    /// Which pod each attachment is, when the runtime said (what network policy reads).
    pods: BTreeMap<Attachment, PodIdentity>,
}

/// The pod an attachment belongs to, as the runtime named it (`CNI_ARGS`
/// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`) and labelled it (the network configuration's
/// `args.cni.labels`, the CNI conventions' way): what the agent enforces network policy by
/// before any API server has heard of the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Its named ports (the network configuration's `args.trellis.ports`), what a policy's
    /// `port: http` means for traffic to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PodPort>,
}

/// A named container port: `{"name": "http", "protocol": "TCP", "port": 8080}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodPort {
    pub name: String,
    /// `TCP` (the default), `UDP` or `SCTP`.
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: u16,
}

fn tcp() -> String {
    "TCP".into()
}

impl Allocations {
    pub fn new() -> Allocations {
        Allocations::default()
    }

    /// The addresses of `who`, if it has any.
    pub fn addresses(&self, who: &Attachment) -> Option<&[IpAddr]> {
        self.attachments.get(who).map(Vec::as_slice)
    }

    /// Every attachment and its addresses.
    pub fn iter(&self) -> impl Iterator<Item = (&Attachment, &[IpAddr])> {
        self.attachments.iter().map(|(a, v)| (a, v.as_slice()))
    }

    /// Records which pod `who` is (`None`: the runtime did not say). Only for an
    /// attachment that has addresses.
    pub fn identify(&mut self, who: &Attachment, pod: Option<PodIdentity>) {
        match pod {
            Some(pod) if self.attachments.contains_key(who) => {
                self.pods.insert(who.clone(), pod);
            }
            _ => {
                self.pods.remove(who);
            }
        }
    }

    /// The pod `who` is, if the runtime said.
    pub fn pod(&self, who: &Attachment) -> Option<&PodIdentity> {
        self.pods.get(who)
    }

    pub fn len(&self) -> usize {
        self.attachments.len()
    }

    /// Every attachment made before the machine's current boot is forgotten and returned:
    /// no container outlives a reboot, and an allocation file kept on persistent disk
    /// must not keep their addresses (host-local's leak, plugins 252 and 697). A state
    /// from before boots were recorded is taken as this boot's.
    pub fn since_boot(&mut self, boot_id: &str) -> Vec<(Attachment, Vec<IpAddr>)> {
        let stale = self.boot.as_deref().is_some_and(|b| b != boot_id);
        self.boot = Some(boot_id.to_string());
        if stale {
            self.pods.clear();
            std::mem::take(&mut self.attachments).into_iter().collect()
        } else {
            Vec::new()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.attachments.is_empty()
    }

    /// One address from each pool for `who` (ADD). The same addresses again if it has
    /// them already; an attachment given from fewer pools than asked (the node got a pod
    /// CIDR of another family since) gets the missing ones added. All or nothing: on an
    /// error, nothing changed.
    pub fn allocate(
        &mut self,
        who: &Attachment,
        pools: &[IpNet],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut have = self.attachments.get(who).cloned().unwrap_or_default();
        let taken: BTreeSet<IpAddr> = self.attachments.values().flatten().copied().collect();
        let mut last = self.last.clone();
        for pool in pools {
            if have.iter().any(|a| pool.contains(a)) {
                continue;
            }
            let addr = next_free(*pool, last.get(pool).copied(), &taken, self.in_pool(*pool))?;
            last.insert(*pool, addr);
            have.push(addr);
        }
        self.last = last;
        self.attachments.insert(who.clone(), have.clone());
        Ok(have)
    }

    /// Releases the addresses of `who` (DEL): what it had, nothing if it had nothing.
    pub fn release(&mut self, who: &Attachment) -> Vec<IpAddr> {
        self.pods.remove(who);
        self.attachments.remove(who).unwrap_or_default()
    }

    /// Releases every attachment not in `valid` (GC), and returns what it released.
    pub fn collect(&mut self, valid: &BTreeSet<Attachment>) -> Vec<(Attachment, Vec<IpAddr>)> {
        let stale: Vec<Attachment> = self
            .attachments
            .keys()
            .filter(|a| !valid.contains(a))
            .cloned()
            .collect();
        stale
            .into_iter()
            .map(|a| {
                self.pods.remove(&a);
                let addrs = self.attachments.remove(&a).unwrap_or_default();
                (a, addrs)
            })
            .collect()
    }

    fn in_pool(&self, pool: IpNet) -> usize {
        self.attachments
            .values()
            .flatten()
            .filter(|a| pool.contains(*a))
            .count()
    }
}

/// The file format of [`Allocations`]: records rather than maps keyed by structs (JSON keys
/// are strings), and a version for whoever reads it after an upgrade.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub attachments: Vec<AttachmentRecord>,
    /// The last address handed out from each pool.
    pub last: Vec<(IpNet, IpAddr)>,
    /// The boot the attachments were made in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub container_id: String,
    pub ifname: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodIdentity>,
}

impl From<Allocations> for StateFile {
    fn from(mut a: Allocations) -> StateFile {
        StateFile {
            version: 1,
            attachments: a
                .attachments
                .into_iter()
                .map(|(who, addresses)| AttachmentRecord {
                    pod: a.pods.remove(&who),
                    container_id: who.container_id,
                    ifname: who.ifname,
                    addresses,
                })
                .collect(),
            last: a.last.into_iter().collect(),
            boot_id: a.boot,
        }
    }
}

impl From<StateFile> for Allocations {
    fn from(f: StateFile) -> Allocations {
        let mut pods = BTreeMap::new();
        let attachments = (f.attachments.into_iter())
            .map(|r| {
                let who = Attachment {
                    container_id: r.container_id,
                    ifname: r.ifname,
                };
                if let Some(pod) = r.pod {
                    pods.insert(who.clone(), pod);
                }
                (who, r.addresses)
            })
            .collect();
        Allocations {
            attachments,
            last: f.last.into_iter().collect(),
            boot: f.boot_id,
            pods,
        }
    }
}

/// The address a pool's pods use as their gateway: its first usable one, kept by the node.
pub fn gateway(pool: IpNet) -> Option<IpAddr> {
    usable(pool).map(|(first, _)| from_int(pool, first))
}

/// The first and last address that may be handed out or used as the gateway (as
/// integers), if the pool has room for a gateway and one pod.
fn usable(pool: IpNet) -> Option<(u128, u128)> {
    let pool = pool.trunc();
    let network = to_int(pool.network());
    let broadcast = to_int(pool.broadcast());
    // The network address is never used; in IPv4 nor is the broadcast address.
    let first = network + 1;
    let last = match pool {
        IpNet::V4(_) => broadcast.checked_sub(1)?,
        IpNet::V6(_) => broadcast,
    };
    // A gateway and at least one pod.
    (last > first).then_some((first, last))
}

fn next_free(
    pool: IpNet,
    after: Option<IpAddr>,
    taken: &BTreeSet<IpAddr>,
    allocated: usize,
) -> Result<IpAddr, IpamError> {
    let (gateway, last) = usable(pool).ok_or(IpamError::TooSmall { pool })?;
    let first = gateway + 1;
    let start = after
        .filter(|a| pool.contains(a))
        .map(to_int)
        .filter(|a| (first..=last).contains(a))
        .map_or(first, |a| if a == last { first } else { a + 1 });
    // The taken addresses of this pool, in order: the free one after `start` is found by
    // walking them, not the whole pool (a /64 has 2^64 addresses).
    let in_pool: Vec<u128> = taken
        .iter()
        .filter(|a| pool.contains(*a))
        .map(|a| to_int(*a))
        .collect();
    let free_from = |from: u128, to: u128| -> Option<u128> {
        let mut candidate = from;
        let i = in_pool.partition_point(|t| *t < from);
        for t in &in_pool[i..] {
            if *t > to || candidate > to {
                break;
            }
            if *t == candidate {
                candidate += 1;
            } else if *t > candidate {
                break;
            }
        }
        (candidate <= to).then_some(candidate)
    };
    let found =
        free_from(start, last).or_else(|| free_from(first, start.saturating_sub(1).max(first)));
    match found {
        Some(n) if !in_pool.contains(&n) => Ok(from_int(pool, n)),
        _ => Err(IpamError::Exhausted { pool, allocated }),
    }
}

fn to_int(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_int(pool: IpNet, n: u128) -> IpAddr {
    match pool {
        IpNet::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(n as u32)),
        IpNet::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn a_pods_identity_is_kept_in_the_file_and_goes_with_its_addresses() {
        let mut a = Allocations::new();
        let identity = PodIdentity {
            namespace: "shop".into(),
            name: "web".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ports: Vec::new(),
        };
        a.identify(&pod("a"), Some(identity.clone()));
        assert_eq!(a.pod(&pod("a")), None, "no addresses, no identity");
        a.allocate(&pod("a"), &[net("10.0.0.0/24")]).unwrap();
        a.identify(&pod("a"), Some(identity.clone()));
        let text = serde_json::to_string(&a).unwrap();
        let back: Allocations = serde_json::from_str(&text).unwrap();
        assert_eq!(back.pod(&pod("a")), Some(&identity));
        assert_eq!(back, a);
        a.release(&pod("a"));
        assert_eq!(a.pod(&pod("a")), None);
        // A file from before identities were kept reads as attachments without one.
        let old = r#"{"version":1,"attachments":[{"container_id":"a","ifname":"eth0","addresses":["10.0.0.2"]}],"last":[]}"#;
        let old: Allocations = serde_json::from_str(old).unwrap();
        assert_eq!(old.pod(&pod("a")), None);
        assert_eq!(old.len(), 1);
    }

    #[test]
    fn addresses_come_round_robin_after_the_gateway_and_an_add_again_gives_the_same() {
        let pools = [net("10.244.1.0/24"), net("fd00:244:1::/64")];
        let mut a = Allocations::new();
        assert_eq!(gateway(pools[0]), Some(ip("10.244.1.1")));
        assert_eq!(
            a.allocate(&pod("a"), &pools).unwrap(),
            [ip("10.244.1.2"), ip("fd00:244:1::2")]
        );
        assert_eq!(
            a.allocate(&pod("a"), &pools).unwrap(),
            [ip("10.244.1.2"), ip("fd00:244:1::2")],
            "a retried ADD gets what it was given"
        );
        assert_eq!(
            a.allocate(&pod("b"), &pools[..1]).unwrap(),
            [ip("10.244.1.3")]
        );
        assert_eq!(a.release(&pod("a")).len(), 2);
        assert_eq!(
            a.allocate(&pod("c"), &pools[..1]).unwrap(),
            [ip("10.244.1.4")],
            "a released address is the last to be reused"
        );
        assert!(
            a.release(&pod("a")).is_empty(),
            "a second DEL releases nothing"
        );
    }

    #[test]
    fn a_full_pool_is_an_error_that_changes_nothing_and_wraps_round_once_freed() {
        // A /29: network .0, gateway .1, pods .2 to .6, broadcast .7. A /126: network ::0,
        // gateway ::1, pods ::2 and ::3.
        let pools = [net("10.0.0.0/29"), net("fd00::/126")];
        let mut a = Allocations::new();
        a.allocate(&pod("a"), &pools).unwrap();
        a.allocate(&pod("b"), &pools).unwrap();
        let before = a.clone();
        assert_eq!(
            a.allocate(&pod("c"), &pools),
            Err(IpamError::Exhausted {
                pool: pools[1],
                allocated: 2
            })
        );
        assert_eq!(a, before, "nothing of the IPv4 address it found is kept");
        a.release(&pod("a"));
        assert_eq!(
            a.allocate(&pod("c"), &pools).unwrap(),
            [ip("10.0.0.4"), ip("fd00::2")],
            "the search wraps round to what was freed"
        );
        assert_eq!(
            Allocations::new().allocate(&pod("x"), &[net("10.0.0.0/31")]),
            Err(IpamError::TooSmall {
                pool: net("10.0.0.0/31")
            })
        );
    }

    #[test]
    fn gc_releases_what_the_runtime_no_longer_names() {
        let pools = [net("10.244.1.0/24")];
        let mut a = Allocations::new();
        for id in ["a", "b", "c"] {
            a.allocate(&pod(id), &pools).unwrap();
        }
        let valid: BTreeSet<Attachment> = [pod("b")].into();
        let released = a.collect(&valid);
        assert_eq!(
            released
                .iter()
                .map(|(w, _)| w.container_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a.addresses(&pod("b")), Some(&[ip("10.244.1.3")][..]));
    }

    #[derive(Clone, Debug)]
    enum Step {
        Add(u8),
        Del(u8),
        Gc(Vec<u8>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..24).prop_map(Step::Add),
            2 => (0u8..24).prop_map(Step::Del),
            1 => proptest::collection::vec(0u8..24, 0..8).prop_map(Step::Gc),
        ]
    }

    #[test]
    fn a_reboot_forgets_every_attachment_of_the_boot_before() {
        let pool: IpNet = "10.244.1.0/24".parse().unwrap();
        let who = |id: &str| Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        };
        let mut a = Allocations::new();
        assert!(a.since_boot("boot-1").is_empty(), "a fresh state");
        a.allocate(&who("a"), &[pool]).unwrap();
        assert!(a.since_boot("boot-1").is_empty(), "the same boot keeps it");
        let text = serde_json::to_string(&a).unwrap();
        let mut read: Allocations = serde_json::from_str(&text).unwrap();
        assert_eq!(read, a, "the boot is kept in the file");
        let forgotten = read.since_boot("boot-2");
        assert_eq!(forgotten.len(), 1);
        assert!(read.is_empty());
        read.allocate(&who("b"), &[pool]).unwrap();
        // A file written before boots were recorded is taken as this boot's.
        let old = r#"{"version":1,"attachments":[{"container_id":"x","ifname":"eth0","addresses":["10.244.1.9"]}],"last":[]}"#;
        let mut legacy: Allocations = serde_json::from_str(old).unwrap();
        assert!(legacy.since_boot("boot-2").is_empty());
        assert_eq!(legacy.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn no_address_is_ever_given_twice_or_outside_the_usable_range(
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            // A /28 (13 pods) and a /124 (14 pods): small enough to fill and wrap.
            let pools = [net("10.9.0.16/28"), net("fd00:9::10/124")];
            let mut a = Allocations::new();
            for s in steps {
                match s {
                    Step::Add(i) => {
                        let before = a.clone();
                        match a.allocate(&pod(&i.to_string()), &pools) {
                            Ok(addrs) => {
                                prop_assert_eq!(addrs.len(), 2);
                                prop_assert_eq!(a.addresses(&pod(&i.to_string())), Some(&addrs[..]));
                            }
                            Err(_) => prop_assert_eq!(&a, &before, "an error changes nothing"),
                        }
                    }
                    Step::Del(i) => {
                        a.release(&pod(&i.to_string()));
                        prop_assert!(a.addresses(&pod(&i.to_string())).is_none());
                    }
                    Step::Gc(keep) => {
                        let valid: BTreeSet<Attachment> =
                            keep.iter().map(|i| pod(&i.to_string())).collect();
                        a.collect(&valid);
                        prop_assert!(a.iter().all(|(w, _)| valid.contains(w)));
                    }
                }
                let mut seen = BTreeSet::new();
                for (_, addrs) in a.iter() {
                    for addr in addrs {
                        prop_assert!(seen.insert(*addr), "{} given twice", addr);
                        let pool = pools.iter().find(|p| p.contains(addr)).expect("in a pool");
                        prop_assert_ne!(Some(*addr), gateway(*pool));
                        prop_assert_ne!(*addr, pool.network());
                        if pool.addr().is_ipv4() {
                            prop_assert_ne!(*addr, pool.broadcast());
                        }
                    }
                }
            }
        }

        #[test]
        fn the_state_survives_its_file_format(
            ids in proptest::collection::vec(0u8..40, 0..30),
        ) {
            let pools = [net("10.244.0.0/24"), net("fd00:244::/64")];
            let mut a = Allocations::new();
            for i in ids {
                let _ = a.allocate(&pod(&i.to_string()), &pools);
            }
            let text = serde_json::to_string(&a).unwrap();
            let back: Allocations = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(back, a);
        }
    }
}
