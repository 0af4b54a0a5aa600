//! Two namespaces, two agents over a region file in /dev/shm: ping both ways, and 64 MiB TCP
//! transfers whose SHA-256 matches on both ends at MTU 1500, 9000 and 65521 (the last one with
//! frames that span many ring segments).
//!
//! Needs root and /dev/net/tun; without them each test prints `SKIP ...` (or fails when
//! `IVNET_REQUIRE_PRIVILEGED_TESTS=1`). The transfers are serialised by a file-local mutex: on a
//! 2-core machine two of them at once (four agents, four socket threads) only make each slower.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// Serialises the heavy transfer tests of this file.
static HEAVY: Mutex<()> = Mutex::new(());

const TRANSFER_BYTES: u64 = 64 << 20;
/// Bound on one whole transfer (a hang fails the test instead of blocking CI).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

fn two_agents(extra: &[&str]) -> Lab {
    let mut lab = Lab::new(2);
    lab.start_all(extra);
    lab.wait_reachable(0, 1, Duration::from_secs(10));
    lab
}

#[test]
fn two_peers_ping_both_ways() {
    if !require_root("two_peers_ping_both_ways") {
        return;
    }
    let lab = two_agents(&[]);
    lab.wait_reachable(1, 0, Duration::from_secs(10));
    assert_ping(&lab.ns[0], &Lab::addr(1), 5);
    assert_ping(&lab.ns[1], &Lab::addr(0), 5);
    // The frames really went through the rings, both ways.
    let st = lab.status();
    assert!(ring_counter(&st, 0, 1, "rx_frames") >= 5, "ring 0->1: {st:#}");
    assert!(ring_counter(&st, 1, 0, "rx_frames") >= 5, "ring 1->0: {st:#}");
}

/// Starts two agents with `mtu` (None: the default 1500), moves 64 MiB from member 0 to member
/// 1 and compares the digests.
fn transfer_at_mtu(test: &str, mtu: Option<u32>, seed: u64) {
    if !require_root(test) {
        return;
    }
    let _serial = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let mtu_s = mtu.map(|m| m.to_string());
    let extra: Vec<&str> = match &mtu_s {
        Some(m) => vec!["--mtu", m],
        None => vec![],
    };
    let t0 = Instant::now();
    let lab = two_agents(&extra);
    if let Some(m) = mtu {
        // The TAP carries the MTU we asked for, so the kernel really sends frames that large.
        let out = lab.ns[0].exec_ok(&["ip", "-o", "link", "show", "dev", "tap-shm"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(text.contains(&format!("mtu {m} ")), "tap-shm MTU is not {m}: {text}");
        // A ping as large as the MTU allows (no fragmentation) crosses the segment in one frame.
        let size = (m - 28).to_string();
        let out = run_with_timeout(
            &mut lab.ns[0].command(&[
                "ping",
                "-n",
                "-c",
                "3",
                "-W",
                "1",
                "-i",
                "0.2",
                "-M",
                "do",
                "-s",
                &size,
                &Lab::addr(1),
            ]),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "full-MTU ping failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let setup = t0.elapsed();
    let start = Instant::now();
    let (sent, received, _) = tcp_transfer(
        &lab.ns[1],
        &lab.ns[0],
        &Lab::addr(1),
        5201,
        TRANSFER_BYTES,
        seed,
        TRANSFER_TIMEOUT,
    );
    let took = start.elapsed();
    assert_eq!(received.bytes, TRANSFER_BYTES, "receiver got a different byte count");
    assert_eq!(
        hex(&sent.sha256),
        hex(&received.sha256),
        "SHA-256 differs between sender and receiver"
    );
    let st = lab.status();
    let big = ring(&st, 0, 1).expect("ring 0->1 listed");
    for field in ["rx_corrupt", "rx_drop_stale"] {
        assert_eq!(big[field], 0, "ring 0->1 {field}: {st:#}");
    }
    if mtu.is_some_and(|m| m > 2000) {
        // Frames larger than one segment: bytes per frame on the ring must exceed a segment.
        let frames = big["tx_frames"].as_u64().unwrap_or(0).max(1);
        let bytes = big["tx_bytes"].as_u64().unwrap_or(0);
        let slot = st["geometry"]["slot_size"].as_u64().unwrap_or(2048);
        assert!(bytes / frames > slot, "average frame {} <= slot {slot}: {big:#}", bytes / frames);
    }
    report(&format!(
        "{test}: 64 MiB in {:.2} s ({:.0} Mbit/s), sha256 {}, setup {:.2} s",
        took.as_secs_f64(),
        TRANSFER_BYTES as f64 * 8.0 / took.as_secs_f64() / 1e6,
        &hex(&received.sha256)[..16],
        setup.as_secs_f64()
    ));
}

#[test]
fn two_peers_tcp_64mib_mtu_1500() {
    transfer_at_mtu("two_peers_tcp_64mib_mtu_1500", None, 0x1500);
}

#[test]
fn two_peers_tcp_64mib_mtu_9000() {
    transfer_at_mtu("two_peers_tcp_64mib_mtu_9000", Some(9000), 0x9000);
}

#[test]
fn two_peers_tcp_64mib_mtu_65521() {
    transfer_at_mtu("two_peers_tcp_64mib_mtu_65521", Some(65521), 0x65521);
}
