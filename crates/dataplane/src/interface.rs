//! The WireGuard interface's own settings as a reconciler: exactly the planned addresses
//! (overlay and probe), the tunnel MTU, and the link up. [`diff_addresses`] decides;
//! [`reconcile_interface`] reads back through an [`InterfaceControl`] and applies.

use crate::error::Result;
use async_trait::async_trait;
use ipnet::IpNet;

/// What the reconciler needs of a link. [`crate::netlink::Netlink`] is the real one;
/// [`crate::fake::FakeInterfaces`] an in-memory one for tests.
#[async_trait]
pub trait InterfaceControl: Send + Sync {
    async fn addresses(&self, link: &str) -> Result<Vec<IpNet>>;
    async fn add_address(&self, link: &str, address: IpNet) -> Result<()>;
    async fn del_address(&self, link: &str, address: IpNet) -> Result<()>;
    async fn set_mtu(&self, link: &str, mtu: u32) -> Result<()>;
    async fn set_up(&self, link: &str) -> Result<()>;
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
}
