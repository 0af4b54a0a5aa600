//! `ivnet stack` from a script's point of view, with no privileges needed: bad input and
//! failures end in one clear error line and a non-zero exit (never a panic), successes exit 0,
//! and a server stops cleanly on SIGTERM, leaving the segment.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const STEP: Duration = Duration::from_secs(30);

/// Runs `ivnet stack ARGS...` to completion; returns (exit code, stdout, stderr).
fn stack(args: &[&str]) -> (Option<i32>, String, String) {
    let out = run_with_timeout(Command::new(IVNET).arg("stack").args(args), STEP);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a clean failure: exit code 1, stderr starting with `ivnet: error: <start>`.
fn assert_error(args: &[&str], start: &str) {
    let (code, out, err) = stack(args);
    assert_eq!(code, Some(1), "{args:?}: exit {code:?}\nstdout: {out}\nstderr: {err}");
    assert!(err.starts_with(&format!("ivnet: error: {start}")), "{args:?}: stderr:\n{err}");
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
}

#[test]
fn stack_cli_bad_input_gets_one_clear_error() {
    let t0 = Instant::now();
    let dir = TempDir::new();
    let seg = dir.join("seg");
    let seg = seg.to_str().expect("UTF-8");

    // clap's own errors: usage and exit code 2.
    let (code, _, err) = stack(&["--shm", seg, "ping", "10.0.0.1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--ip <CIDR>"), "{err}");
    let (code, _, err) = stack(&["--shm", seg, "--ip", "10.0.0.2", "ping", "10.0.0.1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs a prefix length"), "{err}");
    let (code, _, err) = stack(&["--shm", seg, "--ip", "10.0.0.2/24", "echo"]);
    assert_eq!(code, Some(2), "{err}");

    assert_error(&["--ip", "10.0.0.2/24", "ping", "10.0.0.1"], "--shm: no region given");
    assert_error(
        &[
            "--shm",
            "/nonexistent-ivnet-dir/seg",
            "--size",
            "16M",
            "--ip",
            "10.0.0.2/24",
            "ping",
            "10.0.0.1",
        ],
        "cannot open region file /nonexistent-ivnet-dir/seg",
    );
    assert_error(
        &["--shm", seg, "--ip", "10.0.0.2/24", "ping", "10.0.0.1"],
        &format!("region file {seg} does not exist: give --size to create it"),
    );
    assert_error(
        &["--socket", "/nonexistent-ivnet.sock", "--ip", "10.0.0.2/24", "ping", "10.0.0.1"],
        "cannot connect to the doorbell server at /nonexistent-ivnet.sock",
    );
    assert_error(
        &[
            "--shm",
            seg,
            "--size",
            "16M",
            "--ip",
            "10.0.0.2/24",
            "--gateway",
            "10.9.9.1",
            "ping",
            "10.0.0.1",
        ],
        "--gateway: 10.9.9.1 is not inside any --ip subnet",
    );
    assert_error(
        &["--shm", seg, "--size", "16M", "--ip", "10.0.0.2/24", "ping", "10.0.0.1", "-s", "2000"],
        "ping -s: 2000 bytes do not fit the MTU 1500",
    );
    assert_error(
        &[
            "--shm",
            seg,
            "--size",
            "16M",
            "--ip",
            "10.0.0.2/24",
            "--mtu",
            "9000",
            "--segment-mtu",
            "1500",
            "ping",
            "10.0.0.1",
        ],
        "--mtu 9000 is larger than the segment's MTU 1500",
    );
    assert_error(
        &[
            "--shm",
            seg,
            "--size",
            "16M",
            "--ip",
            "10.0.0.2/24",
            "--peer-id",
            "99",
            "ping",
            "10.0.0.1",
        ],
        "peer id 99 is out of range",
    );
    report(&format!("stack_cli_bad_input_gets_one_clear_error: {:?}", t0.elapsed()));
}

fn spawn(dir: &TempDir, args: &[&str]) -> StackProc {
    StackProc::spawn(Path::new(IVNET), None, dir, args)
}

#[test]
fn stack_cli_failures_and_clean_stop() {
    let t0 = Instant::now();
    let dir = TempDir::new();
    let seg = dir.join("seg");
    let seg = seg.to_str().expect("UTF-8");

    // Nobody answers: ping fails with the summary and one error line.
    let (code, out, err) = stack(&[
        "--shm",
        seg,
        "--size",
        "16M",
        "--peer-id",
        "1",
        "--ip",
        "10.5.0.2/24",
        "ping",
        "10.5.0.1",
        "-c",
        "2",
        "-i",
        "0.1",
        "-W",
        "0.3",
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("2 packets transmitted, 0 received, 100% packet loss"), "{out}");
    assert!(err.starts_with("ivnet: error: no reply from 10.5.0.1 to 2 echo request(s)"), "{err}");

    let mut echo = spawn(
        &dir,
        &[
            "--shm",
            seg,
            "--peer-id",
            "0",
            "--ip",
            "10.5.0.1/24",
            "echo",
            "--tcp",
            "7",
            "--udp",
            "7",
        ],
    );
    echo.wait_line("announcing the server", STEP, |l| l.starts_with("echo server on"));

    // A port nobody listens on: refused, not a hang.
    let (code, out, err) = stack(&[
        "--shm",
        seg,
        "--peer-id",
        "1",
        "--ip",
        "10.5.0.2/24",
        "send",
        "10.5.0.1:9",
        "--bytes",
        "1K",
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.starts_with("ivnet: error: connection to 10.5.0.1:9 refused"), "{err}");

    // Many TCP connections at once against the echo server, each checked.
    let (code, out, err) = stack(&[
        "--shm",
        seg,
        "--peer-id",
        "1",
        "--ip",
        "10.5.0.2/24",
        "echo-client",
        "10.5.0.1:7",
        "--connections",
        "32",
        "-c",
        "20",
        "-s",
        "1000",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("640 sent, 640 echoed, 0 lost, 0 corrupted"), "{out}");

    // SIGTERM: exit 0, slot marked left.
    let (st, _, log) = echo.terminate();
    assert!(st.success(), "echo server: {st}\n{log}");
    let status = status_json(Path::new(seg));
    assert_eq!(peer(&status, 0).expect("peer 0")["state"], "left", "{status:#}");
    report(&format!("stack_cli_failures_and_clean_stop: {:?}", t0.elapsed()));
}
