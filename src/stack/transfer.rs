//! `send` and `recv`: a TCP throughput test over smoltcp. The sender generates a pseudo-random
//! stream straight into smoltcp's send buffer (a number of bytes, or for a number of seconds),
//! the receiver hashes straight out of its receive buffer; like iperf3 both print a line per
//! interval (bytes and Gbit/s in that second), then the stream's SHA-256, bytes, seconds and
//! Gbit/s, so the two ends (or a kernel peer computing the same) can be compared. With `--json`
//! they print one JSON object per stream instead, intervals included.

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

/// How much `send` sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many bytes.
    Bytes(u64),
    /// As much as it can for this long.
    Time(Duration),
}

/// How `send` and `recv` report.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReportOptions {
    /// A line per interval of this length while the stream runs (None: only the result).
    pub interval: Option<Duration>,
    /// One JSON object per stream instead of text lines.
    pub json: bool,
}

/// One interval of a stream, seconds since its start.
#[derive(Debug, Clone, Copy)]
struct Interval {
    start: f64,
    end: f64,
    bytes: u64,
}

fn gbit(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e9
    } else {
        0.0
    }
}

/// Counts a stream's bytes per interval and prints the interval lines (text mode) as they end.
struct Meter {
    opts: ReportOptions,
    start: Instant,
    next: Option<Instant>,
    mark: (Instant, u64),
    intervals: Vec<Interval>,
}

impl Meter {
    fn new(start: Instant, opts: ReportOptions) -> Meter {
        Meter {
            opts,
            start,
            next: opts.interval.map(|i| start + i),
            mark: (start, 0),
            intervals: Vec::new(),
        }
    }

    /// Closes every interval that ended by `now` (`bytes`: the stream's total so far).
    fn tick(&mut self, now: Instant, bytes: u64, out: &mut dyn Write) -> Result<(), StackError> {
        let Some(len) = self.opts.interval else { return Ok(()) };
        while let Some(next) = self.next.filter(|&n| now >= n) {
            self.close(next, bytes, out)?;
            self.next = Some(next + len);
        }
        Ok(())
    }

    fn close(&mut self, end: Instant, bytes: u64, out: &mut dyn Write) -> Result<(), StackError> {
        let (from, from_bytes) = self.mark;
        let iv = Interval {
            start: from.duration_since(self.start).as_secs_f64(),
            end: end.duration_since(self.start).as_secs_f64(),
            bytes: bytes - from_bytes,
        };
        self.mark = (end, bytes);
        self.intervals.push(iv);
        if !self.opts.json {
            writeln!(
                out,
                "[{:6.2}-{:6.2} s] {:>12} bytes {:8.3} Gbit/s",
                iv.start,
                iv.end,
                iv.bytes,
                gbit(iv.bytes, iv.end - iv.start)
            )
            .and_then(|()| out.flush())
            .map_err(StackError::Output)?;
        }
        Ok(())
    }

    /// How long until the next interval ends (so a waiting loop wakes for it).
    fn wake_in(&self, now: Instant) -> Option<Duration> {
        self.next.map(|n| n.saturating_duration_since(now))
    }

    /// Closes the last, partial interval and prints the result: the text line both ends print,
    /// `<verb> N bytes to|from PEER in S s (G Gbit/s) sha256=HEX`, or one JSON object.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        mut self,
        end: Instant,
        out: &mut dyn Write,
        verb: &str,
        peer: SocketAddr,
        bytes: u64,
        secs: f64,
        sha: &[u8],
    ) -> Result<(), StackError> {
        if self.opts.interval.is_some() && (bytes > self.mark.1 || self.intervals.is_empty()) {
            self.close(end.max(self.mark.0), bytes, out)?;
        }
        let rate = gbit(bytes, secs);
        let line = if self.opts.json {
            let intervals: Vec<serde_json::Value> = self
                .intervals
                .iter()
                .map(|iv| {
                    serde_json::json!({
                        "start": iv.start,
                        "end": iv.end,
                        "bytes": iv.bytes,
                        "gbit_per_s": gbit(iv.bytes, iv.end - iv.start),
                    })
                })
                .collect();
            serde_json::json!({
                "direction": verb,
                "peer": peer.to_string(),
                "bytes": bytes,
                "seconds": secs,
                "gbit_per_s": rate,
                "sha256": hex(sha),
                "intervals": intervals,
            })
            .to_string()
        } else {
            format!(
                "{verb} {bytes} bytes {} {peer} in {secs:.3} s ({rate:.3} Gbit/s) sha256={}",
                if verb == "sent" { "to" } else { "from" },
                hex(sha)
            )
        };
        writeln!(out, "{line}").and_then(|()| out.flush()).map_err(StackError::Output)
    }
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

/// `send ADDR:PORT --bytes N` (or `-t SECONDS`): sends pseudo-random bytes from `seed`, then
/// closes and waits until everything is acknowledged.
pub(crate) fn send(
    stack: &mut Stack,
    target: SocketAddr,
    amount: Amount,
    seed: u64,
    connect_timeout: Duration,
    report: ReportOptions,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let handle = connect(stack, target, connect_timeout, true)?;
    let start = Instant::now();
    let mut meter = Meter::new(start, report);
    let mut rng = PseudoRandom::new(seed);
    let mut hasher = Sha256::new();
    let (mut left, until) = match amount {
        Amount::Bytes(n) => (n, None),
        Amount::Time(t) => (u64::MAX, Some(start + t)),
    };
    let mut written = 0u64;
    let mut closed = false;
    let mut acked = 0u64;
    let mut last_progress = start;
    let done = stack.run(|stack| {
        let now = Instant::now();
        if until.is_some_and(|u| now >= u) {
            left = 0; // time is up: send nothing more
        }
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
            written += n as u64;
            budget -= n;
        }
        if left == 0 && !closed {
            s.close();
            closed = true;
        }
        let now_acked = written - s.send_queue() as u64;
        if now_acked != acked {
            acked = now_acked;
            last_progress = now;
        }
        let state = s.state();
        let queued = s.send_queue();
        meter.tick(now, written, out)?;
        let wake = |d: Duration| Some(meter.wake_in(now).map_or(d, |w| w.min(d)));
        let wake = match until.filter(|_| !closed) {
            Some(u) => wake(u.saturating_duration_since(now).min(STALL_TIMEOUT)),
            None => wake(STALL_TIMEOUT),
        };
        match state {
            State::FinWait2 | State::TimeWait if closed && queued == 0 => Ok(Step::Done(now)),
            State::Closed | State::TimeWait | State::Closing | State::LastAck if !closed => {
                Err(StackError::ConnectionLost { peer: target, bytes: acked })
            }
            State::Closed => Err(StackError::ConnectionLost { peer: target, bytes: acked }),
            _ if now.duration_since(last_progress) > STALL_TIMEOUT => Err(StackError::Stalled {
                what: format!("sending to {target} ({acked} of {written} bytes acknowledged)"),
                after: STALL_TIMEOUT,
            }),
            // Out of budget with room left: come back right after the rings are serviced.
            _ if budget == 0 && left > 0 => Ok(Step::Continue(Some(Duration::ZERO))),
            _ => Ok(Step::Continue(wake)),
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
    meter.finish(end, out, "sent", target, written, secs, &hasher.finalize())
}

/// `recv --tcp PORT`: accepts `connections` streams one after the other, hashing each; prints
/// one result line per stream. A termination signal between streams ends it cleanly.
pub(crate) fn recv(
    stack: &mut Stack,
    port: u16,
    connections: u32,
    report: ReportOptions,
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
    log::info!("waiting for a stream on TCP port {port}");
    let mut finished = 0u32;
    // Streams already reported whose FIN handshake is still running.
    let mut closing: Vec<(smoltcp::iface::SocketHandle, Instant)> = Vec::new();
    struct Current {
        peer: SocketAddr,
        start: Instant,
        bytes: u64,
        hasher: Sha256,
        last_progress: Instant,
        meter: Meter,
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
                        meter: Meter::new(now, report),
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
            c.meter.tick(now, c.bytes, out)?;
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
            Ok(Step::Continue(Some(
                c.meter.wake_in(now).map_or(STALL_TIMEOUT, |w| w.min(STALL_TIMEOUT)),
            )))
        })?;
        if !step {
            return Ok(()); // a signal with no stream in progress: a clean stop
        }
        let c = cur.take().expect("a stream was in progress");
        let secs = c.last_progress.duration_since(c.start).as_secs_f64();
        let sha = c.hasher.finalize();
        c.meter.finish(c.last_progress, out, "received", c.peer, c.bytes, secs, &sha)?;
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
