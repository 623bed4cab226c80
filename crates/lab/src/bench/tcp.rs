//! The TCP both ends of a measured stream use: a server in a pod that accepts and closes
//! connections, and a client that opens one new connection from inside a pod.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use trellis_dataplane::netns;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
pub(crate) const SERVER_PORT: u16 = 7070;

/// One new TCP connection from inside `netns_name` to `target`: whether it was accepted
/// within [`CONNECT_TIMEOUT`].
pub(crate) async fn connect_from(netns_name: &str, target: SocketAddr) -> bool {
    let Ok(Ok(fd)) = netns::run_in(netns_name, || {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: fd is a fresh, valid descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }) else {
        return false;
    };
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    matches!(
        tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await,
        Ok(Ok(_))
    )
}

/// A TCP listener on [`SERVER_PORT`] inside a pod that accepts and closes connections.
pub(crate) struct Server {
    listener: Arc<tokio::net::TcpListener>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub(crate) async fn start(netns_name: &str) -> anyhow::Result<Self> {
        // std's bind sets SO_REUSEADDR: the connections this server closed first linger in
        // TIME_WAIT on its port and must not keep the next server from binding it.
        let listener = netns::run_in(netns_name, || {
            let l =
                std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT))?;
            l.set_nonblocking(true)?;
            std::io::Result::Ok(l)
        })??;
        let listener = Arc::new(tokio::net::TcpListener::from_std(listener)?);
        let accepting = listener.clone();
        let task = tokio::spawn(async move {
            loop {
                match accepting.accept().await {
                    Ok((conn, _)) => drop(conn),
                    // Out of descriptors for a moment, or shut down by `drop`: the task is
                    // being aborted then, so waiting is all there is to do.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(Self { listener, task })
    }
}

impl Drop for Server {
    /// Stops listening now, not when the aborted task is next polled: the port is free for
    /// the next server the moment this returns.
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on a descriptor this Arc keeps open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        self.task.abort();
    }
}

/// One server per pod, started on first use and kept for the whole run, so trials never
/// bind the port again.
#[derive(Default)]
pub(crate) struct Servers {
    by_netns: BTreeMap<String, Server>,
}

impl Servers {
    /// A server runs in `netns_name`.
    pub(crate) async fn ensure(&mut self, netns_name: &str) -> anyhow::Result<()> {
        if !self.by_netns.contains_key(netns_name) {
            let server = Server::start(netns_name).await?;
            self.by_netns.insert(netns_name.to_string(), server);
        }
        Ok(())
    }
}
