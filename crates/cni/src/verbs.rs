//! The plugin's verbs over its two edges — the allocation state ([`crate::state`]) and the
//! pod's links ([`Links`], netlink in the binary, a fake in tests) — with the rules that
//! keep a node from leaking addresses or failing a runtime:
//!
//! - ADD allocates, then programs the links; if programming fails, what this call
//!   allocated is released and what it programmed is removed, so a retried ADD starts
//!   clean. An interface already in the pod is an error (the specification), unless it is
//!   exactly this attachment's (a retried ADD whose first answer was lost: the same
//!   answer; or one left without a record by an unfinished DEL or a killed ADD: replaced).
//! - DEL never fails for a missing namespace, interface or record: it removes what is
//!   there, releases the addresses, and answers success.
//! - GC releases every attachment the runtime does not name and removes its host links.
//! - STATUS answers from the node's readiness, read locally.

use crate::ipam::{Allocations, Attachment};
use crate::node::{NodeNetwork, PodNetwork, host_ifname, mac_string, pod_network};
use crate::spec::{AddResult, CniError, ResultInterface, ResultIp, ResultRoute, code};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// An interface found in a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub mac: String,
    pub addresses: Vec<ipnet::IpNet>,
}

/// The pod's links: programmed by the binary over netlink, faked in tests.
pub trait Links {
    /// Creates the veth pair, moves one end into `netns` as `net.ifname`, sets addresses,
    /// routes and MTU on both sides. Returns the pod interface's MAC address.
    fn attach(&mut self, netns: &str, net: &PodNetwork) -> Result<String, CniError>;
    /// Removes the host end (which takes the pod end with it) and the host routes; absent
    /// is done.
    fn detach(&mut self, net: &PodNetwork) -> Result<(), CniError>;
    /// Whether `ifname` exists in `netns`, and if so what it has.
    fn existing(&mut self, netns: &str, ifname: &str) -> Result<Option<Observed>, CniError>;
    /// Whether the host end of `net` exists.
    fn host_end_exists(&mut self, net: &PodNetwork) -> Result<bool, CniError>;
    /// The names of every host end this network made on the node.
    fn host_ends(&mut self) -> Result<Vec<String>, CniError>;
    /// Removes the links of a released attachment. The kernel's teardown of a veth may
    /// finish after this returns (the binary hands its RCU waits to a detached helper):
    /// nothing of the attachment is used again, and a new ADD of the same attachment
    /// removes a leftover host end first.
    fn unplug(&mut self, net: &PodNetwork) -> Result<(), CniError> {
        self.detach(net)
    }
}

/// ADD: the attachment's addresses and links, as a result.
pub fn add(
    state: &mut Allocations,
    links: &mut dyn Links,
    node: &NodeNetwork,
    who: &Attachment,
    netns: &str,
) -> Result<AddResult, CniError> {
    let had = state.addresses(who).map(<[_]>::to_vec);
    let addrs = state.allocate(who, &node.pod_cidrs).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            e.to_string(),
            "no address is free on this node",
        )
    })?;
    let net = pod_network(node, &who.container_id, &who.ifname, &addrs);
    let mac = match links.existing(netns, &who.ifname)? {
        Some(present) if had.is_some() && same(&present.addresses, &net.addresses) => {
            // A retried ADD whose first answer was lost: the same interface, the same
            // addresses.
            present.mac
        }
        // This attachment's own interface (its MAC is derived from the attachment) without
        // a record: left by a DEL whose removal has not finished yet, or by an ADD killed
        // before it recorded anything. Replaced.
        Some(present) if had.is_none() && present.mac == mac_string(&net.pod_mac) => {
            attach_afresh(state, links, who, netns, &net)?
        }
        Some(_) => {
            if had.is_none() {
                state.release(who);
            }
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!(
                    "CNI_IFNAME={:?}: an interface of that name already exists in {netns}",
                    who.ifname
                ),
                "",
            ));
        }
        None => attach_afresh(state, links, who, netns, &net)?,
    };
    Ok(result(netns, &net, mac))
}

/// Removes whatever links of the attachment are left (by a failed earlier ADD, an
/// unfinished DEL), then makes them anew; on failure, undoes this call's allocation and
/// whatever it made.
fn attach_afresh(
    state: &mut Allocations,
    links: &mut dyn Links,
    who: &Attachment,
    netns: &str,
    net: &PodNetwork,
) -> Result<String, CniError> {
    let _ = links.detach(net);
    links.attach(netns, net).inspect_err(|_| {
        let _ = links.detach(net);
        state.release(who);
    })
}

fn same(present: &[ipnet::IpNet], wanted: &[ipnet::IpNet]) -> bool {
    let a: BTreeSet<_> = present.iter().collect();
    let b: BTreeSet<_> = wanted.iter().collect();
    a == b
}

fn result(netns: &str, net: &PodNetwork, mac: String) -> AddResult {
    AddResult {
        // The host end first, without a sandbox: chained plugins (bandwidth) find the pod
        // interface's peer on the host this way, as they do after the bridge plugin.
        interfaces: vec![
            ResultInterface {
                name: net.host_ifname.clone(),
                mac: crate::node::mac_string(&net.host_mac),
                mtu: Some(net.mtu),
                sandbox: None,
            },
            ResultInterface {
                name: net.ifname.clone(),
                mac,
                mtu: Some(net.mtu),
                sandbox: Some(netns.to_string()),
            },
        ],
        ips: net
            .addresses
            .iter()
            .zip(&net.routes)
            .map(|(address, (_, gw))| ResultIp {
                address: *address,
                gateway: Some(*gw),
                interface: Some(1),
            })
            .collect(),
        routes: net
            .routes
            .iter()
            .map(|(dst, gw)| ResultRoute {
                dst: *dst,
                gw: Some(*gw),
                mtu: None,
            })
            .collect(),
    }
}

/// DEL: removes the links and releases the addresses; succeeds whatever is missing.
/// Without the node file (a node being torn down), the links are found by name alone.
pub fn del(
    state: &mut Allocations,
    links: &mut dyn Links,
    node: Option<&NodeNetwork>,
    who: &Attachment,
) -> Result<(), CniError> {
    let addrs = state.release(who);
    // A link that cannot be removed now is not a reason to keep the address: the host end
    // is named by the attachment, and the next ADD or GC removes it.
    let _ = links.unplug(&released(node, who, &addrs));
    Ok(())
}

/// GC: releases every attachment not in `valid`, removing its links, then removes every
/// host end of this network that no recorded attachment owns (one whose removal was
/// interrupted by a kill, say).
pub fn gc(
    state: &mut Allocations,
    links: &mut dyn Links,
    node: Option<&NodeNetwork>,
    valid: &BTreeSet<Attachment>,
) -> Vec<Attachment> {
    let collected: Vec<Attachment> = state
        .collect(valid)
        .into_iter()
        .map(|(who, addrs)| {
            let _ = links.unplug(&released(node, &who, &addrs));
            who
        })
        .collect();
    let owned: BTreeSet<String> = state
        .iter()
        .map(|(who, _)| host_ifname(&who.container_id, &who.ifname))
        .collect();
    for name in links.host_ends().unwrap_or_default() {
        if !owned.contains(&name) {
            let nobody = Attachment {
                container_id: String::new(),
                ifname: String::new(),
            };
            let mut orphan = released(node, &nobody, &[]);
            orphan.host_ifname = name;
            let _ = links.detach(&orphan);
        }
    }
    collected
}

/// The network of an attachment being removed, to find its links: without the node file,
/// its host end by name, and no routes.
fn released(node: Option<&NodeNetwork>, who: &Attachment, addrs: &[IpAddr]) -> PodNetwork {
    let none = NodeNetwork {
        pod_cidrs: Vec::new(),
        mtu: 1500,
    };
    pod_network(node.unwrap_or(&none), &who.container_id, &who.ifname, addrs)
}

/// CHECK: the attachment is recorded, its interface is in the pod with exactly its
/// addresses, its host end exists, and the result before this plugin's (`prevResult`)
/// lists its addresses.
pub fn check(
    state: &Allocations,
    links: &mut dyn Links,
    node: &NodeNetwork,
    who: &Attachment,
    netns: &str,
    prev_result: Option<&serde_json::Value>,
) -> Result<(), CniError> {
    let failed = |msg: String| CniError::new(code::IO_FAILURE, msg, "");
    let Some(addrs) = state.addresses(who) else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "no attachment of container {:?} interface {:?} on this node",
                who.container_id, who.ifname
            ),
            "",
        ));
    };
    let net = pod_network(node, &who.container_id, &who.ifname, addrs);
    match links.existing(netns, &who.ifname)? {
        None => {
            return Err(failed(format!(
                "interface {:?} is missing from {netns}",
                who.ifname
            )));
        }
        Some(present) if !same(&present.addresses, &net.addresses) => {
            return Err(failed(format!(
                "interface {:?} in {netns} has {:?}, not {:?}",
                who.ifname, present.addresses, net.addresses
            )));
        }
        Some(_) => {}
    }
    if !links.host_end_exists(&net)? {
        return Err(failed(format!(
            "the host end {} of interface {:?} is missing",
            net.host_ifname, who.ifname
        )));
    }
    if let Some(prev) = prev_result {
        let listed: BTreeSet<String> = prev
            .get("ips")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.get("address")?.as_str().map(str::to_string))
            .collect();
        if let Some(missing) = net
            .addresses
            .iter()
            .find(|a| !listed.contains(&a.to_string()))
        {
            return Err(failed(format!(
                "prevResult does not list this attachment's address {missing}"
            )));
        }
    }
    Ok(())
}

/// STATUS: ready only when the node's data plane is programmed.
pub fn status(data_plane_ready: bool) -> Result<(), CniError> {
    if data_plane_ready {
        Ok(())
    } else {
        Err(CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            "the node's data plane is not programmed yet",
            "the Trellis agent has not reported it ready",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use std::collections::BTreeMap;

    /// Links as a map: host end name → (netns, pod interface, addresses).
    #[derive(Default)]
    struct FakeLinks {
        host: BTreeMap<String, (String, String, Vec<IpNet>, String)>,
        fail_attach: bool,
        lose_unplugs: bool,
    }

    impl Links for FakeLinks {
        fn attach(&mut self, netns: &str, net: &PodNetwork) -> Result<String, CniError> {
            // A real attach creates the veth before it can fail on addresses.
            let mac = mac_string(&net.pod_mac);
            self.host.insert(
                net.host_ifname.clone(),
                (
                    netns.into(),
                    net.ifname.clone(),
                    net.addresses.clone(),
                    mac.clone(),
                ),
            );
            if self.fail_attach {
                return Err(CniError::new(code::IO_FAILURE, "netlink said no", ""));
            }
            Ok(mac)
        }
        fn detach(&mut self, net: &PodNetwork) -> Result<(), CniError> {
            self.host.remove(&net.host_ifname);
            Ok(())
        }
        fn host_end_exists(&mut self, net: &PodNetwork) -> Result<bool, CniError> {
            Ok(self.host.contains_key(&net.host_ifname))
        }
        fn host_ends(&mut self) -> Result<Vec<String>, CniError> {
            Ok(self.host.keys().cloned().collect())
        }
        fn unplug(&mut self, net: &PodNetwork) -> Result<(), CniError> {
            // A helper killed before it removed the link leaves it behind.
            if self.lose_unplugs {
                return Ok(());
            }
            self.detach(net)
        }
        fn existing(&mut self, netns: &str, ifname: &str) -> Result<Option<Observed>, CniError> {
            Ok(self
                .host
                .values()
                .find(|(ns, name, _, _)| ns == netns && name == ifname)
                .map(|(_, _, a, mac)| Observed {
                    mac: mac.clone(),
                    addresses: a.clone(),
                }))
        }
    }

    fn node() -> NodeNetwork {
        NodeNetwork {
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            mtu: 1420,
        }
    }

    fn pod(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn a_failed_add_leaves_nothing_and_a_retry_succeeds() {
        let (mut state, mut links) = (Allocations::new(), FakeLinks::default());
        links.fail_attach = true;
        assert!(add(&mut state, &mut links, &node(), &pod("a"), "/ns/a").is_err());
        assert!(state.is_empty(), "the address went back");
        assert!(links.host.is_empty(), "the half-made veth went");
        links.fail_attach = false;
        let r = add(&mut state, &mut links, &node(), &pod("a"), "/ns/a").unwrap();
        // The address the failed call held went to the back of the rotation.
        assert_eq!(r.ips[0].address, "10.244.1.3/32".parse::<IpNet>().unwrap());
        assert_eq!(r.interfaces[1].mtu, Some(1420));
        assert_eq!(r.interfaces[0].sandbox, None, "the host end");
        assert_eq!(r.ips[0].interface, Some(1), "the address is the pod's");
        assert_eq!((state.len(), links.host.len()), (1, 1));
    }

    #[test]
    fn an_interface_already_there_is_an_error_unless_it_is_this_attachments() {
        let (mut state, mut links) = (Allocations::new(), FakeLinks::default());
        add(&mut state, &mut links, &node(), &pod("a"), "/ns/a").unwrap();
        // The same ADD again (its answer was lost): the same result.
        let again = add(&mut state, &mut links, &node(), &pod("a"), "/ns/a").unwrap();
        assert_eq!(
            again.ips[0].address,
            "10.244.1.2/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            again.interfaces[1].mac,
            mac_string(&crate::node::pod_mac("a", "eth0"))
        );
        // Another container's ADD into a namespace that has an eth0 already.
        let e = add(&mut state, &mut links, &node(), &pod("b"), "/ns/a").unwrap_err();
        assert!(e.msg.contains("already exists"), "{}", e.msg);
        assert!(state.addresses(&pod("b")).is_none(), "nothing kept for b");
        // a's DEL whose link removal has not run yet, then a's ADD again in the same
        // sandbox (a runtime reconnecting it): the leftover is this attachment's own, so
        // it is replaced rather than refused.
        links.lose_unplugs = true;
        del(&mut state, &mut links, Some(&node()), &pod("a")).unwrap();
        links.lose_unplugs = false;
        assert_eq!(links.host.len(), 1, "a's links are still there");
        add(&mut state, &mut links, &node(), &pod("a"), "/ns/a").unwrap();
        assert_eq!((state.len(), links.host.len()), (1, 1));
    }

    #[test]
    fn del_succeeds_whatever_is_missing_and_gc_collects_the_rest() {
        let (mut state, mut links) = (Allocations::new(), FakeLinks::default());
        for id in ["a", "b", "c"] {
            add(
                &mut state,
                &mut links,
                &node(),
                &pod(id),
                &format!("/ns/{id}"),
            )
            .unwrap();
        }
        del(&mut state, &mut links, Some(&node()), &pod("a")).unwrap();
        del(&mut state, &mut links, Some(&node()), &pod("a")).unwrap();
        del(&mut state, &mut links, None, &pod("never")).unwrap();
        assert_eq!(links.host.len(), 2);
        let valid: BTreeSet<Attachment> = [pod("c")].into();
        assert_eq!(
            gc(&mut state, &mut links, Some(&node()), &valid),
            [pod("b")]
        );
        assert_eq!(state.len(), 1);
        assert_eq!(links.host.len(), 1);
        let addr =
            |r: &AddResult| serde_json::json!({"ips": [{"address": r.ips[0].address.to_string()}]});
        let c = add(&mut state, &mut links, &node(), &pod("c"), "/ns/c").unwrap();
        check(
            &state,
            &mut links,
            &node(),
            &pod("c"),
            "/ns/c",
            Some(&addr(&c)),
        )
        .unwrap();
        let e = check(&state, &mut links, &node(), &pod("b"), "/ns/b", None).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_CONTAINER);
        let stale = serde_json::json!({"ips": [{"address": "10.244.1.99/32"}]});
        let e = check(
            &state,
            &mut links,
            &node(),
            &pod("c"),
            "/ns/c",
            Some(&stale),
        )
        .unwrap_err();
        assert!(e.msg.contains("prevResult"), "{}", e.msg);
        links.host.clear();
        let e = check(&state, &mut links, &node(), &pod("c"), "/ns/c", None).unwrap_err();
        assert!(e.msg.contains("missing from /ns/c"), "{}", e.msg);
        assert_eq!(status(false).unwrap_err().code, code::PLUGIN_NOT_AVAILABLE);
        assert!(status(true).is_ok());
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        /// What a runtime (and the kernel) can do to the plugin.
        #[derive(Clone, Debug)]
        enum Step {
            Add(u8),
            /// An ADD whose links fail half-way.
            FailedAdd(u8),
            Del(u8),
            /// A DEL whose detached link removal is killed before it runs.
            DelLosingLinks(u8),
            Gc(Vec<u8>),
            Check(u8),
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (0u8..12).prop_map(Step::Add),
                1 => (0u8..12).prop_map(Step::FailedAdd),
                3 => (0u8..12).prop_map(Step::Del),
                1 => (0u8..12).prop_map(Step::DelLosingLinks),
                1 => proptest::collection::vec(0u8..12, 0..6).prop_map(Step::Gc),
                1 => (0u8..12).prop_map(Step::Check),
            ]
        }

        fn small_node() -> NodeNetwork {
            // Six pod addresses per family: exhaustion is reached often.
            NodeNetwork {
                pod_cidrs: vec![
                    "10.9.0.0/29".parse().unwrap(),
                    "fd09::/125".parse().unwrap(),
                ],
                mtu: 1420,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Whatever the runtime does, in any order: no address is held by two
            /// attachments, every recorded attachment has its links and no link is left
            /// without a record, DEL never fails, and an ADD that fails changes nothing.
            #[test]
            fn no_sequence_of_calls_leaks_or_duplicates(steps in proptest::collection::vec(step(), 1..60)) {
                let node = small_node();
                let (mut state, mut links) = (Allocations::new(), FakeLinks::default());
                let ns = |i: u8| format!("/ns/{i}");
                for s in steps {
                    match s.clone() {
                        Step::Add(i) | Step::FailedAdd(i) => {
                            links.fail_attach = matches!(s, Step::FailedAdd(_));
                            let before = state.clone();
                            match add(&mut state, &mut links, &node, &pod(&i.to_string()), &ns(i)) {
                                Ok(r) => {
                                    let held = state.addresses(&pod(&i.to_string())).unwrap();
                                    prop_assert_eq!(r.ips.len(), held.len());
                                }
                                Err(e) => {
                                    // The rotation may move on; what is held may not.
                                    let held = |s: &Allocations| -> Vec<(Attachment, Vec<IpAddr>)> {
                                        s.iter().map(|(w, a)| (w.clone(), a.to_vec())).collect()
                                    };
                                    if before.addresses(&pod(&i.to_string())).is_none() {
                                        prop_assert_eq!(held(&state), held(&before), "a failed ADD ({}) changed what is held", e.msg);
                                    }
                                }
                            }
                            links.fail_attach = false;
                        }
                        Step::Del(i) | Step::DelLosingLinks(i) => {
                            links.lose_unplugs = matches!(s, Step::DelLosingLinks(_));
                            prop_assert!(del(&mut state, &mut links, Some(&node), &pod(&i.to_string())).is_ok());
                            links.lose_unplugs = false;
                        }
                        Step::Gc(keep) => {
                            let valid: BTreeSet<Attachment> =
                                keep.iter().map(|i| pod(&i.to_string())).collect();
                            gc(&mut state, &mut links, Some(&node), &valid);
                            prop_assert!(state.iter().all(|(who, _)| valid.contains(who)));
                        }
                        Step::Check(i) => {
                            let who = pod(&i.to_string());
                            let recorded = state.addresses(&who).is_some();
                            let checked = check(&state, &mut links, &node, &who, &ns(i), None);
                            prop_assert_eq!(checked.is_ok(), recorded, "{:?}", checked);
                        }
                    }
                    let mut seen = BTreeSet::new();
                    for (_, addrs) in state.iter() {
                        for a in addrs {
                            prop_assert!(seen.insert(*a), "{} held twice", a);
                        }
                    }
                    let recorded: BTreeSet<String> = state
                        .iter()
                        .map(|(who, addrs)| pod_network(&node, &who.container_id, &who.ifname, addrs).host_ifname)
                        .collect();
                    let present: BTreeSet<String> = links.host.keys().cloned().collect();
                    // Every record has its links; links without a record (a lost removal)
                    // last only until the next GC.
                    prop_assert!(recorded.is_subset(&present), "a record without its links");
                    if matches!(s, Step::Gc(_)) {
                        prop_assert_eq!(recorded, present, "GC left links without a record");
                    }
                }
            }
        }
    }
}
