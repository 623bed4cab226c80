//! Conntrack over netlink, judged against the kernel: real flows through a DNAT rule in
//! scratch namespaces A — R — B (see `Routed`), R's table read and pruned by
//! [`Conntrack`], and the `conntrack` binary (Debian package `conntrack`) as an independent
//! reader of what R's table holds. Nothing runs in the host namespace; the namespaces
//! (`trt-*`) go away when a test ends, also when it fails.

use trellis_testkit::netns as netns_support;
use trellis_testkit::nft as nft_support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use netns_support::ip;
use nft_support::{Routed, nft};
use trellis_dataplane::conntrack::{
    Conntrack, Entry, Family, Filter, Protocol, Status, TcpState, Tuple,
};
use trellis_dataplane::netns;

/// The service port on R's address towards A, DNATed to B (UDP and TCP).
const SERVICE_PORT: u16 = 5555;
/// Another UDP service on the same address, also DNATed to B.
const OTHER_PORT: u16 = 5557;

const A6: &str = Routed::A6;
const R_A6: &str = Routed::R_A6;
const B6: &str = Routed::B6;
/// A second address of B: the endpoint a service moves to.
const B_NEW: &str = "10.91.2.3";

/// The kernel's ids of entries: what identifies them between two dumps (a timeout read a
/// moment later may be a second less).
fn ids(entries: &[Entry]) -> Vec<u32> {
    entries.iter().map(|e| e.id).collect()
}

fn addr(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr(ip), port)
}

/// The service as A sees it.
fn service(port: u16) -> SocketAddr {
    sock(Routed::R_A, port)
}

/// R's NAT: the service ports of R's address towards A lead to `udp_endpoint` (UDP
/// SERVICE_PORT) and to B (TCP SERVICE_PORT, UDP OTHER_PORT); with `ipv6`, UDP
/// SERVICE_PORT of R's IPv6 address leads to B's. Programmed with `nft`, replacing
/// whatever was there.
fn program_dnat(net: &Routed, udp_endpoint: &str, ipv6: bool) {
    let r_a = Routed::R_A;
    let b = Routed::B;
    let mut script = format!(
        "add table ip svc; flush table ip svc; \
         add chain ip svc pre {{ type nat hook prerouting priority -100; }}; \
         add rule ip svc pre ip daddr {r_a} udp dport {SERVICE_PORT} dnat to {udp_endpoint}; \
         add rule ip svc pre ip daddr {r_a} tcp dport {SERVICE_PORT} dnat to {b}; \
         add rule ip svc pre ip daddr {r_a} udp dport {OTHER_PORT} dnat to {b}; "
    );
    if ipv6 {
        script.push_str(&format!(
            "add table ip6 svc; flush table ip6 svc; \
             add chain ip6 svc pre {{ type nat hook prerouting priority -100; }}; \
             add rule ip6 svc pre ip6 daddr {R_A6} udp dport {SERVICE_PORT} dnat to {B6}; "
        ));
    }
    nft(net.r(), &[&script]);
}

fn udp_in(netns_name: &str, at: SocketAddr) -> UdpSocket {
    let socket = netns::run_in(netns_name, move || UdpSocket::bind(at))
        .expect("entering the namespace")
        .unwrap_or_else(|err| panic!("binding {at} in {netns_name}: {err}"));
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
}

/// The client sends to the service, the server gets it and answers, the client gets the
/// answer from the service address.
fn udp_round_trip(client: &UdpSocket, to: SocketAddr, server: &UdpSocket) {
    let mut buf = [0u8; 64];
    client.send_to(b"ping", to).expect("client sends");
    let (len, from) = server.recv_from(&mut buf).expect("the endpoint receives");
    assert_eq!(&buf[..len], b"ping");
    assert_eq!(from, client.local_addr().unwrap(), "not masqueraded");
    server.send_to(b"pong", from).expect("the endpoint answers");
    let (len, from) = client
        .recv_from(&mut buf)
        .expect("the client gets the answer");
    assert_eq!(&buf[..len], b"pong");
    assert_eq!(from, to, "the answer comes from the service address");
}

/// A TCP connection from A to the service, accepted in B; both ends.
fn tcp_connection(net: &Routed, to: SocketAddr) -> (TcpStream, TcpStream, TcpListener) {
    let at = sock(Routed::B, to.port());
    let listener = netns::run_in(net.b(), move || TcpListener::bind(at))
        .expect("entering B")
        .expect("listening in B");
    let client = netns::run_in(net.a(), move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
    .expect("entering A")
    .expect("connecting A to the service");
    let (server, _) = listener.accept().expect("B accepts");
    for stream in [&client, &server] {
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    (client, server, listener)
}

fn tcp_exchange(client: &mut TcpStream, server: &mut TcpStream) {
    let mut buf = [0u8; 4];
    client.write_all(b"ping").expect("client writes");
    server.read_exact(&mut buf).expect("server reads");
    server.write_all(b"pong").expect("server writes");
    client.read_exact(&mut buf).expect("client reads");
    assert_eq!(&buf, b"pong");
}

/// One line of `conntrack -L -o id`, as the binary understood the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Listed {
    protocol: String,
    original: Tuple,
    reply: Tuple,
    id: u32,
}

/// `conntrack -L -o id ARGS...` in the namespace, parsed (IPv4 unless ARGS say `-f ipv6`).
fn conntrack_list(netns_name: &str, args: &[&str]) -> Vec<Listed> {
    let output = Command::new("ip")
        .args(["netns", "exec", netns_name, "conntrack", "-L", "-o", "id"])
        .args(args)
        .output()
        .expect("running ip netns exec");
    assert!(
        output.status.success(),
        "conntrack -L {} in {netns_name} failed (is the Debian package conntrack \
         installed? scripts/test.sh installs it): {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| parse_listed(line).unwrap_or_else(|| panic!("unexpected line: {line}")))
        .collect()
}

/// `udp 17 29 src=A dst=B sport=1 dport=2 [UNREPLIED] src=B dst=A sport=2 dport=1 mark=0
/// use=1 id=123`: the first src/dst/sport/dport are the original direction, the second
/// the reply.
fn parse_listed(line: &str) -> Option<Listed> {
    let protocol = line.split_whitespace().next()?.to_owned();
    let mut values: Vec<(&str, &str)> = Vec::new();
    for token in line.split_whitespace() {
        if let Some((key, value)) = token.split_once('=') {
            values.push((key, value));
        }
    }
    let nth = |key: &str, n: usize| {
        values
            .iter()
            .filter(|(k, _)| *k == key)
            .nth(n)
            .map(|(_, v)| *v)
    };
    let tuple = |n| -> Option<Tuple> {
        Some(Tuple {
            src: nth("src", n)?.parse().ok()?,
            dst: nth("dst", n)?.parse().ok()?,
            sport: nth("sport", n)?.parse().ok()?,
            dport: nth("dport", n)?.parse().ok()?,
        })
    };
    Some(Listed {
        protocol,
        original: tuple(0)?,
        reply: tuple(1)?,
        id: nth("id", 0)?.parse().ok()?,
    })
}

/// What the binary would print for one of ours.
fn listed(entry: &Entry) -> Listed {
    Listed {
        protocol: entry.protocol.to_string(),
        original: entry.original,
        reply: entry.reply,
        id: entry.id,
    }
}

fn one<'a>(entries: &'a [Entry], what: &str, pick: impl Fn(&Entry) -> bool) -> &'a Entry {
    let found: Vec<&Entry> = entries.iter().filter(|e| pick(e)).collect();
    assert_eq!(found.len(), 1, "{what}: expected one entry in {entries:#?}");
    found[0]
}

#[test]
fn a_dump_shows_dnat_flows_with_their_tuples_as_the_conntrack_binary_does() {
    let net = Routed::new("ct-dump");
    program_dnat(&net, Routed::B, true);

    let server = udp_in(net.b(), sock(Routed::B, SERVICE_PORT));
    let server6 = udp_in(net.b(), sock(B6, SERVICE_PORT));
    let client = udp_in(net.a(), sock(Routed::A, 40001));
    let client6 = udp_in(net.a(), sock(A6, 40002));
    udp_round_trip(&client, service(SERVICE_PORT), &server);
    udp_round_trip(&client6, sock(R_A6, SERVICE_PORT), &server6);
    let (mut tcp_client, mut tcp_server, _listener) = tcp_connection(&net, service(SERVICE_PORT));
    tcp_exchange(&mut tcp_client, &mut tcp_server);

    let ct = Conntrack::connect_in(net.r()).expect("connect to R");
    let all = ct.entries(&Filter::any()).expect("dumping R's table");

    let udp = one(&all, "UDP v4 flow", |e| {
        e.protocol == Protocol::UDP && e.original.sport == 40001
    });
    assert_eq!(udp.family, Family::V4);
    assert_eq!(
        udp.original,
        Tuple {
            src: addr(Routed::A),
            dst: addr(Routed::R_A),
            sport: 40001,
            dport: SERVICE_PORT
        }
    );
    assert_eq!(
        udp.reply,
        Tuple {
            src: addr(Routed::B),
            dst: addr(Routed::A),
            sport: SERVICE_PORT,
            dport: 40001
        },
        "the reply comes from the endpoint after DNAT"
    );
    assert!(
        udp.status
            .contains(Status::CONFIRMED | Status::SEEN_REPLY | Status::DST_NAT),
        "{:#x}",
        udp.status.0
    );
    assert!(!udp.status.contains(Status::SRC_NAT));
    assert!(udp.timeout > Duration::ZERO && udp.timeout <= Duration::from_secs(180));
    assert_eq!(udp.tcp_state, None);
    assert_eq!((udp.zone, udp.mark), (0, 0));

    let tcp = one(&all, "TCP flow", |e| e.protocol == Protocol::TCP);
    assert_eq!(tcp.original.dst_addr(), service(SERVICE_PORT));
    assert_eq!(tcp.reply.src_addr(), sock(Routed::B, SERVICE_PORT));
    assert_eq!(tcp.tcp_state, Some(TcpState::ESTABLISHED));

    let udp6 = one(&all, "UDP v6 flow", |e| e.family == Family::V6);
    assert_eq!(udp6.protocol, Protocol::UDP);
    assert_eq!(udp6.original.src_addr(), sock(A6, 40002));
    assert_eq!(udp6.original.dst_addr(), sock(R_A6, SERVICE_PORT));
    assert_eq!(udp6.reply.src_addr(), sock(B6, SERVICE_PORT));
    assert_eq!(udp6.reply.dst_addr(), sock(A6, 40002));

    // The binary, asked for both families, lists the same TCP and UDP entries, ids
    // included.
    let mut theirs = conntrack_list(net.r(), &["-f", "ipv4"]);
    theirs.extend(conntrack_list(net.r(), &["-f", "ipv6"]));
    theirs.retain(|l| l.protocol == "tcp" || l.protocol == "udp");
    theirs.sort_by_key(|l| l.id);
    let mut ours: Vec<Listed> = all
        .iter()
        .filter(|e| matches!(e.protocol, Protocol::TCP | Protocol::UDP))
        .map(listed)
        .collect();
    ours.sort_by_key(|l| l.id);
    assert_eq!(ours, theirs);

    // Filters.
    let service_udp = Filter::protocol(Protocol::UDP).original_dst(service(SERVICE_PORT));
    // Entries are compared by id: a timeout read a moment later may be a second less.
    let found = ct.entries(&service_udp).expect("filtered dump");
    assert_eq!(ids(&found), [udp.id]);
    assert_eq!(found[0].original, udp.original);
    let v6 = ct
        .entries(&Filter::any().family(Family::V6))
        .expect("v6 dump");
    assert!(ids(&v6).contains(&udp6.id) && v6.iter().all(|e| e.family == Family::V6));
    let to_b = ct
        .entries(&Filter::any().reply_src_ip(addr(Routed::B)))
        .expect("dump by endpoint");
    assert_eq!(to_b.len(), 2, "the UDP and TCP v4 flows: {to_b:#?}");
    assert!(ids(&to_b).contains(&udp.id) && ids(&to_b).contains(&tcp.id));
    let tcp_only = ct
        .entries(&Filter::protocol(Protocol::TCP))
        .expect("TCP dump");
    assert_eq!(ids(&tcp_only), [tcp.id]);
    let nobody = ct
        .entries(&Filter::protocol(Protocol::UDP).original_dport(OTHER_PORT))
        .expect("empty dump");
    assert!(nobody.is_empty(), "{nobody:#?}");
}

#[test]
fn deleting_a_services_udp_entries_moves_its_clients_to_the_new_endpoint_and_nothing_else() {
    let net = Routed::new("ct-del");
    ip(&[
        "-n",
        net.b(),
        "address",
        "add",
        &format!("{B_NEW}/24"),
        "dev",
        "b0",
    ]);
    program_dnat(&net, Routed::B, false);

    let old_endpoint = udp_in(net.b(), sock(Routed::B, SERVICE_PORT));
    let new_endpoint = udp_in(net.b(), sock(B_NEW, SERVICE_PORT));
    let other_endpoint = udp_in(net.b(), sock(Routed::B, OTHER_PORT));
    let client1 = udp_in(net.a(), sock(Routed::A, 40001));
    let client2 = udp_in(net.a(), sock(Routed::A, 40002));
    let client3 = udp_in(net.a(), sock(Routed::A, 40003));
    udp_round_trip(&client1, service(SERVICE_PORT), &old_endpoint);
    udp_round_trip(&client2, service(SERVICE_PORT), &old_endpoint);
    udp_round_trip(&client3, service(OTHER_PORT), &other_endpoint);
    let (mut tcp_client, mut tcp_server, _listener) = tcp_connection(&net, service(SERVICE_PORT));
    tcp_exchange(&mut tcp_client, &mut tcp_server);

    // The service's endpoint moves; its clients' entries still lead to the old one.
    program_dnat(&net, B_NEW, false);
    udp_round_trip(&client1, service(SERVICE_PORT), &old_endpoint);

    let ct = Conntrack::connect_in(net.r()).expect("connect to R");
    let stale = Filter::protocol(Protocol::UDP).original_dst(service(SERVICE_PORT));
    let before = ct.entries(&stale).expect("dump");
    assert_eq!(before.len(), 2, "{before:#?}");
    assert_eq!(
        conntrack_list(net.r(), &["-p", "udp", "--dport", "5555"]).len(),
        2
    );

    assert_eq!(ct.delete_matching(&stale).expect("deleting"), 2);

    // The binary sees them gone, and only them.
    assert!(conntrack_list(net.r(), &["-p", "udp", "--dport", "5555"]).is_empty());
    let other = conntrack_list(net.r(), &["-p", "udp", "--dport", "5557"]);
    assert_eq!(
        other.len(),
        1,
        "the other service's entry stays: {other:#?}"
    );
    assert_eq!(other[0].original.src, addr(Routed::A));
    let tcp = conntrack_list(net.r(), &["-p", "tcp", "--dport", "5555"]);
    assert_eq!(
        tcp.len(),
        1,
        "the TCP entry of the same port stays: {tcp:#?}"
    );
    tcp_exchange(&mut tcp_client, &mut tcp_server);

    // Deleting again is fine: nothing matches any more, and an entry already gone counts
    // as deleted.
    assert_eq!(ct.delete_matching(&stale).expect("deleting again"), 0);
    assert!(!ct.delete(&before[0]).expect("deleting a gone entry"));
    assert_eq!(
        ct.delete_entries(&before).expect("deleting gone entries"),
        0
    );

    // The next packet of the same client makes a new entry, to the new endpoint.
    udp_round_trip(&client1, service(SERVICE_PORT), &new_endpoint);
    let after = ct.entries(&stale).expect("dump");
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!(after[0].reply.src, addr(B_NEW));

    // An old entry whose tuple is now used by the new one is not deleted in its place.
    let old_of_client1 = before
        .iter()
        .find(|e| e.original.sport == 40001)
        .expect("client 1's old entry");
    assert_eq!(old_of_client1.original, after[0].original);
    // The kernel's id hashes the entry's address and original tuple: when the new entry
    // reuses the old one's memory the ids are equal and nothing can tell them apart, so
    // this holds only when they differ.
    if old_of_client1.id != after[0].id {
        assert!(!ct.delete(old_of_client1).expect("deleting by id"));
        assert_eq!(ids(&ct.entries(&stale).expect("dump")), ids(&after));
    }
    assert!(ct.delete(&after[0]).expect("deleting the new entry"));
    assert!(conntrack_list(net.r(), &["-p", "udp", "--dport", "5555"]).is_empty());
}

#[test]
fn large_dumps_are_read_whole_and_their_deletes_pipelined() {
    const FLOWS: u16 = 3000;
    let net = Routed::new("ct-many");
    // A NAT chain turns connection tracking on in R.
    program_dnat(&net, Routed::B, false);
    // UDP from A to B's discard port through R, each from its own port: one entry each.
    let sent = netns::run_in(net.a(), || {
        let mut sent = 0u32;
        for n in 0..FLOWS {
            let socket = UdpSocket::bind(sock(Routed::A, 20000 + n)).expect("binding in A");
            socket.send_to(b"x", sock(Routed::B, 9)).expect("sending");
            sent += 1;
            if n % 50 == 49 {
                // Paced, so that no queue on the way drops one.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sent
    })
    .expect("entering A");
    assert_eq!(sent, u32::from(FLOWS));

    let ct = Conntrack::connect_in(net.r()).expect("connect to R");
    let discard = Filter::protocol(Protocol::UDP).original_dst(sock(Routed::B, 9));
    // Entries appear as R forwards the packets: wait until the count settles.
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let entries = ct.entries(&discard).expect("dumping");
        if entries.len() == usize::from(FLOWS) || Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let theirs = conntrack_list(net.r(), &["-p", "udp", "--dport", "9"]);
    assert_eq!(entries.len(), theirs.len(), "we and the binary see as many");
    assert!(
        entries.len() >= usize::from(FLOWS) * 9 / 10,
        "only {} of {FLOWS} flows tracked",
        entries.len()
    );
    let mut ports: Vec<u16> = entries.iter().map(|e| e.original.sport).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), entries.len(), "each entry once");

    let removed = ct.delete_matching(&discard).expect("deleting them all");
    assert_eq!(removed, entries.len());
    assert!(ct.entries(&discard).expect("dumping").is_empty());
    assert!(conntrack_list(net.r(), &["-p", "udp", "--dport", "9"]).is_empty());
}

#[test]
fn a_missing_namespace_is_named_in_the_error() {
    let name = netns_support::scratch_name("ct-missing");
    let err = Conntrack::connect_in(&name).unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn an_empty_namespace_has_an_empty_table_and_nothing_to_delete() {
    let ns = netns_support::scratch_netns("ct-empty");
    let ct = Conntrack::connect_in(ns.name())
        .expect("connect")
        .with_timeout(Duration::from_secs(2));
    assert!(ct.entries(&Filter::any()).expect("dumping").is_empty());
    assert_eq!(
        ct.delete_matching(&Filter::protocol(Protocol::UDP))
            .expect("deleting nothing"),
        0
    );
}
