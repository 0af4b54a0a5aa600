//! Helpers for the tests of `ivnet server` (QEMU's ivshmem-server protocol) and of agents that
//! join through it: a server process with its log, a raw protocol client over the UNIX socket,
//! eventfd probes, agents started with `--socket`, and a process's CPU time.
//!
//! Like the rest of `tests/common`, everything is cleaned up by a guard's `Drop` (also when a
//! test panics) and every wait has a deadline.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ivnet::server::protocol::{Message, MessageReader, ReadOutcome};

use super::{
    next_id, poll_until, status_json, stop, try_status_json, Agent, Netns, ShmFile, TempDir, IVNET,
    READY_TIMEOUT, TERM_GRACE,
};

/// How long a protocol message may take to arrive before a test gives up on it.
pub const MSG_TIMEOUT: Duration = Duration::from_secs(10);

/// `b"IVNETSEG"`, the region magic at offset 0.
pub const REGION_MAGIC: &[u8; 8] = b"IVNETSEG";

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// A running `ivnet -v server`, its socket in a scratch directory, its region a fresh file in
/// /dev/shm, its stderr in a log file. Dropping it sends SIGTERM (then SIGKILL after a deadline)
/// and removes the region file; if the test is panicking, the log is printed.
pub struct Server {
    child: Option<Child>,
    /// The UNIX socket it listens on.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log_path: PathBuf,
    /// The region file it created (removed on drop, after the server stopped).
    pub shm: ShmFile,
    label: String,
}

/// Options for [`Server::start_with`].
#[derive(Default, Clone)]
pub struct ServerOpts<'a> {
    /// Extra command-line flags (`--vectors 3`, `--max-peers 2`, ...).
    pub extra: &'a [&'a str],
    /// Soft and hard RLIMIT_NOFILE for the server process (None: inherited).
    pub nofile: Option<u64>,
}

impl Server {
    /// Starts `ivnet -v server --socket DIR/ivs-N.sock --shm /dev/shm/... --size 64M EXTRA...`
    /// and waits until it listens.
    pub fn start(dir: &TempDir, extra: &[&str]) -> Server {
        Server::start_with(dir, &ServerOpts { extra, nofile: None })
    }

    /// Like [`Server::start`], with the options of [`ServerOpts`].
    pub fn start_with(dir: &TempDir, opts: &ServerOpts) -> Server {
        let n = next_id();
        let socket = dir.join(&format!("ivs-{n}.sock"));
        let log_path = dir.join(&format!("server-{n}.log"));
        let shm = ShmFile::new();
        let log = File::create(&log_path).expect("creating server log");
        let mut argv: Vec<&str> = vec![
            "-v",
            "server",
            "--socket",
            socket.to_str().expect("UTF-8 path"),
            "--shm",
            shm.arg(),
            "--size",
            "64M",
        ];
        argv.extend_from_slice(opts.extra);
        let mut cmd = Command::new(IVNET);
        cmd.args(&argv).stdin(Stdio::null()).stdout(log.try_clone().expect("dup log")).stderr(log);
        if let Some(limit) = opts.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setrlimit, which is async-signal-safe; it touches no memory shared with the parent.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawning ivnet server");
        let label = format!("ivnet {argv:?}");
        let mut s = Server { child: Some(child), socket, log_path, shm, label };
        // "serving ..." is logged once the socket is bound and listening.
        let ok = poll_until(READY_TIMEOUT, || {
            s.assert_running();
            s.log().contains("serving ")
        });
        if ok.is_none() {
            panic!(
                "{} did not start listening within {READY_TIMEOUT:?}; log:\n{}",
                s.label,
                s.log()
            );
        }
        s
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server still owned").id()
    }

    /// The socket path as a string, for command lines.
    pub fn socket_arg(&self) -> &str {
        self.socket.to_str().expect("UTF-8 path")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("server still owned");
        matches!(child.try_wait(), Ok(None))
    }

    /// Panics (with the log) if the server has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("server still owned");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{} exited with {st}; its log:\n{}", self.label, self.log());
        }
    }

    /// Number of log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the log has at least `count` lines containing `needle`; panics (with the log)
    /// at the deadline or if the server exits.
    pub fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let ok = poll_until(timeout, || {
            self.assert_running();
            self.count_log(needle) >= count
        });
        if ok.is_none() {
            panic!(
                "timed out after {timeout:?} waiting for {count} log line(s) with {needle:?} from \
                 {}; log:\n{}",
                self.label,
                self.log()
            );
        }
    }

    /// Waits until the server has logged that peer `id` is gone: `peer ID left` (it closed the
    /// connection) or `peer ID: connection lost while sending` (it vanished while the server
    /// had a message for it), `count` times in all.
    pub fn wait_left(&mut self, id: u32, count: usize, timeout: Duration) {
        let (a, b) = (format!("peer {id} left"), format!("peer {id}: connection lost"));
        let ok = poll_until(timeout, || {
            self.assert_running();
            self.log().lines().filter(|l| l.contains(&a) || l.contains(&b)).count() >= count
        });
        if ok.is_none() {
            panic!(
                "timed out after {timeout:?} waiting for the server to log that peer {id} left; \
                 log:\n{}",
                self.log()
            );
        }
    }

    /// The peer-table slot the server paired with doorbell id `id` (read from the region's
    /// peer table, where the server records the pair before it announces the id).
    pub fn slot_of(&self, id: u32) -> Option<u32> {
        let region = ivnet::backend::file::open_read_only(&self.shm.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.shm.path.display()));
        region.slot_of_doorbell_id(id)
    }

    /// `ivnet status --json` of the server's region.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.shm.path)
    }

    /// SIGTERM, and waits for a clean exit; panics if it needed SIGKILL or failed.
    pub fn terminate(mut self) {
        let mut child = self.child.take().expect("server still owned");
        match stop(&mut child) {
            Ok(st) => {
                assert!(st.success(), "{} exited with {st}; log:\n{}", self.label, self.log())
            }
            Err(()) => panic!("{} ignored SIGTERM for {TERM_GRACE:?}; log:\n{}", self.label, {
                self.log()
            }),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if stop(&mut child).is_err() {
                eprintln!("{} ignored SIGTERM for {TERM_GRACE:?} and was killed", self.label);
            }
        }
        let _ = fs::remove_file(&self.socket);
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}-----", self.label, self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A raw protocol client
// ---------------------------------------------------------------------------------------------

/// What one receive attempt gave.
#[derive(Debug)]
pub enum Recv {
    /// A whole message (with its descriptor, if any).
    Msg(Message),
    /// The server closed the connection.
    Eof,
    /// Nothing arrived in time.
    Timeout,
}

/// What the server sent a new client on connect (QEMU's ivshmem-spec, steps 1-5).
pub struct Setup {
    /// Our id.
    pub id: u32,
    /// The region's descriptor (came with -1).
    pub shm: OwnedFd,
    /// Every existing peer's eventfds, by id, in vector order.
    pub peers: BTreeMap<u32, Vec<OwnedFd>>,
    /// Our own eventfds, in vector order.
    pub own: Vec<OwnedFd>,
}

/// A client of the server that speaks the protocol by hand: it reads 8-byte messages and their
/// descriptors (through `ivnet::server::protocol::MessageReader`) and never writes.
pub struct RawClient {
    /// The connection (non-blocking).
    pub stream: UnixStream,
    reader: MessageReader,
}

impl RawClient {
    /// Connects to `socket`.
    pub fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
        stream.set_nonblocking(true).expect("non-blocking socket");
        RawClient { stream, reader: MessageReader::default() }
    }

    /// Receives the next message, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        loop {
            match self.reader.read(self.stream.as_raw_fd()) {
                Ok(ReadOutcome::Message(m)) => return Recv::Msg(m),
                Ok(ReadOutcome::Eof) => return Recv::Eof,
                Ok(ReadOutcome::WouldBlock) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !wait_readable(self.stream.as_raw_fd(), left) {
                        return Recv::Timeout;
                    }
                }
                // A reset counts as the end of the connection.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Recv::Eof,
                Err(e) => panic!("receiving from the server: {e}"),
            }
        }
    }

    /// The next message; panics (naming `what`) at EOF or after [`MSG_TIMEOUT`].
    pub fn expect_msg(&mut self, what: &str) -> Message {
        match self.recv(MSG_TIMEOUT) {
            Recv::Msg(m) => m,
            Recv::Eof => panic!("expected {what}, but the server closed the connection"),
            Recv::Timeout => panic!("expected {what}, but nothing arrived within {MSG_TIMEOUT:?}"),
        }
    }

    /// The next message must be `value` without a descriptor.
    pub fn expect_plain(&mut self, value: i64, what: &str) {
        let m = self.expect_msg(what);
        assert_eq!(m.value, value, "{what}: wrong value");
        assert!(m.fd.is_none(), "{what}: came with a descriptor, the spec says none");
    }

    /// The next message must be `value` with a descriptor, which is returned.
    pub fn expect_with_fd(&mut self, value: i64, what: &str) -> OwnedFd {
        let m = self.expect_msg(what);
        assert_eq!(m.value, value, "{what}: wrong value");
        m.fd.unwrap_or_else(|| panic!("{what}: came without a descriptor"))
    }

    /// The next `vectors` messages must be `id` with an eventfd each (a join notice, or our
    /// interrupt setup); returns the eventfds in vector order.
    pub fn expect_vectors(&mut self, id: u32, vectors: usize, what: &str) -> Vec<OwnedFd> {
        (0..vectors)
            .map(|v| {
                let fd = self.expect_with_fd(id as i64, &format!("{what}, vector {v}"));
                assert!(
                    is_eventfd(&fd),
                    "{what}, vector {v}: {} is not an eventfd",
                    fd_target(&fd)
                );
                fd
            })
            .collect()
    }

    /// Wraps a connection made elsewhere (made non-blocking here).
    pub fn from_stream(stream: UnixStream) -> RawClient {
        stream.set_nonblocking(true).expect("non-blocking socket");
        RawClient { stream, reader: MessageReader::default() }
    }

    /// Reads the whole setup of a new client: version 0 and our id (no descriptors), -1 with the
    /// region, then `vectors` messages (id + eventfd) for each peer in `existing` (in any order
    /// of peers, but each peer's vectors consecutive), then our own id `vectors` times with an
    /// eventfd each. Panics on any deviation.
    pub fn read_setup(&mut self, vectors: usize, existing: &[u32]) -> Setup {
        let s = self.read_setup_any(vectors);
        let got: Vec<u32> = s.peers.keys().copied().collect();
        let mut want = existing.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "step 4 announced these existing peers");
        s
    }

    /// Like [`RawClient::read_setup`], but accepts any set of existing peers (each announced
    /// once, its `vectors` messages consecutive) and returns them.
    pub fn read_setup_any(&mut self, vectors: usize) -> Setup {
        self.expect_plain(0, "protocol version (step 1)");
        self.read_setup_after_version(vectors)
    }

    /// Like [`RawClient::read_setup_any`], but returns None if the server closes the
    /// connection before sending anything (it refused the client: all peer ids in use).
    pub fn read_setup_or_refused(&mut self, vectors: usize) -> Option<Setup> {
        match self.recv(MSG_TIMEOUT) {
            Recv::Eof => None,
            Recv::Timeout => panic!("no protocol version within {MSG_TIMEOUT:?}"),
            Recv::Msg(m) => {
                assert_eq!(m.value, 0, "protocol version (step 1)");
                assert!(m.fd.is_none(), "protocol version came with a descriptor");
                Some(self.read_setup_after_version(vectors))
            }
        }
    }

    /// The rest of a setup after the protocol version (which the caller received itself).
    pub fn read_setup_after_version(&mut self, vectors: usize) -> Setup {
        let m = self.expect_msg("our id (step 2)");
        assert!(m.fd.is_none(), "our id came with a descriptor");
        assert!((0..=65535).contains(&m.value), "id {} out of range", m.value);
        let id = m.value as u32;
        let shm = self.expect_with_fd(-1, "the region (step 3)");
        let mut peers = BTreeMap::new();
        loop {
            let first = self.expect_msg("an existing peer (step 4) or our own vector 0 (step 5)");
            let pid = first.value;
            assert!((0..=65535).contains(&pid), "step 4/5: id {pid} out of range");
            let pid = pid as u32;
            let fd0 = first.fd.unwrap_or_else(|| panic!("peer {pid} vector 0 without descriptor"));
            assert!(is_eventfd(&fd0), "peer {pid} vector 0 is {}", fd_target(&fd0));
            let what =
                if pid == id { "interrupt setup (step 5)" } else { "existing peer (step 4)" };
            let mut fds = vec![fd0];
            fds.extend(self.expect_vectors(pid, vectors - 1, &format!("{what}, id {pid}")));
            if pid == id {
                return Setup { id, shm, peers, own: fds };
            }
            assert!(peers.insert(pid, fds).is_none(), "step 4 announced peer {pid} twice");
        }
    }

    /// Waits for the server to close the connection, discarding messages before it; panics
    /// after `timeout`. Returns how many messages were discarded.
    pub fn expect_eof(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Recv::Msg(_) => n += 1,
                Recv::Eof => return n,
                Recv::Timeout => {
                    panic!("the server did not close the connection within {timeout:?} ({n} msgs)")
                }
            }
        }
    }
}

/// Whether `fd` becomes readable within `timeout`.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
        return r > 0;
    }
}

/// What `/proc/self/fd/N` points to (`anon_inode:[eventfd]`, `/dev/shm/...`).
pub fn fd_target(fd: &OwnedFd) -> String {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("<unreadable: {e}>"))
}

/// Whether `fd` is an eventfd.
pub fn is_eventfd(fd: &OwnedFd) -> bool {
    fd_target(fd) == "anon_inode:[eventfd]"
}

/// Rings an eventfd (adds 1, as QEMU does for a doorbell).
pub fn eventfd_ring(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to a descriptor we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    assert_eq!(n, 8, "writing to eventfd: {}", std::io::Error::last_os_error());
}

/// Whether the eventfd is readable (has a count) right now or within `timeout`; if so, reads it
/// (resetting it) and returns the count.
pub fn eventfd_take(fd: &OwnedFd, timeout: Duration) -> Option<u64> {
    if !wait_readable(fd.as_raw_fd(), timeout) {
        return None;
    }
    let mut buf = [0u8; 8];
    // SAFETY: reads 8 bytes into a live local buffer from a descriptor we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    assert_eq!(n, 8, "reading eventfd: {}", std::io::Error::last_os_error());
    Some(u64::from_ne_bytes(buf))
}

/// Maps the first `len` bytes of the region descriptor and returns them.
pub fn read_region_prefix(fd: &OwnedFd, len: usize) -> Vec<u8> {
    // SAFETY: a fresh shared read-only mapping of `len` bytes of a file we hold open; it is
    // copied out and unmapped before return, so no reference outlives it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap region: {}", std::io::Error::last_os_error());
        let v = std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec();
        libc::munmap(p, len);
        v
    }
}

/// `fstat` of a descriptor: (device, inode, size).
pub fn fd_identity(fd: RawFd) -> (u64, u64, u64) {
    // SAFETY: `st` is plain data filled by fstat on a descriptor the caller holds open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe { libc::fstat(fd, &mut st) };
    assert_eq!(r, 0, "fstat: {}", std::io::Error::last_os_error());
    (st.st_dev, st.st_ino, st.st_size as u64)
}

// ---------------------------------------------------------------------------------------------
// Agents joined through the server
// ---------------------------------------------------------------------------------------------

/// Starts `ivnet -v agent --socket SOCK --address CIDR EXTRA...` in `ns` and waits until the
/// server's region shows this process's peer slot `up`. The peer id (assigned by the server) is
/// in the returned agent's `peer_id`.
pub fn start_socket_agent(
    ns: &Netns,
    server: &Server,
    cidr: &str,
    extra: &[&str],
    logs: &TempDir,
) -> Agent {
    start_socket_agent_at(ns, &server.socket, &server.shm.path, cidr, extra, logs)
}

/// Like [`start_socket_agent`], for a server on `socket` serving the region file `shm` (a server
/// the test runs itself, e.g. to kill and restart it).
pub fn start_socket_agent_at(
    ns: &Netns,
    socket: &Path,
    shm: &Path,
    cidr: &str,
    extra: &[&str],
    logs: &TempDir,
) -> Agent {
    let socket_arg = socket.to_str().expect("UTF-8 path");
    let n = next_id();
    let log_path = logs.join(&format!("agent-{}-sock-{}.log", ns.name, n));
    let log = File::create(&log_path).expect("creating agent log");
    let mut argv: Vec<&str> = vec![IVNET, "-v", "agent", "--socket", socket_arg, "--address", cidr];
    argv.extend_from_slice(extra);
    let child = ns
        .command(&argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawning ivnet agent");
    let pid = child.id() as u64;
    let mut agent = Agent {
        child: Some(child),
        peer_id: u32::MAX,
        ns: ns.name.clone(),
        shm: shm.to_path_buf(),
        log_path,
        label: format!("agent via {} in {} ({argv:?})", socket.display(), ns.name),
    };
    let start = Instant::now();
    loop {
        agent.assert_running();
        if let Some(st) = try_status_json(&agent.shm) {
            let me = st["peers"].as_array().and_then(|ps| {
                ps.iter().find(|p| p["pid"].as_u64() == Some(pid) && p["state"] == "up")
            });
            if let Some(id) = me.and_then(|p| p["id"].as_u64()) {
                agent.peer_id = id as u32;
                return agent;
            }
        }
        if start.elapsed() > READY_TIMEOUT {
            panic!(
                "{} did not come up within {READY_TIMEOUT:?}; its log:\n{}",
                agent.label,
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pings `count` times (0.2 s apart) and asserts that every request got its reply, waiting up
/// to 10 s in all. Unlike `assert_ping` (`-W 1`, after which ping gives a late last reply only
/// two round trips), `-w 10` keeps waiting for every reply, so a latency spike on a loaded
/// machine is not taken for a lost packet.
pub fn assert_ping_patient(ns: &Netns, addr: &str, count: u32) {
    let c = count.to_string();
    let out = super::run_with_timeout(
        &mut ns.command(&["ping", "-n", "-c", &c, "-i", "0.2", "-w", "10", addr]),
        Duration::from_secs(20),
    );
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let want = format!("{count} packets transmitted, {count} received");
    assert!(
        text.contains(&want),
        "ping {addr} from {}: not every reply came back\n{text}",
        ns.name
    );
}

/// The doorbell counters (`rung`, `suppressed`, `wakeups`, `spins_with_work`) of peer `id`.
pub fn doorbells(status: &serde_json::Value, id: u32) -> BTreeMap<String, u64> {
    let p =
        super::peer(status, id).unwrap_or_else(|| panic!("peer {id} not in status: {status:#}"));
    p["doorbells"]
        .as_object()
        .unwrap_or_else(|| panic!("peer {id} has no doorbell counters: {p:#}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// CPU time
// ---------------------------------------------------------------------------------------------

/// User + system CPU time of process `pid` so far, from `/proc/PID/stat` (utime + stime, in
/// clock ticks, converted).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')').expect("stat has (comm)") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the comm.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    Duration::from_nanos(ticks * 1_000_000_000 / hz as u64)
}
