//! ICMP echo over a raw socket, without a `ping` binary: the lab's connectivity check and
//! the agent's forwarding probes ([`IcmpSocket`], IPv4), and the check's IPv6 pairs
//! ([`Icmp6Socket`], ICMPv6). A socket is bound to the namespace it was opened in.

use crate::error::{Error, Result};
use crate::netns;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// An echo reply as received: who answered, with which id and sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoReply {
    pub from: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

pub struct IcmpSocket {
    fd: AsyncFd<OwnedFd>,
}

impl IcmpSocket {
    /// A raw ICMP socket in the calling thread's namespace, optionally bound to a source
    /// address (probes must leave from the probe address). Needs CAP_NET_RAW.
    pub fn open(bind: Option<Ipv4Addr>) -> Result<Self> {
        let fd = raw_socket()
            .map_err(|e| Error::io("opening a raw ICMP socket in the current netns", e))?;
        if let Some(addr) = bind {
            let sin = sockaddr(addr);
            // SAFETY: bind(2) with a valid sockaddr_in of the right size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sin as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::io(format!("binding ICMP socket to {addr}"), e));
            }
        }
        Self::register(fd)
    }

    /// A raw ICMP socket inside the named namespace.
    pub fn open_in(netns_name: &str) -> Result<Self> {
        let fd = netns::run_in(netns_name, raw_socket)?.map_err(|e| {
            Error::io(
                format!("opening a raw ICMP socket in netns {netns_name}"),
                e,
            )
        })?;
        Self::register(fd)
    }

    fn register(fd: OwnedFd) -> Result<Self> {
        // SAFETY: the descriptor is owned by the AsyncFd from here on and registered once.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| {
            Error::io(
                "registering ICMP socket with the tokio runtime",
                e.into_parts().1,
            )
        })?;
        Ok(Self { fd })
    }

    pub fn send_echo(&self, to: Ipv4Addr, id: u16, seq: u16) -> std::io::Result<()> {
        let packet = echo_request(id, seq);
        let sin = sockaddr(to);
        // SAFETY: sendto(2) with a valid buffer and a sockaddr_in of the right size.
        let n = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// An echo reply the socket already holds, without waiting (`None`: nothing queued).
    /// Lets a caller take in everything that arrived before it looks at any deadline.
    pub fn try_recv_reply(&self) -> std::io::Result<Option<EchoReply>> {
        loop {
            let mut buf = [0u8; 1500];
            // SAFETY: reading into a local buffer from our own non-blocking descriptor.
            let n = unsafe {
                libc::recv(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(None),
                    _ => Err(e),
                };
            }
            if let Some(reply) = parse_reply(&buf[..n as usize]) {
                return Ok(Some(reply));
            }
        }
    }

    /// Waits until the socket has something to read (a reply or other ICMP traffic).
    pub async fn readable(&self) -> std::io::Result<()> {
        let mut guard = self.fd.readable().await?;
        // Readiness is re-armed here: the caller drains with `try_recv_reply`, and the
        // next wait must see new data, not this notification again.
        guard.clear_ready();
        Ok(())
    }

    /// The next echo reply (other ICMP traffic the raw socket sees is skipped).
    pub async fn recv_reply(&self) -> std::io::Result<EchoReply> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 1500];
            // SAFETY: reading into a local buffer from our own descriptor.
            let n = unsafe {
                libc::recv(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(e);
            }
            if let Some(reply) = parse_reply(&buf[..n as usize]) {
                return Ok(reply);
            }
        }
    }
}

/// An ICMPv6 echo reply as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo6Reply {
    pub from: Ipv6Addr,
    pub id: u16,
    pub seq: u16,
}

/// A raw ICMPv6 socket: echo requests out, echo replies in. Unlike IPv4's, the kernel
/// fills in the checksum (it covers a pseudo-header with the source address, which only
/// the kernel knows when it picks it), and what is read starts at the ICMPv6 header, the
/// sender coming with the read. Needs CAP_NET_RAW.
pub struct Icmp6Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Icmp6Socket {
    /// A raw ICMPv6 socket inside the named namespace.
    pub fn open_in(netns_name: &str) -> Result<Self> {
        let fd = netns::run_in(netns_name, raw_socket6)?.map_err(|e| {
            Error::io(
                format!("opening a raw ICMPv6 socket in netns {netns_name}"),
                e,
            )
        })?;
        // SAFETY: the descriptor is owned by the AsyncFd from here on and registered once.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| {
            Error::io(
                "registering ICMPv6 socket with the tokio runtime",
                e.into_parts().1,
            )
        })?;
        Ok(Self { fd })
    }

    pub fn send_echo(&self, to: Ipv6Addr, id: u16, seq: u16) -> std::io::Result<()> {
        let packet = echo6_request(id, seq);
        let sin6 = sockaddr6(to);
        // SAFETY: sendto(2) with a valid buffer and a sockaddr_in6 of the right size.
        let n = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sin6 as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The next echo reply (neighbour discovery and the other ICMPv6 traffic a raw socket
    /// sees are skipped).
    pub async fn recv_reply(&self) -> std::io::Result<Echo6Reply> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 1500];
            // SAFETY: an all-zero sockaddr_in6 is a valid value to be overwritten.
            let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: reading into local buffers of the sizes given, from our own descriptor.
            let n = unsafe {
                libc::recvfrom(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_in6).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                return Err(e);
            }
            let sender = Ipv6Addr::from(from.sin6_addr.s6_addr);
            if let Some(reply) = parse_reply6(sender, &buf[..n as usize]) {
                return Ok(reply);
            }
        }
    }
}

fn raw_socket() -> std::io::Result<OwnedFd> {
    open_raw(libc::AF_INET, libc::IPPROTO_ICMP)
}

fn raw_socket6() -> std::io::Result<OwnedFd> {
    open_raw(libc::AF_INET6, libc::IPPROTO_ICMPV6)
}

fn open_raw(family: libc::c_int, protocol: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn sockaddr6(addr: Ipv6Addr) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        sin6_scope_id: 0,
    }
}

/// An ICMPv6 echo request, checksum left zero: the kernel computes it on a raw ICMPv6
/// socket (RFC 3542 §3.1).
pub fn echo6_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 128; // echo request
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    p
}

/// An ICMPv6 message as a raw socket delivers it (no IPv6 header), from `sender`: an echo
/// reply, or `None`.
pub fn parse_reply6(sender: Ipv6Addr, icmp: &[u8]) -> Option<Echo6Reply> {
    let header = icmp.get(..8)?;
    if header[0] != 129 {
        return None;
    }
    Some(Echo6Reply {
        from: sender,
        id: u16::from_be_bytes([header[4], header[5]]),
        seq: u16::from_be_bytes([header[6], header[7]]),
    })
}

pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8; // echo request
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// An IPv4 packet carrying an ICMP echo reply, as a raw socket delivers it.
pub fn parse_reply(packet: &[u8]) -> Option<EchoReply> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(header..header + 8)?;
    if icmp[0] != 0 {
        return None;
    }
    Some(EchoReply {
        from: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        id: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
    })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies_and_replies_parse() {
        let p = echo_request(0x1234, 7);
        assert_eq!(
            checksum(&p),
            0,
            "a packet including its checksum sums to zero"
        );
        let mut ip = vec![
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let mut reply = p;
        reply[0] = 0;
        ip.extend_from_slice(&reply);
        assert_eq!(
            parse_reply(&ip),
            Some(EchoReply {
                from: Ipv4Addr::new(10, 0, 0, 1),
                id: 0x1234,
                seq: 7
            })
        );
        assert_eq!(parse_reply(&ip[..22]), None);
    }

    #[test]
    fn icmpv6_echo_requests_and_replies() {
        let p = echo6_request(0x1234, 7);
        assert_eq!((p[0], p[1]), (128, 0), "echo request, code 0");
        assert_eq!(&p[2..4], [0, 0], "the kernel fills the checksum in");
        let from: Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
        let mut reply = p;
        reply[0] = 129;
        assert_eq!(
            parse_reply6(from, &reply),
            Some(Echo6Reply {
                from,
                id: 0x1234,
                seq: 7
            })
        );
        assert_eq!(parse_reply6(from, &p), None, "a request is no reply");
        let neighbour_solicitation = [135u8, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_reply6(from, &neighbour_solicitation), None);
        assert_eq!(parse_reply6(from, &reply[..7]), None);
    }
}
