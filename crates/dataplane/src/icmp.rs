//! ICMP echo over a raw socket, without a `ping` binary: the lab's connectivity check and
//! the agent's forwarding probes ([`IcmpSocket`], IPv4), and the check's IPv6 pairs
//! ([`Icmp6Socket`], ICMPv6). A socket is bound to the namespace it was opened in.

use crate::error::{Error, Result};
use crate::netns;
use std::marker::PhantomData;
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

/// An ICMPv6 echo reply as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo6Reply {
    pub from: Ipv6Addr,
    pub id: u16,
    pub seq: u16,
}

/// A raw ICMP socket (IPv4): echo requests out, echo replies in. What is read starts at
/// the IPv4 header, which names the sender. Needs CAP_NET_RAW.
pub type IcmpSocket = EchoSocket<V4>;

/// A raw ICMPv6 socket: echo requests out, echo replies in. Unlike IPv4's, the kernel
/// fills in the checksum (it covers a pseudo-header with the source address, which only
/// the kernel knows when it picks it), and what is read starts at the ICMPv6 header, the
/// sender coming with the read. Needs CAP_NET_RAW.
pub type Icmp6Socket = EchoSocket<V6>;

/// IPv4 and ICMP, for [`IcmpSocket`].
#[derive(Debug)]
pub enum V4 {}

/// IPv6 and ICMPv6, for [`Icmp6Socket`].
#[derive(Debug)]
pub enum V6 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::V4 {}
    impl Sealed for super::V6 {}
}

/// What an [`EchoSocket`] needs of its address family: [`V4`] or [`V6`].
pub trait Family: sealed::Sealed + 'static {
    type Addr: Copy;
    type Reply;
    /// `sockaddr_in` or `sockaddr_in6`.
    type SockAddr;
    /// In messages: `ICMP` or `ICMPv6`.
    const NAME: &'static str;
    const DOMAIN: libc::c_int;
    const PROTOCOL: libc::c_int;
    const UNSPECIFIED: Self::Addr;
    fn sockaddr(addr: Self::Addr) -> Self::SockAddr;
    fn echo_request(id: u16, seq: u16) -> [u8; 16];
    /// A datagram as the raw socket delivers it, with the sender the read gave: an echo
    /// reply, or `None`.
    fn parse_reply(sender: &Self::SockAddr, datagram: &[u8]) -> Option<Self::Reply>;
}

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Reply = EchoReply;
    type SockAddr = libc::sockaddr_in;
    const NAME: &'static str = "ICMP";
    const DOMAIN: libc::c_int = libc::AF_INET;
    const PROTOCOL: libc::c_int = libc::IPPROTO_ICMP;
    const UNSPECIFIED: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

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

    fn echo_request(id: u16, seq: u16) -> [u8; 16] {
        echo_request(id, seq)
    }

    /// The sender is the packet's: it starts at the IPv4 header.
    fn parse_reply(_: &libc::sockaddr_in, packet: &[u8]) -> Option<EchoReply> {
        parse_reply(packet)
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Reply = Echo6Reply;
    type SockAddr = libc::sockaddr_in6;
    const NAME: &'static str = "ICMPv6";
    const DOMAIN: libc::c_int = libc::AF_INET6;
    const PROTOCOL: libc::c_int = libc::IPPROTO_ICMPV6;
    const UNSPECIFIED: Ipv6Addr = Ipv6Addr::UNSPECIFIED;

    fn sockaddr(addr: Ipv6Addr) -> libc::sockaddr_in6 {
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

    fn echo_request(id: u16, seq: u16) -> [u8; 16] {
        echo6_request(id, seq)
    }

    fn parse_reply(sender: &libc::sockaddr_in6, icmp: &[u8]) -> Option<Echo6Reply> {
        parse_reply6(Ipv6Addr::from(sender.sin6_addr.s6_addr), icmp)
    }
}

/// A raw echo socket of family `F`, bound to the namespace it was opened in: use it as
/// [`IcmpSocket`] or [`Icmp6Socket`].
pub struct EchoSocket<F: Family> {
    fd: AsyncFd<OwnedFd>,
    family: PhantomData<F>,
}

impl IcmpSocket {
    /// A raw ICMP socket in the calling thread's namespace, optionally bound to a source
    /// address (probes must leave from the probe address). Needs CAP_NET_RAW.
    pub fn open(bind: Option<Ipv4Addr>) -> Result<Self> {
        let fd = open_raw::<V4>()
            .map_err(|e| Error::io("opening a raw ICMP socket in the current netns", e))?;
        if let Some(addr) = bind {
            let sin = V4::sockaddr(addr);
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
}

impl<F: Family> EchoSocket<F> {
    /// A raw socket of the family inside the named namespace.
    pub fn open_in(netns_name: &str) -> Result<Self> {
        let fd = netns::run_in(netns_name, open_raw::<F>)?.map_err(|e| {
            Error::io(
                format!("opening a raw {} socket in netns {netns_name}", F::NAME),
                e,
            )
        })?;
        Self::register(fd)
    }

    fn register(fd: OwnedFd) -> Result<Self> {
        // SAFETY: the descriptor is owned by the AsyncFd from here on and registered once.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| {
            Error::io(
                format!("registering {} socket with the tokio runtime", F::NAME),
                e.into_parts().1,
            )
        })?;
        Ok(Self {
            fd,
            family: PhantomData,
        })
    }

    pub fn send_echo(&self, to: F::Addr, id: u16, seq: u16) -> std::io::Result<()> {
        let packet = F::echo_request(id, seq);
        let to = F::sockaddr(to);
        // SAFETY: sendto(2) with a valid buffer and a sockaddr of the family, of its size.
        let n = unsafe {
            libc::sendto(
                self.fd.get_ref().as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const F::SockAddr).cast(),
                std::mem::size_of::<F::SockAddr>() as libc::socklen_t,
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
    pub fn try_recv_reply(&self) -> std::io::Result<Option<F::Reply>> {
        loop {
            match recv::<F>(self.fd.get_ref(), libc::MSG_DONTWAIT) {
                Ok(Some(reply)) => return Ok(Some(reply)),
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the socket has something to read (a reply or other traffic).
    pub async fn readable(&self) -> std::io::Result<()> {
        let mut guard = self.fd.readable().await?;
        // Readiness is re-armed here: the caller drains with `try_recv_reply`, and the
        // next wait must see new data, not this notification again.
        guard.clear_ready();
        Ok(())
    }

    /// The next echo reply (other traffic the raw socket sees, such as ICMPv6's neighbour
    /// discovery, is skipped).
    pub async fn recv_reply(&self) -> std::io::Result<F::Reply> {
        loop {
            let mut guard = self.fd.readable().await?;
            match recv::<F>(guard.get_inner(), 0) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads one datagram from the socket: an echo reply, or `None` for other traffic.
fn recv<F: Family>(fd: &OwnedFd, flags: libc::c_int) -> std::io::Result<Option<F::Reply>> {
    let mut buf = [0u8; 1500];
    let mut from = F::sockaddr(F::UNSPECIFIED);
    let mut from_len = std::mem::size_of::<F::SockAddr>() as libc::socklen_t;
    // SAFETY: reading into local buffers of the sizes given, from our own descriptor.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags,
            (&mut from as *mut F::SockAddr).cast(),
            &mut from_len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(F::parse_reply(&from, &buf[..n as usize]))
}

fn open_raw<F: Family>() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            F::DOMAIN,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            F::PROTOCOL,
        )
    };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// An ICMPv6 echo request, checksum left zero: the kernel computes it on a raw ICMPv6
/// socket (RFC 3542 §3.1).
pub fn echo6_request(id: u16, seq: u16) -> [u8; 16] {
    echo(128, id, seq)
}

/// An ICMPv6 message as a raw socket delivers it (no IPv6 header), from `sender`: an echo
/// reply, or `None`.
pub fn parse_reply6(sender: Ipv6Addr, icmp: &[u8]) -> Option<Echo6Reply> {
    let (id, seq) = echo_fields(129, icmp)?;
    Some(Echo6Reply {
        from: sender,
        id,
        seq,
    })
}

/// An ICMP echo request, with its checksum.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = echo(8, id, seq);
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// An echo message of type `kind` (an ICMP or ICMPv6 echo request), checksum zero.
fn echo(kind: u8, id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = kind;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    p
}

/// The id and sequence number of an echo message of type `kind` (an echo reply), from
/// its ICMP or ICMPv6 header; `None` for another type or a short header.
fn echo_fields(kind: u8, icmp: &[u8]) -> Option<(u16, u16)> {
    let header = icmp.get(..8)?;
    (header[0] == kind).then(|| {
        (
            u16::from_be_bytes([header[4], header[5]]),
            u16::from_be_bytes([header[6], header[7]]),
        )
    })
}

/// An IPv4 packet carrying an ICMP echo reply, as a raw socket delivers it.
pub fn parse_reply(packet: &[u8]) -> Option<EchoReply> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    let (id, seq) = echo_fields(0, packet.get(header..)?)?;
    Some(EchoReply {
        from: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        id,
        seq,
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
