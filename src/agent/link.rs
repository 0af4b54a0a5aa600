//! Liveness of peers: claiming a slot, heartbeats, incarnations, link up and down.
//!
//! Stock QEMU tells a guest nothing about its peers, so liveness is ours (DESIGN "link"): every
//! member bumps a heartbeat counter in its peer entry; a peer whose counter has not moved for
//! the link timeout is down. Observers time the counter with their own monotonic clock, so VMs
//! with different clocks agree. A peer that comes back under a new incarnation is a new life:
//! the analogue of the connect handshake of the seed's claims 9-10.
//!
//! Nothing in the region makes a member exit (DESIGN rule 8): every heartbeat a member checks
//! its own slot ([`OwnSlot::check`]) and writes back whatever someone overwrote, unless another
//! member provably holds the slot (a live process on this host, or a heartbeat that keeps moving
//! for longer than the link timeout); then it rejoins under a free slot in the same process.

use std::time::{Duration, Instant};

use crate::region::ring::{Consumer, Peek};
use crate::region::{PeerKind, PeerState, Region};

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
            take(region, id, inc).ok_or(ClaimError::Raced { id })
        }
        None => {
            // Free slots first, lowest id first; a lost race just moves on to the next one.
            if let Some(c) = take_free(region, None) {
                return Ok(c);
            }
            let busy: Vec<u32> = (0..max_peers).collect();
            let incs: Vec<u64> = busy.iter().map(|&id| region.peer(id).incarnation()).collect();
            for id in stale_among(region, &busy, timeout) {
                if let Some(c) = take(region, id, incs[id as usize]) {
                    return Ok(c);
                }
            }
            Err(ClaimError::Full { max_peers })
        }
    }
}

/// Claims slot `id` if its incarnation is still `seen`, and at once marks it as ours (state
/// joining under the new incarnation, our pid and host): from then on the slot names its new
/// owner, so a previous owner that checks its slot can tell a claim from a scribble.
fn take(region: &Region, id: u32, seen: u64) -> Option<Claim> {
    let slot = region.peer(id);
    let incarnation = slot.try_claim(seen)?;
    slot.set_owner(std::process::id());
    slot.set_state(PeerState::Joining, incarnation);
    Some(Claim { id, incarnation })
}

/// Claims a slot that is free now (never used, or left), lowest first, skipping `except`.
/// Slots that were left by a process that still runs on this host come last: a `left` written
/// over a live member's slot is repaired by that member within a heartbeat.
fn take_free(region: &Region, except: Option<u32>) -> Option<Claim> {
    let max_peers = region.geometry().max_peers;
    for pass in 0..2 {
        for id in (0..max_peers).filter(|&id| Some(id) != except) {
            let slot = region.peer(id);
            let inc = slot.incarnation();
            if !slot.is_free(inc) {
                continue;
            }
            let (host, pid) = slot.owner();
            let owner_lives = host == crate::sys::host_token()
                && pid != 0
                && pid != std::process::id()
                && crate::sys::process_exists(pid);
            if pass == 0 && owner_lives {
                continue;
            }
            if let Some(c) = take(region, id, inc) {
                return Some(c);
            }
        }
    }
    None
}

/// A slot to rejoin under, right now and without waiting: a free one, one whose owner's
/// process is gone from this host, or one whose heartbeat this member has seen stand still for
/// the link timeout. `None` if there is none yet (try again at the next heartbeat).
pub fn claim_for_rejoin(region: &Region, links: &Links, now: Instant) -> Option<Claim> {
    if let Some(c) = take_free(region, Some(links.me)) {
        return Some(c);
    }
    for id in (0..region.geometry().max_peers).filter(|&id| id != links.me) {
        let inc = region.peer(id).incarnation();
        // (Not `owner_is_gone`: a slot under our own pid may be another member of this process.)
        let (host, pid) = region.peer(id).owner();
        let died = host != 0
            && host == crate::sys::host_token()
            && pid != 0
            && pid != std::process::id()
            && !crate::sys::process_exists(pid);
        if died || links.stale(region, id, now) {
            if let Some(c) = take(region, id, inc) {
                return Some(c);
            }
        }
    }
    None
}

/// Discards everything peer `src` has queued for us (it went down: nothing from before may be
/// delivered if it comes back). Frames are counted as not delivered. Bounded by the ring size.
pub fn discard_ring(region: &Region, cons: &mut Consumer, src: u32) {
    let epoch = region.peer(src).incarnation() as u32;
    for _ in 0..=region.geometry().ring_slots {
        match cons.peek(epoch) {
            Peek::Frame(_) => cons.advance(false),
            Peek::Stale => {}
            Peek::Empty | Peek::Corrupt(_) => break,
        }
    }
    cons.publish();
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
        if let Some(c) = take(region, id, slot.incarnation()) {
            return Ok(c);
        }
    }
}

/// What a member writes into its own peer entry besides state and heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its interface MTU.
    pub mtu: u32,
    /// Features it supports.
    pub features: u32,
    /// What kind of member it is.
    pub kind: PeerKind,
}

/// The outcome of [`OwnSlot::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotCheck {
    /// The slot is as we wrote it; the heartbeat was bumped.
    Intact,
    /// Someone had overwritten it; our values were written back (logged, rate limited).
    Repaired,
    /// A claim by a member elsewhere (another VM or pid namespace): its heartbeat is being
    /// watched, and the slot left alone, for up to the link timeout.
    Watching,
    /// Another member holds the slot and we have claimed this one instead (logged once): the
    /// data path rebuilds its rings for it.
    Rejoin(Claim),
    /// Another member holds the slot and no other is free yet: keep quiet (no rings) and try
    /// again at the next heartbeat.
    Displaced,
}

/// Our own peer entry: what we wrote into it, so that every heartbeat can check it and put back
/// whatever someone else overwrote.
#[derive(Debug)]
pub struct OwnSlot {
    claim: Claim,
    identity: Identity,
    pid: u32,
    host: u64,
    /// The heartbeat value we wrote last (we keep the count, so a foreign write shows).
    heartbeat: u64,
    last_beat: Instant,
    timeout: Duration,
    watch: Option<Watch>,
    /// Another member holds the slot: why (logged once).
    displaced: Option<String>,
    next_repair_log: Option<Instant>,
    repairs_unlogged: u64,
    faults_seen: u64,
    next_backing_check: Instant,
    backing_reported: Option<String>,
}

/// Watching a foreign claim on our slot.
#[derive(Debug, Clone, Copy)]
struct Watch {
    since: Instant,
    /// How long we had been silent when the watch began.
    silent: Duration,
    incarnation: u64,
    heartbeat: u64,
    moves: u32,
}

/// How often the backing of the region (the file) is looked at.
const BACKING_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// At most one line about repairs per this interval.
const REPAIR_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl OwnSlot {
    /// Writes our identity into a freshly claimed slot (state joining, counters cleared, a first
    /// heartbeat). Call [`OwnSlot::go_up`] once the rings are reset.
    pub fn take(
        region: &Region,
        claim: Claim,
        identity: Identity,
        timeout: Duration,
        now: Instant,
    ) -> OwnSlot {
        let slot = region.peer(claim.id);
        let pid = std::process::id();
        slot.set_state(PeerState::Joining, claim.incarnation);
        slot.set_info(identity.mac, identity.mtu, identity.features, identity.kind, pid);
        let heartbeat = slot.heartbeat().wrapping_add(1);
        slot.set_heartbeat(heartbeat, crate::sys::wall_ms());
        OwnSlot {
            claim,
            identity,
            pid,
            host: crate::sys::host_token(),
            heartbeat,
            last_beat: now,
            timeout,
            watch: None,
            displaced: None,
            next_repair_log: None,
            repairs_unlogged: 0,
            faults_seen: crate::sys::sigbus::faults(),
            next_backing_check: now + BACKING_CHECK_INTERVAL,
            backing_reported: None,
        }
    }

    /// Marks us up. Release (in `set_state`): everything written before is visible to whoever
    /// sees the state.
    pub fn go_up(&self, region: &Region) {
        region.peer(self.claim.id).set_state(PeerState::Up, self.claim.incarnation);
    }

    /// Our claim.
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// What we write into the slot.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Whether another member holds our slot and we have none yet.
    pub fn is_displaced(&self) -> bool {
        self.displaced.is_some()
    }

    fn beat(&mut self, region: &Region, now: Instant) {
        self.heartbeat = self.heartbeat.wrapping_add(1);
        region.peer(self.claim.id).set_heartbeat(self.heartbeat, crate::sys::wall_ms());
        self.last_beat = now;
    }

    /// The heartbeat's work on our own entry: report memory faults and a region file deleted
    /// or replaced under us, check the slot, bump the heartbeat or write the slot back, and
    /// when another member provably holds it, claim another one (`links` tells which peers
    /// have been silent for the link timeout).
    pub fn check(&mut self, region: &Region, links: &Links, now: Instant) -> SlotCheck {
        self.check_memory(region, now);
        if let Some(why) = self.displaced.clone() {
            return self.rejoin(region, links, now, &why);
        }
        let slot = region.peer(self.claim.id);
        let inc = slot.incarnation();
        let word = slot.state_word();
        let (host, pid) = slot.owner();
        let hb = slot.heartbeat();
        let ours = inc == self.claim.incarnation;
        let up_word = tag(self.claim.incarnation) << 8 | PeerState::Up.to_raw();
        let id = self.identity;
        let params = (id.mtu, id.features, id.kind as u32);
        let mac_ok = slot.mac() == id.mac;
        let owner_ok = host == self.host && pid == self.pid;
        let params_ok = slot.params() == params;
        if ours && word == up_word && owner_ok && hb == self.heartbeat && mac_ok && params_ok {
            self.watch = None;
            self.beat(region, now);
            return SlotCheck::Intact;
        }
        if !ours {
            let state = PeerState::from_raw(word & 0xff);
            // A claimer writes its state under its new incarnation, and its pid and host, at
            // once (`take`); a single scribble does not look like that.
            let claimed =
                word >> 8 == tag(inc) && matches!(state, PeerState::Joining | PeerState::Up);
            if claimed {
                if host != 0 && host == self.host && pid != 0 {
                    if pid != self.pid && crate::sys::process_exists(pid) {
                        self.watch = None;
                        let why = format!(
                            "process {pid} on this host claimed it (incarnation {inc}, ours {})",
                            self.claim.incarnation
                        );
                        return self.rejoin(region, links, now, &why);
                    }
                    // Its claimant is gone from this host: the slot is ours to take back.
                } else {
                    match self.watch_claim(inc, hb, now) {
                        Some(why) => {
                            self.watch = None;
                            return self.rejoin(region, links, now, &why);
                        }
                        None if self.watch.is_some() => return SlotCheck::Watching,
                        None => {} // watched long enough: no sign of life, take it back
                    }
                }
            }
        }
        self.watch = None;
        let mut what = Vec::new();
        if !ours {
            what.push("incarnation");
        }
        if word != up_word {
            what.push("state");
        }
        if !mac_ok {
            what.push("MAC");
        }
        if !owner_ok {
            what.push("owner");
        }
        if hb != self.heartbeat {
            what.push("heartbeat");
        }
        if !params_ok {
            what.push("MTU/features/kind");
        }
        if !ours {
            slot.restore_incarnation(self.claim.incarnation);
        }
        slot.set_identity(id.mac, id.mtu, id.features, id.kind, self.pid);
        self.beat(region, now);
        // Release: the fields above are visible to whoever sees us up again.
        slot.set_state(PeerState::Up, self.claim.incarnation);
        self.log_repair(&what, inc, now);
        SlotCheck::Repaired
    }

    /// Watches a claim by a member elsewhere (no pid to check). Returns why the slot is held by
    /// it, or None: still watching (`self.watch` set) or done without a sign of life (cleared).
    fn watch_claim(&mut self, inc: u64, hb: u64, now: Instant) -> Option<String> {
        let silent_before = now.saturating_duration_since(self.last_beat);
        let w = match self.watch {
            Some(w) if w.incarnation == inc => w,
            _ => Watch {
                since: now,
                silent: silent_before,
                incarnation: inc,
                heartbeat: hb,
                moves: 0,
            },
        };
        let mut w = w;
        if hb != w.heartbeat {
            w.moves += 1;
            w.heartbeat = hb;
        }
        // We were silent longer than the link timeout (paused, stopped, starved): a member
        // elsewhere was entitled to take the slot, and a newer claim is that.
        if w.silent > self.timeout && inc > self.claim.incarnation {
            return Some(format!(
                "we were silent for {:.1} s, longer than the link timeout, and a member elsewhere \
                 claimed it (incarnation {inc}, ours {})",
                w.silent.as_secs_f64(),
                self.claim.incarnation
            ));
        }
        if now.duration_since(w.since) < self.timeout {
            self.watch = Some(w);
            return None;
        }
        self.watch = None;
        (w.moves >= 2).then(|| {
            format!(
                "a member elsewhere claimed it (incarnation {inc}, ours {}) and its heartbeat kept \
                 moving for the link timeout",
                self.claim.incarnation
            )
        })
    }

    /// Another member holds our slot: claim another one, keeping everything else.
    fn rejoin(&mut self, region: &Region, links: &Links, now: Instant, why: &str) -> SlotCheck {
        let old = self.claim.id;
        match claim_for_rejoin(region, links, now) {
            Some(c) => {
                log::warn!(
                    "peer slot {old} is held by another member ({why}): rejoining as peer {} \
                     with the same interface, MAC and addresses",
                    c.id
                );
                self.displaced = None;
                SlotCheck::Rejoin(c)
            }
            None => {
                if self.displaced.is_none() {
                    log::warn!(
                        "peer slot {old} is held by another member ({why}) and no other slot is \
                         free: off the segment until one is"
                    );
                    self.displaced = Some(why.to_string());
                }
                SlotCheck::Displaced
            }
        }
    }

    fn log_repair(&mut self, what: &[&str], found_inc: u64, now: Instant) {
        match self.next_repair_log {
            Some(t) if now < t => self.repairs_unlogged += 1,
            _ => {
                log::warn!(
                    "peer slot {}: {} overwritten (incarnation found {found_inc}, ours {}); \
                     nobody else holds the slot, so it was written back ({} similar repairs not \
                     logged)",
                    self.claim.id,
                    what.join(", "),
                    self.claim.incarnation,
                    self.repairs_unlogged
                );
                self.repairs_unlogged = 0;
                self.next_repair_log = Some(now + REPAIR_LOG_INTERVAL);
            }
        }
    }

    /// Reports memory faults in the region (SIGBUS recovered) and a region file that was
    /// deleted or replaced, once each.
    fn check_memory(&mut self, region: &Region, now: Instant) {
        let faults = crate::sys::sigbus::faults();
        if faults != self.faults_seen {
            log::error!(
                "{}: {} page(s) of shared memory vanished (the region file was truncated?) and \
                 were replaced with private zero pages: links through them are cut; recreate the \
                 region and restart its members",
                region.name(),
                faults - self.faults_seen
            );
            self.faults_seen = faults;
        }
        if now < self.next_backing_check {
            return;
        }
        self.next_backing_check = now + BACKING_CHECK_INTERVAL;
        let problem = region.backing_problem();
        if problem != self.backing_reported {
            if let Some(p) = &problem {
                log::error!("{}: {p}", region.name());
            }
            self.backing_reported = problem;
        }
    }
}

/// The low 24 bits of an incarnation, as the state word carries them.
fn tag(incarnation: u64) -> u32 {
    incarnation as u32 & 0x00ff_ffff
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
    /// We hold no slot (another member has ours): every link is down and stays down.
    suspended: bool,
}

impl Links {
    /// Starts with every other peer down.
    pub fn new(region: &Region, me: u32, timeout: Duration) -> Self {
        let now = Instant::now();
        let n = region.geometry().max_peers as usize;
        let peers = vec![PeerLink { up: false, incarnation: 0, heartbeat: 0, last_change: now }; n];
        Links { me, timeout, peers, suspended: false }
    }

    /// Takes every link down without reporting it, and keeps them down, while this member holds
    /// no slot: it must neither read nor write rings that belong to our old slot's new owner.
    pub fn suspend(&mut self) {
        self.suspended = true;
        for p in &mut self.peers {
            p.up = false;
        }
    }

    /// Whether peer `id`'s slot says up but its heartbeat and incarnation have not moved, as
    /// far as our scans saw, for the link timeout.
    pub fn stale(&self, region: &Region, id: u32, now: Instant) -> bool {
        let Some(p) = self.peers.get(id as usize) else { return false };
        let slot = region.peer(id);
        p.incarnation != 0
            && !p.up
            && slot.incarnation() == p.incarnation
            && slot.heartbeat() == p.heartbeat
            && now.duration_since(p.last_change) >= self.timeout
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
        if self.suspended {
            return;
        }
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

    // -----------------------------------------------------------------------------------------
    // A member's own slot: single-store attacks, foreign claims, pauses (whole data paths over
    // an in-memory region and fake TAPs).
    // -----------------------------------------------------------------------------------------

    use crate::agent::datapath::{Datapath, DatapathOptions};
    use crate::agent::tap::FakeTap;
    use crate::doorbell::NoDoorbells;
    use crate::region::layout;

    const T: Duration = Duration::from_millis(100);

    fn small_region(peers: u32) -> Region {
        let req = GeometryRequest {
            max_peers: Some(peers),
            // A ring holds two 64 KiB super-frames: 128 segments of 2 KiB.
            ring_slots: Some(128),
            mtu: Some(1500),
            ..Default::default()
        };
        let size = req.resolve(u64::MAX).unwrap().layout().unwrap().total;
        Region::attach(Arc::new(HeapMemory::new(size)), "own", &req).unwrap()
    }

    fn member(r: &Region, id: u32) -> Datapath<FakeTap> {
        let c = claim(r, Some(id), T).unwrap();
        let opts = DatapathOptions { mtu: 1500, link_timeout: T, ..Default::default() };
        Datapath::join(r.clone(), c, FakeTap::default(), mac_of(id), PeerKind::Agent, opts)
    }

    fn mac_of(id: u32) -> [u8; 6] {
        crate::mac::Mac::for_peer(id).0
    }

    fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(100, tag);
        f
    }

    /// One round of every member at `now`: heartbeat and link checks, tx, rx, publish.
    fn round(ms: &mut [&mut Datapath<FakeTap>], now: Instant) {
        super::super::datapath_tests::round_at_all(ms, now);
    }

    /// Whether a frame from `a` to `b`'s MAC reaches `b`'s interface within a few rounds.
    fn a_reaches_b(a: &mut Datapath<FakeTap>, b: &mut Datapath<FakeTap>, now: Instant) -> bool {
        let before = b.tap.outbound.len();
        let tag = before as u8;
        a.tap.inbound.push_back(frame(mac_of(1), mac_of(0), tag));
        for _ in 0..4 {
            round(&mut [a, b], now);
            if b.tap.outbound.iter().skip(before).any(|f| f[20] == tag) {
                return true;
            }
        }
        false
    }

    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// Makes slot `id` look claimed by another member: a new incarnation, state joining under
    /// it, an owner (pid, and a foreign host token when `host` is given).
    fn foreign_claim(r: &Region, id: u32, pid: u32, host: Option<u64>) -> u64 {
        let c = take(r, id, r.peer(id).incarnation()).unwrap();
        r.peer(id).set_owner(pid);
        if let Some(h) = host {
            r.raw()
                .u64_at(r.layout().peer(id) + layout::peer::HOST)
                .store(h, std::sync::atomic::Ordering::Relaxed);
        }
        c.incarnation
    }

    #[test]
    fn test_single_stores_into_own_slot_are_written_back() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let now = Instant::now();
        assert!(a_reaches_b(&mut a, &mut b, now));
        let inc = b.claim().incarnation;
        let slot_base = r.layout().peer(1);
        let stores: [(&str, usize, u64); 4] = [
            ("incarnation", layout::peer::INCARNATION, inc + 5),
            ("mac", layout::peer::MAC, 0x0000_0bad_0bad),
            ("heartbeat", layout::peer::HEARTBEAT, 1 << 40),
            ("pid+state", layout::peer::STATE, u64::MAX),
        ];
        for (what, off, v) in stores {
            r.raw().u64_at(slot_base + off).store(v, std::sync::atomic::Ordering::Relaxed);
            round(&mut [&mut a, &mut b], now);
            let p = r.peer(1);
            assert_eq!(p.incarnation(), inc, "{what}: incarnation not restored");
            assert_eq!(p.state(), PeerState::Up, "{what}: state not restored");
            assert_eq!(p.mac(), mac_of(1), "{what}: MAC not restored");
            assert_eq!(p.owner().1, std::process::id(), "{what}: pid not restored");
            assert_eq!(b.claim().id, 1, "{what}: B moved although nobody holds its slot");
            assert!(a_reaches_b(&mut a, &mut b, now), "{what}: B unreachable after the repair");
        }
    }

    #[test]
    fn test_left_written_into_state_is_repaired_and_a_claim_over_it_makes_the_victim_rejoin() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let now = Instant::now();
        assert!(a_reaches_b(&mut a, &mut b, now));
        let inc = b.claim().incarnation;
        // `left` over the victim's state: written back at its next heartbeat.
        r.peer(1).set_state(PeerState::Left, inc);
        round(&mut [&mut a, &mut b], now);
        assert_eq!(r.peer(1).state(), PeerState::Up);
        assert!(a_reaches_b(&mut a, &mut b, now));
        // Again, and this time another process claims the "free" slot before the repair.
        let mut other = sleeper();
        r.peer(1).set_state(PeerState::Left, inc);
        let theirs = foreign_claim(&r, 1, other.id(), None);
        round(&mut [&mut a, &mut b], now);
        let moved = b.claim();
        other.kill().unwrap();
        other.wait().unwrap();
        assert_ne!(moved.id, 1, "B stayed in a slot a live process claimed");
        assert_eq!(r.peer(1).incarnation(), theirs, "B wrote over the new owner's claim");
        assert_eq!(r.peer(moved.id).state(), PeerState::Up);
        assert_eq!(r.peer(moved.id).mac(), mac_of(1), "B changed its MAC");
        assert!(a_reaches_b(&mut a, &mut b, now), "B unreachable in its new slot");
    }

    #[test]
    fn test_claim_by_a_live_process_on_this_host_makes_the_owner_rejoin() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let now = Instant::now();
        let mut other = sleeper();
        foreign_claim(&r, 1, other.id(), None);
        round(&mut [&mut a, &mut b], now);
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(b.claim().id, 2, "B should take the lowest free slot");
        assert!(a_reaches_b(&mut a, &mut b, now));
    }

    #[test]
    fn test_claim_whose_process_is_gone_is_taken_back() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let now = Instant::now();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        foreign_claim(&r, 1, pid, None);
        round(&mut [&mut a, &mut b], now);
        assert_eq!(b.claim().id, 1);
        assert_eq!(r.peer(1).incarnation(), b.claim().incarnation);
        assert!(a_reaches_b(&mut a, &mut b, now));
    }

    #[test]
    fn test_claim_elsewhere_with_a_moving_heartbeat_wins_after_the_link_timeout() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let t0 = Instant::now();
        round(&mut [&mut a, &mut b], t0);
        foreign_claim(&r, 1, 42, Some(0xfeed));
        let mut now = t0;
        let mut hb = 1000;
        while b.claim().id == 1 {
            now += T / 4;
            assert!(now - t0 < T * 3, "B never gave up a slot whose heartbeat moves");
            hb += 1;
            r.peer(1).set_heartbeat(hb, 0);
            round(&mut [&mut a, &mut b], now);
            if now - t0 < T {
                assert_eq!(b.claim().id, 1, "B left before watching for the link timeout");
            }
        }
        assert!(a_reaches_b(&mut a, &mut b, now));
    }

    #[test]
    fn test_claim_elsewhere_without_a_heartbeat_is_taken_back_after_the_link_timeout() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let t0 = Instant::now();
        round(&mut [&mut a, &mut b], t0);
        foreign_claim(&r, 1, 42, Some(0xfeed));
        let mut now = t0;
        for _ in 0..8 {
            now += T / 4;
            round(&mut [&mut a, &mut b], now);
        }
        assert_eq!(b.claim().id, 1);
        assert_eq!(r.peer(1).incarnation(), b.claim().incarnation);
        assert!(a_reaches_b(&mut a, &mut b, now));
    }

    #[test]
    fn test_paused_member_yields_at_once_to_a_claim_made_while_it_was_silent() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let t0 = Instant::now();
        round(&mut [&mut a, &mut b], t0);
        // B is stopped for 3 link timeouts; meanwhile a member elsewhere takes its slot.
        foreign_claim(&r, 1, 42, Some(0xfeed));
        let now = t0 + T * 3;
        round(&mut [&mut a, &mut b], now);
        assert_ne!(b.claim().id, 1, "B did not yield to a claim made while it was silent");
        assert!(a_reaches_b(&mut a, &mut b, now));
    }

    #[test]
    fn test_displaced_member_goes_quiet_then_rejoins_when_a_slot_frees() {
        let r = small_region(3);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let mut c = member(&r, 2);
        let now = Instant::now();
        round(&mut [&mut a, &mut b, &mut c], now);
        let mut other = sleeper();
        foreign_claim(&r, 1, other.id(), None);
        round(&mut [&mut a, &mut b, &mut c], now);
        assert_eq!(b.claim().id, 1, "there was no free slot to move to");
        assert!(!b.links().is_up(0) && !b.links().is_up(2), "a displaced member keeps no links");
        // C leaves: B takes its slot.
        c.leave();
        round(&mut [&mut a, &mut b], now);
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(b.claim().id, 2);
        assert!(a_reaches_b(&mut a, &mut b, now));
    }

    #[test]
    fn test_frames_queued_by_a_peer_that_went_down_are_not_replayed() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let t0 = Instant::now();
        assert!(a_reaches_b(&mut a, &mut b, t0));
        let delivered = b.tap.outbound.len();
        // A queues a frame for B, then falls silent; B does not read it in time.
        a.tap.inbound.push_back(frame(mac_of(1), mac_of(0), 0xee));
        a.set_tap_readable();
        a.tx(t0);
        a.publish(&mut NoDoorbells);
        let later = t0 + T * 2;
        b.force_housekeeping();
        b.housekeeping(later).unwrap();
        assert!(!b.links().is_up(0), "A should be down for B");
        // A comes back (same life): the old frame is gone, new ones flow.
        round(&mut [&mut a, &mut b], later);
        assert!(
            b.tap.outbound[delivered..].iter().all(|f| f[20] != 0xee),
            "a stale frame was replayed"
        );
        assert!(a_reaches_b(&mut a, &mut b, later));
    }

    /// Rings nobody (no doorbells for anyone), or everybody.
    struct Bells(bool);

    impl crate::doorbell::Notifier for Bells {
        fn notify(&mut self, _peer: u32, _vector: u16) -> bool {
            self.0
        }
    }

    #[test]
    fn test_a_member_polls_while_a_waiting_peer_cannot_be_rung() {
        let r = small_region(4);
        let (mut a, mut b) = (member(&r, 0), member(&r, 1));
        let now = Instant::now();
        round(&mut [&mut a, &mut b], now);
        for can_ring in [false, true] {
            // B sleeps (its waiting flags set); A sends it a frame.
            assert!(!b.prepare_to_sleep());
            a.tap.inbound.push_back(frame(mac_of(1), mac_of(0), 1));
            a.set_tap_readable();
            a.tx(now);
            a.publish(&mut Bells(can_ring));
            assert_eq!(a.polls_for_unringable_peers(), !can_ring, "can ring: {can_ring}");
            b.wake();
            b.rx(now, &mut NoDoorbells);
        }
    }
}
