//! `send` and `recv`: a TCP throughput test over smoltcp. The sender generates a pseudo-random
//! stream straight into smoltcp's send buffer, the receiver hashes straight out of its receive
//! buffer; both print the stream's SHA-256, bytes, seconds and Gbit/s, so the two ends (or a
//! kernel peer computing the same) can be compared.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};

use super::{Stack, StackError, Step};

/// A fast deterministic byte stream (xorshift64*), so transfers are not compressible zeros. The
/// stream does not depend on how it is cut into [`PseudoRandom::fill`] calls; it is the same
/// stream the integration tests' generator makes from the same seed.
#[derive(Debug, Clone)]
pub struct PseudoRandom {
    x: u64,
    carry: [u8; 8],
    carry_len: usize,
}

impl PseudoRandom {
    /// A generator for `seed` (any value; the low bit is forced so the state is never zero).
    pub fn new(seed: u64) -> Self {
        PseudoRandom { x: seed | 1, carry: [0; 8], carry_len: 0 }
    }

    #[inline]
    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.x;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.x = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let take = self.carry_len.min(buf.len());
        let from = 8 - self.carry_len;
        buf[..take].copy_from_slice(&self.carry[from..from + take]);
        self.carry_len -= take;
        let mut chunks = buf[take..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_word());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let w = self.next_word();
            tail.copy_from_slice(&w[..tail.len()]);
            self.carry = w;
            self.carry_len = 8 - tail.len();
        }
    }
}

/// Hex form of a digest.
pub(crate) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The result line both ends print: `<verb> N bytes in S s (G Gbit/s) sha256=HEX`.
fn report(
    out: &mut dyn Write,
    verb: &str,
    peer: SocketAddr,
    bytes: u64,
    secs: f64,
    sha: &[u8],
) -> Result<(), StackError> {
    let gbit = if secs > 0.0 { bytes as f64 * 8.0 / secs / 1e9 } else { 0.0 };
    writeln!(
        out,
        "{verb} {bytes} bytes {} {peer} in {secs:.3} s ({gbit:.3} Gbit/s) sha256={}",
        if verb == "sent" { "to" } else { "from" },
        hex(sha)
    )
    .and_then(|()| out.flush())
    .map_err(StackError::Output)
}

fn endpoint_addr(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

/// Bytes a tool moves between two services of the rings: hashing a whole socket buffer at once
/// would leave the rings unread long enough for a sender to count them stalled.
pub(crate) const STEP_BYTES: usize = 256 << 10;

/// How long a transfer may make no progress before it fails.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects a new TCP socket to `target` and waits until it is established. Returns its handle.
pub(crate) fn connect(
    stack: &mut Stack,
    target: SocketAddr,
    timeout: Duration,
    nagle: bool,
) -> Result<smoltcp::iface::SocketHandle, StackError> {
    let mut sock = stack.tcp_socket();
    sock.set_nagle_enabled(nagle);
    let handle = stack.sockets.add(sock);
    let port = stack.ephemeral_port();
    let cx = stack.iface.context();
    stack
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(cx, IpEndpoint::from(target), port)
        .map_err(|e| StackError::Socket { what: target.to_string(), reason: e.to_string() })?;
    let start = Instant::now();
    stack.run(|stack| {
        let s = stack.sockets.get_mut::<tcp::Socket>(handle);
        match s.state() {
            State::SynSent | State::SynReceived => {
                let left = timeout.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Err(StackError::ConnectTimeout { target, after: timeout });
                }
                Ok(Step::Continue(Some(left)))
            }
            State::Closed => Err(StackError::ConnectRefused { target }),
            _ => Ok(Step::Done(handle)),
        }
    })
}

/// `send ADDR:PORT --bytes N`: sends `bytes` pseudo-random bytes from `seed`, then closes and
/// waits until everything is acknowledged.
pub(crate) fn send(
    stack: &mut Stack,
    target: SocketAddr,
    bytes: u64,
    seed: u64,
    connect_timeout: Duration,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let handle = connect(stack, target, connect_timeout, true)?;
    let start = Instant::now();
    let mut rng = PseudoRandom::new(seed);
    let mut hasher = Sha256::new();
    let mut left = bytes;
    let mut closed = false;
    let mut acked = 0u64;
    let mut last_progress = start;
    let done = stack.run(|stack| {
        let s = stack.sockets.get_mut::<tcp::Socket>(handle);
        let mut budget = STEP_BYTES;
        while left > 0 && budget > 0 && s.can_send() {
            let n = s
                .send(|buf| {
                    let n = buf.len().min(budget).min(usize::try_from(left).unwrap_or(usize::MAX));
                    rng.fill(&mut buf[..n]);
                    hasher.update(&buf[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            left -= n as u64;
            budget -= n;
        }
        if left == 0 && !closed {
            s.close();
            closed = true;
        }
        let now_acked = bytes - left - s.send_queue() as u64;
        let now = Instant::now();
        if now_acked != acked {
            acked = now_acked;
            last_progress = now;
        }
        match s.state() {
            State::FinWait2 | State::TimeWait if closed && s.send_queue() == 0 => {
                Ok(Step::Done(now))
            }
            State::Closed | State::TimeWait | State::Closing | State::LastAck if !closed => {
                Err(StackError::ConnectionLost { peer: target, bytes: acked })
            }
            State::Closed => Err(StackError::ConnectionLost { peer: target, bytes: acked }),
            _ if now.duration_since(last_progress) > STALL_TIMEOUT => Err(StackError::Stalled {
                what: format!("sending to {target} ({acked} of {bytes} bytes acknowledged)"),
                after: STALL_TIMEOUT,
            }),
            // Out of budget with room left: come back right after the rings are serviced.
            _ if budget == 0 && left > 0 => Ok(Step::Continue(Some(Duration::ZERO))),
            _ => Ok(Step::Continue(Some(STALL_TIMEOUT))),
        }
    });
    let end = match done {
        Ok(end) => end,
        Err(e) => {
            stack.sockets.get_mut::<tcp::Socket>(handle).abort();
            // Send the reset now; the error above is the one to report.
            if let Err(e2) = stack.poll() {
                log::debug!("while resetting the connection: {e2}");
            }
            return Err(e);
        }
    };
    let secs = end.duration_since(start).as_secs_f64();
    report(out, "sent", target, bytes, secs, &hasher.finalize())
}

/// `recv --tcp PORT`: accepts `connections` streams one after the other, hashing each; prints
/// one result line per stream. A termination signal between streams ends it cleanly.
pub(crate) fn recv(
    stack: &mut Stack,
    port: u16,
    connections: u32,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let listen = |stack: &mut Stack| -> Result<smoltcp::iface::SocketHandle, StackError> {
        let sock = stack.tcp_socket();
        let h = stack.sockets.add(sock);
        stack.sockets.get_mut::<tcp::Socket>(h).listen(IpListenEndpoint::from(port)).map_err(
            |e| StackError::Socket { what: format!("TCP port {port}"), reason: e.to_string() },
        )?;
        Ok(h)
    };
    let mut handle = listen(stack)?;
    let mut finished = 0u32;
    // Streams already reported whose FIN handshake is still running.
    let mut closing: Vec<(smoltcp::iface::SocketHandle, Instant)> = Vec::new();
    struct Current {
        peer: SocketAddr,
        start: Instant,
        bytes: u64,
        hasher: Sha256,
        last_progress: Instant,
    }
    let mut cur: Option<Current> = None;
    loop {
        let step = stack.run(|stack| {
            let now = Instant::now();
            closing.retain(|&(h, since)| {
                let s = stack.sockets.get::<tcp::Socket>(h);
                let keep = s.state() != State::Closed && now.duration_since(since) < STALL_TIMEOUT;
                if !keep {
                    stack.sockets.remove(h);
                }
                keep
            });
            if stack.signal().is_some() && cur.is_none() {
                return Ok(Step::Done(false));
            }
            let s = stack.sockets.get_mut::<tcp::Socket>(handle);
            let st = s.state();
            if cur.is_none() && !matches!(st, State::Listen | State::SynReceived | State::Closed) {
                if let Some(ep) = s.remote_endpoint() {
                    cur = Some(Current {
                        peer: endpoint_addr(ep),
                        start: now,
                        bytes: 0,
                        hasher: Sha256::new(),
                        last_progress: now,
                    });
                    log::info!("receiving from {}", endpoint_addr(ep));
                }
            }
            let Some(c) = cur.as_mut() else { return Ok(Step::Continue(None)) };
            let mut budget = STEP_BYTES;
            while budget > 0 && s.can_recv() {
                let n = s
                    .recv(|buf| {
                        let n = buf.len().min(budget);
                        c.hasher.update(&buf[..n]);
                        (n, n)
                    })
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                budget -= n;
                c.bytes += n as u64;
                c.last_progress = now;
            }
            if budget == 0 {
                // More to read: come back right after the rings are serviced.
                return Ok(Step::Continue(Some(Duration::ZERO)));
            }
            if !s.may_recv() && s.recv_queue() == 0 {
                // The sender's FIN arrived and everything before it was read: the stream is
                // complete. A connection that just closed was reset.
                if st == State::Closed {
                    return Err(StackError::ConnectionLost { peer: c.peer, bytes: c.bytes });
                }
                s.close();
                return Ok(Step::Done(true));
            }
            if now.duration_since(c.last_progress) > STALL_TIMEOUT {
                return Err(StackError::Stalled {
                    what: format!("receiving from {} after {} bytes", c.peer, c.bytes),
                    after: STALL_TIMEOUT,
                });
            }
            Ok(Step::Continue(Some(STALL_TIMEOUT)))
        })?;
        if !step {
            return Ok(()); // a signal with no stream in progress: a clean stop
        }
        let c = cur.take().expect("a stream was in progress");
        let secs = c.last_progress.duration_since(c.start).as_secs_f64();
        report(out, "received", c.peer, c.bytes, secs, &c.hasher.finalize())?;
        finished += 1;
        closing.push((handle, Instant::now()));
        if finished >= connections {
            break;
        }
        handle = listen(stack)?;
    }
    // Let our FIN go out and be acknowledged (bounded), so the sender sees a clean close.
    let deadline = Instant::now() + Duration::from_secs(1);
    stack.run(|stack| {
        let open = closing
            .iter()
            .any(|&(h, _)| stack.sockets.get::<tcp::Socket>(h).state() != State::Closed);
        let left = deadline.saturating_duration_since(Instant::now());
        Ok(if !open || left.is_zero() { Step::Done(()) } else { Step::Continue(Some(left)) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stream_does_not_depend_on_how_it_is_cut() {
        let mut whole = vec![0u8; 1000];
        PseudoRandom::new(7).fill(&mut whole);
        let mut pieces = vec![0u8; 1000];
        let mut g = PseudoRandom::new(7);
        let mut at = 0;
        for n in [1usize, 3, 8, 13, 0, 64, 5, 906] {
            g.fill(&mut pieces[at..at + n]);
            at += n;
        }
        assert_eq!(at, 1000);
        assert_eq!(whole, pieces);
    }

    #[test]
    fn test_stream_matches_the_word_generator_of_the_tests() {
        // The integration tests generate whole 8-byte words the same way.
        let mut x: u64 = 42 | 1;
        let mut expect = Vec::new();
        for _ in 0..4 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            expect.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let mut got = vec![0u8; 32];
        PseudoRandom::new(42).fill(&mut got);
        assert_eq!(got, expect);
    }
}
