//! `ivnet server` speaks QEMU's ivshmem-server protocol (QEMU `docs/specs/ivshmem-spec.rst`,
//! "The ivshmem Client-Server Protocol"), checked by raw clients over the UNIX socket:
//! the exact sequence of messages and descriptors on connect (version 0 and the id without a
//! descriptor, -1 with the region, each existing peer's id once per vector with an eventfd, the
//! client's own id once per vector), the eventfds really connecting peers, disconnect notices,
//! doorbell ids counting up (never reused right after a leave, as QEMU needs) while the
//! peer-table slots paired with them are reused lowest first, and a client beyond the peer
//! limit refused without disturbing the others.
//!
//! These need no privileges: the server, its socket and its region file are ordinary files.

mod common;

use std::collections::BTreeMap;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use common::server::*;
use common::*;

/// How long to wait for a message that must not come, before the next step shows it did not.
/// (Used only to make a failure point at the right step; the assertions never depend on it.)
const QUIET: Duration = Duration::from_millis(200);

/// One message as the kernel delivers it: the bytes of one `recvmsg` and the descriptors that
/// came with them, plus what the control header said.
struct RawMsg {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// (level, type) of every control message.
    cmsgs: Vec<(i32, i32)>,
    flags: i32,
}

/// `recvmsg` of at most 8 bytes (one protocol message: reads never cross into the next one, so
/// each descriptor is attributed to the message whose bytes carried it), waiting up to
/// [`MSG_TIMEOUT`] for data. Written against libc directly so that this file checks the wire
/// format without going through ivnet's own reader.
fn raw_recv(sock: RawFd) -> RawMsg {
    assert!(wait_readable(sock, MSG_TIMEOUT), "no message within {MSG_TIMEOUT:?}");
    let mut buf = [0u8; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `buf` and `control`, both writable and alive for the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
    let mut fds = Vec::new();
    let mut cmsgs = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `control`; CMSG_* walk within them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            cmsgs.push(((*c).cmsg_level, (*c).cmsg_type));
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // A received descriptor is new in this process and owned by nobody else.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    RawMsg { bytes: buf[..n as usize].to_vec(), fds, cmsgs, flags: msg.msg_flags }
}

/// Checks one raw message: exactly `value` as 8 little-endian bytes, and no descriptor or
/// exactly one (in one SCM_RIGHTS control message).
fn check_raw(m: RawMsg, value: i64, with_fd: bool, what: &str) -> Option<OwnedFd> {
    assert_eq!(m.bytes.len(), 8, "{what}: {} bytes in one message, want 8", m.bytes.len());
    assert_eq!(m.bytes, value.to_le_bytes(), "{what}: bytes are not {value} (little-endian i64)");
    assert_eq!(m.flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC), 0, "{what}: truncated");
    let mut fds = m.fds;
    if with_fd {
        assert_eq!(m.cmsgs, vec![(libc::SOL_SOCKET, libc::SCM_RIGHTS)], "{what}: control");
        assert_eq!(fds.len(), 1, "{what}: {} descriptors, want exactly one", fds.len());
        fds.pop()
    } else {
        assert!(m.cmsgs.is_empty() && fds.is_empty(), "{what}: came with a descriptor");
        None
    }
}

/// The first client, read byte by byte: version 0, id 0 (the spec: the first client receives
/// ID zero), -1 with the region file (same file, 64 MiB, `IVNETSEG` at offset 0), then its own
/// id twice with an eventfd each, and nothing else: the next thing it receives is the join of
/// the second client.
#[test]
fn setup_sequence_at_the_byte_level() {
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--vectors", "2"]);
    let a = std::os::unix::net::UnixStream::connect(&server.socket).expect("connect");
    let fd = a.as_raw_fd();

    check_raw(raw_recv(fd), 0, false, "step 1, protocol version");
    check_raw(raw_recv(fd), 0, false, "step 2, our id (the first client gets 0)");
    let shm = check_raw(raw_recv(fd), -1, true, "step 3, -1 + region").expect("fd");
    let region_file = std::fs::File::open(&server.shm.path).expect("open region file");
    let (dev, ino, size) = fd_identity(shm.as_raw_fd());
    let (fdev, fino, _) = fd_identity(region_file.as_raw_fd());
    assert_eq!((dev, ino), (fdev, fino), "the descriptor is not {}", server.shm.path.display());
    assert_eq!(size, 64 << 20, "region size");
    let head = read_region_prefix(&shm, 4096);
    assert_eq!(&head[..8], REGION_MAGIC, "region magic at offset 0");
    let own: Vec<OwnedFd> = (0..2)
        .map(|v| {
            let what = format!("step 5, own id, vector {v}");
            let e = check_raw(raw_recv(fd), 0, true, &what).expect("fd");
            assert!(is_eventfd(&e), "{what}: {} is not an eventfd", fd_target(&e));
            e
        })
        .collect();
    assert!(!wait_readable(fd, QUIET), "a sixth message arrived with no other client around");

    // A second client: its join (id 1, once per vector, with eventfds) is the very next thing
    // the first one sees.
    let mut b = RawClient::connect(&server.socket);
    let sb = b.read_setup(2, &[0]);
    assert_eq!(sb.id, 1);
    let joins: Vec<OwnedFd> = (0..2)
        .map(|v| check_raw(raw_recv(fd), 1, true, &format!("join of 1, vector {v}")).expect("fd"))
        .collect();
    // The descriptors that came with the join are the second client's own doorbells.
    for (v, (join, own)) in joins.iter().zip(&sb.own).enumerate() {
        eventfd_ring(join);
        assert_eq!(eventfd_take(own, MSG_TIMEOUT), Some(1), "vector {v} not connected");
    }
    drop(own);
    server.wait_log(&format!("peer 0 joined (pid {})", std::process::id()), 1, MSG_TIMEOUT);
    server.assert_running();
}

/// Three clients with `vectors` vectors each: every client's setup lists the peers before it,
/// every earlier client is told of every later one, all region descriptors are the same file,
/// and for every ordered pair and every vector, ringing the sender's copy of the receiver's
/// eventfd makes exactly that vector of the receiver readable.
fn sequence_and_doorbells(vectors: usize) {
    let dir = TempDir::new();
    let v = vectors.to_string();
    let mut server = Server::start(&dir, &["--vectors", &v]);

    let mut clients: Vec<RawClient> = Vec::new();
    // What each client knows: its own eventfds and every peer's.
    let mut own: Vec<Vec<OwnedFd>> = Vec::new();
    let mut peers: Vec<BTreeMap<u32, Vec<OwnedFd>>> = Vec::new();
    let mut regions = Vec::new();
    for i in 0..3u32 {
        let mut c = RawClient::connect(&server.socket);
        let existing: Vec<u32> = (0..i).collect();
        let s = c.read_setup(vectors, &existing);
        assert_eq!(s.id, i, "doorbell ids count up from 0");
        assert_eq!(server.slot_of(i), Some(i), "slots are handed out lowest first");
        regions.push(fd_identity(s.shm.as_raw_fd()));
        assert_eq!(&read_region_prefix(&s.shm, 8)[..], REGION_MAGIC);
        // Everyone already connected is told: the new id once per vector, with eventfds.
        for (j, earlier) in clients.iter_mut().enumerate() {
            let fds = earlier.expect_vectors(i, vectors, &format!("client {j}: join of {i}"));
            peers[j].insert(i, fds);
        }
        clients.push(c);
        own.push(s.own);
        peers.push(s.peers);
    }
    assert!(regions.windows(2).all(|w| w[0] == w[1]), "different region files: {regions:?}");
    assert_eq!(regions[0].2, 64 << 20);

    for (from, known) in peers.iter().enumerate() {
        for to in 0..3usize {
            if from == to {
                continue;
            }
            for vec in 0..vectors {
                eventfd_ring(&known[&(to as u32)][vec]);
                assert_eq!(
                    eventfd_take(&own[to][vec], MSG_TIMEOUT),
                    Some(1),
                    "{from} rang vector {vec} of {to}, but it did not become readable"
                );
                for other in (0..vectors).filter(|&o| o != vec) {
                    assert_eq!(
                        eventfd_take(&own[to][other], Duration::ZERO),
                        None,
                        "{from} rang vector {vec} of {to}, but vector {other} fired"
                    );
                }
            }
        }
    }
    // Nothing else was sent to anyone: no stray notices.
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(
            matches!(c.recv(QUIET), Recv::Timeout),
            "client {i} received a message nobody caused"
        );
    }
    server.wait_log("joined (pid", 3, MSG_TIMEOUT);
    server.assert_running();
}

#[test]
fn sequence_and_doorbells_with_2_vectors() {
    sequence_and_doorbells(2);
}

#[test]
fn sequence_and_doorbells_with_3_vectors() {
    sequence_and_doorbells(3);
}

/// Connects a client and reads its whole setup.
fn join(server: &Server, vectors: usize, existing: &[u32]) -> (RawClient, Setup) {
    let mut c = RawClient::connect(&server.socket);
    let s = c.read_setup(vectors, existing);
    (c, s)
}

/// Disconnect notices (the id without a descriptor) reach every other client when one closes.
/// Doorbell ids count up from 0 and are not handed out again right after a leave (QEMU 7.2
/// corrupts its heap when an id it saw leave joins again; QEMU's own server counts up too),
/// while the peer-table slot paired with each id is the lowest free one, so a freed slot is
/// reused at once. A newcomer's eventfds reach it, whichever slot it got.
#[test]
fn disconnect_notices_fresh_ids_and_reused_slots() {
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--vectors", "2", "--max-peers", "8"]);
    let (mut a, sa) = join(&server, 2, &[]);
    let (b, sb) = join(&server, 2, &[0]);
    let (mut c, sc) = join(&server, 2, &[0, 1]);
    assert_eq!((sa.id, sb.id, sc.id), (0, 1, 2), "doorbell ids count up from 0");
    let slots: Vec<_> = [0, 1, 2].iter().map(|&id| server.slot_of(id)).collect();
    assert_eq!(slots, [Some(0), Some(1), Some(2)], "slots of ids 0, 1, 2");
    a.expect_vectors(1, 2, "a: join of 1");
    a.expect_vectors(2, 2, "a: join of 2");

    // b leaves: a and c are told (id 1, no descriptor).
    drop(b);
    drop(sb);
    a.expect_plain(1, "a: disconnect notice of 1");
    c.expect_plain(1, "c: disconnect notice of 1");
    server.wait_left(1, 1, MSG_TIMEOUT);

    // d gets a fresh id, 3 (not the freed 1), in the freed slot 1; its setup lists 0 and 2.
    let (mut d, sd) = join(&server, 2, &[0, 2]);
    assert_eq!(sd.id, 3, "a departed id must not be reused at once");
    assert_eq!(server.slot_of(3), Some(1), "the freed slot 1 is the lowest free one");
    let a_to_d = a.expect_vectors(3, 2, "a: join of 3");
    c.expect_vectors(3, 2, "c: join of 3");
    for (v, (to_d, own)) in a_to_d.iter().zip(&sd.own).enumerate() {
        eventfd_ring(to_d);
        assert_eq!(eventfd_take(own, MSG_TIMEOUT), Some(1), "a -> 3, vector {v}");
    }
    // d rings a through the descriptors its setup gave it.
    eventfd_ring(&sd.peers[&0][1]);
    assert_eq!(eventfd_take(&sa.own[1], MSG_TIMEOUT), Some(1), "3 -> a, vector 1");

    // a (0) and c (2) leave; d hears both, in order.
    drop(a);
    d.expect_plain(0, "d: disconnect notice of 0");
    drop(c);
    d.expect_plain(2, "d: disconnect notice of 2");
    server.wait_left(0, 1, MSG_TIMEOUT);
    server.wait_left(2, 1, MSG_TIMEOUT);

    // Ids keep counting (4, 5, 6); slots fill lowest first (0, 2, then 3).
    let (_e, se) = join(&server, 2, &[3]);
    let (_f, sf) = join(&server, 2, &[3, 4]);
    let (_g, sg) = join(&server, 2, &[3, 4, 5]);
    assert_eq!((se.id, sf.id, sg.id), (4, 5, 6));
    let slots: Vec<_> = [4, 5, 6].iter().map(|&id| server.slot_of(id)).collect();
    assert_eq!(slots, [Some(0), Some(2), Some(3)], "slots of ids 4, 5, 6");
    server.assert_running();
}

/// With `--max-peers 2`, a third client is refused: the server closes its connection without
/// sending anything, logs why, and the two members hear nothing of it and keep working. Once
/// one of them leaves, a newcomer is admitted again with the freed id.
#[test]
fn client_beyond_max_peers_is_refused() {
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--vectors", "2", "--max-peers", "2"]);
    let (mut a, sa) = join(&server, 2, &[]);
    let (mut b, sb) = join(&server, 2, &[0]);
    let a_to_b = a.expect_vectors(1, 2, "a: join of 1");

    let mut refused = RawClient::connect(&server.socket);
    match refused.recv(MSG_TIMEOUT) {
        Recv::Eof => {}
        Recv::Msg(m) => panic!("a client beyond max peers received {} (fd {:?})", m.value, m.fd),
        Recv::Timeout => panic!("a client beyond max peers was not closed within {MSG_TIMEOUT:?}"),
    }
    server.wait_log("refusing a client", 1, MSG_TIMEOUT);

    // The members heard nothing, and their doorbells still work both ways.
    assert!(matches!(a.recv(QUIET), Recv::Timeout), "a heard of the refused client");
    assert!(matches!(b.recv(QUIET), Recv::Timeout), "b heard of the refused client");
    eventfd_ring(&a_to_b[1]);
    assert_eq!(eventfd_take(&sb.own[1], MSG_TIMEOUT), Some(1), "a -> b");
    eventfd_ring(&sb.peers[&0][0]);
    assert_eq!(eventfd_take(&sa.own[0], MSG_TIMEOUT), Some(1), "b -> a");

    // Several more refused at once change nothing either.
    for _ in 0..10 {
        let mut r = RawClient::connect(&server.socket);
        assert!(matches!(r.recv(MSG_TIMEOUT), Recv::Eof), "a refused client got a message");
    }
    server.wait_log("refusing a client", 11, MSG_TIMEOUT);

    // b leaves; a hears exactly that (so nothing about the refused clients was queued for it),
    // and the next client is admitted into the freed slot, with the next doorbell id (refused
    // clients used none up).
    drop(b);
    a.expect_plain(1, "a: disconnect notice of 1");
    let (_c, sc) = join(&server, 2, &[0]);
    assert_eq!(sc.id, 2);
    assert_eq!(server.slot_of(2), Some(1));
    a.expect_vectors(2, 2, "a: join of 2");
    server.assert_running();
}
