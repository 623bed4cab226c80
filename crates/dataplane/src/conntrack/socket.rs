//! A blocking NETLINK_NETFILTER socket for ctnetlink whose every receive is bounded by a
//! deadline. (The same shape as the nf_tables one, which is private to its module.)

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// Room for a chunk of pipelined deletes' acknowledgements (about 1 KiB each in the
/// receive queue, skb overhead included) and a dump's answers.
const BUFFER: libc::c_int = 1 << 20;

pub(super) struct CtSocket {
    fd: OwnedFd,
}

impl CtSocket {
    /// Opens and binds a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<CtSocket> {
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
        let socket = CtSocket {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut local: libc::sockaddr_nl = unsafe { mem::zeroed() };
        local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind(2) with a sockaddr_nl of the right size; port 0 lets the kernel
        // pick a unique port id.
        let rc = unsafe {
            libc::bind(
                socket.fd.as_raw_fd(),
                (&local as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // Optional comforts, absent on old kernels: errors echo only the request's header
        // and may carry the kernel's explanation.
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        // SO_RCVBUFFORCE needs CAP_NET_ADMIN, which ctnetlink needs anyway; without it the
        // capped variant. Best effort: a lost acknowledgement shows as ENOBUFS or a timeout.
        let _ = socket
            .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, BUFFER)
            .or_else(|_| socket.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, BUFFER));
        Ok(socket)
    }

    /// Sends one datagram to the kernel.
    pub fn send(&self, datagram: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all-zero (port 0) is the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: sendto(2) with a valid buffer and a sockaddr_nl of the right size.
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

    /// Receives one datagram into `buf` (which holds exactly it afterwards, grown if need
    /// be), waiting until `deadline` at most. `Ok(false)`: the deadline passed first.
    pub fn recv(&self, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<bool> {
        loop {
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
            if ready == 0 {
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                continue;
            }
            // Peek first: with MSG_TRUNC netlink reports the datagram's full length, so
            // the buffer can be made big enough.
            let Some(len) = self.recv_into(buf, libc::MSG_PEEK | libc::MSG_TRUNC)? else {
                continue;
            };
            buf.reserve(len);
            if self.recv_into(buf, 0)?.is_none() {
                continue;
            }
            return Ok(true);
        }
    }

    /// One non-blocking recv(2) into the capacity of `buf`, which then holds what was
    /// received (without zeroing the rest first: each acknowledgement of a chunk of
    /// deletes is a datagram of its own). Returns the datagram's length, which with
    /// MSG_TRUNC may be more than fitted; `None` when nothing is there after all.
    fn recv_into(&self, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<Option<usize>> {
        buf.clear();
        let capacity = buf.capacity();
        loop {
            // SAFETY: recv(2) writes at most `capacity` bytes into the buffer's allocation.
            let got = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    capacity,
                    flags | libc::MSG_DONTWAIT,
                )
            };
            if got >= 0 {
                let got = got as usize;
                // SAFETY: the kernel initialised the first `got` bytes (at most `capacity`).
                unsafe { buf.set_len(got.min(capacity)) };
                return Ok(Some(got));
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
