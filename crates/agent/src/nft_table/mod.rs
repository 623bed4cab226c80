//! Tables Trellis owns in nftables — the service proxy's and network policy's — kept equal
//! to what their planners want: a table is rendered whole ([`rendered`]), compared with
//! what the kernel holds, and the differences become units of operations ([`units`]) that
//! [`kernel`] applies in bounded transactions after reading the table back.

pub mod family;
pub mod kernel;
pub mod rendered;
pub mod units;

pub use rendered::{RenderedChain, RenderedRule, RenderedSet, RenderedTable};
pub use units::{Drift, KernelTable, Scope, Unit, repair};
