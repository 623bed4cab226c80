//! The userspace device's segmentation offloads against the real kernel: bulk TCP through
//! two devices on a veth arrives intact (so every checksum the offloads write is right, or
//! TCP would stall), the kernel really hands over and takes back 64 KB at a time, Debian's
//! wireguard-go (no offloads) interoperates both ways, and `off` still works.
//!
//! Each device runs on a runtime whose worker threads live in its namespace, so sockets it
//! opens later land there too.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gotatun::packet::Packet;
use gotatun::udp::{UdpSend, UdpTransportFactory, UdpTransportFactoryParams};
use std::os::fd::{AsFd, AsRawFd};
use trellis_dataplane::netns::{self, OwnedNetns};
use trellis_dataplane::wireguard::offload::udp::{GsoUdpFactory, GsoUdpSend};
use trellis_dataplane::wireguard::offload::{Counters, Granted, OffloadMode, Usage};
use trellis_dataplane::wireguard::userspace::UserspaceDevice;
use trellis_dataplane::wireguard::{PeerConfig, WireGuardDevice};
use trellis_model::PublicKey;
use trellis_testkit::netns::{ip, scratch_netns};
use x25519_dalek::{PublicKey as X25519Public, StaticSecret};

const PORT: u16 = 51820;
/// Enough for thousands of full-size segments each way, small enough for a debug build.
const BYTES: usize = 24 << 20;

/// Two namespaces on one veth, 198.19.9.1 and .2.
struct Pair {
    a: OwnedNetns,
    b: OwnedNetns,
}

impl Pair {
    fn new(tag: &str) -> Self {
        let a = scratch_netns(&format!("{tag}a"));
        let b = scratch_netns(&format!("{tag}b"));
        ip(&[
            "-n",
            a.name(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ]);
        for (ns, addr) in [(&a, "198.19.9.1/24"), (&b, "198.19.9.2/24")] {
            ip(&["-n", ns.name(), "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", ns.name(), "link", "set", "eth0", "up"]);
            ip(&["-n", ns.name(), "link", "set", "lo", "up"]);
        }
        Pair { a, b }
    }
}

impl Drop for Pair {
    /// A namespace outlives its deletion while a process (wireguard-go) is inside.
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            for pid in netns::pids_in(ns.name()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A device and the runtime that drives it, both inside one namespace.
struct Side {
    runtime: tokio::runtime::Runtime,
    device: Arc<UserspaceDevice>,
    public: PublicKey,
    netns: String,
}

impl Side {
    fn start(ns: &OwnedNetns, interface: &str, overlay: &str, mode: OffloadMode) -> Side {
        let interface = interface.to_string();
        let (runtime, device, public) = netns::run_in(ns.name(), move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let secret = StaticSecret::random();
            let public = PublicKey(X25519Public::from(&secret).to_bytes());
            let device = runtime
                .block_on(UserspaceDevice::create(&interface, secret, PORT, mode))
                .expect("creating the userspace device");
            (runtime, Arc::new(device), public)
        })
        .unwrap();
        let name = device.name().to_string();
        ip(&["-n", ns.name(), "addr", "add", overlay, "dev", &name]);
        ip(&["-n", ns.name(), "link", "set", &name, "mtu", "1420", "up"]);
        Side {
            runtime,
            device,
            public,
            netns: ns.name().to_string(),
        }
    }

    fn granted(&self) -> Granted {
        self.device
            .offloads()
            .expect("a userspace device reports")
            .granted
    }

    fn usage(&self) -> Usage {
        self.device
            .offloads()
            .expect("a userspace device reports")
            .usage
    }

    fn add_address(&self, address: &str) {
        let name = self.device.name().to_string();
        ip(&[
            "-n",
            &self.netns,
            "addr",
            "add",
            address,
            "dev",
            &name,
            "nodad",
        ]);
    }

    fn add_peer(&self, key: PublicKey, endpoint: &str, allowed: &[&str]) {
        let peer = PeerConfig {
            public_key: key,
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            persistent_keepalive: None,
        };
        let device = Arc::clone(&self.device);
        // Spawned, not blocked on: the future must run on the namespace's threads.
        self.runtime
            .block_on(
                self.runtime
                    .spawn(async move { device.upsert_peer(&peer).await }),
            )
            .unwrap()
            .expect("adding the peer");
    }
}

/// Deterministic bytes, so the receiver can check every one.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Sends `BYTES` over TCP from namespace `from` to `to_addr` (a listener in namespace
/// `to`), and returns how many arrived intact.
fn transfer(from: &str, to: &str, to_addr: &str) -> usize {
    let addr: SocketAddr = format!("{to_addr}:5201")
        .parse()
        .expect("an address, IPv6 in brackets");
    let listener = netns::run_in(to, move || TcpListener::bind(addr).unwrap()).unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buffer = vec![0u8; 1 << 16];
        let (mut seen, mut intact) = (0usize, 0usize);
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return intact,
                Ok(n) => {
                    for (k, byte) in buffer[..n].iter().enumerate() {
                        if *byte == pattern(seen + k) {
                            intact += 1;
                        }
                    }
                    seen += n;
                }
            }
        }
    });
    netns::run_in(from, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .expect("connecting through the tunnel");
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let data: Vec<u8> = (0..BYTES).map(pattern).collect();
        stream.write_all(&data).expect("sending through the tunnel");
    })
    .unwrap();
    receiver.join().unwrap()
}

/// A unique interface name: userspace devices share /var/run/wireguard machine-wide.
fn interface(tag: &str) -> String {
    format!("trt{}{tag}", std::process::id() % 100_000)
}

#[test]
fn bulk_tcp_through_two_offloading_devices_arrives_intact_in_64k_pieces() {
    let pair = Pair::new("ofl");
    let a = Side::start(&pair.a, &interface("a"), "10.77.0.1/24", OffloadMode::Auto);
    let b = Side::start(&pair.b, &interface("b"), "10.77.0.2/24", OffloadMode::Auto);
    a.add_address("fd77::1/64");
    b.add_address("fd77::2/64");
    a.add_peer(
        b.public,
        "198.19.9.2:51820",
        &["10.77.0.2/32", "fd77::2/128"],
    );
    b.add_peer(
        a.public,
        "198.19.9.1:51820",
        &["10.77.0.1/32", "fd77::1/128"],
    );
    assert!(a.granted().tso, "this kernel grants TSO on TUN");

    assert_eq!(transfer(pair.a.name(), pair.b.name(), "10.77.0.2"), BYTES);
    assert_eq!(transfer(pair.b.name(), pair.a.name(), "10.77.0.1"), BYTES);
    // TSO6 on read, TCPv6 coalescing on write.
    let (sent, received) = (a.usage(), b.usage());
    assert_eq!(transfer(pair.a.name(), pair.b.name(), "[fd77::2]"), BYTES);
    assert!(a.usage().tun_super_reads > sent.tun_super_reads);
    assert!(b.usage().tun_coalesced_writes > received.tun_coalesced_writes);

    for (side, name) in [(&a, "a"), (&b, "b")] {
        let usage = side.usage();
        assert!(
            usage.tun_super_reads > 0 && usage.tun_packets_read > 4 * usage.tun_super_reads,
            "{name}: the kernel hands over whole TCP sends: {usage:?}"
        );
        assert!(
            usage.tun_coalesced_writes > 0
                && usage.tun_packets_written > 2 * usage.tun_coalesced_writes,
            "{name}: decrypted runs are written coalesced: {usage:?}"
        );
        assert!(
            usage.udp_segmented_sends > 0
                && usage.udp_segmented_datagrams > 4 * usage.udp_segmented_sends,
            "{name}: encrypted runs leave as one segmented send: {usage:?}"
        );
    }
}

/// UDP sent with `UDP_SEGMENT` by an application reaches the device as one USO read, is
/// cut, encrypted and sent as a run, and on the far side is written back coalesced: every
/// datagram that arrives is whole and intact.
#[test]
fn udp_sent_in_runs_arrives_whole_and_is_written_coalesced() {
    const SIZE: usize = 1200;
    const PER_SEND: usize = 40;
    const SENDS: usize = 200;
    let pair = Pair::new("ofu");
    let a = Side::start(&pair.a, &interface("u"), "10.77.0.1/24", OffloadMode::Auto);
    let b = Side::start(&pair.b, &interface("v"), "10.77.0.2/24", OffloadMode::Auto);
    a.add_peer(b.public, "198.19.9.2:51820", &["10.77.0.2/32"]);
    b.add_peer(a.public, "198.19.9.1:51820", &["10.77.0.1/32"]);
    assert!(a.granted().uso, "this kernel grants USO on TUN");
    // A first exchange brings the session up, so the runs below are not queued behind a
    // handshake.
    assert_eq!(transfer(pair.a.name(), pair.b.name(), "10.77.0.2"), BYTES);
    let (sent, received) = (a.usage(), b.usage());

    let receiver = netns::run_in(pair.b.name(), || {
        std::net::UdpSocket::bind("10.77.0.2:7000").unwrap()
    })
    .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let counting = std::thread::spawn(move || {
        let (mut whole, mut broken) = (0usize, 0usize);
        let mut buffer = [0u8; 2048];
        while let Ok(n) = receiver.recv(&mut buffer) {
            let index = u32::from_be_bytes(buffer[..4].try_into().unwrap()) as usize;
            let intact = n == SIZE && (4..SIZE).all(|k| buffer[k] == pattern(index * SIZE + k));
            if intact { whole += 1 } else { broken += 1 }
        }
        (whole, broken)
    });
    netns::run_in(pair.a.name(), || {
        let socket = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
        let size = SIZE as libc::c_int;
        let rc = unsafe {
            libc::setsockopt(
                socket.as_fd().as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT on the application's socket");
        for send in 0..SENDS {
            let mut buffer = Vec::with_capacity(SIZE * PER_SEND);
            for d in 0..PER_SEND {
                let index = send * PER_SEND + d;
                buffer.extend_from_slice(&(index as u32).to_be_bytes());
                buffer.extend((4..SIZE).map(|k| pattern(index * SIZE + k)));
            }
            socket.send_to(&buffer, "10.77.0.2:7000").unwrap();
            // Paced a little: UDP has no congestion control, and a burst past the
            // receiver's buffers would only measure the drops.
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();
    let (whole, broken) = counting.join().unwrap();
    assert_eq!(broken, 0, "no datagram arrives damaged or cut");
    assert!(
        whole >= SENDS * PER_SEND / 2,
        "{whole} of {} datagrams arrived",
        SENDS * PER_SEND
    );
    assert!(
        a.usage().tun_super_reads > sent.tun_super_reads,
        "USO reads"
    );
    assert!(a.usage().udp_segmented_sends > sent.udp_segmented_sends);
    assert!(
        b.usage().tun_coalesced_writes > received.tun_coalesced_writes,
        "decrypted UDP runs are written coalesced: {:?} → {:?}",
        received,
        b.usage()
    );
}

#[test]
fn offloads_off_moves_the_same_bytes_one_packet_at_a_time() {
    let pair = Pair::new("ofo");
    let a = Side::start(&pair.a, &interface("c"), "10.77.0.1/24", OffloadMode::Off);
    let b = Side::start(&pair.b, &interface("d"), "10.77.0.2/24", OffloadMode::Auto);
    a.add_peer(b.public, "198.19.9.2:51820", &["10.77.0.2/32"]);
    b.add_peer(a.public, "198.19.9.1:51820", &["10.77.0.1/32"]);

    assert_eq!(transfer(pair.a.name(), pair.b.name(), "10.77.0.2"), BYTES);
    assert_eq!(transfer(pair.b.name(), pair.a.name(), "10.77.0.1"), BYTES);

    let usage = a.usage();
    assert_eq!(a.granted(), Default::default());
    assert_eq!(usage.tun_super_reads, 0, "{usage:?}");
    assert_eq!(usage.tun_coalesced_writes, 0, "{usage:?}");
    assert_eq!(usage.udp_segmented_sends, 0, "{usage:?}");
    assert!(usage.tun_packets_read > 0 && usage.tun_packets_written > 0);
}

/// Debian's wireguard-go reads and writes one packet per call and receives without
/// `UDP_GRO`: our segmented sends must reach it as plain datagrams and its packets must
/// coalesce on our side.
#[test]
fn wireguard_go_exchanges_bulk_tcp_with_an_offloading_device() {
    let pair = Pair::new("ofg");
    let a = Side::start(&pair.a, &interface("e"), "10.77.0.1/24", OffloadMode::Auto);
    let go = interface("g");
    let socket = format!("/var/run/wireguard/{go}.sock");
    let _cleanup = RemoveOnDrop(socket);
    let started = Command::new("ip")
        .args(["netns", "exec", pair.b.name(), "wireguard-go", &go])
        .status()
        .expect("running wireguard-go");
    assert!(started.success(), "wireguard-go starts");
    let secret = StaticSecret::random();
    let public = PublicKey(X25519Public::from(&secret).to_bytes());
    let key_file = std::env::temp_dir().join(format!("trt-{go}.key"));
    std::fs::write(&key_file, base64_key(&secret.to_bytes())).unwrap();
    let _key_cleanup = RemoveOnDrop(key_file.display().to_string());
    let set = Command::new("ip")
        .args([
            "netns",
            "exec",
            pair.b.name(),
            "wg",
            "set",
            &go,
            "private-key",
        ])
        .arg(&key_file)
        .args(["listen-port", "51820", "peer", &base64_key(&a.public.0)])
        .args([
            "endpoint",
            "198.19.9.1:51820",
            "allowed-ips",
            "10.77.0.1/32",
        ])
        .status()
        .unwrap();
    assert!(set.success(), "wg set configures wireguard-go");
    ip(&[
        "-n",
        pair.b.name(),
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        &go,
    ]);
    ip(&["-n", pair.b.name(), "link", "set", &go, "mtu", "1420", "up"]);
    a.add_peer(public, "198.19.9.2:51820", &["10.77.0.2/32"]);

    assert_eq!(transfer(pair.a.name(), pair.b.name(), "10.77.0.2"), BYTES);
    assert_eq!(transfer(pair.b.name(), pair.a.name(), "10.77.0.1"), BYTES);
    let usage = a.usage();
    assert!(usage.udp_segmented_sends > 0, "{usage:?}");
    assert!(usage.tun_coalesced_writes > 0, "{usage:?}");
}

fn base64_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds a segmenting sender (as the device does) and a plain receiving socket on loopback
/// in a scratch namespace, runs `body` with them, and returns what the receiver got: each
/// datagram's length and first byte, in arrival order.
fn datagrams_through<F, Fut>(tag: &str, expected: usize, body: F) -> Vec<(usize, u8)>
where
    F: FnOnce(GsoUdpSend, SocketAddr, Arc<Counters>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let ns = scratch_netns(tag);
    ip(&["-n", ns.name(), "link", "set", "lo", "up"]);
    netns::run_in(ns.name(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        target
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let to = target.local_addr().unwrap();
        runtime.block_on(async {
            let counters = Arc::new(Counters::default());
            let mut factory = GsoUdpFactory::new(OffloadMode::Auto, Arc::clone(&counters));
            let params = UdpTransportFactoryParams {
                addr: None,
                port: 0,
                fwmark: None,
            };
            let (send, _recv) = factory.bind(&params).await.unwrap();
            assert!(send.segments(), "this kernel has UDP_SEGMENT");
            body(send, to, counters).await;
        });
        let mut seen = Vec::new();
        let mut buffer = [0u8; 2048];
        while seen.len() < expected {
            match target.recv(&mut buffer) {
                Ok(n) => seen.push((n, buffer[0])),
                Err(_) => break,
            }
        }
        seen
    })
    .unwrap()
}

fn datagram(len: usize, first: u8) -> Packet {
    let mut bytes = vec![0u8; len];
    bytes[0] = first;
    Packet::copy_from(&bytes[..])
}

/// A batch mixing lone datagrams and runs leaves in batch order: a short packet held back
/// behind a run of its own flow would look like loss to TCP.
#[test]
fn a_mixed_batch_leaves_in_order_with_its_run_as_one_send() {
    let received = datagrams_through("ofm", 5, |send, to, counters| async move {
        let mut batch = vec![
            (datagram(100, 1), to),
            (datagram(1200, 2), to),
            (datagram(1200, 3), to),
            (datagram(1200, 4), to),
            (datagram(50, 5), to),
        ];
        send.send_many_to(&mut Default::default(), &mut batch)
            .await
            .unwrap();
        let usage = counters.read();
        assert_eq!(
            (usage.udp_segmented_sends, usage.udp_segmented_datagrams),
            (1, 4),
            "the 1200-byte run and its shorter last went out as one send"
        );
    });
    assert_eq!(
        received,
        vec![(100, 1), (1200, 2), (1200, 3), (1200, 4), (50, 5)]
    );
}

/// A segmented send the kernel refuses (here: a socket told to send without UDP checksums,
/// which segmentation needs) turns segmentation off for good, and the run still leaves, one
/// datagram each.
#[test]
fn a_refused_segmented_send_falls_back_to_one_datagram_each_and_stays_off() {
    let received = datagrams_through("ofe", 8, |send, to, counters| async move {
        // SO_NO_CHECK (send without UDP checksums) makes the kernel refuse segmentation,
        // which needs them, with EINVAL.
        let one: libc::c_int = 1;
        let rc = unsafe {
            libc::setsockopt(
                send.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        for round in 0..2u8 {
            let mut run: Vec<(Packet, SocketAddr)> = (0..4)
                .map(|i| (datagram(1200, round * 4 + i), to))
                .collect();
            send.send_many_to(&mut Default::default(), &mut run)
                .await
                .expect("the run is sent after all");
            assert!(!send.segments(), "segmentation stays off after a refusal");
        }
        assert_eq!(counters.read().udp_segmented_sends, 0);
    });
    let expected: Vec<(usize, u8)> = (0..8).map(|i| (1200, i)).collect();
    assert_eq!(received, expected, "every datagram, whole and in order");
}
