//! A restarted `ivnet server` loses nobody (issue 10): killed with SIGKILL and started again on
//! the same socket and region, it hands a newcomer neither a live member's slot nor a doorbell
//! id seen before, and everyone keeps talking. Under a service manager (played here by
//! `common::fdstore::ServiceManager`) it takes its listener, the region and every member's
//! connection and eventfds back from the fd store, so old and new members ring each other's
//! doorbells as before.
//!
//! The raw-client test needs no privileges; the agent tests need root (namespaces, TAPs) and
//! print `SKIP ...` without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::fdstore::ServiceManager;
use common::server::*;
use common::*;

/// The agent tests count doorbells and time reachability: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A server process the test starts, kills and starts again on the same socket and region.
struct ServerProc {
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProc {
    fn start(dir: &TempDir, socket: &Path, shm: &Path, mgr: Option<&ServiceManager>) -> ServerProc {
        let log = dir.join(&format!("server-{}.log", std::process::id() ^ rand_u32()));
        let args = [
            "-v",
            "server",
            "--socket",
            socket.to_str().expect("UTF-8"),
            "--shm",
            shm.to_str().expect("UTF-8"),
            "--size",
            "64M",
        ];
        let child = match mgr {
            Some(m) => m.spawn(&args, &log),
            None => {
                let f = std::fs::File::create(&log).expect("server log");
                Command::new(IVNET)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(f.try_clone().expect("dup"))
                    .stderr(f)
                    .spawn()
                    .expect("spawning ivnet server")
            }
        };
        let mut s = ServerProc { child: Some(child), log };
        wait_until("the server serves", READY_TIMEOUT, || {
            s.assert_running();
            s.log().contains("serving ")
        });
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.as_mut().expect("owned").try_wait() {
            panic!("the server exited with {st}; log:\n{}", self.log());
        }
    }

    fn kill_hard(&mut self) {
        let mut c = self.child.take().expect("owned");
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- server log {} -----\n{}-----", self.log.display(), self.log());
        }
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(7);
    h.finish() as u32
}

/// Raw protocol clients across a restart under the fd store: the surviving client keeps its
/// connection and hears that a client which left while the server was down is gone; a newcomer
/// gets a fresh doorbell id, the survivor's eventfds from the store, and the two ring each other.
#[test]
fn fd_store_restart_keeps_clients_and_drops_those_that_left() {
    let dir = TempDir::new();
    let shm = ShmFile::new();
    let socket = dir.join("ivs.sock");
    let mgr = ServiceManager::new(&dir);
    let mut s1 = ServerProc::start(&dir, &socket, &shm.path, Some(&mgr));
    mgr.wait_stored(&["listen", "shm"], MSG_TIMEOUT);
    assert!(mgr.messages().iter().any(|m| m.contains("READY=1")), "no READY=1");

    let mut a = RawClient::connect(&socket);
    let sa = a.read_setup(2, &[]);
    let mut b = RawClient::connect(&socket);
    let sb = b.read_setup(2, &[sa.id]);
    a.expect_vectors(sb.id, 2, "a: join of b");
    let (a_name, b_name) = (format!("peer-{}-0", sa.id), format!("peer-{}-1", sb.id));
    mgr.wait_stored(&[&a_name, &b_name, &format!("peer-{}-v1", sb.id)], MSG_TIMEOUT);

    s1.kill_hard();
    // b leaves while no server runs; a notices nothing yet (the store holds its connection).
    drop(b);
    assert!(matches!(a.recv(Duration::from_millis(300)), Recv::Timeout), "a's connection moved");

    let mut s2 = ServerProc::start(&dir, &socket, &shm.path, Some(&mgr));
    assert!(s2.log().contains("taken back from the fd store"), "log:\n{}", s2.log());
    a.expect_plain(sb.id as i64, "a: b left while the server was down");
    let mut c = RawClient::connect(&socket);
    let sc = c.read_setup(2, &[sa.id]);
    assert!(sc.id > sb.id, "doorbell id {} reused (a {}, b {})", sc.id, sa.id, sb.id);
    let a_to_c = a.expect_vectors(sc.id, 2, "a: join of c");
    eventfd_ring(&a_to_c[1]);
    assert_eq!(eventfd_take(&sc.own[1], MSG_TIMEOUT), Some(1), "a -> c");
    eventfd_ring(&sc.peers[&sa.id][1]);
    assert_eq!(eventfd_take(&sa.own[1], MSG_TIMEOUT), Some(1), "c -> a");
    // b's descriptors left the store, c's came in.
    mgr.wait_stored(&[&a_name, &format!("peer-{}-v1", sc.id)], MSG_TIMEOUT);
    let names = mgr.names();
    assert!(!names.iter().any(|n| n.starts_with(&format!("peer-{}-", sb.id))), "{names:?}");
    s2.assert_running();
}

/// Three namespaces with IPv6 off (quiet segment).
fn quiet_namespaces() -> Vec<Netns> {
    (0..3)
        .map(|_| {
            let ns = Netns::new();
            ns.disable_ipv6();
            ns
        })
        .collect()
}

fn addr(i: usize) -> String {
    format!("10.78.0.{}", i + 1)
}

fn reach(ns: &[Netns], from: usize, to: usize, timeout: Duration) {
    wait_until(&format!("member {from} reaches member {to}"), timeout, || {
        ping_once(&ns[from], &addr(to), Duration::from_millis(500))
    });
}

fn doorbell_id(st: &serde_json::Value, slot: u32) -> u64 {
    peer(st, slot).and_then(|p| p["doorbell_id"].as_u64()).unwrap_or_else(|| {
        panic!("peer {slot} has no doorbell id: {st:#}");
    })
}

/// Starts A and B through a server, kills it, starts it again, lets C join: nobody exits, every
/// pair talks within 5 s, C's slot and doorbell id are new. Returns the lab for more checks.
fn restart_scenario(
    dir: &TempDir,
    ns: &[Netns],
    shm: &ShmFile,
    mgr: Option<&ServiceManager>,
) -> (ServerProc, Vec<Agent>) {
    let socket = dir.join("ivs.sock");
    let mut s1 = ServerProc::start(dir, &socket, &shm.path, mgr);
    let cidr = |i: usize| format!("{}/24", addr(i));
    // No busy polling: every frame to a sleeping member needs its doorbell.
    let nospin = ["--spin-us", "0"];
    let a = start_socket_agent_at(&ns[0], &socket, &shm.path, &cidr(0), &nospin, dir);
    let b = start_socket_agent_at(&ns[1], &socket, &shm.path, &cidr(1), &nospin, dir);
    reach(ns, 0, 1, Duration::from_secs(10));
    reach(ns, 1, 0, Duration::from_secs(10));

    s1.kill_hard();
    let s2 = ServerProc::start(dir, &socket, &shm.path, mgr);
    let c = start_socket_agent_at(&ns[2], &socket, &shm.path, &cidr(2), &nospin, dir);
    let mut agents = vec![a, b, c];
    for (x, y) in [(0, 1), (0, 2), (1, 2), (2, 0), (2, 1), (1, 0)] {
        reach(ns, x, y, Duration::from_secs(5));
    }
    for ag in agents.iter_mut() {
        ag.assert_running();
    }
    let st = status_json(&shm.path);
    let ids: Vec<u32> = agents.iter().map(|a| a.peer_id).collect();
    assert!(ids[2] != ids[0] && ids[2] != ids[1], "C got a live member's slot: {ids:?}\n{st:#}");
    let (da, db, dc) =
        (doorbell_id(&st, ids[0]), doorbell_id(&st, ids[1]), doorbell_id(&st, ids[2]));
    assert!(dc > da && dc > db, "doorbell id {dc} of C reuses or precedes A's {da}/B's {db}");
    for ag in &agents[..2] {
        let log = ag.log();
        assert!(!log.contains("held by another member"), "an old member lost its slot:\n{log}");
    }
    (s2, agents)
}

#[test]
fn server_restart_without_systemd_loses_nobody() {
    let test = "server_restart_without_systemd_loses_nobody";
    if !require_root(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new();
    let ns = quiet_namespaces();
    let shm = ShmFile::new();
    let (mut s2, agents) = restart_scenario(&dir, &ns, &shm, None);
    // Without a store the old members lost their connection: they say so and keep going.
    assert!(agents[0].log().contains("closed the connection"), "{}", agents[0].log());
    s2.assert_running();
    report(&format!("{test}: all pairs talk after the restart"));
}

/// Pings `from` -> `to` a few times and checks the doorbell counters: the sender rang, the
/// receiver (asleep between pings, no spinning) was woken by a doorbell. (Replies may find the
/// sender still awake, so they need not ring.)
fn assert_doorbells(ns: &[Netns], agents: &[Agent], shm: &Path, from: usize, to: usize) {
    let before = status_json(shm);
    assert_ping_patient(&ns[from], &addr(to), 3);
    let after = status_json(shm);
    for (i, key) in [(from, "rung"), (to, "wakeups")] {
        let id = agents[i].peer_id;
        let (b, a) = (doorbells(&before, id)[key], doorbells(&after, id)[key]);
        assert!(a > b, "member {i} (peer {id}): {key} did not grow ({b} -> {a}) while {from} pinged {to}: {after:#}");
    }
}

#[test]
fn server_restart_with_fd_store_keeps_doorbells() {
    let test = "server_restart_with_fd_store_keeps_doorbells";
    if !require_root(test) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new();
    let ns = quiet_namespaces();
    let shm = ShmFile::new();
    let mgr = ServiceManager::new(&dir);
    let (mut s2, agents) = restart_scenario(&dir, &ns, &shm, Some(&mgr));
    assert!(s2.log().contains("took the listening socket back"), "{}", s2.log());
    for ag in &agents[..2] {
        assert!(!ag.log().contains("closed the connection"), "lost its connection:\n{}", ag.log());
    }
    // Old and new members ring each other (counters show doorbells, not polling).
    for (x, y) in [(0, 2), (2, 0), (1, 2), (2, 1), (0, 1), (1, 0)] {
        assert_doorbells(&ns, &agents, &shm.path, x, y);
    }
    s2.assert_running();
    report(&format!("{test}: old and new members ring each other after the restart"));
}
