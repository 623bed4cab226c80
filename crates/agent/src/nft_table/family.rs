//! What differs between a table's IPv4 and IPv6 versions: the nftables family, and the
//! fields addresses are loaded from.

use trellis_dataplane::nftables::Family;
use trellis_dataplane::nftables::dsl::Field;
use trellis_proxy::IpFamily;

pub fn nft_family(family: IpFamily) -> Family {
    match family {
        IpFamily::V4 => Family::Ip,
        IpFamily::V6 => Family::Ip6,
    }
}

/// The source and destination address fields of a family.
#[derive(Clone, Copy, Debug)]
pub struct Fields {
    pub saddr: Field,
    pub daddr: Field,
}

impl Fields {
    pub fn of(family: IpFamily) -> Fields {
        match family {
            IpFamily::V4 => Fields {
                saddr: Field::IpSaddr,
                daddr: Field::IpDaddr,
            },
            IpFamily::V6 => Fields {
                saddr: Field::Ip6Saddr,
                daddr: Field::Ip6Daddr,
            },
        }
    }
}
