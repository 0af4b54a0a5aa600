//! Offloads end to end (issue 9): agents whose TAPs hand over 64 KiB super-frames with a
//! virtio-net header, and peers that take them as they are or get them segmented.
//!
//! - With offloads on: 64 MiB TCP over IPv4 and IPv6 at MTU 1500 and 9000, SHA-256 matching, and
//!   the frames on the ring really larger than the MTU (super-frames went through as-is).
//! - A mixed segment: two kernel agents with offloads and one `ivnet stack` peer: kernel to
//!   kernel, kernel to stack and stack to kernel streams intact, nothing larger than the stack's
//!   MTU reaching it (its rings count no size or offload drops), broadcast reaching everyone.
//! - `--offload off` beside `--offload auto`: TCP both ways intact, the "off" side getting only
//!   MTU-sized frames.
//! - UDP datagrams larger than the MTU (IP fragments) and UDP GSO (USO) super-frames arrive
//!   intact, at a peer with offloads and at one without (USO is cut into datagrams for both).
//! - Members with `--trust-peer-checksums` get frames with partial checksums (USO whole), the
//!   others complete ones; TCP between every kind of pair intact; with only trusting members,
//!   frames read straight into the ring arrive intact.
//!
//! Needs root and /dev/net/tun; without them each test prints `SKIP ...` (or fails when
//! `IVNET_REQUIRE_PRIVILEGED_TESTS=1`). The heavy tests are serialised by a file-local mutex.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static HEAVY: Mutex<()> = Mutex::new(());

const TRANSFER: u64 = 64 << 20;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

/// IPv6 address of member `i` (beside [`Lab::addr`]'s IPv4 one).
fn addr6(i: usize) -> String {
    format!("fd77::{}", i + 1)
}

/// A lab of `flags.len()` members, member `i` started with `flags[i]` plus an IPv6 address;
/// duplicate address detection is off so IPv6 works at once.
fn lab(flags: &[&[&str]]) -> Lab {
    let mut lab = Lab::new(flags.len());
    for ns in &lab.ns {
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
    }
    for (i, f) in flags.iter().enumerate() {
        let v6 = format!("{}/64", addr6(i));
        let mut extra = vec!["--address", &v6];
        extra.extend_from_slice(f);
        lab.start(i, &extra);
    }
    for i in 1..flags.len() {
        lab.wait_reachable(0, i, STEP);
        lab.wait_reachable(i, 0, STEP);
    }
    lab
}

/// The `offloads` a member announced in the peer table, as `status` shows them.
fn offloads_of(st: &serde_json::Value, id: u32) -> String {
    peer(st, id).and_then(|p| p["offloads"].as_str()).unwrap_or("?").to_string()
}

/// Moves 64 MiB from member `from` to member `to` over TCP to `to_addr` and checks the digests.
fn transfer(lab: &Lab, from: usize, to: usize, to_addr: &str, port: u16, seed: u64) {
    let (sent, received, took) =
        tcp_transfer(&lab.ns[to], &lab.ns[from], to_addr, port, TRANSFER, seed, TRANSFER_TIMEOUT);
    assert_eq!(received.bytes, TRANSFER, "{from} -> {to_addr}: byte count");
    assert_eq!(hex(&sent.sha256), hex(&received.sha256), "{from} -> {to_addr}: SHA-256 differs");
    report(&format!(
        "  {from} -> {to_addr}: 64 MiB in {:.2} s ({:.0} Mbit/s)",
        took.as_secs_f64(),
        TRANSFER as f64 * 8.0 / took.as_secs_f64() / 1e6
    ));
}

/// Frames and bytes (frames at least 1) that `run` made member `src` queue on ring `src -> dst`.
fn ring_traffic(lab: &Lab, src: u32, dst: u32, run: impl FnOnce()) -> (u64, u64) {
    let before = lab.status();
    run();
    let after = lab.status();
    let delta = |f: &str| ring_counter(&after, src, dst, f) - ring_counter(&before, src, dst, f);
    (delta("tx_frames").max(1), delta("tx_bytes"))
}

/// Flags of a member that trusts its peers' checksums.
const TRUST: &[&str] = &["--offload", "on", "--trust-peer-checksums"];

/// Asserts that nothing on ring `src -> dst` was dropped for size, offload metadata or
/// corruption.
fn assert_ring_clean(st: &serde_json::Value, src: u32, dst: u32) {
    for field in ["rx_drop_size", "rx_drop_offload", "rx_corrupt", "tx_drop_mtu"] {
        assert_eq!(ring_counter(st, src, dst, field), 0, "ring {src}->{dst} {field}: {st:#}");
    }
}

fn tcp_v4_and_v6_with_offloads(test: &str, mtu: u32) {
    if !require_root(test) {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let m = mtu.to_string();
    let flags: &[&str] = &["--offload", "on", "--mtu", &m];
    let lab = lab(&[flags, flags]);
    let st = lab.status();
    for id in [0, 1] {
        let o = offloads_of(&st, id);
        assert!(o.contains("csum") && o.contains("tso4") && o.contains("tso6"), "peer {id}: {o}");
    }
    report(&format!("{test}:"));
    transfer(&lab, 0, 1, &Lab::addr(1), 5201, 0x0ff1);
    transfer(&lab, 0, 1, &format!("[{}]", addr6(1)), 5202, 0x0ff2);
    let st = lab.status();
    assert_ring_clean(&st, 0, 1);
    assert_ring_clean(&st, 1, 0);
    // The bulk crossed the ring as super-frames, not as MTU-sized frames.
    let frames = ring_counter(&st, 0, 1, "tx_frames").max(1);
    let bytes = ring_counter(&st, 0, 1, "tx_bytes");
    assert!(
        bytes / frames > u64::from(mtu) + 18,
        "average frame on ring 0->1 is {} bytes, not above the MTU {mtu}: {st:#}",
        bytes / frames
    );
}

#[test]
fn offload_tcp_ipv4_ipv6_mtu_1500() {
    tcp_v4_and_v6_with_offloads("offload_tcp_ipv4_ipv6_mtu_1500", 1500);
}

#[test]
fn offload_tcp_ipv4_ipv6_mtu_9000() {
    tcp_v4_and_v6_with_offloads("offload_tcp_ipv4_ipv6_mtu_9000", 9000);
}

#[test]
fn offload_off_beside_auto_tcp_both_ways() {
    if !require_root("offload_off_beside_auto_tcp_both_ways") {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab(&[&["--offload", "off"], &["--offload", "auto"]]);
    let st = lab.status();
    assert_eq!(offloads_of(&st, 0), "none");
    assert!(offloads_of(&st, 1).contains("tso4"), "{st:#}");
    report("offload_off_beside_auto_tcp_both_ways:");
    transfer(&lab, 0, 1, &Lab::addr(1), 5201, 0x0ff3);
    transfer(&lab, 1, 0, &Lab::addr(0), 5202, 0x0ff4);
    transfer(&lab, 1, 0, &format!("[{}]", addr6(0)), 5203, 0x0ff5);
    let st = lab.status();
    assert_ring_clean(&st, 0, 1);
    assert_ring_clean(&st, 1, 0);
    // The "off" member got only frames it can take: member 1 segmented its super-frames.
    let frames = ring_counter(&st, 1, 0, "tx_frames").max(1);
    let bytes = ring_counter(&st, 1, 0, "tx_bytes");
    assert!(bytes / frames <= 1518, "average frame to the off member: {} bytes", bytes / frames);
    assert!(frames > TRANSFER / 1500, "too few frames for two segmented transfers: {frames}");
}

#[test]
fn offload_mixed_segment_with_a_stack_peer() {
    let test = "offload_mixed_segment_with_a_stack_peer";
    if !require_root(test) {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab(&[&["--offload", "on"], &["--offload", "on"]]);
    for ns in &lab.ns {
        assert!(ns.sysctl("net.ipv4.icmp_echo_ignore_broadcasts", "0"));
    }
    let shm = lab.shm.path.to_str().expect("UTF-8 path").to_string();
    let bin = std::path::Path::new(IVNET);
    let stack_ip = "10.77.0.3";
    let stack = |tool: &[&str]| {
        let mut args = vec!["--shm", &shm, "--peer-id", "2", "--ip", "10.77.0.3/24"];
        args.extend_from_slice(tool);
        StackProc::spawn(bin, None, &lab.dir, &args)
    };
    report(&format!("{test}:"));

    // Kernel -> kernel, with a stack peer on the segment.
    let mut echo = stack(&["echo", "--udp", "7"]);
    echo.wait_line("announcing the echo server", STEP, |l| l.starts_with("echo server on"));
    wait_until("member 0 reaches the stack", STEP, || {
        ping_once(&lab.ns[0], stack_ip, Duration::from_millis(500))
    });
    transfer(&lab, 0, 1, &Lab::addr(1), 5201, 0x0ff6);

    // Broadcast from a kernel member reaches the other kernel and the stack.
    let before = lab.status();
    let out = run_with_timeout(
        &mut lab.ns[0].command(&["ping", "-b", "-c", "3", "-i", "0.2", "-W", "1", "10.77.0.255"]),
        STEP,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bytes from"),
        "no reply to a broadcast ping: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = lab.status();
    for dst in [1, 2] {
        let got =
            ring_counter(&after, 0, dst, "rx_frames") - ring_counter(&before, 0, dst, "rx_frames");
        assert!(got >= 3, "broadcast frames delivered to member {dst}: {got}");
    }
    echo.terminate();

    // Kernel -> stack: the kernel hands over super-frames; the stack takes only plain frames.
    let t = Instant::now();
    // The sender retries its connect until the stack has joined and listens.
    let receiver = stack(&["recv", "--tcp", "5001"]);
    let sent = kernel_tcp_send(
        &lab.ns[0],
        format!("{stack_ip}:5001").parse().expect("addr"),
        TRANSFER,
        0x0ff7,
        STEP,
    )
    .join(TRANSFER_TIMEOUT);
    let (st, out, log) = receiver.wait_exit(STEP);
    assert!(st.success(), "stack recv failed: {st}\n{out}\n{log}");
    let line = out.lines().find(|l| l.starts_with("received ")).expect("a result line");
    assert_eq!(bytes_field(line), TRANSFER, "{line}");
    assert_eq!(sha_field(line), hex(&sent.sha256), "{line}");
    report(&format!("  kernel -> stack: 64 MiB in {:.2} s", t.elapsed().as_secs_f64()));
    // Everything the stack got fitted its MTU (its rings count no size or offload drops) and
    // came as MTU-sized frames: the kernel's super-frames were segmented for it. (Counters of a
    // ring into the stack start again with each stack process, so look now.)
    let st = lab.status();
    assert_ring_clean(&st, 0, 2);
    let frames = ring_counter(&st, 0, 2, "rx_frames");
    assert!(
        frames > TRANSFER / 1500,
        "{frames} frames to the stack: too few for a segmented stream"
    );
    assert_eq!(offloads_of(&st, 2), "none");

    // Stack -> kernel.
    let t = Instant::now();
    let addr: SocketAddr = format!("{}:5002", Lab::addr(1)).parse().expect("addr");
    let receiver = tcp_receiver(&lab.ns[1], addr, Instant::now() + TRANSFER_TIMEOUT);
    let (st, out, log) = stack(&["send", &addr.to_string(), "--bytes", "64M", "--seed", "4083"])
        .wait_exit(TRANSFER_TIMEOUT);
    assert!(st.success(), "stack send failed: {st}\n{out}\n{log}");
    let got = receiver.join(STEP);
    let line = out.lines().find(|l| l.starts_with("sent ")).expect("a result line");
    assert_eq!(got.bytes, TRANSFER, "{line}");
    assert_eq!(sha_field(line), hex(&got.sha256), "{line}");
    report(&format!("  stack -> kernel: 64 MiB in {:.2} s", t.elapsed().as_secs_f64()));

    let st = lab.status();
    for (src, dst) in [(0, 1), (1, 0), (1, 2), (2, 0), (2, 1)] {
        assert_ring_clean(&st, src, dst);
    }
}

/// `setsockopt(SOL_UDP, UDP_SEGMENT)`: the kernel cuts each send into datagrams of `size` bytes
/// and hands them to the TAP as one USO super-frame.
fn set_udp_segment(sock: &UdpSocket, size: u16) {
    const SOL_UDP: libc::c_int = 17;
    const UDP_SEGMENT: libc::c_int = 103;
    let v = libc::c_int::from(size);
    // SAFETY: setsockopt reads one int from a live local.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            SOL_UDP,
            UDP_SEGMENT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
}

/// A receive buffer large enough for a whole run (`SO_RCVBUFFORCE`, as root), so that a slow
/// (debug build) receiver loses nothing to its own socket buffer.
fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt reads one int from a live local.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// Datagram `i` of a run: a 4-byte index then bytes derived from it.
fn datagram(i: u32, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    d[..4].copy_from_slice(&i.to_be_bytes());
    PseudoRandom::new(u64::from(i) + 77).fill(&mut d[4..]);
    d
}

/// Sends `count` datagrams of `len` bytes from member `from` to `to_addr:port` (with USO
/// segments of `uso` bytes when given: then each send carries several datagrams) and checks
/// that the receiver in member `to` gets every one intact.
fn udp_run(
    lab: &Lab,
    from: usize,
    to: usize,
    to_addr: &str,
    port: u16,
    len: usize,
    uso: Option<u16>,
) {
    let count: u32 = 200;
    let addr: SocketAddr = format!("{to_addr}:{port}").parse().expect("addr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (seg_len, expected) = match uso {
        Some(s) => (usize::from(s), count as usize * len / usize::from(s)),
        None => (len, count as usize),
    };
    let receiver = in_netns(&lab.ns[to], "UDP receiver", move || {
        let s = UdpSocket::bind(addr).expect("bind");
        set_rcvbuf(&s, 16 << 20);
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while got.len() < expected {
            match s.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        got
    });
    ready_rx.recv_timeout(STEP).expect("receiver bound");
    let sender = in_netns(&lab.ns[from], "UDP sender", move || {
        let any = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let s = UdpSocket::bind(any).expect("bind");
        if let Some(size) = uso {
            set_udp_segment(&s, size);
        }
        let per_send = if uso.is_some() { len / seg_len } else { 1 };
        let mut i = 0u32;
        while (i as usize) < expected {
            let mut buf = Vec::with_capacity(len);
            for k in 0..per_send as u32 {
                buf.extend_from_slice(&datagram(i + k, seg_len));
            }
            s.send_to(&buf, addr).expect("send");
            i += per_send as u32;
            // Pacing, not synchronisation: keep the receiver's socket buffer from overflowing.
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    sender.join(STEP);
    let got = receiver.join(STEP);
    assert_eq!(
        got.len(),
        expected,
        "{from} -> {to_addr}: datagrams received (len {len}, uso {uso:?})"
    );
    for d in &got {
        assert_eq!(d.len(), seg_len, "datagram length");
        let i = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        assert!(d == &datagram(i, seg_len), "datagram {i} differs");
    }
}

#[test]
fn offload_udp_larger_than_the_mtu_arrives_intact() {
    let test = "offload_udp_larger_than_the_mtu_arrives_intact";
    if !require_root(test) {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // Member 0 sends; member 1 takes offloaded (TCP) frames, member 2 does not.
    let lab = lab(&[&["--offload", "on"], &["--offload", "on"], &["--offload", "off"]]);
    for to in [1, 2] {
        // IP fragments: 8000-byte datagrams at MTU 1500.
        udp_run(&lab, 0, to, &Lab::addr(to), 6000 + to as u16, 8000, None);
        udp_run(&lab, 0, to, &format!("[{}]", addr6(to)), 6100 + to as u16, 8000, None);
        // UDP GSO: 14 datagrams of 1400 bytes per send, one USO super-frame each.
        let (frames, bytes) = ring_traffic(&lab, 0, to as u32, || {
            udp_run(&lab, 0, to, &Lab::addr(to), 6200 + to as u16, 19600, Some(1400));
            udp_run(&lab, 0, to, &format!("[{}]", addr6(to)), 6300 + to as u16, 19600, Some(1400));
        });
        // A USO super-frame can only reach a TAP with a partial checksum, and none crosses the
        // ring with one to a peer that does not trust ours (none here does): the sender cuts it
        // into complete datagrams for every peer.
        assert!(bytes / frames <= 1518, "USO to member {to}: {frames} frames, {bytes} bytes");
        assert!(frames >= 2 * 2800, "USO to member {to}: only {frames} frames");
    }
    let st = lab.status();
    for dst in [1, 2] {
        assert_ring_clean(&st, 0, dst);
    }
    let o = offloads_of(&st, 0);
    report(&format!("{test}: sender offloads {o}"));
}

#[test]
fn offload_trusting_peers_take_partial_checksums_and_the_rest_complete_ones() {
    let test = "offload_trusting_peers_take_partial_checksums_and_the_rest_complete_ones";
    if !require_root(test) {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // Members 0 and 1 trust each other's checksums; member 2 (offloads on) does not.
    let lab = lab(&[TRUST, TRUST, &["--offload", "on"]]);
    let st = lab.status();
    for id in [0, 1] {
        assert!(offloads_of(&st, id).contains("trust_csum"), "peer {id}: {st:#}");
    }
    assert!(!offloads_of(&st, 2).contains("trust_csum"), "{st:#}");
    report(&format!("{test}:"));
    // Between the trusting members, and each way between a trusting one and the other.
    transfer(&lab, 0, 1, &Lab::addr(1), 5201, 0x7001);
    transfer(&lab, 1, 0, &format!("[{}]", addr6(0)), 5202, 0x7002);
    transfer(&lab, 0, 2, &Lab::addr(2), 5203, 0x7003);
    transfer(&lab, 2, 0, &format!("[{}]", addr6(0)), 5204, 0x7004);
    // A USO super-frame keeps its partial checksum: it crosses whole only to a trusting peer.
    for to in [1, 2] {
        let (frames, bytes) = ring_traffic(&lab, 0, to as u32, || {
            udp_run(&lab, 0, to, &Lab::addr(to), 6400 + to as u16, 19600, Some(1400));
        });
        let whole = bytes / frames > 1518;
        assert_eq!(whole, to == 1, "USO to member {to}: {frames} frames, {bytes} bytes");
    }
    let st = lab.status();
    for (src, dst) in [(0, 1), (1, 0), (0, 2), (2, 0)] {
        assert_ring_clean(&st, src, dst);
    }
}

#[test]
fn offload_two_trusting_peers_read_frames_straight_into_the_ring() {
    let test = "offload_two_trusting_peers_read_frames_straight_into_the_ring";
    if !require_root(test) {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // Every peer trusts: super-frames are read from the TAP straight into the ring, header and
    // all (the data path's unit tests count those reads; here the real TAP's readv does it).
    let lab = lab(&[TRUST, TRUST]);
    report(&format!("{test}:"));
    transfer(&lab, 0, 1, &Lab::addr(1), 5201, 0x7101);
    transfer(&lab, 1, 0, &format!("[{}]", addr6(0)), 5202, 0x7102);
    udp_run(&lab, 0, 1, &Lab::addr(1), 6501, 19600, Some(1400));
    let st = lab.status();
    assert_ring_clean(&st, 0, 1);
    assert_ring_clean(&st, 1, 0);
    let frames = ring_counter(&st, 0, 1, "tx_frames").max(1);
    let bytes = ring_counter(&st, 0, 1, "tx_bytes");
    assert!(bytes / frames > 1518, "average frame on ring 0->1: {} bytes", bytes / frames);
}
