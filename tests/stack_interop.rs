//! Interop between an unprivileged smoltcp stack peer and the kernel behind a root TAP agent in
//! a namespace, on one region: ARP and ping both ways (IPv4), neighbour discovery and ping both
//! ways (IPv6), 20 kernel TCP clients at once against the stack's echo server, and 64 MiB TCP
//! transfers both ways (the kernel's TCP on one end, smoltcp's on the other) with matching
//! SHA-256.
//!
//! Needs root and /dev/net/tun; without them the test prints `SKIP ...` (or fails when
//! `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const STEP: Duration = Duration::from_secs(30);
const TRANSFER: u64 = 64 << 20;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// Kernel receiver in `ns`: accepts one connection on `addr` and hashes it to the end. Returns
/// once it listens.
fn kernel_recv(ns: &Netns, addr: SocketAddr) -> NetnsTask<TransferEnd> {
    tcp_receiver(ns, addr, Instant::now() + STEP)
}

/// `n` kernel TCP clients at once, each sending `size` bytes to an echo server and checking
/// the echo.
fn kernel_echo_clients(ns: &Netns, addr: SocketAddr, n: usize, size: usize) -> NetnsTask<usize> {
    in_netns(ns, "kernel TCP echo clients", move || {
        let threads: Vec<_> = (0..n)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = connect_retry(addr, STEP);
                    let mut msg = vec![0u8; size];
                    PseudoRandom::new(1000 + i as u64).fill(&mut msg);
                    let w = s.try_clone().expect("clone stream");
                    let sender = std::thread::spawn(move || {
                        let mut w = w;
                        for chunk in msg.chunks(4096) {
                            w.write_all(chunk).expect("writing to the echo server");
                        }
                        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
                        msg
                    });
                    let mut back = Vec::with_capacity(size);
                    s.read_to_end(&mut back).expect("reading the echo");
                    let msg = sender.join().expect("sender thread");
                    back == msg
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("client thread")).filter(|&ok| ok).count()
    })
}

#[test]
fn stack_interop_with_kernel_behind_tap_agent() {
    if !require_root("stack_interop_with_kernel_behind_tap_agent") {
        return;
    }
    let t0 = Instant::now();
    let user = unprivileged_user();
    let dir = TempDir::new();
    let bin = prepare_for_user(&dir, &user);
    let region = dir.join("segment");
    let shm = region.to_str().expect("UTF-8 path").to_string();
    let ns = Netns::new();
    // Addresses usable at once (no duplicate address detection delay) on the TAP.
    let ipv6 = ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        && ns.sysctl("net.ipv6.conf.all.accept_dad", "0");

    // The unprivileged echo server creates the region; the root agent joins it.
    let mut echo = StackProc::spawn(
        &bin,
        Some(&user),
        &dir,
        &[
            "--shm",
            &shm,
            "--size",
            "64M",
            "--peer-id",
            "1",
            "--ip",
            "10.78.0.2/24",
            "--ip",
            "fd78::2/64",
            "echo",
            "--tcp",
            "7",
            "--udp",
            "7",
        ],
    );
    echo.wait_line("announcing the echo server", STEP, |l| l.starts_with("echo server on"));
    assert_eq!(proc_uids(echo.pid()).expect("running"), [user.uid; 4]);
    let mut extra = vec!["--address", "10.78.0.1/24"];
    if ipv6 {
        extra.extend(["--address", "fd78::1/64"]);
    }
    let _agent = Agent::start(&ns, &region, 0, &extra, &dir);

    // Kernel -> smoltcp: ARP, then echo replies from the stack.
    wait_until("the kernel reaches the stack", STEP, || {
        ping_once(&ns, "10.78.0.2", Duration::from_millis(500))
    });
    assert_ping(&ns, "10.78.0.2", 5);

    let stack_peer = |peer: &str, ip: &str, ip6: &str, tool: &[&str]| {
        let mut args: Vec<&str> = vec!["--shm", &shm, "--peer-id", peer, "--ip", ip];
        if ipv6 {
            args.extend(["--ip", ip6]);
        }
        args.extend_from_slice(tool);
        StackProc::spawn(&bin, Some(&user), &dir, &args)
    };

    // smoltcp -> kernel.
    let (st, out, log) = stack_peer(
        "2",
        "10.78.0.3/24",
        "fd78::3/64",
        &["ping", "10.78.0.1", "-c", "3", "-i", "0.2"],
    )
    .wait_exit(STEP);
    assert!(st.success(), "stack ping of the kernel failed: {st}\n{out}\n{log}");
    assert!(out.contains("3 packets transmitted, 3 received"), "{out}");

    if ipv6 {
        // Neighbour discovery both ways, then ICMPv6 echo.
        wait_until("the kernel reaches the stack over IPv6", STEP, || {
            ping_once(&ns, "fd78::2", Duration::from_millis(500))
        });
        assert_ping(&ns, "fd78::2", 3);
        let (st, out, log) = stack_peer(
            "2",
            "10.78.0.3/24",
            "fd78::3/64",
            &["ping", "fd78::1", "-c", "3", "-i", "0.2"],
        )
        .wait_exit(STEP);
        assert!(st.success(), "stack IPv6 ping of the kernel failed: {st}\n{out}\n{log}");
        assert!(out.contains("3 packets transmitted, 3 received"), "{out}");
        assert!(out.contains("bytes from fd78::1: icmp_seq="), "{out}");
    } else {
        report("stack_interop: IPv6 is disabled in this kernel; skipping the IPv6 part");
    }

    // The ping tools (peer 2) have left. Without doorbells the echo server notices that at
    // its next link scan; until then it counts three members up, one of them just talked to.
    // (Its frames to the agent's full ring then waited only the 2 ms head-of-line budget and
    // were dropped, and smoltcp's TCP recovers from drops slowly: echo clients timed out on a
    // busy CI machine. The data path now reads the peer table again before such a drop.) A
    // departing member is not what the echo part is about: it starts on a settled segment.
    echo.wait_log_count("peer 2 is down", if ipv6 { 2 } else { 1 }, STEP);

    // 20 kernel TCP connections at once against the smoltcp echo server.
    let ok = kernel_echo_clients(&ns, "10.78.0.2:7".parse().expect("addr"), 20, 256 << 10)
        .join(TRANSFER_TIMEOUT);
    assert_eq!(ok, 20, "echoes intact");

    // Kernel TCP -> smoltcp TCP.
    let t = Instant::now();
    let receiver = stack_peer("3", "10.78.0.4/24", "fd78::4/64", &["recv", "--tcp", "5001"]);
    let sent = kernel_tcp_send(&ns, "10.78.0.4:5001".parse().expect("addr"), TRANSFER, 11, STEP)
        .join(TRANSFER_TIMEOUT);
    let (st, out, log) = receiver.wait_exit(STEP);
    assert!(st.success(), "stack recv failed: {st}\n{out}\n{log}");
    let line = out.lines().find(|l| l.starts_with("received ")).expect("a result line");
    assert_eq!(bytes_field(line), TRANSFER, "{line}");
    assert_eq!(sha_field(line), hex(&sent.sha256), "{line}");
    report(&format!("stack_interop: kernel -> smoltcp 64 MiB in {:?}: {line}", t.elapsed()));

    // smoltcp TCP -> kernel TCP.
    let t = Instant::now();
    let receiver = kernel_recv(&ns, "10.78.0.1:5002".parse().expect("addr"));
    let (st, out, log) = stack_peer(
        "2",
        "10.78.0.3/24",
        "fd78::3/64",
        &["send", "10.78.0.1:5002", "--bytes", "64M", "--seed", "12"],
    )
    .wait_exit(TRANSFER_TIMEOUT);
    assert!(st.success(), "stack send failed: {st}\n{out}\n{log}");
    let got = receiver.join(STEP);
    let line = out.lines().find(|l| l.starts_with("sent ")).expect("a result line");
    assert_eq!(got.bytes, TRANSFER);
    assert_eq!(sha_field(line), hex(&got.sha256), "{line}");
    report(&format!("stack_interop: smoltcp -> kernel 64 MiB in {:?}: {line}", t.elapsed()));

    let (st, _, log) = echo.terminate();
    assert!(st.success(), "echo server exit status {st}\n{log}");
    report(&format!("stack_interop_with_kernel_behind_tap_agent: {:?}", t0.elapsed()));
}
