//! What a new user meets first: the agent and the server say in one line that they are up (at
//! the default log level, nothing else); hints that fit the command they were given (`status`
//! never suggests `--size`, which it lacks; a server region that is not a power of two is not
//! "recreated with --size"; an option after a `stack` tool is moved before it); and
//! `server --help` that shows what is required and the default size.
//!
//! All but the agent case run anywhere; that one needs root and prints `SKIP ...` without it.

mod common;

use std::fs::File;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn ivnet(args: &[&str]) -> Output {
    run_with_timeout(Command::new(IVNET).args(args), Duration::from_secs(30))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn first_contact_status_hints_fit_status() {
    let dir = TempDir::new();
    let dir_arg = dir.path.to_str().expect("UTF-8");
    let e = stderr(&ivnet(&["status", "--shm", dir_arg]));
    assert!(e.contains("Is a directory") && !e.contains("No such device"), "{e}");
    // ... as the agent says (which fails before it makes a TAP; as root, in a scratch namespace
    // all the same).
    // SAFETY: geteuid has no preconditions and cannot fail.
    let ns = (unsafe { libc::geteuid() } == 0).then(Netns::new);
    let argv = [IVNET, "agent", "--shm", dir_arg, "--size", "1M"];
    let mut cmd = match &ns {
        Some(ns) => ns.command(&argv),
        None => {
            let mut c = Command::new(IVNET);
            c.args(&argv[1..]);
            c
        }
    };
    let e_agent = stderr(&run_with_timeout(&mut cmd, Duration::from_secs(30)));
    assert!(e_agent.contains("Is a directory"), "{e_agent}");

    let small = dir.join("small");
    write_file(&small, &[0u8; 100]);
    let small_arg = small.to_str().expect("UTF-8");
    for (path, what) in [("/dev/null", "not a regular file"), (small_arg, "100 bytes")] {
        let out = ivnet(&["status", "--shm", path]);
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(e.contains(what) && e.contains("is not an ivnet region"), "{path}: {e}");
        assert!(!e.contains("--size"), "status has no --size, yet: {e}");
    }
}

#[test]
fn first_contact_server_region_not_a_power_of_two() {
    let dir = TempDir::new();
    let region = ShmFile::new();
    // A region made by a member with a size QEMU cannot map (`ivnet stack` creates it
    // unprivileged; its ping fails, which does not matter here).
    let made = ivnet(&[
        "stack",
        "--shm",
        region.arg(),
        "--size",
        "24M",
        "--ip",
        "10.79.0.1/24",
        "ping",
        "10.79.0.2",
        "-c",
        "1",
        "-W",
        "0.1",
    ]);
    let len = std::fs::metadata(&region.path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(len, 24 << 20, "ivnet stack did not make the region: {}", stderr(&made));
    let sock = dir.join("s.sock");
    let out = ivnet(&["server", "--socket", sock.to_str().expect("UTF-8"), "--shm", region.arg()]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("not a power of two") && e.contains("--size cannot change an existing file")
    );
    assert!(!e.contains("recreate it with --size"), "{e}");
}

#[test]
fn first_contact_stack_options_after_the_tool() {
    for args in [
        &["stack", "--shm", "/dev/shm/x", "ping", "10.0.0.1", "--ip", "10.0.0.2/24"][..],
        &["stack", "--ip", "10.0.0.2/24", "send", "10.0.0.1:5001", "--bytes", "1M", "--shm=/x"][..],
    ] {
        let out = ivnet(args);
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains("put the options before the tool"), "{args:?}: {e}");
        assert!(!e.contains("to pass"), "{args:?}: {e}");
    }
    // An option nobody has still gets clap's own message.
    let e = stderr(&ivnet(&[
        "stack",
        "--shm",
        "/x",
        "--ip",
        "10.0.0.2/24",
        "ping",
        "1.2.3.4",
        "--nope",
    ]));
    assert!(e.contains("unexpected argument '--nope'"), "{e}");
}

#[test]
fn first_contact_server_help_shows_required_and_default() {
    let out = ivnet(&["server", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    let usage = help.lines().find(|l| l.starts_with("Usage:")).expect("a usage line");
    assert!(usage.contains("--shm <PATH>") && !usage.contains("[--shm"), "{usage}");
    assert!(help.contains("[default: 64M]") && help.contains("power of two"), "{help}");
}

#[test]
fn first_contact_server_says_one_line_when_listening() {
    let dir = TempDir::new();
    let region = ShmFile::new();
    let sock = dir.join("s.sock");
    let log_path = dir.join("server.log");
    let log = File::create(&log_path).expect("log");
    let mut child = Command::new(IVNET)
        .args(["server", "--socket", sock.to_str().expect("UTF-8"), "--shm", region.arg()])
        .args(["--size", "16M"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawning the server");
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let up = poll_until(READY_TIMEOUT, || read().contains('\n'));
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    assert!(up.is_some(), "the server said nothing: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("serving") && lines[0].contains(sock.to_str().expect("UTF-8")));
}

#[test]
fn first_contact_agent_says_one_line_when_up() {
    if !require_root("first_contact_agent_says_one_line_when_up") {
        return;
    }
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let ns = Netns::new();
    let log_path = dir.join("agent.log");
    let log = File::create(&log_path).expect("log");
    let mut child = ns
        .command(&[IVNET, "agent", "--shm", shm.arg(), "--size", "16M"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawning the agent");
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let up = poll_until(READY_TIMEOUT, || read().contains('\n'));
    // SAFETY: kill has no memory-safety preconditions; the child is ours and unreaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = poll_until(Duration::from_secs(10), || matches!(child.try_wait(), Ok(Some(_))));
    if done.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = read();
    assert!(up.is_some(), "the agent said nothing: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let l = lines[0];
    assert!(
        l.contains(&format!("joined {} as peer 0", shm.arg())) && l.contains("tap-shm up"),
        "{l}"
    );
}
