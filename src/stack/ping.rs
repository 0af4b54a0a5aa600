//! `ping ADDR`: ICMP (or ICMPv6) echo over smoltcp, printing a line per reply with its round
//! trip time and a summary, like iputils' ping.

use std::collections::VecDeque;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress};

use super::{Stack, StackError, Step};

/// What `ping` does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PingOptions {
    /// Requests to send (`None`: until interrupted).
    pub count: Option<u32>,
    /// Time between requests; zero sends the next one as soon as the reply is in.
    pub interval: Duration,
    /// How long to wait for a reply.
    pub wait: Duration,
    /// Payload bytes per request.
    pub size: usize,
}

#[derive(Default)]
struct Rtts {
    n: u32,
    min: f64,
    max: f64,
    sum: f64,
    sum_sq: f64,
}

impl Rtts {
    fn add(&mut self, ms: f64) {
        if self.n == 0 || ms < self.min {
            self.min = ms;
        }
        if ms > self.max {
            self.max = ms;
        }
        self.n += 1;
        self.sum += ms;
        self.sum_sq += ms * ms;
    }
}

fn payload_byte(i: usize) -> u8 {
    (i % 251) as u8
}

fn out_err(e: std::io::Error) -> StackError {
    StackError::Output(e)
}

/// Pings `target`; fails with [`StackError::NoReply`] if no reply came back at all.
pub(crate) fn ping(
    stack: &mut Stack,
    target: IpAddr,
    opts: PingOptions,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let ident = (std::process::id() as u16) ^ (stack.claim().id as u16).rotate_left(8);
    let per = opts.size + 8 + 64;
    let mut sock = icmp::Socket::new(
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 64], vec![0u8; 64 * per]),
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 16], vec![0u8; 16 * per]),
    );
    sock.bind(icmp::Endpoint::Ident(ident)).map_err(|e| StackError::Socket {
        what: format!("ICMP ident {ident}"),
        reason: e.to_string(),
    })?;
    let handle = stack.sockets.add(sock);
    let data: Vec<u8> = (0..opts.size).map(payload_byte).collect();
    let mut rx_copy = vec![0u8; opts.size + 8];
    let dst = IpAddress::from(target);
    let caps = ChecksumCapabilities::default();
    writeln!(out, "PING {target} {}({}) bytes of data.", opts.size, opts.size + 8 + 20)
        .map_err(out_err)?;
    let start = Instant::now();
    let mut next_send = start;
    let mut seq: u16 = 1;
    let mut sent = 0u32;
    let mut received = 0u32;
    let mut outstanding: VecDeque<(u16, Instant)> = VecDeque::with_capacity(64);
    let mut rtts = Rtts::default();
    let mut last_send = start;
    let result = stack.run(|stack| {
        let now = Instant::now();
        if stack.signal().is_some() {
            return Ok(Step::Done(()));
        }
        let src6 = match dst {
            IpAddress::Ipv6(d) => Some(stack.iface.get_source_address_ipv6(&d)),
            _ => None,
        };
        let s = stack.sockets.get_mut::<icmp::Socket>(handle);
        // Replies.
        while let Ok((payload, from)) = s.recv() {
            let n = payload.len().min(rx_copy.len());
            rx_copy[..n].copy_from_slice(&payload[..n]);
            let reply = &rx_copy[..n];
            let (rseq, body) = match (dst, src6) {
                (IpAddress::Ipv4(_), _) => {
                    match Icmpv4Repr::parse(
                        &Icmpv4Packet::new_unchecked(reply),
                        &ChecksumCapabilities::ignored(),
                    ) {
                        Ok(Icmpv4Repr::EchoReply { ident: i, seq_no, data }) if i == ident => {
                            (seq_no, data)
                        }
                        _ => continue,
                    }
                }
                (IpAddress::Ipv6(d), Some(s6)) => {
                    let from6 = match from {
                        IpAddress::Ipv6(f) => f,
                        _ => continue,
                    };
                    match Icmpv6Repr::parse(
                        &from6,
                        &s6,
                        &Icmpv6Packet::new_unchecked(reply),
                        &ChecksumCapabilities::ignored(),
                    ) {
                        Ok(Icmpv6Repr::EchoReply { ident: i, seq_no, data })
                            if i == ident && from6 == d =>
                        {
                            (seq_no, data)
                        }
                        _ => continue,
                    }
                }
                _ => continue,
            };
            let Some(pos) = outstanding.iter().position(|&(q, _)| q == rseq) else {
                writeln!(
                    out,
                    "{} bytes from {from}: icmp_seq={rseq} (DUP or late!)",
                    body.len() + 8
                )
                .map_err(out_err)?;
                continue;
            };
            let (_, at) = outstanding.remove(pos).expect("position is in range");
            let ms = now.duration_since(at).as_secs_f64() * 1e3;
            rtts.add(ms);
            received += 1;
            let intact = body == &data[..];
            writeln!(
                out,
                "{} bytes from {from}: icmp_seq={rseq} time={ms:.3} ms{}",
                body.len() + 8,
                if intact { "" } else { " (payload differs!)" }
            )
            .map_err(out_err)?;
        }
        // Requests that waited too long are lost.
        while outstanding.front().is_some_and(|&(_, at)| now.duration_since(at) >= opts.wait) {
            outstanding.pop_front();
        }
        let all_sent = opts.count.is_some_and(|c| sent >= c);
        if all_sent {
            if outstanding.is_empty() {
                return Ok(Step::Done(()));
            }
            let left = (last_send + opts.wait).saturating_duration_since(now);
            return Ok(Step::Continue(Some(left.max(Duration::from_millis(1)))));
        }
        let due = if opts.interval.is_zero() { outstanding.is_empty() } else { now >= next_send };
        if due && s.can_send() {
            let len = match dst {
                IpAddress::Ipv4(_) => {
                    Icmpv4Repr::EchoRequest { ident, seq_no: seq, data: &data }.buffer_len()
                }
                IpAddress::Ipv6(_) => {
                    Icmpv6Repr::EchoRequest { ident, seq_no: seq, data: &data }.buffer_len()
                }
            };
            match s.send(len, dst) {
                Ok(buf) => {
                    match (dst, src6) {
                        (IpAddress::Ipv6(d), Some(s6)) => {
                            let r = Icmpv6Repr::EchoRequest { ident, seq_no: seq, data: &data };
                            r.emit(&s6, &d, &mut Icmpv6Packet::new_unchecked(buf), &caps);
                        }
                        _ => {
                            let r = Icmpv4Repr::EchoRequest { ident, seq_no: seq, data: &data };
                            r.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
                        }
                    }
                    outstanding.push_back((seq, now));
                    if outstanding.len() > 1024 {
                        outstanding.pop_front();
                    }
                    sent += 1;
                    seq = seq.wrapping_add(1);
                    last_send = now;
                    next_send = now + opts.interval;
                }
                Err(e) => log::debug!("echo request not queued: {e}"),
            }
        }
        let limit = if opts.interval.is_zero() {
            outstanding.front().map(|&(_, at)| (at + opts.wait).saturating_duration_since(now))
        } else {
            Some(next_send.saturating_duration_since(now))
        };
        Ok(Step::Continue(limit.map(|d| d.max(Duration::from_micros(10)))))
    });
    stack.sockets.remove(handle);
    result?;
    let elapsed = start.elapsed().as_millis();
    let loss = if sent == 0 { 0.0 } else { 100.0 * f64::from(sent - received) / f64::from(sent) };
    writeln!(out, "\n--- {target} ping statistics ---").map_err(out_err)?;
    writeln!(
        out,
        "{sent} packets transmitted, {received} received, {loss:.0}% packet loss, time {elapsed}ms"
    )
    .map_err(out_err)?;
    if rtts.n > 0 {
        let avg = rtts.sum / f64::from(rtts.n);
        let mdev = (rtts.sum_sq / f64::from(rtts.n) - avg * avg).max(0.0).sqrt();
        writeln!(
            out,
            "rtt min/avg/max/mdev = {:.3}/{avg:.3}/{:.3}/{mdev:.3} ms",
            rtts.min, rtts.max
        )
        .map_err(out_err)?;
    }
    out.flush().map_err(out_err)?;
    if received == 0 {
        if let Some(signal) = stack.signal() {
            if sent == 0 {
                return Err(StackError::Interrupted { signal });
            }
        }
        return Err(StackError::NoReply { target, sent });
    }
    Ok(())
}
