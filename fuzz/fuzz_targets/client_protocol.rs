//! The member side of the doorbell server's protocol, fed whatever a (broken or hostile) server
//! may send: arbitrary 8-byte values, split across writes, with any number of descriptors of any
//! kind attached (none, eventfds, the region, more than the receive buffer holds).
//!
//! Part 1, `MessageReader` alone: every message's value is the 8 bytes sent, and it carries a
//! descriptor exactly when one was sent with a byte of it (none lost, none misattributed).
//! Part 2, the whole session: `ServerSession::setup` over the stream, then the notifier and the
//! control handler on the rest. Checks: no panic, no hang (the sender closes its end), slots
//! reported as left are in range, and no descriptor leaks once everything is dropped.

#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ivnet::backend::server_client::ServerSession;
use ivnet::doorbell::Notifier;
use ivnet::region::{GeometryRequest, Region};
use ivnet::server::protocol::{MessageReader, ReadOutcome};
use ivnet::sys::fdpass::send_with_fds;
use ivnet::sys::EventFd;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const MAX_PEERS: u32 = 4;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    Version,
    Own,
    Peer(u8),
    Region,
    Any(i64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fds {
    None,
    EventFd,
    Region,
    /// Several eventfds on one message (more than 12 overflow the receiver's buffer).
    Many(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Msg {
    value: Value,
    fds: Fds,
    /// Bytes in the first write (the descriptors ride on it); the rest follow in a second.
    split: u8,
}

#[derive(Arbitrary, Debug)]
struct Chunk {
    bytes: Vec<u8>,
    fds: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    chunks: Vec<Chunk>,
    own_id: u8,
    pairing: [Option<u8>; MAX_PEERS as usize],
    well_formed_prefix: bool,
    want_vectors: u8,
    msgs: Vec<Msg>,
    notifies: Vec<(u8, u8)>,
}

/// The region file shared with the session (one per process) and our own view of it.
struct Shared {
    file: File,
    region: Region,
    eventfd: EventFd,
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let path = format!("/dev/shm/ivnet-fuzz-{}", std::process::id());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("region file");
        let _ = std::fs::remove_file(&path);
        let req = GeometryRequest {
            max_peers: Some(MAX_PEERS),
            ring_slots: Some(8),
            // The smallest valid rings: a ring holds two 64 KiB super-frames.
            slot_size: Some(ivnet::region::Geometry::min_slot_size(8, 576)),
            mtu: Some(576),
        };
        let g = req.resolve(u64::MAX).and_then(|g| g.layout()).expect("a valid geometry");
        file.set_len(g.total as u64).expect("size");
        let map = memmap2::MmapOptions::new().map_raw(&file).expect("map");
        let region = Region::attach(Arc::new(map), "fuzz", &req).expect("attach");
        Shared { file, region, eventfd: EventFd::new().expect("eventfd") }
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Part 1: raw chunks into a `MessageReader`.
fn reader_alone(chunks: &[Chunk], efd: RawFd) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    b.set_nonblocking(true).expect("nonblocking");
    // Which message (index) each sent descriptor-carrying chunk starts in.
    let mut sent = Vec::new();
    let mut with_fd = Vec::new();
    for c in chunks.iter().take(64) {
        if c.bytes.is_empty() {
            continue;
        }
        let fds = vec![efd; usize::from(c.fds % 16)];
        match send_with_fds(a.as_raw_fd(), &c.bytes, &fds) {
            Ok(n) => {
                if !fds.is_empty() {
                    with_fd.push(sent.len() / 8);
                }
                sent.extend_from_slice(&c.bytes[..n]);
                if n < c.bytes.len() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    drop(a);
    let mut r = MessageReader::default();
    let mut k = 0usize;
    loop {
        match r.read(b.as_raw_fd()).expect("reading a socketpair") {
            ReadOutcome::Message(m) => {
                let want: [u8; 8] = sent[k * 8..k * 8 + 8].try_into().expect("8 bytes");
                assert_eq!(m.value, i64::from_le_bytes(want), "message {k}");
                let carried = with_fd.contains(&k);
                // More descriptors than the receive buffer holds may come with a few lost,
                // never with none at all.
                assert_eq!(m.fd.is_some() || m.fd_lost, carried, "descriptor of message {k}");
                k += 1;
            }
            ReadOutcome::Eof => break,
            ReadOutcome::WouldBlock => panic!("would block after the sender closed"),
        }
    }
    assert_eq!(k, sent.len() / 8, "whole messages read");
}

/// Part 2: a whole session.
fn session(input: &Input, s: &Shared) {
    let own = u32::from(input.own_id % 8);
    for (slot, id) in input.pairing.iter().enumerate() {
        s.region.peer(slot as u32).set_doorbell_id(id.map(|i| u32::from(i % 8)));
    }
    let mut msgs = Vec::new();
    if input.well_formed_prefix {
        s.region.peer(own % MAX_PEERS).set_doorbell_id(Some(own));
        msgs.push(Msg { value: Value::Version, fds: Fds::None, split: 0 });
        msgs.push(Msg { value: Value::Own, fds: Fds::None, split: 0 });
        msgs.push(Msg { value: Value::Region, fds: Fds::Region, split: 0 });
    }
    msgs.extend(input.msgs.iter().take(200).copied());
    let (a, b) = UnixStream::pair().expect("socketpair");
    for m in &msgs {
        let v: i64 = match m.value {
            Value::Version => 0,
            Value::Own => own.into(),
            Value::Peer(p) => (p % 8).into(),
            Value::Region => -1,
            Value::Any(v) => v,
        };
        let fds: Vec<RawFd> = match m.fds {
            Fds::None => vec![],
            Fds::EventFd => vec![s.eventfd.as_raw_fd()],
            Fds::Region => vec![s.file.as_raw_fd()],
            Fds::Many(n) => vec![s.eventfd.as_raw_fd(); usize::from(n % 20)],
        };
        let bytes = v.to_le_bytes();
        let split = match usize::from(m.split % 8) {
            0 => 8,
            k => k,
        };
        let sent = send_with_fds(a.as_raw_fd(), &bytes[..split], &fds).and_then(|n| {
            Ok(n + if split < 8 { send_with_fds(a.as_raw_fd(), &bytes[split..], &[])? } else { 0 })
        });
        if !matches!(sent, Ok(8)) {
            break; // the socket buffer is full: the server would stop here too
        }
    }
    drop(a);
    let want = 1 + usize::from(input.want_vectors % 3);
    let Ok(session) = ServerSession::setup(b, Path::new("fuzz"), &GeometryRequest::default(), want)
    else {
        return;
    };
    assert!(session.id < MAX_PEERS);
    let mut notifier = session.notifier();
    let (_fd, mut handler, own_fds, _peers) = session.into_control();
    assert!(own_fds.len() <= want);
    let mut left = Vec::new();
    for (i, &(slot, vector)) in input.notifies.iter().take(32).enumerate() {
        notifier.notify(u32::from(slot % 6), u16::from(vector % 4));
        if i == 0 {
            handler(&mut left).expect("the handler survives whatever the server sends");
        }
    }
    handler(&mut left).expect("the handler survives whatever the server sends");
    assert!(left.iter().all(|&slot| slot < MAX_PEERS), "left: {left:?}");
}

fuzz_target!(|input: Input| {
    let s = shared();
    s.eventfd.drain();
    let before = open_fds();
    reader_alone(&input.chunks, s.eventfd.as_raw_fd());
    session(&input, s);
    assert_eq!(open_fds(), before, "descriptors leaked");
});
