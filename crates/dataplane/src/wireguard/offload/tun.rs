//! The TUN edge: `/dev/net/tun` opened with a virtio-net header and segmentation offloads,
//! behind gotatun's `IpRecv` (one read, many packets) and `IpSend` (a queue whose batches
//! are coalesced into few writes).
//!
//! Written by hand because the `tun` crate gotatun uses opens the device without
//! `IFF_VNET_HDR` and has no way to ask for offloads; what is needed is three ioctls.

use super::coalesce::Coalescer;
use super::segment::segment;
use super::virtio::VirtioNetHdr;
use super::{Counters, Granted, OffloadMode};
use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

/// The largest packet a TUN read can return with TSO: a 64 KB IP packet behind the header.
const READ_BUFFER: usize = VirtioNetHdr::LEN + 65_535;
/// Packets the writer takes from its queue at once: enough to merge a whole 64 KB run of
/// full-size segments, few enough that the first packet of a batch is not held back.
const WRITE_BATCH: usize = 64;
/// The writer's queue, behind gotatun's own: deep enough for four full batches, short
/// enough not to add a standing queue under load (by hand, three runs each: 1,024 gave
/// worse ping under load, 64 worse throughput and ping; docs/benchmarks.md).
const WRITE_QUEUE: usize = 256;
/// Headers of a coalesced packet.
const HEAD_BUFFER: usize = super::coalesce::MAX_HEAD_LEN;
/// How often the interface MTU is read back: gotatun pads to it, and the link reconciler
/// may change it at any time.
const MTU_POLL: Duration = Duration::from_secs(3);

/// Open TUN interface `name` in the calling thread's network namespace, ask for offloads as
/// `mode` says, and return its reading and writing halves.
pub fn open(
    name: &str,
    mode: OffloadMode,
    counters: Arc<Counters>,
) -> io::Result<(TunReader, TunWriter, Granted)> {
    let fd = open_tun(name)?;
    let granted = match mode {
        OffloadMode::Off => {
            set_offload(fd.as_raw_fd(), 0)?;
            Granted::default()
        }
        OffloadMode::Auto => negotiate(name, |flags| set_offload(fd.as_raw_fd(), flags)),
    };
    let control = control_socket()?;
    let mtu = interface_mtu(&control, name)?;
    // SAFETY: the descriptor is owned by the AsyncFd from here on and registered once. Only
    // reads wait for readiness: a TUN device takes or drops every write at once.
    let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let fd = Arc::new(fd);
    let (mtu_tx, mtu_rx) = watch::channel(mtu);
    tokio::spawn(follow_mtu(control, name.to_string(), mtu_tx));
    let (queue, rx) = mpsc::channel(WRITE_QUEUE);
    tokio::spawn(write_queued(
        Arc::clone(&fd),
        rx,
        granted,
        Arc::clone(&counters),
        name.to_string(),
    ));
    let reader = TunReader {
        fd,
        buffer: vec![0; READ_BUFFER].into_boxed_slice(),
        packets: Vec::new(),
        mtu: MtuWatcher::from(mtu_rx),
        counters,
        name: name.to_string(),
    };
    Ok((reader, TunWriter { queue }, granted))
}

fn open_tun(name: &str) -> io::Result<OwnedFd> {
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut request = interface_request(name)?;
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads an ifreq, which `request` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Ask for everything, then for less: a kernel without USO (before 6.2) still has TSO.
/// `set` is `TUNSETOFFLOAD` on the device.
fn negotiate(name: &str, mut set: impl FnMut(libc::c_uint) -> io::Result<()>) -> Granted {
    let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
    if set(tso | uso).is_ok() {
        return Granted {
            tso: true,
            uso: true,
        };
    }
    match set(tso) {
        Ok(()) => {
            tracing::info!(
                interface = name,
                "the kernel refused UDP segmentation offload on the TUN device; UDP is cut to size before it reaches us"
            );
            Granted {
                tso: true,
                uso: false,
            }
        }
        Err(error) => {
            tracing::warn!(
                interface = name,
                %error,
                "the kernel refused segmentation offloads on the TUN device; moving one packet per read and write"
            );
            let _ = set(0);
            Granted::default()
        }
    }
}

fn set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn interface_request(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1 to 15 bytes without NUL"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Ok(request)
}

/// A datagram socket for interface ioctls, opened now so it lives in the TUN's namespace
/// even when read from a thread that is not.
fn control_socket() -> io::Result<OwnedFd> {
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn interface_mtu(control: &OwnedFd, name: &str) -> io::Result<u16> {
    let mut request = interface_request(name)?;
    // SAFETY: SIOCGIFMTU fills the ifreq's MTU.
    if unsafe { libc::ioctl(control.as_raw_fd(), libc::SIOCGIFMTU, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
}

/// Keeps gotatun's view of the MTU current until the device is gone (every receiver
/// dropped) or the interface is.
async fn follow_mtu(control: OwnedFd, name: String, mtu: watch::Sender<u16>) {
    loop {
        tokio::select! {
            _ = mtu.closed() => return,
            _ = tokio::time::sleep(MTU_POLL) => {}
        }
        match interface_mtu(&control, &name) {
            Ok(now) => {
                mtu.send_if_modified(|known| std::mem::replace(known, now) != now);
            }
            Err(error) if error.raw_os_error() == Some(libc::ENODEV) => return,
            Err(error) => tracing::debug!(interface = %name, %error, "reading the MTU"),
        }
    }
}

/// The reading half: one `read` per call, cut into the packets gotatun encrypts.
pub struct TunReader {
    fd: Arc<AsyncFd<OwnedFd>>,
    buffer: Box<[u8]>,
    packets: Vec<Packet<Ip>>,
    mtu: MtuWatcher,
    counters: Arc<Counters>,
    name: String,
}

impl TunReader {
    async fn read(&mut self) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            let buffer = &mut self.buffer;
            match ready.try_io(|fd| {
                // SAFETY: reading into a buffer we own, of the length we pass.
                let n =
                    unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

impl IpRecv for TunReader {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        let n = self.read().await?;
        self.packets.clear();
        let (header, packet) = self.buffer[..n].split_at_mut(VirtioNetHdr::LEN.min(n));
        let cut = VirtioNetHdr::decode(header).and_then(|header| {
            segment(&header, packet, |headers, payload| {
                let mut out = pool.get();
                let buffer = out.buf_mut();
                buffer.clear();
                buffer.extend_from_slice(headers);
                buffer.extend_from_slice(payload);
                // Short packets cannot come out of `segment`; the check stays gotatun's.
                if let Ok(ip) = out.try_into_ip() {
                    self.packets.push(ip);
                }
            })
        });
        if let Err(error) = cut {
            // A bad packet is dropped, never an error: gotatun stops the device on some.
            tracing::debug!(interface = %self.name, %error, "dropping a packet read from the TUN device");
            self.packets.clear();
        }
        let n = self.packets.len() as u64;
        Counters::add(&self.counters.tun_packets_read, n);
        if n > 1 {
            Counters::add(&self.counters.tun_super_reads, 1);
        }
        Ok(self.packets.drain(..))
    }

    fn mtu(&self) -> MtuWatcher {
        self.mtu.clone()
    }
}

/// The writing half: packets queue for the writer task, which coalesces each batch.
#[derive(Clone)]
pub struct TunWriter {
    queue: mpsc::Sender<Packet>,
}

impl IpSend for TunWriter {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        self.queue
            .send(packet.into_bytes())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the TUN writer stopped"))
    }
}

/// Takes whatever is queued (never waits for more), merges TCP runs when the kernel takes
/// TSO and UDP runs when it takes USO, and writes each result with one `writev`.
async fn write_queued(
    fd: Arc<AsyncFd<OwnedFd>>,
    mut queue: mpsc::Receiver<Packet>,
    granted: Granted,
    counters: Arc<Counters>,
    name: String,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let (coalesce, coalesce_udp) = (granted.tso, granted.tso && granted.uso);
    let mut coalescer = Coalescer::with_udp(coalesce_udp);
    while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        Counters::add(&counters.tun_packets_written, batch.len() as u64);
        let result = if coalesce {
            write_coalesced(fd.get_ref(), &batch, &mut coalescer, &counters)
        } else {
            let none = VirtioNetHdr::NONE.encode();
            // Every packet is written; the first error is the one reported.
            let mut result = Ok(());
            for packet in &batch {
                let parts = [IoSlice::new(&none), IoSlice::new(packet.as_ref())];
                result = result.and(write_parts(fd.get_ref(), &parts));
            }
            result
        };
        batch.clear();
        match result {
            Ok(()) => {}
            Err(error) if is_gone(&error) => {
                tracing::debug!(interface = %name, %error, "the TUN device is gone; its writer stops");
                return;
            }
            // A packet the kernel refuses is lost like one dropped on a wire.
            Err(error) => tracing::debug!(interface = %name, %error, "writing to the TUN device"),
        }
    }
}

/// Every group of the batch as one write; the first error is returned after the rest are
/// written.
fn write_coalesced(
    fd: &OwnedFd,
    batch: &[Packet],
    coalescer: &mut Coalescer,
    counters: &Counters,
) -> io::Result<()> {
    let mut result = Ok(());
    for group in coalescer.plan(batch) {
        if group.is_coalesced() {
            Counters::add(&counters.tun_coalesced_writes, 1);
        }
        let mut head = [0u8; VirtioNetHdr::LEN + HEAD_BUFFER];
        let (virtio, rest) = head.split_at_mut(VirtioNetHdr::LEN);
        virtio.copy_from_slice(&group.virtio_header().encode());
        let len = group.head(batch, rest);
        let parts: Vec<IoSlice> = std::iter::once(IoSlice::new(&head[..VirtioNetHdr::LEN + len]))
            .chain(group.payloads(batch).map(IoSlice::new))
            .collect();
        result = result.and(write_parts(fd, &parts));
    }
    result
}

/// One packet per call: a TUN device takes or drops a write, it never takes part of one.
fn write_parts(fd: &OwnedFd, parts: &[IoSlice]) -> io::Result<()> {
    // SAFETY: IoSlice is ABI-compatible with iovec, and each borrows a live buffer.
    let n = unsafe {
        libc::writev(
            fd.as_raw_fd(),
            parts.as_ptr().cast::<libc::iovec>(),
            parts.len() as libc::c_int,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn is_gone(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADF) | Some(libc::EBADFD) | Some(libc::ENODEV)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `negotiate` asked for, and a kernel that grants only `allowed` flags.
    fn negotiate_with(allowed: libc::c_uint) -> (Granted, Vec<libc::c_uint>) {
        let mut asked = Vec::new();
        let granted = negotiate("tw0", |flags| {
            asked.push(flags);
            if flags & !allowed == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        });
        (granted, asked)
    }

    #[test]
    fn every_offload_is_asked_for_and_each_refusal_falls_back_a_step() {
        let csum_tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        let all = csum_tso | libc::TUN_F_USO4 | libc::TUN_F_USO6;

        let (granted, asked) = negotiate_with(all);
        assert_eq!(
            granted,
            Granted {
                tso: true,
                uso: true
            }
        );
        assert_eq!(asked, vec![all]);

        let (granted, asked) = negotiate_with(csum_tso);
        assert_eq!(
            granted,
            Granted {
                tso: true,
                uso: false
            }
        );
        assert_eq!(asked, vec![all, csum_tso]);

        // Nothing granted: the device is left with no offloads at all, so the kernel never
        // hands us a packet we would have to cut.
        let (granted, asked) = negotiate_with(0);
        assert_eq!(granted, Granted::default());
        assert_eq!(asked, vec![all, csum_tso, 0]);
    }

    #[test]
    fn interface_names_the_kernel_cannot_take_are_refused_by_name() {
        for bad in ["", "a-name-of-16-chars", "nul\0in"] {
            let error = interface_request(bad).unwrap_err();
            assert!(error.to_string().contains("interface name"), "{error}");
        }
        assert!(interface_request("tw-lab-a1").is_ok());
    }
}
