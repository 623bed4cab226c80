//! Routes as a reconciler: the kernel's routes of one protocol number (the agent's own)
//! brought to a desired set. [`diff_routes`] decides, purely, which routes to install,
//! replace and delete; [`reconcile_routes`] reads the kernel through a [`RouteTable`],
//! applies those operations one by one (a failure never stops the others) and reports
//! what changed. Routes of any other protocol are never touched.

use crate::error::{Error, Result};
use async_trait::async_trait;
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// The kernel's main routing table, as the reconciler needs it. [`crate::netlink::Netlink`]
/// is the real one; [`crate::fake::FakeRoutes`] an in-memory one for tests.
#[async_trait]
pub trait RouteTable: Send + Sync {
    /// The main-table routes carrying `protocol`.
    async fn routes(&self, protocol: u8) -> Result<Vec<RouteSpec>>;
    /// Installs `route`; with `replace`, over a route to the same destination in one step,
    /// else only where there is none.
    async fn install(&self, route: &RouteSpec, replace: bool) -> Result<()>;
    /// Deletes exactly this route; succeeds if it is already gone.
    async fn delete(&self, route: &RouteSpec) -> Result<()>;
}

/// One main-table unicast route, as this crate installs and reads them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Ord, PartialOrd)]
pub struct RouteSpec {
    /// Destination prefix; host bits are ignored (the kernel wants none).
    pub dst: IpNet,
    /// Gateway; `None` for a route straight out of `dev`.
    pub via: Option<IpAddr>,
    /// Output interface; `None` lets the kernel pick it from `via`. Routes
    /// read back from the kernel always carry it.
    pub dev: Option<String>,
    /// Preferred source address; must be an address of this namespace.
    pub src: Option<IpAddr>,
    /// Route protocol number: marks the routes as ours (see [`reconcile_routes`]).
    pub protocol: u8,
}

impl RouteSpec {
    /// The same route with its destination's host bits cleared.
    pub fn normalized(&self) -> RouteSpec {
        RouteSpec {
            dst: self.dst.trunc(),
            ..self.clone()
        }
    }

    /// Whether the kernel's route `self` is what `desired` asks for. A
    /// desired route without `dev` leaves the interface to the kernel.
    pub fn satisfies(&self, desired: &RouteSpec) -> bool {
        self.dst == desired.dst
            && self.via == desired.via
            && self.src == desired.src
            && self.protocol == desired.protocol
            && (desired.dev.is_none() || self.dev == desired.dev)
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if let Some(dev) = &self.dev {
            write!(f, " dev {dev}")?;
        }
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        write!(f, " proto {}", self.protocol)
    }
}

/// What a [`reconcile_routes`] run changed in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteChanges {
    /// Desired routes that were missing or different and were installed.
    pub added: Vec<RouteSpec>,
    /// Routes of ours (as the kernel had them) that are gone now.
    pub removed: Vec<RouteSpec>,
}

impl RouteChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// One change the reconciler makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteOp {
    /// Install a desired route; `replaces` is a route of ours to the same destination that
    /// it takes the place of in one step, so traffic never sees the destination unrouted.
    Install {
        route: RouteSpec,
        replaces: Option<RouteSpec>,
    },
    /// Delete a route of ours that nothing desires.
    Delete(RouteSpec),
}

/// The operations that turn `current` (the kernel's routes of `protocol`) into `desired`,
/// and the desired routes refused because they do not carry `protocol`. Desired routes are
/// normalised (host bits cleared) and de-duplicated first; a route already in place in any
/// form that satisfies the desired one is left alone.
pub fn diff_routes(
    protocol: u8,
    current: &[RouteSpec],
    desired: &[RouteSpec],
) -> (Vec<RouteOp>, Vec<String>) {
    // Indexed by destination: a node of a 10,000-node cluster has some 20,000 routes, and
    // comparing every desired route with every kernel route would cost seconds per pass.
    let mut refused = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(desired.len());
    let mut usable: Vec<RouteSpec> = Vec::with_capacity(desired.len());
    for route in desired.iter().map(RouteSpec::normalized) {
        if route.protocol != protocol {
            refused.push(format!(
                "desired route {route} does not carry protocol {protocol}"
            ));
        } else if seen.insert(route.clone()) {
            usable.push(route);
        }
    }
    let mut leftovers: std::collections::BTreeMap<IpNet, Vec<RouteSpec>> = Default::default();
    for have in current {
        leftovers.entry(have.dst).or_default().push(have.clone());
    }
    let mut ops = Vec::new();
    for route in usable {
        let same_dst = leftovers.get_mut(&route.dst);
        let replaces = match same_dst {
            Some(haves) => {
                if let Some(i) = haves.iter().position(|have| have.satisfies(&route)) {
                    haves.remove(i);
                    continue;
                }
                (!haves.is_empty()).then(|| haves.remove(0))
            }
            None => None,
        };
        ops.push(RouteOp::Install { route, replaces });
    }
    ops.extend(leftovers.into_values().flatten().map(RouteOp::Delete));
    (ops, refused)
}

/// Makes the kernel's routes of `protocol` (main table) equal to `desired`: installs what
/// is missing or different, deletes what is not desired, and never touches a route of
/// another protocol — not even one in the way of a desired route (that one fails).
///
/// Each failure is logged and the others still go ahead; the error at the end,
/// [`Error::Partial`], lists them all. A replacement that fails leaves the route it would
/// have replaced in place. Any other error means the kernel's routes could not even be
/// read, and nothing was changed.
pub async fn reconcile_routes(
    table: &dyn RouteTable,
    protocol: u8,
    desired: &[RouteSpec],
) -> Result<RouteChanges> {
    let current = table.routes(protocol).await?;
    let (ops, mut failures) = diff_routes(protocol, &current, desired);
    let mut changes = RouteChanges::default();
    for op in ops {
        let result = match &op {
            RouteOp::Install { route, replaces } => table.install(route, replaces.is_some()).await,
            RouteOp::Delete(route) => table.delete(route).await,
        };
        match (result, op) {
            (Ok(()), RouteOp::Install { route, replaces }) => {
                changes.added.push(route);
                changes.removed.extend(replaces);
            }
            (Ok(()), RouteOp::Delete(route)) => changes.removed.push(route),
            (Err(e), _) => {
                tracing::warn!("route reconcile: {e}");
                failures.push(e.to_string());
            }
        }
    }
    if failures.is_empty() {
        Ok(changes)
    } else {
        Err(Error::Partial {
            what: "route changes".into(),
            failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeRoutes;

    const OURS: u8 = 116;

    fn route(dst: &str, via: Option<&str>, dev: Option<&str>) -> RouteSpec {
        RouteSpec {
            dst: dst.parse().unwrap(),
            via: via.map(|v| v.parse().unwrap()),
            dev: dev.map(str::to_string),
            src: Some("100.64.0.1".parse().unwrap()),
            protocol: OURS,
        }
    }

    #[test]
    fn the_diff_installs_replaces_and_deletes_only_what_differs() {
        let current = [
            route("10.244.1.0/24", None, Some("wg0")),
            route("10.244.2.0/24", Some("172.20.0.11"), Some("int0")),
            route("10.244.9.0/24", None, Some("wg0")),
        ];
        let desired = [
            route("10.244.1.0/24", None, Some("wg0")), // in place
            route("10.244.2.0/24", None, Some("wg0")), // moves into the tunnel
            route("10.244.3.7/24", None, Some("wg0")), // new, host bits to clear
            route("10.244.3.0/24", None, Some("wg0")), // the same once normalised
        ];
        let (ops, refused) = diff_routes(OURS, &current, &desired);
        assert!(refused.is_empty());
        assert_eq!(
            ops,
            [
                RouteOp::Install {
                    route: route("10.244.2.0/24", None, Some("wg0")),
                    replaces: Some(route("10.244.2.0/24", Some("172.20.0.11"), Some("int0"))),
                },
                RouteOp::Install {
                    route: route("10.244.3.0/24", None, Some("wg0")),
                    replaces: None,
                },
                RouteOp::Delete(route("10.244.9.0/24", None, Some("wg0"))),
            ]
        );
        // a desired route without dev is satisfied by the kernel's choice of one
        let (ops, _) = diff_routes(
            OURS,
            &[route("10.244.2.0/24", Some("172.20.0.11"), Some("int0"))],
            &[route("10.244.2.0/24", Some("172.20.0.11"), None)],
        );
        assert!(ops.is_empty(), "{ops:?}");
        let foreign = RouteSpec {
            protocol: 4,
            ..route("10.0.0.0/8", None, None)
        };
        let (ops, refused) = diff_routes(OURS, &[], &[foreign]);
        assert!(ops.is_empty());
        assert!(
            refused[0].contains("does not carry protocol 116"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_step_leaves_the_rest_done_and_is_named() {
        let table = FakeRoutes::new(OURS);
        table.fail_on("10.244.3.0/24");
        let desired = [
            route("10.244.1.0/24", None, Some("wg0")),
            route("10.244.3.0/24", None, Some("wg0")),
        ];
        let err = reconcile_routes(&table, OURS, &desired).await.unwrap_err();
        let Error::Partial { failures, .. } = &err else {
            panic!("not a partial failure: {err}");
        };
        assert_eq!(failures.len(), 1, "{err}");
        assert!(err.to_string().contains("10.244.3.0/24"), "{err}");
        assert_eq!(
            table.routes(OURS).await.unwrap(),
            [route("10.244.1.0/24", None, Some("wg0"))]
        );
        let again = reconcile_routes(&table, OURS, &desired[..1]).await.unwrap();
        assert!(again.is_empty(), "nothing to do the second time: {again:?}");
    }
}
