//! Liveness of peers: claiming a slot, heartbeats, incarnations, link up and down.
//!
//! Stock QEMU tells a guest nothing about its peers, so liveness is ours (DESIGN "link"): every
//! member bumps a heartbeat counter in its peer entry; a peer whose counter has not moved for
//! the link timeout is down. Observers time the counter with their own monotonic clock, so VMs
//! with different clocks agree. A peer that comes back under a new incarnation is a new life:
//! the analogue of the connect handshake of the seed's claims 9-10.

use std::time::{Duration, Instant};

use crate::region::{PeerState, Region};

/// Why a slot could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The requested id does not exist in this region.
    #[error("peer id {id} is out of range: this region has peer ids 0..{max_peers}")]
    OutOfRange {
        /// Requested id.
        id: u32,
        /// Peer slots in the region.
        max_peers: u32,
    },
    /// Another live member holds the requested id.
    #[error(
        "peer id {id} is already live (pid {pid}, its heartbeat is advancing): choose another \
         --peer-id or omit it to take a free slot"
    )]
    AlreadyLive {
        /// Requested id.
        id: u32,
        /// Owner's pid (in its own namespace or VM).
        pid: u32,
    },
    /// Another process claimed the id at the same moment.
    #[error("peer id {id} was claimed by another process at the same moment")]
    Raced {
        /// Requested id.
        id: u32,
    },
    /// Every slot is held by a live member.
    #[error("all {max_peers} peer slots of the region are held by live members")]
    Full {
        /// Peer slots in the region.
        max_peers: u32,
    },
}

/// A slot this process owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Our peer id.
    pub id: u32,
    /// Our incarnation (the value we set).
    pub incarnation: u64,
}

impl Claim {
    /// The epoch stamped on our frames: the low 32 bits of the incarnation.
    pub fn epoch(&self) -> u32 {
        self.incarnation as u32
    }
}

/// Heartbeat period for a given link timeout: often enough that a live peer is never mistaken
/// for a dead one.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 10).max(Duration::from_millis(5))
}

/// Watches the heartbeats of `ids` for up to `timeout` (plus one heartbeat period); returns the
/// ids whose heartbeat and incarnation did not change (their owners are gone).
fn stale_among(region: &Region, ids: &[u32], timeout: Duration) -> Vec<u32> {
    // Owners on this host whose process is gone are dead now: no need to watch them.
    let (dead, watch): (Vec<u32>, Vec<u32>) =
        ids.iter().partition(|&&id| owner_is_gone(region, id));
    if watch.is_empty() {
        return dead;
    }
    let seen: Vec<(u32, u64, u64)> = watch
        .iter()
        .map(|&id| (id, region.peer(id).heartbeat(), region.peer(id).incarnation()))
        .collect();
    let deadline = Instant::now() + timeout + heartbeat_interval(timeout);
    let mut live = vec![false; seen.len()];
    while Instant::now() < deadline && live.iter().any(|l| !l) {
        std::thread::sleep(Duration::from_millis(5));
        for (i, &(id, hb, inc)) in seen.iter().enumerate() {
            let p = region.peer(id);
            if p.heartbeat() != hb || p.incarnation() != inc {
                live[i] = true;
            }
        }
    }
    let mut stale = dead;
    stale.extend(seen.iter().zip(live).filter(|(_, l)| !l).map(|(&(id, _, _), _)| id));
    stale
}

/// Whether the owner of slot `id` ran on this host (same boot, same pid namespace) and its
/// process no longer exists. Owners elsewhere (another VM) are never judged this way.
fn owner_is_gone(region: &Region, id: u32) -> bool {
    let (host, pid) = region.peer(id).owner();
    if host == 0 || pid == 0 || host != crate::sys::host_token() {
        return false;
    }
    pid == std::process::id() || !crate::sys::process_exists(pid)
}

/// Claims slot `requested`, or any free slot when `None`. A slot whose owner stopped
/// heartbeating for `timeout` counts as free.
pub fn claim(
    region: &Region,
    requested: Option<u32>,
    timeout: Duration,
) -> Result<Claim, ClaimError> {
    let max_peers = region.geometry().max_peers;
    match requested {
        Some(id) => {
            if id >= max_peers {
                return Err(ClaimError::OutOfRange { id, max_peers });
            }
            let slot = region.peer(id);
            let inc = slot.incarnation();
            if !slot.is_free(inc) && stale_among(region, &[id], timeout).is_empty() {
                return Err(ClaimError::AlreadyLive { id, pid: slot.snapshot().pid });
            }
            slot.try_claim(inc)
                .map(|incarnation| Claim { id, incarnation })
                .ok_or(ClaimError::Raced { id })
        }
        None => {
            // Free slots first, lowest id first; a lost race just moves on to the next one.
            for id in 0..max_peers {
                let slot = region.peer(id);
                let inc = slot.incarnation();
                if slot.is_free(inc) {
                    if let Some(incarnation) = slot.try_claim(inc) {
                        return Ok(Claim { id, incarnation });
                    }
                }
            }
            let busy: Vec<u32> = (0..max_peers).collect();
            let incs: Vec<u64> = busy.iter().map(|&id| region.peer(id).incarnation()).collect();
            for id in stale_among(region, &busy, timeout) {
                if let Some(incarnation) = region.peer(id).try_claim(incs[id as usize]) {
                    return Ok(Claim { id, incarnation });
                }
            }
            Err(ClaimError::Full { max_peers })
        }
    }
}

/// Takes slot `id` that an authority (the doorbell server, or the device's IVPosition) assigned
/// to us: nobody else can hold it, so no liveness check is needed, only a new incarnation.
pub fn claim_assigned(region: &Region, id: u32) -> Result<Claim, ClaimError> {
    let max_peers = region.geometry().max_peers;
    if id >= max_peers {
        return Err(ClaimError::OutOfRange { id, max_peers });
    }
    let slot = region.peer(id);
    loop {
        let inc = slot.incarnation();
        if let Some(incarnation) = slot.try_claim(inc) {
            return Ok(Claim { id, incarnation });
        }
    }
}

/// A change in a peer's link, reported by [`Links::tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    /// The peer is up (first seen, or its heartbeat resumed).
    Up {
        /// Peer id.
        id: u32,
        /// Its MAC.
        mac: [u8; 6],
    },
    /// The peer came back under a new incarnation: nothing from its old life may be delivered.
    Restarted {
        /// Peer id.
        id: u32,
        /// Its MAC.
        mac: [u8; 6],
    },
    /// The peer left, or its heartbeat stopped for the link timeout.
    Down {
        /// Peer id.
        id: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct PeerLink {
    up: bool,
    incarnation: u64,
    heartbeat: u64,
    last_change: Instant,
}

/// What this member knows of every other peer's link.
pub struct Links {
    me: u32,
    timeout: Duration,
    peers: Vec<PeerLink>,
}

impl Links {
    /// Starts with every other peer down.
    pub fn new(region: &Region, me: u32, timeout: Duration) -> Self {
        let now = Instant::now();
        let n = region.geometry().max_peers as usize;
        let peers = vec![PeerLink { up: false, incarnation: 0, heartbeat: 0, last_change: now }; n];
        Links { me, timeout, peers }
    }

    /// Whether peer `id` is up.
    #[inline]
    pub fn is_up(&self, id: u32) -> bool {
        self.peers.get(id as usize).is_some_and(|p| p.up)
    }

    /// Number of peers up.
    pub fn up_count(&self) -> usize {
        self.peers.iter().filter(|p| p.up).count()
    }

    /// The incarnation we last saw for peer `id`.
    pub fn incarnation(&self, id: u32) -> u64 {
        self.peers.get(id as usize).map_or(0, |p| p.incarnation)
    }

    /// Marks a peer down at once (the doorbell server reported it gone).
    pub fn force_down(&mut self, id: u32) -> bool {
        match self.peers.get_mut(id as usize) {
            Some(p) if p.up => {
                p.up = false;
                true
            }
            _ => false,
        }
    }

    /// Reads the peer table and reports every change since the last call through `on_event`.
    pub fn tick(&mut self, region: &Region, now: Instant, mut on_event: impl FnMut(LinkEvent)) {
        for (id, link) in self.peers.iter_mut().enumerate() {
            let id = id as u32;
            if id == self.me {
                continue;
            }
            let slot = region.peer(id);
            let state = slot.state();
            let inc = slot.incarnation();
            let hb = slot.heartbeat();
            if state != PeerState::Up {
                if link.up {
                    link.up = false;
                    on_event(LinkEvent::Down { id });
                }
                continue;
            }
            if inc != link.incarnation {
                let was_known = link.incarnation != 0;
                link.incarnation = inc;
                link.heartbeat = hb;
                link.last_change = now;
                let mac = slot.mac();
                link.up = true;
                on_event(if was_known {
                    LinkEvent::Restarted { id, mac }
                } else {
                    LinkEvent::Up { id, mac }
                });
                continue;
            }
            if hb != link.heartbeat {
                link.heartbeat = hb;
                link.last_change = now;
                if !link.up {
                    link.up = true;
                    on_event(LinkEvent::Up { id, mac: slot.mac() });
                }
            } else if link.up && now.duration_since(link.last_change) >= self.timeout {
                link.up = false;
                on_event(LinkEvent::Down { id });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{GeometryRequest, HeapMemory};
    use std::sync::Arc;

    fn region() -> Region {
        let req = GeometryRequest { max_peers: Some(4), ..Default::default() };
        Region::attach(Arc::new(HeapMemory::new(4 << 20)), "t", &req).unwrap()
    }

    fn go_up(r: &Region, c: Claim) {
        r.peer(c.id).set_info(
            [2, 0, 0, 0, 0, c.id as u8],
            1500,
            0,
            crate::region::PeerKind::Agent,
            1,
        );
        r.peer(c.id).beat(0);
        r.peer(c.id).set_state(PeerState::Up, c.incarnation);
    }

    #[test]
    fn test_auto_claim_takes_distinct_free_slots() {
        let r = region();
        let t = Duration::from_millis(50);
        let a = claim(&r, None, t).unwrap();
        go_up(&r, a);
        let b = claim(&r, None, t).unwrap();
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn test_slot_being_claimed_is_not_free_for_a_second_claimer() {
        let r = region();
        // Claimer A has bumped slot 0's incarnation but not yet written its state.
        assert_eq!(r.peer(0).try_claim(0), Some(1));
        let b = claim(&r, None, Duration::from_millis(50)).unwrap();
        assert_eq!(b.id, 1, "slot 0 was taken twice");
        // Once A leaves, slot 0 is free again.
        r.peer(0).set_state(PeerState::Left, 1);
        assert!(r.peer(0).is_free(1));
        let c = claim(&r, None, Duration::from_millis(50)).unwrap();
        assert_eq!((c.id, c.incarnation), (0, 2));
    }

    #[test]
    fn test_concurrent_auto_claims_get_distinct_slots() {
        for _ in 0..20 {
            let r = region();
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let r = r.clone();
                    std::thread::spawn(move || {
                        claim(&r, None, Duration::from_millis(50)).unwrap().id
                    })
                })
                .collect();
            let mut ids: Vec<u32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            ids.sort();
            assert_eq!(ids, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn test_explicit_claim_of_live_slot_is_refused() {
        let r = region();
        let t = Duration::from_millis(100);
        let a = claim(&r, Some(1), t).unwrap();
        go_up(&r, a);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r2, s2) = (r.clone(), stop.clone());
        let beater = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                r2.peer(1).beat(0);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let e = claim(&r, Some(1), t).unwrap_err();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        beater.join().unwrap();
        assert!(matches!(e, ClaimError::AlreadyLive { id: 1, .. }), "{e}");
        // Now its heartbeat has stopped: the slot can be taken over, with a new incarnation.
        let b = claim(&r, Some(1), t).unwrap();
        assert_eq!(b.incarnation, a.incarnation + 1);
    }

    #[test]
    fn test_slot_of_a_dead_process_on_this_host_is_taken_at_once() {
        let r = region();
        let a = claim(&r, Some(1), Duration::from_millis(200)).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        r.peer(1).set_info([2, 0, 0, 0, 0, 1], 1500, 0, crate::region::PeerKind::Agent, dead_pid);
        r.peer(1).beat(0);
        r.peer(1).set_state(PeerState::Up, a.incarnation);
        // The heartbeat keeps moving (as if the slot were live), so only the dead-pid check can
        // make the claim succeed; watching the heartbeat would refuse it as already live.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r2, s2) = (r.clone(), stop.clone());
        let beater = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                r2.peer(1).beat(0);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let b = claim(&r, Some(1), Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        beater.join().unwrap();
        assert_eq!(b.unwrap().incarnation, a.incarnation + 1);
    }

    #[test]
    fn test_out_of_range_id_is_refused() {
        let r = region();
        let e = claim(&r, Some(4), Duration::from_millis(10)).unwrap_err();
        assert_eq!(e.to_string(), "peer id 4 is out of range: this region has peer ids 0..4");
    }

    #[test]
    fn test_links_report_up_down_and_restart() {
        let r = region();
        let t = Duration::from_millis(100);
        let me = claim(&r, Some(0), t).unwrap();
        go_up(&r, me);
        let other = claim(&r, Some(2), t).unwrap();
        go_up(&r, other);
        let mut links = Links::new(&r, 0, t);
        let t0 = Instant::now();
        let mut ev = Vec::new();
        links.tick(&r, t0, |e| ev.push(e));
        assert_eq!(ev, vec![LinkEvent::Up { id: 2, mac: [2, 0, 0, 0, 0, 2] }]);
        ev.clear();
        links.tick(&r, t0 + t, |e| ev.push(e));
        assert_eq!(ev, vec![LinkEvent::Down { id: 2 }]);
        ev.clear();
        r.peer(2).beat(1);
        links.tick(&r, t0 + t * 2, |e| ev.push(e));
        assert_eq!(ev, vec![LinkEvent::Up { id: 2, mac: [2, 0, 0, 0, 0, 2] }]);
        ev.clear();
        let again = claim(&r, Some(2), Duration::from_millis(10)).unwrap();
        go_up(&r, again);
        links.tick(&r, t0 + t * 2, |e| ev.push(e));
        assert_eq!(ev, vec![LinkEvent::Restarted { id: 2, mac: [2, 0, 0, 0, 0, 2] }]);
        assert!(links.is_up(2));
        r.peer(2).set_state(PeerState::Left, again.incarnation);
        ev.clear();
        links.tick(&r, t0 + t * 2, |e| ev.push(e));
        assert_eq!(ev, vec![LinkEvent::Down { id: 2 }]);
    }
}
