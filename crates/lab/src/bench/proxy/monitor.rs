//! Watches the kernel commit nftables transactions, as `nft monitor` does: a netlink socket
//! in the nf_tables multicast group receives, at the end of every committed transaction, a
//! "new generation" message. The change case times a store write until that message.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN`.
const NEWGEN: u16 = (10 << 8) | 15;

pub struct CommitMonitor {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl CommitMonitor {
    /// Listens in the calling thread's network namespace.
    pub fn open() -> io::Result<CommitMonitor> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
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
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = 1 << (NFNLGRP_NFTABLES - 1);
        // SAFETY: the address is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt reads an int of the size given. Best effort.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(CommitMonitor {
            fd,
            buf: vec![0; 1 << 16],
        })
    }

    /// Throws away whatever was announced so far.
    pub fn drain(&mut self) {
        while let Ok(Some(_)) = self.recv(Duration::ZERO) {}
    }

    /// Waits until a transaction is committed; the time it was seen, or `None` at the
    /// deadline.
    pub fn wait_commit(&mut self, timeout: Duration) -> io::Result<Option<Instant>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(true) => return Ok(Some(Instant::now())),
                Some(false) => {}
                None if Instant::now() >= deadline => return Ok(None),
                None => {}
            }
        }
    }

    /// One datagram: `Some(true)` if it holds a new-generation message (or the socket
    /// overflowed, which only a commit can cause), `None` if nothing came in `wait`.
    fn recv(&mut self, wait: Duration) -> io::Result<Option<bool>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, valid for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if ready == 0 {
            return Ok(None);
        }
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS) => Ok(Some(true)),
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(has_newgen(&self.buf[..n as usize])))
    }
}

/// Whether a datagram of netlink messages holds a new-generation message.
fn has_newgen(mut data: &[u8]) -> bool {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if ty == NEWGEN {
            return true;
        }
        if len < 16 {
            return false;
        }
        let aligned = (len + 3) & !3;
        if aligned >= data.len() {
            return false;
        }
        data = &data[aligned..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(ty: u16, payload: usize) -> Vec<u8> {
        let len = 16 + payload;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.resize((len + 3) & !3, 0);
        m
    }

    #[test]
    fn finds_the_new_generation_after_other_messages() {
        let mut data = message((10 << 8) | 3, 5);
        assert!(!has_newgen(&data));
        data.extend(message(NEWGEN, 8));
        assert!(has_newgen(&data));
    }
}
