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
use crate::offload::vnet::VIRTIO_NET_HDR_F_NEEDS_CSUM;
use crate::offload::{
    partial_checksum, Features, Gso, GsoError, PartialChecksum, Segmenter, VnetHdr, VNET_HDR_LEN,
};
use crate::region::layout::{
    DoorbellCounter, PeerCounter, DOORBELL_COUNTERS, ETH_OVERHEAD, PEER_COUNTERS, SUPER_FRAME_MAX,
};
use crate::region::ring::{Consumer, FrameInfo, Peek, Producer, PushError, RxDrop};
use crate::region::{PeerState, Region};

/// How stale the link view may be before a frame is dropped for lack of peers.
const RESCAN_BEFORE_DROP: Duration = Duration::from_millis(5);

/// Bytes of a received frame looked at before it is delivered: enough for the Ethernet, VLAN,
/// IP (with options) and TCP (with options) headers of an offloaded frame.
const HEADER_PEEK: usize = 256;

/// How long frames to other peers may wait behind one peer's full ring (the local interface
/// is not read meanwhile) before that peer's frames are dropped instead. A consumer that drains
/// at all frees room far sooner; one that does not must not hold up the segment.
const HEAD_OF_LINE_BUDGET: Duration = Duration::from_millis(2);

/// A peer that had a unicast frame from us this recently may have more waiting behind a full
/// ring (see [`Datapath::head_of_line_budget`]).
const OTHERS_ACTIVE: Duration = Duration::from_secs(1);

/// A frame kept for one peer whose ring was full: its bytes are in that peer's hold buffer,
/// where the transmit buffer keeps its frames (after the header room).
#[derive(Debug, Clone, Copy)]
struct Held {
    len: usize,
    hdr: VnetHdr,
    /// Its checksum still to be completed (see `Datapath::pending_csum`): by the copy into
    /// the ring when it goes, as for a frame that never waited.
    csum: Option<PartialChecksum>,
    /// When the peer's consumer last made progress (or the frame was held).
    since: Instant,
}

/// The frame in the transmit buffer waits for `dst`'s hold to free up: the local interface is
/// not read meanwhile (back-pressure towards the local stack), for a bounded time.
#[derive(Debug, Clone, Copy)]
struct Blocked {
    len: usize,
    hdr: VnetHdr,
    dst: u32,
    since: Instant,
}

/// Where the frame to send is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The transmit buffer.
    Buf,
    /// The hold buffer of this peer.
    Held(u32),
}

/// Rings the producer of ring `src -> us` if its flag says it waits for room there (call after
/// publishing the tail), and counts the doorbell. Returns whether it rang.
fn ring_waiting_producer(
    cons: &Consumer,
    src: u32,
    notifier: &mut dyn Notifier,
    doorbells: &mut [u64; DOORBELL_COUNTERS],
) -> bool {
    let rung = cons.producer_waiting() && notifier.notify(src, VECTOR_DATA);
    if rung {
        doorbells[DoorbellCounter::Rung as usize] += 1;
    }
    rung
}

/// Completes the checksum `pending` says `frame` still lacks, in place (see
/// `Datapath::complete_checksum`), and clears it.
fn settle(frame: &mut [u8], pending: &mut Option<PartialChecksum>) {
    if let Some(p) = pending.take() {
        p.store(frame, p.complete(frame));
    }
}

/// Why a frame was not queued for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendError {
    /// Not enough ring space now.
    Full,
    /// It, or its segments, would exceed the destination's MTU.
    Mtu,
    /// It needed segmenting or a checksum for this destination, and could not get it.
    Offload,
}

/// What this member knows of another peer's interface, read from its slot when its link comes
/// up (once per incarnation: a peer that rewrites its slot later changes nothing here).
#[derive(Debug, Clone, Copy)]
struct PeerIface {
    /// Offloads it accepts as-is.
    accepts: Features,
    /// Largest plain Ethernet frame it takes (its MTU + 18).
    max_eth: usize,
    /// Its MAC when it came up.
    mac: [u8; 6],
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
    /// The local interface's MTU (plain frames up to MTU + 18 bytes pass; offloaded ones up to
    /// 64 KiB, with segments that fit the MTU).
    pub mtu: u32,
    /// How long a peer's heartbeat may stall before its link is down.
    pub link_timeout: Duration,
    /// How long a frame may wait for ring space before it is dropped and the ring is treated as
    /// stalled (its frames are dropped until its consumer moves again).
    pub stall_timeout: Duration,
    /// Frames per batch (per direction, per ring).
    pub batch: usize,
    /// Accept from a peer only frames whose source MAC is the one in its slot when it came up
    /// (a guard against mistakes and casual spoofing; hosts bridged behind a peer are cut off).
    pub pin_macs: bool,
    /// Take frames with a partial checksum from the ring and hand them to the interface as
    /// they are, and tell the peers so (`Features::TRUST_CSUM`): they then skip completing
    /// checksums for us, and our kernel skips verifying them. Only with an interface that
    /// takes partial checksums; a scribble on the region then goes undetected.
    pub trust_peer_checksums: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            mtu: 1500,
            link_timeout: Duration::from_secs(1),
            // Long enough that a peer descheduled on a busy host is not taken for stuck.
            stall_timeout: Duration::from_millis(250),
            batch: 64,
            pin_macs: false,
            trust_peer_checksums: false,
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
    /// Offloads of the local interface; `None`: it reads and writes plain frames without a
    /// virtio-net header.
    offloads: Option<Features>,
    /// Bytes before the frame in `buf`: the virtio-net header when the interface has one.
    hdr_room: usize,
    /// The transmit buffer: `hdr_room` bytes of header, then the frame (one spare byte beyond
    /// the largest frame, so a read that fills it is known to be truncated).
    buf: Box<[u8]>,
    /// The checksum of the frame in `buf` still to be completed: its header already says the
    /// frame is complete, and no byte of it leaves private memory before this is done, either
    /// by the copy into a ring (which sums as it copies) or in place before it is segmented
    /// (see [`settle`]). A frame kept in a hold takes its pending checksum with it. (A peer
    /// that trusts our checksums gets the frame before this is done, its header saying so
    /// again: see [`Datapath::send_from`].)
    pending_csum: Option<PartialChecksum>,
    /// Largest plain Ethernet frame the local side sends or takes: MTU + 18.
    max_eth: usize,
    /// Other peers' interfaces (indexed by peer id).
    peers: Vec<PeerIface>,
    /// The peer the last unicast frame went to: the next frame is read straight into its ring
    /// when it will probably go there too.
    last_dst: Option<u32>,
    segmenter: Segmenter,
    iov: Vec<libc::iovec>,
    /// Per peer, one frame kept while its ring is full (back-pressure per destination), and
    /// the buffer it is kept in (allocated at join, as large as `buf`: a frame is kept by
    /// swapping the two, not by copying it).
    held: Vec<Option<Held>>,
    held_buf: Vec<Box<[u8]>>,
    /// A frame for a peer whose hold is taken, waiting: the local interface is not read.
    blocked: Option<Blocked>,
    /// Peers that kept a frame waiting longer than [`HEAD_OF_LINE_BUDGET`]: further frames to
    /// them are dropped, not waited for, until their hold is free again.
    slow: Vec<bool>,
    /// Peers whose ring made no progress for the stall timeout: frames to them are dropped
    /// without waiting until their consumer moves again.
    stalled: Vec<bool>,
    /// Per peer, when the local side last gave us a unicast frame for it.
    unicast_at: Vec<Option<Instant>>,
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
        let trust = opts.trust_peer_checksums;
        let offloads = match tap.offloads() {
            Some(f) if trust && f.contains(Features::CSUM) => Some(f | Features::TRUST_CSUM),
            other => other,
        };
        // What others may send us as it is: TCP super-frames with complete checksums, and, if
        // we trust them, anything with a partial checksum too. (USO super-frames must reach a
        // TAP with a partial checksum, so they travel only to a peer that trusts: see
        // `complete_checksum`.)
        let features = offloads.map_or(0, |f| match f.contains(Features::TRUST_CSUM) {
            true => f.bits(),
            false => f.intersection(Features::from_bits_truncate(!Features::USO.bits())).bits(),
        });
        let identity = link::Identity { mac, mtu: opts.mtu, features, kind };
        let own = OwnSlot::take(&region, claim, identity, opts.link_timeout, Instant::now());
        let producers = (0..n)
            .map(|d| (d != me).then(|| Producer::new(&region, me, d, claim.epoch())))
            .collect();
        let consumers = (0..n).map(|s| (s != me).then(|| Consumer::new(&region, s, me))).collect();
        // Release (in set_state): the resets above are visible to whoever sees us up.
        own.go_up(&region);
        let max_eth = (opts.mtu + ETH_OVERHEAD) as usize;
        let hdr_room = if offloads.is_some() { VNET_HDR_LEN } else { 0 };
        // With offloads the interface hands over super-frames of up to 64 KiB whatever its MTU.
        let largest =
            if offloads.is_some() { max_eth.max(SUPER_FRAME_MAX as usize) } else { max_eth };
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
            offloads,
            hdr_room,
            buf: vec![0u8; hdr_room + largest + 1].into_boxed_slice(),
            pending_csum: None,
            max_eth,
            peers: vec![
                PeerIface { accepts: Features::default(), max_eth: 0, mac: [0; 6] };
                n as usize
            ],
            last_dst: None,
            segmenter: Segmenter::new(),
            iov: Vec::with_capacity(max_segs + 1),
            held: vec![None; n as usize],
            held_buf: (0..n)
                .map(|d| {
                    let len = if d == me { 0 } else { hdr_room + largest + 1 };
                    vec![0u8; len].into_boxed_slice()
                })
                .collect(),
            blocked: None,
            slow: vec![false; n as usize],
            stalled: vec![false; n as usize],
            unicast_at: vec![None; n as usize],
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
        self.tap_readable && self.blocked.is_none()
    }

    /// Whether to poll instead of sleeping on doorbells: a waiting peer could not be rung
    /// lately, and a peer we cannot ring probably cannot ring us.
    pub fn polls_for_unringable_peers(&self) -> bool {
        let links = &self.links;
        self.unringable.iter().enumerate().any(|(p, &u)| u && links.is_up(p as u32))
    }

    /// Whether we take partial checksums from our peers unverified: asked for
    /// ([`DatapathOptions::trust_peer_checksums`]) and possible (the interface takes them).
    pub fn trusts_peer_checksums(&self) -> bool {
        self.offloads.is_some_and(|f| f.contains(Features::TRUST_CSUM))
    }

    /// Whether a frame is held back waiting for ring space.
    pub fn is_blocked(&self) -> bool {
        self.blocked.is_some() || self.held.iter().any(Option::is_some)
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

    /// Queues the frame in the transmit buffer (`len` bytes, offload header `hdr`) to `dst`, in
    /// the form that peer takes: as-is (with its header) when it accepts the frame's offloads,
    /// else as complete frames, checksummed and segmented to fit its MTU (all or nothing: when
    /// the ring lacks room for every segment, none is queued).
    fn send_to(&mut self, dst: u32, len: usize, hdr: &VnetHdr) -> Result<(), SendError> {
        self.send_from(Source::Buf, dst, len, hdr)
    }

    /// [`Datapath::send_to`] for a frame in `src`. A peer that trusts our checksums
    /// ([`Features::TRUST_CSUM`]) gets it with its partial checksum, as the kernel gave it.
    fn send_from(
        &mut self,
        src: Source,
        dst: u32,
        len: usize,
        hdr: &VnetHdr,
    ) -> Result<(), SendError> {
        let peer = self.peers[dst as usize];
        let Datapath { producers, buf, held_buf, held, hdr_room, segmenter, pending_csum, .. } =
            self;
        let (frame, pending_csum) = match src {
            Source::Buf => (&mut buf[*hdr_room..*hdr_room + len], pending_csum),
            Source::Held(p) => (
                &mut held_buf[p as usize][*hdr_room..*hdr_room + len],
                &mut held[p as usize].as_mut().expect("a held frame").csum,
            ),
        };
        // A peer that trusts us gets the frame with its checksum still partial, as the kernel
        // gave it (the checksum field still holds the kernel's partial sum): no pass over the
        // bytes here, none in its kernel.
        let partial = match *pending_csum {
            Some(_) => VnetHdr { flags: hdr.flags | VIRTIO_NET_HDR_F_NEEDS_CSUM, ..*hdr },
            None => *hdr,
        };
        let trusting = partial.needs_csum() && peer.accepts.takes_from_ring(&partial);
        let hdr = if trusting { &partial } else { hdr };
        let as_is = hdr.is_plain() || peer.accepts.takes_from_ring(hdr);
        if !as_is {
            // Segments are cut from the frame and summed anew: it must be complete first.
            settle(frame, pending_csum);
        }
        let prod = producers[dst as usize].as_mut().expect("producer for every other peer");
        let pushed = |r: Result<(), PushError>| match r {
            Ok(()) => Ok(()),
            Err(PushError::Full) => Err(SendError::Full),
            Err(PushError::Oversize(_) | PushError::Empty) => Err(SendError::Mtu),
        };
        if as_is {
            let encoded;
            let (meta, longest): (&[u8], _) = match hdr.is_plain() {
                true => (&[], Some(len)),
                false => {
                    encoded = hdr.encode();
                    (&encoded, hdr.largest_segment_len(frame))
                }
            };
            match longest {
                Some(l) if l <= peer.max_eth => {}
                Some(_) => return Err(SendError::Mtu),
                None => return Err(SendError::Offload),
            }
            let Some(p) = pending_csum.filter(|_| !trusting) else {
                return pushed(prod.push(meta, frame));
            };
            // Completed on the way into the ring, and then in the frame's buffer for the next
            // destination (a flood) or a retry.
            let value = prod.push_summed(meta, frame, &p);
            return pushed(value.map(|v| {
                p.store(frame, v);
                *pending_csum = None;
            }));
        }
        let frame = &*frame;
        let plan = segmenter.plan(frame, hdr, peer.max_eth).map_err(|e| match e {
            GsoError::TooLong { .. }
            | GsoError::DatagramTooLong { .. }
            | GsoError::NoRoomForPayload { .. } => SendError::Mtu,
            _ => SendError::Offload,
        })?;
        let need = (plan.segments() as u32 - 1) * prod.segments_for(plan.segment_len())
            + prod.segments_for(plan.last_len());
        // All or nothing when the segments can fit at all. A ring of few large segments may be
        // unable to hold all the small frames at once: then as many as fit go, and the rest is
        // counted as dropped (TCP resends it).
        let whole = need <= prod.slots();
        if whole && !prod.has_room(need) {
            return Err(SendError::Full);
        }
        let mut result = Ok(());
        segmenter
            .emit(frame, &plan, |head, payload| {
                result = pushed(prod.push_parts(&[], &[head, payload]));
                result.is_ok()
            })
            .map_err(|_| SendError::Offload)?;
        if !whole && result == Err(SendError::Full) {
            prod.count_drop_full();
            return Ok(());
        }
        result
    }

    /// Moves frames from the local interface into the rings: at most one batch. Returns the
    /// number of frames handled.
    ///
    /// Without offloads, a frame is read straight into the ring of the peer the last unicast
    /// frame went to when that ring has room for the largest frame: if the frame is for that
    /// peer, it is queued where it lies (one copy from the kernel, none of ours); otherwise it
    /// is copied out into the transmit buffer and goes the usual way. With offloads it is read
    /// into the transmit buffer, and its checksum is completed from those private bytes as they
    /// are copied into the ring (see `complete_checksum`).
    pub fn tx(&mut self, now: Instant) -> usize {
        self.tx_ringing(now, &mut NoDoorbells)
    }

    /// [`Datapath::tx`], ringing a sleeping consumer as soon as a quarter of its ring is
    /// published rather than at the end of the batch.
    pub fn tx_ringing(&mut self, now: Instant, notifier: &mut dyn Notifier) -> usize {
        if !self.retry_held(now) {
            return 0;
        }
        let mut handled = 0;
        // Only when the interface said it has frames (its descriptor is edge-triggered: read
        // until WouldBlock, then wait for the next edge), so an idle or spinning loop makes no
        // read syscall for nothing.
        while handled < self.opts.batch && self.tap_readable {
            let spec = self.speculate();
            let read = match &spec {
                Some((peer, ranges)) => {
                    let prod = self.producers[*peer as usize].as_ref().expect("producer");
                    self.tap.recv_into_ring(prod, ranges, &mut self.iov)
                }
                None => self.tap.recv(&mut self.buf),
            };
            let n = match read {
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
            if n >= self.buf.len() {
                // The kernel truncates a frame that does not fit: never forward a cut frame.
                // (A reservation is as large as the buffer.)
                self.drop_local(PeerCounter::DropOversize, n.saturating_sub(self.hdr_room), now);
                continue;
            }
            if let Some((peer, ranges)) = spec {
                if self.commit_in_place(peer, &ranges, n, now) {
                    self.ring_early(notifier);
                    continue;
                }
                let prod = self.producers[peer as usize].as_ref().expect("producer");
                prod.copy_reserved(&ranges, 0, &mut self.buf[..n]);
            }
            let len = n.saturating_sub(self.hdr_room);
            let hdr = if self.hdr_room > 0 {
                let mut h = [0u8; VNET_HDR_LEN];
                h.copy_from_slice(&self.buf[..VNET_HDR_LEN]);
                self.complete_checksum(VnetHdr::decode(&h), len)
            } else {
                VnetHdr::default()
            };
            let blocked = self.forward_local(len, hdr, now);
            self.ring_early(notifier);
            if blocked {
                break; // blocked on a full ring: leave the rest in the TAP queue
            }
        }
        handled
    }

    /// Rings each consumer that sleeps although part of its ring was published early (a
    /// quarter of the ring at a time): it then works on those frames while we queue the rest,
    /// instead of waiting for the whole batch. [`Datapath::publish`] reports the rest of the
    /// batch as usual.
    ///
    /// Every early publication that finds the consumer's flag set rings it, even if it was
    /// rung earlier in the batch: it may have drained what it was woken for and gone back to
    /// sleep, and an early publication reported here is not reported again at the end of the
    /// batch. (Skipping the second doorbell lost wake-ups: measured, MTU 65521 fell to a third.)
    fn ring_early(&mut self, notifier: &mut dyn Notifier) {
        for (dst, p) in self.producers.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            if p.take_early_and_check_waiting() && notifier.notify(dst as u32, VECTOR_DATA) {
                self.doorbells[DoorbellCounter::Rung as usize] += 1;
                self.counters_dirty = true;
            }
        }
    }

    /// Completes the TCP/UDP checksum of the frame in the transmit buffer while it is still
    /// private, so that nothing crosses shared memory with a partial checksum: the receiving
    /// kernel verifies every checksum after copying the frame out of the ring, and a frame
    /// that a broken or hostile member scribbled on is dropped there (TCP resends it) instead of
    /// delivered. A TCP super-frame keeps its GSO header with one checksum over all of it
    /// (the kernel's partial value already sums the pseudo-header with its full length); a
    /// plain frame becomes complete. A UDP super-frame (USO) cannot go to a TAP without a
    /// partial checksum, so it keeps it and is cut into datagrams for every peer that does not
    /// trust ours. Returns the header that now describes the frame.
    ///
    /// The sum itself is taken later, by the copy into the first ring the frame goes to (one
    /// pass over the bytes instead of two), also after a wait in a hold, or by [`settle`] before
    /// the frame is segmented: until then `pending_csum` says where it goes.
    fn complete_checksum(&mut self, hdr: VnetHdr, len: usize) -> VnetHdr {
        self.pending_csum = None;
        if !hdr.needs_csum() || matches!(hdr.gso(), Ok(Gso::Udp)) {
            return hdr;
        }
        let frame = &self.buf[self.hdr_room..self.hdr_room + len];
        // Summed like a frame without GSO: from csum_start to the end of the IP packet.
        let whole = VnetHdr { gso_type: VnetHdr::PLAIN.gso_type, ..hdr };
        match partial_checksum(frame, &whole) {
            Ok(p) => {
                self.pending_csum = Some(p);
                VnetHdr { flags: hdr.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM, ..hdr }
            }
            // Not something we can complete: forward_local refuses it (partial checksums do
            // not cross the ring).
            Err(_) => hdr,
        }
    }

    /// Where to read the next local frame: space reserved in the ring of the last unicast
    /// destination, if it is up, keeps nothing held for it, and has room for the largest frame
    /// (as large as the transmit buffer, so truncation is detected the same way).
    fn speculate(&mut self) -> Option<(u32, [(usize, usize); 2])> {
        // Without offloads the frames come with checksums the kernel completed before they
        // reached the ring. Offloaded frames get theirs summed over the private transmit
        // buffer (see `complete_checksum`), never over shared memory, where a scribble between
        // the read and the sum would go unnoticed: so they are read into a ring only when every
        // peer up trusts our checksums (none of them wants a sum, and a frame that turns out to
        // be for another peer and is copied out again reaches only such peers).
        let peer = self.last_dst?;
        if !self.links.is_up(peer) || self.held[peer as usize].is_some() {
            return None;
        }
        if self.offloads.is_some() && !self.every_peer_up_trusts() {
            return None;
        }
        let ranges = self.producers[peer as usize].as_mut()?.reserve(self.buf.len())?;
        Some((peer, ranges))
    }

    /// Whether every peer whose link is up takes partial checksums from us
    /// ([`Features::TRUST_CSUM`]).
    fn every_peer_up_trusts(&self) -> bool {
        (0..self.peers.len() as u32).all(|p| {
            p == self.claim.id
                || !self.links.is_up(p)
                || self.peers[p as usize].accepts.contains(Features::TRUST_CSUM)
        })
    }

    /// Queues the frame just read into `peer`'s ring (`n` bytes, the interface's virtio-net
    /// header first if it has one; see [`Datapath::speculate`]) where it lies, if it is for
    /// `peer` and `peer` takes it as it is (what [`Datapath::forward_local`] and
    /// [`Datapath::send_to`] would decide). Returns false, having changed nothing but the
    /// switch's learning, if it must go the usual way. The decision uses a copy of the headers:
    /// the ring is shared.
    fn commit_in_place(
        &mut self,
        peer: u32,
        ranges: &[(usize, usize); 2],
        n: usize,
        now: Instant,
    ) -> bool {
        let room = self.hdr_room;
        let Some(len) = n.checked_sub(room).filter(|&l| l >= 14) else { return false };
        let prod = self.producers[peer as usize].as_ref().expect("producer");
        let mut vnet = [0u8; VNET_HDR_LEN];
        prod.copy_reserved(ranges, 0, &mut vnet[..room]);
        let hdr = VnetHdr::decode(&vnet);
        // As in `inspect`: a plain frame needs only its addresses looked at, an offloaded one
        // its L3/L4 headers too (for the size of its segments).
        let mut head = [0u8; HEADER_PEEK];
        let seen = len.min(if hdr.is_plain() { 12 } else { HEADER_PEEK });
        prod.copy_reserved(ranges, room, &mut head[..seen]);
        let frame_head = &head[..seen];
        let to = self.peers[peer as usize];
        if hdr.is_plain() {
            if len > self.max_eth || len > to.max_eth {
                return false;
            }
        } else {
            let ours = self.offloads.is_some_and(|f| f.accepts(&hdr));
            if !ours || hdr.validate_len(len).is_err() || !to.accepts.takes_from_ring(&hdr) {
                return false;
            }
            match hdr.largest_segment_len_of(frame_head, len) {
                Some(l) if l <= to.max_eth => {}
                _ => return false,
            }
        }
        let mut addrs = [0u8; 12];
        addrs.copy_from_slice(&frame_head[..12]);
        let flooded = match self.switch_addresses(addrs, now) {
            Forward::Unicast(p) if p == peer && self.links.is_up(p) => {
                self.unicast_at[p as usize] = Some(now);
                false
            }
            // A flood whose only recipient is that peer.
            Forward::Flood if self.links.up_count() == 1 && self.links.is_up(peer) => true,
            _ => return false,
        };
        let prod = self.producers[peer as usize].as_mut().expect("producer");
        if prod.commit_reserved(room, n).is_err() {
            return false;
        }
        self.count(PeerCounter::LocalRxFrames, 1);
        self.count(PeerCounter::LocalRxBytes, len as u64);
        if flooded {
            self.count(PeerCounter::Flooded, 1);
        }
        self.stalled[peer as usize] = false;
        true
    }

    /// Retries the frames kept for peers whose ring was full, then the frame that waits for a
    /// peer's hold, if any. Returns true when nothing waits any more (the transmit buffer is
    /// free and the local interface may be read).
    fn retry_held(&mut self, now: Instant) -> bool {
        for dst in 0..self.held.len() as u32 {
            let Some(h) = self.held[dst as usize] else { continue };
            match self.send_from(Source::Held(dst), dst, h.len, &h.hdr) {
                Ok(()) => self.release_hold(dst),
                Err(SendError::Mtu | SendError::Offload) => {
                    // Cannot happen for a frame that was only waiting for room; drop it anyway.
                    self.producers[dst as usize].as_mut().expect("producer").count_drop_mtu();
                    self.release_hold(dst);
                }
                Err(SendError::Full) => {
                    let prod = self.producers[dst as usize].as_mut().expect("producer");
                    if prod.tail_moved() {
                        // Only the time: the attempt may have completed its checksum.
                        if let Some(h) = self.held[dst as usize].as_mut() {
                            h.since = now;
                        }
                    } else if now.duration_since(h.since) >= self.opts.stall_timeout {
                        prod.count_drop_full();
                        self.release_hold(dst);
                        self.stalled[dst as usize] = true;
                        log::warn!("peer {dst}: ring stalled (consumer made no progress for {:?}); dropping its frames until it moves", self.opts.stall_timeout);
                    }
                }
            }
        }
        let Some(b) = self.blocked else { return true };
        if self.held[b.dst as usize].is_none() {
            self.blocked = None;
            if self.hold_or_send(b.dst, b.len, b.hdr, now) {
                self.blocked = Some(b);
            }
        } else if self.head_of_line_spent(b, now) {
            // The peer takes too long: drop this frame and, until its hold is free, the next
            // ones, rather than keep the segment waiting.
            self.producers[b.dst as usize].as_mut().expect("producer").count_drop_full();
            self.slow[b.dst as usize] = true;
            self.blocked = None;
        }
        self.blocked.is_none()
    }

    /// How long frames to others may wait behind `dst`'s full ring: [`HEAD_OF_LINE_BUDGET`]
    /// when another peer up had a unicast frame from us within [`OTHERS_ACTIVE`] (its next one
    /// may be waiting behind this frame), else the stall timeout: nobody is known to wait, and
    /// dropping frames only because a consumer was off its CPU for a few milliseconds would
    /// cost a stream far more than the wait (smoltcp's TCP backs off for seconds). A peer
    /// that starts to talk then waits at most that long, once.
    fn head_of_line_budget(&self, dst: u32, now: Instant) -> Duration {
        let me = self.claim.id;
        let others_active = (0..self.unicast_at.len() as u32).any(|p| {
            p != dst
                && p != me
                && self.links.is_up(p)
                && self.unicast_at[p as usize]
                    .is_some_and(|t| now.duration_since(t) < OTHERS_ACTIVE)
        });
        if others_active || !self.links.is_up(dst) {
            HEAD_OF_LINE_BUDGET
        } else {
            self.opts.stall_timeout
        }
    }

    /// Whether the frame `b` has waited out its head-of-line budget. Before saying so it reads
    /// the peer table again: a member that left is seen only at the next scan (at the
    /// heartbeat, when it could not ring us), and until then it may be what keeps the budget
    /// short. (This happens at most once per budget spent: the peer's next frames are dropped
    /// without waiting until its hold is free.)
    fn head_of_line_spent(&mut self, b: Blocked, now: Instant) -> bool {
        let waited = now.duration_since(b.since);
        if waited < self.head_of_line_budget(b.dst, now) {
            return false;
        }
        self.scan_links(now);
        // The scan may have taken `dst` down, and the blocked frame with it.
        self.blocked.is_some() && waited >= self.head_of_line_budget(b.dst, now)
    }

    /// Frees `dst`'s hold.
    fn release_hold(&mut self, dst: u32) {
        self.held[dst as usize] = None;
        self.slow[dst as usize] = false;
        if let Some(p) = self.producers[dst as usize].as_ref() {
            p.set_waiting(false);
        }
    }

    /// Sends the frame in the transmit buffer to `dst`, or keeps it in `dst`'s hold if the
    /// ring is full. Returns true if neither was possible (the hold is taken): the caller
    /// decides whether to wait or drop.
    fn hold_or_send(&mut self, dst: u32, len: usize, hdr: VnetHdr, now: Instant) -> bool {
        if self.held[dst as usize].is_some() {
            // Frames to one peer keep their order: nothing overtakes the kept one.
            return true;
        }
        match self.send_to(dst, len, &hdr) {
            Ok(()) => {
                self.stalled[dst as usize] = false;
                self.last_dst = Some(dst);
                false
            }
            Err(SendError::Mtu) => {
                self.producers[dst as usize].as_mut().expect("producer").count_drop_mtu();
                false
            }
            Err(SendError::Offload) => {
                self.drop_local(PeerCounter::DropOffload, len, now);
                false
            }
            Err(SendError::Full) => {
                // Publish what we have so the consumer can make room, keep the frame, and go on
                // reading frames for the others. The frame is kept where it is, checksum still
                // pending: its buffer becomes the hold, and the free hold buffer the transmit
                // buffer (the frame is read once, and copied once, into the ring, as it would
                // have been without the wait).
                let d = dst as usize;
                std::mem::swap(&mut self.buf, &mut self.held_buf[d]);
                self.held[d] = Some(Held { len, hdr, csum: self.pending_csum.take(), since: now });
                self.producers[d].as_ref().expect("producer").set_waiting(true);
                false
            }
        }
    }

    /// Counts a local frame dropped for `reason`; at debug level, describes it (rate limited).
    fn drop_local(&mut self, reason: PeerCounter, len: usize, now: Instant) {
        self.count(reason, 1);
        if log::log_enabled!(log::Level::Debug) {
            if let Some(s) = self.drop_log.allow(now) {
                let frame = &self.buf[self.hdr_room..(self.hdr_room + len).min(self.buf.len())];
                log::debug!(
                    "dropped ({reason:?}): {} ({s} similar suppressed)",
                    super::frame::describe(frame)
                );
            }
        }
    }

    /// Sends the frame in the transmit buffer (`len` bytes, offload header `hdr`), which came
    /// from the local interface, through the switch. Returns true if it is now held back
    /// because its ring is full.
    fn forward_local(&mut self, len: usize, hdr: VnetHdr, now: Instant) -> bool {
        self.count(PeerCounter::LocalRxFrames, 1);
        self.count(PeerCounter::LocalRxBytes, len as u64);
        if len < 14 {
            self.drop_local(PeerCounter::DropRunt, len, now);
            return false;
        }
        let frame = &self.buf[self.hdr_room..self.hdr_room + len];
        if hdr.is_plain() {
            if len > self.max_eth {
                self.drop_local(PeerCounter::DropOversize, len, now);
                return false;
            }
        } else if self.offloads.is_none_or(|f| !f.accepts(&hdr))
            || hdr.validate(frame).is_err()
            || (hdr.needs_csum() && !matches!(hdr.gso(), Ok(Gso::Udp)))
        {
            // Our interface never produces such a header: refuse it rather than guess.
            self.drop_local(PeerCounter::DropOffload, len, now);
            return false;
        }
        let mut addrs = [0u8; 12];
        addrs.copy_from_slice(&frame[..12]);
        match self.switch_addresses(addrs, now) {
            Forward::ToSelf => self.drop_local(PeerCounter::DropToSelf, len, now),
            Forward::Unicast(peer) => {
                if !self.links.is_up(peer) {
                    self.producers[peer as usize].as_mut().expect("producer").count_drop_down();
                    return false;
                }
                return self.unicast(peer, len, hdr, now);
            }
            Forward::Flood => self.flood(len, hdr, now),
        }
        false
    }

    /// Learns that the source MAC of a local frame lives here, and tells where its destination
    /// is; `addrs` are the frame's first 12 bytes (destination, source).
    fn switch_addresses(&mut self, addrs: [u8; 12], now: Instant) -> Forward {
        let (mut dst, mut src) = ([0u8; 6], [0u8; 6]);
        dst.copy_from_slice(&addrs[..6]);
        src.copy_from_slice(&addrs[6..]);
        self.switch.learn(src, self.claim.id, now);
        self.switch.forward(dst, now)
    }

    /// Sends to one peer; returns true if the frame now waits (the local interface is not
    /// read until it has gone, for a bounded time).
    fn unicast(&mut self, peer: u32, len: usize, hdr: VnetHdr, now: Instant) -> bool {
        let d = peer as usize;
        self.unicast_at[d] = Some(now);
        if self.stalled[d] {
            let prod = self.producers[d].as_mut().expect("producer");
            if !prod.tail_moved() {
                prod.count_drop_full();
                return false;
            }
            self.stalled[d] = false;
        }
        if !self.hold_or_send(peer, len, hdr, now) {
            return false;
        }
        if self.slow[d] {
            self.producers[d].as_mut().expect("producer").count_drop_full();
            return false;
        }
        self.blocked = Some(Blocked { len, hdr, dst: peer, since: now });
        true
    }

    /// Copies the frame to every peer whose link is up, each in the form it takes; a full ring
    /// drops its copy.
    fn flood(&mut self, len: usize, hdr: VnetHdr, now: Instant) {
        if self.links.up_count() == 0 && now.duration_since(self.last_scan) >= RESCAN_BEFORE_DROP {
            // Nobody up as far as we know: a peer may have joined since the last heartbeat
            // scan (right after start-up, typically). Look again before dropping the frame.
            self.scan_links(now);
        }
        let mut sent = 0;
        let mut unsendable = false;
        for peer in 0..self.producers.len() as u32 {
            if peer == self.claim.id || !self.links.is_up(peer) {
                continue;
            }
            match self.send_to(peer, len, &hdr) {
                Ok(()) => sent += 1,
                Err(SendError::Full) => {
                    self.producers[peer as usize].as_mut().expect("producer").count_drop_full()
                }
                Err(SendError::Mtu) => {
                    self.producers[peer as usize].as_mut().expect("producer").count_drop_mtu()
                }
                Err(SendError::Offload) => unsendable = true,
            }
        }
        if unsendable {
            self.drop_local(PeerCounter::DropOffload, len, now);
        } else if sent == 0 {
            self.drop_local(PeerCounter::DropNoPeer, len, now);
        } else {
            self.count(PeerCounter::Flooded, 1);
        }
    }

    /// Checks a received frame before it is delivered: its metadata (a virtio-net header, or
    /// none) must ask only for offloads we accept, and it (offloaded: its segments) must fit our
    /// MTU. Returns the header to hand to the interface (empty without offloads) and the source
    /// MAC. Everything is copied out of the ring once and checked here.
    fn inspect(
        cons: &Consumer,
        info: &FrameInfo,
        offloads: Option<Features>,
        max_eth: usize,
        pinned: Option<[u8; 6]>,
    ) -> Result<([u8; VNET_HDR_LEN], [u8; 6]), RxDrop> {
        let mut vnet = [0u8; VNET_HDR_LEN];
        let hdr = match info.meta_len {
            0 => VnetHdr::default(),
            VNET_HDR_LEN => {
                cons.copy_meta(&mut vnet);
                VnetHdr::decode(&vnet)
            }
            _ => return Err(RxDrop::Offload),
        };
        // A plain frame needs only its Ethernet header looked at; an offloaded one its L3/L4
        // headers too (for the size of its segments).
        let peek = if hdr.is_plain() { 14 } else { HEADER_PEEK };
        let mut head = [0u8; HEADER_PEEK];
        let seen = cons.copy_prefix(&mut head[..info.len.min(peek)]);
        if seen < 14 {
            return Err(RxDrop::Size);
        }
        if hdr.is_plain() {
            if info.len > max_eth {
                return Err(RxDrop::Size);
            }
            // A header that asks for nothing is passed on as zeros.
            vnet = [0u8; VNET_HDR_LEN];
        } else {
            // A partial checksum would make our kernel take the frame unverified: refused, so
            // that what a member scribbles over in the region is always caught, unless we
            // trust the members (our features then say TRUST_CSUM).
            if offloads.is_none_or(|f| !f.takes_from_ring(&hdr))
                || hdr.validate_len(info.len).is_err()
            {
                return Err(RxDrop::Offload);
            }
            match hdr.largest_segment_len_of(&head[..seen], info.len) {
                Some(l) if l <= max_eth => {}
                Some(_) => return Err(RxDrop::Size),
                None => return Err(RxDrop::Offload),
            }
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&head[6..12]);
        if pinned.is_some_and(|mac| mac != src) {
            return Err(RxDrop::Source);
        }
        Ok((vnet, src))
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
            let pinned = self.opts.pin_macs.then_some(self.peers[src as usize].mac);
            let Some(cons) = self.consumers[src as usize].as_mut() else { continue };
            let mut n = 0;
            while n < self.opts.batch {
                match cons.peek(epoch) {
                    Peek::Empty => break,
                    Peek::Stale => {
                        // Stale frames cost work too: they count against the batch, so a
                        // producer cannot stretch a pass by flooding them.
                        n += 1;
                    }
                    Peek::Corrupt(reason) => {
                        if let Some(s) = self.corrupt_log.allow(now) {
                            log::warn!("ring from peer {src} is inconsistent ({reason:?}); skipped what it published ({s} similar suppressed)");
                        }
                        break;
                    }
                    Peek::Frame(info) => {
                        n += 1;
                        let (vnet, src_mac) =
                            match Self::inspect(cons, &info, self.offloads, self.max_eth, pinned) {
                                Ok(v) => v,
                                Err(why) => {
                                    cons.drop_current(why);
                                    continue;
                                }
                            };
                        if src_mac[0] & 1 == 0 {
                            self.switch.learn(src_mac, src, now);
                        }
                        let hdr: &[u8] = if self.hdr_room > 0 { &vnet } else { &[] };
                        match self.tap.send_from_ring(cons, hdr, &mut self.iov) {
                            Ok(_) => {
                                cons.advance(true);
                                // A quarter of the ring consumed: return it now, and wake a
                                // producer waiting for room, so that it refills while we
                                // deliver the rest instead of waiting for our whole batch (the
                                // flag says it waits; it may have refilled and be waiting again
                                // since an earlier doorbell of this pass).
                                if cons.publish_tail_early() {
                                    ring_waiting_producer(cons, src, notifier, &mut self.doorbells);
                                }
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
            if n > 0 {
                ring_waiting_producer(cons, src, notifier, &mut self.doorbells);
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
                self.blocked = None;
                for d in 0..self.held.len() as u32 {
                    self.release_hold(d);
                }
            }
            SlotCheck::Intact | SlotCheck::Repaired | SlotCheck::Watching => {}
        }
        self.scan_links(now);
        // A read that failed with an error other than WouldBlock left no edge to wait for: try
        // again once per heartbeat.
        self.tap_readable = true;
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
        let Datapath {
            links, region, switch, stalled, blocked, held, slow, peers, consumers, ..
        } = self;
        let segment_mtu = region.geometry().mtu;
        // What the peer's interface takes, read once per incarnation (and logged with `what`
        // happened). The values are the peer's own business: a wrong MTU or feature set only
        // costs it frames.
        let mut read_iface = |id: u32, mac: [u8; 6], what: &str| {
            let snap = region.peer(id).snapshot();
            let mtu = snap.mtu.clamp(68, segment_mtu);
            let accepts = Features::from_bits_truncate(snap.features);
            log::info!(
                "peer {id} ({}) {what}: MTU {mtu}, offloads {accepts}",
                crate::mac::Mac(mac)
            );
            peers[id as usize] = PeerIface { accepts, max_eth: (mtu + ETH_OVERHEAD) as usize, mac };
        };
        links.tick(region, now, |ev| match ev {
            LinkEvent::Up { id, mac } => {
                read_iface(id, mac, "is up");
                switch.learn(mac, id, now);
                stalled[id as usize] = false;
            }
            LinkEvent::Restarted { id, mac } => {
                read_iface(id, mac, "restarted with a new incarnation");
                switch.forget_peer(id);
                switch.learn(mac, id, now);
                stalled[id as usize] = false;
            }
            LinkEvent::Down { id } => {
                log::info!("peer {id} is down");
                switch.forget_peer(id);
                if blocked.is_some_and(|b| b.dst == id) {
                    *blocked = None;
                }
                held[id as usize] = None;
                slow[id as usize] = false;
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
        self.blocked = None;
        self.pending_csum = None;
        self.held.iter_mut().for_each(|h| *h = None);
        self.slow.iter_mut().for_each(|s| *s = false);
        self.last_dst = None;
        self.stalled.iter_mut().for_each(|s| *s = false);
        self.unicast_at.iter_mut().for_each(|t| *t = None);
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
            if self.blocked.is_some_and(|b| b.dst == id) {
                self.blocked = None;
            }
            self.release_hold(id);
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
        self.retry_held(now)
    }

    /// The preallocated transmit buffer, `len` bytes long, for the local side to write one frame
    /// into; send it with [`Datapath::tx_commit`]. `None` while a frame is held back by
    /// back-pressure, or when `len` exceeds [`Datapath::max_frame_len`].
    pub fn tx_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.blocked.is_some() || len > self.max_eth {
            return None;
        }
        self.pending_csum = None;
        Some(&mut self.buf[self.hdr_room..self.hdr_room + len])
    }

    /// Sends the frame just written into [`Datapath::tx_buffer`]`(len)` through the switch,
    /// exactly as a frame read from a TAP. Returns true if it is held back because its ring is
    /// full: it goes out on a later [`Datapath::tx_ready`], and no new frame is taken until then.
    pub fn tx_commit(&mut self, len: usize, now: Instant) -> bool {
        if self.blocked.is_some() || len > self.max_eth {
            // No buffer was handed out for this frame: nothing to send.
            return self.blocked.is_some();
        }
        self.forward_local(len, VnetHdr::default(), now)
    }

    /// Counts a frame the local side had to discard because a frame was held back (its ring
    /// was full), against that ring's full-drop counter.
    pub fn count_held_back_drop(&mut self) {
        if let Some(b) = self.blocked {
            if let Some(prod) = self.producers[b.dst as usize].as_mut() {
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
            let pinned = self.opts.pin_macs.then_some(self.peers[src].mac);
            // Frames skipped on this ring (stale, or not deliverable): bounded per call like a
            // batch, so a producer cannot stretch one call by flooding them.
            let mut skipped = 0;
            loop {
                if skipped >= self.opts.batch {
                    break;
                }
                let Datapath {
                    consumers,
                    switch,
                    counters,
                    corrupt_log,
                    rx_taken,
                    opts,
                    offloads,
                    max_eth,
                    ..
                } = &mut *self;
                let Some(cons) = consumers[src].as_mut() else { break };
                match cons.peek(epoch) {
                    Peek::Empty => break,
                    Peek::Stale => skipped += 1,
                    Peek::Corrupt(reason) => {
                        if let Some(s) = corrupt_log.allow(now) {
                            log::warn!("ring from peer {src} is inconsistent ({reason:?}); skipped what it published ({s} similar suppressed)");
                        }
                        break;
                    }
                    Peek::Frame(info) => {
                        // A pull-style local side takes plain frames: anything else is dropped
                        // here, counted, like a frame too long for it.
                        let got = match Self::inspect(cons, &info, *offloads, *max_eth, pinned) {
                            Ok((_, src_mac)) => {
                                if src_mac[0] & 1 == 0 {
                                    switch.learn(src_mac, src as u32, now);
                                }
                                let got = deliver(cons);
                                cons.advance(got > 0);
                                got
                            }
                            Err(why) => {
                                cons.drop_current(why);
                                0
                            }
                        };
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
                        skipped += 1;
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
        if taken > 0 && ring_waiting_producer(cons, src as u32, notifier, &mut self.doorbells) {
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
