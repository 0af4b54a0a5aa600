//! The agent's control socket and what `ivnet status` makes of it (issue 8): status from the
//! running agent (its own view and the region's), every member's IP addresses in the region,
//! Prometheus output, `--watch`, slow and hostile clients, clear errors without an agent.
//!
//! The tests with agents need root and /dev/net/tun (they print `SKIP ...` otherwise, or fail
//! when `IVNET_REQUIRE_PRIVILEGED_TESTS=1`); the ones with `ivnet stack` peers and plain files
//! run as any user.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

fn ivnet(args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(IVNET).args(args), Duration::from_secs(30))
}

fn ivnet_ok(args: &[&str]) -> String {
    let out = ivnet(args);
    assert!(
        out.status.success(),
        "ivnet {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn agent_json(sock: &Path) -> serde_json::Value {
    let text = ivnet_ok(&["status", "--agent-socket", sock.to_str().unwrap(), "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status --json: {e}: {text}"))
}

/// Two agents, each with a control socket in the lab's directory.
fn lab_with_sockets() -> (Lab, Vec<std::path::PathBuf>) {
    let mut lab = Lab::new(2);
    let socks: Vec<_> = (0..2).map(|i| lab.dir.join(&format!("agent{i}.sock"))).collect();
    for (i, sock) in socks.iter().enumerate() {
        let a = lab.spawn(i, &["--control-socket", sock.to_str().unwrap()]);
        lab.agents[i] = Some(a);
    }
    for a in lab.agents.iter_mut().flatten() {
        a.wait_ready();
    }
    lab.wait_reachable(0, 1, Duration::from_secs(10));
    (lab, socks)
}

#[test]
fn status_from_the_agent_shows_its_view_and_every_members_addresses() {
    if !require_root("status_from_the_agent_shows_its_view_and_every_members_addresses") {
        return;
    }
    let (lab, socks) = lab_with_sockets();
    // The socket exists with mode 0660.
    let mode = std::fs::metadata(&socks[0]).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode");

    let st = agent_json(&socks[0]);
    let a = &st["agent"];
    assert_eq!(a["tap"], "tap-shm");
    assert_eq!(a["peer_id"], 0);
    assert_eq!(a["control_socket"], socks[0].to_str().unwrap());
    assert!(a["backend"].as_str().unwrap().starts_with("file "), "{a:#}");
    assert!(a["addresses"].as_array().unwrap().iter().any(|x| x == "10.77.0.1/24"), "{a:#}");
    // Agents see each other once a frame has passed (wait_reachable did that).
    wait_until("agent 0 sees peer 1 up", Duration::from_secs(10), || {
        agent_json(&socks[0])["agent"]["peers_up"].as_array().is_some_and(|v| v.contains(&1.into()))
    });
    // Both members up, each with its address, through agent 0: peer 1's comes from the region.
    let st = agent_json(&socks[0]);
    for (id, addr) in [(0, "10.77.0.1/24"), (1, "10.77.0.2/24")] {
        let p = peer(&st, id).unwrap_or_else(|| panic!("peer {id}: {st:#}"));
        assert_eq!(p["state"], "up");
        assert!(p["addresses"].as_array().unwrap().iter().any(|x| x == addr), "peer {id}: {p:#}");
    }
    // The same addresses for a reader of the region file, in text.
    let text = ivnet_ok(&["status", "--shm", lab.shm.arg()]);
    assert!(
        text.contains("addresses: 10.77.0.1/24") && text.contains("addresses: 10.77.0.2/24"),
        "{text}"
    );
    // The agent's text view starts with itself.
    let text = ivnet_ok(&["status", "--agent-socket", socks[1].to_str().unwrap()]);
    assert!(text.starts_with("region "), "{text}");
    assert!(text.contains("agent: tap-shm peer 1"), "{text}");

    // An address added later (as systemd-networkd does) reaches the region within seconds.
    lab.ns[1].exec_ok(&["ip", "addr", "add", "10.78.0.2/16", "dev", "tap-shm"]);
    wait_until("the new address in the region", Duration::from_secs(10), || {
        let st = status_json(&lab.shm.path);
        peer(&st, 1)
            .is_some_and(|p| p["addresses"].as_array().unwrap().iter().any(|x| x == "10.78.0.2/16"))
    });

    // Prometheus, from the agent.
    let prom = ivnet_ok(&[
        "status",
        "--agent-socket",
        socks[0].to_str().unwrap(),
        "--format",
        "prometheus",
    ]);
    for needle in [
        "ivnet_peer_up{region=",
        "peer=\"1\"} 1",
        "ivnet_ring_frames_total{",
        "ivnet_peer_drops_total{",
        "reason=\"no_peer\"",
        "ivnet_peer_doorbells_total{",
        "ivnet_ring_fill_segments{",
        "ivnet_agent_uptime_seconds{",
        "# EOF",
    ] {
        assert!(prom.contains(needle), "no {needle:?} in:\n{prom}");
    }

    // SIGTERM: the socket goes away.
    let sock0 = socks[0].clone();
    let mut lab = lab;
    let a = lab.agents[0].take().unwrap();
    assert!(a.terminate().success());
    assert!(!sock0.exists(), "{} left behind", sock0.display());
    let out = ivnet(&["status", "--agent-socket", sock0.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no agent answers on") && err.contains("systemctl status ivnet-agent"),
        "{err}"
    );
}

#[test]
fn slow_and_hostile_clients_do_not_stall_the_agent() {
    if !require_root("slow_and_hostile_clients_do_not_stall_the_agent") {
        return;
    }
    let (lab, socks) = lab_with_sockets();
    // More silent clients than the agent serves at once: they hold its slots...
    let mut idle: Vec<UnixStream> =
        (0..12).map(|_| UnixStream::connect(&socks[0]).expect("connect")).collect();
    // ...while frames keep flowing through it.
    assert_ping(&lab.ns[0], &Lab::addr(1), 3);
    // The agent closes the ones past their deadline; then it answers again.
    wait_until("a status answer after the idle clients expired", Duration::from_secs(15), || {
        ivnet(&["status", "--agent-socket", socks[0].to_str().unwrap(), "--json"]).status.success()
    });
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = Vec::new();
        // Closed by the agent: EOF (or a reset), never a hang.
        let _ = s.read_to_end(&mut b);
    }
    // A request longer than allowed, and an unknown one, get an error, not a status.
    for req in ["x".repeat(1000), "reboot\n".to_string()] {
        let mut s = UnixStream::connect(&socks[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(req.as_bytes());
        let mut b = String::new();
        let _ = s.read_to_string(&mut b);
        let v: serde_json::Value =
            serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}: {b:?}"));
        assert!(v["error"].is_string(), "{req:.20}: {v}");
    }
    // A client that asks and never reads does not hold the agent up either.
    let mut greedy = UnixStream::connect(&socks[0]).unwrap();
    greedy.write_all(b"status\n").unwrap();
    assert_ping(&lab.ns[0], &Lab::addr(1), 3);
    let st = agent_json(&socks[0]);
    assert!(st["agent"]["requests"].as_u64().unwrap() >= 2, "{:#}", st["agent"]);
    assert!(
        st["agent"]["rejected"].as_u64().unwrap() >= 1,
        "more than 8 clients at once: {:#}",
        st["agent"]
    );
    drop(greedy);
}

#[test]
fn a_control_socket_in_use_is_refused_with_a_clear_error() {
    if !require_root("a_control_socket_in_use_is_refused_with_a_clear_error") {
        return;
    }
    // Agents in two namespaces of one host configured with the same socket (as two agents
    // with the default path would be): the first keeps it; the second, configured explicitly,
    // refuses to start and says why (with the default path it would only warn).
    let mut lab = Lab::new(2);
    let sock = lab.dir.join("shared.sock");
    lab.start(0, &["--control-socket", sock.to_str().unwrap()]);
    let second = lab.spawn(1, &["--control-socket", sock.to_str().unwrap()]);
    wait_until("the second agent gives up", Duration::from_secs(15), || {
        second.log().contains("in use by another agent")
    });
    let st = agent_json(&sock);
    assert_eq!(st["agent"]["peer_id"], 0, "the first agent still answers");
    let status = second.terminate();
    assert!(!status.success(), "the second agent should have failed: {status}");
}

#[test]
fn stack_peers_show_addresses_and_no_tap_counters() {
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let stack = StackProc::spawn(
        Path::new(IVNET),
        None,
        &dir,
        &[
            "--shm",
            shm.arg(),
            "--size",
            "16M",
            "--ip",
            "10.79.0.9/24",
            "--ip",
            "fd79::9/64",
            "echo",
            "--udp",
            "7",
        ],
    );
    wait_until("the stack peer is up", Duration::from_secs(15), || {
        try_status_json(&shm.path)
            .is_some_and(|st| peer(&st, 0).is_some_and(|p| p["state"] == "up"))
    });
    let st = status_json(&shm.path);
    let addrs = peer(&st, 0).unwrap()["addresses"].clone();
    assert_eq!(addrs[0], "10.79.0.9/24", "{addrs}");
    assert_eq!(addrs[1], "fd79::9/64", "{addrs}");
    assert!(addrs[2].as_str().unwrap().starts_with("fe80::"), "link-local: {addrs}");
    let text = ivnet_ok(&["status", "--shm", shm.arg()]);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("0  "))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[2], "stack", "{line}");
    // tap rx, tap tx: not for a stack peer.
    assert_eq!(&cols[cols.len() - 3..cols.len() - 1], ["-", "-"], "{line}");
    assert!(text.contains("addresses: 10.79.0.9/24 fd79::9/64 fe80::"), "{text}");

    // --watch: two screens, in place, with the peer and its addresses; then exits (--count).
    let out =
        ivnet_ok(&["status", "--shm", shm.arg(), "--watch", "--interval", "0.2", "--count", "2"]);
    assert_eq!(out.matches("\x1b[H").count(), 2, "{out:?}");
    assert!(out.contains("rates per second") && out.contains("10.79.0.9/24"), "{out}");

    // Prometheus into a file, atomically; the stack peer is up.
    let prom = dir.join("ivnet.prom");
    ivnet_ok(&[
        "status",
        "--shm",
        shm.arg(),
        "--format",
        "prometheus",
        "--output",
        prom.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("ivnet_peer_up{region=") && text.contains("peer=\"0\"} 1"), "{text}");
    assert!(text.contains("kind=\"stack\""), "{text}");
    let leftovers: Vec<_> = std::fs::read_dir(&dir.path)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    drop(stack);
}

#[test]
fn status_without_an_agent_says_what_to_do() {
    let dir = TempDir::new();
    let missing = dir.join("nobody.sock");
    let out = ivnet(&["status", "--agent-socket", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no agent answers on") && err.contains("--shm PATH"), "{err}");
    // A socket file nobody listens on (an agent that died).
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = ivnet(&["status", "--agent-socket", stale.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no agent listens on"), "{err}");
    // --watch needs text.
    let out = ivnet(&["status", "--watch", "--format", "json"]);
    assert!(!out.status.success());
}
