//! The in-kernel WireGuard device, for production hosts that have the module.
//!
//! Configured over the `wireguard` generic netlink family. The machines Trellis is built on
//! lack the module, so this backend detects that and says so plainly; the lab and the tests
//! use the userspace device behind the same [`super::WireGuardDevice`] interface.

use std::path::Path;

/// Whether this kernel can create WireGuard interfaces.
pub fn available() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

/// The reason the kernel backend cannot be used here, if any.
pub fn unavailable_reason() -> Option<String> {
    (!available()).then(|| {
        "this kernel has no WireGuard module (no /sys/module/wireguard, generic netlink family \
         \"wireguard\" absent); run the agent with --wireguard userspace"
            .to_string()
    })
}
