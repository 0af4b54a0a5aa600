//! Pause (issue 10): a member stopped with SIGSTOP for three link timeouts (a paused VM, a
//! stopped process) comes back after SIGCONT without a restart: it talks again within 2 s, with
//! the same TAP and addresses. Also when, meanwhile, a member elsewhere (another pid namespace,
//! as an agent in another VM would be) took its slot over: then it rejoins under a free slot,
//! keeping its TAP, MAC and addresses.
//!
//! Needs root; prints `SKIP ...` without it.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// The agents' link timeout (the default).
const LINK_TIMEOUT: Duration = Duration::from_secs(1);
/// The bound the issue sets after SIGCONT.
const RECOVERY: Duration = Duration::from_secs(2);

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a process this test started.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// The TAP's interface index and addresses in `ns`.
fn tap_identity(ns: &Netns) -> (String, String) {
    let out = ns.exec_ok(&["ip", "-o", "addr", "show", "dev", "tap-shm"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let index = text.split(':').next().unwrap_or_default().trim().to_string();
    let addrs: Vec<&str> = text.split_whitespace().filter(|w| w.contains('/')).collect();
    (index, addrs.join(" "))
}

/// Pings `to` from `from` until it answers, within [`RECOVERY`] of `t0`.
fn answers_within(lab: &Lab, from: usize, to: &str, t0: Instant, what: &str) -> Duration {
    let left = RECOVERY.saturating_sub(t0.elapsed());
    poll_until(left, || ping_once(&lab.ns[from], to, Duration::from_millis(200))).unwrap_or_else(
        || {
            panic!(
                "{what}: no answer from {to} within {RECOVERY:?} of SIGCONT; status:\n{:#}",
                lab.status()
            )
        },
    );
    t0.elapsed()
}

#[test]
fn paused_member_comes_back_without_a_restart() {
    let test = "paused_member_comes_back_without_a_restart";
    if !require_root(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::quiet(3);
    lab.start_all(&[]);
    for (a, b) in [(0, 1), (1, 0), (2, 1)] {
        lab.wait_reachable(a, b, Duration::from_secs(10));
    }
    let before = tap_identity(&lab.ns[1]);
    let pid = lab.agent(1).pid();
    signal(pid, libc::SIGSTOP);
    std::thread::sleep(LINK_TIMEOUT * 3);
    let st = lab.status();
    assert_eq!(peer(&st, 1).expect("peer 1")["state"], "down", "a stopped member shows up: {st:#}");
    let t0 = Instant::now();
    signal(pid, libc::SIGCONT);
    let took = answers_within(&lab, 0, &Lab::addr(1), t0, test);
    answers_within(&lab, 2, &Lab::addr(1), t0, test);
    lab.wait_reachable(1, 0, Duration::from_secs(5));
    lab.agent(1).assert_running();
    assert_eq!(lab.agent(1).pid(), pid);
    assert_eq!(tap_identity(&lab.ns[1]), before, "the TAP or its addresses changed");
    let st = lab.status();
    let p = peer(&st, 1).expect("peer 1");
    assert!(p["state"] == "up" && p["pid"].as_u64() == Some(pid as u64), "{p:#}");
    report(&format!("{test}: talked again {:.3} s after SIGCONT", took.as_secs_f64()));
}

/// The pid of the `ivnet` process inside namespace `ns` (under an `unshare --pid` wrapper).
fn ivnet_pid_in(ns: &Netns) -> u32 {
    let mut found = None;
    wait_until("the wrapped agent runs", Duration::from_secs(10), || {
        found = ns.pids().into_iter().find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "ivnet")
        });
        found.is_some()
    });
    found.expect("found") as u32
}

#[test]
fn paused_member_whose_slot_was_taken_rejoins_under_another() {
    let test = "paused_member_whose_slot_was_taken_rejoins_under_another";
    if !require_root(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::quiet(4);
    lab.start(0, &[]);
    lab.start(1, &[]);
    // C runs in its own pid namespace, like an agent in another VM: nobody can check its pid.
    let cidr = format!("{}/24", Lab::addr(2));
    let c = Agent::spawn_wrapped(
        &lab.ns[2],
        &["unshare", "--pid", "--fork", "--kill-child=SIGKILL"],
        &lab.shm.path,
        2,
        &["--address", &cidr],
        &lab.dir,
    );
    wait_until("C is up", READY_TIMEOUT, || {
        try_status_json(&lab.shm.path)
            .is_some_and(|st| peer(&st, 2).is_some_and(|p| p["state"] == "up"))
    });
    lab.wait_reachable(0, 2, Duration::from_secs(10));
    let before = tap_identity(&lab.ns[2]);
    let c_pid = ivnet_pid_in(&lab.ns[2]);
    signal(c_pid, libc::SIGSTOP);
    // While C is stopped, D asks for C's slot: it watches C's heartbeat stand still for the link
    // timeout and takes the slot over.
    let d_cidr = format!("{}/24", Lab::addr(3));
    lab.agents[3] = Some(Agent::spawn(
        &lab.ns[3],
        &lab.shm.path,
        2,
        &["--address", &d_cidr, "--mac", "02:00:00:00:00:44"],
        &lab.dir,
    ));
    lab.agent(3).wait_ready();
    std::thread::sleep((LINK_TIMEOUT * 3).saturating_sub(LINK_TIMEOUT));
    let t0 = Instant::now();
    signal(c_pid, libc::SIGCONT);
    let took = answers_within(&lab, 0, &Lab::addr(2), t0, test);
    answers_within(&lab, 1, &Lab::addr(2), t0, test);
    lab.wait_reachable(3, 0, Duration::from_secs(5));
    lab.wait_reachable(2, 3, Duration::from_secs(5));
    assert_eq!(ivnet_pid_in(&lab.ns[2]), c_pid, "C was restarted");
    assert_eq!(tap_identity(&lab.ns[2]), before, "C's TAP or its addresses changed");
    let st = lab.status();
    let moved = st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["mac"] == "02:69:76:6e:00:02" && p["state"] == "up"))
        .unwrap_or_else(|| panic!("C (its MAC) is not up anywhere: {st:#}"));
    assert_ne!(moved["id"], 2, "C is still in the slot D took: {st:#}");
    report(&format!(
        "{test}: C rejoined as peer {} and talked again {:.3} s after SIGCONT",
        moved["id"],
        took.as_secs_f64()
    ));
    drop(c);
}
