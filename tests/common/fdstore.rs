//! A stand-in for systemd's service manager, for tests of `ivnet server`'s fd store: a
//! notification socket (`NOTIFY_SOCKET`) that keeps the descriptors sent with `FDSTORE=1` under
//! their `FDNAME=`, drops them on `FDSTOREREMOVE=1`, and, like PID 1, drops a stored socket whose
//! peer hung up; and a way to start the service with the store handed back as `LISTEN_FDS`,
//! `LISTEN_FDNAMES` and `LISTEN_PID`, descriptors from 3 on (see `research/systemd.md` §2).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{poll_until, TempDir, IVNET};

#[derive(Default)]
struct State {
    store: Vec<(String, OwnedFd)>,
    messages: Vec<String>,
}

/// The notification socket and the fd store.
pub struct ServiceManager {
    /// Path of the notification socket.
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Most descriptors handed to a restarted service here.
const MAX_PASSED: usize = 64;

impl ServiceManager {
    /// Binds the notification socket in `dir` and starts receiving.
    pub fn new(dir: &TempDir) -> ServiceManager {
        let socket = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&socket).expect("binding the notification socket");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            sock.set_nonblocking(true).expect("non-blocking");
            let mut buf = vec![0u8; 4096];
            while !sp.load(Ordering::Relaxed) {
                if !super::server::wait_readable(sock.as_raw_fd(), Duration::from_millis(50)) {
                    continue;
                }
                let mut fds = Vec::new();
                let n =
                    match ivnet::sys::fdpass::recv_with_fds(sock.as_raw_fd(), &mut buf, &mut fds) {
                        Ok(n) => n,
                        Err(_) => continue,
                    };
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                apply(&mut st.lock().unwrap_or_else(|e| e.into_inner()), &text, fds);
            }
        });
        ServiceManager { socket, state, stop, thread: Some(thread) }
    }

    /// Names in the store now (one per descriptor).
    pub fn names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.store.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).messages.clone()
    }

    /// Waits until the store holds every name in `names`; panics after `timeout`.
    pub fn wait_stored(&self, names: &[&str], timeout: Duration) {
        let ok = poll_until(timeout, || {
            let have = self.names();
            names.iter().all(|n| have.iter().any(|h| h == n))
        });
        assert!(ok.is_some(), "the store never held {names:?}; it holds {:?}", self.names());
    }

    /// Starts `ivnet ARGS...` as the service: `NOTIFY_SOCKET` set, and the store handed over as
    /// `LISTEN_FDS` (after dropping stored sockets whose peer hung up, as PID 1 does).
    pub fn spawn(&self, args: &[&str], log: &std::path::Path) -> Child {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.store.retain(|(_, fd)| !hung_up(fd));
        assert!(st.store.len() <= MAX_PASSED, "more stored descriptors than this harness passes");
        let mut sources = [-1 as RawFd; MAX_PASSED];
        for (i, (_, fd)) in st.store.iter().enumerate() {
            sources[i] = fd.as_raw_fd();
        }
        let count = st.store.len();
        let names: Vec<String> = st.store.iter().map(|(n, _)| n.clone()).collect();
        drop(st);
        let log = File::create(log).expect("creating the service log");
        let mut cmd = Command::new("sh");
        // LISTEN_PID must be the service's own pid: the shell sets it and execs the service.
        cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", IVNET])
            .args(args)
            .env("NOTIFY_SOCKET", &self.socket)
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if count > 0 {
            cmd.env("LISTEN_FDS", count.to_string()).env("LISTEN_FDNAMES", names.join(":"));
        } else {
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        }
        // SAFETY: the closure runs in the forked child before exec and calls only fcntl and
        // dup2 (async-signal-safe) on descriptors captured by value in a fixed array; it
        // allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // First move every source above the target range, then put each in place
                // (dup2 clears close-on-exec on the target).
                let mut high = [-1 as RawFd; MAX_PASSED];
                for i in 0..count {
                    high[i] =
                        libc::fcntl(sources[i], libc::F_DUPFD_CLOEXEC, 3 + MAX_PASSED as RawFd);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &fd) in high.iter().enumerate().take(count) {
                    if libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawning the service")
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Applies one notification to the store.
fn apply(st: &mut State, text: &str, fds: Vec<OwnedFd>) {
    st.messages.push(text.to_string());
    let field = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    };
    if field("FDSTORE") == Some("1") {
        let name = field("FDNAME").unwrap_or("stored").to_string();
        for fd in fds {
            st.store.push((name.clone(), fd));
        }
    } else if field("FDSTOREREMOVE") == Some("1") {
        if let Some(name) = field("FDNAME") {
            st.store.retain(|(n, _)| n != name);
        }
    }
    // Descriptors of other messages are closed (dropped here), as PID 1 does.
}

/// Whether the descriptor reports a hang-up or an error (PID 1 then drops it from the store).
fn hung_up(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}
