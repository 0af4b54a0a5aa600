//! The server side of the protocol: what the server queues for one client (`MessageQueue`:
//! joins with descriptors, leaves, withdrawn joins of peers that left before the client read
//! them), sent as a non-blocking socket takes it, and read back with `MessageReader` at
//! arbitrary moments. (The server reads nothing from a client but the end of the connection:
//! any byte a client sends disconnects it, see tests/server_robustness.rs.)
//!
//! Checks: the client receives exactly the messages pushed and not withdrawn, in order, each
//! with the descriptor pushed with it (told apart by the pipe's inode); `withdraw` takes back a
//! join only if none of it was sent, and changes nothing otherwise; no descriptor leaks.

#![no_main]

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use ivnet::server::protocol::{MessageQueue, MessageReader, ReadOutcome};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A message, with one of the pool's descriptors or none.
    Push {
        fd: Option<u8>,
    },
    /// Many plain messages at once (to fill the socket buffer).
    Burst {
        count: u8,
    },
    /// Withdraws the join made of these pool descriptors.
    Withdraw {
        fds: Vec<u8>,
    },
    Flush,
    /// The client reads up to this many messages.
    Read {
        count: u8,
    },
}

const POOL: usize = 4;

fn inode(fd: &OwnedFd) -> u64 {
    let f = std::fs::File::from(fd.try_clone().expect("dup"));
    f.metadata().expect("fstat").ino()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fuzz_target!(|ops: Vec<Op>| {
    let before = open_fds();
    {
        let pool: Vec<(Arc<OwnedFd>, u64)> = (0..POOL)
            .map(|_| {
                let (r, _w) = std::io::pipe().expect("pipe");
                let fd = OwnedFd::from(r);
                let ino = inode(&fd);
                (Arc::new(fd), ino)
            })
            .collect();
        let (a, b) = UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let mut q = MessageQueue::default();
        // What we believe is queued (value, pool index), front = next to send.
        let mut mirror: VecDeque<(i64, Option<usize>)> = VecDeque::new();
        // Everything that must reach the client, in order.
        let mut expected: VecDeque<(i64, Option<usize>)> = VecDeque::new();
        let mut next_value = 0i64;
        let mut reader = MessageReader::default();
        let read_msg = |reader: &mut MessageReader,
                        expected: &mut VecDeque<(i64, Option<usize>)>|
         -> bool {
            match reader.read(b.as_raw_fd()).expect("read") {
                ReadOutcome::Message(m) => {
                    let (value, fd) = expected.pop_front().expect("a message nobody sent");
                    assert_eq!(m.value, value, "order");
                    assert!(!m.fd_lost);
                    match (fd, m.fd) {
                        (None, None) => {}
                        (Some(i), Some(got)) => assert_eq!(inode(&got), pool[i].1, "descriptor"),
                        (want, got) => panic!("message {value}: sent {want:?}, got {got:?}"),
                    }
                    true
                }
                ReadOutcome::WouldBlock => false,
                ReadOutcome::Eof => panic!("EOF while the server end is open"),
            }
        };
        let mut push = |q: &mut MessageQueue,
                        mirror: &mut VecDeque<(i64, Option<usize>)>,
                        expected: &mut VecDeque<(i64, Option<usize>)>,
                        fd: Option<usize>| {
            let v = next_value;
            next_value += 1;
            q.push(v, fd.map(|i| pool[i].0.clone()));
            mirror.push_back((v, fd));
            expected.push_back((v, fd));
        };
        let flush = |q: &mut MessageQueue, mirror: &mut VecDeque<(i64, Option<usize>)>| {
            let len = q.len();
            let done = q.flush(a.as_raw_fd()).expect("flush");
            assert_eq!(done, q.is_empty());
            for _ in q.len()..len {
                mirror.pop_front();
            }
            assert_eq!(q.len(), mirror.len());
        };
        for op in ops.iter().take(300) {
            match op {
                Op::Push { fd } => {
                    let fd = fd.map(|i| usize::from(i) % POOL);
                    push(&mut q, &mut mirror, &mut expected, fd);
                }
                Op::Burst { count } => {
                    for _ in 0..*count {
                        push(&mut q, &mut mirror, &mut expected, None);
                    }
                }
                Op::Withdraw { fds } => {
                    let idx: Vec<usize> =
                        fds.iter().take(8).map(|&i| usize::from(i) % POOL).collect();
                    let arcs: Vec<Arc<OwnedFd>> = idx.iter().map(|&i| pool[i].0.clone()).collect();
                    let len = q.len();
                    // Sent in part: the front message, if the socket took only some of its bytes.
                    if q.withdraw(&arcs) {
                        let carries =
                            |m: &(i64, Option<usize>)| m.1.is_some_and(|i| idx.contains(&i));
                        let gone: Vec<i64> =
                            mirror.iter().filter(|m| carries(m)).map(|m| m.0).collect();
                        assert!(
                            gone.len() >= idx.len(),
                            "withdrew fewer messages than descriptors"
                        );
                        mirror.retain(|m| !carries(m));
                        expected.retain(|m| !gone.contains(&m.0));
                        assert_eq!(q.len(), mirror.len(), "withdrew other messages");
                    } else {
                        assert_eq!(q.len(), len, "a refused withdraw changed the queue");
                    }
                }
                Op::Flush => flush(&mut q, &mut mirror),
                Op::Read { count } => {
                    for _ in 0..*count {
                        if !read_msg(&mut reader, &mut expected) {
                            break;
                        }
                    }
                }
            }
        }
        // Drain: everything still expected arrives.
        loop {
            flush(&mut q, &mut mirror);
            let mut progress = false;
            while read_msg(&mut reader, &mut expected) {
                progress = true;
            }
            if q.is_empty() && expected.is_empty() {
                break;
            }
            assert!(
                progress || !q.is_empty(),
                "{} expected messages never arrived",
                expected.len()
            );
        }
    }
    assert_eq!(open_fds(), before, "descriptors leaked");
});
