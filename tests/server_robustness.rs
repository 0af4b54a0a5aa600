//! `ivnet server` is production code (DESIGN: "it survives clients that vanish, misbehave or
//! flood it"): 200 clients that connect and drop (some before reading a byte, some mid-setup,
//! some after), a client that sends garbage, and a client that never reads while others join
//! and leave around it, do not stop it from serving the others. Afterwards it still hands out
//! working setups to raw clients, and two agents still connect through it and talk (ping).
//! Also: a stale socket file is replaced at start, a live server or a non-socket file is not.
//!
//! The raw-client parts need no privileges; the agent part needs root and /dev/net/tun (it
//! prints `SKIP ...` without them, or fails when `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::*;
use common::*;

/// The fd limit most services and login shells run with (systemd's default soft limit): the
/// server must survive a client that never reads with this many descriptors, not only with a
/// generous limit.
const SERVICE_NOFILE: u64 = 1024;

/// Checks that the server still serves: two fresh clients get complete setups whose eventfds
/// connect them, and the first hears the second leave.
fn assert_still_serving(server: &mut Server, existing: &[u32]) {
    server.assert_running();
    let (mut a, sa) = settled_client(server, existing);
    let mut with_a = existing.to_vec();
    with_a.push(sa.id);
    let mut b = RawClient::connect(&server.socket);
    let sb = b.read_setup(2, &with_a);
    let a_to_b = a.expect_vectors(sb.id, 2, "join of the second check client");
    eventfd_ring(&a_to_b[1]);
    assert_eq!(eventfd_take(&sb.own[1], MSG_TIMEOUT), Some(1), "doorbell between check clients");
    drop(b);
    a.expect_plain(sb.id as i64, "disconnect notice of the second check client");
    server.assert_running();
}

/// Connects a client once the server has processed every earlier leave, i.e. when a new
/// client's setup lists exactly `existing`; returns it (still connected).
fn settled_client(server: &Server, existing: &[u32]) -> (RawClient, Setup) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = RawClient::connect(&server.socket);
        // Refused (None) while all peer ids are still taken by clients not yet removed.
        let listed = match c.read_setup_or_refused(2) {
            Some(s) if s.peers.keys().copied().eq(existing.iter().copied()) => return (c, s),
            Some(s) => format!("{:?}", s.peers.keys().collect::<Vec<_>>()),
            None => "all (refused)".to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "after 30 s the server still lists peers {listed}, expected {existing:?}"
        );
        drop(c);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// 200 clients connecting and dropping: a third close at once without reading, a third after
/// reading part of the setup, a third after the whole setup; batches of 10 at once, so that
/// more clients than peer slots (8) are connected at times and some are refused. The bystander
/// (peer 0, connected throughout, not reading until the end) hears of each admitted client
/// either nothing (its join was still queued when it left, so both were withdrawn) or its join
/// and then its leave; never a leave without a join, and nothing of refused clients.
fn churn_200(server: &mut Server, bystander: &mut RawClient) {
    let joined_before = server.count_log(" joined (pid");
    let refused_before = server.count_log("refusing a client");
    for batch in 0..20 {
        let mut held = Vec::new();
        for k in 0..10 {
            let mut c = RawClient::connect(&server.socket);
            match (batch * 10 + k) % 3 {
                0 => {}
                1 => {
                    // Part of the setup only (version, maybe the id), then vanish.
                    let _ = c.recv(MSG_TIMEOUT);
                }
                _ => {
                    // The whole setup, unless this one was refused (more than 8 at once).
                    for _ in 0..3 + 2 * 9 {
                        if !matches!(c.recv(Duration::from_millis(50)), Recv::Msg(_)) {
                            break;
                        }
                    }
                }
            }
            held.push(c);
        }
        drop(held);
    }
    // Once a newcomer's setup lists only the bystander, every churn client has been removed
    // and every message about them is queued for the bystander ahead of the newcomer's join.
    let (marker, sm) = settled_client(server, &[0]);
    server.assert_running();
    let admitted = server.count_log(" joined (pid") - joined_before - 1;
    let refused = server.count_log("refusing a client") - refused_before;
    // The bystander did not read during the churn, so joins the server had not begun to send
    // it when their client left were withdrawn with the leave (it never hears of those). Of
    // every other client it hears the join (2 vectors, or fewer if cut short) and then the leave.
    let mut present = std::collections::BTreeMap::<i64, usize>::new();
    let mut heard = 0;
    loop {
        let m = bystander.expect_msg("churn notices, then the marker's join");
        if let (true, Some(fd)) = (m.value == sm.id as i64, &m.fd) {
            // Is it the marker's vector 0? (Ids are reused; the eventfd tells them apart.)
            eventfd_ring(fd);
            if eventfd_take(&sm.own[0], Duration::ZERO).is_some() {
                assert!(present.is_empty(), "churn clients still present: {present:?}");
                bystander.expect_vectors(sm.id, 1, "the marker's second vector");
                break;
            }
        }
        let vectors = present.entry(m.value).or_default();
        if m.fd.is_some() {
            assert!(*vectors < 2, "peer {} announced with more than 2 vectors", m.value);
            *vectors += 1;
        } else {
            assert!(*vectors > 0, "peer {} left without having joined", m.value);
            present.remove(&m.value);
            heard += 1;
        }
    }
    assert!(heard <= admitted, "heard {heard} leaves, but only {admitted} clients were admitted");
    drop(marker);
    bystander.expect_plain(sm.id as i64, "the marker's leave");
    report(&format!(
        "churn: 200 clients, {admitted} admitted, {refused} refused; the bystander heard {heard} \
         join+leave pairs, the rest were withdrawn unsent"
    ));
}

/// A client that writes to the socket (the protocol is one-way) is disconnected; the server
/// logs why. Returns after its connection was closed.
fn garbage_client(server: &mut Server) {
    let before = server.count_log("the protocol is one-way");
    let (c, _) = settled_client(server, &[0]);
    let mut c = c;
    let mut raw = c.stream.try_clone().expect("clone stream");
    raw.set_nonblocking(false).expect("blocking");
    // Not a protocol message, nor even 8 bytes.
    let _ = raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage");
    c.expect_eof(MSG_TIMEOUT);
    server.wait_log("the protocol is one-way", before + 1, MSG_TIMEOUT);
}

/// Join/leave cycles run around the client that never reads: each queues 3 messages and pins 2
/// eventfds for it, so 3000 cycles are far beyond both the server's queue bound (4096
/// messages) and the descriptors a 1024-fd server could hold for departed peers.
const NON_READER_CYCLES: usize = 3000;

/// A client that never reads, while others join and leave around it (the bystander keeps
/// reading meanwhile). The server may drop it (its queue is bounded) or keep it (joins it never
/// began to receive are withdrawn when their peer leaves); either way every newcomer is served.
fn never_reading_client(server: &mut Server, bystander: &mut RawClient) {
    // Learn the non-reader's id from the join notice a settled probe client receives.
    let (mut probe, _) = settled_client(server, &[0]);
    let stuck = UnixStream::connect(&server.socket).expect("connect the non-reader");
    let stuck_id = probe.expect_msg("the non-reader's join").value as u32;
    drop(probe);
    let mut dropped_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for cycle in 0..NON_READER_CYCLES {
        let mut c = RawClient::connect(&server.socket);
        let s = c.read_setup_or_refused(2).unwrap_or_else(|| {
            panic!(
                "cycle {cycle}: the server refused a newcomer; log tail:\n{}",
                tail(&server.log(), 20)
            )
        });
        assert!(s.peers.contains_key(&0), "cycle {cycle}: the bystander is not listed");
        if dropped_at.is_none() && !s.peers.contains_key(&stuck_id) {
            dropped_at = Some(cycle);
        }
        drop(c);
        while let Recv::Msg(_) = bystander.recv(Duration::ZERO) {}
        assert!(
            Instant::now() < deadline,
            "{cycle} join/leave cycles took over 120 s; log tail:\n{}",
            tail(&server.log(), 20)
        );
    }
    server.assert_running();
    let mut r = RawClient::from_stream(stuck);
    match dropped_at {
        Some(cycle) => {
            assert_eq!(
                server.count_log(&format!("peer {stuck_id} does not read its messages")),
                1,
                "the non-reader is gone, but not for not reading; log tail:\n{}",
                tail(&server.log(), 20)
            );
            // The server closed it: reading now ends in EOF after what was buffered.
            let buffered = r.expect_eof(Duration::from_secs(30));
            report(&format!(
                "non-reader: dropped after {cycle} of {NON_READER_CYCLES} join/leave cycles \
                 ({buffered} messages were buffered in its socket)"
            ));
        }
        None => {
            // Still connected: its setup and whatever the socket took before it filled up are
            // there to read, in protocol order: every leave follows a join of the same id.
            let s = r.read_setup_any(2);
            assert_eq!(s.id, stuck_id);
            let mut joined: std::collections::BTreeSet<i64> =
                s.peers.keys().map(|&id| id as i64).collect();
            let mut buffered = 0;
            while let Recv::Msg(m) = r.recv(Duration::from_millis(100)) {
                if m.fd.is_some() {
                    joined.insert(m.value);
                } else {
                    assert!(joined.remove(&m.value), "leave of {} without a join", m.value);
                }
                buffered += 1;
            }
            report(&format!(
                "non-reader: still connected after {NON_READER_CYCLES} join/leave cycles; \
                 {buffered} notices were buffered in its socket, the rest withdrawn unsent"
            ));
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Everything at once on one server (running with the usual service fd limit), checked with raw
/// clients afterwards; then, with root, two agents join through the same server and ping.
#[test]
fn server_survives_churn_garbage_and_a_non_reader() {
    let dir = TempDir::new();
    let mut server = Server::start_with(
        &dir,
        &ServerOpts { extra: &["--vectors", "2"], nofile: Some(SERVICE_NOFILE) },
    );
    let mut bystander = RawClient::connect(&server.socket);
    let sb = bystander.read_setup(2, &[]);
    assert_eq!(sb.id, 0);

    churn_200(&mut server, &mut bystander);
    assert_still_serving(&mut server, &[0]);

    garbage_client(&mut server);
    assert_still_serving(&mut server, &[0]);

    never_reading_client(&mut server, &mut bystander);
    assert_still_serving(&mut server, &[0]);

    // The bystander, connected all along, is still served: it hears a newcomer.
    let (late, sl) = settled_client(&server, &[0]);
    loop {
        // Drain what the abuse queued for it until the newcomer's join shows up.
        let m = bystander.expect_msg("the newcomer's join");
        if m.value == sl.id as i64 && m.fd.is_some() {
            break;
        }
    }
    drop(late);
    drop(bystander);
    server.assert_running();

    if !require_root("server_survives_churn_garbage_and_a_non_reader (agents part)") {
        return;
    }
    // Two agents still connect through the very same server and talk.
    let ns = [Netns::new(), Netns::new()];
    let a0 = start_socket_agent(&ns[0], &server, "10.77.0.1/24", &["--spin-us", "0"], &dir);
    let a1 = start_socket_agent(&ns[1], &server, "10.77.0.2/24", &[], &dir);
    wait_until("agent 0 reaches agent 1", Duration::from_secs(15), || {
        ping_once(&ns[0], "10.77.0.2", Duration::from_millis(500))
    });
    assert_ping_patient(&ns[0], "10.77.0.2", 5);
    assert_ping_patient(&ns[1], "10.77.0.1", 5);
    drop((a0, a1));
    server.assert_running();
    server.terminate();
}

/// At start the server removes a stale socket file (nobody listening), but refuses to start
/// when another server answers on the path, or when the path is not a socket.
#[test]
fn stale_socket_is_replaced_but_live_server_and_other_files_are_not() {
    let dir = TempDir::new();
    let run_second = |socket: &std::path::Path| {
        let shm = ShmFile::new();
        let out = run_with_timeout(
            Command::new(IVNET)
                .args(["server", "--size", "64M", "--shm", shm.arg(), "--socket"])
                .arg(socket),
            Duration::from_secs(10),
        );
        (out.status, String::from_utf8_lossy(&out.stderr).to_string())
    };

    // A live server: a second one on its socket refuses, and the first keeps serving.
    let mut first = Server::start(&dir, &[]);
    let (st, err) = run_second(&first.socket);
    assert!(!st.success(), "a second server started on a live socket: {err}");
    assert!(err.contains("another server is already listening"), "unclear message: {err}");
    assert!(first.socket.exists(), "the live server's socket was removed");
    assert_still_serving(&mut first, &[]);
    drop(first);

    // A regular file is not touched.
    let file = dir.join("not-a-socket");
    write_file(&file, b"precious");
    let (st, err) = run_second(&file);
    assert!(!st.success(), "the server started over a regular file");
    assert!(err.contains("is not a socket"), "unclear message: {err}");
    assert_eq!(std::fs::read(&file).expect("file still there"), b"precious");

    // A stale socket (its listener gone) is replaced, and the new server works.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let shm = ShmFile::new();
    let log = std::fs::File::create(dir.join("stale-server.log")).expect("log");
    let mut child = Command::new(IVNET)
        .args(["-v", "server", "--size", "64M", "--shm", shm.arg(), "--socket"])
        .arg(&stale)
        .stderr(log)
        .spawn()
        .expect("spawn server");
    let guard = ChildGuard(&mut child);
    wait_until("the server on the stale path accepts a client", MSG_TIMEOUT, || {
        UnixStream::connect(&stale).is_ok()
    });
    let mut c = RawClient::connect(&stale);
    let s = c.read_setup(2, &[]);
    assert_eq!(&read_region_prefix(&s.shm, 8)[..], REGION_MAGIC);
    drop(guard);
    let text = std::fs::read_to_string(dir.join("stale-server.log")).unwrap_or_default();
    assert!(text.contains("removing stale socket"), "no log line about the stale socket:\n{text}");
}

/// Kills a child on drop.
struct ChildGuard<'a>(&'a mut std::process::Child);

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
