//! The agent's default MAC: derived from /etc/machine-id and the TAP name (stable across
//! restarts whatever slot the agent gets), falling back to the slot's MAC (02:69:76:6e:HH:LL)
//! when another member already has it, as every further namespace on this host does (they
//! share the machine id). Agents started at the same moment never end up with the same MAC.
//!
//! Needs root (namespaces, TAPs); prints `SKIP ...` without it.

mod common;

use sha2::{Digest, Sha256};

use common::*;

/// What the agent derives for `ifname` on this machine (None without a machine id).
fn persistent_mac(ifname: &str) -> Option<String> {
    let id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let id = id.trim();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let d = Sha256::digest(format!("ivnet interface MAC\0{}\0{ifname}", id.to_ascii_lowercase()));
    let m = [(d[0] & 0xfc) | 0x02, d[1], d[2], d[3], d[4], d[5]];
    Some(m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
}

fn slot_mac(id: u32) -> String {
    format!("02:69:76:6e:{:02x}:{:02x}", id >> 8, id & 0xff)
}

/// The MAC of `ifname` in `ns`, as the kernel has it.
fn link_mac(ns: &Netns, ifname: &str) -> String {
    let out = ns.exec_ok(&["cat", &format!("/sys/class/net/{ifname}/address")]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn table_mac(lab: &Lab, id: u32) -> String {
    let st = lab.status();
    peer(&st, id).and_then(|p| p["mac"].as_str()).unwrap_or("").to_string()
}

#[test]
fn default_mac_from_machine_id_then_from_the_slot() {
    if !require_root("default_mac_from_machine_id_then_from_the_slot") {
        return;
    }
    let first = persistent_mac("tap-shm");
    let mut lab = Lab::new(3);
    for i in 0..3 {
        lab.start(i, &[]);
    }
    let m0 = link_mac(&lab.ns[0], "tap-shm");
    assert_eq!(Some(&m0), first.as_ref().or(Some(&slot_mac(0))), "the first agent's MAC");
    for i in 1..3 {
        // Same machine id, same TAP name: the persistent MAC is taken, so the slot's.
        assert_eq!(link_mac(&lab.ns[i], "tap-shm"), slot_mac(i as u32), "agent {i}");
        assert!(lab.agent(i).log().contains("from the peer id"), "{}", lab.agent(i).log());
    }
    for i in 0..3 {
        assert_eq!(table_mac(&lab, i as u32), link_mac(&lab.ns[i], "tap-shm"));
    }
    lab.wait_reachable(1, 0, std::time::Duration::from_secs(10));

    // Restarted (cleanly or not), the first keeps its MAC.
    lab.agents[0].take().expect("running").kill_hard();
    lab.start(0, &[]);
    assert_eq!(link_mac(&lab.ns[0], "tap-shm"), m0);
    // Choosing the MAC publishes it early in the slot, with the real MTU: the others, which
    // see the restart at once, must still reach it with full-size frames.
    lab.wait_reachable(1, 0, std::time::Duration::from_secs(10));
    assert_ping(&lab.ns[1], &Lab::addr(0), 3);
    assert!(!lab.agent(1).log().contains("MTU 68"), "{}", lab.agent(1).log());
    let a0 = lab.agents[0].take().expect("running");
    assert!(a0.terminate().success());
    lab.start(0, &[]);
    assert_eq!(link_mac(&lab.ns[0], "tap-shm"), m0);
}

#[test]
fn default_mac_depends_on_the_tap_name() {
    if !require_root("default_mac_depends_on_the_tap_name") {
        return;
    }
    let mut lab = Lab::new(1);
    let name = format!("ivm{}", std::process::id() % 100_000);
    lab.start(0, &["--tap", &name]);
    let want = persistent_mac(&name).unwrap_or_else(|| slot_mac(0));
    assert_eq!(link_mac(&lab.ns[0], &name), want);
}

#[test]
fn default_macs_of_agents_started_together_differ() {
    if !require_root("default_macs_of_agents_started_together_differ") {
        return;
    }
    let persistent = persistent_mac("tap-shm");
    for round in 0..5 {
        let mut lab = Lab::new(2);
        lab.start_all(&[]);
        let (a, b) = (link_mac(&lab.ns[0], "tap-shm"), link_mac(&lab.ns[1], "tap-shm"));
        assert_ne!(a, b, "round {round}: both agents have {a}");
        for (i, m) in [(0u32, &a), (1, &b)] {
            assert!(
                Some(m) == persistent.as_ref() || *m == slot_mac(i),
                "round {round}: agent {i} has {m}"
            );
        }
    }
}
