//! `echo --tcp PORT` / `echo --udp PORT`: echo servers (many TCP connections at once), and
//! `echo-client`, which checks a server's echoes and measures the round trips.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};

use super::transfer::{connect, STALL_TIMEOUT};
use super::{Stack, StackError, Step};

/// Listening sockets kept ready, so a burst of connections is accepted at once.
const LISTEN_BACKLOG: usize = 16;

/// What the echo server serves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EchoOptions {
    /// TCP port, if any.
    pub tcp: Option<u16>,
    /// UDP port, if any.
    pub udp: Option<u16>,
    /// Most TCP connections at once (beyond it, new ones are refused until some close).
    pub max_connections: usize,
}

fn socket_err(what: String) -> impl FnOnce(String) -> StackError {
    move |reason| StackError::Socket { what, reason }
}

fn tcp_listener(stack: &mut Stack, port: u16) -> Result<SocketHandle, StackError> {
    let mut s = stack.tcp_socket();
    s.set_nagle_enabled(false);
    s.listen(IpListenEndpoint::from(port))
        .map_err(|e| socket_err(format!("TCP port {port}"))(e.to_string()))?;
    Ok(stack.sockets.add(s))
}

/// Runs the echo server until a termination signal.
pub(crate) fn serve(
    stack: &mut Stack,
    opts: EchoOptions,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let mut listening: Vec<SocketHandle> = Vec::new();
    let mut active: Vec<SocketHandle> = Vec::new();
    if let Some(port) = opts.tcp {
        for _ in 0..LISTEN_BACKLOG.min(opts.max_connections.max(1)) {
            listening.push(tcp_listener(stack, port)?);
        }
    }
    let udp_handle = match opts.udp {
        Some(port) => {
            let mut s = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0u8; 1 << 20]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 256], vec![0u8; 1 << 20]),
            );
            s.bind(port).map_err(|e| socket_err(format!("UDP port {port}"))(e.to_string()))?;
            Some(stack.sockets.add(s))
        }
        None => None,
    };
    let what =
        [opts.tcp.map(|p| format!("TCP port {p}")), opts.udp.map(|p| format!("UDP port {p}"))]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ");
    writeln!(out, "echo server on {what}")
        .and_then(|()| out.flush())
        .map_err(StackError::Output)?;
    let mut scratch = vec![0u8; 64 << 10];
    let mut served = 0u64;
    stack.run(|stack| {
        if stack.signal().is_some() {
            return Ok(Step::Done(()));
        }
        // New connections: a listener that left Listen is a connection; replace it.
        if let Some(port) = opts.tcp {
            let mut i = 0;
            while i < listening.len() {
                let s = stack.sockets.get::<tcp::Socket>(listening[i]);
                if s.state() != tcp::State::Listen {
                    active.push(listening.swap_remove(i));
                    served += 1;
                } else {
                    i += 1;
                }
            }
            while listening.len() < LISTEN_BACKLOG
                && listening.len() + active.len() < opts.max_connections
            {
                listening.push(tcp_listener(stack, port)?);
            }
        }
        // Echo on every connection, as much as the send buffer takes.
        active.retain(|&h| {
            let s = stack.sockets.get_mut::<tcp::Socket>(h);
            loop {
                let room = s.send_capacity() - s.send_queue();
                if room == 0 || !s.can_recv() || !s.may_send() {
                    break;
                }
                let take = room.min(scratch.len());
                let n = s.recv_slice(&mut scratch[..take]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                // At most `room` bytes were read, so all of them fit.
                match s.send_slice(&scratch[..n]) {
                    Ok(q) if q == n => {}
                    other => log::warn!("echo: {n} bytes read but {other:?} queued"),
                }
            }
            if s.state() == tcp::State::CloseWait && s.recv_queue() == 0 {
                s.close(); // the client is done sending: FIN after the last echo
            }
            let done = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done {
                stack.sockets.remove(h);
            }
            !done
        });
        // UDP: each datagram back to where it came from.
        if let Some(h) = udp_handle {
            let s = stack.sockets.get_mut::<udp::Socket>(h);
            while s.can_send() {
                let Ok((data, meta)) = s.recv() else { break };
                let n = data.len().min(scratch.len());
                scratch[..n].copy_from_slice(&data[..n]);
                if let Err(e) = s.send_slice(&scratch[..n], meta.endpoint) {
                    log::debug!("UDP echo to {} dropped: {e}", meta.endpoint);
                }
            }
        }
        Ok(Step::Continue(None))
    })?;
    log::info!("echo server stopping after {served} TCP connection(s)");
    Ok(())
}

/// What `echo-client` does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EchoClientOptions {
    /// UDP instead of TCP.
    pub udp: bool,
    /// Round trips per connection (or datagrams).
    pub count: u64,
    /// Bytes per message.
    pub size: usize,
    /// TCP connections at once, each doing `count` round trips.
    pub connections: usize,
    /// How long to wait for one echo.
    pub wait: Duration,
}

/// The message `seq` of connection `conn`: distinct per connection and per round trip.
fn message(buf: &mut [u8], conn: usize, seq: u64) {
    let mut g = super::PseudoRandom::new((conn as u64) << 40 ^ seq.wrapping_mul(0x9e37_79b9));
    g.fill(buf);
}

struct Conn {
    handle: SocketHandle,
    seq: u64,
    sent_at: Instant,
    got: usize,
    waiting: bool,
}

/// Sends messages to an echo server and checks that each comes back intact; prints round-trip
/// statistics. Fails if any message was lost or corrupted.
pub(crate) fn client(
    stack: &mut Stack,
    target: SocketAddr,
    opts: EchoClientOptions,
    connect_timeout: Duration,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let mut expect = vec![0u8; opts.size];
    let mut got = vec![0u8; opts.size];
    let mut rtts: Vec<f64> = Vec::with_capacity(opts.count.min(1 << 20) as usize);
    let (mut sent, mut lost, mut corrupt) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    if opts.udp {
        let mut s = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; 16],
                vec![0u8; 16 * (opts.size + 64)],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; 16],
                vec![0u8; 16 * (opts.size + 64)],
            ),
        );
        let port = stack.ephemeral_port();
        s.bind(port).map_err(|e| socket_err(format!("UDP port {port}"))(e.to_string()))?;
        let h = stack.sockets.add(s);
        let mut msg = vec![0u8; opts.size];
        let mut seq = 0u64;
        let mut in_flight: Option<Instant> = None;
        let dst = IpEndpoint::from(target);
        stack.run(|stack| {
            let now = Instant::now();
            let s = stack.sockets.get_mut::<udp::Socket>(h);
            if let Some(at) = in_flight {
                while let Ok((data, meta)) = s.recv() {
                    if meta.endpoint != dst {
                        continue;
                    }
                    if data == &msg[..] {
                        rtts.push(now.duration_since(at).as_secs_f64() * 1e3);
                        in_flight = None;
                        break;
                    }
                    // An echo of an earlier (late) message, or a corrupted one.
                    if data.len() != msg.len() {
                        corrupt += 1;
                    }
                }
                if in_flight.is_some() && now.duration_since(at) >= opts.wait {
                    lost += 1;
                    in_flight = None;
                }
            }
            if in_flight.is_none() {
                if seq >= opts.count {
                    return Ok(Step::Done(()));
                }
                message(&mut msg, 0, seq);
                match s.send_slice(&msg, dst) {
                    Ok(()) => {
                        in_flight = Some(now);
                        seq += 1;
                        sent += 1;
                    }
                    Err(e) => log::debug!("UDP message not queued yet: {e}"),
                }
            }
            Ok(Step::Continue(Some(opts.wait)))
        })?;
        stack.sockets.remove(h);
    } else {
        let mut conns = Vec::with_capacity(opts.connections);
        for _ in 0..opts.connections {
            let handle = connect(stack, target, connect_timeout, false)?;
            conns.push(Conn { handle, seq: 0, sent_at: start, got: 0, waiting: false });
        }
        let mut failed: Option<StackError> = None;
        stack.run(|stack| {
            let now = Instant::now();
            let mut all_done = true;
            for (i, c) in conns.iter_mut().enumerate() {
                let s = stack.sockets.get_mut::<tcp::Socket>(c.handle);
                if c.waiting {
                    while c.got < opts.size && s.can_recv() {
                        let n = s.recv_slice(&mut got[c.got..]).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        c.got += n;
                    }
                    if c.got == opts.size {
                        message(&mut expect, i, c.seq);
                        if got != expect {
                            corrupt += 1;
                        }
                        rtts.push(now.duration_since(c.sent_at).as_secs_f64() * 1e3);
                        c.waiting = false;
                        c.seq += 1;
                        c.got = 0;
                    } else if now.duration_since(c.sent_at) > opts.wait.max(STALL_TIMEOUT) {
                        lost += opts.count - c.seq;
                        c.seq = opts.count;
                        c.waiting = false;
                        s.abort();
                    } else if !s.is_active() {
                        failed.get_or_insert(StackError::ConnectionLost {
                            peer: target,
                            bytes: c.seq * opts.size as u64,
                        });
                        lost += opts.count - c.seq;
                        c.seq = opts.count;
                        c.waiting = false;
                    }
                }
                if !c.waiting
                    && c.seq < opts.count
                    && s.send_capacity() - s.send_queue() >= opts.size
                {
                    message(&mut expect, i, c.seq);
                    let n = s.send_slice(&expect).unwrap_or(0);
                    if n == opts.size {
                        c.waiting = true;
                        c.sent_at = now;
                        sent += 1;
                    }
                }
                if c.seq < opts.count {
                    all_done = false;
                } else if s.may_send() {
                    s.close();
                }
            }
            Ok(if all_done { Step::Done(()) } else { Step::Continue(Some(opts.wait)) })
        })?;
        for c in &conns {
            stack.sockets.remove(c.handle);
        }
        if let Some(e) = failed {
            log::warn!("{e}");
        }
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let secs = start.elapsed().as_secs_f64();
    let pct = |p: f64| rtts.get(((rtts.len() as f64 - 1.0) * p).round() as usize).copied();
    let avg = if rtts.is_empty() { 0.0 } else { rtts.iter().sum::<f64>() / rtts.len() as f64 };
    writeln!(
        out,
        "{} echo {target}: {sent} sent, {} echoed, {lost} lost, {corrupt} corrupted in {secs:.3} s; \
         rtt min/avg/median/p99/max = {:.3}/{avg:.3}/{:.3}/{:.3}/{:.3} ms",
        if opts.udp { "UDP" } else { "TCP" },
        rtts.len(),
        pct(0.0).unwrap_or(0.0),
        pct(0.5).unwrap_or(0.0),
        pct(0.99).unwrap_or(0.0),
        pct(1.0).unwrap_or(0.0),
    )
    .and_then(|()| out.flush())
    .map_err(StackError::Output)?;
    if lost > 0 || corrupt > 0 || sent == 0 {
        return Err(StackError::EchoFailed { target, sent, lost, corrupt });
    }
    Ok(())
}
