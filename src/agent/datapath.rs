//! The per-frame path between the local interface and the rings, kept apart from setup (after
//! Firecracker's `process_tx`/`process_rx`): buffers are preallocated, per-frame failures are
//! counted rather than returned, counters are published once per batch, and a peer can make
//! it drop frames but never panic.
//!
//! The row of rings this member writes is its output queue (seed claim 11); it drains the
//! column of rings addressed to it.

use std::io;
use std::time::{Duration, Instant};

use super::link::{self, Claim, LinkEvent, Links, OwnSlot, SlotCheck};
use super::switch::{Forward, Switch};
use super::tap::FrameIo;
use crate::doorbell::{NoDoorbells, Notifier, VECTOR_DATA, VECTOR_LINK};
use crate::region::layout::{
    DoorbellCounter, PeerCounter, DOORBELL_COUNTERS, ETH_OVERHEAD, PEER_COUNTERS,
};
use crate::region::ring::{Consumer, Peek, Producer, PushError};
use crate::region::{PeerState, Region};

/// How stale the link view may be before a frame is dropped for lack of peers.
const RESCAN_BEFORE_DROP: Duration = Duration::from_millis(5);

/// A frame held back because its ring was full (back-pressure towards the local stack).
#[derive(Debug, Clone, Copy)]
struct Pending {
    len: usize,
    dst: u32,
    since: Instant,
}

/// One log line per interval per kind, whatever a peer does.
struct RateLimit {
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn new() -> Self {
        RateLimit { next: None, suppressed: 0 }
    }

    /// Returns Some(number suppressed since the last line) when a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.next {
            Some(t) if now < t => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.next = Some(now + Self::INTERVAL);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Tunables of the data path.
#[derive(Debug, Clone, Copy)]
pub struct DatapathOptions {
    /// The local interface's MTU (frames up to MTU + 18 bytes pass).
    pub mtu: u32,
    /// How long a peer's heartbeat may stall before its link is down.
    pub link_timeout: Duration,
    /// How long a unicast frame may wait for ring space before it is dropped and the ring is
    /// treated as stalled.
    pub stall_timeout: Duration,
    /// Frames per batch (per direction, per ring).
    pub batch: usize,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            mtu: 1500,
            link_timeout: Duration::from_secs(1),
            // Long enough that a peer descheduled on a busy host is not taken for stuck.
            stall_timeout: Duration::from_millis(250),
            batch: 64,
        }
    }
}

/// Why the data path stopped. (Nothing in the region stops it: a slot taken by another member
/// makes it rejoin under another, see [`Datapath::rejoin`].)
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The local interface failed in a way that will not recover.
    #[error("local interface failed")]
    Interface(#[source] io::Error),
}

/// The data path of one member.
pub struct Datapath<T: FrameIo> {
    region: Region,
    claim: Claim,
    /// Our own peer entry, checked and repaired every heartbeat.
    own: OwnSlot,
    /// The local interface.
    pub tap: T,
    producers: Vec<Option<Producer>>,
    consumers: Vec<Option<Consumer>>,
    links: Links,
    switch: Switch,
    buf: Box<[u8]>,
    max_eth: usize,
    iov: Vec<libc::iovec>,
    pending: Option<Pending>,
    /// Peers whose ring made no progress for the stall timeout: frames to them are dropped
    /// without waiting until their consumer moves again.
    stalled: Vec<bool>,
    tap_readable: bool,
    counters: [u64; PEER_COUNTERS],
    doorbells: [u64; DOORBELL_COUNTERS],
    counters_dirty: bool,
    opts: DatapathOptions,
    next_beat: Instant,
    /// Run the link checks on the next round whatever the time (a link-state doorbell rang).
    beat_due: bool,
    /// When the peer table was last scanned.
    last_scan: Instant,
    /// When to read the interface's kernel counters next.
    next_kernel_stats: Instant,
    corrupt_log: RateLimit,
    io_log: RateLimit,
    drop_log: RateLimit,
    /// Pull-style receive ([`Datapath::rx_next`]): the ring to look at first.
    rx_cursor: usize,
    /// Pull-style receive: frames taken from each ring since its tail was last published.
    rx_taken: Vec<u32>,
    /// Peers that waited for a doorbell we could not ring (cleared when one rings).
    unringable: Vec<bool>,
}

impl<T: FrameIo> Datapath<T> {
    /// Takes over our row and column of rings (discarding anything left for an earlier life of
    /// our slot) and announces us in the peer table, then marks us up.
    pub fn join(
        region: Region,
        claim: Claim,
        tap: T,
        mac: [u8; 6],
        kind: crate::region::PeerKind,
        opts: DatapathOptions,
    ) -> Self {
        let me = claim.id;
        let n = region.geometry().max_peers;
        let identity = link::Identity { mac, mtu: opts.mtu, features: 0, kind };
        let own = OwnSlot::take(&region, claim, identity, opts.link_timeout, Instant::now());
        let producers = (0..n)
            .map(|d| (d != me).then(|| Producer::new(&region, me, d, claim.epoch())))
            .collect();
        let consumers = (0..n).map(|s| (s != me).then(|| Consumer::new(&region, s, me))).collect();
        // Release (in set_state): the resets above are visible to whoever sees us up.
        own.go_up(&region);
        let max_eth = (opts.mtu + ETH_OVERHEAD) as usize;
        let max_segs = region.geometry().max_segments_per_frame() as usize;
        let mut switch = Switch::new(me, Switch::DEFAULT_AGEING, Switch::DEFAULT_CAPACITY);
        switch.learn(mac, me, Instant::now());
        Datapath {
            links: Links::new(&region, me, opts.link_timeout),
            region,
            claim,
            own,
            tap,
            producers,
            consumers,
            switch,
            buf: vec![0u8; max_eth].into_boxed_slice(),
            max_eth,
            iov: Vec::with_capacity(max_segs),
            pending: None,
            stalled: vec![false; n as usize],
            tap_readable: true,
            counters: [0; PEER_COUNTERS],
            doorbells: [0; DOORBELL_COUNTERS],
            counters_dirty: true,
            opts,
            next_beat: Instant::now(),
            beat_due: true,
            last_scan: Instant::now(),
            next_kernel_stats: Instant::now(),
            corrupt_log: RateLimit::new(),
            io_log: RateLimit::new(),
            drop_log: RateLimit::new(),
            rx_cursor: 0,
            rx_taken: vec![0; n as usize],
            unringable: vec![false; n as usize],
        }
    }

    /// Our claim (id and incarnation).
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// The links as this member sees them.
    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Notes that the local interface may have frames to read.
    pub fn set_tap_readable(&mut self) {
        self.tap_readable = true;
    }

    /// Whether there may be more frames on the local interface that we did not read yet
    /// (a batch ended on its budget, not on `WouldBlock`), and we are not blocked on a ring.
    pub fn tap_backlog(&self) -> bool {
        self.tap_readable && self.pending.is_none()
    }

    /// Whether to poll instead of sleeping on doorbells: a waiting peer could not be rung
    /// lately, and a peer we cannot ring probably cannot ring us.
    pub fn polls_for_unringable_peers(&self) -> bool {
        let links = &self.links;
        self.unringable.iter().enumerate().any(|(p, &u)| u && links.is_up(p as u32))
    }

    /// Whether a frame is held back waiting for ring space.
    pub fn is_blocked(&self) -> bool {
        self.pending.is_some()
    }

    #[inline]
    fn count(&mut self, c: PeerCounter, by: u64) {
        self.counters[c as usize] += by;
        self.counters_dirty = true;
    }

    /// Counts a doorbell event (published with the other counters).
    #[inline]
    pub fn count_doorbell(&mut self, c: DoorbellCounter) {
        self.doorbells[c as usize] += 1;
        self.counters_dirty = true;
    }

    /// Queues `buf[..len]` to `dst`. Returns false if the ring is full (nothing queued).
    #[inline]
    fn push_to(&mut self, dst: u32, len: usize) -> Result<(), PushError> {
        let p = self.producers[dst as usize].as_mut().expect("producer for every other peer");
        p.push(&[], &self.buf[..len])
    }

    /// Moves frames from the local interface into the rings: at most one batch. Returns the
    /// number of frames handled.
    pub fn tx(&mut self, now: Instant) -> usize {
        if !self.retry_pending(now) {
            return 0;
        }
        let mut handled = 0;
        while handled < self.opts.batch {
            let len = match self.tap.recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tap_readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.count(PeerCounter::LocalIoErrors, 1);
                    if let Some(s) = self.io_log.allow(now) {
                        log::warn!(
                            "reading the local interface failed: {e} ({s} similar suppressed)"
                        );
                    }
                    self.tap_readable = false;
                    break;
                }
            };
            handled += 1;
            if self.forward_local(len, now) {
                break; // blocked on a full ring: leave the rest in the TAP queue
            }
        }
        handled
    }

    /// Retries the frame held back by back-pressure, if any. Returns true when nothing is held
    /// back any more (the transmit buffer is free).
    fn retry_pending(&mut self, now: Instant) -> bool {
        let Some(p) = self.pending else { return true };
        match self.push_to(p.dst, p.len) {
            Ok(()) => {
                self.pending = None;
                self.producers[p.dst as usize].as_ref().expect("producer").set_waiting(false);
            }
            Err(_) => {
                let prod = self.producers[p.dst as usize].as_mut().expect("producer");
                if prod.tail_moved() {
                    self.pending = Some(Pending { since: now, ..p });
                } else if now.duration_since(p.since) >= self.opts.stall_timeout {
                    prod.count_drop_full();
                    prod.set_waiting(false);
                    self.stalled[p.dst as usize] = true;
                    self.pending = None;
                    log::warn!("peer {}: ring stalled (consumer made no progress for {:?}); dropping its frames until it moves", p.dst, self.opts.stall_timeout);
                }
            }
        }
        self.pending.is_none()
    }

    /// Counts a local frame dropped for `reason`; at debug level, describes it (rate limited).
    fn drop_local(&mut self, reason: PeerCounter, len: usize, now: Instant) {
        self.count(reason, 1);
        if log::log_enabled!(log::Level::Debug) {
            if let Some(s) = self.drop_log.allow(now) {
                let frame = &self.buf[..len.min(self.buf.len())];
                log::debug!(
                    "dropped ({reason:?}): {} ({s} similar suppressed)",
                    super::frame::describe(frame)
                );
            }
        }
    }

    /// Sends `buf[..len]`, a frame that came from the local interface, through the switch.
    /// Returns true if it is now held back because its ring is full.
    fn forward_local(&mut self, len: usize, now: Instant) -> bool {
        self.count(PeerCounter::LocalRxFrames, 1);
        self.count(PeerCounter::LocalRxBytes, len as u64);
        if len < 14 {
            self.drop_local(PeerCounter::DropRunt, len, now);
            return false;
        }
        if len > self.max_eth {
            self.drop_local(PeerCounter::DropOversize, len, now);
            return false;
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&self.buf[0..6]);
        src.copy_from_slice(&self.buf[6..12]);
        self.switch.learn(src, self.claim.id, now);
        match self.switch.forward(dst, now) {
            Forward::ToSelf => self.drop_local(PeerCounter::DropToSelf, len, now),
            Forward::Unicast(peer) => {
                if !self.links.is_up(peer) {
                    self.producers[peer as usize].as_mut().expect("producer").count_drop_down();
                    return false;
                }
                return self.unicast(peer, len, now);
            }
            Forward::Flood => self.flood(len, now),
        }
        false
    }

    /// Sends to one peer; returns true if the frame is now pending (ring full).
    fn unicast(&mut self, peer: u32, len: usize, now: Instant) -> bool {
        match self.push_to(peer, len) {
            Ok(()) => {
                self.stalled[peer as usize] = false;
                false
            }
            Err(PushError::Oversize(_) | PushError::Empty) => {
                self.drop_local(PeerCounter::DropOversize, len, now);
                false
            }
            Err(PushError::Full) => {
                let prod = self.producers[peer as usize].as_mut().expect("producer");
                if self.stalled[peer as usize] && !prod.tail_moved() {
                    prod.count_drop_full();
                    return false;
                }
                self.stalled[peer as usize] = false;
                // Publish what we have so the consumer can make room, then wait for it.
                prod.set_waiting(true);
                self.pending = Some(Pending { len, dst: peer, since: now });
                true
            }
        }
    }

    /// Copies the frame to every peer whose link is up; a full ring drops its copy.
    fn flood(&mut self, len: usize, now: Instant) {
        if self.links.up_count() == 0 && now.duration_since(self.last_scan) >= RESCAN_BEFORE_DROP {
            // Nobody up as far as we know: a peer may have joined since the last heartbeat
            // scan (right after start-up, typically). Look again before dropping the frame.
            self.scan_links(now);
        }
        let mut sent = 0;
        for peer in 0..self.producers.len() as u32 {
            if peer == self.claim.id || !self.links.is_up(peer) {
                continue;
            }
            match self.push_to(peer, len) {
                Ok(()) => sent += 1,
                Err(PushError::Full) => {
                    self.producers[peer as usize].as_mut().expect("producer").count_drop_full()
                }
                Err(PushError::Oversize(_) | PushError::Empty) => {
                    self.drop_local(PeerCounter::DropOversize, len, now);
                    return;
                }
            }
        }
        if sent == 0 {
            self.drop_local(PeerCounter::DropNoPeer, len, now);
        } else {
            self.count(PeerCounter::Flooded, 1);
        }
    }

    /// Drains the rings addressed to us into the local interface: at most one batch per ring.
    /// Returns the number of frames handled; producers waiting for space are rung.
    pub fn rx(&mut self, now: Instant, notifier: &mut dyn Notifier) -> usize {
        let mut handled = 0;
        for src in 0..self.consumers.len() as u32 {
            if src == self.claim.id {
                continue;
            }
            if !self.links.is_up(src) {
                // A peer that joined since our last scan may already be sending: scan next round.
                let slot = self.region.peer(src);
                if slot.state() == PeerState::Up
                    && slot.incarnation() != self.links.incarnation(src)
                {
                    self.beat_due = true;
                }
                continue;
            }
            // The producer's current incarnation: frames from any earlier life are dropped.
            let epoch = self.region.peer(src).incarnation() as u32;
            let Some(cons) = self.consumers[src as usize].as_mut() else { continue };
            let mut n = 0;
            while n < self.opts.batch {
                match cons.peek(epoch) {
                    Peek::Empty => break,
                    Peek::Stale => continue,
                    Peek::Corrupt(reason) => {
                        if let Some(s) = self.corrupt_log.allow(now) {
                            log::warn!("ring from peer {src} is inconsistent ({reason:?}); skipped what it published ({s} similar suppressed)");
                        }
                        break;
                    }
                    Peek::Frame(info) => {
                        n += 1;
                        let mut hdr = [0u8; 12];
                        if cons.copy_prefix(&mut hdr) == 12 && hdr[6] & 1 == 0 {
                            let mut mac = [0u8; 6];
                            mac.copy_from_slice(&hdr[6..12]);
                            self.switch.learn(mac, src, now);
                        }
                        match self.tap.send_from_ring(cons, &mut self.iov) {
                            Ok(_) => {
                                cons.advance(true);
                                self.counters[PeerCounter::LocalTxFrames as usize] += 1;
                                self.counters[PeerCounter::LocalTxBytes as usize] +=
                                    info.len as u64;
                            }
                            Err(e) => {
                                cons.advance(false);
                                if e.kind() != io::ErrorKind::WouldBlock {
                                    self.counters[PeerCounter::LocalIoErrors as usize] += 1;
                                    if let Some(s) = self.io_log.allow(now) {
                                        log::warn!("writing a frame from peer {src} to the local interface failed: {e} ({s} similar suppressed)");
                                    }
                                }
                            }
                        }
                        self.counters_dirty = true;
                    }
                }
            }
            cons.publish();
            if n > 0 && cons.producer_waiting() && notifier.notify(src, VECTOR_DATA) {
                self.doorbells[DoorbellCounter::Rung as usize] += 1;
            }
            handled += n;
        }
        handled
    }

    /// Publishes queued frames and counters; rings the doorbell of each consumer that is
    /// waiting (and only those: a busy consumer is not interrupted).
    pub fn publish(&mut self, notifier: &mut dyn Notifier) {
        for (dst, p) in self.producers.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            match p.publish_and_check_waiting() {
                Some(true) if notifier.notify(dst as u32, VECTOR_DATA) => {
                    self.doorbells[DoorbellCounter::Rung as usize] += 1;
                    self.counters_dirty = true;
                    self.unringable[dst] = false;
                }
                Some(false) => {
                    // The consumer is busy: it will find the frames without being interrupted.
                    self.doorbells[DoorbellCounter::Suppressed as usize] += 1;
                    self.counters_dirty = true;
                }
                Some(true) => {
                    // A waiting consumer we have no doorbell for (it joined through another
                    // server, or before a restart without the fd store): it likely cannot ring
                    // us either, so we poll while it is up (see `polls_for_unringable_peers`).
                    self.unringable[dst] = true;
                }
                None => {}
            }
        }
        if self.counters_dirty {
            self.counters_dirty = false;
            let slot = self.region.peer(self.claim.id);
            slot.store_counters(&self.counters);
            slot.store_doorbell_counters(&self.doorbells);
        }
    }

    /// Heartbeat and link checks; due every heartbeat interval. Returns the time of the next.
    pub fn housekeeping(&mut self, now: Instant) -> Result<Instant, DatapathError> {
        if now < self.next_beat && !self.beat_due {
            return Ok(self.next_beat);
        }
        // Our own slot: heartbeat, or write back what someone overwrote, or rejoin elsewhere.
        match self.own.check(&self.region, &self.links, now) {
            SlotCheck::Rejoin(claim) => self.rejoin(claim, now),
            SlotCheck::Displaced => {
                self.links.suspend();
                self.pending = None;
            }
            SlotCheck::Intact | SlotCheck::Repaired | SlotCheck::Watching => {}
        }
        self.scan_links(now);
        if now >= self.next_kernel_stats {
            self.next_kernel_stats = now + Duration::from_secs(1);
            if let Some(d) = self.tap.kernel_drops() {
                self.counters[PeerCounter::LocalKernelDrops as usize] = d;
                self.counters_dirty = true;
            }
        }
        self.beat_due = false;
        self.next_beat = now + super::link::heartbeat_interval(self.opts.link_timeout);
        Ok(self.next_beat)
    }

    /// Reads the peer table and applies link changes (switch entries, stalled rings, a frame
    /// held for a peer that went down).
    fn scan_links(&mut self, now: Instant) {
        self.last_scan = now;
        let Datapath { links, region, switch, stalled, pending, consumers, .. } = self;
        links.tick(region, now, |ev| match ev {
            LinkEvent::Up { id, mac } => {
                log::info!("peer {id} ({}) is up", crate::mac::Mac(mac));
                switch.learn(mac, id, now);
                stalled[id as usize] = false;
            }
            LinkEvent::Restarted { id, mac } => {
                log::info!("peer {id} ({}) restarted with a new incarnation", crate::mac::Mac(mac));
                switch.forget_peer(id);
                switch.learn(mac, id, now);
                stalled[id as usize] = false;
            }
            LinkEvent::Down { id } => {
                log::info!("peer {id} is down");
                switch.forget_peer(id);
                if pending.is_some_and(|p| p.dst == id) {
                    *pending = None;
                }
                // What it queued is not replayed if it comes back.
                if let Some(c) = consumers[id as usize].as_mut() {
                    link::discard_ring(region, c, id);
                }
            }
        });
    }

    /// Moves this member to slot `claim` (another member holds our old one), keeping the local
    /// interface and its MAC: fresh rings for the new id, links and switch start over.
    pub fn rejoin(&mut self, claim: Claim, now: Instant) {
        let (me, n) = (claim.id, self.region.geometry().max_peers);
        let identity = self.own.identity();
        self.own = OwnSlot::take(&self.region, claim, identity, self.opts.link_timeout, now);
        self.claim = claim;
        let region = &self.region;
        self.producers = (0..n)
            .map(|d| (d != me).then(|| Producer::new(region, me, d, claim.epoch())))
            .collect();
        self.consumers = (0..n).map(|s| (s != me).then(|| Consumer::new(region, s, me))).collect();
        self.own.go_up(region);
        self.links = Links::new(region, me, self.opts.link_timeout);
        self.switch = Switch::new(me, Switch::DEFAULT_AGEING, Switch::DEFAULT_CAPACITY);
        self.switch.learn(identity.mac, me, now);
        self.pending = None;
        self.stalled.iter_mut().for_each(|s| *s = false);
        self.rx_taken.iter_mut().for_each(|t| *t = 0);
        self.unringable.iter_mut().for_each(|u| *u = false);
        self.counters_dirty = true;
        self.beat_due = true;
    }

    /// Runs the link checks on the next round instead of at the next heartbeat (a peer rang our
    /// link-state vector).
    pub fn force_housekeeping(&mut self) {
        self.beat_due = true;
    }

    /// Rings every peer's link-state vector so they re-read the peer table now.
    pub fn announce_link_change(&mut self, notifier: &mut dyn Notifier) {
        for peer in 0..self.producers.len() as u32 {
            if peer != self.claim.id {
                notifier.notify(peer, VECTOR_LINK);
            }
        }
    }

    /// A peer left (reported by the doorbell server): mark it down now.
    pub fn peer_left(&mut self, id: u32) {
        if self.links.force_down(id) {
            log::info!("peer {id} left (reported by the doorbell server)");
            self.switch.forget_peer(id);
            if self.pending.is_some_and(|p| p.dst == id) {
                self.pending = None;
            }
            if let Some(c) = self.consumers[id as usize].as_mut() {
                link::discard_ring(&self.region, c, id);
            }
        }
    }

    /// Sets our waiting flag on every inbound ring and re-checks them. Returns true if data is
    /// there after all (do not sleep).
    pub fn prepare_to_sleep(&mut self) -> bool {
        let mut found = false;
        for (src, c) in self.consumers.iter_mut().enumerate() {
            if let Some(c) = c {
                if self.links.is_up(src as u32) && c.prepare_to_sleep() {
                    found = true;
                }
            }
        }
        if found {
            self.wake();
        }
        found
    }

    /// Clears our waiting flags: we are busy, producers need not ring us.
    pub fn wake(&mut self) {
        for c in self.consumers.iter().flatten() {
            c.wake();
        }
    }

    /// Whether any inbound ring from an up peer has data.
    pub fn rx_pending(&mut self) -> bool {
        let links = &self.links;
        self.consumers
            .iter_mut()
            .enumerate()
            .any(|(src, c)| links.is_up(src as u32) && c.as_mut().is_some_and(|c| c.has_data()))
    }

    // -----------------------------------------------------------------------------------------
    // Pull-style access, for a local side that is not a `FrameIo` (the smoltcp stack): the
    // caller writes frames straight into the transmit buffer and reads received frames straight
    // out of the ring. Switch, links, back-pressure and counters are the same as for `tx`/`rx`.
    // -----------------------------------------------------------------------------------------

    /// The largest Ethernet frame (without FCS) the local side may send or receive: MTU + 18.
    pub fn max_frame_len(&self) -> usize {
        self.max_eth
    }

    /// Retries the frame held back by back-pressure, if any. Returns true when a new frame can
    /// be taken ([`Datapath::tx_buffer`] will hand out the buffer).
    pub fn tx_ready(&mut self, now: Instant) -> bool {
        self.retry_pending(now)
    }

    /// The preallocated transmit buffer, `len` bytes long, for the local side to write one frame
    /// into; send it with [`Datapath::tx_commit`]. `None` while a frame is held back by
    /// back-pressure, or when `len` exceeds [`Datapath::max_frame_len`].
    pub fn tx_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.pending.is_some() || len > self.max_eth {
            return None;
        }
        Some(&mut self.buf[..len])
    }

    /// Sends the frame just written into [`Datapath::tx_buffer`]`(len)` through the switch,
    /// exactly as a frame read from a TAP. Returns true if it is held back because its ring is
    /// full: it goes out on a later [`Datapath::tx_ready`], and no new frame is taken until then.
    pub fn tx_commit(&mut self, len: usize, now: Instant) -> bool {
        if self.pending.is_some() || len > self.max_eth {
            // No buffer was handed out for this frame: nothing to send.
            return self.pending.is_some();
        }
        self.forward_local(len, now)
    }

    /// Counts a frame the local side had to discard because a frame was held back (its ring
    /// was full), against that ring's full-drop counter.
    pub fn count_held_back_drop(&mut self) {
        if let Some(p) = self.pending {
            if let Some(prod) = self.producers[p.dst as usize].as_mut() {
                prod.count_drop_full();
            }
        }
    }

    /// Takes the next frame addressed to us from the ring of an up peer (round robin across
    /// peers), learns where its source MAC lives, and hands the ring's consumer to `deliver`,
    /// which reads the frame out (e.g. with [`Consumer::copy_frame`] into its own buffer) and
    /// returns its length, or 0 if it could not take it (counted as a delivery drop; the next
    /// frame is tried). Returns the delivered length, or `None` when no ring has a frame.
    ///
    /// Consumed segments go back to their producer every batch and when a ring runs empty;
    /// call [`Datapath::rx_flush`] at the end of a round.
    pub fn rx_next(
        &mut self,
        now: Instant,
        notifier: &mut dyn Notifier,
        mut deliver: impl FnMut(&Consumer) -> usize,
    ) -> Option<usize> {
        let n = self.consumers.len();
        for i in 0..n {
            let src = (self.rx_cursor + i) % n;
            if src as u32 == self.claim.id || !self.links.is_up(src as u32) {
                continue;
            }
            // The producer's current incarnation: frames from any earlier life are dropped.
            let epoch = self.region.peer(src as u32).incarnation() as u32;
            loop {
                let Datapath { consumers, switch, counters, corrupt_log, rx_taken, opts, .. } =
                    &mut *self;
                let Some(cons) = consumers[src].as_mut() else { break };
                match cons.peek(epoch) {
                    Peek::Empty => break,
                    Peek::Stale => continue,
                    Peek::Corrupt(reason) => {
                        if let Some(s) = corrupt_log.allow(now) {
                            log::warn!("ring from peer {src} is inconsistent ({reason:?}); skipped what it published ({s} similar suppressed)");
                        }
                        break;
                    }
                    Peek::Frame(_) => {
                        let mut hdr = [0u8; 12];
                        if cons.copy_prefix(&mut hdr) == 12 && hdr[6] & 1 == 0 {
                            let mut mac = [0u8; 6];
                            mac.copy_from_slice(&hdr[6..12]);
                            switch.learn(mac, src as u32, now);
                        }
                        let got = deliver(cons);
                        cons.advance(got > 0);
                        rx_taken[src] += 1;
                        let batch_done = rx_taken[src] as usize >= opts.batch;
                        if got > 0 {
                            counters[PeerCounter::LocalTxFrames as usize] += 1;
                            counters[PeerCounter::LocalTxBytes as usize] += got as u64;
                        }
                        self.counters_dirty = true;
                        if batch_done {
                            self.rx_release(src, notifier);
                        }
                        if got > 0 {
                            self.rx_cursor = (src + 1) % n;
                            return Some(got);
                        }
                    }
                }
            }
            self.rx_release(src, notifier);
        }
        None
    }

    /// Whether a peer this member considers down has published frames for it, i.e. it has
    /// (re)joined since the last link check (or died with frames queued). A member without
    /// doorbells uses this to check the links at once rather than at the next heartbeat, so a
    /// peer that just joined is heard within milliseconds.
    pub fn down_peer_has_frames(&mut self) -> bool {
        let links = &self.links;
        self.consumers
            .iter_mut()
            .enumerate()
            .any(|(src, c)| !links.is_up(src as u32) && c.as_mut().is_some_and(|c| c.has_data()))
    }

    /// Returns the segments taken by [`Datapath::rx_next`] to their producers and rings those
    /// that wait for space.
    pub fn rx_flush(&mut self, notifier: &mut dyn Notifier) {
        for src in 0..self.consumers.len() {
            if self.rx_taken[src] > 0 {
                self.rx_release(src, notifier);
            }
        }
    }

    fn rx_release(&mut self, src: usize, notifier: &mut dyn Notifier) {
        let taken = std::mem::take(&mut self.rx_taken[src]);
        let Some(cons) = self.consumers[src].as_mut() else { return };
        cons.publish();
        if taken > 0 && cons.producer_waiting() && notifier.notify(src as u32, VECTOR_DATA) {
            self.doorbells[DoorbellCounter::Rung as usize] += 1;
            self.counters_dirty = true;
        }
    }

    /// Leaves the segment cleanly: marks our slot as left.
    pub fn leave(&mut self) {
        self.publish(&mut NoDoorbells);
        let slot = self.region.peer(self.claim.id);
        if slot.incarnation() == self.claim.incarnation {
            slot.set_state(PeerState::Left, self.claim.incarnation);
        }
    }
}
