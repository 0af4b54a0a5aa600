//! Kill-and-restart (issue 10): member C is killed with SIGKILL at arbitrary moments of its
//! life (before its slot is claimed, half way through joining, while it talks) and started
//! again, 50 times, while A and B run a checksummed TCP stream. Afterwards all three talk, A's
//! and B's memory and descriptor counts did not grow, and no TAP or file was left behind.
//! `ivnet status` shows each killed C as down at once (its process is gone).
//!
//! Needs root; prints `SKIP ...` without it.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const CYCLES: usize = 50;
/// A and B may grow by this much over the cycles (allocator noise), no more.
const RSS_SLACK_KB: u64 = 2048;

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("reading fds").count()
}

fn our_shm_files() -> Vec<String> {
    let prefix = format!("ivnet-test-{}-", std::process::id());
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn kill_and_restart_50_times_during_traffic() {
    let test = "kill_and_restart_50_times_during_traffic";
    if !require_root(test) {
        return;
    }
    let mut lab = Lab::quiet(3);
    lab.start_all(&[]);
    for (a, b) in [(0, 1), (1, 0), (0, 2), (1, 2)] {
        lab.wait_reachable(a, b, Duration::from_secs(10));
    }
    lab.agents[2].take().expect("C").kill_hard();
    let files_before = our_shm_files();

    // A streams to B for the whole test.
    let addr: SocketAddr = format!("{}:5302", Lab::addr(1)).parse().expect("address");
    let receiver = tcp_receiver(&lab.ns[1], addr, Instant::now() + Duration::from_secs(600));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = in_netns(&lab.ns[0], "TCP sender", move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let (mut rng, mut h, mut bytes) = (PseudoRandom::new(0x6b11), Sha256::new(), 0u64);
        let mut buf = vec![0u8; 64 << 10];
        while !stop2.load(Ordering::Relaxed) {
            rng.fill(&mut buf);
            s.write_all(&buf).unwrap_or_else(|e| panic!("writing after {bytes} bytes: {e}"));
            h.update(&buf);
            bytes += buf.len() as u64;
            // Leave the machine some breath for the restarts.
            std::thread::sleep(Duration::from_micros(500));
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        TransferEnd { bytes, sha256: h.finalize().into() }
    });
    // Warm up, then take the baseline.
    std::thread::sleep(Duration::from_secs(1));
    let (pa, pb) = (lab.agent(0).pid(), lab.agent(1).pid());
    let (rss0, fds0) = ([rss_kb(pa), rss_kb(pb)], [fd_count(pa), fd_count(pb)]);

    let start = Instant::now();
    let mut seed = 0x2545_f491u64;
    let mut seen_up = 0;
    for cycle in 0..CYCLES {
        let mut c = lab.spawn(2, &[]);
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let talks = cycle % 5 == 4;
        if talks {
            c.wait_ready();
            lab.wait_reachable(2, 0, Duration::from_secs(10));
        } else {
            // Early in start-up (attach, claim, TAP) or at any later moment.
            let range = if cycle % 5 < 2 { 20 } else { 150 };
            std::thread::sleep(Duration::from_millis((seed >> 33) % range));
        }
        let was_up = peer(&lab.status(), 2)
            .is_some_and(|p| p["state"] == "up" && p["pid"].as_u64() == Some(c.pid() as u64));
        c.kill_hard();
        if was_up {
            seen_up += 1;
            let st = lab.status();
            let p = peer(&st, 2).expect("peer 2");
            assert_eq!(p["state"], "down", "cycle {cycle}: a killed member shows as {p:#}");
        }
        lab.agent(0).assert_running();
        lab.agent(1).assert_running();
    }
    let cycles_took = start.elapsed();
    wait_until("C's TAP is gone", Duration::from_secs(5), || !lab.ns[2].has_link("tap-shm"));
    assert_eq!(our_shm_files(), files_before, "files were left behind in /dev/shm");
    let (rss1, fds1) = ([rss_kb(pa), rss_kb(pb)], [fd_count(pa), fd_count(pb)]);

    stop.store(true, Ordering::Relaxed);
    let sent = sender.join(Duration::from_secs(60));
    let got = receiver.join(Duration::from_secs(60));
    assert_eq!(hex(&got.sha256), hex(&sent.sha256), "the stream between A and B was corrupted");

    lab.start(2, &[]);
    for (a, b) in [(0, 1), (0, 2), (1, 2), (2, 0), (2, 1), (1, 0)] {
        lab.wait_reachable(a, b, Duration::from_secs(5));
    }
    for i in 0..2 {
        assert_eq!(fds1[i], fds0[i], "member {i}'s descriptor count changed");
        assert!(
            rss1[i] <= rss0[i] + RSS_SLACK_KB,
            "member {i}'s RSS grew from {} to {} kB",
            rss0[i],
            rss1[i]
        );
    }
    report(&format!(
        "{test}: {CYCLES} cycles in {:.1} s ({seen_up} killed while up), {} MiB streamed A->B; \
         RSS A {}->{} kB, B {}->{} kB; fds A {}, B {}",
        cycles_took.as_secs_f64(),
        sent.bytes >> 20,
        rss0[0],
        rss1[0],
        rss0[1],
        rss1[1],
        fds1[0],
        fds1[1]
    ));
}
