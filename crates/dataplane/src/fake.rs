//! In-memory stand-ins for the kernel, behind the same traits as the real edges, so that
//! reconcilers (here and in the agent) are tested by the exact operations a change
//! produces, without namespaces or root. Each records what was done to it.

use crate::error::{Error, Result};
use crate::interface::InterfaceControl;
use crate::nftables::{
    BaseChain, Batch, ChainInfo, ElemKey, ElemValue, ElementInfo, Expr, Family, Op, RuleDump,
    RuleInfo, Ruleset, SetFlags, SetInfo, SetRef, SetSpec, Verdict, check_batch, encode_exprs,
};
use crate::routes::{RouteSpec, RouteTable};
use crate::wireguard::{PeerConfig, PeerStatus, WireGuardDevice};
use async_trait::async_trait;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
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
    async fn link_with_address(&self, address: IpAddr) -> Result<Option<String>> {
        Ok(locked(&self.links)
            .iter()
            .find(|(_, l)| l.addresses.iter().any(|a| a.addr() == address))
            .map(|(name, _)| name.clone()))
    }
}

/// nf_tables as tables of chains of rules and of sets of elements; batches apply all or
/// nothing, as in the kernel, and every applied batch is kept. Ops are checked as the real
/// [`crate::nftables::Nft`] checks them before sending, and the kernel's refusals that a
/// reconciler must handle are mirrored: missing tables, chains, sets, elements and jump
/// targets ([`Error::NotFound`]), a set or element of another type or value in the way
/// ([`Error::AlreadyExists`]; in an interval set also a range whose first or last key lies in
/// another range, the kernel's test for overlaps), deleting a chain something still jumps to
/// or a set a rule uses (`EBUSY`). As in the kernel, deleting from an interval set deletes
/// the range that holds the key given, whatever its end. Not modelled: anonymous sets as
/// listed objects, element expiry, deleting a rule handle that is not there (accepted, as it
/// always was here).
#[derive(Default)]
pub struct FakeRuleset {
    state: Mutex<NftState>,
}

#[derive(Clone, Default)]
struct NftState {
    tables: BTreeMap<(Family, String), FakeTable>,
    next_handle: u64,
    applied: Vec<Batch>,
}

#[derive(Clone, Default)]
struct FakeTable {
    chains: BTreeMap<String, FakeChain>,
    sets: BTreeMap<String, FakeSet>,
}

#[derive(Clone)]
struct FakeChain {
    handle: u64,
    base: Option<BaseChain>,
    rules: Vec<FakeRule>,
}

#[derive(Clone)]
struct FakeRule {
    handle: u64,
    comment: Option<String>,
    exprs: Vec<Expr>,
}

#[derive(Clone)]
struct FakeSet {
    handle: u64,
    spec: SetSpec,
    /// By key and, for ranges, last key, as they are listed.
    elements: BTreeMap<ElemKey, (Option<ElemValue>, Option<Duration>)>,
}

impl FakeSet {
    /// Another element whose range holds `point` (ranges are compared
    /// field by field, each as a big-endian number, as the kernel does).
    fn range_holding(&self, point: &[u8], except: Option<&ElemKey>) -> Option<&ElemKey> {
        let widths: Vec<usize> = self.spec.key.iter().map(|f| f.width()).collect();
        self.elements
            .keys()
            .filter(|k| Some(*k) != except)
            .find(|k| {
                let end = k.end.as_deref().unwrap_or(&k.key);
                let mut offset = 0;
                widths.iter().all(|width| {
                    let field = offset..offset + width;
                    offset += width.next_multiple_of(4);
                    k.key.get(field.clone()) <= point.get(field.clone())
                        && point.get(field.clone()) <= end.get(field)
                })
            })
    }
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
            .and_then(|t| t.chains.get(chain))
            .map(|c| c.rules.iter().filter_map(|r| r.comment.clone()).collect())
            .unwrap_or_default()
    }

    /// The expressions of a chain's rules, in order.
    pub fn rule_exprs(&self, family: Family, table: &str, chain: &str) -> Vec<Vec<Expr>> {
        locked(&self.state)
            .tables
            .get(&(family, table.to_string()))
            .and_then(|t| t.chains.get(chain))
            .map(|c| c.rules.iter().map(|r| r.exprs.clone()).collect())
            .unwrap_or_default()
    }
}

impl NftState {
    fn table(
        &self,
        family: Family,
        table: &str,
        action: &dyn Fn() -> String,
    ) -> Result<&FakeTable> {
        self.tables
            .get(&(family, table.to_string()))
            .ok_or_else(|| not_found(action(), format!("table {family} {table}")))
    }

    fn table_mut(
        &mut self,
        family: Family,
        table: &str,
        action: &dyn Fn() -> String,
    ) -> Result<&mut FakeTable> {
        self.tables
            .get_mut(&(family, table.to_string()))
            .ok_or_else(|| not_found(action(), format!("table {family} {table}")))
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn apply_op(&mut self, op: &Op) -> Result<()> {
        let action = || op.to_string();
        match op {
            Op::AddTable { family, name } => {
                self.tables.entry((*family, name.clone())).or_default();
            }
            Op::DeleteTable { family, name } => {
                self.table(*family, name, &action)?;
                self.tables.remove(&(*family, name.clone()));
            }
            Op::DestroyTable { family, name } => {
                self.tables.remove(&(*family, name.clone()));
            }
            Op::FlushTable { family, name } => {
                let table = self.table_mut(*family, name, &action)?;
                table.chains.values_mut().for_each(|c| c.rules.clear());
            }
            Op::AddChain {
                family,
                table,
                chain,
                base,
            } => {
                let handle = self.handle();
                let t = self.table_mut(*family, table, &action)?;
                let entry = t.chains.entry(chain.clone()).or_insert(FakeChain {
                    handle,
                    base: *base,
                    rules: Vec::new(),
                });
                if base.is_some() {
                    entry.base = *base;
                }
            }
            Op::DeleteChain {
                family,
                table,
                chain,
            }
            | Op::DestroyChain {
                family,
                table,
                chain,
            } => {
                let strict = matches!(op, Op::DeleteChain { .. });
                let t = self.table_mut(*family, table, &action)?;
                if !t.chains.contains_key(chain) {
                    return if strict {
                        Err(not_found(
                            action(),
                            format!("chain {family} {table}/{chain}"),
                        ))
                    } else {
                        Ok(())
                    };
                }
                if t.jumps_to(chain) {
                    return Err(busy(action(), "something still jumps to the chain"));
                }
                t.chains.remove(chain);
            }
            Op::FlushChain {
                family,
                table,
                chain,
            } => {
                let t = self.table_mut(*family, table, &action)?;
                match t.chains.get_mut(chain) {
                    Some(c) => c.rules.clear(),
                    None => {
                        return Err(not_found(
                            action(),
                            format!("chain {family} {table}/{chain}"),
                        ));
                    }
                }
            }
            Op::AddRule {
                family,
                table,
                chain,
                exprs,
                comment,
            } => {
                let handle = self.handle();
                let t = self.table_mut(*family, table, &action)?;
                for name in exprs.iter().filter_map(set_of) {
                    if !t.sets.contains_key(name) {
                        return Err(not_found(action(), format!("set {family} {table}/{name}")));
                    }
                }
                for target in exprs.iter().flat_map(targets) {
                    if !t.chains.contains_key(target) {
                        return Err(not_found(
                            action(),
                            format!("chain {family} {table}/{target}"),
                        ));
                    }
                }
                match t.chains.get_mut(chain) {
                    Some(c) => c.rules.push(FakeRule {
                        handle,
                        comment: comment.clone(),
                        exprs: exprs.clone(),
                    }),
                    None => {
                        return Err(not_found(
                            action(),
                            format!("chain {family} {table}/{chain}"),
                        ));
                    }
                }
            }
            Op::DeleteRule {
                family,
                table,
                chain,
                handle,
            }
            | Op::DestroyRule {
                family,
                table,
                chain,
                handle,
            } => {
                let strict = matches!(op, Op::DeleteRule { .. });
                match self
                    .table_mut(*family, table, &action)?
                    .chains
                    .get_mut(chain)
                {
                    Some(c) => c.rules.retain(|r| r.handle != *handle),
                    None if strict => {
                        return Err(not_found(
                            action(),
                            format!("chain {family} {table}/{chain}"),
                        ));
                    }
                    None => {}
                }
            }
            Op::AddSet {
                family,
                table,
                name,
                spec,
            } => {
                let handle = self.handle();
                let t = self.table_mut(*family, table, &action)?;
                let interval = |spec: &SetSpec| spec.flags.contains(SetFlags::INTERVAL);
                match t.sets.get(name) {
                    Some(have)
                        if have.spec.key != spec.key
                            || have.spec.data != spec.data
                            || interval(&have.spec) != interval(spec) =>
                    {
                        return Err(Error::AlreadyExists {
                            action: action(),
                            scope: SCOPE.into(),
                            what: format!("a set {family} {table}/{name} of another type"),
                        });
                    }
                    Some(_) => {}
                    None => {
                        t.sets.insert(
                            name.clone(),
                            FakeSet {
                                handle,
                                spec: spec.clone(),
                                elements: BTreeMap::new(),
                            },
                        );
                    }
                }
            }
            Op::DeleteSet {
                family,
                table,
                name,
            }
            | Op::DestroySet {
                family,
                table,
                name,
            } => {
                let strict = matches!(op, Op::DeleteSet { .. });
                let t = self.table_mut(*family, table, &action)?;
                if !t.sets.contains_key(name) {
                    return if strict {
                        Err(not_found(action(), format!("set {family} {table}/{name}")))
                    } else {
                        Ok(())
                    };
                }
                let used = t
                    .chains
                    .values()
                    .flat_map(|c| &c.rules)
                    .flat_map(|r| &r.exprs)
                    .any(|e| set_of(e) == Some(name.as_str()));
                if used {
                    return Err(busy(action(), "a rule still uses the set"));
                }
                t.sets.remove(name);
            }
            Op::FlushSet {
                family,
                table,
                name,
            } => {
                let t = self.table_mut(*family, table, &action)?;
                match t.sets.get_mut(name) {
                    Some(set) => set.elements.clear(),
                    None => {
                        return Err(not_found(action(), format!("set {family} {table}/{name}")));
                    }
                }
            }
            Op::AddElements {
                family,
                table,
                set,
                elements,
            } => {
                let t = self.table_mut(*family, table, &action)?;
                let chains: Vec<String> = t.chains.keys().cloned().collect();
                let Some(fake) = t.sets.get_mut(set) else {
                    return Err(not_found(action(), format!("set {family} {table}/{set}")));
                };
                for (i, elem) in elements.iter().enumerate() {
                    let action = || op.describe(Some(i));
                    fake.spec
                        .check_element(i, elem)
                        .map_err(|e| e.while_doing(action))?;
                    if let Some(ElemValue::Verdict(Verdict::Jump(target) | Verdict::Goto(target))) =
                        &elem.value
                        && !chains.contains(target)
                    {
                        return Err(not_found(
                            action(),
                            format!("chain {family} {table}/{target}"),
                        ));
                    }
                    let key = ElemKey::from(elem);
                    if fake.spec.flags.contains(SetFlags::INTERVAL)
                        && let Some(other) = [&key.key, key.end.as_ref().unwrap_or(&key.key)]
                            .into_iter()
                            .find_map(|point| fake.range_holding(point, Some(&key)))
                    {
                        return Err(Error::AlreadyExists {
                            action: action(),
                            scope: SCOPE.into(),
                            what: format!("a range overlapping it ({other})"),
                        });
                    }
                    match fake.elements.get(&key) {
                        Some((value, _)) if *value != elem.value => {
                            return Err(Error::AlreadyExists {
                                action: action(),
                                scope: SCOPE.into(),
                                what: "an element of that key with another value".into(),
                            });
                        }
                        _ => {
                            let timeout = elem.timeout.or(fake.spec.timeout);
                            fake.elements.insert(key, (elem.value.clone(), timeout));
                        }
                    }
                }
            }
            Op::DeleteElements {
                family,
                table,
                set,
                keys,
            }
            | Op::DestroyElements {
                family,
                table,
                set,
                keys,
            } => {
                let strict = matches!(op, Op::DeleteElements { .. });
                let fake = match self
                    .tables
                    .get_mut(&(*family, table.clone()))
                    .and_then(|t| t.sets.get_mut(set))
                {
                    Some(fake) => fake,
                    None if strict || !keys.is_empty() => {
                        return Err(not_found(action(), format!("set {family} {table}/{set}")));
                    }
                    None => return Ok(()),
                };
                for (i, key) in keys.iter().enumerate() {
                    // The kernel deletes the range that holds the key, whatever end
                    // is given.
                    let key = match fake.spec.flags.contains(SetFlags::INTERVAL) {
                        true => fake.range_holding(&key.key, None).cloned(),
                        false => Some(key.clone()),
                    };
                    let gone = key.and_then(|key| fake.elements.remove(&key));
                    if gone.is_none() && strict {
                        return Err(not_found(op.describe(Some(i)), "element".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl FakeTable {
    /// Whether a rule or a verdict map element jumps to (or goes to) `chain`.
    fn jumps_to(&self, chain: &str) -> bool {
        let in_rules = self
            .chains
            .values()
            .flat_map(|c| &c.rules)
            .flat_map(|r| &r.exprs)
            .any(|e| targets(e).any(|t| t == chain));
        let in_maps = self.sets.values().flat_map(|s| s.elements.values()).any(|(v, _)| {
            matches!(v, Some(ElemValue::Verdict(Verdict::Jump(t) | Verdict::Goto(t))) if t == chain)
        });
        in_rules || in_maps
    }
}

/// The named set an expression uses.
fn set_of(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Lookup {
            set: SetRef::Named(name),
            ..
        }
        | Expr::Dynset { set: name, .. } => Some(name),
        _ => None,
    }
}

/// The chains an expression jumps or goes to (directly or through an anonymous map).
fn targets(expr: &Expr) -> Box<dyn Iterator<Item = &str> + '_> {
    fn of(v: &Verdict) -> Option<&str> {
        match v {
            Verdict::Jump(t) | Verdict::Goto(t) => Some(t),
            _ => None,
        }
    }
    match expr {
        Expr::Verdict(v) => Box::new(of(v).into_iter()),
        Expr::Lookup {
            set: SetRef::Anonymous(anon),
            ..
        } => Box::new(anon.elements.iter().filter_map(move |e| match &e.value {
            Some(ElemValue::Verdict(v)) => of(v),
            _ => None,
        })),
        _ => Box::new(std::iter::empty()),
    }
}

fn not_found(action: String, what: String) -> Error {
    Error::NotFound {
        action,
        what,
        scope: SCOPE.into(),
    }
}

fn busy(action: String, why: &str) -> Error {
    Error::Kernel {
        action,
        scope: SCOPE.into(),
        errno: libc::EBUSY,
        message: Some(why.into()),
    }
}

impl Ruleset for FakeRuleset {
    fn table_exists(&self, family: Family, name: &str) -> Result<bool> {
        Ok(locked(&self.state)
            .tables
            .contains_key(&(family, name.to_string())))
    }

    fn rules(&self, family: Family, table: &str, chain: &str) -> Result<Vec<RuleInfo>> {
        Ok(self
            .dump_rules(family, table, Some(chain))?
            .into_iter()
            .map(|r| RuleInfo {
                handle: r.handle,
                comment: r.comment,
            })
            .collect())
    }

    fn chains(&self, family: Family, table: &str) -> Result<Vec<ChainInfo>> {
        let s = locked(&self.state);
        let t = s.table(family, table, &|| {
            format!("listing chains of {family} {table}")
        })?;
        let mut chains: Vec<ChainInfo> = t
            .chains
            .iter()
            .map(|(name, c)| ChainInfo {
                name: name.clone(),
                handle: c.handle,
                base: c.base,
                hooked: c.base.is_some(),
            })
            .collect();
        chains.sort_by_key(|c| c.handle);
        Ok(chains)
    }

    fn sets(&self, family: Family, table: &str) -> Result<Vec<SetInfo>> {
        let s = locked(&self.state);
        let t = s.table(family, table, &|| {
            format!("listing sets of {family} {table}")
        })?;
        let mut sets: Vec<SetInfo> = t
            .sets
            .iter()
            .map(|(name, set)| SetInfo {
                name: name.clone(),
                handle: set.handle,
                spec: set.spec.clone(),
                anonymous: false,
            })
            .collect();
        sets.sort_by_key(|s| s.handle);
        Ok(sets)
    }

    fn elements(&self, family: Family, table: &str, set: &str) -> Result<Vec<ElementInfo>> {
        let s = locked(&self.state);
        let action = || format!("listing elements of set {family} {table}/{set}");
        let t = s.table(family, table, &action)?;
        let fake = t
            .sets
            .get(set)
            .ok_or_else(|| not_found(action(), format!("set {family} {table}/{set}")))?;
        Ok(fake
            .elements
            .iter()
            .map(|(key, (value, timeout))| ElementInfo {
                key: key.key.clone(),
                key_end: key.end.clone(),
                value: value.clone(),
                timeout: *timeout,
                // No time passes in the fake.
                expires: *timeout,
            })
            .collect())
    }

    /// The expression bytes are this crate's encoding of the rule, which is not
    /// byte-equal to what the kernel dumps (see [`RuleDump::exprs`]).
    fn dump_rules(
        &self,
        family: Family,
        table: &str,
        chain: Option<&str>,
    ) -> Result<Vec<RuleDump>> {
        let s = locked(&self.state);
        let action = || match chain {
            Some(chain) => format!("listing rules of {family} {table}/{chain}"),
            None => format!("listing rules of {family} {table}"),
        };
        let t = s.table(family, table, &action)?;
        if let Some(chain) = chain
            && !t.chains.contains_key(chain)
        {
            return Err(not_found(
                action(),
                format!("chain {family} {table}/{chain}"),
            ));
        }
        let mut chains: Vec<(&String, &FakeChain)> = t
            .chains
            .iter()
            .filter(|(name, _)| chain.is_none_or(|c| c == name.as_str()))
            .collect();
        chains.sort_by_key(|(_, c)| c.handle);
        Ok(chains
            .into_iter()
            .flat_map(|(name, c)| {
                c.rules.iter().map(move |r| RuleDump {
                    chain: name.clone(),
                    handle: r.handle,
                    comment: r.comment.clone(),
                    exprs: encode_exprs(&r.exprs),
                })
            })
            .collect())
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        // What the real one refuses before sending.
        check_batch(batch)?;
        let mut s = locked(&self.state);
        let mut next = s.clone();
        for op in batch.ops() {
            next.apply_op(op)?;
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

    #[test]
    fn the_fake_ruleset_models_ranges_as_the_kernel_does() {
        use crate::nftables::{DataType, Datum, SetElem, concat_interval};
        let ruleset = FakeRuleset::default();
        let ip = Family::Ip;
        let mark = DataType::Mark;
        let spec = SetSpec::map(&[mark, mark], &[mark]).with_flags(SetFlags::INTERVAL);
        let key = |a: u32, b: u32| concat_interval(&[Datum::Mark(a), Datum::Mark(b)]);
        let slot =
            |a, lo, hi, v: u8| SetElem::range(key(a, lo), key(a, hi)).with_value(vec![v, 0, 0, 0]);
        let mut batch = Batch::new();
        batch
            .add_table(ip, "t")
            .add_set(ip, "t", "slots", spec.clone())
            .add_elements(
                ip,
                "t",
                "slots",
                vec![slot(2, 0, 99, 0), slot(2, 100, 199, 1)],
            );
        ruleset.apply(&batch).unwrap();
        let listed = ruleset.elements(ip, "t", "slots").unwrap();
        assert_eq!(listed[1].key_end, Some(key(2, 199)));
        assert_eq!(ruleset.sets(ip, "t").unwrap()[0].spec, spec);
        // The same range again is fine, another value or an overlap is not.
        for (elem, fine) in [
            (slot(2, 0, 99, 0), true),
            (slot(2, 0, 99, 1), false),
            (slot(2, 50, 150, 0), false),
            (slot(2, 150, 300, 0), false),
            (slot(3, 0, 99, 0), true),
        ] {
            let mut batch = Batch::new();
            batch.add_elements(ip, "t", "slots", vec![elem.clone()]);
            let result = ruleset.apply(&batch);
            assert_eq!(result.is_ok(), fine, "{elem:?}: {result:?}");
            if !fine {
                assert!(matches!(result, Err(Error::AlreadyExists { .. })));
            }
        }
        // Deleting goes by the range that holds the key; a key in no range is missing.
        let mut batch = Batch::new();
        batch.delete_elements(ip, "t", "slots", [key(2, 150)]);
        ruleset.apply(&batch).unwrap();
        let mut batch = Batch::new();
        batch.delete_elements(ip, "t", "slots", [ElemKey::range(key(2, 150), key(2, 199))]);
        assert!(ruleset.apply(&batch).unwrap_err().is_not_found());
        let keys: Vec<ElemKey> = ruleset
            .elements(ip, "t", "slots")
            .unwrap()
            .iter()
            .map(ElemKey::from)
            .collect();
        assert_eq!(
            keys,
            [
                ElemKey::range(key(2, 0), key(2, 99)),
                ElemKey::range(key(3, 0), key(3, 99))
            ]
        );
        // A set of the same fields without intervals is another type.
        let mut batch = Batch::new();
        batch.add_set(ip, "t", "slots", SetSpec::map(&[mark, mark], &[mark]));
        assert!(matches!(
            ruleset.apply(&batch),
            Err(Error::AlreadyExists { .. })
        ));
    }

    #[test]
    fn the_fake_ruleset_models_sets_elements_chains_and_destroys() {
        use crate::nftables::{DataType, SetElem, dsl};
        let ruleset = FakeRuleset::default();
        let inet = Family::Inet;
        let key = vec![10, 0, 0, 1];
        let mut batch = Batch::new();
        batch
            .add_table(inet, "t")
            .add_chain(inet, "t", "svc", None)
            .add_set(inet, "t", "m", SetSpec::vmap(&[DataType::Ipv4Addr]))
            .add_elements(
                inet,
                "t",
                "m",
                vec![SetElem::verdict(key.clone(), Verdict::Goto("svc".into()))],
            )
            .add_rule(inet, "t", "svc", dsl::accept(), Some("one"));
        ruleset.apply(&batch).unwrap();
        assert_eq!(ruleset.sets(inet, "t").unwrap()[0].name, "m");
        assert_eq!(ruleset.elements(inet, "t", "m").unwrap()[0].key, key);
        let rules = ruleset.dump_rules(inet, "t", None).unwrap();
        assert_eq!(rules[0].comment.as_deref(), Some("one"));
        assert!(!rules[0].exprs.is_empty());

        // The map still jumps to the chain: it cannot go.
        let mut batch = Batch::new();
        batch.delete_chain(inet, "t", "svc");
        let err = ruleset.apply(&batch).unwrap_err();
        assert!(err.has_errno(libc::EBUSY), "{err:?}");
        // Another value for a key in the map is in the way.
        let mut batch = Batch::new();
        batch.add_elements(
            inet,
            "t",
            "m",
            vec![SetElem::verdict(key.clone(), Verdict::Drop)],
        );
        assert!(matches!(
            ruleset.apply(&batch),
            Err(Error::AlreadyExists { .. })
        ));
        // Destroys of what is missing succeed; a batch is all or nothing.
        let mut batch = Batch::new();
        batch
            .destroy_elements(inet, "t", "m", vec![key.clone(), vec![10, 0, 0, 9]])
            .destroy_chain(inet, "t", "svc")
            .destroy_chain(inet, "t", "gone")
            .destroy_table(inet, "gone");
        ruleset.apply(&batch).unwrap();
        assert!(ruleset.chains(inet, "t").unwrap().is_empty());
        let mut batch = Batch::new();
        batch
            .add_chain(inet, "t", "x", None)
            .delete_elements(inet, "t", "m", vec![key]);
        assert!(ruleset.apply(&batch).unwrap_err().is_not_found());
        assert!(ruleset.chains(inet, "t").unwrap().is_empty());
        // Refused before "sending", as the real one does.
        let mut batch = Batch::new();
        batch.add_elements(inet, "t", "m", vec![SetElem::key(vec![])]);
        assert!(matches!(ruleset.apply(&batch), Err(Error::Invalid { .. })));
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
