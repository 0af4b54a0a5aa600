//! `ivnet stack send`/`recv` reporting like iperf3: `send -t SECONDS` sends for a time instead
//! of a number of bytes, both print a line per interval whose bytes add up to the result, and
//! `--json` prints one object per stream (intervals included) that agrees with the other end.
//! Unprivileged: two stack peers on a region file.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const STEP: Duration = Duration::from_secs(60);

/// `[  0.50-  1.00 s]     46477524 bytes    0.744 Gbit/s` -> (start, end, bytes).
fn interval_line(l: &str) -> Option<(f64, f64, u64)> {
    let inner = l.strip_prefix('[')?;
    let (range, rest) = inner.split_once(" s]")?;
    let (a, b) = range.split_once('-')?;
    let bytes = rest.split_whitespace().next()?.parse().ok()?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, bytes))
}

/// Intervals are contiguous from 0 and add up to `total`.
fn check_intervals(iv: &[(f64, f64, u64)], total: u64, what: &str) {
    assert!(!iv.is_empty(), "{what}: no intervals");
    assert_eq!(iv[0].0, 0.0, "{what}: {iv:?}");
    for w in iv.windows(2) {
        assert!((w[0].1 - w[1].0).abs() < 1e-6 && w[1].1 >= w[1].0, "{what}: {iv:?}");
    }
    assert_eq!(iv.iter().map(|i| i.2).sum::<u64>(), total, "{what}: {iv:?}");
}

fn json_intervals(v: &serde_json::Value) -> Vec<(f64, f64, u64)> {
    v["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| {
            (
                i["start"].as_f64().expect("start"),
                i["end"].as_f64().expect("end"),
                i["bytes"].as_u64().expect("bytes"),
            )
        })
        .collect()
}

#[test]
fn stack_send_for_a_time_with_interval_lines_and_json_receiver() {
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let mut recv = StackProc::spawn(
        std::path::Path::new(IVNET),
        None,
        &dir,
        &[
            "--shm",
            shm.arg(),
            "--size",
            "16M",
            "--ip",
            "10.81.0.1/24",
            "recv",
            "--tcp",
            "5001",
            "--json",
        ],
    );
    recv.wait_log("waiting for a stream on TCP port 5001", STEP);
    let out = run_with_timeout(
        Command::new(IVNET).args(["stack", "--shm", shm.arg(), "--ip", "10.81.0.2/24"]).args([
            "send",
            "10.81.0.1:5001",
            "-t",
            "1.5",
            "-i",
            "0.5",
        ]),
        STEP,
    );
    let sent = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{sent}{}", String::from_utf8_lossy(&out.stderr));
    let result = sent.lines().find(|l| l.starts_with("sent ")).expect("a result line");
    let total = bytes_field(result);
    assert!(total > 0, "{result}");
    let iv: Vec<_> = sent.lines().filter_map(interval_line).collect();
    // The stream ran at least 1.5 s, so the intervals ending at 0.5, 1.0 and 1.5 s are there.
    assert!(iv.len() >= 3, "{sent}");
    check_intervals(&iv, total, "sender");
    assert_eq!(sent.lines().count(), iv.len() + 1, "stray lines: {sent}");

    let (st, received, log) = recv.wait_exit(STEP);
    assert!(st.success(), "{received}{log}");
    let lines: Vec<&str> = received.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one object per stream: {received}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!(v["direction"], "received");
    assert_eq!(v["bytes"].as_u64(), Some(total), "{v}");
    assert_eq!(v["sha256"].as_str(), Some(sha_field(result).as_str()), "{v}");
    check_intervals(&json_intervals(&v), total, "receiver");
}

#[test]
fn stack_send_json_with_bytes_and_text_receiver() {
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let mut recv = StackProc::spawn(
        std::path::Path::new(IVNET),
        None,
        &dir,
        &["--shm", shm.arg(), "--size", "16M", "--ip", "10.82.0.1/24", "recv", "--tcp", "5001"],
    );
    recv.wait_log("waiting for a stream on TCP port 5001", STEP);
    let out = run_with_timeout(
        Command::new(IVNET).args(["stack", "--shm", shm.arg(), "--ip", "10.82.0.2/24"]).args([
            "send",
            "10.82.0.1:5001",
            "--bytes",
            "8M",
            "--json",
        ]),
        STEP,
    );
    let sent = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{sent}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = sent.lines().collect();
    assert_eq!(lines.len(), 1, "{sent}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
    assert_eq!((v["direction"].as_str(), v["bytes"].as_u64()), (Some("sent"), Some(8 << 20)));
    check_intervals(&json_intervals(&v), 8 << 20, "sender");

    let (st, received, log) = recv.wait_exit(STEP);
    assert!(st.success(), "{received}{log}");
    let result = received.lines().find(|l| l.starts_with("received ")).expect("a result line");
    assert_eq!(bytes_field(result), 8 << 20);
    assert_eq!(Some(sha_field(result).as_str()), v["sha256"].as_str());
    let iv: Vec<_> = received.lines().filter_map(interval_line).collect();
    check_intervals(&iv, 8 << 20, "receiver");
}

#[test]
fn stack_send_needs_bytes_or_time() {
    let base = ["stack", "--shm", "/dev/shm/x", "--ip", "10.83.0.2/24", "send", "10.83.0.1:5001"];
    let out = run_with_timeout(Command::new(IVNET).args(base), STEP);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--bytes") && e.contains("--time"), "{e}");
    let out = run_with_timeout(Command::new(IVNET).args(base).args(["-t", "0"]), STEP);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("send -t") && e.contains("seconds > 0"), "{e}");
}
