//! Bad input gets one clear error and a non-zero exit, never a panic (DESIGN rule 7): a region
//! file too small for the geometry, a foreign magic, a geometry mismatch, a peer id out of range
//! or already live, a TAP name too long, no privileges for a TAP; and `status` on a missing,
//! empty, blank or foreign file.
//!
//! Cases that fail before a TAP is created, and the `status` cases, run anywhere (as root the
//! agent still runs inside a scratch namespace, so a wrong expectation can never touch the
//! host's interfaces). The others need root and print `SKIP ...` without it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs `cmd` (20 s limit) and checks the error contract; returns stderr.
///
/// Contract: non-zero exit by `exit`, not by a signal; stderr is exactly one
/// `ivnet: error: ...` line followed only by `  caused by: ...` lines; no panic.
fn expect_error(mut cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{what}: expected a non-zero exit code, got {}\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("ivnet: error: ")),
        "{what}: stderr does not start with `ivnet: error:`:\n{stderr}"
    );
    assert!(
        lines[1..].iter().all(|l| l.starts_with("  caused by: ")),
        "{what}: stderr has more than one error (or stray log lines):\n{stderr}"
    );
    stderr
}

fn assert_mentions(stderr: &str, needles: &[&str]) {
    for n in needles {
        assert!(stderr.contains(n), "error message lacks {n:?}:\n{stderr}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An `ivnet` command line for a case that must fail before any TAP exists: as root it runs in
/// `ns` (so a wrong expectation cannot create a TAP in the host's namespace), otherwise directly.
fn ivnet(ns: Option<&Netns>, args: &[&str]) -> Command {
    match ns {
        Some(ns) => {
            let mut argv = vec![IVNET];
            argv.extend_from_slice(args);
            ns.command(&argv)
        }
        None => {
            let mut c = Command::new(IVNET);
            c.args(args);
            c
        }
    }
}

fn scratch_ns() -> Option<Netns> {
    is_root().then(Netns::new)
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

// ---------------------------------------------------------------------------------------------
// Cases that run anywhere
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_input_file_too_small_for_the_geometry() {
    let dir = TempDir::new();
    let ns = scratch_ns();
    let shm = dir.join("small");
    let e = expect_error(ivnet(
        ns.as_ref(),
        &["agent", "--shm", path_arg(&shm), "--size", "64K", "--peer-id", "0"],
    ));
    assert_mentions(
        &e,
        &[path_arg(&shm), "the region is 65536 bytes", "8 peers", "use a larger --size"],
    );
}

#[test]
fn bad_input_foreign_magic_is_refused_and_left_untouched() {
    let dir = TempDir::new();
    let ns = scratch_ns();
    let shm = dir.join("foreign");
    let mut content = b"NOTIVNET".to_vec();
    content.resize(1 << 20, 0x5a);
    write_file(&shm, &content);
    let found = format!("{:#018x}", u64::from_le_bytes(*b"NOTIVNET"));
    let e = expect_error(ivnet(
        ns.as_ref(),
        &["agent", "--shm", path_arg(&shm), "--size", "64M", "--peer-id", "0"],
    ));
    assert_mentions(&e, &[path_arg(&shm), "foreign magic", &found, "IVNETSEG"]);
    assert!(std::fs::read(&shm).expect("read back") == content, "the foreign file was modified");

    // Foreign bytes in a file too short for even a header.
    let tiny = dir.join("tiny");
    write_file(&tiny, b"hello, not a region");
    let e =
        expect_error(ivnet(ns.as_ref(), &["agent", "--shm", path_arg(&tiny), "--peer-id", "0"]));
    assert_mentions(&e, &[path_arg(&tiny), "19 bytes"]);
}

#[test]
fn bad_input_tap_name_too_long() {
    let dir = TempDir::new();
    let ns = scratch_ns();
    let shm = dir.join("region");
    let e = expect_error(ivnet(
        ns.as_ref(),
        &["agent", "--shm", path_arg(&shm), "--size", "64M", "--tap", "abcdefghijklmnop"],
    ));
    assert_mentions(&e, &["\"abcdefghijklmnop\"", "1 to 15 characters"]);
    assert!(!shm.exists(), "a refused configuration still created the region file");
}

#[test]
fn bad_input_status_on_missing_empty_blank_and_foreign_files() {
    let dir = TempDir::new();
    let missing = dir.join("missing");
    let e = expect_error(ivnet(None, &["status", "--shm", path_arg(&missing)]));
    assert_mentions(&e, &[path_arg(&missing), "No such file"]);

    let empty = dir.join("empty");
    write_file(&empty, b"");
    let e = expect_error(ivnet(None, &["status", "--json", "--shm", path_arg(&empty)]));
    assert_mentions(&e, &[path_arg(&empty), "empty"]);

    let blank = dir.join("blank");
    write_file(&blank, &vec![0u8; 1 << 20]);
    let e = expect_error(ivnet(None, &["status", "--shm", path_arg(&blank)]));
    assert_mentions(&e, &[path_arg(&blank), "blank"]);

    let foreign = dir.join("foreign");
    let mut content = b"NOTIVNET".to_vec();
    content.resize(1 << 20, 0);
    write_file(&foreign, &content);
    let e = expect_error(ivnet(None, &["status", "--json", "--shm", path_arg(&foreign)]));
    assert_mentions(&e, &[path_arg(&foreign), "foreign magic"]);
}

// ---------------------------------------------------------------------------------------------
// Cases that need root (a live agent, a TAP, or a user switch)
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_input_geometry_mismatch() {
    if !require_root("bad_input_geometry_mismatch") {
        return;
    }
    let dir = TempDir::new();
    let (a, b) = (Netns::new(), Netns::new());
    let shm = ShmFile::new();
    let _first = Agent::start(&a, &shm.path, 0, &[], &dir);
    let e = expect_error(b.command(&[
        IVNET,
        "agent",
        "--shm",
        shm.arg(),
        "--max-peers",
        "4",
        "--peer-id",
        "1",
    ]));
    assert_mentions(&e, &[shm.arg(), "geometry mismatch", "max peers 8", "expects 4"]);
    assert!(!b.has_link("tap-shm"), "a refused agent left its TAP behind");
}

#[test]
fn bad_input_peer_id_out_of_range() {
    if !require_root("bad_input_peer_id_out_of_range") {
        return;
    }
    let ns = Netns::new();
    let shm = ShmFile::new();
    let e = expect_error(ns.command(&[
        IVNET,
        "agent",
        "--shm",
        shm.arg(),
        "--size",
        "64M",
        "--peer-id",
        "99",
    ]));
    assert_mentions(&e, &["peer id 99 is out of range", "0..8"]);
    assert!(!ns.has_link("tap-shm"), "a refused agent left its TAP behind");
}

#[test]
fn bad_input_peer_id_already_live() {
    if !require_root("bad_input_peer_id_already_live") {
        return;
    }
    let dir = TempDir::new();
    let (a, b) = (Netns::new(), Netns::new());
    let shm = ShmFile::new();
    let mut first = Agent::start(&a, &shm.path, 3, &[], &dir);
    let before = peer(&status_json(&shm.path), 3).cloned().expect("peer 3 listed");
    let e = expect_error(b.command(&[IVNET, "agent", "--shm", shm.arg(), "--peer-id", "3"]));
    assert_mentions(&e, &["peer id 3 is already live", &format!("pid {}", first.pid())]);
    assert!(!b.has_link("tap-shm"), "a refused agent left its TAP behind");
    // The rightful owner is undisturbed.
    first.assert_running();
    let after = peer(&status_json(&shm.path), 3).cloned().expect("peer 3 listed");
    assert_eq!(after["state"], "up");
    assert_eq!(after["incarnation"], before["incarnation"], "the refused agent bumped it");
    assert_eq!(after["pid"], before["pid"]);
}

#[test]
fn bad_input_tap_needs_privileges() {
    if !require_root("bad_input_tap_needs_privileges") {
        return;
    }
    let have_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    assert!(have_setpriv, "setpriv (util-linux) is needed for this test");
    // A directory and a copy of the binary that user 65534 can reach (the build tree may not be).
    let dir = TempDir::new();
    dir.open_to_all();
    let bin = dir.join("ivnet");
    std::fs::copy(IVNET, &bin).expect("copying ivnet");
    chmod(&bin, 0o755);
    let shm = dir.join("region");
    let ns = Netns::new();
    let e = expect_error(ns.command(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        path_arg(&bin),
        "agent",
        "--shm",
        path_arg(&shm),
        "--size",
        "64M",
        "--peer-id",
        "0",
    ]));
    assert_mentions(&e, &["creating TAP tap-shm needs CAP_NET_ADMIN", "run as root"]);
    assert!(!ns.has_link("tap-shm"));
}

#[test]
fn tap_name_of_15_chars_works() {
    if !require_root("tap_name_of_15_chars_works") {
        return;
    }
    let dir = TempDir::new();
    let ns = Netns::new();
    let shm = ShmFile::new();
    let _a = Agent::start(&ns, &shm.path, 0, &["--tap", "abcdefghijklmno"], &dir);
    assert!(ns.has_link("abcdefghijklmno"));
}
