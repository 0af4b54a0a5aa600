//! Trust model and permissions (issue 11): region files and the server's socket are created mode
//! 0600 unless `--mode`/`--group` (or the configuration keys `mode`/`group`) say otherwise, by
//! the server, the agent and the stack alike; a user who is in the granted group runs `ivnet
//! status` and `ivnet stack` without root, and a user who is not is refused with one clear
//! error.
//!
//! The group is a number with no entry in the group database (`GROUP`), so the test changes
//! nothing on the machine. Needs root (to set owners and become another user); prints `SKIP ...`
//! without it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::server::*;
use common::*;

/// The group the tests grant access to.
const GROUP: u32 = 54321;

fn mode_and_group(path: &Path) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.mode() & 0o7777, m.gid())
}

/// `BIN ARGS...` as `user`, with `groups` as its only supplementary groups.
fn as_user(bin: &Path, user: &User, groups: &[u32], args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid)).arg(format!("--regid={}", user.gid));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    c.args(["--inh-caps=-all", "--bounding-set=-all"]).arg(bin).args(args);
    let out = run_with_timeout(&mut c, Duration::from_secs(30));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn created_files_are_private_unless_a_mode_and_group_are_given() {
    let test = "created_files_are_private_unless_a_mode_and_group_are_given";
    if !require_root(test) {
        return;
    }
    let dir = TempDir::new();
    // The server: socket and region.
    let server = Server::start(&dir, &[]);
    assert_eq!(mode_and_group(&server.socket).0, 0o600, "server socket");
    assert_eq!(mode_and_group(&server.shm.path).0, 0o600, "server region");
    drop(server);
    let g = GROUP.to_string();
    let server = Server::start(&dir, &["--mode", "0660", "--group", &g]);
    assert_eq!(mode_and_group(&server.socket), (0o660, GROUP), "server socket with --mode/--group");
    assert_eq!(
        mode_and_group(&server.shm.path),
        (0o660, GROUP),
        "server region with --mode/--group"
    );
    drop(server);

    // The agent: a region file it creates, by flags and by the configuration file.
    let ns = Netns::new();
    for (how, extra, want) in [
        ("default", vec![], (0o600, 0)),
        ("flags", vec!["--mode", "0640", "--group", g.as_str()], (0o640, GROUP)),
    ] {
        let shm = ShmFile::new();
        let mut argv = vec!["--address", "10.81.0.1/24"];
        argv.extend(extra);
        let mut a = Agent::spawn(&ns, &shm.path, 0, &argv, &dir);
        a.wait_ready();
        assert_eq!(mode_and_group(&shm.path), want, "agent-created region ({how})");
        drop(a);
    }
    let shm = ShmFile::new();
    let cfg = dir.join("ivnet.toml");
    write_file(&cfg, format!("mode = \"0660\"\ngroup = \"{GROUP}\"\n").as_bytes());
    let mut a = Agent::spawn(&ns, &shm.path, 0, &["--config", cfg.to_str().expect("UTF-8")], &dir);
    a.wait_ready();
    assert_eq!(mode_and_group(&shm.path), (0o660, GROUP), "agent-created region (config keys)");
    drop(a);

    // The stack.
    let shm = ShmFile::new();
    let mut s = StackProc::spawn(
        Path::new(IVNET),
        None,
        &dir,
        &["--shm", shm.arg(), "--size", "16M", "--ip", "10.81.0.9/24", "echo", "--udp", "7"],
    );
    s.wait_log("joined", Duration::from_secs(10));
    assert_eq!(mode_and_group(&shm.path).0, 0o600, "stack-created region");
    drop(s);
}

#[test]
fn a_user_in_the_granted_group_runs_status_and_stack_without_root() {
    let test = "a_user_in_the_granted_group_runs_status_and_stack_without_root";
    if !require_root(test) {
        return;
    }
    let user = unprivileged_user();
    let dir = TempDir::new();
    let bin = prepare_for_user(&dir, &user);
    let g = GROUP.to_string();
    let server = Server::start(&dir, &["--mode", "0660", "--group", &g]);
    // A member to ping: a stack run by root.
    let mut peer_stack = StackProc::spawn(
        Path::new(IVNET),
        None,
        &dir,
        &["--socket", server.socket_arg(), "--ip", "10.81.0.1/24", "echo", "--udp", "7"],
    );
    peer_stack.wait_log("joined", Duration::from_secs(10));
    let shm = server.shm.arg();

    // In the group: status and a stack through the socket work.
    let (ok, out, err) = as_user(&bin, &user, &[GROUP], &["status", "--shm", shm]);
    assert!(ok, "status as {} in group {GROUP} failed:\n{err}", user.name);
    assert!(out.contains("peer"), "{out}");
    let (ok, out, err) = as_user(
        &bin,
        &user,
        &[GROUP],
        &[
            "stack",
            "--socket",
            server.socket_arg(),
            "--ip",
            "10.81.0.2/24",
            "ping",
            "10.81.0.1",
            "-c",
            "2",
        ],
    );
    assert!(ok, "stack ping as {} in group {GROUP} failed:\n{out}\n{err}", user.name);

    // Not in the group: refused, with one clear error each.
    let (ok, _, err) = as_user(&bin, &user, &[], &["status", "--shm", shm]);
    assert!(!ok && err.starts_with("ivnet: error: ") && err.contains("ermission denied"), "{err}");
    let (ok, _, err) = as_user(
        &bin,
        &user,
        &[],
        &[
            "stack",
            "--socket",
            server.socket_arg(),
            "--ip",
            "10.81.0.3/24",
            "ping",
            "10.81.0.1",
            "-c",
            "1",
        ],
    );
    assert!(!ok && err.starts_with("ivnet: error: ") && err.contains("ermission denied"), "{err}");
    peer_stack.assert_running();
}
