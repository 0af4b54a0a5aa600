//! Chaos (issue 10): three namespaces with agents on one region; a corrupter scribbles random
//! 8-byte values over the whole region for 30 s (`IVNET_CHAOS_SECS` to change it), with extra
//! writes aimed at the peer table and the control words of the two busy rings, while members 0
//! and 1 run a checksummed TCP transfer. The bytes match, no agent exits, the damage shows in
//! the drop counters, and afterwards every pair still talks.
//!
//! TCP's checksum catches a corrupted payload with probability 1 - 2^-16; the write rates are
//! chosen so that only a few hundred frames in flight are hit, which keeps a chance failure of
//! the SHA-256 comparison far below one in a thousand runs. Needs root; prints `SKIP ...`
//! without it.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ivnet::region::layout::{PeerCounter, DESC_SIZE, RING_CONTROL_SIZE};
use ivnet::region::ring::RingSnapshot;
use ivnet::region::{GeometryRequest, Region};
use sha2::{Digest, Sha256};

/// Uniform writes over the whole region, per second.
const UNIFORM_RATE: u64 = 300;
/// Writes aimed at the peer table, per second.
const TABLE_RATE: u64 = 20;
/// Writes aimed at the control and descriptors of the rings 0->1 and 1->0, per second.
const RING_RATE: u64 = 10;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Scribbles until `stop`; returns how many writes it made.
fn corrupter(r: Region, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    let l = *r.layout();
    let len = r.raw().len() as u64;
    let table = (l.peer_table as u64, (l.rings - l.peer_table) as u64);
    let busy = [l.ring(0, 1) as u64, l.ring(1, 0) as u64];
    let ring_head = (RING_CONTROL_SIZE + l.geometry.ring_slots as usize * DESC_SIZE) as u64;
    let tick = Duration::from_millis(10);
    let per_tick = |rate: u64| rate * tick.as_millis() as u64 / 1000;
    while !stop.load(Ordering::Relaxed) {
        let mut targets = Vec::new();
        for _ in 0..per_tick(UNIFORM_RATE) {
            targets.push(rng.below(len / 8) * 8);
        }
        for _ in 0..per_tick(TABLE_RATE).max(u64::from(rng.below(100) < TABLE_RATE)) {
            targets.push(table.0 + rng.below(table.1 / 8) * 8);
        }
        for _ in 0..per_tick(RING_RATE).max(u64::from(rng.below(100) < RING_RATE)) {
            let base = busy[rng.below(2) as usize];
            targets.push(base + rng.below(ring_head / 8) * 8);
        }
        for off in targets {
            r.raw().u64_at(off as usize).store(rng.next(), Ordering::Relaxed);
            writes.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(tick);
    }
}

#[test]
fn chaos_scribbles_over_the_region_during_a_tcp_transfer() {
    let test = "chaos_scribbles_over_the_region_during_a_tcp_transfer";
    if !require_root(test) {
        return;
    }
    let secs = std::env::var("IVNET_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let duration = Duration::from_secs(secs);
    let mut lab = Lab::quiet(3);
    lab.start_all(&[]);
    for (a, b) in [(0, 1), (1, 0), (0, 2), (1, 2)] {
        lab.wait_reachable(a, b, Duration::from_secs(10));
    }
    // Mapped before the chaos: its layout stays valid whatever is written into the header.
    let r = ivnet::backend::file::attach(&lab.shm.path, None, &GeometryRequest::default())
        .expect("mapping the region");

    let addr: SocketAddr = format!("{}:5301", Lab::addr(1)).parse().expect("address");
    let deadline = Instant::now() + duration + Duration::from_secs(120);
    let receiver = tcp_receiver(&lab.ns[1], addr, deadline);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let scribbler = {
        let (r, stop, writes) = (r.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || corrupter(r, stop, writes))
    };
    let sender = in_netns(&lab.ns[0], "TCP sender", move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        // Generous: the link may be cut for a while by a scribbled slot or ring.
        s.set_write_timeout(Some(Duration::from_secs(60))).expect("write timeout");
        let mut rng = PseudoRandom::new(0xc4a05);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut bytes = 0u64;
        let end = Instant::now() + duration;
        while Instant::now() < end {
            rng.fill(&mut buf);
            s.write_all(&buf).unwrap_or_else(|e| panic!("writing after {bytes} bytes: {e}"));
            h.update(&buf);
            bytes += buf.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        TransferEnd { bytes, sha256: h.finalize().into() }
    });
    let sent = sender.join(duration + Duration::from_secs(90));
    stop.store(true, Ordering::Relaxed);
    scribbler.join().expect("corrupter");
    let received = receiver.join(deadline.saturating_duration_since(Instant::now()));
    for i in 0..3 {
        lab.agent(i).assert_running();
    }
    assert_eq!(received.bytes, sent.bytes, "byte counts differ");
    assert_eq!(hex(&received.sha256), hex(&sent.sha256), "the transferred bytes differ");

    // The damage was noticed and counted (read through the mapping made before the chaos).
    let mut counted = 0u64;
    let mut detail = Vec::new();
    for (s, d) in [(0u32, 1u32), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)] {
        let x = RingSnapshot::read(&r, s, d);
        let n = x
            .rx_corrupt
            .wrapping_add(x.rx_drop_stale)
            .wrapping_add(x.rx_drop_deliver)
            .wrapping_add(x.tx_drop_full)
            .wrapping_add(x.tx_drop_down);
        counted = counted.saturating_add(n.min(1 << 40));
        detail.push(format!(
            "{s}->{d}: corrupt {} stale {} full {}",
            x.rx_corrupt, x.rx_drop_stale, x.tx_drop_full
        ));
    }
    for id in 0..3 {
        counted = counted.saturating_add(r.peer(id).counter(PeerCounter::DropNoPeer).min(1 << 40));
    }
    assert!(
        counted > 0,
        "no drop was counted after {} scribbles: {detail:?}",
        writes.load(Ordering::Relaxed)
    );
    // Afterwards every pair still talks.
    for (a, b) in [(0, 1), (1, 0), (0, 2), (2, 1)] {
        lab.wait_reachable(a, b, Duration::from_secs(10));
    }
    let repairs: usize = (0..3).map(|i| lab.agent(i).log().matches("overwritten").count()).sum();
    report(&format!(
        "{test}: {} MiB in {secs} s under {} scribbles; sha256 match; {repairs} slot repairs \
         logged; {}",
        sent.bytes >> 20,
        writes.load(Ordering::Relaxed),
        detail.join(", ")
    ));
}
