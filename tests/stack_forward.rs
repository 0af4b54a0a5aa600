//! `ivnet stack forward`: an unprivileged user's plain TCP clients on host loopback reach a
//! server inside a namespace, behind a root TAP agent, through the stack's relay. 50
//! connections at once each send a seed, half-close, and fetch 10 MiB that the server derives
//! from it; all must arrive intact (the half-close crosses the relay both ways). Uploads
//! faster than the segment side drains check back-pressure towards the host. Then the
//! forwarders stop cleanly on SIGTERM.
//!
//! Needs root and /dev/net/tun; without them the test prints `SKIP ...` (or fails when
//! `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const CONNECTIONS: usize = 50;
const FETCH: usize = 10 << 20;
const STEP: Duration = Duration::from_secs(30);
const ALL_TIMEOUT: Duration = Duration::from_secs(180);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn digest_of(seed: u64) -> [u8; 32] {
    let mut data = vec![0u8; FETCH];
    PseudoRandom::new(seed).fill(&mut data);
    Sha256::digest(&data).into()
}

/// The server in the namespace: for each of `n` connections, reads an 8-byte seed, waits for
/// the client's FIN, then sends FETCH bytes from that seed and closes.
fn seed_server(ns: &Netns, addr: SocketAddr, n: usize) -> NetnsTask<usize> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let task = in_netns(ns, "seed server", move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let _ = ready_tx.send(());
        let mut handlers = Vec::new();
        for _ in 0..n {
            let (mut s, peer) = listener.accept().expect("accept");
            handlers.push(std::thread::spawn(move || {
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let mut seed = [0u8; 8];
                s.read_exact(&mut seed).unwrap_or_else(|e| panic!("seed from {peer}: {e}"));
                // The client half-closed: EOF must arrive through the relay.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap_or_else(|e| panic!("EOF from {peer}: {e}"));
                assert!(rest.is_empty(), "{peer} sent more than the seed");
                let mut data = vec![0u8; FETCH];
                PseudoRandom::new(u64::from_le_bytes(seed)).fill(&mut data);
                s.write_all(&data).unwrap_or_else(|e| panic!("sending to {peer}: {e}"));
            }));
        }
        handlers.into_iter().map(|h| h.join()).filter(|r| r.is_ok()).count()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the server listens");
    task
}

/// The sink in the namespace: for each of `n` connections, hashes everything until EOF and
/// answers with the 32-byte digest.
fn sink_server(ns: &Netns, addr: SocketAddr, n: usize) -> NetnsTask<usize> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let task = in_netns(ns, "sink server", move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let _ = ready_tx.send(());
        let mut handlers = Vec::new();
        for _ in 0..n {
            let (mut s, peer) = listener.accept().expect("accept");
            handlers.push(std::thread::spawn(move || {
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = s.read(&mut buf).unwrap_or_else(|e| panic!("from {peer}: {e}"));
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                let d: [u8; 32] = h.finalize().into();
                s.write_all(&d).unwrap_or_else(|e| panic!("digest to {peer}: {e}"));
            }));
        }
        handlers.into_iter().map(|h| h.join()).filter(|r| r.is_ok()).count()
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the sink listens");
    task
}

/// Uploads through a relay with small socket buffers: the clients write far faster than the
/// segment side drains, so the relay must stop reading them (back-pressure towards the host)
/// without losing a byte.
fn uploads(bin: &std::path::Path, user: &User, dir: &TempDir, shm: &str, ns: &Netns) {
    const UPLOADS: usize = 5;
    let mut fwd = StackProc::spawn(
        bin,
        Some(user),
        dir,
        &[
            "--shm",
            shm,
            "--peer-id",
            "2",
            "--ip",
            "10.80.0.3/24",
            "--tcp-buffer",
            "64K",
            "forward",
            "127.0.0.1:0",
            "10.80.0.1:8081",
        ],
    );
    let line = fwd.wait_line("naming the port", STEP, |l| l.starts_with("forwarding "));
    let local: SocketAddr =
        line.split_whitespace().nth(1).and_then(|a| a.parse().ok()).expect("an address");
    let sink = sink_server(ns, "10.80.0.1:8081".parse().expect("addr"), UPLOADS);
    let t = Instant::now();
    let clients: Vec<_> = (0..UPLOADS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&local, IO_TIMEOUT).expect("connect");
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
                let mut data = vec![0u8; FETCH];
                PseudoRandom::new(9000 + i as u64).fill(&mut data);
                s.write_all(&data).unwrap_or_else(|e| panic!("upload {i}: {e}"));
                s.shutdown(std::net::Shutdown::Write).expect("half-close");
                let mut d = [0u8; 32];
                s.read_exact(&mut d).unwrap_or_else(|e| panic!("digest for upload {i}: {e}"));
                let expect: [u8; 32] = Sha256::digest(&data).into();
                d == expect
            })
        })
        .collect();
    let deadline = Instant::now() + ALL_TIMEOUT;
    for (i, c) in clients.into_iter().enumerate() {
        while !c.is_finished() {
            fwd.assert_running();
            assert!(Instant::now() < deadline, "upload {i} not done within {ALL_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(c.join().expect("client thread"), "upload {i}: the sink saw other data");
    }
    assert_eq!(sink.join(STEP), UPLOADS);
    report(&format!("stack_forward: {UPLOADS} x 10 MiB uploads in {:?}", t.elapsed()));
    let (st, _, log) = fwd.terminate();
    assert!(st.success(), "upload forwarder exit status {st}\n{log}");
}

#[test]
fn stack_forward_50_connections_from_loopback() {
    if !require_root("stack_forward_50_connections_from_loopback") {
        return;
    }
    let t0 = Instant::now();
    let user = unprivileged_user();
    let dir = TempDir::new();
    let bin = prepare_for_user(&dir, &user);
    let region = dir.join("segment");
    let shm = region.to_str().expect("UTF-8 path");
    let ns = Netns::new();

    let mut fwd = StackProc::spawn(
        &bin,
        Some(&user),
        &dir,
        &[
            "--shm",
            shm,
            "--size",
            "64M",
            "--peer-id",
            "1",
            "--ip",
            "10.80.0.2/24",
            "forward",
            "127.0.0.1:0",
            "10.80.0.1:8080",
        ],
    );
    let line = fwd.wait_line("naming the port", STEP, |l| l.starts_with("forwarding "));
    let local: SocketAddr = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    assert_eq!(proc_uids(fwd.pid()).expect("running"), [user.uid; 4]);
    let _agent = Agent::start(&ns, &region, 0, &["--address", "10.80.0.1/24"], &dir);
    let server = seed_server(&ns, "10.80.0.1:8080".parse().expect("addr"), CONNECTIONS);

    let expected: Vec<[u8; 32]> = (0..CONNECTIONS).map(|i| digest_of(7000 + i as u64)).collect();
    let t = Instant::now();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&local, IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connect {local}: {e}"));
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                s.write_all(&(7000 + i as u64).to_le_bytes()).expect("seed");
                s.shutdown(std::net::Shutdown::Write).expect("half-close");
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 << 10];
                let mut total = 0usize;
                loop {
                    let n = s
                        .read(&mut buf)
                        .unwrap_or_else(|e| panic!("connection {i}: after {total} bytes: {e}"));
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    total += n;
                }
                let d: [u8; 32] = h.finalize().into();
                (total, d)
            })
        })
        .collect();
    let deadline = Instant::now() + ALL_TIMEOUT;
    for (i, c) in clients.into_iter().enumerate() {
        while !c.is_finished() {
            fwd.assert_running();
            assert!(Instant::now() < deadline, "connection {i} not done within {ALL_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (total, d) = match c.join() {
            Ok(x) => x,
            Err(panic) => {
                // Show where the frames went (ring fill and drops, TAP drops) before failing.
                eprintln!("----- status of the segment -----\n{:#}", status_json(&region));
                std::panic::resume_unwind(panic)
            }
        };
        assert_eq!(total, FETCH, "connection {i} got {total} bytes");
        assert_eq!(d, expected[i], "connection {i}: data differs");
    }
    let elapsed = t.elapsed();
    assert_eq!(server.join(STEP), CONNECTIONS, "every server handler finished");
    report(&format!(
        "stack_forward: {CONNECTIONS} x 10 MiB through the relay in {elapsed:?} ({:.2} Gbit/s)",
        (CONNECTIONS * FETCH) as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
    ));

    uploads(&bin, &user, &dir, shm, &ns);

    let (st, _, log) = fwd.terminate();
    assert!(st.success(), "forward exit status {st}\n{log}");
    assert!(
        log.contains(&format!("closed (8 bytes to 10.80.0.1:8080, {FETCH} bytes back)")),
        "{log}"
    );
    let status = status_json(&region);
    assert_eq!(peer(&status, 1).expect("peer 1")["state"], "left", "{status:#}");
    report(&format!("stack_forward_50_connections_from_loopback: {:?}", t0.elapsed()));
}
