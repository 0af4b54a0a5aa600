//! Beyond one host: two segments joined with the kernel's own VXLAN, as the README's "Beyond one
//! host" section describes. Two namespaces play two hosts, linked by a veth pair (the
//! "network" between them, MTU 1550 so that 1500-byte frames fit with VXLAN's 50 bytes). Each
//! host has its own segment (its own region file) with a host agent whose `tap-shm` is in a
//! Linux bridge together with a `vxlan` device pointing at the other host. A member of each
//! segment runs in a further namespace; the member of one segment pings the member of the
//! other and sends it a TCP stream whose SHA-256 must match.
//!
//! Every namespace, link, bridge and VXLAN device is created by the test inside namespaces it
//! made, and goes with them (guards, also on panic). Needs root; prints `SKIP ...` without it.

mod common;

use std::time::Duration;

use common::*;

/// Agents first, then the namespaces (member, host), then the region files and logs: the
/// fields drop in this order.
struct TwoSites {
    agents: Vec<Agent>,
    members: [Netns; 2],
    hosts: [Netns; 2],
    regions: [ShmFile; 2],
    dir: TempDir,
}

/// Underlay addresses of the two "hosts" (on the veth between them).
const UNDERLAY: [&str; 2] = ["10.93.255.1", "10.93.255.2"];
/// The members' addresses: one subnet, stretched over both segments.
const MEMBER: [&str; 2] = ["10.93.0.1", "10.93.0.2"];
/// The VXLAN id.
const VNI: &str = "4242";

impl TwoSites {
    fn build() -> TwoSites {
        let mut s = TwoSites {
            agents: Vec::new(),
            members: [Netns::new(), Netns::new()],
            hosts: [Netns::new(), Netns::new()],
            regions: [ShmFile::new(), ShmFile::new()],
            dir: TempDir::new(),
        };
        // The wire between the hosts, created inside the first one.
        let other = s.hosts[1].name.clone();
        s.hosts[0].exec_ok(&[
            "ip", "link", "add", "ul0", "mtu", "1550", "type", "veth", "peer", "name", "ul0",
            "mtu", "1550", "netns", &other,
        ]);
        for (i, h) in s.hosts.iter().enumerate() {
            h.exec_ok(&["ip", "addr", "add", &format!("{}/30", UNDERLAY[i]), "dev", "ul0"]);
            h.exec_ok(&["ip", "link", "set", "ul0", "up"]);
        }
        for i in 0..2 {
            // The host agent (peer 0 of this host's segment), without an address: its
            // tap-shm is a bridge port. (Its own MAC is only the port's; distinct all the same.)
            let mac = format!("02:00:00:93:00:{:02x}", 0x10 + i);
            let a = Agent::start(&s.hosts[i], &s.regions[i].path, 0, &["--mac", &mac], &s.dir);
            s.agents.push(a);
            let h = &s.hosts[i];
            h.exec_ok(&["ip", "link", "add", "br-ivnet", "type", "bridge"]);
            h.exec_ok(&[
                "ip",
                "link",
                "add",
                "vxlan-ivnet",
                "type",
                "vxlan",
                "id",
                VNI,
                "dstport",
                "4789",
                "local",
                UNDERLAY[i],
                "remote",
                UNDERLAY[1 - i],
                "dev",
                "ul0",
            ]);
            h.exec_ok(&["ip", "link", "set", "vxlan-ivnet", "master", "br-ivnet"]);
            h.exec_ok(&["ip", "link", "set", "tap-shm", "master", "br-ivnet"]);
            for dev in ["vxlan-ivnet", "br-ivnet"] {
                h.exec_ok(&["ip", "link", "set", dev, "up"]);
            }
            // A member of the segment (peer 1), in its own namespace.
            let cidr = format!("{}/24", MEMBER[i]);
            // MACs must be unique across joined segments; the namespaces here share one machine
            // id, and slot MACs repeat in every segment: explicit ones, as the README says.
            let mac = format!("02:00:00:93:00:{:02x}", 0x20 + i);
            let m = Agent::start(
                &s.members[i],
                &s.regions[i].path,
                1,
                &["--address", &cidr, "--mac", &mac],
                &s.dir,
            );
            s.agents.push(m);
        }
        s
    }
}

#[test]
fn vxlan_joins_segments_on_two_hosts() {
    if !require_root("vxlan_joins_segments_on_two_hosts") {
        return;
    }
    let sites = TwoSites::build();
    let [m0, m1] = &sites.members;
    // ARP across both segments and the tunnel, and every agent seeing its peer up.
    wait_until("member 0 reaches member 1 over VXLAN", Duration::from_secs(20), || {
        ping_once(m0, MEMBER[1], Duration::from_millis(500))
    });
    assert_ping(m0, MEMBER[1], 5);
    assert_ping(m1, MEMBER[0], 5);
    // The frames went through the tunnel: the VXLAN devices counted them.
    for h in &sites.hosts {
        let out = h.exec_ok(&["cat", "/sys/class/net/vxlan-ivnet/statistics/tx_packets"]);
        let n: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        assert!(n >= 5, "{}: vxlan-ivnet sent {n} packets", h.name);
    }

    let (sent, received, _) =
        tcp_transfer(m1, m0, MEMBER[1], 5201, 16 << 20, 77, Duration::from_secs(120));
    assert_eq!(received.bytes, 16 << 20);
    assert_eq!(hex(&received.sha256), hex(&sent.sha256), "the stream changed on the way");
    drop(sites);
}
