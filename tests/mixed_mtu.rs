//! Members with different MTUs on one segment (issue 11, finding 1): an agent at MTU 9000 and one
//! at MTU 1500 (with `--pin-macs`). A ping of 8000 bytes from the 9000 side never reaches the
//! 1500 side's TAP: the sender does not send it and counts it against that peer's ring
//! (`tx_drop_mtu`), and nothing on that ring is dropped for size at the receiver because nothing
//! oversized was sent. Ordinary pings and TCP flow both ways (TCP's MSS follows the smaller MTU).
//!
//! Needs root and /dev/net/tun; without them the test prints `SKIP ...` (or fails when
//! `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).

mod common;

use std::time::Duration;

use common::*;

const STEP: Duration = Duration::from_secs(30);

#[test]
fn mixed_mtus_oversized_frames_stop_at_the_sender_and_traffic_flows() {
    if !require_root("mixed_mtus_oversized_frames_stop_at_the_sender_and_traffic_flows") {
        return;
    }
    // IPv6 off, so no neighbour discovery or MLD frames blur the TAP counters.
    let mut lab = Lab::quiet(2);
    lab.start(0, &["--mtu", "9000"]);
    lab.start(1, &["--mtu", "1500", "--pin-macs"]);
    lab.wait_reachable(0, 1, STEP);
    lab.wait_reachable(1, 0, STEP);

    let before = lab.status();
    let tap_rx_before = peer(&before, 1).and_then(|p| p["counters"]["local_tx_frames"].as_u64());
    let out = run_with_timeout(
        &mut lab.ns[0].command(&[
            "ping",
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-M",
            "do",
            "-s",
            "8000",
            &Lab::addr(1),
        ]),
        STEP,
    );
    assert!(!out.status.success(), "an 8000-byte ping crossed to an MTU 1500 member");
    let after = lab.status();
    let dropped =
        ring_counter(&after, 0, 1, "tx_drop_mtu") - ring_counter(&before, 0, 1, "tx_drop_mtu");
    assert!(dropped >= 3, "the sender did not count the oversized frames: {after:#}");
    assert_eq!(ring_counter(&after, 0, 1, "rx_drop_size"), 0, "{after:#}");
    let tap_rx_after = peer(&after, 1).and_then(|p| p["counters"]["local_tx_frames"].as_u64());
    assert_eq!(tap_rx_after, tap_rx_before, "something reached the 1500 side's TAP: {after:#}");

    // Ordinary traffic both ways.
    assert_ping(&lab.ns[0], &Lab::addr(1), 3);
    assert_ping(&lab.ns[1], &Lab::addr(0), 3);
    for (from, to, port) in [(0, 1, 5301), (1, 0, 5302)] {
        let (sent, got, _) =
            tcp_transfer(&lab.ns[to], &lab.ns[from], &Lab::addr(to), port, 8 << 20, 9, STEP);
        assert_eq!(sent, got, "TCP {from} -> {to}");
    }
    let st = lab.status();
    for (s, d) in [(0, 1), (1, 0)] {
        for f in ["rx_drop_size", "rx_drop_offload", "rx_drop_source", "rx_corrupt"] {
            assert_eq!(ring_counter(&st, s, d, f), 0, "ring {s}->{d} {f}: {st:#}");
        }
    }
}
