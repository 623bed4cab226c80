//! Segmentation offloads for the userspace device: the TUN interface and the UDP socket
//! move 64 KB at a time instead of one packet per system call.
//!
//! gotatun reads and writes one packet per system call on both sides, and its profile is
//! system calls and the kernel's per-packet work, not cryptography. The kernel can hand a
//! TUN reader a whole TCP (or UDP) send of up to 64 KB with a virtio-net header saying how
//! to cut it (`IFF_VNET_HDR` with `TUNSETOFFLOAD`), take a coalesced one back the same way,
//! and move a run of equal datagrams through the socket as one (`UDP_SEGMENT` on send,
//! `UDP_GRO` on receive). Across a veth nothing is ever cut to wire size: the encrypted
//! run reaches the peer's socket as one buffer.
//!
//! The pieces, pure cores beside thin edges:
//! - [`virtio`], [`checksum`], [`segment`] and [`coalesce`] are pure: the header format,
//!   Internet checksums, cutting a super-packet into packets, and planning which decrypted
//!   packets of a batch merge into one write.
//! - [`tun`] is the TUN edge behind gotatun's `IpRecv`/`IpSend`: one read becomes an
//!   iterator of packets; writes gather in a queue whose batches are coalesced.
//! - [`udp`] is the socket edge behind gotatun's `UdpTransportFactory`: runs of equal
//!   datagrams to one peer go out as one `UDP_SEGMENT` send; receiving (`recvmmsg` with
//!   `UDP_GRO`) is gotatun's own.
//!
//! Both edges are written here rather than patched into gotatun because its interfaces
//! already carry batches where it matters (an iterator per TUN read, `send_many_to` per UDP
//! flush); only the TUN write side has no batch boundary, so the TUN writer keeps its own
//! short queue. Every offload falls back on its own, with one log line, when the kernel
//! refuses it.

pub mod checksum;
pub mod coalesce;
pub mod segment;
pub mod tun;
pub mod udp;
pub mod virtio;

use std::sync::atomic::{AtomicU64, Ordering};

/// Whether the device asks the kernel for offloads; `Off` keeps the one-packet-per-call path
/// (for kernels that misbehave, and to measure what the offloads bring).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OffloadMode {
    #[default]
    Auto,
    Off,
}

impl std::str::FromStr for OffloadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "userspace offloads {other:?} is not one of \"auto\", \"off\""
            )),
        }
    }
}

/// What the offloads did, counted by the edges: whether the kernel's batches really reach
/// us, and how well ours reach it.
#[derive(Debug, Default)]
pub struct Counters {
    /// TUN reads that carried more than one packet (a segmentation offload at work).
    pub tun_super_reads: AtomicU64,
    /// Packets cut from TUN reads, of any size.
    pub tun_packets_read: AtomicU64,
    /// TUN writes that carried more than one packet (coalesced).
    pub tun_coalesced_writes: AtomicU64,
    /// Packets written to the TUN device, coalesced or not.
    pub tun_packets_written: AtomicU64,
    /// UDP sends of a run of datagrams as one (`UDP_SEGMENT`).
    pub udp_segmented_sends: AtomicU64,
    /// Datagrams those sends carried.
    pub udp_segmented_datagrams: AtomicU64,
}

/// What the kernel agreed to hand us whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Granted {
    /// TCP segmentation offload both ways (`TUN_F_TSO4 | TUN_F_TSO6`).
    pub tso: bool,
    /// UDP segmentation offload (`TUN_F_USO4 | TUN_F_USO6`, kernels since 6.2).
    pub uso: bool,
}

/// What a device reports of its offloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub granted: Granted,
    pub usage: Usage,
}

/// A reading of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub tun_super_reads: u64,
    pub tun_packets_read: u64,
    pub tun_coalesced_writes: u64,
    pub tun_packets_written: u64,
    pub udp_segmented_sends: u64,
    pub udp_segmented_datagrams: u64,
}

impl Counters {
    pub fn read(&self) -> Usage {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Usage {
            tun_super_reads: get(&self.tun_super_reads),
            tun_packets_read: get(&self.tun_packets_read),
            tun_coalesced_writes: get(&self.tun_coalesced_writes),
            tun_packets_written: get(&self.tun_packets_written),
            udp_segmented_sends: get(&self.udp_segmented_sends),
            udp_segmented_datagrams: get(&self.udp_segmented_datagrams),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
