//! The learning bridge between the local interface and the peers: source MAC -> peer, with
//! ageing. Broadcast, multicast and unknown unicast are flooded to every peer whose link is up;
//! frames whose destination lives behind this member itself are dropped.
//!
//! The table is allocated once with a fixed capacity, so learning never allocates on the hot
//! path; when it is full, expired entries are purged, and if none expired the new address is
//! not learned (its frames are flooded, which is correct, only less efficient).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Where a frame from the local interface goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// To one peer.
    Unicast(u32),
    /// To every peer whose link is up.
    Flood,
    /// Nowhere: the destination is behind this member itself.
    ToSelf,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    peer: u32,
    seen: Instant,
}

/// MAC learning table.
pub struct Switch {
    me: u32,
    ageing: Duration,
    capacity: usize,
    table: HashMap<[u8; 6], Entry>,
}

impl Switch {
    /// Default time an address stays learned without being seen.
    pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);
    /// Default number of addresses remembered.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty table for member `me`.
    pub fn new(me: u32, ageing: Duration, capacity: usize) -> Self {
        Switch { me, ageing, capacity, table: HashMap::with_capacity(capacity) }
    }

    /// Records that `mac` was seen behind `peer` (this member's id for local frames).
    #[inline]
    pub fn learn(&mut self, mac: [u8; 6], peer: u32, now: Instant) {
        if mac[0] & 1 == 1 {
            return; // group addresses are never sources
        }
        if let Some(e) = self.table.get_mut(&mac) {
            e.peer = peer;
            e.seen = now;
            return;
        }
        if self.table.len() >= self.capacity {
            let ageing = self.ageing;
            self.table.retain(|_, e| now.duration_since(e.seen) < ageing);
            if self.table.len() >= self.capacity {
                return;
            }
        }
        self.table.insert(mac, Entry { peer, seen: now });
    }

    /// Decides where a frame to `dst` goes.
    #[inline]
    pub fn forward(&self, dst: [u8; 6], now: Instant) -> Forward {
        if dst[0] & 1 == 1 {
            return Forward::Flood;
        }
        match self.table.get(&dst) {
            Some(e) if now.duration_since(e.seen) < self.ageing => {
                if e.peer == self.me {
                    Forward::ToSelf
                } else {
                    Forward::Unicast(e.peer)
                }
            }
            _ => Forward::Flood,
        }
    }

    /// Forgets every address learned behind `peer` (its link went down or it restarted).
    pub fn forget_peer(&mut self, peer: u32) {
        self.table.retain(|_, e| e.peer != peer);
    }

    /// Number of addresses known.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no address is known.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn test_unknown_broadcast_and_multicast_flood() {
        let s = Switch::new(0, Switch::DEFAULT_AGEING, 16);
        let now = Instant::now();
        assert_eq!(s.forward(A, now), Forward::Flood);
        assert_eq!(s.forward([0xff; 6], now), Forward::Flood);
        assert_eq!(s.forward([0x33, 0x33, 0, 0, 0, 1], now), Forward::Flood);
    }

    #[test]
    fn test_learned_unicast_goes_to_its_peer_and_self_is_dropped() {
        let mut s = Switch::new(0, Switch::DEFAULT_AGEING, 16);
        let now = Instant::now();
        s.learn(A, 3, now);
        s.learn(B, 0, now);
        assert_eq!(s.forward(A, now), Forward::Unicast(3));
        assert_eq!(s.forward(B, now), Forward::ToSelf);
        s.learn(A, 5, now); // the address moved
        assert_eq!(s.forward(A, now), Forward::Unicast(5));
    }

    #[test]
    fn test_entries_age_out_and_are_forgotten_with_their_peer() {
        let mut s = Switch::new(0, Duration::from_secs(10), 16);
        let now = Instant::now();
        s.learn(A, 3, now);
        assert_eq!(s.forward(A, now + Duration::from_secs(11)), Forward::Flood);
        s.learn(B, 4, now);
        s.forget_peer(4);
        assert_eq!(s.forward(B, now), Forward::Flood);
    }

    #[test]
    fn test_full_table_purges_expired_and_never_grows() {
        let mut s = Switch::new(0, Duration::from_secs(10), 2);
        let now = Instant::now();
        s.learn(A, 1, now);
        s.learn(B, 2, now);
        s.learn([2, 0, 0, 0, 0, 3], 3, now);
        assert_eq!(s.len(), 2);
        s.learn([2, 0, 0, 0, 0, 3], 3, now + Duration::from_secs(11));
        assert_eq!(
            s.forward([2, 0, 0, 0, 0, 3], now + Duration::from_secs(11)),
            Forward::Unicast(3)
        );
        s.learn([0x01, 0, 0x5e, 0, 0, 1], 1, now);
        assert!(s.len() <= 2);
    }
}
