//! In-memory stand-ins for the kernel, behind the same traits as the real edges, so that
//! reconcilers (here and in the agent) are tested by the exact operations a change
//! produces, without namespaces or root. Each records what was done to it.

use crate::error::{Error, Result};
use crate::interface::InterfaceControl;
use crate::nftables::{Batch, Family, Op, RuleInfo, Ruleset};
use crate::routes::{RouteSpec, RouteTable};
use crate::wireguard::{PeerConfig, PeerStatus, WireGuardDevice};
use async_trait::async_trait;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::sync::Mutex;
use trellis_model::PublicKey;

/// Where the fakes' errors say they happened.
const SCOPE: &str = "fake";

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A WireGuard device. A peer's *session* is numbered when the peer is added; updating
/// its attributes keeps the number (as the real devices keep the session), removing and
/// re-adding gives a new one.
pub struct FakeWireGuard {
    name: String,
    state: Mutex<WgState>,
}

#[derive(Default)]
struct WgState {
    peers: BTreeMap<PublicKey, (PeerConfig, u64)>,
    next_session: u64,
    writes: BTreeMap<PublicKey, usize>,
}

impl FakeWireGuard {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: Mutex::default(),
        }
    }

    /// Each peer's session number.
    pub fn sessions(&self) -> BTreeMap<PublicKey, u64> {
        locked(&self.state)
            .peers
            .iter()
            .map(|(k, (_, s))| (*k, *s))
            .collect()
    }

    /// How many times a peer was written (added or updated).
    pub fn writes_to(&self, key: &PublicKey) -> usize {
        locked(&self.state).writes.get(key).copied().unwrap_or(0)
    }

    pub fn peer(&self, key: &PublicKey) -> Option<PeerConfig> {
        locked(&self.state).peers.get(key).map(|(c, _)| c.clone())
    }
}

#[async_trait]
impl WireGuardDevice for FakeWireGuard {
    fn name(&self) -> &str {
        &self.name
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>> {
        Ok(locked(&self.state)
            .peers
            .values()
            .map(|(config, _)| PeerStatus {
                config: config.clone(),
                ..PeerStatus::new(config.public_key)
            })
            .collect())
    }

    async fn upsert_peer(&self, peer: &PeerConfig) -> Result<()> {
        let mut s = locked(&self.state);
        *s.writes.entry(peer.public_key).or_default() += 1;
        let session = match s.peers.get(&peer.public_key) {
            Some((_, session)) => *session,
            None => {
                s.next_session += 1;
                s.next_session
            }
        };
        let mut config = peer.clone();
        if config.endpoint.is_none()
            && let Some((old, _)) = s.peers.get(&peer.public_key)
        {
            config.endpoint = old.endpoint; // a learned endpoint stays
        }
        s.peers.insert(peer.public_key, (config, session));
        Ok(())
    }

    async fn remove_peer(&self, key: &PublicKey) -> Result<()> {
        locked(&self.state).peers.remove(key);
        Ok(())
    }
}

/// A main routing table holding routes of every protocol; installs of chosen
/// destinations can be made to fail.
pub struct FakeRoutes {
    protocol: u8,
    state: Mutex<RouteState>,
}

#[derive(Default)]
struct RouteState {
    /// One route per destination, as the main table holds them (default metric).
    routes: BTreeMap<IpNet, RouteSpec>,
    failing: Vec<IpNet>,
}

impl FakeRoutes {
    /// A table whose routes are of `protocol` unless added otherwise.
    pub fn new(protocol: u8) -> Self {
        Self {
            protocol,
            state: Mutex::default(),
        }
    }

    /// Installing a route to `dst` fails from now on.
    pub fn fail_on(&self, dst: &str) {
        locked(&self.state)
            .failing
            .push(dst.parse().expect("a prefix"));
    }

    /// Someone else's change: delete a route behind the reconciler's back.
    pub fn remove_where(&self, keep: impl Fn(&RouteSpec) -> bool) {
        locked(&self.state).routes.retain(|_, r| keep(r));
    }

    pub fn all(&self) -> Vec<RouteSpec> {
        let mut routes: Vec<RouteSpec> = locked(&self.state).routes.values().cloned().collect();
        routes.sort();
        routes
    }

    pub fn protocol(&self) -> u8 {
        self.protocol
    }
}

#[async_trait]
impl RouteTable for FakeRoutes {
    async fn routes(&self, protocol: u8) -> Result<Vec<RouteSpec>> {
        let mut routes: Vec<RouteSpec> = locked(&self.state)
            .routes
            .values()
            .filter(|r| r.protocol == protocol)
            .cloned()
            .collect();
        routes.sort();
        Ok(routes)
    }

    async fn install(&self, route: &RouteSpec, replace: bool) -> Result<()> {
        let mut s = locked(&self.state);
        if s.failing.contains(&route.dst) {
            return Err(Error::Kernel {
                action: format!("adding route {route}"),
                scope: SCOPE.into(),
                errno: libc::EIO,
                message: Some("injected failure".into()),
            });
        }
        match s.routes.get_mut(&route.dst) {
            Some(have) if replace => *have = route.clone(),
            Some(_) => {
                return Err(Error::AlreadyExists {
                    action: format!("adding route {route}"),
                    scope: SCOPE.into(),
                    what: format!("a route to {}", route.dst),
                });
            }
            None => {
                s.routes.insert(route.dst, route.clone());
            }
        }
        Ok(())
    }

    async fn delete(&self, route: &RouteSpec) -> Result<()> {
        let mut s = locked(&self.state);
        if s.routes.get(&route.dst) == Some(route) {
            s.routes.remove(&route.dst);
        }
        Ok(())
    }
}

/// Links with addresses, an MTU and a state.
#[derive(Default)]
pub struct FakeInterfaces {
    links: Mutex<BTreeMap<String, FakeLink>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeLink {
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub up: bool,
}

impl FakeInterfaces {
    pub fn link(&self, name: &str) -> Option<FakeLink> {
        locked(&self.links).get(name).cloned()
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut FakeLink) -> T) -> T {
        f(locked(&self.links).entry(name.to_string()).or_default())
    }
}

#[async_trait]
impl InterfaceControl for FakeInterfaces {
    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>> {
        Ok(self.with(link, |l| l.addresses.clone()))
    }
    async fn add_address(&self, link: &str, address: IpNet) -> Result<()> {
        self.with(link, |l| {
            if !l.addresses.contains(&address) {
                l.addresses.push(address)
            }
        });
        Ok(())
    }
    async fn del_address(&self, link: &str, address: IpNet) -> Result<()> {
        self.with(link, |l| l.addresses.retain(|a| *a != address));
        Ok(())
    }
    async fn set_mtu(&self, link: &str, mtu: u32) -> Result<()> {
        self.with(link, |l| l.mtu = mtu);
        Ok(())
    }
    async fn set_up(&self, link: &str) -> Result<()> {
        self.with(link, |l| l.up = true);
        Ok(())
    }
}

/// nf_tables as tables of chains of commented rules; batches apply all or nothing, as in
/// the kernel, and every applied batch is kept.
#[derive(Default)]
pub struct FakeRuleset {
    state: Mutex<NftState>,
}

#[derive(Clone, Default)]
struct NftState {
    tables: BTreeMap<(Family, String), BTreeMap<String, Vec<RuleInfo>>>,
    next_handle: u64,
    applied: Vec<Batch>,
}

impl FakeRuleset {
    /// Every batch applied so far.
    pub fn applied(&self) -> Vec<Batch> {
        locked(&self.state).applied.clone()
    }

    /// The comments of a chain's rules, in order.
    pub fn comments(&self, family: Family, table: &str, chain: &str) -> Vec<String> {
        locked(&self.state)
            .tables
            .get(&(family, table.to_string()))
            .and_then(|chains| chains.get(chain))
            .map(|rules| rules.iter().filter_map(|r| r.comment.clone()).collect())
            .unwrap_or_default()
    }
}

impl Ruleset for FakeRuleset {
    fn table_exists(&self, family: Family, name: &str) -> Result<bool> {
        Ok(locked(&self.state)
            .tables
            .contains_key(&(family, name.to_string())))
    }

    fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>> {
        let s = locked(&self.state);
        let missing = |what: String| Error::NotFound {
            action: format!("listing rules of {family} {table}/{chain}"),
            what,
            scope: SCOPE.into(),
        };
        let chains = s
            .tables
            .get(&(family, table.to_string()))
            .ok_or_else(|| missing(format!("table {family} {table}")))?;
        chains
            .get(chain)
            .cloned()
            .ok_or_else(|| missing(format!("chain {family} {table}/{chain}")))
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let mut s = locked(&self.state);
        let mut next = s.clone();
        for op in batch.ops() {
            let missing = |what: &str| Error::NotFound {
                action: op.to_string(),
                what: what.into(),
                scope: SCOPE.into(),
            };
            match op {
                Op::AddTable { family, name } => {
                    next.tables.entry((*family, name.clone())).or_default();
                }
                Op::DeleteTable { family, name } => {
                    if next.tables.remove(&(*family, name.clone())).is_none() {
                        return Err(missing("table"));
                    }
                }
                Op::FlushTable { family, name } => {
                    match next.tables.get_mut(&(*family, name.clone())) {
                        Some(chains) => chains.values_mut().for_each(Vec::clear),
                        None => return Err(missing("table")),
                    }
                }
                Op::AddChain {
                    family,
                    table,
                    chain,
                    ..
                } => match next.tables.get_mut(&(*family, table.clone())) {
                    Some(chains) => {
                        chains.entry(chain.clone()).or_default();
                    }
                    None => return Err(missing("table")),
                },
                Op::AddRule {
                    family,
                    table,
                    chain,
                    comment,
                    ..
                } => {
                    next.next_handle += 1;
                    let handle = next.next_handle;
                    match next
                        .tables
                        .get_mut(&(*family, table.clone()))
                        .and_then(|chains| chains.get_mut(chain))
                    {
                        Some(rules) => rules.push(RuleInfo {
                            handle,
                            comment: comment.clone(),
                        }),
                        None => return Err(missing("chain")),
                    }
                }
                Op::DeleteRule {
                    family,
                    table,
                    chain,
                    handle,
                } => match next
                    .tables
                    .get_mut(&(*family, table.clone()))
                    .and_then(|chains| chains.get_mut(chain))
                {
                    Some(rules) => rules.retain(|r| r.handle != *handle),
                    None => return Err(missing("chain")),
                },
            }
        }
        next.applied.push(batch.clone());
        *s = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fakes_fail_with_the_kinds_the_real_edges_use() {
        let ruleset = FakeRuleset::default();
        let err = ruleset.rules(Family::Inet, "t", "c").unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { what, .. } if what == "table inet t"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("listing rules of inet t/c"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_route_in_the_way_is_already_exists_and_an_injected_failure_a_kernel_error() {
        let table = FakeRoutes::new(116);
        let route = RouteSpec {
            dst: "10.0.0.0/24".parse().unwrap(),
            via: None,
            dev: Some("wg0".into()),
            src: None,
            protocol: 116,
        };
        table.install(&route, false).await.unwrap();
        let err = table.install(&route, false).await.unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
        assert!(err.has_errno(libc::EEXIST));
        table.fail_on("10.0.0.0/24");
        let err = table.install(&route, true).await.unwrap_err();
        assert!(err.has_errno(libc::EIO), "{err:?}");
        assert!(err.to_string().contains("injected failure"), "{err}");
    }
}
