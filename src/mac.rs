//! MAC addresses: parsing, printing, and the agent's stable default: derived from the machine's
//! id and the interface name (as systemd-networkd's `MACAddressPolicy=persistent` does), or from
//! the peer id when that one is taken on the segment.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{fence, Ordering};

use sha2::{Digest, Sha256};

use crate::region::{PeerKind, PeerState, Region};

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six hex pairs separated by colons.
    #[error("MAC address {0:?} is not six hex byte pairs like 02:00:00:00:00:01")]
    Syntax(String),
    /// A group (multicast) address cannot belong to an interface.
    #[error("MAC address {0} is a multicast address (lowest bit of the first byte set)")]
    Multicast(String),
    /// All zeros.
    #[error("MAC address 00:00:00:00:00:00 is not a usable address")]
    Zero,
}

impl Mac {
    /// The broadcast address.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// The stable, locally administered unicast MAC of peer `peer_id`: `02:69:76:6e:HH:LL`
    /// ("ivn" and the id), so the same peer id always gets the same MAC.
    pub fn for_peer(peer_id: u32) -> Mac {
        let [_, _, hi, lo] = peer_id.to_be_bytes();
        Mac([0x02, 0x69, 0x76, 0x6e, hi, lo])
    }

    /// A stable, locally administered unicast MAC for interface `ifname` on the machine whose
    /// `/etc/machine-id` is `machine_id`: the first six bytes of SHA-256 over both (with a
    /// prefix naming the use), the group bit cleared and the local bit set. The same machine and
    /// name always give the same MAC; other machines, or other names, almost surely another.
    pub fn persistent(machine_id: &str, ifname: &str) -> Mac {
        let mut h = Sha256::new();
        h.update(b"ivnet interface MAC\0");
        h.update(machine_id.trim().as_bytes());
        h.update(b"\0");
        h.update(ifname.as_bytes());
        let d = h.finalize();
        Mac([(d[0] & 0xfc) | 0x02, d[1], d[2], d[3], d[4], d[5]])
    }

    /// Whether the group (multicast/broadcast) bit is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(MacError::Syntax(s.into()));
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(MacError::Syntax(s.into()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.into()))?;
        }
        let mac = Mac(m);
        if mac.is_multicast() {
            return Err(MacError::Multicast(s.into()));
        }
        if m == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(mac)
    }
}

/// This machine's id from `/etc/machine-id` (32 hex digits), if it has a usable one (an empty
/// file or `uninitialized`, as in a fresh image, is none).
pub fn machine_id() -> Option<String> {
    machine_id_from(&std::fs::read_to_string("/etc/machine-id").ok()?)
}

fn machine_id_from(text: &str) -> Option<String> {
    let id = text.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then(|| id.to_ascii_lowercase())
}

/// The MAC an agent uses when none is configured, for interface `ifname` in peer slot `slot`
/// (claimed, not yet up; `mtu` and `features` are what the agent will publish there when it
/// joins, written now already since peers may read the slot as soon as it is claimed):
/// [`Mac::persistent`] from `/etc/machine-id` and `ifname`, unless
/// another member of the segment already has that MAC (namespaces on one host share a machine
/// id, and so may VMs cloned from one image), or there is no machine id: then the slot's MAC
/// ([`Mac::for_peer`]). Returns the MAC and why it was chosen.
///
/// Two agents choosing at the same moment each publish their candidate in their own slot
/// before they look at the others'; with a sequentially consistent fence between the two steps
/// on both sides, at least one of them sees the other's, so they never both keep the same MAC
/// (both may fall back).
pub fn default_for_member(
    region: &Region,
    slot: u32,
    ifname: &str,
    mtu: u32,
    features: u32,
) -> (Mac, String) {
    let fallback = Mac::for_peer(slot);
    let Some(id) = machine_id() else {
        return (fallback, "from the peer id (no /etc/machine-id)".into());
    };
    let candidate = Mac::persistent(&id, ifname);
    let me = region.peer(slot);
    // Our slot is claimed but not up. Its MAC matters to choosers like us; a peer that sees the
    // new incarnation before we are up reads MTU and features, so those are the real ones.
    let publish = |mac: Mac| me.set_info(mac.0, mtu, features, PeerKind::Agent, std::process::id());
    publish(candidate);
    // SeqCst fence: pairs with the same fence of another agent running this function, between
    // its MAC store above and its loads below (store-buffering: one of two sees the other).
    fence(Ordering::SeqCst);
    let host = crate::sys::host_token();
    let taken_by = (0..region.geometry().max_peers).filter(|&id| id != slot).find(|&id| {
        let p = region.peer(id);
        if p.mac() != candidate.0 || p.is_free(p.incarnation()) {
            return false;
        }
        // A member that died on this host without leaving does not count.
        let (their_host, pid) = p.owner();
        let dead = host != 0 && their_host == host && !crate::sys::process_exists(pid);
        !dead && p.state() != PeerState::Left
    });
    match taken_by {
        None => (candidate, format!("from /etc/machine-id and {ifname}")),
        Some(other) => {
            publish(fallback);
            (
                fallback,
                format!(
                    "from the peer id: peer {other} has {candidate}, the MAC from /etc/machine-id \
                     and {ifname} (same machine id)"
                ),
            )
        }
    }
}

/// Serialises a MAC as "aa:bb:cc:dd:ee:ff" (for `status --json`).
pub fn serialize<S: serde::Serializer>(m: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Mac(*m))
}

/// Reads a MAC written by [`serialize`] (the status an agent sends over its control socket).
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    // Any six hex pairs, including addresses a MAC flag would refuse: this is a report.
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(serde::de::Error::custom(format!("{s:?} is not a MAC address")));
    }
    for (b, p) in m.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a MAC address")))?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_and_print_round_trip() {
        let m: Mac = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
    }

    #[test]
    fn test_bad_macs_are_refused() {
        assert!(matches!("02:00:00:00:00".parse::<Mac>(), Err(MacError::Syntax(_))));
        assert!(matches!("02:00:00:00:00:0g".parse::<Mac>(), Err(MacError::Syntax(_))));
        assert!(matches!("01:00:5e:00:00:01".parse::<Mac>(), Err(MacError::Multicast(_))));
        assert!(matches!("00:00:00:00:00:00".parse::<Mac>(), Err(MacError::Zero)));
    }

    #[test]
    fn test_persistent_macs_are_stable_local_unicast_and_distinct() {
        let id = "0123456789abcdef0123456789abcdef";
        let a = Mac::persistent(id, "tap-shm");
        assert_eq!(a, Mac::persistent(id, "tap-shm"));
        assert_eq!(a.0[0] & 0b11, 0b10, "{a}");
        assert_ne!(a, Mac::persistent(id, "tap-shm2"));
        assert_ne!(a, Mac::persistent("fedcba9876543210fedcba9876543210", "tap-shm"));
        // The value itself is part of the contract (a MAC must not change with a new build).
        let d = Sha256::digest(format!("ivnet interface MAC\0{id}\0tap-shm"));
        assert_eq!(a.0[1..], d[1..6]);
    }

    #[test]
    fn test_machine_ids_are_checked() {
        let id = "0123456789ABCDEF0123456789abcdef\n";
        assert_eq!(machine_id_from(id).as_deref(), Some("0123456789abcdef0123456789abcdef"));
        assert_eq!(machine_id_from(""), None);
        assert_eq!(machine_id_from("uninitialized\n"), None);
        assert_eq!(machine_id_from(&"0".repeat(32)), None);
    }

    #[test]
    fn test_default_macs_are_local_unicast_and_distinct() {
        let a = Mac::for_peer(0);
        let b = Mac::for_peer(1);
        assert_ne!(a, b);
        assert_eq!(a.0[0] & 0b11, 0b10);
        assert_eq!(Mac::for_peer(7), Mac::for_peer(7));
    }
}
