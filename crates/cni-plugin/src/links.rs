//! The pod's links over rtnetlink: the one edge of the plugin that touches the kernel.
//!
//! A veth pair is made in one request from the runtime's namespace, its pod end placed in
//! the pod's namespace at birth (`IFLA_NET_NS_FD` on the peer), named, sized, addressed
//! (MAC) and up; then each side gets its addresses, routes and a permanent neighbour entry
//! for the other side's MAC, so no ARP or neighbour discovery ever runs on the link and
//! an IPv6 address needs no duplicate address detection before use. About ten requests
//! for a dual-stack pod, each bounded by a timeout.
//!
//! A socket opened inside the pod's namespace (on a short-lived thread that enters it)
//! stays bound to it, so the process itself never leaves the runtime's namespace.
//! The pod end is brought up by a second request: the kernel will not bring up a peer
//! made in another namespace.

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use netlink_packet_route::route::RouteScope;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder, new_connection,
};
use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;
use trellis_cni::node::{PodNetwork, mac_string};
use trellis_cni::spec::{CniError, code};
use trellis_cni::verbs::{Links, Observed};

/// The kernel's links, seen from the runtime's namespace.
pub struct NetlinkLinks {
    runtime: tokio::runtime::Runtime,
    host: Handle,
    timeout: Duration,
    /// What this network's host ends carry as their alias (its allocation file), so GC
    /// finds its own orphans and never another network's.
    owner: String,
    /// The pod namespace's handle once made: ADD looks into the pod, then programs it.
    pod: Option<(String, Handle)>,
}

/// The environment variable that makes the binary a link-removal helper.
pub const UNPLUG_ENV: &str = "TRELLIS_CNI_UNPLUG";

impl NetlinkLinks {
    /// Connects in this process's namespace (the runtime's); each request may take up to
    /// `timeout`. `owner` marks the host ends this network makes.
    pub fn connect(timeout: Duration, owner: &str) -> Result<NetlinkLinks, CniError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io_error("starting the netlink runtime", e))?;
        let host = {
            let _entered = runtime.enter();
            let (connection, handle, _) =
                new_connection().map_err(|e| io_error("opening a netlink socket", e))?;
            runtime.spawn(connection);
            handle
        };
        Ok(NetlinkLinks {
            runtime,
            host,
            timeout,
            owner: owner.to_string(),
            pod: None,
        })
    }

    /// Deletes link `index` if it is still named `name` (a new ADD of the same attachment
    /// may have made a new one by that name meanwhile): the helper's whole job.
    pub fn delete_if_named(&self, index: u32, name: &str) -> Result<(), CniError> {
        let request = self.host.link().get().match_index(index).execute();
        let found = self
            .run(
                &format!("looking up link {index}"),
                request.try_collect::<Vec<_>>(),
            )
            .unwrap_or_default();
        let still = found.iter().any(|link| {
            link.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
        });
        if !still {
            return Ok(());
        }
        match self.run(
            &format!("deleting link {name}"),
            self.host.link().del(index).execute(),
        ) {
            Err(e) if e.details.contains("No such device") => Ok(()),
            other => other,
        }
    }

    /// A netlink handle bound to the namespace at `path` (`CNI_NETNS`), made once.
    fn in_netns(&mut self, path: &str) -> Result<Handle, CniError> {
        if let Some((made_for, handle)) = &self.pod
            && made_for == path
        {
            return Ok(handle.clone());
        }
        let handle = self.connect_in(path)?;
        self.pod = Some((path.to_string(), handle.clone()));
        Ok(handle)
    }

    fn connect_in(&self, path: &str) -> Result<Handle, CniError> {
        let file = open_netns(path)?;
        let registrar = self.runtime.handle().clone();
        let made = std::thread::spawn(move || {
            // SAFETY: setns only reads the descriptor; errors come back through errno.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let _entered = registrar.enter();
            new_connection().map(|(connection, handle, _)| (connection, handle))
        })
        .join()
        .map_err(|_| CniError::new(code::IO_FAILURE, "entering the pod's namespace", path))?
        .map_err(|e| io_error(&format!("opening a netlink socket in {path}"), e))?;
        self.runtime.spawn(made.0);
        Ok(made.1)
    }

    fn run<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, CniError> {
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, request).await })
            .map_err(|_| {
                CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!("{what}: the kernel did not answer in {:?}", self.timeout),
                    "",
                )
            })?
            .map_err(|e| CniError::new(code::IO_FAILURE, what.to_string(), e.to_string()))
    }

    /// The index of `name` in the namespace of `handle`, `None` if there is no such link.
    fn index(&self, handle: &Handle, name: &str) -> Result<Option<(u32, Vec<u8>)>, CniError> {
        let request = handle.link().get().match_name(name.to_string()).execute();
        let found = self
            .run(
                &format!("looking up link {name}"),
                request.try_collect::<Vec<_>>(),
            )
            .map(|links| links.into_iter().next());
        match found {
            Ok(Some(link)) => {
                let mac = link
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::Address(mac) => Some(mac.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                Ok(Some((link.header.index, mac)))
            }
            Ok(None) => Ok(None),
            Err(e) if e.details.contains("No such device") => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn require(&self, handle: &Handle, name: &str, whose: &str) -> Result<u32, CniError> {
        self.index(handle, name)?.map(|(i, _)| i).ok_or_else(|| {
            CniError::new(
                code::IO_FAILURE,
                format!("link {name} vanished from {whose} right after it was made"),
                "",
            )
        })
    }

    fn add_address(&self, handle: &Handle, index: u32, address: IpNet) -> Result<(), CniError> {
        let mut request = handle
            .address()
            .add(index, address.addr(), address.prefix_len());
        // Usable at once: nothing else is on the link to conflict with.
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        self.run(&format!("adding address {address}"), request.execute())
    }

    fn add_neighbour(
        &self,
        handle: &Handle,
        index: u32,
        ip: IpAddr,
        mac: &[u8; 6],
    ) -> Result<(), CniError> {
        let request = handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(mac)
            .replace()
            .execute();
        self.run(&format!("fixing the neighbour entry of {ip}"), request)
    }

    fn add_route(
        &self,
        handle: &Handle,
        index: u32,
        dst: IpNet,
        via: Option<IpAddr>,
    ) -> Result<(), CniError> {
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| CniError::new(code::IO_FAILURE, format!("route to {dst}"), e.to_string()))?
            .output_interface(index);
        builder = match via {
            Some(gw) => builder
                .gateway(gw)
                .map_err(|e| {
                    CniError::new(code::IO_FAILURE, format!("route via {gw}"), e.to_string())
                })?
                .onlink(),
            None => builder.scope(RouteScope::Link),
        };
        let request = handle.route().add(builder.build()).replace().execute();
        self.run(&format!("adding the route to {dst}"), request)
    }
}

impl Links for NetlinkLinks {
    fn attach(&mut self, netns: &str, net: &PodNetwork) -> Result<String, CniError> {
        let pod_ns = open_netns(netns)?;
        let pod = self.in_netns(netns)?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(net.ifname.clone())
            .mtu(net.mtu)
            .address(net.pod_mac.to_vec())
            .setns_by_fd(pod_ns.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(net.host_ifname.clone())
            .mtu(net.mtu)
            .address(net.host_mac.to_vec())
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.run(
            &format!(
                "creating veth {} with {} in {netns}",
                net.host_ifname, net.ifname
            ),
            self.host.link().add(pair).execute(),
        )?;
        drop(pod_ns);
        let pod_index = self.require(&pod, &net.ifname, netns)?;
        // Not up at birth: the kernel refuses to bring up a peer made in another
        // namespace (ENOTCONN).
        self.run(
            &format!("setting {} up in {netns}", net.ifname),
            pod.link()
                .set(LinkUnspec::new_with_index(pod_index).up().build())
                .execute(),
        )?;
        for address in &net.addresses {
            self.add_address(&pod, pod_index, *address)?;
        }
        for (dst, gateway) in &net.routes {
            self.add_neighbour(&pod, pod_index, *gateway, &net.host_mac)?;
            self.add_route(&pod, pod_index, *dst, Some(*gateway))?;
        }
        let host_index = self.require(&self.host, &net.host_ifname, "the node")?;
        self.run(
            &format!("marking {} as this network's", net.host_ifname),
            self.host
                .link()
                .set(
                    LinkUnspec::new_with_index(host_index)
                        .alias(self.owner.clone())
                        .build(),
                )
                .execute(),
        )?;
        for (route, address) in net.host_routes.iter().zip(&net.addresses) {
            self.add_neighbour(&self.host, host_index, address.addr(), &net.pod_mac)?;
            self.add_route(&self.host, host_index, *route, None)?;
        }
        Ok(mac_string(&net.pod_mac))
    }

    fn detach(&mut self, net: &PodNetwork) -> Result<(), CniError> {
        let Some((index, _)) = self.index(&self.host, &net.host_ifname)? else {
            return Ok(());
        };
        // The pod end, the routes and the neighbour entries go with it.
        match self.run(
            &format!("deleting link {}", net.host_ifname),
            self.host.link().del(index).execute(),
        ) {
            Err(e) if e.details.contains("No such device") => Ok(()),
            other => other,
        }
    }

    fn existing(&mut self, netns: &str, ifname: &str) -> Result<Option<Observed>, CniError> {
        let pod = self.in_netns(netns)?;
        let Some((index, mac)) = self.index(&pod, ifname)? else {
            return Ok(None);
        };
        let request = pod
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect::<Vec<_>>();
        let messages = self.run(&format!("listing the addresses of {ifname}"), request)?;
        let addresses = messages
            .iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                IpNet::new(ip, m.header.prefix_len).ok()
            })
            .filter(|n| !matches!(n.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect();
        let mac: [u8; 6] = mac.try_into().unwrap_or_default();
        Ok(Some(Observed {
            mac: mac_string(&mac),
            addresses,
        }))
    }

    fn host_end_exists(&mut self, net: &PodNetwork) -> Result<bool, CniError> {
        Ok(self.index(&self.host, &net.host_ifname)?.is_some())
    }

    fn host_ends(&mut self) -> Result<Vec<String>, CniError> {
        let request = self.host.link().get().execute().try_collect::<Vec<_>>();
        let links = self.run("listing the node's links", request)?;
        Ok(links
            .iter()
            .filter(|link| {
                link.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfAlias(alias) if *alias == self.owner))
            })
            .filter_map(|link| {
                link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) if name.starts_with("tp") => Some(name.clone()),
                    _ => None,
                })
            })
            .collect())
    }

    /// Deleting a veth costs the kernel 10-30 ms of RCU waits (measured here: 9 ms of a
    /// 16 ms DEL on an idle machine, more while namespaces are being torn down), which
    /// the runtime would wait for. A detached helper (this binary again, with
    /// [`UNPLUG_ENV`]) does it instead; it deletes the link by index, and only if it still
    /// has its name, so a new host end of the same attachment is never touched. A helper
    /// that cannot start means a synchronous delete; one killed before it ran leaves an
    /// orphan that the next ADD of the attachment or a GC removes.
    fn unplug(&mut self, net: &PodNetwork) -> Result<(), CniError> {
        let Some((index, _)) = self.index(&self.host, &net.host_ifname)? else {
            return Ok(());
        };
        if spawn_unplug_helper(index, &net.host_ifname).is_err() {
            return self.delete_if_named(index, &net.host_ifname);
        }
        Ok(())
    }
}

/// Starts the link-removal helper, detached: its own session, no stdio (the runtime reads
/// the plugin's stdout to the end, which must not wait for the helper).
fn spawn_unplug_helper(index: u32, name: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut helper = Command::new("/proc/self/exe");
    helper
        .env_clear()
        .env(UNPLUG_ENV, format!("{index} {name}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        helper.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    helper.spawn().map(drop)
}

fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_NETNS={path:?}: cannot open the namespace"),
            e.to_string(),
        )
    })
}

fn io_error(what: &str, e: std::io::Error) -> CniError {
    CniError::new(code::IO_FAILURE, what.to_string(), e.to_string())
}
