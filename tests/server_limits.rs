//! What an unauthenticated client of `ivnet server` may hold (issue 11, finding 6):
//!
//! - a client that never reads its setup is dropped after the handshake deadline, freeing its
//!   slot, while a client that read its setup may stay silent for ever (QEMU never sends nor,
//!   between joins, reads anything);
//! - at most `--max-clients` connections, and at most `--max-clients-per-uid` per user
//!   (SO_PEERCRED), so a handful of connections from one user cannot lock out the rest;
//! - when descriptors run out, queued connections wait and are served as soon as a client
//!   leaves, although edge-triggered polling reports no new connection.
//!
//! The per-uid test needs root (to run clients as another user); the others run anywhere.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::server::*;
use common::*;

#[test]
fn client_that_never_reads_its_setup_is_dropped_but_a_silent_reader_stays() {
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--max-peers", "2", "--handshake-timeout-ms", "500"]);
    // A QEMU-like client: reads its setup, then neither sends nor reads for a long while.
    let mut quiet = RawClient::connect(&server.socket);
    let sq = quiet.read_setup(2, &[]);
    // A client that connects and never reads: it holds the second slot for now.
    let stuck = UnixStream::connect(&server.socket).expect("connect");
    server.wait_log(" joined (pid", 2, MSG_TIMEOUT);
    let mut refused = RawClient::connect(&server.socket);
    assert!(matches!(refused.recv(MSG_TIMEOUT), Recv::Eof), "a third client got a slot");
    // After the deadline the non-reader is gone and its slot free; the quiet one stays.
    server.wait_log("has not read its setup", 1, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1000));
    let mut late = RawClient::connect(&server.socket);
    let sl = late.read_setup(2, &[sq.id]);
    // The quiet client hears the newcomer (after the non-reader's join and leave, if its join
    // was sent to it at all).
    let join = loop {
        let m = quiet.expect_msg("notices, then the newcomer's join");
        if m.value == sl.id as i64 {
            let fd = m.fd.expect("a join carries an eventfd");
            let rest = quiet.expect_vectors(sl.id, 1, "the newcomer's vector 1");
            break vec![fd, rest.into_iter().next().expect("vector 1")];
        }
        assert_ne!(m.value, sq.id as i64, "the quiet client heard about itself");
    };
    eventfd_ring(&join[1]);
    assert_eq!(eventfd_take(&sl.own[1], MSG_TIMEOUT), Some(1));
    assert_eq!(server.count_log("has not read its setup"), 1, "the quiet client was dropped");
    drop(stuck);
    server.assert_running();
}

#[test]
fn total_client_limit_refuses_the_next_connection() {
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--max-clients", "2"]);
    let mut a = RawClient::connect(&server.socket);
    let sa = a.read_setup(2, &[]);
    let mut b = RawClient::connect(&server.socket);
    let sb = b.read_setup(2, &[sa.id]);
    a.expect_vectors(sb.id, 2, "a: b joined");
    let mut c = RawClient::connect(&server.socket);
    assert!(matches!(c.recv(MSG_TIMEOUT), Recv::Eof), "a client beyond --max-clients got in");
    server.wait_log("2 clients already", 1, MSG_TIMEOUT);
    drop(b);
    a.expect_plain(1, "b left");
    // Room again.
    let mut d = RawClient::connect(&server.socket);
    d.read_setup(2, &[sa.id]);
    server.assert_running();
}

#[test]
fn backlog_is_served_after_descriptors_ran_out() {
    let dir = TempDir::new();
    let mut server = Server::start_with(
        &dir,
        &ServerOpts {
            // More slots than 40 descriptors can serve (three per client); the smallest rings
            // that hold two 64 KiB super-frames keep 16 peers within 64M.
            extra: &[
                "--max-peers",
                "16",
                "--slots",
                "8",
                "--slot-size",
                "16448",
                "--max-clients",
                "16",
            ],
            nofile: Some(40),
        },
    );
    let mut admitted: Vec<(RawClient, Setup)> = Vec::new();
    let waiting = loop {
        let mut c = RawClient::connect(&server.socket);
        match c.recv(Duration::from_secs(1)) {
            Recv::Msg(m) => {
                assert_eq!(m.value, 0, "protocol version");
                let ids: Vec<u32> = admitted.iter().map(|(_, s)| s.id).collect();
                let s = c.read_setup_after_version(2);
                assert!(
                    s.peers.keys().copied().eq(ids.iter().copied()),
                    "setup lists {:?}",
                    s.peers.keys()
                );
                admitted.push((c, s));
            }
            Recv::Timeout => break c,
            Recv::Eof => panic!("a client was refused instead of waiting; log:\n{}", server.log()),
        }
        assert!(admitted.len() < 16, "the descriptor limit never bit");
    };
    server.wait_log("cannot accept clients for now", 1, MSG_TIMEOUT);
    assert!(admitted.len() >= 2, "too few clients before the limit: {}", admitted.len());
    // One leaves: the waiting client is served, although no new connection arrived.
    let (gone, _) = admitted.pop().expect("a client");
    drop(gone);
    let mut waiting = waiting;
    match waiting.recv(Duration::from_secs(5)) {
        Recv::Msg(m) => assert_eq!(m.value, 0, "protocol version"),
        other => panic!(
            "the queued client was not served after a client left: {other:?}\n{}",
            server.log()
        ),
    }
    report(&format!(
        "backlog_is_served_after_descriptors_ran_out: {} clients fit in 40 descriptors; the next \
         waited and was served when one left",
        admitted.len()
    ));
    server.assert_running();
}

#[test]
fn per_uid_limit_keeps_one_user_from_filling_the_segment() {
    let test = "per_uid_limit_keeps_one_user_from_filling_the_segment";
    if !require_root(test) {
        return;
    }
    let user = unprivileged_user();
    let dir = TempDir::new();
    let bin = prepare_for_user(&dir, &user);
    let mut server = Server::start(&dir, &["--max-clients-per-uid", "2", "--mode", "0666"]);
    let stack = |ip: &str| {
        StackProc::spawn(
            &bin,
            Some(&user),
            &dir,
            &["--socket", server.socket_arg(), "--ip", ip, "echo", "--udp", "7"],
        )
    };
    let mut one = stack("10.80.0.1/24");
    one.wait_log("joined", MSG_TIMEOUT);
    let mut two = stack("10.80.0.2/24");
    two.wait_log("joined", MSG_TIMEOUT);
    let three = stack("10.80.0.3/24");
    let (st, _, log) = three.wait_exit(MSG_TIMEOUT);
    assert!(!st.success(), "a third client of uid {} got in:\n{log}", user.uid);
    server.wait_log(&format!("uid {} has 2 clients already", user.uid), 1, MSG_TIMEOUT);
    // Another user (root here) still gets a slot.
    let mut root = RawClient::connect(&server.socket);
    let s = root.read_setup_any(2);
    assert_eq!(s.peers.len(), 2, "root's client should see the two stacks");
    one.assert_running();
    two.assert_running();
    server.assert_running();
}
