//! Rules programmed over netlink, judged by what packets do: three
//! namespaces A — R — B, with R routing between them (see `Routed`).

use trellis_testkit::nft as nft_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use nft_support::{Routed, ping, ping_once, ping_works};
use trellis_dataplane::netns;
use trellis_dataplane::nftables::dsl::{self, *};
use trellis_dataplane::nftables::{
    BaseChain, Batch, ChainKind, CtState, Family, Hook, Nft, Policy,
};

const TABLE: &str = "trellis_fault";

fn forward_chain() -> Option<BaseChain> {
    Some(BaseChain {
        hook: Hook::Forward,
        priority: 0,
        kind: ChainKind::Filter,
        policy: Policy::Accept,
    })
}

#[test]
fn forward_drop_stops_forwarding_but_not_traffic_to_the_router() {
    let net = Routed::new("nft-fwd");
    assert!(
        ping_works(net.a(), Routed::B),
        "A reaches B before any rule"
    );

    let nft = Nft::connect_in(net.r()).expect("connect to R");
    let mut batch = Batch::new();
    batch
        .add_table(Family::Inet, TABLE)
        .add_chain(Family::Inet, TABLE, "forward", forward_chain())
        .add_rule(
            Family::Inet,
            TABLE,
            "forward",
            [counter(), dsl::drop()].concat(),
            Some("drop everything forwarded"),
        );
    nft.apply(&batch).expect("installing the drop rule");

    assert!(!ping_once(net.a(), Routed::B), "forwarding is dropped");
    assert!(ping_works(net.a(), Routed::R_A), "R itself still answers");
    assert!(
        ping_works(net.a(), Routed::R_B),
        "R's far address is local too"
    );

    let mut batch = Batch::new();
    batch.delete_table(Family::Inet, TABLE);
    nft.apply(&batch).expect("deleting the table");
    assert!(!nft.table_exists(Family::Inet, TABLE).expect("lookup"));
    assert!(ping_works(net.a(), Routed::B), "forwarding is back");
}

#[test]
fn ct_state_new_drop_keeps_existing_connections_and_refuses_new_ones() {
    let net = Routed::new("nft-ct");
    let nft = Nft::connect_in(net.r()).expect("connect to R");
    // Conntrack must see the connection from its first packet: a rule that
    // uses ct turns it on in R's namespace. (Started before that, the
    // connection's next packet would be tracked as "new" mid-stream.)
    let mut batch = Batch::new();
    batch
        .add_table(Family::Inet, TABLE)
        .add_chain(Family::Inet, TABLE, "forward", forward_chain())
        .add_rule(
            Family::Inet,
            TABLE,
            "forward",
            [ct_state(CtState::ESTABLISHED | CtState::RELATED), accept()].concat(),
            Some("established"),
        );
    nft.apply(&batch).expect("enabling conntrack");

    let server: SocketAddr = format!("{}:7000", Routed::B).parse().unwrap();
    let listener = netns::run_in(net.b(), move || TcpListener::bind(server))
        .expect("entering B")
        .expect("listening in B");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut client = netns::run_in(net.a(), move || {
        TcpStream::connect_timeout(&server, Duration::from_secs(2))
    })
    .expect("entering A")
    .expect("connecting A to B");
    let mut accepted = accept_within(&listener, Duration::from_secs(2));
    for stream in [&client, &accepted] {
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    exchange(&mut client, &mut accepted, b"before");

    let mut batch = Batch::new();
    batch.add_rule(
        Family::Inet,
        TABLE,
        "forward",
        [ct_state(CtState::NEW), dsl::drop()].concat(),
        Some("no new connections"),
    );
    nft.apply(&batch).expect("adding ct state new drop");

    exchange(&mut client, &mut accepted, b"after");
    let refused = netns::run_in(net.a(), move || {
        TcpStream::connect_timeout(&server, Duration::from_millis(800))
    })
    .expect("entering A");
    assert!(
        refused.is_err(),
        "a new connection must not get through: {refused:?}"
    );
    // The old one still does, in both directions.
    exchange(&mut client, &mut accepted, b"still");
}

fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return stream;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection to accept");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => panic!("accept: {err}"),
        }
    }
}

/// Sends `message` from client to server and back.
fn exchange(client: &mut TcpStream, server: &mut TcpStream, message: &[u8]) {
    let mut buf = vec![0; message.len()];
    client.write_all(message).expect("client write");
    server.read_exact(&mut buf).expect("server read");
    assert_eq!(buf, message);
    server.write_all(message).expect("server write");
    client.read_exact(&mut buf).expect("client read");
    assert_eq!(buf, message);
}

#[test]
fn numgen_random_drops_about_half() {
    let net = Routed::new("nft-numgen");
    assert!(
        ping_works(net.a(), Routed::B),
        "A reaches B before any rule"
    );
    let nft = Nft::connect_in(net.r()).expect("connect to R");
    // Only requests (coming in from A) are subject to it: with replies too,
    // the loss would be 75%.
    let mut batch = Batch::new();
    batch
        .add_table(Family::Inet, TABLE)
        .add_chain(Family::Inet, TABLE, "forward", forward_chain())
        .add_rule(
            Family::Inet,
            TABLE,
            "forward",
            [
                iifname(Routed::R_TO_A),
                numgen_random_below(100, 50),
                dsl::drop(),
            ]
            .concat(),
            Some("lose half"),
        );
    nft.apply(&batch).expect("installing numgen rule");

    let sent = 200;
    let received = ping(net.a(), Routed::B, sent, "0.005");
    let lost = f64::from(sent - received) / f64::from(sent);
    assert!(
        (0.25..=0.75).contains(&lost),
        "lost {lost:.2} of {sent} pings, expected about half"
    );
}

#[test]
fn dnat_and_masquerade_deliver_to_b_and_the_reply_returns() {
    let net = Routed::new("nft-dnat");
    let nft = Nft::connect_in(net.r()).expect("connect to R");
    let nat = |hook, priority| {
        Some(BaseChain {
            hook,
            priority,
            kind: ChainKind::Nat,
            policy: Policy::Accept,
        })
    };
    let ip = Family::Ip;
    let mut batch = Batch::new();
    batch
        .add_table(ip, "trellis_nat")
        .add_chain(ip, "trellis_nat", "prerouting", nat(Hook::Prerouting, -100))
        .add_chain(
            ip,
            "trellis_nat",
            "postrouting",
            nat(Hook::Postrouting, 100),
        )
        .add_rule(
            ip,
            "trellis_nat",
            "prerouting",
            [
                ip_daddr(Routed::R_A.parse().unwrap()),
                udp_dport(5555),
                dnat_ip(Routed::B.parse().unwrap()),
            ]
            .concat(),
            Some("service on R is served by B"),
        )
        .add_rule(
            ip,
            "trellis_nat",
            "postrouting",
            [oifname(Routed::R_TO_B), masquerade()].concat(),
            Some("B answers to R"),
        );
    nft.apply(&batch).expect("installing NAT");

    let b_socket = netns::run_in(net.b(), || UdpSocket::bind("0.0.0.0:5555"))
        .expect("entering B")
        .expect("binding in B");
    let a_socket = netns::run_in(net.a(), || UdpSocket::bind("0.0.0.0:0"))
        .expect("entering A")
        .expect("binding in A");
    for socket in [&a_socket, &b_socket] {
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    let service: SocketAddr = format!("{}:5555", Routed::R_A).parse().unwrap();
    a_socket.send_to(b"hello", service).expect("A sends");

    let mut buf = [0u8; 64];
    let (len, from) = b_socket.recv_from(&mut buf).expect("B receives");
    assert_eq!(&buf[..len], b"hello");
    assert_eq!(
        from.ip().to_string(),
        Routed::R_B,
        "masqueraded to R's address towards B"
    );
    b_socket.send_to(b"world", from).expect("B answers");

    let (len, from) = a_socket.recv_from(&mut buf).expect("A gets the reply");
    assert_eq!(&buf[..len], b"world");
    assert_eq!(from, service, "the reply comes from the address A asked");
}
