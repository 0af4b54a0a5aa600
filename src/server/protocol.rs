//! QEMU's ivshmem client-server protocol (QEMU `docs/specs/ivshmem-spec.rst`), shared by the
//! server and the `server` backend of the agent.
//!
//! One-way, server to client: every message is one 8-byte little-endian signed integer,
//! optionally with one file descriptor (SCM_RIGHTS). On connect: the protocol version (0); the
//! client's id; -1 with the shared-memory descriptor; for every other client, its id once per
//! vector with that vector's eventfd; then the client's own id once per vector with its own
//! eventfds. Afterwards: another client's id with a descriptor (it connected; once per vector)
//! or without one (it disconnected). The client never sends anything.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::sys::fdpass;

/// The protocol version this implementation speaks.
pub const PROTOCOL_VERSION: i64 = 0;
/// Most vectors a server hands out per client (QEMU's own server allows 64).
pub const MAX_VECTORS: u32 = 64;
/// Largest peer id the Doorbell register can address.
pub const MAX_PEER_ID: u32 = 65535;

/// One message as received.
#[derive(Debug)]
pub struct Message {
    /// The integer.
    pub value: i64,
    /// The descriptor that came with it.
    pub fd: Option<OwnedFd>,
    /// A descriptor came with it but could not be received (the receiver is at its descriptor
    /// limit): the message is a join whose eventfd was lost, not a disconnect notice.
    pub fd_lost: bool,
}

/// Reassembles 8-byte messages (and their descriptors) from a non-blocking stream socket.
#[derive(Default)]
pub struct MessageReader {
    partial: [u8; 8],
    have: usize,
    fds: Vec<OwnedFd>,
    fd_lost: bool,
}

/// What one read attempt produced.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A whole message.
    Message(Message),
    /// Nothing more for now.
    WouldBlock,
    /// The peer closed the connection.
    Eof,
}

impl MessageReader {
    /// Reads until one whole message is available, the socket would block, or it is closed.
    ///
    /// Reads never cross a message boundary, so each descriptor is attributed to the message
    /// whose bytes carried it.
    pub fn read(&mut self, sock: RawFd) -> io::Result<ReadOutcome> {
        loop {
            let want = 8 - self.have;
            let mut buf = [0u8; 8];
            match fdpass::recv_with_fds_lossy(sock, &mut buf[..want], &mut self.fds) {
                Ok(r) if r.bytes == 0 => return Ok(ReadOutcome::Eof),
                Ok(r) => {
                    let n = r.bytes;
                    self.fd_lost |= r.fds_lost;
                    self.partial[self.have..self.have + n].copy_from_slice(&buf[..n]);
                    self.have += n;
                    if self.have == 8 {
                        self.have = 0;
                        let value = i64::from_le_bytes(self.partial);
                        // A message carries at most one descriptor; extra ones are closed here.
                        let mut fds = std::mem::take(&mut self.fds).into_iter();
                        let fd = fds.next();
                        let fd_lost = std::mem::take(&mut self.fd_lost) && fd.is_none();
                        return Ok(ReadOutcome::Message(Message { value, fd, fd_lost }));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(ReadOutcome::WouldBlock)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A message waiting to be sent.
struct Outgoing {
    bytes: [u8; 8],
    fd: Option<Arc<OwnedFd>>,
    sent: usize,
}

/// Messages queued for one client, sent as the socket accepts them, so that a client that
/// does not read never blocks the server.
#[derive(Default)]
pub struct MessageQueue {
    queue: VecDeque<Outgoing>,
}

impl MessageQueue {
    /// Queues `value`, with `fd` attached if given.
    pub fn push(&mut self, value: i64, fd: Option<Arc<OwnedFd>>) {
        self.queue.push_back(Outgoing { bytes: value.to_le_bytes(), fd, sent: 0 });
    }

    /// Moves every message of `other` to the end of this queue.
    pub fn append(&mut self, other: &mut MessageQueue) {
        self.queue.append(&mut other.queue);
    }

    /// Messages not yet fully sent.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether everything was sent.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Withdraws the queued messages that carry one of `fds` (a departed peer's eventfds) if
    /// the client has not started to receive any of them. Returns true if the whole join was
    /// withdrawn this way: the client never heard of that peer, so it needs no disconnect
    /// notice either. This keeps what a client that does not read pins (memory, and descriptors
    /// of peers long gone) bounded by the peers that are still present.
    pub fn withdraw(&mut self, fds: &[Arc<OwnedFd>]) -> bool {
        let carries =
            |m: &Outgoing| m.fd.as_ref().is_some_and(|f| fds.iter().any(|x| Arc::ptr_eq(x, f)));
        let queued = self.queue.iter().filter(|m| carries(m)).count();
        if queued < fds.len() || self.queue.iter().any(|m| carries(m) && m.sent > 0) {
            return false; // part of the join reached the client: it must hear the leave
        }
        self.queue.retain(|m| !carries(m));
        true
    }

    /// Sends as much as the socket takes. `Ok(true)` when the queue is empty.
    pub fn flush(&mut self, sock: RawFd) -> io::Result<bool> {
        while let Some(m) = self.queue.front_mut() {
            // The descriptor rides on the first byte of its message only.
            let fd = if m.sent == 0 { m.fd.as_ref().map(|f| f.as_raw_fd()) } else { None };
            match fdpass::send_with_fd(sock, &m.bytes[m.sent..], fd) {
                Ok(n) => {
                    m.sent += n;
                    if m.sent == 8 {
                        self.queue.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn test_messages_and_descriptors_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let efd = Arc::new(crate::sys::EventFd::new().unwrap().fd().try_clone().unwrap());
        let mut q = MessageQueue::default();
        q.push(0, None);
        q.push(7, None);
        q.push(-1, Some(efd.clone()));
        q.push(3, Some(efd));
        assert!(q.flush(a.as_raw_fd()).unwrap());
        let mut r = MessageReader::default();
        let mut got = Vec::new();
        while let ReadOutcome::Message(m) = r.read(b.as_raw_fd()).unwrap() {
            got.push((m.value, m.fd.is_some()));
        }
        assert_eq!(got, vec![(0, false), (7, false), (-1, true), (3, true)]);
        drop(a);
        assert!(matches!(r.read(b.as_raw_fd()).unwrap(), ReadOutcome::Eof));
    }

    #[test]
    fn test_withdraw_takes_back_only_joins_not_yet_started() {
        let efd = || Arc::new(crate::sys::EventFd::new().unwrap().fd().try_clone().unwrap());
        let (p1, p2) = ([efd(), efd()], [efd(), efd()]);
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut q = MessageQueue::default();
        q.push(1, Some(p1[0].clone()));
        q.push(1, Some(p1[1].clone()));
        assert!(q.flush(a.as_raw_fd()).unwrap());
        q.push(2, Some(p2[0].clone()));
        q.push(2, Some(p2[1].clone()));
        q.push(5, None);
        // Peer 1's join went out: it stays announced (the caller queues its leave).
        assert!(!q.withdraw(&p1));
        // Peer 2's join was never started: withdrawn whole, the rest keeps its order.
        assert!(q.withdraw(&p2));
        assert_eq!(q.len(), 1);
        assert!(q.flush(a.as_raw_fd()).unwrap());
        drop(a);
        let mut r = MessageReader::default();
        let mut got = Vec::new();
        b.set_nonblocking(true).unwrap();
        while let ReadOutcome::Message(m) = r.read(b.as_raw_fd()).unwrap() {
            got.push(m.value);
        }
        assert_eq!(got, vec![1, 1, 5]);
    }
}
