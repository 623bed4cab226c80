//! The socket edge: gotatun's UDP socket (which already receives with `recvmmsg` and
//! `UDP_GRO`), with sends that hand the kernel a run of equal datagrams as one
//! (`UDP_SEGMENT`) instead of one `sendmmsg` entry each.
//!
//! A run is what one TUN read turns into: up to 64 KB of segments of one size, encrypted in
//! order, to one peer. Anything else (handshakes, a lone packet, a run's odd end) goes
//! through gotatun's `sendmmsg` path unchanged.

use super::{Counters, OffloadMode};
use gotatun::packet::Packet;
use gotatun::udp::socket::{UdpSocket, UdpSocketFactory};
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::Interest;

/// The kernel's limit on segments per send (`UDP_MAX_SEGMENTS`, 64 before Linux 6.9).
const MAX_SEGMENTS: usize = 64;
/// The largest UDP payload one send may carry.
const MAX_RUN_BYTES: usize = 65_507;
/// The smallest datagram that joins a run. A segmented send shares one fate until the
/// kernel cuts it, and on a veth that is never (a drop anywhere on the way takes the whole
/// run). Bulk data loses nothing by that, but small datagrams are mostly control traffic
/// whose redundancy assumes independent fates: the prober's four probes per round, sent
/// back to back, would all be lost together and a 5 % loss would fail a round in ten, not
/// one in 160,000. Full-size segments of a 1,420-byte MTU are 1,452 bytes.
const MIN_RUN_DATAGRAM: usize = 1_024;

/// Binds gotatun's socket and wraps its sending half.
#[derive(Debug)]
pub struct GsoUdpFactory {
    inner: UdpSocketFactory,
    mode: OffloadMode,
    counters: Arc<Counters>,
}

impl GsoUdpFactory {
    pub fn new(mode: OffloadMode, counters: Arc<Counters>) -> Self {
        Self {
            inner: UdpSocketFactory::default(),
            mode,
            counters,
        }
    }
}

impl UdpTransportFactory for GsoUdpFactory {
    type Send = GsoUdpSend;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> io::Result<(Self::Send, Self::Recv)> {
        let (send, recv) = self.inner.bind(params).await?;
        let segment = self.mode == OffloadMode::Auto && kernel_segments(&send);
        if self.mode == OffloadMode::Auto && !segment {
            tracing::warn!(
                port = params.port,
                "the kernel has no UDP segmentation offload (UDP_SEGMENT); sending one datagram per packet"
            );
        }
        let send = GsoUdpSend {
            inner: send,
            segment: Arc::new(AtomicBool::new(segment)),
            counters: Arc::clone(&self.counters),
        };
        Ok((send, recv))
    }
}

/// Whether this kernel knows `UDP_SEGMENT` (since 4.18): reading it is harmless.
fn kernel_segments(socket: &UdpSocket) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reading an int option into an int.
    let rc = unsafe {
        libc::getsockopt(
            socket.socket().as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0
}

#[derive(Clone)]
pub struct GsoUdpSend {
    inner: UdpSocket,
    /// Cleared, once and for all, the first time the kernel refuses a segmented send (a
    /// route through a device without checksum offload answers `EIO`).
    segment: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl UdpSend for GsoUdpSend {
    type SendManyBuf = <UdpSocket as UdpSend>::SendManyBuf;

    async fn send_to(&self, packet: Packet, destination: SocketAddr) -> io::Result<()> {
        self.inner.send_to(packet, destination).await
    }

    fn max_number_of_packets_to_send(&self) -> usize {
        self.inner.max_number_of_packets_to_send()
    }

    async fn send_many_to(
        &self,
        buf: &mut Self::SendManyBuf,
        packets: &mut Vec<(Packet, SocketAddr)>,
    ) -> io::Result<()> {
        if !self.segment.load(Ordering::Relaxed) {
            return self.inner.send_many_to(buf, packets).await;
        }
        // Runs leave as segmented sends, everything else through `sendmmsg`, in batch order:
        // a short packet held back behind a run of its own flow would look like loss to TCP.
        let mut batch = std::mem::take(packets);
        let mut start = 0;
        while start < batch.len() {
            let end = start + run_length(&batch[start..]);
            if end - start > 1 && self.segment.load(Ordering::Relaxed) {
                if !packets.is_empty() {
                    if let Err(error) = self.inner.send_many_to(buf, packets).await {
                        tracing::trace!(%error, "sending single datagrams failed");
                    }
                    packets.clear();
                }
                let run = &batch[start..end];
                match self.send_run(run).await {
                    Ok(()) => {
                        Counters::add(&self.counters.udp_segmented_sends, 1);
                        Counters::add(&self.counters.udp_segmented_datagrams, run.len() as u64);
                        start = end;
                        continue;
                    }
                    Err(error) if refuses_segmentation(&error) => {
                        self.segment.store(false, Ordering::Relaxed);
                        tracing::warn!(%error, "the kernel refused a segmented UDP send; sending one datagram per packet from now on");
                    }
                    Err(error) => {
                        // Lost like datagrams dropped on the wire; WireGuard and TCP recover.
                        tracing::trace!(%error, "a segmented UDP send failed");
                        start = end;
                        continue;
                    }
                }
            }
            for (packet, to) in &mut batch[start..end] {
                packets.push((std::mem::take(packet), *to));
            }
            start = end;
        }
        if packets.is_empty() {
            return Ok(());
        }
        self.inner.send_many_to(buf, packets).await
    }

    fn local_addr(&self) -> io::Result<Option<SocketAddr>> {
        self.inner.local_addr().map(Some)
    }

    fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }
}

impl std::os::fd::AsFd for GsoUdpSend {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl GsoUdpSend {
    /// Whether runs still go out as one segmented send (false once the kernel refused one).
    pub fn segments(&self) -> bool {
        self.segment.load(Ordering::Relaxed)
    }

    /// One `sendmsg` carrying every packet of the run, cut by the kernel at the first
    /// packet's size.
    async fn send_run(&self, run: &[(Packet, SocketAddr)]) -> io::Result<()> {
        let destination = socket2::SockAddr::from(run[0].1);
        let size = run[0].0.len() as u16;
        let parts: Vec<IoSlice> = run.iter().map(|(packet, _)| IoSlice::new(packet)).collect();
        let socket = self.inner.socket();
        let fd = socket.as_raw_fd();
        socket
            .async_io(Interest::WRITABLE, || {
                send_segmented(fd, &destination, &parts, size)
            })
            .await
    }
}

fn send_segmented(
    fd: std::os::fd::RawFd,
    destination: &socket2::SockAddr,
    parts: &[IoSlice],
    size: u16,
) -> io::Result<()> {
    // Room for one control message carrying a u16, aligned as the kernel reads it.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain old data; every pointer set below outlives the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = destination.as_ptr() as *mut libc::c_void;
    message.msg_namelen = destination.len();
    // IoSlice is ABI-compatible with iovec.
    message.msg_iov = parts.as_ptr() as *mut libc::iovec;
    message.msg_iovlen = parts.len();
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen =
        unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    // SAFETY: the control buffer is large enough for one CMSG_SPACE(u16) message.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_UDP;
        (*header).cmsg_type = libc::UDP_SEGMENT;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<u16>(), size);
    }
    // SAFETY: `message` is fully initialised above.
    let n = unsafe { libc::sendmsg(fd, &message, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many packets from the start of `packets` form one segmented send: one destination,
/// every packet the first one's size (at least [`MIN_RUN_DATAGRAM`]) except a shorter last
/// one, within the kernel's limits.
pub fn run_length(packets: &[(Packet, SocketAddr)]) -> usize {
    let Some((first, destination)) = packets.first() else {
        return 0;
    };
    let size = first.len();
    if size < MIN_RUN_DATAGRAM {
        return 1;
    }
    let mut total = size;
    let mut n = 1;
    for (packet, to) in &packets[1..] {
        if to != destination
            || packet.len() > size
            || n == MAX_SEGMENTS
            || total + packet.len() > MAX_RUN_BYTES
        {
            break;
        }
        n += 1;
        total += packet.len();
        if packet.len() < size {
            break;
        }
    }
    n
}

fn refuses_segmentation(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(spec: &[(usize, &str)]) -> Vec<(Packet, SocketAddr)> {
        spec.iter()
            .map(|(len, to)| {
                let packet = Packet::copy_from(&vec![0u8; *len][..]);
                (packet, to.parse().unwrap())
            })
            .collect()
    }

    const A: &str = "198.19.0.1:51820";
    const B: &str = "198.19.0.2:51820";

    #[test]
    fn a_run_is_one_destination_and_one_size_with_a_shorter_last() {
        assert_eq!(run_length(&[]), 0);
        assert_eq!(run_length(&packets(&[(1452, A)])), 1);
        assert_eq!(run_length(&packets(&[(1452, A), (1452, A), (1452, A)])), 3);
        // A shorter packet ends the run and belongs to it.
        assert_eq!(
            run_length(&packets(&[(1452, A), (1452, A), (700, A), (1452, A)])),
            3
        );
        // A longer one cannot follow: the kernel cuts at the first packet's size.
        assert_eq!(run_length(&packets(&[(700, A), (1452, A)])), 1);
        assert_eq!(run_length(&packets(&[(1452, A), (1452, B), (1452, B)])), 1);
    }

    #[test]
    fn small_datagrams_never_share_a_send() {
        // Four probes of one round to one gateway: each keeps its own fate.
        assert_eq!(run_length(&packets(&[(140, A); 4])), 1);
        assert_eq!(run_length(&packets(&[(MIN_RUN_DATAGRAM - 1, A); 4])), 1);
        assert_eq!(run_length(&packets(&[(MIN_RUN_DATAGRAM, A); 4])), 4);
    }

    #[test]
    fn a_run_stays_within_the_kernels_limits() {
        let many: Vec<(usize, &str)> = vec![(1100, A); MAX_SEGMENTS + 10];
        assert_eq!(
            run_length(&packets(&many)),
            MAX_SEGMENTS.min(MAX_RUN_BYTES / 1100)
        );
        // 64 KB of payload at most: 45 datagrams of 1452 bytes (65,340), not 46.
        let full: Vec<(usize, &str)> = vec![(1452, A); 60];
        assert_eq!(run_length(&packets(&full)), MAX_RUN_BYTES / 1452);
    }
}
