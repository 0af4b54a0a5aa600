//! Soak (issue 10): two agents carry TCP both ways for 2 minutes (`IVNET_SOAK_SECS` sets
//! another duration), both streams checksummed; then, once the segment is quiet, the counters
//! reconcile exactly for each direction: frames read from the sender's TAP = frames written to
//! the receiver's TAP + every drop counted on the way (sender's switch and ring, receiver's
//! ring).
//!
//! Needs root; prints `SKIP ...` without it.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

fn counter(st: &serde_json::Value, id: u32, key: &str) -> u64 {
    peer(st, id).and_then(|p| p["counters"][key].as_u64()).unwrap_or_else(|| {
        panic!("no counter {key} for peer {id}: {st:#}");
    })
}

/// (frames out of `src`'s TAP, frames into `dst`'s TAP, drops counted on the way, details).
fn ledger(st: &serde_json::Value, src: u32, dst: u32) -> (u64, u64, u64, String) {
    let out = counter(st, src, "local_rx_frames");
    let into = counter(st, dst, "local_tx_frames");
    let switch_drops: u64 = ["drop_no_peer", "drop_to_self", "drop_oversize", "drop_runt"]
        .iter()
        .map(|k| counter(st, src, k))
        .sum();
    let r = |k: &str| ring_counter(st, src, dst, k);
    let ring_drops =
        r("tx_drop_full") + r("tx_drop_down") + r("rx_drop_stale") + r("rx_drop_deliver");
    let detail = format!(
        "{src}->{dst}: out {out}, in {into}, switch drops {switch_drops}, ring tx {} rx {} \
         full {} down {} stale {} deliver {} corrupt {}",
        r("tx_frames"),
        r("rx_frames"),
        r("tx_drop_full"),
        r("tx_drop_down"),
        r("rx_drop_stale"),
        r("rx_drop_deliver"),
        r("rx_corrupt")
    );
    (out, into, switch_drops + ring_drops, detail)
}

fn stream(ns: &Netns, addr: SocketAddr, seed: u64, until: Instant) -> NetnsTask<TransferEnd> {
    in_netns(ns, "TCP sender", move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let (mut rng, mut h, mut bytes) = (PseudoRandom::new(seed), Sha256::new(), 0u64);
        let mut buf = vec![0u8; 64 << 10];
        while Instant::now() < until {
            rng.fill(&mut buf);
            s.write_all(&buf).unwrap_or_else(|e| panic!("writing after {bytes} bytes: {e}"));
            h.update(&buf);
            bytes += buf.len() as u64;
            // A steady stream, not a CPU hog on a shared machine.
            std::thread::sleep(Duration::from_millis(1));
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        TransferEnd { bytes, sha256: h.finalize().into() }
    })
}

#[test]
fn soak_bidirectional_counters_reconcile() {
    let test = "soak_bidirectional_counters_reconcile";
    if !require_root(test) {
        return;
    }
    let secs = std::env::var("IVNET_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let mut lab = Lab::quiet(2);
    lab.start_all(&[]);
    lab.wait_reachable(0, 1, Duration::from_secs(10));
    lab.wait_reachable(1, 0, Duration::from_secs(10));

    let until = Instant::now() + Duration::from_secs(secs);
    let limit = Duration::from_secs(secs + 120);
    let to_b: SocketAddr = format!("{}:5304", Lab::addr(1)).parse().expect("address");
    let to_a: SocketAddr = format!("{}:5305", Lab::addr(0)).parse().expect("address");
    let rx_b = tcp_receiver(&lab.ns[1], to_b, Instant::now() + limit);
    let rx_a = tcp_receiver(&lab.ns[0], to_a, Instant::now() + limit);
    let tx_a = stream(&lab.ns[0], to_b, 0x50a1, until);
    let tx_b = stream(&lab.ns[1], to_a, 0x50a2, until);
    let (sent_ab, sent_ba) = (tx_a.join(limit), tx_b.join(limit));
    let (got_ab, got_ba) = (rx_b.join(limit), rx_a.join(limit));
    assert_eq!(hex(&got_ab.sha256), hex(&sent_ab.sha256), "A->B stream corrupted");
    assert_eq!(hex(&got_ba.sha256), hex(&sent_ba.sha256), "B->A stream corrupted");
    lab.agent(0).assert_running();
    lab.agent(1).assert_running();

    // Once the segment is quiet (two identical readings), the ledgers must balance.
    let mut last = lab.status();
    let mut balanced = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let st = lab.status();
        let quiet = [(0, 1), (1, 0)].iter().all(|&(s, d)| {
            ledger(&st, s, d).0 == ledger(&last, s, d).0
                && ledger(&st, s, d).1 == ledger(&last, s, d).1
        });
        last = st;
        if quiet {
            balanced = Some(last.clone());
            break;
        }
    }
    let st = balanced.expect("the segment never went quiet after the streams ended");
    let mut lines = Vec::new();
    for (s, d) in [(0, 1), (1, 0)] {
        let (out, into, drops, detail) = ledger(&st, s, d);
        assert_eq!(out, into + drops, "frames do not reconcile: {detail}");
        lines.push(detail);
    }
    report(&format!(
        "{test}: {secs} s, {} MiB A->B and {} MiB B->A, sha256 match; {}",
        sent_ab.bytes >> 20,
        sent_ba.bytes >> 20,
        lines.join("; ")
    ));
}
