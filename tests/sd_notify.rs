//! The agent and the server as `Type=notify` services, against a notification socket the test
//! binds in place of systemd's: `READY=1` once up, `STATUS=` naming the agent's peers that are
//! up (sent again as peers come and go), `WATCHDOG=1` from the agent's event loop when
//! `WATCHDOG_USEC` asks for it (and not when `WATCHDOG_PID` names another process), and
//! `STOPPING=1` when it leaves.
//!
//! The server case runs anywhere; the agent cases need root (namespaces, TAPs) and print
//! `SKIP ...` without it.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A datagram socket playing systemd's `$NOTIFY_SOCKET`, keeping every message received.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    messages: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &TempDir) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("binding the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        NotifySocket { sock, path, messages: Vec::new() }
    }

    fn env(&self) -> String {
        format!("NOTIFY_SOCKET={}", self.path.display())
    }

    /// Returns the first message from index `from` on that satisfies `pred`, receiving more
    /// as needed. Panics with everything received after `timeout`.
    fn find_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        if let Some(m) = self.messages[from..].iter().find(|m| pred(m)) {
            return m.clone();
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.messages.push(m.clone());
                if pred(&m) {
                    return m;
                }
            }
        }
        panic!("no notification {what} within {timeout:?}; received: {:#?}", self.messages)
    }

    /// The first message (received at any time) satisfying `pred`.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.find_from(0, what, timeout, pred)
    }

    /// The first message received from now on satisfying `pred`.
    fn wait_new(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.find_from(self.messages.len(), what, timeout, pred)
    }

    fn count(&self, line: &str) -> usize {
        self.messages.iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

fn status_of(msg: &str) -> Option<&str> {
    msg.lines().find_map(|l| l.strip_prefix("STATUS="))
}

#[test]
fn server_says_ready_when_listening() {
    let dir = TempDir::new();
    let mut notify = NotifySocket::bind(&dir);
    let shm = ShmFile::new();
    let socket = dir.join("ivs.sock");
    let log = std::fs::File::create(dir.join("server.log")).expect("log");
    let mut child = Command::new(IVNET)
        .args(["server", "--socket", socket.to_str().expect("UTF-8"), "--shm", shm.arg()])
        .args(["--size", "16M"])
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawning ivnet server");
    let ready = notify.wait_for("READY=1", READY_TIMEOUT, |m| m.lines().any(|l| l == "READY=1"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(socket.exists(), "READY=1 came before the socket existed");
    let status = status_of(&ready).expect("READY=1 comes with a STATUS= line");
    assert!(status.contains(socket.to_str().expect("UTF-8")), "{status}");
}

/// Starts an agent (peer `id`, 10.78.0.(id+1)/24) in `ns` with `env` in front of it.
fn agent_with_env(ns: &Netns, shm: &ShmFile, id: u32, env: &[&str], dir: &TempDir) -> Agent {
    let cidr = format!("10.78.0.{}/24", id + 1);
    let mut wrapper = vec!["env"];
    wrapper.extend_from_slice(env);
    // `env` execs the agent, so its pid is the child's and wait_ready applies.
    let mut a = Agent::spawn_wrapped(ns, &wrapper, &shm.path, id, &["--address", &cidr], dir);
    a.wait_ready();
    a
}

#[test]
fn agent_reports_ready_peers_and_feeds_the_watchdog() {
    if !require_root("agent_reports_ready_peers_and_feeds_the_watchdog") {
        return;
    }
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let (ns0, ns1) = (Netns::new(), Netns::new());
    let mut notify = NotifySocket::bind(&dir);
    let env = notify.env();
    let a0 = agent_with_env(&ns0, &shm, 0, &[&env, "WATCHDOG_USEC=200000"], &dir);

    let ready = notify.wait_for("READY=1", READY_TIMEOUT, |m| m.lines().any(|l| l == "READY=1"));
    let status = status_of(&ready).expect("READY=1 comes with STATUS=");
    assert!(status.starts_with("peer 0 on ") && status.contains("tap-shm"), "{status}");
    assert!(status.ends_with(": 0 peers up"), "{status}");
    // Pings every 100 ms: a few arrive while nothing else happens.
    for _ in 0..3 {
        notify.wait_new("WATCHDOG=1", Duration::from_secs(10), |m| m == "WATCHDOG=1\n");
    }

    // A peer comes: the status names it.
    let a1 = agent_with_env(&ns1, &shm, 1, &[], &dir);
    let up = notify.wait_for("a status with peer 1 up", Duration::from_secs(10), |m| {
        status_of(m).is_some_and(|s| s.ends_with(": 1 peer up (1)"))
    });
    assert!(!up.contains("READY=1"), "{up}");
    // ... and goes: the status says so.
    assert!(a1.terminate().success());
    notify.wait_new("a status with no peer up", Duration::from_secs(10), |m| {
        status_of(m).is_some_and(|s| s.ends_with(": 0 peers up"))
    });
    let pings = notify.count("WATCHDOG=1");

    // Leaving: STOPPING=1.
    assert!(a0.terminate().success());
    notify.wait_new("STOPPING=1", Duration::from_secs(10), |m| m.starts_with("STOPPING=1\n"));
    assert!(notify.count("WATCHDOG=1") >= pings && pings >= 3);
}

#[test]
fn agent_ignores_a_watchdog_meant_for_another_process() {
    if !require_root("agent_ignores_a_watchdog_meant_for_another_process") {
        return;
    }
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let (ns0, ns1) = (Netns::new(), Netns::new());
    let mut notify = NotifySocket::bind(&dir);
    let env = notify.env();
    // Pings would be due every 5 ms, but WATCHDOG_PID is our parent's business (pid 1).
    let a0 = agent_with_env(&ns0, &shm, 0, &[&env, "WATCHDOG_USEC=10000", "WATCHDOG_PID=1"], &dir);
    notify.wait_for("READY=1", READY_TIMEOUT, |m| m.lines().any(|l| l == "READY=1"));
    // Let the event loop run through a peer coming up (many passes, many heartbeats).
    let _a1 = agent_with_env(&ns1, &shm, 1, &[], &dir);
    notify.wait_for("a status with peer 1 up", Duration::from_secs(10), |m| {
        status_of(m).is_some_and(|s| s.ends_with(": 1 peer up (1)"))
    });
    assert!(a0.terminate().success());
    notify.wait_new("STOPPING=1", Duration::from_secs(10), |m| m.starts_with("STOPPING=1\n"));
    assert_eq!(notify.count("WATCHDOG=1"), 0, "{:#?}", notify.messages);
}
