//! Memory faults are errors, not deaths (issue 10):
//!
//! - a region larger than its tmpfs is a clear error at start, and the failed start leaves no
//!   file behind (agent and server);
//! - a region that fits, on a tmpfs that then fills up, keeps working under traffic (the file was
//!   allocated up front, so no write through the mapping can fault);
//! - a region file deleted under running members is reported by each of them, and they keep
//!   talking on the segment they share;
//! - a region file truncated under running members (their pages vanish) is reported, and no
//!   member dies of the SIGBUS.
//!
//! Needs root (tmpfs mounts, namespaces, TAPs); prints `SKIP ...` without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs of `size` mounted on a fresh directory, unmounted (with everything in it) on drop.
struct Tmpfs {
    dir: TempDir,
    mount: PathBuf,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = TempDir::new();
        let mount = dir.join("tmpfs");
        std::fs::create_dir(&mount).expect("mount point");
        let opts = format!("size={size},mode=0755");
        let out = run_with_timeout(
            Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "ivnet-test"]).arg(&mount),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { dir, mount }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount.join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
        let _ = &self.dir;
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs an `ivnet` command that must fail with one clear error; returns stderr.
fn expect_failure(cmd: &mut Command) -> String {
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "{cmd:?} did not fail cleanly: {}\n{err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("ivnet: error: "), "{err}");
    err
}

#[test]
fn region_larger_than_its_tmpfs_is_a_clear_error_at_start() {
    let test = "region_larger_than_its_tmpfs_is_a_clear_error_at_start";
    if !require_root(test) {
        return;
    }
    let fs = Tmpfs::new("4M");
    let region = fs.path("region");
    let ns = Netns::new();
    let err = expect_failure(&mut ns.command(&[
        IVNET,
        "agent",
        "--shm",
        s(&region),
        "--size",
        "64M",
        "--address",
        "10.79.0.1/24",
    ]));
    for needle in ["no room for region file", "67108864 bytes", "--size"] {
        assert!(err.contains(needle), "the error lacks {needle:?}:\n{err}");
    }
    assert!(!region.exists(), "the failed start left {} behind", region.display());
    assert!(!ns.has_link("tap-shm"), "a TAP was created before the region was ready");

    let socket = fs.dir.join("ivs.sock");
    let err = expect_failure(Command::new(IVNET).args([
        "server",
        "--socket",
        s(&socket),
        "--shm",
        s(&region),
        "--size",
        "64M",
    ]));
    assert!(err.contains("no room for region file"), "{err}");
    assert!(!region.exists() && !socket.exists(), "the failed server left files behind");
    report(&format!("{test}: {}", err.lines().next().unwrap_or_default()));
}

#[test]
fn full_tmpfs_does_not_kill_members_under_traffic() {
    let test = "full_tmpfs_does_not_kill_members_under_traffic";
    if !require_root(test) {
        return;
    }
    let fs = Tmpfs::new("24M");
    let region = fs.path("region");
    let lab = Lab::new(2);
    let geometry = ["--size", "16M", "--max-peers", "4"];
    let cidr = |i: usize| format!("{}/24", Lab::addr(i));
    let mut agents = Vec::new();
    for i in 0..2 {
        let c = cidr(i);
        let mut args = vec!["--address", c.as_str()];
        args.extend_from_slice(&geometry);
        let mut argv = vec![IVNET, "-v", "agent", "--shm", s(&region), "--peer-id"];
        let id = i.to_string();
        argv.push(&id);
        argv.extend_from_slice(&args);
        let log = lab.dir.join(&format!("agent{i}.log"));
        let f = std::fs::File::create(&log).expect("log");
        let child = lab.ns[i]
            .command(&argv)
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("agent");
        agents.push((child, log));
    }
    lab.wait_reachable(0, 1, Duration::from_secs(15));
    // Fill the rest of the tmpfs: any page the region had not allocated would now fault.
    let filler = fs.path("filler");
    let out = run_with_timeout(
        Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "count=64"])
            .arg(format!("of={}", s(&filler))),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "the filler did not fill the tmpfs");
    let (sent, got, _) = tcp_transfer(
        &lab.ns[1],
        &lab.ns[0],
        &Lab::addr(1),
        5303,
        32 << 20,
        0xf111,
        Duration::from_secs(60),
    );
    assert_eq!(hex(&got.sha256), hex(&sent.sha256), "the transfer was corrupted");
    for (child, log) in agents.iter_mut() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("an agent died ({st}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
    }
    for (mut child, _) in agents {
        let _ = child.kill();
        let _ = child.wait();
    }
    report(&format!("{test}: 32 MiB moved on a full tmpfs"));
}

/// Two agents on a region file in /dev/shm that the test then damages; returns the lab.
fn two_agents() -> Lab {
    let mut lab = Lab::new(2);
    lab.start_all(&[]);
    lab.wait_reachable(0, 1, Duration::from_secs(10));
    lab
}

#[test]
fn region_file_deleted_under_members_is_reported() {
    let test = "region_file_deleted_under_members_is_reported";
    if !require_root(test) {
        return;
    }
    let mut lab = two_agents();
    std::fs::remove_file(&lab.shm.path).expect("deleting the region file");
    for i in 0..2 {
        wait_until(&format!("agent {i} reports the deleted file"), Duration::from_secs(5), || {
            lab.agent(i).log().contains("was deleted while in use")
        });
        lab.agent(i).assert_running();
    }
    // They still share their (now nameless) segment.
    lab.wait_reachable(0, 1, Duration::from_secs(5));
    lab.wait_reachable(1, 0, Duration::from_secs(5));
    report(&format!("{test}: both agents reported it and keep talking"));
}

#[test]
fn region_file_truncated_under_members_kills_nobody() {
    let test = "region_file_truncated_under_members_kills_nobody";
    if !require_root(test) {
        return;
    }
    let mut lab = two_agents();
    let f = std::fs::OpenOptions::new().write(true).open(&lab.shm.path).expect("open");
    f.set_len(1 << 20).expect("truncate");
    // Traffic makes both touch their rings, which are gone.
    for _ in 0..3 {
        ping_once(&lab.ns[0], &Lab::addr(1), Duration::from_millis(300));
        ping_once(&lab.ns[1], &Lab::addr(0), Duration::from_millis(300));
    }
    for i in 0..2 {
        wait_until(&format!("agent {i} reports the lost pages"), Duration::from_secs(5), || {
            lab.agent(i).log().contains("of shared memory vanished")
                || lab.agent(i).log().contains("was truncated")
        });
        lab.agent(i).assert_running();
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        lab.agent(i).assert_running();
    }
    report(&format!("{test}: both agents survived and reported it"));
}
