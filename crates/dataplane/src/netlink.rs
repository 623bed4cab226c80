//! A small rtnetlink handle bound to one network namespace: links,
//! addresses and main-table routes, each request bounded in time and each
//! error naming what it was about.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteVia,
};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::error::{Error, Result};
use crate::netns;
pub use crate::routes::{RouteChanges, RouteSpec, reconcile_routes};

/// How long one request may wait for the kernel before it is given up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
const MAX_LINK_NAME_LEN: usize = 15;

/// A connection to the kernel's routing netlink in one network namespace.
///
/// The connection is served by a task on the tokio runtime it was made on;
/// dropping the `Netlink` stops that task.
pub struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
    timeout: Duration,
    /// Which namespace this speaks to, for error messages.
    scope: String,
}

impl fmt::Debug for Netlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netlink")
            .field("scope", &self.scope)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// How a route is written: over whatever has the same destination, or only
/// where nothing has it yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InstallMode {
    Replace,
    Exclusive,
}

impl Netlink {
    /// Connects in the calling thread's network namespace. Must be called
    /// within a tokio runtime, which then serves the connection.
    pub fn connect() -> Result<Netlink> {
        let runtime = current_runtime()?;
        let (connection, handle, _unsolicited) = rtnetlink::new_connection()
            .map_err(|e| Error::io("opening a netlink socket in the current netns", e))?;
        let connection = runtime.spawn(connection);
        Ok(Netlink {
            handle,
            connection,
            timeout: DEFAULT_TIMEOUT,
            scope: "current netns".into(),
        })
    }

    /// Connects to the named network namespace: the socket is created inside
    /// it (and stays bound to it), the connection is served by the calling
    /// tokio runtime.
    pub fn connect_in(netns_name: &str) -> Result<Netlink> {
        let runtime = current_runtime()?;
        let registrar = runtime.clone();
        let (connection, handle) = netns::run_in(netns_name, move || {
            // Entering the runtime registers the socket with its reactor
            // from this foreign thread.
            let _entered = registrar.enter();
            rtnetlink::new_connection()
                .map(|(connection, handle, _unsolicited)| (connection, handle))
        })?
        .map_err(|e| Error::io(format!("opening a netlink socket in netns {netns_name}"), e))?;
        let connection = runtime.spawn(connection);
        Ok(Netlink {
            handle,
            connection,
            timeout: DEFAULT_TIMEOUT,
            scope: format!("netns {netns_name}"),
        })
    }

    /// The underlying rtnetlink handle, for requests this type does not wrap.
    /// They are not bounded by the timeout.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Which namespace this speaks to ("netns NAME" or "current netns"), as errors name it.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Changes how long each request may take (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Netlink {
        self.timeout = timeout;
        self
    }

    // ----- links -----

    /// The index of the named link, or `None` if there is no such link.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let request = self.handle.link().get().match_name(name).execute();
        let found = self.run(format!("looking up link {name}"), async move {
            futures::pin_mut!(request);
            request.try_next().await
        });
        match found.await {
            Ok(message) => Ok(message.map(|link| link.header.index)),
            Err(err) if err.has_errno(libc::ENODEV) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Names of all links in the namespace.
    pub async fn link_names(&self) -> Result<Vec<String>> {
        let links = self.all_links().await?;
        Ok(links.iter().filter_map(link_name).collect())
    }

    /// Creates a bridge, left down (see [`Netlink::set_up`]).
    pub async fn create_bridge(&self, name: &str) -> Result<()> {
        let action = format!("creating bridge {name}");
        check_link_name(name)
            .map_err(|e| e.while_doing(|| format!("{action} in {}", self.scope)))?;
        // Not `LinkBridge::new`, which would also bring it up.
        let message = LinkMessageBuilder::<LinkBridge>::new(name).build();
        let request = self.handle.link().add(message).execute();
        self.run(action, request).await
    }

    /// Creates a veth pair with both ends in this namespace, both down.
    pub async fn create_veth(&self, name: &str, peer_name: &str) -> Result<()> {
        let action = format!("creating veth pair {name} <-> {peer_name}");
        check_link_name(name)
            .and_then(|()| check_link_name(peer_name))
            .map_err(|e| e.while_doing(|| format!("{action} in {}", self.scope)))?;
        let message = LinkVeth::new(name, peer_name).build();
        let request = self.handle.link().add(message).execute();
        self.run(action, request).await
    }

    /// Moves a link into the namespace behind `netns_fd` (see
    /// [`netns::open`]). It arrives there down and without addresses.
    pub async fn move_link_to_netns(&self, name: &str, netns_fd: &File) -> Result<()> {
        let action = format!("moving link {name} to another netns");
        let index = self.require_link(&action, name).await?;
        let message = LinkUnspec::new_with_index(index)
            .setns_by_fd(netns_fd.as_raw_fd())
            .build();
        self.change_link(action, message).await
    }

    /// Makes `link` a port of `bridge`.
    pub async fn set_master(&self, link: &str, bridge: &str) -> Result<()> {
        let action = format!("attaching link {link} to bridge {bridge}");
        let link_index = self.require_link(&action, link).await?;
        let bridge_index = self.require_link(&action, bridge).await?;
        let message = LinkUnspec::new_with_index(link_index)
            .controller(bridge_index)
            .build();
        self.change_link(action, message).await
    }

    pub async fn set_up(&self, name: &str) -> Result<()> {
        let action = format!("setting link {name} up");
        let index = self.require_link(&action, name).await?;
        let message = LinkUnspec::new_with_index(index).up().build();
        self.change_link(action, message).await
    }

    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<()> {
        let action = format!("setting mtu {mtu} on link {name}");
        let index = self.require_link(&action, name).await?;
        let message = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.change_link(action, message).await
    }

    /// Deletes a link (for a veth, both ends go). Succeeds if it is missing.
    pub async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        let request = self.handle.link().del(index).execute();
        match self.run(format!("deleting link {name}"), request).await {
            // Gone in between, e.g. as the peer of a deleted veth.
            Err(err) if err.has_errno(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    // ----- addresses -----

    /// Adds an address (`10.0.0.1/24`: address and prefix length) to a link.
    /// Succeeds if the link already has exactly that address.
    ///
    /// An IPv6 address is added without duplicate address detection (`nodad`): the
    /// addresses given here are unique by construction (planned from the cluster's
    /// records), and DAD would only leave them unusable for a second or more, during which
    /// the neighbours routing through this one lose their packets.
    pub async fn add_address(&self, link: &str, address: IpNet) -> Result<()> {
        let action = format!("adding address {address} to link {link}");
        let index = self.require_link(&action, link).await?;
        let mut request = self
            .handle
            .address()
            .add(index, address.addr(), address.prefix_len());
        if address.addr().is_ipv6() {
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        let request = request.execute();
        match self.run(action, request).await {
            Err(err) if err.has_errno(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// The addresses of a link, IPv6 link-local ones included.
    pub async fn addresses(&self, link: &str) -> Result<Vec<IpNet>> {
        let action = format!("listing addresses of link {link}");
        let index = self.require_link(&action, link).await?;
        let request = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let messages = self.run(action, request.try_collect::<Vec<_>>()).await?;
        Ok(messages.iter().filter_map(address_of).collect())
    }

    /// The link that holds `address` (whatever its prefix length), if any.
    pub async fn link_with_address(&self, address: IpAddr) -> Result<Option<String>> {
        let action = format!("looking for the link with address {address}");
        // Filtered here, not by rtnetlink's filter, which compares IFA_ADDRESS: on a
        // point-to-point link that is the peer's address, the link's own is IFA_LOCAL.
        let request = self.handle.address().get().execute();
        let messages = self.run(action, request.try_collect::<Vec<_>>()).await?;
        let Some(index) = (messages.iter())
            .find(|m| address_of(m).is_some_and(|a| a.addr() == address))
            .map(|m| m.header.index)
        else {
            return Ok(None);
        };
        let links = self.all_links().await?;
        Ok(links
            .iter()
            .find(|link| link.header.index == index)
            .and_then(link_name))
    }

    /// Removes an address from a link. Succeeds if the link does not have it.
    pub async fn del_address(&self, link: &str, address: IpNet) -> Result<()> {
        let action = format!("removing address {address} from link {link}");
        let index = self.require_link(&action, link).await?;
        let message = address_message(index, address);
        let request = self.handle.address().del(message).execute();
        match self.run(action, request).await {
            Err(err) if err.has_errno(libc::EADDRNOTAVAIL) => Ok(()),
            other => other,
        }
    }

    // ----- routes -----

    /// The main-table unicast routes (IPv4 and IPv6) that carry `protocol`.
    pub async fn routes(&self, protocol: u8) -> Result<Vec<RouteSpec>> {
        let link_names: HashMap<u32, String> = self
            .all_links()
            .await?
            .iter()
            .filter_map(|link| Some((link.header.index, link_name(link)?)))
            .collect();
        let mut routes = Vec::new();
        for dump_filter in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let request = self.handle.route().get(dump_filter).execute();
            let messages = self
                .run("listing routes".to_owned(), request.try_collect::<Vec<_>>())
                .await?;
            routes.extend(
                messages
                    .iter()
                    .filter(|message| {
                        is_main_table(message) && u8::from(message.header.protocol) == protocol
                    })
                    .filter_map(|message| route_spec_of(message, &link_names)),
            );
        }
        routes.sort();
        Ok(routes)
    }

    /// Installs a route, replacing any route with the same destination (and
    /// default metric), so adding the same route again changes nothing.
    pub async fn add_route(&self, route: &RouteSpec) -> Result<()> {
        self.install_route(route, InstallMode::Replace).await
    }

    /// Deletes exactly this route (protocol, gateway, source and device must
    /// match). Succeeds if there is no such route.
    pub async fn del_route(&self, route: &RouteSpec) -> Result<()> {
        let action = format!("deleting route {route}");
        let message = self
            .route_message(&action, route, RouteScope::NoWhere)
            .await?;
        let request = self.handle.route().del(message).execute();
        match self.run(action, request).await {
            Err(err) if err.has_errno(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    pub(crate) async fn install_route(&self, route: &RouteSpec, mode: InstallMode) -> Result<()> {
        let action = format!("adding route {route}");
        // Routes without a gateway reach their destination on the link
        // itself, which is what `ip route add` marks them as too.
        let scope = if route.via.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        let message = self.route_message(&action, route, scope).await?;
        let request = self.handle.route().add(message);
        let request = match mode {
            InstallMode::Replace => request.replace(),
            InstallMode::Exclusive => request,
        };
        match self.run(action.clone(), request.execute()).await {
            Err(Error::Kernel { errno, .. })
                if mode == InstallMode::Exclusive && errno == libc::EEXIST =>
            {
                Err(Error::AlreadyExists {
                    action,
                    scope: self.scope.clone(),
                    what: format!(
                        "a route to {} (of another protocol, or from a second desired route \
                         to the same destination)",
                        route.dst.trunc()
                    ),
                })
            }
            other => other,
        }
    }

    async fn route_message(
        &self,
        action: &str,
        route: &RouteSpec,
        scope: RouteScope,
    ) -> Result<RouteMessage> {
        // The builder's error type is not exported; its message is what matters.
        let invalid = |reason: &dyn fmt::Display| Error::Invalid {
            action: format!("{action} in {}", self.scope),
            field: "route",
            value: route.to_string(),
            reason: reason.to_string(),
        };
        let dst = route.dst.trunc();
        let mut builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| invalid(&e))?
            .protocol(RouteProtocol::from(route.protocol))
            .scope(scope);
        if let Some(via) = route.via {
            builder = builder.gateway(via).map_err(|e| invalid(&e))?;
        }
        if let Some(src) = route.src {
            builder = builder.pref_source(src).map_err(|e| invalid(&e))?;
        }
        if let Some(dev) = &route.dev {
            builder = builder.output_interface(self.require_link(action, dev).await?);
        }
        Ok(builder.build())
    }

    // ----- plumbing -----

    /// The index of the named link, which `action` needs: [`Error::NotFound`] without it.
    async fn require_link(&self, action: &str, name: &str) -> Result<u32> {
        self.link_index(name).await?.ok_or_else(|| Error::NotFound {
            action: action.to_owned(),
            what: format!("link {name}"),
            scope: self.scope.clone(),
        })
    }

    async fn all_links(&self) -> Result<Vec<LinkMessage>> {
        let request = self.handle.link().get().execute();
        self.run("listing links".to_owned(), request.try_collect::<Vec<_>>())
            .await
    }

    /// Changes an existing link, like `ip link set` does (RTM_NEWLINK
    /// without NLM_F_CREATE).
    async fn change_link(&self, action: String, message: LinkMessage) -> Result<()> {
        let request = self.handle.link().change(message).execute();
        self.run(action, request).await
    }

    /// Awaits one request under the timeout; errors say what was being done
    /// and in which namespace.
    pub(crate) async fn run<T>(
        &self,
        action: String,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(rtnetlink::Error::NetlinkError(message))) => Err(Error::Kernel {
                action,
                scope: self.scope.clone(),
                errno: message.raw_code().abs(),
                message: None,
            }),
            Ok(Err(err)) => Err(Error::Protocol {
                action,
                scope: self.scope.clone(),
                what: err.to_string(),
            }),
            Err(_elapsed) => Err(Error::Timeout {
                action,
                scope: self.scope.clone(),
                after: self.timeout,
            }),
        }
    }
}

fn current_runtime() -> Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current().map_err(|_| Error::Unsupported {
        action: "opening a netlink connection".into(),
        why: "a netlink connection needs a running tokio runtime".into(),
    })
}

fn check_link_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_LINK_NAME_LEN || name.contains(['/', ' ', ':']) {
        return Err(Error::invalid(
            "link name",
            name,
            format!("1 to {MAX_LINK_NAME_LEN} bytes, no '/', ':' or spaces"),
        ));
    }
    Ok(())
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
}

fn address_message(index: u32, address: IpNet) -> AddressMessage {
    match address {
        IpNet::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(v4.addr(), v4.prefix_len())
            .build(),
        IpNet::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(v6.addr(), v6.prefix_len())
            .build(),
    }
}

/// The interface's own address: IFA_LOCAL where present (on point-to-point
/// links IFA_ADDRESS is the peer's), IFA_ADDRESS otherwise (IPv6).
fn address_of(message: &AddressMessage) -> Option<IpNet> {
    let find = |want_local: bool| {
        message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                AddressAttribute::Local(ip) if want_local => Some(*ip),
                AddressAttribute::Address(ip) if !want_local => Some(*ip),
                _ => None,
            })
    };
    let ip = find(true).or_else(|| find(false))?;
    IpNet::new(ip, message.header.prefix_len).ok()
}

fn is_main_table(message: &RouteMessage) -> bool {
    let table = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(message.header.table));
    table == u32::from(RouteHeader::RT_TABLE_MAIN)
}

fn route_spec_of(message: &RouteMessage, link_names: &HashMap<u32, String>) -> Option<RouteSpec> {
    let mut destination = None;
    let mut via = None;
    let mut src = None;
    let mut dev = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(address) => destination = ip_of(address),
            RouteAttribute::Gateway(address) => via = ip_of(address),
            RouteAttribute::Via(RouteVia::Inet(ip)) => via = Some(IpAddr::V4(*ip)),
            RouteAttribute::Via(RouteVia::Inet6(ip)) => via = Some(IpAddr::V6(*ip)),
            RouteAttribute::PrefSource(address) => src = ip_of(address),
            RouteAttribute::Oif(index) => dev = link_names.get(index).cloned(),
            _ => {}
        }
    }
    let destination = match destination {
        Some(ip) => ip,
        // A default route carries no RTA_DST.
        None if message.header.address_family == netlink_packet_route::AddressFamily::Inet6 => {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        }
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let dst = IpNet::new(destination, message.header.destination_prefix_length).ok()?;
    Some(RouteSpec {
        dst,
        via,
        dev,
        src,
        protocol: u8::from(message.header.protocol),
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

#[async_trait::async_trait]
impl crate::routes::RouteTable for Netlink {
    async fn routes(&self, protocol: u8) -> Result<Vec<RouteSpec>> {
        Netlink::routes(self, protocol).await
    }

    async fn install(&self, route: &RouteSpec, replace: bool) -> Result<()> {
        let mode = if replace {
            InstallMode::Replace
        } else {
            InstallMode::Exclusive
        };
        self.install_route(route, mode).await
    }

    async fn delete(&self, route: &RouteSpec) -> Result<()> {
        self.del_route(route).await
    }
}

#[async_trait::async_trait]
impl crate::interface::InterfaceControl for Netlink {
    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>> {
        Netlink::addresses(self, link).await
    }

    async fn add_address(&self, link: &str, address: IpNet) -> Result<()> {
        Netlink::add_address(self, link, address).await
    }

    async fn del_address(&self, link: &str, address: IpNet) -> Result<()> {
        Netlink::del_address(self, link, address).await
    }

    async fn set_mtu(&self, link: &str, mtu: u32) -> Result<()> {
        Netlink::set_mtu(self, link, mtu).await
    }

    async fn set_up(&self, link: &str) -> Result<()> {
        Netlink::set_up(self, link).await
    }

    async fn link_with_address(&self, address: IpAddr) -> Result<Option<String>> {
        Netlink::link_with_address(self, address).await
    }
}
