//! `ivnet stack` run by a user without privileges: the test drops root for real (`setpriv` to
//! `nobody`, no groups, no capabilities) and checks that it did, then three stack peers on a
//! region file in a directory that user owns ping each other, move 64 MiB over smoltcp TCP
//! with matching SHA-256 on both ends, and echo UDP. An echo server stops cleanly on SIGTERM
//! and its slot is marked left.
//!
//! Needs root (to become another user); without it the test prints `SKIP ...` (or fails when
//! `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;

const STEP: Duration = Duration::from_secs(30);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn stack_unprivileged_ping_tcp_and_udp_echo() {
    if !require_root("stack_unprivileged_ping_tcp_and_udp_echo") {
        return;
    }
    let t0 = Instant::now();
    let user = unprivileged_user();
    let dir = TempDir::new();
    let bin = prepare_for_user(&dir, &user);
    let region = dir.join("segment");
    let shm = region.to_str().expect("UTF-8 path");
    let common = |peer: &'static str, ip: &'static str| -> Vec<&'static str> {
        vec!["--peer-id", peer, "--ip", ip]
    };

    // The receiving end creates the region file (as the user).
    let mut args = vec!["--shm", shm, "--size", "16M"];
    args.extend(common("0", "10.79.0.1/24"));
    args.extend(["recv", "--tcp", "5001"]);
    let mut receiver = StackProc::spawn(&bin, Some(&user), &dir, &args);
    receiver.wait_log("joined", STEP);

    let mut args = vec!["--shm", shm];
    args.extend(common("1", "10.79.0.2/24"));
    args.extend(["echo", "--udp", "7", "--tcp", "7"]);
    let mut echo = StackProc::spawn(&bin, Some(&user), &dir, &args);
    echo.wait_line("announcing the echo server", STEP, |l| l.starts_with("echo server on"));

    // Root was really dropped: all four uids of both servers are the user's, and the stack
    // itself reports that euid.
    for p in [&receiver, &echo] {
        let uids = proc_uids(p.pid()).expect("the stack is running");
        assert_eq!(uids, [user.uid; 4], "uids of pid {}", p.pid());
    }
    assert!(echo.log().contains(&format!("euid {}", user.uid)), "{}", echo.log());
    let meta = std::fs::metadata(&region).expect("the region file exists");
    assert_eq!(meta.uid(), user.uid, "the unprivileged stack created the region file");

    let client = |tool: &[&str]| {
        let mut args = vec!["--shm", shm];
        args.extend(common("2", "10.79.0.3/24"));
        args.extend_from_slice(tool);
        StackProc::spawn(&bin, Some(&user), &dir, &args)
    };

    // Ping (the first request also resolves ARP).
    let (st, out, log) = client(&["ping", "10.79.0.1", "-c", "3", "-i", "0.1"]).wait_exit(STEP);
    assert!(st.success(), "ping failed: {st}\n{out}\n{log}");
    assert!(out.contains("3 packets transmitted, 3 received"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("bytes from 10.79.0.1: icmp_seq=")).count(), 3);
    assert!(log.contains(&format!("euid {}", user.uid)), "client ran as the user:\n{log}");

    // UDP echo: every datagram comes back intact.
    let (st, out, log) =
        client(&["echo-client", "--udp", "10.79.0.2:7", "-c", "200", "-s", "512"]).wait_exit(STEP);
    assert!(st.success(), "UDP echo failed: {st}\n{out}\n{log}");
    assert!(out.contains("200 sent, 200 echoed, 0 lost, 0 corrupted"), "{out}");

    // 64 MiB over smoltcp TCP; both ends print the same digest.
    let t = Instant::now();
    let (st, sent, log) = client(&["send", "10.79.0.1:5001", "--bytes", "64M", "--seed", "5"])
        .wait_exit(TRANSFER_TIMEOUT);
    assert!(st.success(), "send failed: {st}\n{sent}\n{log}");
    let (st, received, log) = receiver.wait_exit(STEP);
    assert!(st.success(), "recv failed: {st}\n{received}\n{log}");
    let sent = sent.lines().find(|l| l.starts_with("sent ")).expect("a result line").to_string();
    let received =
        received.lines().find(|l| l.starts_with("received ")).expect("a result line").to_string();
    assert_eq!(bytes_field(&sent), 64 << 20, "{sent}");
    assert_eq!(bytes_field(&received), 64 << 20, "{received}");
    assert_eq!(sha_field(&sent).len(), 64, "{sent}");
    assert_eq!(sha_field(&sent), sha_field(&received), "\n{sent}\n{received}");
    let expected = {
        use sha2::Digest;
        let mut data = vec![0u8; 64 << 20];
        PseudoRandom::new(5).fill(&mut data);
        hex(&sha2::Sha256::digest(&data))
    };
    assert_eq!(sha_field(&received), expected, "the stream is the documented generator's");
    report(&format!("stack_unprivileged: 64 MiB smoltcp<->smoltcp in {:?}: {sent}", t.elapsed()));

    // The echo server stops cleanly on SIGTERM and leaves the segment.
    let (st, _, log) = echo.terminate();
    assert!(st.success(), "echo server exit status {st}\n{log}");
    let status = status_json(&region);
    assert_eq!(peer(&status, 1).expect("peer 1")["state"], "left", "{status:#}");
    assert_eq!(peer(&status, 1).expect("peer 1")["kind"], "stack", "{status:#}");
    report(&format!("stack_unprivileged_ping_tcp_and_udp_echo: {:?}", t0.elapsed()));
}
