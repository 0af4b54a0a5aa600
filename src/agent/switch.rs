//! The learning bridge between the local interface and the peers: source MAC -> peer, with
//! ageing. Broadcast, multicast and unknown unicast are flooded to every peer whose link is up;
//! frames whose destination lives behind this member itself are dropped.
//!
//! Peers choose the source MACs we learn, so the table is built to stay cheap and fair whatever
//! they send (issue 11, finding 3):
//! - Fixed capacity, allocated once: learning never allocates on the hot path.
//! - Every learn and forward does bounded work: a hash lookup, one step of the ageing sweep
//!   and, when a peer below its fair share learns into a full table, a look at the oldest entry
//!   of each peer (at most [`MAX_PEER_IDS`] of them). Expired entries are swept incrementally,
//!   one peer's oldest entry per learn, never by a full-table purge. The address learned last
//!   is refreshed without the lookup: a stream's frames all carry the same source.
//! - Per-peer fair shares: each peer's entries form their own least-recently-seen list. When the
//!   table is full, a peer holding at least its fair share (capacity / peers holding entries)
//!   recycles its own oldest entry; a peer below it takes the oldest entry of the largest holder.
//!   So a peer that sends random source MACs churns only its own share and cannot push out the
//!   addresses of a peer that holds no more than its share.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::region::layout::MAX_PEERS_LIMIT;

/// Peer ids the table tracks (`0..MAX_PEER_IDS`): every slot a region can have. Addresses seen
/// behind a larger id are not learned (their frames are flooded).
pub const MAX_PEER_IDS: usize = MAX_PEERS_LIMIT as usize;
// `Switch::holders` has a bit per peer id.
const _: () = assert!(MAX_PEER_IDS <= 64);

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

/// "No entry" in the intrusive lists.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Entry {
    mac: [u8; 6],
    peer: u32,
    seen: Instant,
    /// Neighbours in the peer's list (oldest first), or in the free list (`next` only).
    prev: u32,
    next: u32,
}

/// One peer's entries, oldest first.
#[derive(Debug, Clone, Copy)]
struct PeerList {
    head: u32,
    tail: u32,
    count: u32,
}

const EMPTY_LIST: PeerList = PeerList { head: NIL, tail: NIL, count: 0 };

/// MAC learning table.
pub struct Switch {
    me: u32,
    ageing: Duration,
    capacity: usize,
    /// MAC -> index into `entries`.
    index: HashMap<[u8; 6], u32>,
    /// Every entry ever allocated (at most `capacity`); unused ones are on the free list.
    entries: Vec<Entry>,
    free: u32,
    peers: [PeerList; MAX_PEER_IDS],
    /// Peers with at least one entry: bit `p` for peer `p`.
    holders: u64,
    /// The entry the last learn created or refreshed (NIL if it has been released since): it is
    /// the newest of its peer's list, so seeing its address again only updates its time.
    recent: u32,
    /// Round-robin position of the incremental ageing sweep.
    sweep: usize,
    /// Entries looked at by learn/forward (for tests that bound the work per frame).
    #[cfg(test)]
    visited: u64,
}

impl Switch {
    /// Default time an address stays learned without being seen.
    pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);
    /// Default number of addresses remembered.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// An empty table for member `me`.
    pub fn new(me: u32, ageing: Duration, capacity: usize) -> Self {
        let capacity = capacity.min(NIL as usize - 1);
        Switch {
            me,
            ageing,
            capacity,
            // Twice the entries: with at most half the buckets full, the hash map only ever
            // rehashes in place (clearing removal marks), it never grows, so never allocates.
            index: HashMap::with_capacity(capacity.saturating_mul(2)),
            entries: Vec::with_capacity(capacity),
            free: NIL,
            peers: [EMPTY_LIST; MAX_PEER_IDS],
            holders: 0,
            recent: NIL,
            sweep: 0,
            #[cfg(test)]
            visited: 0,
        }
    }

    #[inline]
    fn expired(&self, i: u32, now: Instant) -> bool {
        now.saturating_duration_since(self.entries[i as usize].seen) >= self.ageing
    }

    #[inline]
    fn count_visit(&mut self) {
        #[cfg(test)]
        {
            self.visited += 1;
        }
    }

    /// Appends entry `i` to the tail (newest end) of its peer's list.
    fn link(&mut self, i: u32) {
        let peer = self.entries[i as usize].peer as usize;
        let l = &mut self.peers[peer];
        let old_tail = l.tail;
        l.tail = i;
        if old_tail == NIL {
            l.head = i;
        }
        l.count += 1;
        if l.count == 1 {
            self.holders |= 1 << peer;
        }
        let e = &mut self.entries[i as usize];
        e.prev = old_tail;
        e.next = NIL;
        if old_tail != NIL {
            self.entries[old_tail as usize].next = i;
        }
    }

    /// Takes entry `i` out of its peer's list.
    fn unlink(&mut self, i: u32) {
        let Entry { peer, prev, next, .. } = self.entries[i as usize];
        let l = &mut self.peers[peer as usize];
        if prev == NIL {
            l.head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            l.tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        l.count -= 1;
        if l.count == 0 {
            self.holders &= !(1 << peer);
        }
    }

    /// Forgets entry `i` and puts it on the free list.
    fn release(&mut self, i: u32) {
        if i == self.recent {
            self.recent = NIL;
        }
        self.unlink(i);
        let mac = self.entries[i as usize].mac;
        self.index.remove(&mac);
        self.entries[i as usize].next = self.free;
        self.free = i;
    }

    /// One step of the incremental ageing sweep: the oldest entry of the next peer, if expired.
    fn sweep_step(&mut self, now: Instant) {
        if self.holders == 0 {
            return;
        }
        // The next peer with entries at or after the sweep's position, wrapping around.
        let p = (self.sweep as u32 + self.holders.rotate_right(self.sweep as u32).trailing_zeros())
            as usize
            % 64;
        self.sweep = (p + 1) % MAX_PEER_IDS;
        let head = self.peers[p].head;
        self.count_visit();
        if self.expired(head, now) {
            self.release(head);
        }
    }

    /// With a full table, picks the entry a new address of `peer` replaces, or `None` if it
    /// must not be learned.
    fn victim(&mut self, peer: u32, now: Instant) -> Option<u32> {
        let mine = self.peers[peer as usize];
        let sharers = self.holders.count_ones() + u32::from(mine.count == 0);
        let fair = (self.capacity as u32 / sharers.max(1)).max(1);
        if mine.count >= fair {
            // At or above its share: the peer recycles its own least recently seen address (the
            // sweep frees other peers' expired ones). O(1): the flooding case.
            return Some(mine.head);
        }
        // Below its share: an expired entry goes first (the oldest of any peer), else the
        // largest holder (above its share, since the table is full) gives up its least recently
        // seen address. Looks at each peer's oldest entry once.
        let mut oldest: Option<u32> = None;
        let mut largest: Option<usize> = None;
        for p in 0..MAX_PEER_IDS {
            let l = self.peers[p];
            if l.head == NIL {
                continue;
            }
            self.count_visit();
            let seen = self.entries[l.head as usize].seen;
            if self.expired(l.head, now)
                && oldest.is_none_or(|o| seen < self.entries[o as usize].seen)
            {
                oldest = Some(l.head);
            }
            if largest.is_none_or(|q| l.count > self.peers[q].count) {
                largest = Some(p);
            }
        }
        oldest.or_else(|| largest.map(|q| self.peers[q].head))
    }

    /// Records that `mac` was seen behind `peer` (this member's id for local frames).
    #[inline]
    pub fn learn(&mut self, mac: [u8; 6], peer: u32, now: Instant) {
        if mac[0] & 1 == 1 || peer as usize >= MAX_PEER_IDS || self.capacity == 0 {
            return; // group addresses are never sources
        }
        self.sweep_step(now);
        if let Some(e) = self.entries.get_mut(self.recent as usize) {
            if e.mac == mac && e.peer == peer {
                // The address learned last, from the same peer: already the newest entry of
                // that peer's list (nothing was linked there since), so only its time changes.
                e.seen = now;
                self.count_visit();
                return;
            }
        }
        if let Some(&i) = self.index.get(&mac) {
            self.count_visit();
            // Seen again: it becomes the newest entry of (possibly another) peer.
            self.unlink(i);
            let e = &mut self.entries[i as usize];
            e.peer = peer;
            e.seen = now;
            self.link(i);
            self.recent = i;
            return;
        }
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.entries[i as usize].next;
            i
        } else if self.entries.len() < self.capacity {
            let i = self.entries.len() as u32;
            self.entries.push(Entry { mac, peer, seen: now, prev: NIL, next: NIL });
            i
        } else {
            let Some(v) = self.victim(peer, now) else { return };
            self.release(v);
            let i = self.free;
            self.free = self.entries[i as usize].next;
            i
        };
        self.entries[i as usize] = Entry { mac, peer, seen: now, prev: NIL, next: NIL };
        self.link(i);
        self.index.insert(mac, i);
        self.recent = i;
    }

    /// Decides where a frame to `dst` goes.
    #[inline]
    pub fn forward(&self, dst: [u8; 6], now: Instant) -> Forward {
        if dst[0] & 1 == 1 {
            return Forward::Flood;
        }
        match self.index.get(&dst) {
            Some(&i) if !self.expired(i, now) => {
                let peer = self.entries[i as usize].peer;
                if peer == self.me {
                    Forward::ToSelf
                } else {
                    Forward::Unicast(peer)
                }
            }
            _ => Forward::Flood,
        }
    }

    /// Forgets every address learned behind `peer` (its link went down or it restarted).
    pub fn forget_peer(&mut self, peer: u32) {
        let Some(l) = self.peers.get(peer as usize) else { return };
        let mut i = l.head;
        while i != NIL {
            let next = self.entries[i as usize].next;
            self.release(i);
            i = next;
        }
    }

    /// Number of addresses known.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no address is known.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Number of addresses known behind `peer`.
    pub fn len_of(&self, peer: u32) -> usize {
        self.peers.get(peer as usize).map_or(0, |l| l.count as usize)
    }

    /// Checks the internal lists against the index (for tests and fuzzing); panics on a mismatch.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let mut total = 0usize;
        let mut holders = 0u64;
        for (p, l) in self.peers.iter().enumerate() {
            let mut n = 0u32;
            let mut prev = NIL;
            let mut i = l.head;
            while i != NIL {
                let e = &self.entries[i as usize];
                assert_eq!(e.peer as usize, p, "entry {i} is in the list of another peer");
                assert_eq!(e.prev, prev, "broken back link at entry {i}");
                assert_eq!(self.index.get(&e.mac), Some(&i), "entry {i} is not indexed");
                prev = i;
                i = e.next;
                n += 1;
                assert!(n as usize <= self.capacity, "cycle in the list of peer {p}");
            }
            assert_eq!(l.tail, prev, "tail of peer {p}");
            assert_eq!(l.count, n, "count of peer {p}");
            holders |= u64::from(n > 0) << p;
            total += n as usize;
        }
        assert_eq!(total, self.index.len(), "entries in lists vs index");
        assert_eq!(holders, self.holders, "holders");
        if self.recent != NIL {
            let e = &self.entries[self.recent as usize];
            assert_eq!(self.index.get(&e.mac), Some(&self.recent), "recent entry is not indexed");
            assert_eq!(self.peers[e.peer as usize].tail, self.recent, "recent entry is not newest");
        }
        assert!(total <= self.capacity, "more entries than capacity");
        assert!(self.entries.len() <= self.capacity, "allocated beyond capacity");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    /// A unicast MAC from a counter.
    fn mac(n: u32) -> [u8; 6] {
        let b = n.to_be_bytes();
        [2, 0xaa, b[0], b[1], b[2], b[3]]
    }

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
        assert_eq!((s.len_of(3), s.len_of(5)), (0, 1));
        s.check_invariants();
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
        s.check_invariants();
    }

    /// The address learned last is refreshed without a lookup; that shortcut must still move
    /// its expiry, and must not outlive the entry it points at.
    #[test]
    fn test_relearning_the_last_address_refreshes_it_and_survives_its_release() {
        let mut s = Switch::new(0, Duration::from_secs(10), 16);
        let t0 = Instant::now();
        s.learn(A, 3, t0);
        s.learn(A, 3, t0 + Duration::from_secs(8));
        assert_eq!(s.forward(A, t0 + Duration::from_secs(11)), Forward::Unicast(3));
        s.check_invariants();
        // Forgotten with its peer, then seen again from it: learned anew, not "refreshed".
        s.forget_peer(3);
        s.learn(A, 3, t0 + Duration::from_secs(12));
        assert_eq!(s.forward(A, t0 + Duration::from_secs(12)), Forward::Unicast(3));
        // Swept once expired, then seen again: the same.
        let late = t0 + Duration::from_secs(30);
        s.learn(B, 4, late);
        assert_eq!(s.len(), 1, "A was swept");
        s.learn(A, 3, late);
        assert_eq!(s.forward(A, late), Forward::Unicast(3));
        s.check_invariants();
    }

    #[test]
    fn test_full_table_replaces_expired_and_never_grows() {
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
        s.check_invariants();
    }

    #[test]
    fn test_expired_entries_are_swept_incrementally() {
        let mut s = Switch::new(0, Duration::from_secs(10), 64);
        let now = Instant::now();
        for n in 0..20 {
            s.learn(mac(n), 1 + n % 4, now);
        }
        let later = now + Duration::from_secs(11);
        // Each learn sweeps one peer's oldest entry: refreshing one address 40 times clears
        // every expired one of the other peers, without any full-table pass.
        for _ in 0..40 {
            s.learn(A, 7, later);
        }
        assert_eq!(s.len(), 1, "expired entries left after the sweep");
        s.check_invariants();
    }

    /// Finding 3 of issue 11: with a full table, learning a new address used to purge the whole
    /// table (4096 entries visited per new source MAC). Now each learn looks at a bounded number
    /// of entries: its own, one for the sweep, and at most one per peer id on a full-table miss.
    #[test]
    fn test_learning_with_a_full_table_does_bounded_work() {
        let cap = Switch::DEFAULT_CAPACITY;
        let mut s = Switch::new(0, Switch::DEFAULT_AGEING, cap);
        let now = Instant::now();
        for n in 0..cap as u32 {
            s.learn(mac(n), 1 + n % 8, now);
        }
        assert_eq!(s.len(), cap);
        let rounds = 10_000u32;
        let before = s.visited;
        for n in 0..rounds {
            // A flooding peer sends a new random-looking source MAC per frame.
            s.learn(mac(0x8000_0000 | n.wrapping_mul(2_654_435_761)), 1, now);
        }
        let per_learn = (s.visited - before) as f64 / rounds as f64;
        let bound = (2 + MAX_PEER_IDS) as f64;
        assert!(per_learn <= bound, "{per_learn} entries visited per learn, bound {bound}");
        assert_eq!(s.len(), cap);
        s.check_invariants();
    }

    /// A peer that floods random source MACs churns its own share only: the addresses of peers
    /// within their fair share stay learned, and a peer that arrives after the table filled up
    /// still gets its address learned (before, its unicast was flooded to every peer, the
    /// flooding one included).
    #[test]
    fn test_a_flooding_peer_cannot_evict_other_peers_addresses() {
        let cap = 256;
        let mut s = Switch::new(0, Switch::DEFAULT_AGEING, cap);
        let t0 = Instant::now();
        let honest: Vec<[u8; 6]> = (0..10).map(|n| [2, 0xbb, 0, 0, 0, n]).collect();
        for m in &honest {
            s.learn(*m, 2, t0);
        }
        s.learn(A, 0, t0); // our own, behind the TAP
        for n in 0..100_000u32 {
            let t = t0 + Duration::from_micros(n as u64);
            s.learn(mac(n.wrapping_mul(2_654_435_761)), 1, t);
        }
        let t = t0 + Duration::from_millis(200);
        for m in &honest {
            assert_eq!(s.forward(*m, t), Forward::Unicast(2), "peer 2's {m:02x?} was evicted");
        }
        assert_eq!(s.forward(A, t), Forward::ToSelf);
        // A newcomer after the table filled up is still learned.
        s.learn(B, 3, t);
        assert_eq!(s.forward(B, t), Forward::Unicast(3));
        assert_eq!(s.len(), cap);
        assert_eq!(s.len_of(1), cap - 12);
        s.check_invariants();
    }

    #[test]
    fn test_peer_below_its_share_takes_from_the_largest_holder() {
        let mut s = Switch::new(0, Switch::DEFAULT_AGEING, 8);
        let now = Instant::now();
        for n in 0..6 {
            s.learn(mac(n), 1, now); // peer 1 holds 6 of 8
        }
        s.learn(mac(100), 2, now);
        s.learn(mac(101), 2, now); // full: peer 2 holds 2
                                   // Peer 3 (share 8/3 = 2) takes peer 1's oldest; peer 2 stays untouched.
        s.learn(mac(200), 3, now);
        s.learn(mac(201), 3, now);
        assert_eq!((s.len_of(1), s.len_of(2), s.len_of(3)), (4, 2, 2));
        assert_eq!(s.forward(mac(0), now), Forward::Flood, "peer 1's oldest went first");
        assert_eq!(s.forward(mac(5), now), Forward::Unicast(1));
        // Peer 3 at its share recycles its own oldest address.
        s.learn(mac(202), 3, now);
        assert_eq!(s.forward(mac(200), now), Forward::Flood);
        assert_eq!((s.len_of(1), s.len_of(2), s.len_of(3)), (4, 2, 2));
        s.check_invariants();
    }

    #[test]
    fn test_peer_ids_beyond_the_table_are_not_learned() {
        let mut s = Switch::new(0, Switch::DEFAULT_AGEING, 8);
        let now = Instant::now();
        s.learn(A, MAX_PEER_IDS as u32, now);
        assert_eq!(s.forward(A, now), Forward::Flood);
        s.forget_peer(u32::MAX);
        let mut z = Switch::new(0, Switch::DEFAULT_AGEING, 0);
        z.learn(A, 1, now);
        assert_eq!(z.forward(A, now), Forward::Flood);
        s.check_invariants();
    }
}
