//! Shape chains: what a frontend's traffic goes through, shared by every service port of
//! the same policy and endpoint count. A shape is named by its parameters
//! (`shape-clusterip-cluster-3`, `shape-nodeport-local-3-1`) and its rules depend on
//! nothing else (but whether the node knows its pod network), so ports that share a name
//! share the chain, and a name read back from the kernel says what the chain should hold.

use crate::input::TrafficPolicy;
use crate::ruleset::{Condition, FrontendKind, Role, Rule};
use std::collections::BTreeSet;

/// The parameters of a shape chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// ClusterIP traffic under the internal policy, picking among `count` endpoints
    /// (all of them under Cluster, this node's under Local).
    ClusterIp { policy: TrafficPolicy, count: usize },
    /// External IPs and load-balancer IPs (`Address`) or NodePorts under an external
    /// policy of Cluster: masqueraded, any endpoint.
    ExternalCluster { kind: FrontendKind, count: usize },
    /// The same under an external policy of Local: pods and the node itself may use any
    /// of `cluster` endpoints (the node masqueraded); the rest keep their address and go
    /// to one of the `local` ones, or are dropped without one.
    ExternalLocal {
        kind: FrontendKind,
        cluster: usize,
        local: usize,
    },
}

impl Shape {
    /// The chain's name.
    pub fn name(&self) -> String {
        match *self {
            Shape::ClusterIp { policy, count } => {
                format!("shape-clusterip-{}-{count}", policy_name(policy))
            }
            Shape::ExternalCluster { kind, count } => {
                format!("shape-{}-cluster-{count}", kind_name(kind))
            }
            Shape::ExternalLocal {
                kind,
                cluster,
                local,
            } => format!("shape-{}-local-{cluster}-{local}", kind_name(kind)),
        }
    }

    /// The shape a chain name stands for, if it is one.
    pub fn parse(name: &str) -> Option<Shape> {
        let rest = name.strip_prefix("shape-")?;
        let parts: Vec<&str> = rest.split('-').collect();
        let count = |s: &str| s.parse::<usize>().ok();
        let kind = |s: &str| match s {
            "external" => Some(FrontendKind::Address),
            "nodeport" => Some(FrontendKind::NodePort),
            _ => None,
        };
        let shape = match parts.as_slice() {
            ["clusterip", "cluster", n] => Shape::ClusterIp {
                policy: TrafficPolicy::Cluster,
                count: count(n)?,
            },
            ["clusterip", "local", n] => Shape::ClusterIp {
                policy: TrafficPolicy::Local,
                count: count(n)?,
            },
            [k, "cluster", n] => Shape::ExternalCluster {
                kind: kind(k)?,
                count: count(n)?,
            },
            [k, "local", c, l] => Shape::ExternalLocal {
                kind: kind(k)?,
                cluster: count(c)?,
                local: count(l)?,
            },
            _ => return None,
        };
        (shape.is_valid() && shape.name() == name).then_some(shape)
    }

    /// Every pool it picks from has endpoints (a local pool of a Local external policy
    /// may be empty: that traffic is dropped).
    fn is_valid(&self) -> bool {
        match *self {
            Shape::ClusterIp { count, .. } | Shape::ExternalCluster { count, .. } => count > 0,
            Shape::ExternalLocal { cluster, .. } => cluster > 0,
        }
    }

    /// The chain's rules; `from_cluster` when the node knows its pod network.
    pub fn rules(&self, from_cluster: bool) -> Vec<Rule> {
        let pick = |when, masquerade, role, frontend, count: usize| Rule::Pick {
            when,
            masquerade,
            role,
            frontend,
            count: count as u32,
        };
        match *self {
            Shape::ClusterIp { policy, count } => vec![
                Rule::MasqueradeUnlessFromCluster,
                pick(
                    Condition::Always,
                    false,
                    role_of(policy),
                    FrontendKind::Address,
                    count,
                ),
            ],
            Shape::ExternalCluster { kind, count } => {
                vec![pick(Condition::Always, true, Role::Cluster, kind, count)]
            }
            Shape::ExternalLocal {
                kind,
                cluster,
                local,
            } => {
                let mut body = Vec::new();
                if from_cluster {
                    body.push(pick(
                        Condition::FromCluster,
                        false,
                        Role::Cluster,
                        kind,
                        cluster,
                    ));
                }
                body.push(pick(
                    Condition::LocalSource,
                    true,
                    Role::Cluster,
                    kind,
                    cluster,
                ));
                body.push(if local == 0 {
                    Rule::Drop
                } else {
                    pick(Condition::Always, false, Role::Local, kind, local)
                });
                body
            }
        }
    }

    /// The pools its rules pick from.
    pub fn roles(&self) -> BTreeSet<Role> {
        match *self {
            Shape::ClusterIp { policy, .. } => [role_of(policy)].into(),
            Shape::ExternalCluster { .. } => [Role::Cluster].into(),
            Shape::ExternalLocal { local, .. } => {
                if local == 0 {
                    [Role::Cluster].into()
                } else {
                    [Role::Cluster, Role::Local].into()
                }
            }
        }
    }

    /// The shapes one endpoint away (a count one up or down): made ready ahead, so that
    /// the next endpoint event finds its chain and changes only map elements.
    pub fn neighbours(&self) -> Vec<Shape> {
        let around = |n: usize| [n.checked_sub(1), n.checked_add(1)].into_iter().flatten();
        let out: Vec<Shape> = match *self {
            Shape::ClusterIp { policy, count } => around(count)
                .map(|count| Shape::ClusterIp { policy, count })
                .collect(),
            Shape::ExternalCluster { kind, count } => around(count)
                .map(|count| Shape::ExternalCluster { kind, count })
                .collect(),
            Shape::ExternalLocal {
                kind,
                cluster,
                local,
            } => around(cluster)
                .map(|cluster| Shape::ExternalLocal {
                    kind,
                    cluster,
                    local,
                })
                .chain(around(local).map(|local| Shape::ExternalLocal {
                    kind,
                    cluster,
                    local,
                }))
                .collect(),
        };
        out.into_iter().filter(Shape::is_valid).collect()
    }
}

fn policy_name(policy: TrafficPolicy) -> &'static str {
    match policy {
        TrafficPolicy::Cluster => "cluster",
        TrafficPolicy::Local => "local",
    }
}

fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::Address => "external",
        FrontendKind::NodePort => "nodeport",
    }
}

/// The pool a policy picks from.
pub fn role_of(policy: TrafficPolicy) -> Role {
    match policy {
        TrafficPolicy::Cluster => Role::Cluster,
        TrafficPolicy::Local => Role::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Shape> {
        let mut out = Vec::new();
        for n in 1..4 {
            for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
                out.push(Shape::ClusterIp { policy, count: n });
            }
            for kind in [FrontendKind::Address, FrontendKind::NodePort] {
                out.push(Shape::ExternalCluster { kind, count: n });
                for local in 0..3 {
                    out.push(Shape::ExternalLocal {
                        kind,
                        cluster: n,
                        local,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn a_shape_is_read_back_from_its_name_and_nothing_else_is() {
        for shape in all_kinds() {
            assert_eq!(Shape::parse(&shape.name()), Some(shape), "{}", shape.name());
        }
        for name in [
            "service-ns/web/tcp/p",
            "shape-clusterip-cluster-0",
            "shape-clusterip-cluster-01",
            "shape-external-local-0-1",
            "shape-nodeport-cluster-x",
            "shape-other-cluster-1",
        ] {
            assert_eq!(Shape::parse(name), None, "{name}");
        }
    }

    #[test]
    fn neighbours_are_one_endpoint_away_and_never_empty() {
        assert_eq!(
            Shape::ClusterIp {
                policy: TrafficPolicy::Cluster,
                count: 1
            }
            .neighbours(),
            [Shape::ClusterIp {
                policy: TrafficPolicy::Cluster,
                count: 2
            }]
        );
        let local = Shape::ExternalLocal {
            kind: FrontendKind::NodePort,
            cluster: 3,
            local: 0,
        };
        assert_eq!(
            local
                .neighbours()
                .iter()
                .map(Shape::name)
                .collect::<Vec<_>>(),
            [
                "shape-nodeport-local-2-0",
                "shape-nodeport-local-4-0",
                "shape-nodeport-local-3-1"
            ]
        );
        for shape in all_kinds() {
            for n in shape.neighbours() {
                assert!(n.is_valid());
            }
        }
    }
}
