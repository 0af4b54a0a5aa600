//! Helpers for the integration tests: network namespaces, region files, agent processes, and
//! bounded waits, each cleaned up by a guard's `Drop` (also when a test panics).
//!
//! Names are unique per test process and per call (`ivt<pid % 10000><n>` for namespaces,
//! `/dev/shm/ivnet-test-<pid>-<n>` for regions), so the test functions of one file, which
//! `cargo test` runs in parallel threads, never collide. Nothing here synchronises by sleeping:
//! every wait polls a condition against a deadline.

#![allow(dead_code)]

pub mod fdstore;
pub mod server;
pub mod vm;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The `ivnet` binary built for this test run.
pub const IVNET: &str = env!("CARGO_BIN_EXE_ivnet");

/// Environment variable that turns "skip without root" into a failure (CI sets it).
pub const REQUIRE_ENV: &str = "IVNET_REQUIRE_PRIVILEGED_TESTS";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Writes a line straight to the process's stderr, past libtest's output capture, so that it
/// shows in a normal `cargo test` run (skips, measured times).
pub fn report(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

/// True when this process may create namespaces and TAPs. Otherwise prints
/// `SKIP <test>: needs root and /dev/net/tun (...)` and returns false, or panics when
/// `IVNET_REQUIRE_PRIVILEGED_TESTS=1` so CI can never skip silently.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut missing = Vec::new();
    if euid != 0 {
        missing.push(format!("running as uid {euid}"));
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun is missing".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: needs root and /dev/net/tun ({why}) but {REQUIRE_ENV}=1 forbids skipping");
    }
    report(&format!("SKIP {test}: needs root and /dev/net/tun ({why})"));
    false
}

// ---------------------------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------------------------

/// A scratch directory (agent logs, files for unprivileged runs), removed on drop.
pub struct TempDir {
    /// Its path.
    pub path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/ivnet-test-<pid>-<n>`.
    pub fn new() -> TempDir {
        loop {
            let path = std::env::temp_dir().join(format!(
                "ivnet-test-{}-{}",
                std::process::id(),
                next_id()
            ));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create {}: {e}", path.display()),
            }
        }
    }

    /// Makes the directory writable by everyone (for runs as an unprivileged user).
    pub fn open_to_all(&self) {
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", self.path.display()));
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A network namespace with a unique short name, deleted (with every process left in it) on
/// drop.
pub struct Netns {
    /// Its name (`ip netns` name, also `/run/netns/<name>`).
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up.
    pub fn new() -> Netns {
        for _ in 0..100 {
            let name = format!("ivt{}{}", std::process::id() % 10000, next_id());
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .expect("running `ip netns add` (is iproute2 installed?)");
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("exists") {
                    continue;
                }
                panic!("ip netns add {name}: {err}");
            }
            let ns = Netns { name };
            ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
            return ns;
        }
        panic!("no free namespace name after 100 tries");
    }

    /// A command that runs `argv` inside the namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    /// Runs `argv` in the namespace (10 s limit) and panics unless it succeeds.
    pub fn exec_ok(&self, argv: &[&str]) -> Output {
        let out = run_with_timeout(&mut self.command(argv), Duration::from_secs(10));
        assert!(
            out.status.success(),
            "in {}: {:?} failed ({}): {}{}",
            self.name,
            argv,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Whether interface `ifname` exists in the namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        let out = run_with_timeout(
            &mut self.command(&["ip", "link", "show", "dev", ifname]),
            Duration::from_secs(10),
        );
        out.status.success()
    }

    /// Writes `value` to `/proc/sys/<key>` (dots as slashes, like sysctl) inside the namespace;
    /// false if the key does not exist (e.g. IPv6 disabled in the kernel). Uses only `sh`, so
    /// procps need not be installed.
    pub fn sysctl(&self, key: &str, value: &str) -> bool {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let out = run_with_timeout(
            &mut self.command(&[
                "sh",
                "-c",
                "[ -e \"$1\" ] || exit 3; echo \"$2\" > \"$1\"",
                "sh",
                &path,
                value,
            ]),
            Duration::from_secs(10),
        );
        match out.status.code() {
            Some(0) => true,
            Some(3) => false,
            _ => panic!(
                "in {}: cannot set {key}={value}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Turns IPv6 off in the namespace (for interfaces made afterwards too), so that no
    /// neighbour discovery, MLD or router solicitation blurs a segment's frame counters. A
    /// kernel without IPv6 is just as quiet.
    pub fn disable_ipv6(&self) {
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes a failing test left behind (ping, a stray agent) keep the namespace alive.
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions; the pid is in our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!(
                    "warning: ip netns del {}: {}",
                    self.name,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
    }
}

/// A region file name under /dev/shm, removed on drop. The file is not created: the first
/// agent given `--size` creates it.
pub struct ShmFile {
    /// Its path.
    pub path: PathBuf,
}

impl ShmFile {
    /// Picks an unused `/dev/shm/ivnet-test-<pid>-<n>`.
    pub fn new() -> ShmFile {
        loop {
            let path =
                PathBuf::from(format!("/dev/shm/ivnet-test-{}-{}", std::process::id(), next_id()));
            if !path.exists() {
                return ShmFile { path };
            }
        }
    }

    /// The path as a string, for command lines.
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("test paths are UTF-8")
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

/// An `ivnet agent` running in a namespace, its stderr in a log file. Dropping it sends SIGTERM,
/// then SIGKILL after a deadline; if the test is panicking, the log is printed.
pub struct Agent {
    child: Option<Child>,
    /// Peer id it was started with.
    pub peer_id: u32,
    /// Namespace name.
    pub ns: String,
    /// Its region file.
    pub shm: PathBuf,
    /// Where its stderr goes.
    pub log_path: PathBuf,
    label: String,
}

/// How long an agent gets to leave cleanly after SIGTERM before it is killed.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long an agent gets to come up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

impl Agent {
    /// Starts `ivnet -v agent --shm SHM --size 64M --peer-id ID EXTRA...` in `ns`, logging to a
    /// file in `logs`. Does not wait for it; see [`Agent::wait_ready`].
    pub fn spawn(ns: &Netns, shm: &Path, peer_id: u32, extra: &[&str], logs: &TempDir) -> Agent {
        Agent::spawn_wrapped(ns, &[], shm, peer_id, extra, logs)
    }

    /// Like [`Agent::spawn`], with `wrapper` (a command and its flags) in front of `ivnet`, e.g.
    /// `unshare --pid --fork --kill-child`. The process signalled and waited for is then the
    /// wrapper, and the pid in the peer table is not [`Agent::pid`], so [`Agent::wait_ready`]
    /// does not apply: wait for the slot another way.
    pub fn spawn_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        shm: &Path,
        peer_id: u32,
        extra: &[&str],
        logs: &TempDir,
    ) -> Agent {
        let n = next_id();
        let log_path = logs.join(&format!("agent-{}-peer{}-{}.log", ns.name, peer_id, n));
        let log = File::create(&log_path).expect("creating agent log");
        let id = peer_id.to_string();
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.extend_from_slice(&[
            IVNET,
            "-v",
            "agent",
            "--shm",
            shm.to_str().expect("UTF-8 path"),
            "--size",
            "64M",
            "--peer-id",
            &id,
        ]);
        argv.extend_from_slice(extra);
        // Test agents stay off the host's default control socket (/run/ivnet/tap-shm.sock)
        // unless a test asks for one.
        if !extra.contains(&"--control-socket") {
            argv.extend_from_slice(&["--control-socket", "none"]);
        }
        let child = ns
            .command(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawning ivnet agent");
        Agent {
            child: Some(child),
            peer_id,
            ns: ns.name.clone(),
            shm: shm.to_path_buf(),
            log_path,
            label: format!("agent peer {peer_id} in {} ({argv:?})", ns.name),
        }
    }

    /// Starts an agent and waits until it is up.
    pub fn start(ns: &Netns, shm: &Path, peer_id: u32, extra: &[&str], logs: &TempDir) -> Agent {
        let mut a = Agent::spawn(ns, shm, peer_id, extra, logs);
        a.wait_ready();
        a
    }

    /// Process id (the agent itself: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent still owned").id()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Panics (with the log) if the agent has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("agent still owned");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{} exited with {st}; its log:\n{}", self.label, self.log());
        }
    }

    /// Waits until the peer table shows this process's slot `up` (polling `ivnet status`).
    pub fn wait_ready(&mut self) {
        let pid = self.pid() as u64;
        let start = Instant::now();
        loop {
            self.assert_running();
            if let Some(st) = try_status_json(&self.shm) {
                if peer(&st, self.peer_id)
                    .is_some_and(|p| p["state"] == "up" && p["pid"].as_u64() == Some(pid))
                {
                    return;
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "{} did not come up within {READY_TIMEOUT:?}; its log:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the agent.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it
        // cannot have been reused.
        let r = unsafe { libc::kill(self.pid() as i32, sig) };
        assert_eq!(r, 0, "kill({}, {sig}): {}", self.pid(), std::io::Error::last_os_error());
    }

    /// SIGKILL, and reap it.
    pub fn kill_hard(mut self) {
        self.signal(libc::SIGKILL);
        let mut child = self.child.take().expect("agent still owned");
        let _ = child.wait();
    }

    /// SIGTERM and wait (up to [`TERM_GRACE`]); returns its exit status, or panics if it did not
    /// exit in time (after killing it).
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent still owned");
        match stop(&mut child) {
            Ok(st) => st,
            Err(()) => panic!("{} ignored SIGTERM for {TERM_GRACE:?}; log:\n{}", self.label, {
                self.log()
            }),
        }
    }
}

/// SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL. Err if SIGKILL was needed.
fn stop(child: &mut Child) -> Result<ExitStatus, ()> {
    if let Ok(Some(st)) = child.try_wait() {
        return Ok(st);
    }
    // SAFETY: kill has no memory-safety preconditions; the child is unreaped, so its pid is ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(())
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let clean = stop(&mut child).is_ok();
            if !clean {
                eprintln!("{} ignored SIGTERM for {TERM_GRACE:?} and was killed", self.label);
            }
        }
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}-----", self.label, self.log());
        }
    }
}

/// A region file, a scratch directory and some namespaces, with the agents started in them.
/// Fields drop in order: agents first, then namespaces, then the files.
pub struct Lab {
    /// Running agents, by index of their namespace (None: not running).
    pub agents: Vec<Option<Agent>>,
    /// The namespaces.
    pub ns: Vec<Netns>,
    /// The region file.
    pub shm: ShmFile,
    /// Logs and scratch files.
    pub dir: TempDir,
}

impl Lab {
    /// `n` namespaces and a region file name.
    pub fn new(n: usize) -> Lab {
        Lab {
            agents: (0..n).map(|_| None).collect(),
            ns: (0..n).map(|_| Netns::new()).collect(),
            shm: ShmFile::new(),
            dir: TempDir::new(),
        }
    }

    /// Like [`Lab::new`], with IPv6 off in every namespace ([`Netns::disable_ipv6`]).
    pub fn quiet(n: usize) -> Lab {
        let lab = Lab::new(n);
        for ns in &lab.ns {
            ns.disable_ipv6();
        }
        lab
    }

    /// The address of member `i`: 10.77.0.(i+1).
    pub fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Starts member `i` (peer id `i`, address `10.77.0.(i+1)/24`) with extra flags and waits
    /// until it is up.
    pub fn start(&mut self, i: usize, extra: &[&str]) {
        let a = self.spawn(i, extra);
        self.agents[i] = Some(a);
        self.agents[i].as_mut().expect("just set").wait_ready();
    }

    /// Starts member `i` without waiting.
    pub fn spawn(&mut self, i: usize, extra: &[&str]) -> Agent {
        let cidr = format!("{}/24", Lab::addr(i));
        let mut args = vec!["--address", &cidr];
        args.extend_from_slice(extra);
        Agent::spawn(&self.ns[i], &self.shm.path, i as u32, &args, &self.dir)
    }

    /// Starts every member, all at once (they race to initialise the region), and waits until
    /// each is up.
    pub fn start_all(&mut self, extra: &[&str]) {
        for i in 0..self.ns.len() {
            let a = self.spawn(i, extra);
            self.agents[i] = Some(a);
        }
        for a in self.agents.iter_mut().flatten() {
            a.wait_ready();
        }
    }

    /// The agent of member `i`.
    pub fn agent(&mut self, i: usize) -> &mut Agent {
        self.agents[i].as_mut().expect("agent running")
    }

    /// `ivnet status --json` of the region.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.shm.path)
    }

    /// Waits until `from` gets a ping reply from member `to` (the first exchange after start-up
    /// also resolves ARP and gives every agent time to see the others' links up).
    pub fn wait_reachable(&self, from: usize, to: usize, timeout: Duration) -> Duration {
        let target = Lab::addr(to);
        wait_until(&format!("member {from} reaches {target}"), timeout, || {
            ping_once(&self.ns[from], &target, Duration::from_millis(500))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting and running
// ---------------------------------------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds; returns how long that took, or None at the deadline.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Like [`poll_until`] but panics, naming `what`, at the deadline.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) -> Duration {
    poll_until(timeout, cond).unwrap_or_else(|| panic!("timed out after {timeout:?}: {what}"))
}

/// Runs a command with stdout and stderr captured; kills it if it outlives `timeout` (then the
/// returned status is the kill's).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                break child.wait().expect("wait after kill");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Result of a `ping` run.
#[derive(Debug)]
pub struct Ping {
    /// Requests sent.
    pub transmitted: u32,
    /// Replies received.
    pub received: u32,
    /// Everything ping printed.
    pub output: String,
}

/// `ip netns exec NS ping -c COUNT -W 1 -i 0.2 ADDR`, bounded in time.
pub fn ping(ns: &Netns, addr: &str, count: u32) -> Ping {
    let c = count.to_string();
    let limit = Duration::from_millis(200 * count as u64 + 5000);
    let out = run_with_timeout(
        &mut ns.command(&["ping", "-n", "-c", &c, "-W", "1", "-i", "0.2", addr]),
        limit,
    );
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (mut transmitted, mut received) = (0, 0);
    for line in text.lines().filter(|l| l.contains("packets transmitted")) {
        let num = |key: &str| {
            line.split(',')
                .find(|p| p.contains(key))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        transmitted = num("transmitted");
        received = num("received");
    }
    Ping { transmitted, received, output: text }
}

/// Pings `count` times and asserts that every request got its reply.
pub fn assert_ping(ns: &Netns, addr: &str, count: u32) {
    let p = ping(ns, addr, count);
    assert!(
        p.transmitted == count && p.received == count,
        "ping {addr} from {}: {}/{} replies\n{}",
        ns.name,
        p.received,
        count,
        p.output
    );
}

/// One ping with a reply deadline of `wait` (fractional seconds are fine for iputils).
pub fn ping_once(ns: &Netns, addr: &str, wait: Duration) -> bool {
    let w = format!("{:.3}", wait.as_secs_f64());
    let out = run_with_timeout(
        &mut ns.command(&["ping", "-n", "-q", "-c", "1", "-W", &w, addr]),
        wait + Duration::from_secs(5),
    );
    out.status.success()
}

/// `ivnet status --shm PATH --json`, or None if it fails (file missing or not initialised yet).
pub fn try_status_json(path: &Path) -> Option<serde_json::Value> {
    let out = run_with_timeout(
        Command::new(IVNET).args(["status", "--json", "--shm"]).arg(path),
        Duration::from_secs(10),
    );
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `ivnet status --shm PATH --json`; panics if it fails.
pub fn status_json(path: &Path) -> serde_json::Value {
    let out = run_with_timeout(
        Command::new(IVNET).args(["status", "--json", "--shm"]).arg(path),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "ivnet status --json --shm {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// The entry of peer `id` in a status document.
pub fn peer(status: &serde_json::Value, id: u32) -> Option<&serde_json::Value> {
    status["peers"].as_array()?.iter().find(|p| p["id"].as_u64() == Some(id as u64))
}

/// The entry of ring `src -> dst` in a status document.
pub fn ring(status: &serde_json::Value, src: u32, dst: u32) -> Option<&serde_json::Value> {
    status["rings"]
        .as_array()?
        .iter()
        .find(|r| r["src"].as_u64() == Some(src as u64) && r["dst"].as_u64() == Some(dst as u64))
}

/// A counter of ring `src -> dst` (0 if the ring is not listed).
pub fn ring_counter(status: &serde_json::Value, src: u32, dst: u32, field: &str) -> u64 {
    ring(status, src, dst).and_then(|r| r[field].as_u64()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Code inside a namespace
// ---------------------------------------------------------------------------------------------

/// Work running on a thread that has entered a network namespace.
pub struct NetnsTask<T> {
    rx: mpsc::Receiver<std::thread::Result<T>>,
    what: String,
}

impl<T> NetnsTask<T> {
    /// Waits for the result; panics if the work panicked or did not finish within `timeout`.
    /// (On timeout the thread is left behind; its sockets' own timeouts end it.)
    pub fn join(self, timeout: Duration) -> T {
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("{} did not finish within {timeout:?}", self.what),
        }
    }
}

/// Runs `f` on a new thread that has joined namespace `ns` with `setns(CLONE_NEWNET)`. Only that
/// thread changes namespace, so sockets it opens live in `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &Netns,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> NetnsTask<T> {
    let (tx, rx) = mpsc::channel();
    let path = PathBuf::from("/run/netns").join(&ns.name);
    let label = format!("{what} (in {})", ns.name);
    std::thread::Builder::new()
        .name(label.clone())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let fd =
                    File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                // SAFETY: fd is an open namespace file for the life of this call; setns only
                // changes the calling thread's network namespace.
                let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
                f()
            }));
            let _ = tx.send(r);
        })
        .expect("spawning a thread");
    NetnsTask { rx, what: label }
}

// ---------------------------------------------------------------------------------------------
// TCP transfer
// ---------------------------------------------------------------------------------------------

/// A fast deterministic byte stream (xorshift64*), so transfers are not compressible zeros.
pub struct PseudoRandom(u64);

impl PseudoRandom {
    /// A generator with a nonzero seed.
    pub fn new(seed: u64) -> Self {
        PseudoRandom(seed | 1)
    }

    /// Fills `buf` (length a multiple of 8).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_exact_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// What one end of a transfer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferEnd {
    /// Bytes moved.
    pub bytes: u64,
    /// SHA-256 of them.
    pub sha256: [u8; 32],
}

/// Per-operation socket timeout of a transfer: a stalled segment fails the test.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// A kernel TCP receiver in namespace `ns`: accepts one connection on `addr` (by `deadline`) and
/// hashes the stream to its end. Returns once it listens.
pub fn tcp_receiver(ns: &Netns, addr: SocketAddr, deadline: Instant) -> NetnsTask<TransferEnd> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let receiver = in_netns(ns, "TCP receiver", move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let _ = ready_tx.send(());
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection to {addr} in time");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept on {addr}: {e}"),
            }
        };
        s.set_nonblocking(false).expect("blocking stream");
        s.set_read_timeout(Some(SOCKET_TIMEOUT)).expect("read timeout");
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("reading from {peer} after {total} bytes: {e}"));
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        TransferEnd { bytes: total, sha256: h.finalize().into() }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("receiver did not start listening");
    receiver
}

/// Sends `bytes` pseudo-random bytes over TCP from namespace `client` to a listener at
/// `server_addr:port` in namespace `server`; returns both ends' byte counts and SHA-256 digests
/// and the elapsed time. The whole exchange must finish within `timeout`.
pub fn tcp_transfer(
    server: &Netns,
    client: &Netns,
    server_addr: &str,
    port: u16,
    bytes: u64,
    seed: u64,
    timeout: Duration,
) -> (TransferEnd, TransferEnd, Duration) {
    let addr: SocketAddr = format!("{server_addr}:{port}").parse().expect("socket address");
    let deadline = Instant::now() + timeout;
    let receiver = tcp_receiver(server, addr, deadline);
    let sender = in_netns(client, "TCP sender", move || {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, SOCKET_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_write_timeout(Some(SOCKET_TIMEOUT)).expect("write timeout");
        (send_stream(&mut s, addr, bytes, seed), start.elapsed())
    });
    let left = deadline.saturating_duration_since(Instant::now());
    let (sent, elapsed) = sender.join(left);
    let left = deadline.saturating_duration_since(Instant::now());
    let received = receiver.join(left.max(Duration::from_secs(1)));
    (sent, received, elapsed)
}

/// Connects from inside a namespace thread, retrying while the peer is not listening yet (for
/// up to `timeout`); the stream gets the transfer's socket timeouts.
pub fn connect_retry(addr: SocketAddr, timeout: Duration) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_read_timeout(Some(SOCKET_TIMEOUT)).expect("read timeout");
                s.set_write_timeout(Some(SOCKET_TIMEOUT)).expect("write timeout");
                return s;
            }
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}

/// Kernel TCP sender in `ns`: `bytes` pseudo-random bytes from `seed` to `addr` (connecting
/// for up to `connect_timeout`); returns the digest after the other end has closed too (a
/// receiver that closes after reading everything: EOF here means it got it all).
pub fn kernel_tcp_send(
    ns: &Netns,
    addr: SocketAddr,
    bytes: u64,
    seed: u64,
    connect_timeout: Duration,
) -> NetnsTask<TransferEnd> {
    in_netns(ns, "kernel TCP sender", move || {
        let mut s = connect_retry(addr, connect_timeout);
        let sent = send_stream(&mut s, addr, bytes, seed);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap_or_else(|e| panic!("waiting for {addr} to close: {e}"));
        sent
    })
}

/// Writes `bytes` pseudo-random bytes from `seed` on `s` (connected to `addr`), then shuts its
/// sending side; returns the count and their digest.
fn send_stream(s: &mut TcpStream, addr: SocketAddr, bytes: u64, seed: u64) -> TransferEnd {
    let mut rng = PseudoRandom::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf);
        s.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("writing to {addr} with {left} of {bytes} bytes left: {e}"));
        h.update(&buf[..n]);
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    TransferEnd { bytes, sha256: h.finalize().into() }
}

/// Hex form of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes `path` writable by everyone (for runs as an unprivileged user).
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Creates `path` with `bytes` as its whole content.
pub fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.write_all(bytes).expect("writing test file");
}

// ---------------------------------------------------------------------------------------------
// Stack peers (`ivnet stack`), also as an unprivileged user
// ---------------------------------------------------------------------------------------------

/// An account without privileges to run processes as.
#[derive(Debug, Clone)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

fn getent_user(name: &str) -> Option<User> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<&str> = line.trim().split(':').collect();
    Some(User { name: name.into(), uid: f.get(2)?.parse().ok()?, gid: f.get(3)?.parse().ok()? })
}

/// `nobody` (uid 65534 on Debian), or a system user `ivnet-test` created for the purpose when
/// there is no `nobody`. Needs root to create the user.
pub fn unprivileged_user() -> User {
    if let Some(u) = getent_user("nobody").filter(|u| u.uid != 0) {
        return u;
    }
    if let Some(u) = getent_user("ivnet-test") {
        return u;
    }
    let out = run_with_timeout(
        Command::new("useradd").args(["--system", "--no-create-home", "ivnet-test"]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "useradd ivnet-test: {}", String::from_utf8_lossy(&out.stderr));
    getent_user("ivnet-test").expect("the user just created")
}

/// Makes `dir` belong to `user` and copies the `ivnet` binary into it (so the user can run it
/// whatever the permissions of the build tree); returns the copy's path.
pub fn prepare_for_user(dir: &TempDir, user: &User) -> PathBuf {
    std::os::unix::fs::chown(&dir.path, Some(user.uid), Some(user.gid))
        .unwrap_or_else(|e| panic!("chown {} to {}: {e}", dir.path.display(), user.name));
    chmod(&dir.path, 0o755);
    let bin = dir.join("ivnet");
    fs::copy(IVNET, &bin).unwrap_or_else(|e| panic!("copying {IVNET}: {e}"));
    chmod(&bin, 0o755);
    bin
}

/// The real, effective, saved and filesystem uids of a process (`Uid:` of /proc/PID/status).
pub fn proc_uids(pid: u32) -> Option<[u32; 4]> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Uid:"))?;
    let v: Vec<u32> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    v.try_into().ok()
}

/// A running `ivnet -v stack ...`, optionally as another user (through `setpriv`, which really
/// drops root: new real and effective ids, no supplementary groups, no capabilities). Its
/// stdout and stderr go to files. Dropping it sends SIGTERM, then SIGKILL after a deadline; if
/// the test is panicking, its output is printed.
pub struct StackProc {
    child: Option<Child>,
    /// Where its stdout goes.
    pub out_path: PathBuf,
    /// Where its stderr (the log) goes.
    pub log_path: PathBuf,
    label: String,
}

impl StackProc {
    /// Starts `BIN -v stack ARGS...` as `user` (None: as this process's user), with its output
    /// in files in `dir`.
    pub fn spawn(bin: &Path, user: Option<&User>, dir: &TempDir, args: &[&str]) -> StackProc {
        let n = next_id();
        let out_path = dir.join(&format!("stack-{n}.out"));
        let log_path = dir.join(&format!("stack-{n}.log"));
        let out = File::create(&out_path).expect("creating stack output file");
        let log = File::create(&log_path).expect("creating stack log file");
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", u.uid))
                    .arg(format!("--regid={}", u.gid))
                    .args(["--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["-v", "stack"]).args(args);
        let label = format!("{cmd:?}");
        let child = cmd
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {label}: {e}"));
        StackProc { child: Some(child), out_path, log_path, label }
    }

    /// Its process id (setpriv execs the stack, so this is the stack itself).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("still owned").id()
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Panics (with its output) if it has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("still owned");
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{} exited with {st}\nstdout:\n{}\nlog:\n{}",
                self.label,
                self.stdout(),
                self.log()
            );
        }
    }

    /// Waits until its stdout has a line for which `pred` holds; returns that line.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.stdout().lines().find(|l| pred(l)) {
                return l.to_string();
            }
            self.assert_running();
            if start.elapsed() > timeout {
                panic!(
                    "{}: no line {what} within {timeout:?}\nstdout:\n{}\nlog:\n{}",
                    self.label,
                    self.stdout(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log has a line containing `needle` (e.g. "joined").
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_log_count(needle, 1, timeout);
    }

    /// Waits until `needle` occurs at least `count` times in the log (e.g. one "peer 2 is
    /// down" per tool that used slot 2).
    pub fn wait_log_count(&mut self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        while self.log().matches(needle).count() < count {
            self.assert_running();
            if start.elapsed() > timeout {
                panic!(
                    "{}: fewer than {count} x {needle:?} in its log within {timeout:?}:\n{}",
                    self.label,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for it to exit by itself (killing it and panicking after `timeout`); returns the
    /// status, stdout and log.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let mut child = self.child.take().expect("still owned");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return (st, self.stdout(), self.log());
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {timeout:?}\nstdout:\n{}\nlog:\n{}",
                    self.label,
                    self.stdout(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait (up to [`TERM_GRACE`]); returns status, stdout and log, or panics if
    /// it did not stop in time.
    pub fn terminate(mut self) -> (ExitStatus, String, String) {
        let mut child = self.child.take().expect("still owned");
        match stop(&mut child) {
            Ok(st) => (st, self.stdout(), self.log()),
            Err(()) => {
                panic!("{} ignored SIGTERM for {TERM_GRACE:?}; log:\n{}", self.label, self.log())
            }
        }
    }
}

impl Drop for StackProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if stop(&mut child).is_err() {
                eprintln!("{} ignored SIGTERM for {TERM_GRACE:?} and was killed", self.label);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} -----\nstdout:\n{}\nlog:\n{}-----",
                self.label,
                self.stdout(),
                self.log()
            );
        }
    }
}

/// The `sha256=` value of a `sent`/`received` line of `ivnet stack send`/`recv`.
pub fn sha_field(line: &str) -> String {
    line.split("sha256=").nth(1).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The byte count of a `sent N bytes ...`/`received N bytes ...` line.
pub fn bytes_field(line: &str) -> u64 {
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
}
