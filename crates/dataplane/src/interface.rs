//! The WireGuard interface's own settings as a reconciler: exactly the planned addresses
//! (overlay and probe), the tunnel MTU, and the link up. [`diff_addresses`] decides;
//! [`reconcile_interface`] reads back through an [`InterfaceControl`] and applies.

use crate::error::Result;
use async_trait::async_trait;
use ipnet::IpNet;
use std::net::IpAddr;

/// What the reconciler needs of a link. [`crate::netlink::Netlink`] is the real one;
/// [`crate::fake::FakeInterfaces`] an in-memory one for tests.
#[async_trait]
pub trait InterfaceControl: Send + Sync {
    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>>;
    async fn add_address(&self, link: &str, address: IpNet) -> Result<()>;
    async fn del_address(&self, link: &str, address: IpNet) -> Result<()>;
    async fn set_mtu(&self, link: &str, mtu: u32) -> Result<()>;
    async fn set_up(&self, link: &str) -> Result<()>;
    /// The link that holds `address` (whatever its prefix length), if any.
    async fn link_with_address(&self, address: IpAddr) -> Result<Option<String>>;
}

/// Addresses to add and to remove so that the link holds exactly `want`.
pub fn diff_addresses(have: &[IpNet], want: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let add = want.iter().filter(|a| !have.contains(a)).copied().collect();
    let remove = have.iter().filter(|a| !want.contains(a)).copied().collect();
    (add, remove)
}

/// Brings `link` to exactly `addresses`, `mtu` and up. Idempotent.
pub async fn reconcile_interface(
    ctl: &dyn InterfaceControl,
    link: &str,
    addresses: &[IpNet],
    mtu: u32,
) -> Result<()> {
    let have = ctl.addresses(link).await?;
    let (add, remove) = diff_addresses(&have, addresses);
    for address in add {
        ctl.add_address(link, address).await?;
    }
    for address in remove {
        ctl.del_address(link, address).await?;
    }
    ctl.set_mtu(link, mtu).await?;
    ctl.set_up(link).await
}

/// Whether `address` must be added to or removed from a link that holds `have`, so that
/// the link has it exactly when `wanted`; `None`: nothing to do. For an address on a link
/// the caller does not own, where every other address stays as it is.
pub fn address_change(have: &[IpNet], address: IpNet, wanted: bool) -> Option<AddressChange> {
    match (have.contains(&address), wanted) {
        (false, true) => Some(AddressChange::Add(address)),
        (true, false) => Some(AddressChange::Remove(address)),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressChange {
    Add(IpNet),
    Remove(IpNet),
}

/// Brings one address on `link` to `wanted` (present or absent) and leaves the link's other
/// addresses, MTU and state alone: for a link this node shares with others, such as its
/// location's internal network. What it changed, if anything.
pub async fn reconcile_one_address(
    ctl: &dyn InterfaceControl,
    link: &str,
    address: IpNet,
    wanted: bool,
) -> Result<Option<AddressChange>> {
    let have = ctl.addresses(link).await?;
    let change = address_change(&have, address, wanted);
    match change {
        Some(AddressChange::Add(a)) => ctl.add_address(link, a).await?,
        Some(AddressChange::Remove(a)) => ctl.del_address(link, a).await?,
        None => {}
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_differs_is_added_or_removed() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let (add, remove) = diff_addresses(
            &[
                net("100.64.0.1/32"),
                net("fe80::1/64"),
                net("100.65.0.9/32"),
            ],
            &[net("100.64.0.1/32"), net("100.65.0.1/32")],
        );
        assert_eq!(add, [net("100.65.0.1/32")]);
        assert_eq!(remove, [net("fe80::1/64"), net("100.65.0.9/32")]);
    }

    #[test]
    fn one_address_is_changed_only_when_its_presence_differs() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let have = [net("172.20.0.11/24"), net("fe80::1/64")];
        let ours = net("fe80::ac14:b/64");
        assert_eq!(
            address_change(&have, ours, true),
            Some(AddressChange::Add(ours))
        );
        assert_eq!(address_change(&have, ours, false), None);
        let with = [have[0], ours, have[1]];
        assert_eq!(address_change(&with, ours, true), None);
        assert_eq!(
            address_change(&with, ours, false),
            Some(AddressChange::Remove(ours))
        );
        // the same address with another prefix length is another address
        assert_eq!(
            address_change(&[net("fe80::ac14:b/128")], ours, true),
            Some(AddressChange::Add(ours))
        );
    }
}
