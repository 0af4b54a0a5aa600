//! Unit tests of the stack over an in-memory region: two smoltcp stacks, each on its own
//! thread as it would be in its own process, talk through the rings with no root, no TAP and
//! no file. The real backends are exercised by `tests/stack_*.rs`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::*;
use crate::region::layout::Geometry;
use crate::region::{HeapMemory, PeerState};

/// A heap region of `size` bytes, or of exactly the size the geometry needs when `size` is 0.
fn region(req: GeometryRequest, size: usize) -> Region {
    let size = if size > 0 {
        size
    } else {
        req.resolve(u64::MAX).and_then(|g| g.layout()).expect("a valid test geometry").total
    };
    Region::attach(Arc::new(HeapMemory::new(size)), "test", &req).expect("a valid test region")
}

fn cfg(ip: &str) -> StackConfig {
    let mut c = StackConfig::file("unused".as_ref(), None);
    c.addresses = vec![ip.parse().expect("test CIDR")];
    c.tcp_buffer = 256 << 10;
    // Generous: a loaded CI machine must not mark a busy test peer down.
    c.link_timeout = Duration::from_secs(5);
    c
}

/// Runs `f` on its own thread with a stack on `region` (as another process would).
fn peer<T: Send + 'static>(
    region: &Region,
    cfg: StackConfig,
    f: impl FnOnce(&mut Stack) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let region = region.clone();
    thread::spawn(move || {
        let mut stack = Stack::from_region(region, &cfg, None, None, None).expect("stack joins");
        f(&mut stack)
    })
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn sha_of(line: &str) -> &str {
    line.split("sha256=").nth(1).map(str::trim).unwrap_or("")
}

/// Ping, then a TCP transfer through a ring far smaller than the TCP window, so the sender is
/// held back by a full ring over and over: every byte must still arrive, in order.
#[test]
fn test_two_stacks_ping_and_tcp_through_a_small_ring() {
    let req = GeometryRequest {
        ring_slots: Some(16),
        slot_size: Some(Geometry::min_slot_size(16, 9000)),
        mtu: Some(9000),
        ..Default::default()
    };
    let r = region(req, 0);
    let server = peer(&r, cfg("10.1.0.1/24"), |stack| {
        let mut out = Vec::new();
        let report = transfer::ReportOptions::default();
        transfer::recv(stack, 5001, 1, report, &mut out).map(|()| text(&out))
    });
    let client = peer(&r, cfg("10.1.0.2/24"), |stack| {
        let mut out = Vec::new();
        let opts = ping::PingOptions {
            count: Some(3),
            interval: Duration::from_millis(10),
            wait: Duration::from_secs(2),
            size: 56,
        };
        ping::ping(stack, "10.1.0.1".parse().expect("IP"), opts, &mut out)?;
        let target: SocketAddr = "10.1.0.1:5001".parse().expect("socket address");
        let (amount, report) = (transfer::Amount::Bytes(8 << 20), Default::default());
        transfer::send(stack, target, amount, 99, Duration::from_secs(10), report, &mut out)?;
        Ok::<_, StackError>((text(&out), stack.device.stats()))
    });
    let (sent, stats) = client.join().expect("client thread").expect("ping and send work");
    let received = server.join().expect("server thread").expect("recv works");
    assert!(sent.contains("3 packets transmitted, 3 received"), "{sent}");
    let sent_line = sent.lines().find(|l| l.starts_with("sent ")).expect("a result line");
    assert!(sent_line.starts_with("sent 8388608 bytes"), "{sent_line}");
    assert!(received.starts_with("received 8388608 bytes"), "{received}");
    assert_eq!(sha_of(sent_line), sha_of(&received));
    assert_eq!(sha_of(&received).len(), 64);
    // The generator and the digest agree with an independent computation.
    let mut data = vec![0u8; 8 << 20];
    PseudoRandom::new(99).fill(&mut data);
    use sha2::Digest;
    assert_eq!(sha_of(&received), transfer::hex(&sha2::Sha256::digest(&data)));
    assert!(stats.tx_frames > 5000, "{stats:?}");
}

/// Neighbour discovery and ICMPv6 echo between two stacks.
#[test]
fn test_ipv6_ping_between_stacks() {
    let r = region(GeometryRequest::default(), 16 << 20);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let responder = peer(&r, cfg("fd00:77::1/64"), move |stack| {
        stack.run(|_| {
            Ok(if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                Step::Done(())
            } else {
                Step::Continue(Some(Duration::from_millis(5)))
            })
        })
    });
    let pinger = peer(&r, cfg("fd00:77::2/64"), |stack| {
        let mut out = Vec::new();
        let opts = ping::PingOptions {
            count: Some(2),
            interval: Duration::from_millis(10),
            wait: Duration::from_secs(3),
            size: 100,
        };
        let target: IpAddr = "fd00:77::1".parse().expect("IP");
        ping::ping(stack, target, opts, &mut out).map(|()| text(&out))
    });
    let out = pinger.join().expect("pinger thread");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().expect("responder thread").expect("responder runs");
    let out = out.expect("IPv6 ping gets replies");
    assert!(out.contains("2 packets transmitted, 2 received"), "{out}");
    assert!(out.contains("108 bytes from fd00:77::1"), "{out}");
}

#[test]
fn test_ping_without_a_peer_fails_with_no_reply() {
    let r = region(GeometryRequest::default(), 16 << 20);
    let mut stack = Stack::from_region(r, &cfg("10.2.0.2/24"), None, None, None).expect("joins");
    let opts = ping::PingOptions {
        count: Some(2),
        interval: Duration::from_millis(10),
        wait: Duration::from_millis(100),
        size: 8,
    };
    let mut out = Vec::new();
    let e = ping::ping(&mut stack, "10.2.0.1".parse().expect("IP"), opts, &mut out).unwrap_err();
    assert!(matches!(e, StackError::NoReply { sent: 2, .. }), "{e}");
    assert!(e.to_string().contains("no reply from 10.2.0.1"), "{e}");
    assert!(text(&out).contains("2 packets transmitted, 0 received, 100% packet loss"));
}

#[test]
fn test_connect_to_nobody_times_out_with_a_clear_error() {
    let r = region(GeometryRequest::default(), 16 << 20);
    let mut stack = Stack::from_region(r, &cfg("10.3.0.2/24"), None, None, None).expect("joins");
    let target: SocketAddr = "10.3.0.1:80".parse().expect("socket address");
    let e = transfer::connect(&mut stack, target, Duration::from_millis(300), true).unwrap_err();
    assert!(matches!(e, StackError::ConnectTimeout { .. }), "{e}");
    assert!(e.to_string().starts_with("no answer from 10.3.0.1:80 within"), "{e}");
}

#[test]
fn test_bad_configuration_is_refused_before_a_slot_is_claimed() {
    let r = region(GeometryRequest::default(), 16 << 20);
    let mut c = cfg("10.4.0.2/24");
    c.addresses.clear();
    let e = Stack::from_region(r.clone(), &c, None, None, None).err().expect("refused");
    assert!(e.to_string().starts_with("--ip: give the stack an address"), "{e}");

    let mut c = cfg("10.4.0.2/24");
    c.gateways = vec!["10.5.0.1".parse().expect("IP")];
    let e = Stack::from_region(r.clone(), &c, None, None, None).err().expect("refused");
    assert!(e.to_string().contains("10.5.0.1 is not inside any --ip subnet"), "{e}");

    let mut c = cfg("10.4.0.2/24");
    c.mtu = 70_000;
    let e = Stack::from_region(r.clone(), &c, None, None, None).err().expect("refused");
    assert!(matches!(e, StackError::MtuTooLarge { mtu: 70_000, segment_mtu: 65521 }), "{e}");

    let mut c = cfg("fd00::2/64");
    c.mtu = 1000;
    let e = Stack::from_region(r.clone(), &c, None, None, None).err().expect("refused");
    assert!(e.to_string().contains("minimum of 1280"), "{e}");

    for id in 0..r.geometry().max_peers {
        assert_eq!(r.peer(id).state(), PeerState::Free, "slot {id} was claimed");
    }
}

#[test]
fn test_dropping_the_stack_leaves_the_segment() {
    let r = region(GeometryRequest::default(), 16 << 20);
    let mut c = cfg("10.6.0.2/24");
    c.peer_id = Some(3);
    let stack = Stack::from_region(r.clone(), &c, None, None, None).expect("joins");
    assert_eq!(r.peer(3).state(), PeerState::Up);
    assert_eq!(r.peer(3).snapshot().kind, PeerKind::Stack);
    assert_eq!(stack.mac(), Mac::for_peer(3));
    drop(stack);
    assert_eq!(r.peer(3).state(), PeerState::Left);
}

#[test]
fn test_link_local_address_is_modified_eui64() {
    let ll = link_local(Mac([0x02, 0x69, 0x76, 0x6e, 0x00, 0x05]));
    assert_eq!(ll.to_string(), "fe80::69:76ff:fe6e:5");
}

/// Back-pressure without loss: a sender whose ring is full holds the frame back (smoltcp keeps
/// the rest), and the held frame goes out at the start of the next round once the consumer has
/// made room, even though smoltcp itself has nothing new to send then.
#[test]
fn test_full_ring_holds_frames_back_and_loses_none() {
    use smoltcp::socket::udp;
    let req = GeometryRequest {
        ring_slots: Some(16),
        slot_size: Some(Geometry::min_slot_size(16, 9000)),
        mtu: Some(9000),
        ..Default::default()
    };
    let r = region(req, 0);
    let mut a = Stack::from_region(r.clone(), &cfg("10.7.0.1/24"), None, None, None).expect("a");
    let mut b = Stack::from_region(r.clone(), &cfg("10.7.0.2/24"), None, None, None).expect("b");
    let udp_socket = |packets: usize| {
        udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; packets],
                vec![0; packets * 1100],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; packets],
                vec![0; packets * 1100],
            ),
        )
    };
    let ha = a.sockets.add(udp_socket(256));
    let hb = b.sockets.add(udp_socket(256));
    a.sockets.get_mut::<udp::Socket>(ha).bind(1000).expect("bind");
    b.sockets.get_mut::<udp::Socket>(hb).bind(2000).expect("bind");
    let dst = smoltcp::wire::IpEndpoint::new(smoltcp::wire::IpAddress::v4(10, 7, 0, 2), 2000);
    let mut got: Vec<u16> = Vec::new();
    let drain = |b: &mut Stack, got: &mut Vec<u16>| {
        b.poll().expect("b polls");
        let s = b.sockets.get_mut::<udp::Socket>(hb);
        while let Ok((data, _)) = s.recv() {
            got.push(u16::from_be_bytes([data[0], data[1]]));
        }
    };
    // Resolve ARP first: one datagram through, both sides polling.
    a.sockets.get_mut::<udp::Socket>(ha).send_slice(&[0, 0], dst).expect("queued");
    for _ in 0..200 {
        a.poll().expect("a polls");
        drain(&mut b, &mut got);
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got, vec![0], "the first datagram arrives once ARP is resolved");
    // Now 200 more while the receiver does not poll: the 16-segment ring fills up.
    for i in 1..=200u16 {
        let mut msg = [0u8; 1000];
        msg[..2].copy_from_slice(&i.to_be_bytes());
        a.sockets.get_mut::<udp::Socket>(ha).send_slice(&msg, dst).expect("queued");
    }
    a.poll().expect("a polls");
    assert!(a.device.datapath().is_blocked(), "a frame is held back for the full ring");
    let sent = a.device.stats().tx_frames;
    drain(&mut b, &mut got);
    assert!(got.len() > 1, "the receiver found what fitted");
    // Room again: the held frame goes out at the start of a round, before smoltcp runs.
    a.device.begin_round(std::time::Instant::now());
    assert!(!a.device.datapath().is_blocked(), "the held frame was sent");
    assert_eq!(a.device.stats().tx_frames, sent, "smoltcp was not asked for a new frame");
    for _ in 0..1000 {
        if got.len() == 201 {
            break;
        }
        a.poll().expect("a polls");
        drain(&mut b, &mut got);
    }
    assert_eq!(got, (0..=200).collect::<Vec<u16>>(), "every datagram, in order, none lost");
}
