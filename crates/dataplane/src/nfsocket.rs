//! A blocking NETLINK_NETFILTER socket whose every receive is bounded by a
//! deadline: the one socket nf_tables ([`crate::nftables`]) and ctnetlink
//! ([`crate::conntrack`]) both speak through.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// Kernel buffers get at least this much room; bigger batches get more.
const MIN_BUFFER: usize = 1 << 20;
/// What an answer costs in the receive buffer (skb overhead included), to
/// size it for a batch's worth of refusals.
const ACK_TRUESIZE: usize = 1024;
/// At most this much receive buffer: a batch refused everywhere may lose
/// some of its refusals (the first ones are kept, and any means nothing was
/// applied), rather than pin hundreds of megabytes of kernel memory.
const MAX_RCVBUF: usize = 32 << 20;
/// Userspace receive buffer: more than any answer (dump parts are at most
/// 32 KiB; refusals echo only the refused message's header).
pub(crate) const RECV_BUFFER: usize = 256 * 1024;

pub(crate) struct NfSocket {
    fd: OwnedFd,
    /// Current SO_SNDBUF / SO_RCVBUF we asked for.
    sndbuf: usize,
    rcvbuf: usize,
}

impl NfSocket {
    /// Opens and binds a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<NfSocket> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut local: libc::sockaddr_nl = unsafe { mem::zeroed() };
        local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind(2) with a sockaddr_nl of the right size; port 0 lets
        // the kernel pick a unique port id.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&local as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut socket = NfSocket {
            fd,
            sndbuf: 0,
            rcvbuf: 0,
        };
        // Errors echo only the failing message's header, not the whole
        // request, and may carry the kernel's explanation. Both are
        // optional comforts: older kernels simply lack them.
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        socket.make_room(0, 0);
        Ok(socket)
    }

    /// Grows the kernel's buffers so that a request of `request_len` bytes
    /// fits in one send (a batch must arrive as one datagram) and answers to
    /// `acks` messages fit in the receive queue (up to a bound).
    /// Best effort: if the kernel refuses, sending fails visibly or the
    /// answer is missing and the deadline reports it.
    pub fn make_room(&mut self, request_len: usize, acks: usize) {
        let snd = (request_len + request_len / 4).max(MIN_BUFFER);
        if snd > self.sndbuf {
            // SO_*BUFFORCE needs CAP_NET_ADMIN, which nf_tables needs anyway;
            // fall back to the capped variant without it.
            if self
                .set_int(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, to_int(snd))
                .or_else(|_| self.set_int(libc::SOL_SOCKET, libc::SO_SNDBUF, to_int(snd)))
                .is_ok()
            {
                self.sndbuf = snd;
            }
        }
        let rcv = (acks * ACK_TRUESIZE).clamp(MIN_BUFFER, MAX_RCVBUF);
        if rcv > self.rcvbuf
            && self
                .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, to_int(rcv))
                .or_else(|_| self.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, to_int(rcv)))
                .is_ok()
        {
            self.rcvbuf = rcv;
        }
    }

    /// Sends one datagram to the kernel.
    pub fn send(&self, datagram: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero (port 0) is the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: sendto(2) with a valid buffer and a sockaddr_nl of the
            // right size.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if sent as usize != datagram.len() {
                return Err(io::Error::other(format!(
                    "sent {sent} of {} bytes",
                    datagram.len()
                )));
            }
            return Ok(());
        }
    }

    /// Receives one datagram into `buf` (which then holds just the
    /// datagram), waiting until `deadline` at most. `Ok(false)`:
    /// the deadline passed first.
    pub fn recv(&self, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<bool> {
        if buf.capacity() < RECV_BUFFER {
            buf.reserve(RECV_BUFFER - buf.len());
        }
        loop {
            // The kernel answers within the send (batches and the first
            // part of a dump alike), so the answer is usually queued
            // already: try first, wait only if nothing is there.
            if let Some(len) = self.recv_raw(buf, libc::MSG_DONTWAIT | libc::MSG_TRUNC)? {
                if len > buf.len() {
                    // MSG_TRUNC reports the datagram's full length; the
                    // rest of it is lost.
                    return Err(io::Error::other(format!(
                        "an answer of {len} bytes did not fit in {} bytes",
                        buf.len()
                    )));
                }
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up so a sub-millisecond rest still waits a little.
            let millis = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: poll(2) on one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, millis) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ready == 0 && Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// One recv(2) into `buf`'s capacity (not zeroed first: that would
    /// cost more than the receive), `buf` then holding what was received.
    /// Returns the datagram's length, which with MSG_TRUNC may exceed what
    /// fitted; `None` when nothing is there.
    fn recv_raw(&self, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<Option<usize>> {
        buf.clear();
        let room = buf.capacity();
        loop {
            // SAFETY: recv(2) writes at most `room` bytes into the buffer's
            // allocation, which has that capacity.
            let got =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), room, flags) };
            if got >= 0 {
                let len = got as usize;
                // SAFETY: the kernel initialised the first min(len, room)
                // bytes.
                unsafe { buf.set_len(len.min(room)) };
                return Ok(Some(len));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(err),
            }
        }
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: setsockopt(2) with a pointer to an int and its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn to_int(value: usize) -> libc::c_int {
    libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX)
}
