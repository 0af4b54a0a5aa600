//! The peer info table (layout v2): per peer, the IP addresses of the owner's interface, so
//! that any reader of the region (`ivnet status` on the host, another guest) sees every
//! member's addresses.
//!
//! Single writer (the slot's owner), readers anywhere. The entry is a small sequence lock
//! without a lock: the owner makes the sequence word odd, writes the words, makes it even
//! again; a reader copies the words and keeps them only if the sequence word was even and
//! unchanged around the copy (after a bounded number of tries it gives up: "changing"). Every
//! value read is checked (count, family, prefix length) before it is used.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{fence, Ordering};

use super::layout::{info, INFO_MAX_ADDRS};
use super::raw::RawRegion;

/// How often a reader tries to get a consistent copy before it reports the entry as changing.
const READ_TRIES: usize = 16;

/// Addresses as a reader found them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Addresses {
    /// Address and prefix length, in the owner's order.
    pub addrs: Vec<(IpAddr, u8)>,
    /// The owner had more than [`INFO_MAX_ADDRS`]: some were left out.
    pub truncated: bool,
}

/// What a reader got from an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoRead {
    /// A consistent copy written by the incarnation asked for.
    Current(Addresses),
    /// Written by another incarnation of the slot (or never): nothing known.
    Stale,
    /// The owner kept writing while we read (or wrote nonsense): nothing usable.
    Unreadable,
}

/// One peer-info entry.
#[derive(Clone, Copy)]
pub struct PeerInfo<'r> {
    raw: &'r RawRegion,
    base: usize,
}

impl<'r> PeerInfo<'r> {
    pub(super) fn new(raw: &'r RawRegion, base: usize) -> Self {
        PeerInfo { raw, base }
    }

    fn word(&self, off: usize) -> &'r std::sync::atomic::AtomicU64 {
        self.raw.u64_at(self.base + off)
    }

    /// Writes the owner's addresses (owner only; at most [`INFO_MAX_ADDRS`] are kept, the rest
    /// is flagged as truncated). `incarnation` is the owner's claim on the slot.
    pub fn publish(&self, incarnation: u64, addrs: &[(IpAddr, u8)]) {
        let seq = self.raw.u32_at(self.base + info::SEQ);
        let start = seq.load(Ordering::Relaxed);
        // Odd first. The Release fence orders this store before the data stores below, so a
        // reader that sees any new data also sees the odd word (pairs with the reader's
        // Acquire fence before its second load of the sequence word).
        let odd = start.wrapping_add(1) | 1;
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        let n = addrs.len().min(INFO_MAX_ADDRS);
        let mut count = n as u32;
        if addrs.len() > INFO_MAX_ADDRS {
            count |= info::TRUNCATED;
        }
        self.raw.u32_at(self.base + info::COUNT).store(count, Ordering::Relaxed);
        self.word(info::INCARNATION).store(incarnation, Ordering::Relaxed);
        for i in 0..INFO_MAX_ADDRS {
            let words = addrs.get(i).filter(|_| i < n).map_or([0u64; 3], |&(a, p)| encode(a, p));
            for (k, w) in words.iter().enumerate() {
                self.word(info::ADDRS + i * info::ADDR_SIZE + k * 8).store(*w, Ordering::Relaxed);
            }
        }
        // Release: the data above is visible to a reader that sees the even word (pairs with
        // the reader's Acquire load of the first sequence word).
        seq.store(odd.wrapping_add(1), Ordering::Release);
    }

    /// Reads the entry if it was written by `incarnation` (the slot's current one).
    pub fn read(&self, incarnation: u64) -> InfoRead {
        let seq = self.raw.u32_at(self.base + info::SEQ);
        for _ in 0..READ_TRIES {
            // Acquire: pairs with the owner's Release store of the even word.
            let s1 = seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let count = self.raw.u32_at(self.base + info::COUNT).load(Ordering::Relaxed);
            let inc = self.word(info::INCARNATION).load(Ordering::Relaxed);
            let mut words = [[0u64; 3]; INFO_MAX_ADDRS];
            for (i, w) in words.iter_mut().enumerate() {
                for (k, v) in w.iter_mut().enumerate() {
                    *v = self
                        .word(info::ADDRS + i * info::ADDR_SIZE + k * 8)
                        .load(Ordering::Relaxed);
                }
            }
            // Acquire: pairs with the owner's Release fence after its odd store; if the owner
            // began a write that our loads saw part of, the load below sees the odd (or a
            // later) word.
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            if s1 == 0 || inc != incarnation {
                return InfoRead::Stale;
            }
            let n = (count & 0xff) as usize;
            if n > INFO_MAX_ADDRS {
                return InfoRead::Unreadable;
            }
            let mut addrs = Vec::with_capacity(n);
            for w in &words[..n] {
                match decode(w) {
                    Some(a) => addrs.push(a),
                    None => return InfoRead::Unreadable,
                }
            }
            return InfoRead::Current(Addresses { addrs, truncated: count & info::TRUNCATED != 0 });
        }
        InfoRead::Unreadable
    }
}

fn encode(addr: IpAddr, prefix: u8) -> [u64; 3] {
    let (family, bytes, max) = match addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (4u8, b, 32)
        }
        IpAddr::V6(a) => (6u8, a.octets(), 128),
    };
    let head = [family, prefix.min(max), 0, 0, 0, 0, 0, 0];
    [
        u64::from_le_bytes(head),
        u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
    ]
}

fn decode(w: &[u64; 3]) -> Option<(IpAddr, u8)> {
    let head = w[0].to_le_bytes();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&w[1].to_le_bytes());
    bytes[8..].copy_from_slice(&w[2].to_le_bytes());
    let (family, prefix) = (head[0], head[1]);
    if head[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match family {
        4 if prefix <= 32 && bytes[4..].iter().all(|&b| b == 0) => {
            Some((IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])), prefix))
        }
        6 if prefix <= 128 => Some((IpAddr::V6(Ipv6Addr::from(bytes)), prefix)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::region::layout::{Geometry, INFO_ENTRY_SIZE};
    use crate::region::{GeometryRequest, HeapMemory, Region};

    fn region() -> Region {
        Region::attach(Arc::new(HeapMemory::new(32 << 20)), "i", &GeometryRequest::default())
            .unwrap()
    }

    fn a(s: &str, p: u8) -> (IpAddr, u8) {
        (s.parse().unwrap(), p)
    }

    #[test]
    fn test_published_addresses_read_back_for_the_same_incarnation_only() {
        let r = region();
        let e = r.peer_info(3);
        assert_eq!(e.read(1), InfoRead::Stale, "a fresh entry holds nothing");
        let addrs = vec![a("10.0.0.1", 24), a("fd00::1", 64), a("fe80::69:76ff:fe6e:3", 64)];
        e.publish(5, &addrs);
        assert_eq!(
            e.read(5),
            InfoRead::Current(Addresses { addrs: addrs.clone(), truncated: false })
        );
        assert_eq!(e.read(6), InfoRead::Stale, "a later owner of the slot must not show them");
        e.publish(5, &[]);
        assert_eq!(e.read(5), InfoRead::Current(Addresses::default()));
        // Other entries are untouched.
        assert_eq!(r.peer_info(2).read(5), InfoRead::Stale);
    }

    #[test]
    fn test_more_addresses_than_fit_are_truncated_and_flagged() {
        let r = region();
        let many: Vec<_> = (0..13).map(|i| a(&format!("10.0.{i}.1"), 16)).collect();
        r.peer_info(0).publish(1, &many);
        let InfoRead::Current(got) = r.peer_info(0).read(1) else { panic!("not readable") };
        assert!(got.truncated);
        assert_eq!(got.addrs, many[..INFO_MAX_ADDRS]);
    }

    #[test]
    fn test_entry_bytes_are_pinned() {
        // The wire format of one entry: a guest built from another commit reads these bytes.
        let r = region();
        r.peer_info(1).publish(7, &[a("10.1.2.3", 24), a("fd00::2", 64)]);
        let base = r.layout().info(1);
        let mut b = vec![0u8; INFO_ENTRY_SIZE];
        r.raw().copy_out(base, &mut b).unwrap();
        assert_eq!(&b[0..4], &2u32.to_le_bytes(), "sequence word: one write, even");
        assert_eq!(&b[4..8], &2u32.to_le_bytes(), "count");
        assert_eq!(&b[8..16], &7u64.to_le_bytes(), "incarnation");
        assert_eq!(&b[16..24], &[4, 24, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..40], &[10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[40..48], &[6, 64, 0, 0, 0, 0, 0, 0]);
        let v6: Ipv6Addr = "fd00::2".parse().unwrap();
        assert_eq!(&b[48..64], &v6.octets());
        assert!(b[64..].iter().all(|&x| x == 0));
        assert_eq!(r.layout().info(1), Geometry::DEFAULT_MAX_PEERS as usize * 256 + 4096 + 256);
    }

    #[test]
    fn test_garbage_and_a_write_in_progress_are_not_believed() {
        let r = region();
        let e = r.peer_info(4);
        e.publish(2, &[a("10.0.0.4", 24)]);
        let base = r.layout().info(4);
        let raw = r.raw();
        // An odd sequence word: the owner is (or died) writing.
        raw.u32_at(base + info::SEQ).store(3, Ordering::Relaxed);
        assert_eq!(e.read(2), InfoRead::Unreadable);
        raw.u32_at(base + info::SEQ).store(4, Ordering::Relaxed);
        // A count beyond the entry.
        raw.u32_at(base + info::COUNT).store(200, Ordering::Relaxed);
        assert_eq!(e.read(2), InfoRead::Unreadable);
        raw.u32_at(base + info::COUNT).store(1, Ordering::Relaxed);
        // An unknown family, a prefix too long, bytes beyond an IPv4 address.
        for (head, extra) in [
            ([9u8, 24, 0, 0, 0, 0, 0, 0], 0u64),
            ([4, 33, 0, 0, 0, 0, 0, 0], 0),
            ([4, 24, 0, 0, 0, 0, 0, 0], 1),
        ] {
            raw.u64_at(base + info::ADDRS).store(u64::from_le_bytes(head), Ordering::Relaxed);
            raw.u64_at(base + info::ADDRS + 16).store(extra, Ordering::Relaxed);
            assert_eq!(e.read(2), InfoRead::Unreadable, "{head:?} {extra}");
        }
    }

    #[test]
    fn test_readers_never_see_a_torn_entry_while_the_owner_rewrites_it() {
        let r = region();
        let sets: Vec<Vec<(IpAddr, u8)>> = vec![
            vec![a("10.0.0.1", 24)],
            vec![a("fd00::1", 64), a("10.9.9.9", 8), a("192.168.1.1", 32)],
        ];
        let writer = {
            let r = r.clone();
            let sets = sets.clone();
            std::thread::spawn(move || {
                for i in 0..20_000 {
                    r.peer_info(0).publish(1, &sets[i % 2]);
                }
            })
        };
        while !writer.is_finished() {
            if let InfoRead::Current(got) = r.peer_info(0).read(1) {
                assert!(sets.contains(&got.addrs), "torn read: {got:?}");
            }
        }
        writer.join().unwrap();
        assert!(matches!(r.peer_info(0).read(1), InfoRead::Current(_)));
    }
}
