//! A member whose descriptor limit (`ulimit -n`) is below vectors x peers degrades instead of
//! exiting (issue 11, finding 6, member side): it holds the peers' doorbells it can within its
//! limit, keeps its own, logs one warning that names the limit to raise, and traffic still flows
//! (peers it cannot ring see its frames at their next heartbeat tick). Before, the truncated
//! control message (MSG_CTRUNC) of the first eventfd past the limit ended the member.
//!
//! Runs `ivnet stack` members against a real `ivnet server` with 12 other members of 16 vectors
//! each; needs no privileges.

mod common;

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::*;
use common::*;

const STEP: Duration = Duration::from_secs(30);
/// Vectors per member: 12 members x 16 eventfds is far more than the limit below.
const VECTORS: &str = "16";
/// The soft and hard descriptor limit of the member under test.
const LOW_NOFILE: u64 = 64;

/// `ivnet -v stack ARGS...` with RLIMIT_NOFILE set to `nofile`, stopped on drop; its stdout
/// and log are files in a scratch directory.
struct LimitedStack {
    child: Option<Child>,
    out: PathBuf,
    log: PathBuf,
}

impl LimitedStack {
    fn spawn(dir: &TempDir, name: &str, nofile: u64, args: &[&str]) -> LimitedStack {
        let out = dir.join(&format!("{name}.out"));
        let log = dir.join(&format!("{name}.log"));
        let mut cmd = Command::new(IVNET);
        cmd.args(["-v", "stack"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("creating stdout file"))
            .stderr(File::create(&log).expect("creating log file"));
        // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit { rlim_cur: nofile, rlim_max: nofile };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawning ivnet stack");
        LimitedStack { child: Some(child), out, log }
    }

    fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with its output) if it has exited.
    fn assert_running(&mut self, what: &str) {
        let child = self.child.as_mut().expect("still owned");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what}: the member exited with {st}; log:\n{}", self.log());
        }
    }

    /// Waits for a stdout line containing `needle`, panicking if the member exits first.
    fn wait_stdout(&mut self, needle: &str) {
        let deadline = Instant::now() + STEP;
        while !self.stdout().contains(needle) {
            self.assert_running(&format!("waiting for {needle:?}"));
            assert!(Instant::now() < deadline, "no {needle:?} within {STEP:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LimitedStack {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- stdout -----\n{}\n----- log -----\n{}", self.stdout(), self.log());
        }
    }
}

#[test]
fn member_below_the_fd_limit_keeps_running_and_talking() {
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--vectors", VECTORS, "--max-peers", "16"]);
    // 12 members present before ours: each setup hands ours 16 eventfds per member.
    let mut others = Vec::new();
    for k in 0..12 {
        let mut c = RawClient::connect(&server.socket);
        let setup = c.read_setup_any(16);
        assert_eq!(setup.peers.len(), k, "members present");
        drop(setup); // close the descriptors, keep the connection (the member stays)
        others.push(c);
    }
    let sock = server.socket_arg().to_string();
    let common = ["--socket", sock.as_str(), "--spin-us", "0"];

    let mut echo = LimitedStack::spawn(
        &dir,
        "echo",
        LOW_NOFILE,
        &[&common[..], &["--ip", "10.87.0.1/24", "echo", "--udp", "7", "--tcp", "7"]].concat(),
    );
    echo.wait_stdout("echo server on");
    let log = echo.log();
    let warning = "peer doorbell(s) not held";
    assert_eq!(log.matches(warning).count(), 1, "one warning about the limit; log:\n{log}");
    assert!(log.contains(&format!("descriptor limit ({LOW_NOFILE})")), "{log}");
    assert!(log.contains("`ulimit -n "), "the warning says what to raise; log:\n{log}");

    // A member with a normal limit joins after it (so the limited one cannot hold its
    // doorbells either) and talks to it: ping, UDP and TCP echo.
    let bin = std::path::Path::new(IVNET);
    let peer = |tool: &[&str]| {
        let args = [&common[..], &["--ip", "10.87.0.2/24"], tool].concat();
        StackProc::spawn(bin, None, &dir, &args)
    };
    let (st, out, log) = peer(&["ping", "10.87.0.1", "-c", "5", "-i", "0.05"]).wait_exit(STEP);
    assert!(st.success(), "{out}{log}");
    assert!(out.contains("5 packets transmitted, 5 received"), "{out}");
    let (st, out, log) = peer(&["echo-client", "--udp", "10.87.0.1:7", "-c", "20"]).wait_exit(STEP);
    assert!(st.success(), "{out}{log}");
    let (st, out, log) =
        peer(&["echo-client", "10.87.0.1:7", "-c", "20", "-s", "3000"]).wait_exit(STEP);
    assert!(st.success(), "{out}{log}");
    assert!(out.contains("20 sent, 20 echoed, 0 lost, 0 corrupted"), "{out}");

    echo.assert_running("after the traffic");
    assert_eq!(echo.log().matches(warning).count(), 1, "the warning is logged once");
    server.assert_running();
    drop(others);
}
