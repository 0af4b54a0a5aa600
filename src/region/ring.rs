//! One single-producer/single-consumer ring between an ordered pair of peers.
//!
//! Structure after the seed (shared-memory network claims 26-29 and 42-45): a control part with
//! the producer's head (one past the newest written segment), the consumer's tail (the oldest
//! unread segment) and a producer-waiting and a consumer-waiting flag, each side on its own cache
//! lines; then one descriptor per data segment (start, end, length, next, last-fragment flag,
//! plus the producer's epoch and the frame's total length); then the data segments. A frame
//! larger than one segment spans several consecutive ones; the first may begin with up to
//! [`MAX_META`] bytes of per-frame metadata (room for a virtio-net header).
//!
//! Single writer per field (DESIGN rule 2): the producer writes head, its waiting flag, the
//! descriptors and the data; the consumer writes tail and its waiting flag. Each side publishes
//! once per batch. The producer never trusts the tail and the consumer never trusts the head or a
//! descriptor: every value is copied out once, checked, then used (DESIGN rule 1). A broken or
//! hostile producer makes its consumer drop frames and count errors, nothing else.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};

use super::layout::{ring, DESC_FIRST, DESC_LAST, DESC_SIZE, MAX_META};
use super::raw::RawRegion;
use super::Region;
use crate::offload::{csum, PartialChecksum};

/// A segment descriptor as stored in the ring (seed claims 42, 44, 45).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentDesc {
    /// Offset of the first data byte within the segment.
    pub start: u32,
    /// Offset one past the last data byte within the segment.
    pub end: u32,
    /// Data bytes in this segment (`end - start`).
    pub len: u32,
    /// Index of the next segment of the circular buffer.
    pub next: u32,
    /// [`DESC_FIRST`] and/or [`DESC_LAST`].
    pub flags: u16,
    /// Metadata bytes at the start of the frame (first segment only).
    pub meta_len: u16,
    /// Low 32 bits of the producer's incarnation when it wrote the frame.
    pub epoch: u32,
    /// Total bytes of the frame including metadata (first segment only).
    pub frame_len: u32,
}

impl SegmentDesc {
    fn encode(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[0..4].copy_from_slice(&self.start.to_le_bytes());
        b[4..8].copy_from_slice(&self.end.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.next.to_le_bytes());
        b[16..18].copy_from_slice(&self.flags.to_le_bytes());
        b[18..20].copy_from_slice(&self.meta_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..28].copy_from_slice(&self.frame_len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; DESC_SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        SegmentDesc {
            start: u32_at(0),
            end: u32_at(4),
            len: u32_at(8),
            next: u32_at(12),
            flags: u16::from_le_bytes([b[16], b[17]]),
            meta_len: u16::from_le_bytes([b[18], b[19]]),
            epoch: u32_at(20),
            frame_len: u32_at(24),
        }
    }
}

/// Geometry of one ring, resolved to absolute offsets.
#[derive(Debug, Clone, Copy)]
struct RingGeom {
    base: usize,
    descs: usize,
    data: usize,
    slots: u32,
    slot_size: u32,
    /// Largest frame including metadata.
    max_frame: u32,
    /// Largest Ethernet frame without metadata (a full-MTU frame or an offloaded super-frame).
    max_eth: u32,
}

impl RingGeom {
    fn new(region: &Region, src: u32, dst: u32) -> Self {
        let l = region.layout();
        let base = l.ring(src, dst);
        let g = l.geometry;
        RingGeom {
            base,
            descs: base + l.ring_descs,
            data: base + l.ring_data,
            slots: g.ring_slots,
            slot_size: g.slot_size,
            max_frame: g.max_frame(),
            max_eth: g.max_ethernet_frame(),
        }
    }
    #[inline]
    fn mask(&self) -> u32 {
        self.slots - 1
    }
    /// Segments queued (by the producer) or consumed (by the consumer) since the side last
    /// published its index, after which it publishes early, before its batch ends: a quarter
    /// of the ring. A batch of large frames fills the whole ring, and publishing only at the
    /// end of it would make the two sides take turns instead of working at once.
    #[inline]
    fn early_publish(&self) -> u32 {
        self.slots / 4
    }
    #[inline]
    fn desc(&self, idx: u32) -> usize {
        self.descs + (idx & self.mask()) as usize * DESC_SIZE
    }
    #[inline]
    fn seg(&self, idx: u32) -> usize {
        self.data + (idx & self.mask()) as usize * self.slot_size as usize
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// Not enough free segments now; retry after the consumer frees some.
    #[error("ring full")]
    Full,
    /// Larger than the segment's MTU allows; never fits.
    #[error("frame of {0} bytes exceeds the segment's largest frame")]
    Oversize(usize),
    /// A frame needs at least one byte.
    #[error("empty frame")]
    Empty,
}

/// Writes frames into one ring. Owned by the ring's source peer.
pub struct Producer {
    raw: RawRegion,
    g: RingGeom,
    epoch: u32,
    /// Next segment to write (published or not).
    head: u32,
    /// Head as last published.
    published: u32,
    /// Tail as last read from the consumer (refreshed only when space seems short).
    tail_cache: u32,
    frames: u64,
    bytes: u64,
    drop_full: u64,
    drop_down: u64,
    drop_mtu: u64,
    dirty: bool,
    /// Scratch space for a frame's descriptors (allocated once).
    descs: Vec<u8>,
    /// A head was published (early, by `push`) that `publish` has not reported yet.
    unreported: bool,
}

impl Producer {
    /// Takes over the producer side of the ring `src -> dst`, stamping frames with `epoch`.
    ///
    /// The head is not rewound: frames an earlier life left behind stay where they are and are
    /// dropped by the consumer because their epoch is no longer the producer's.
    pub fn new(region: &Region, src: u32, dst: u32, epoch: u32) -> Self {
        let g = RingGeom::new(region, src, dst);
        let raw = region.raw().clone();
        let head = raw.u32_at(g.base + ring::HEAD).load(Ordering::Relaxed);
        // Acquire: pairs with the consumer's release of tail (see `Consumer::publish`).
        let tail = raw.u32_at(g.base + ring::TAIL).load(Ordering::Acquire);
        // Our own head from an earlier life, or a tail from a broken consumer: if they disagree
        // beyond the ring size, start from the tail so the arithmetic below stays sane.
        let head = if head.wrapping_sub(tail) > g.slots { tail } else { head };
        raw.u32_at(g.base + ring::HEAD).store(head, Ordering::Release);
        raw.u32_at(g.base + ring::PRODUCER_WAITING).store(0, Ordering::Relaxed);
        for off in [
            ring::TX_FRAMES,
            ring::TX_BYTES,
            ring::TX_DROP_FULL,
            ring::TX_DROP_DOWN,
            ring::TX_DROP_MTU,
        ] {
            raw.u64_at(g.base + off).store(0, Ordering::Relaxed);
        }
        Producer {
            raw,
            g,
            epoch,
            head,
            published: head,
            tail_cache: tail,
            frames: 0,
            bytes: 0,
            drop_full: 0,
            drop_down: 0,
            drop_mtu: 0,
            dirty: false,
            descs: Vec::with_capacity(g.max_frame.div_ceil(g.slot_size) as usize * DESC_SIZE),
            unreported: false,
        }
    }

    /// Segments a frame of `len` bytes (with metadata) needs.
    #[inline]
    pub fn segments_for(&self, len: usize) -> u32 {
        (len.max(1) as u32).div_ceil(self.g.slot_size)
    }

    /// Whether `need` free segments (see [`Producer::segments_for`]) are available now, e.g.
    /// for all the frames a super-frame is segmented into. Re-reads the consumer's tail only if
    /// they do not fit in the cached view (so its cache line is not touched on every frame).
    #[inline]
    pub fn has_room(&mut self, need: u32) -> bool {
        let used = self.head.wrapping_sub(self.tail_cache);
        if self.g.slots - used.min(self.g.slots) >= need {
            return true;
        }
        // Acquire: pairs with the consumer's release store of tail, so the segments it freed
        // are no longer being read when we overwrite them.
        let tail = self.raw.u32_at(self.g.base + ring::TAIL).load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > self.g.slots {
            // A tail ahead of our head: the consumer is broken. Treat the ring as full; that
            // only cuts the consumer's own link.
            return false;
        }
        self.tail_cache = tail;
        self.g.slots - used >= need
    }

    /// Queues one frame (`meta` then `frame`) without publishing it; see [`Producer::publish`].
    #[inline]
    pub fn push(&mut self, meta: &[u8], frame: &[u8]) -> Result<(), PushError> {
        self.push_parts(meta, &[frame])
    }

    /// Queues one frame gathered from `parts` (their concatenation is the Ethernet frame),
    /// preceded by `meta`, without publishing it. Lets a caller send a frame with a patched
    /// field, or rebuilt headers before a payload, without assembling it in a buffer first.
    pub fn push_parts(&mut self, meta: &[u8], parts: &[&[u8]]) -> Result<(), PushError> {
        let frame_len: usize = parts.iter().map(|p| p.len()).sum();
        if frame_len == 0 {
            return Err(PushError::Empty);
        }
        let total = meta.len() + frame_len;
        let need = self.room_for_frame(meta.len(), frame_len)?;
        // The frame's segments are consecutive in the data area (one run, or two when the
        // ring wraps), and each is filled before the next: the bytes go in with one copy per
        // run and slice, and the descriptors with one copy per run.
        let runs = self.runs(need, total);
        let mut pos = 0;
        for piece in std::iter::once(meta).chain(parts.iter().copied()) {
            pos += self.copy_into(&runs, pos, piece);
        }
        self.queue(need, meta.len(), total);
        Ok(())
    }

    /// Queues one frame like [`Producer::push`] whose checksum is completed on the way in:
    /// `frame[csum.start..csum.end]` is summed as it is copied (one pass over the bytes, not a
    /// sum and then a copy), and the field at `csum.field`, which lies in that range and holds
    /// the pseudo-header sum, gets the result in the ring (see [`PartialChecksum::value`]).
    /// Returns the two bytes stored there, so the caller can complete its own copy of the frame.
    ///
    /// The sum covers the caller's private bytes as they were copied, never what is in shared
    /// memory afterwards: a scribble on the ring stays a checksum error for the receiver.
    pub fn push_summed(
        &mut self,
        meta: &[u8],
        frame: &[u8],
        csum: &PartialChecksum,
    ) -> Result<[u8; 2], PushError> {
        let PartialChecksum { start, end, field, .. } = *csum;
        assert!(
            start <= field && field + 2 <= end && end <= frame.len(),
            "checksum field {field} outside the summed range {start}..{end} of a {}-byte frame",
            frame.len()
        );
        // No empty-frame case: the assertion puts a two-byte field inside the frame.
        let total = meta.len() + frame.len();
        let need = self.room_for_frame(meta.len(), frame.len())?;
        let runs = self.runs(need, total);
        let mut pos = self.copy_into(&runs, 0, meta);
        pos += self.copy_into(&runs, pos, &frame[..start]);
        let (n, partial) = self.copy_into_summed(&runs, pos, &frame[start..end]);
        pos += n;
        self.copy_into(&runs, pos, &frame[end..]);
        let bytes = csum.value(partial);
        self.copy_into(&runs, meta.len() + field, &bytes);
        self.queue(need, meta.len(), total);
        Ok(bytes)
    }

    /// The byte ranges (absolute region offsets, in order) of the first `len` bytes of the
    /// `need` segments at head: one run, or two when the ring wraps.
    fn runs(&self, need: u32, len: usize) -> [(usize, usize); 2] {
        let idx0 = self.head & self.g.mask();
        let first_run = need.min(self.g.slots - idx0);
        let first = (first_run as usize * self.g.slot_size as usize).min(len);
        [(self.g.seg(idx0), first), (self.g.seg(0), len - first)]
    }

    /// Copies `bytes` into `runs` (see [`Producer::runs`]) at stream offset `at`; returns how
    /// many fitted.
    fn copy_into(&self, runs: &[(usize, usize); 2], at: usize, bytes: &[u8]) -> usize {
        Self::walk(runs, at, bytes, |off, piece| {
            self.raw.copy_in(off, piece).expect("segments inside region")
        })
    }

    /// [`Producer::copy_into`] that also returns the internet-checksum partial sum of the bytes
    /// that fitted (as `csum::add(0, ..)` of them), taken as they are copied.
    fn copy_into_summed(
        &self,
        runs: &[(usize, usize); 2],
        at: usize,
        bytes: &[u8],
    ) -> (usize, u64) {
        let mut sum = 0;
        let mut done = 0;
        let n = Self::walk(runs, at, bytes, |off, piece| {
            let s = self.raw.copy_in_summed(off, piece).expect("segments inside region");
            // A piece after an odd-length one starts in the middle of a 16-bit word.
            sum = csum::combine(sum, if done % 2 == 1 { csum::at_odd_offset(s) } else { s });
            done += piece.len();
        });
        (n, sum)
    }

    /// Hands `copy` the region offset and the bytes of each part of `bytes` that lands in
    /// `runs` from stream offset `at` on; returns how many bytes fitted.
    #[inline(always)]
    fn walk(
        runs: &[(usize, usize); 2],
        at: usize,
        bytes: &[u8],
        mut copy: impl FnMut(usize, &[u8]),
    ) -> usize {
        let (mut done, mut skip) = (0, at);
        for &(off, len) in runs {
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(bytes.len() - done);
            copy(off + skip, &bytes[done..done + n]);
            done += n;
            skip = 0;
        }
        done
    }

    /// Checks that a frame of `frame_len` bytes with `meta_len` bytes of metadata may travel and
    /// fits now; returns the segments it needs.
    fn room_for_frame(&mut self, meta_len: usize, frame_len: usize) -> Result<u32, PushError> {
        let total = meta_len + frame_len;
        if meta_len > MAX_META as usize
            || frame_len > self.g.max_eth as usize
            || total > self.g.max_frame as usize
        {
            return Err(PushError::Oversize(frame_len));
        }
        let need = self.segments_for(total);
        if !self.has_room(need) {
            return Err(PushError::Full);
        }
        Ok(need)
    }

    /// Writes the descriptors of a frame whose `total` bytes (`meta_len` of metadata first) are
    /// already in the `need` segments at head, and moves head past them (publishing early when
    /// a quarter of the ring is unpublished).
    fn queue(&mut self, need: u32, meta_len: usize, total: usize) {
        let slot = self.g.slot_size as usize;
        let idx0 = self.head & self.g.mask();
        let first_run = need.min(self.g.slots - idx0);
        self.descs.clear();
        for k in 0..need {
            let idx = self.head.wrapping_add(k);
            let chunk = (total - k as usize * slot).min(slot) as u32;
            let mut flags = 0;
            if k == 0 {
                flags |= DESC_FIRST;
            }
            if k + 1 == need {
                flags |= DESC_LAST;
            }
            let d = SegmentDesc {
                start: 0,
                end: chunk,
                len: chunk,
                next: idx.wrapping_add(1) & self.g.mask(),
                flags,
                meta_len: if k == 0 { meta_len as u16 } else { 0 },
                epoch: self.epoch,
                frame_len: if k == 0 { total as u32 } else { 0 },
            };
            self.descs.extend_from_slice(&d.encode());
        }
        let (a, b) = self.descs.split_at(first_run as usize * DESC_SIZE);
        self.raw.copy_in(self.g.desc(idx0), a).expect("descriptors inside region");
        if !b.is_empty() {
            self.raw.copy_in(self.g.desc(0), b).expect("descriptors inside region");
        }
        self.head = self.head.wrapping_add(need);
        self.frames += 1;
        self.bytes += (total - meta_len) as u64;
        self.dirty = true;
        if self.head.wrapping_sub(self.published) >= self.g.early_publish() {
            self.publish_head();
        }
    }

    /// Reserves room at head for one frame of up to `max_len` bytes (metadata included), so
    /// that a reader can put it straight into the ring (no copy through a buffer); nothing is
    /// visible to the consumer until [`Producer::commit_reserved`]. Returns the byte ranges
    /// (absolute region offsets, in order: one run, or two when the ring wraps), or `None` if
    /// the ring has no room for `max_len` bytes now. A reservation lasts until the next call
    /// that writes to the ring.
    pub fn reserve(&mut self, max_len: usize) -> Option<[(usize, usize); 2]> {
        if max_len == 0 || max_len > self.g.max_frame as usize {
            return None;
        }
        let need = self.segments_for(max_len);
        if !self.has_room(need) {
            return None;
        }
        Some(self.runs(need, max_len))
    }

    /// Queues the frame written into the space [`Producer::reserve`] returned: `meta_len` bytes
    /// of metadata, then the Ethernet frame, `total` bytes in all (at most the reserved length).
    pub fn commit_reserved(&mut self, meta_len: usize, total: usize) -> Result<(), PushError> {
        let frame_len = total.saturating_sub(meta_len);
        if frame_len == 0 {
            return Err(PushError::Empty);
        }
        let need = self.room_for_frame(meta_len, frame_len)?;
        self.queue(need, meta_len, total);
        Ok(())
    }

    /// Copies bytes `from..from + buf.len()` of the reserved space (see
    /// [`Producer::reserve`]) into `buf`: for a frame that was read into the ring but must go
    /// elsewhere. The bytes are in shared memory: callers parse the copy, never the ring.
    pub fn copy_reserved(&self, ranges: &[(usize, usize); 2], from: usize, buf: &mut [u8]) {
        let mut done = 0;
        let mut skip = from;
        for &(off, len) in ranges {
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(buf.len() - done);
            self.raw.copy_out(off + skip, &mut buf[done..done + n]).expect("reserved range");
            done += n;
            skip = 0;
            if done == buf.len() {
                break;
            }
        }
    }

    /// Reads one frame from `fd` (a TAP: one `readv` returns one frame) straight into the
    /// reserved space `ranges`; returns its length.
    pub fn read_reserved_from(
        &self,
        fd: RawFd,
        ranges: &[(usize, usize); 2],
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        let n = if ranges[1].1 == 0 { 1 } else { 2 };
        self.raw.readv_from(fd, &ranges[..n], iov).unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// Writes `bytes` into the reserved space (for fakes and tests: what a `readv` would do).
    pub fn fill_reserved(&self, ranges: &[(usize, usize); 2], bytes: &[u8]) -> usize {
        self.copy_into(ranges, 0, bytes)
    }

    /// Segments in the ring.
    pub fn slots(&self) -> u32 {
        self.g.slots
    }

    /// Whether a frame of `len` bytes (with metadata) would fit now.
    pub fn can_push(&mut self, len: usize) -> bool {
        let need = self.segments_for(len);
        self.has_room(need)
    }

    /// Publishes every queued frame and the counters. Returns whether anything new was published.
    pub fn publish(&mut self) -> bool {
        if !self.dirty {
            return false;
        }
        self.dirty = false;
        let base = self.g.base;
        self.raw.u64_at(base + ring::TX_FRAMES).store(self.frames, Ordering::Relaxed);
        self.raw.u64_at(base + ring::TX_BYTES).store(self.bytes, Ordering::Relaxed);
        self.raw.u64_at(base + ring::TX_DROP_FULL).store(self.drop_full, Ordering::Relaxed);
        self.raw.u64_at(base + ring::TX_DROP_DOWN).store(self.drop_down, Ordering::Relaxed);
        self.raw.u64_at(base + ring::TX_DROP_MTU).store(self.drop_mtu, Ordering::Relaxed);
        self.publish_head();
        // Report heads published early (by `push`) too, so the caller still checks whether the
        // consumer sleeps.
        std::mem::take(&mut self.unreported)
    }

    /// Publishes the head only (not the counters).
    #[inline]
    fn publish_head(&mut self) {
        if self.head != self.published {
            // Release: publishes the descriptors and data written by `push`; pairs with the
            // acquire load of head in `Consumer::refresh`.
            self.raw.u32_at(self.g.base + ring::HEAD).store(self.head, Ordering::Release);
            self.published = self.head;
            self.unreported = true;
        }
    }

    /// Publishes, then tells whether the consumer asked to be woken (its waiting flag is set):
    /// `None` if nothing new was published, else `Some(waiting)`.
    ///
    /// The SeqCst fence orders our head store before the flag load; the consumer orders its
    /// flag store before its head load the same way (`Consumer::prepare_to_sleep`), so at least
    /// one of us sees the other: no wake-up is lost (DESIGN rule 4).
    pub fn publish_and_check_waiting(&mut self) -> Option<bool> {
        if !self.publish() {
            return None;
        }
        Some(self.consumer_waiting())
    }

    /// After a head published early (by `push`, a quarter of the ring at a time): whether the
    /// consumer asked to be woken, so that it can start on those frames while we queue more.
    /// The early publication is then reported (`publish` reports only what follows). Same
    /// fence as [`Producer::publish_and_check_waiting`].
    pub fn take_early_and_check_waiting(&mut self) -> bool {
        std::mem::take(&mut self.unreported) && self.consumer_waiting()
    }

    /// Whether the consumer's waiting flag is set, read after the head just published (the
    /// fence of [`Producer::publish_and_check_waiting`]).
    fn consumer_waiting(&self) -> bool {
        fence(Ordering::SeqCst);
        self.raw.u32_at(self.g.base + ring::CONSUMER_WAITING).load(Ordering::Relaxed) != 0
    }

    /// Counts a frame dropped because the ring was full.
    pub fn count_drop_full(&mut self) {
        self.drop_full += 1;
        self.dirty = true;
    }

    /// Counts a frame dropped because the destination's link was down.
    pub fn count_drop_down(&mut self) {
        self.drop_down += 1;
        self.dirty = true;
    }

    /// Counts a frame not sent because it, or its segments, exceed the destination's MTU (or it
    /// could not be segmented for the destination).
    pub fn count_drop_mtu(&mut self) {
        self.drop_mtu += 1;
        self.dirty = true;
    }

    /// Sets or clears the producer-waiting flag (the producer waits for space).
    pub fn set_waiting(&self, waiting: bool) {
        self.raw
            .u32_at(self.g.base + ring::PRODUCER_WAITING)
            .store(waiting as u32, Ordering::SeqCst);
    }

    /// Segments queued but not yet consumed, as this producer last saw them.
    pub fn in_flight(&self) -> u32 {
        self.head.wrapping_sub(self.tail_cache).min(self.g.slots)
    }

    /// Whether the consumer has moved its tail since we last looked (it is making progress).
    pub fn tail_moved(&mut self) -> bool {
        let tail = self.raw.u32_at(self.g.base + ring::TAIL).load(Ordering::Acquire);
        if tail != self.tail_cache && self.head.wrapping_sub(tail) <= self.g.slots {
            self.tail_cache = tail;
            return true;
        }
        false
    }

    /// Whether nothing is queued and unconsumed.
    pub fn is_drained(&mut self) -> bool {
        self.tail_moved();
        self.head == self.tail_cache
    }
}

/// What [`Consumer::peek`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// Nothing published.
    Empty,
    /// A valid frame; its ranges are in [`Consumer::frame_ranges`]. Call
    /// [`Consumer::advance`] when done with it.
    Frame(FrameInfo),
    /// A frame from an earlier incarnation of the producer was skipped.
    Stale,
    /// The published part of the ring was inconsistent and was skipped.
    Corrupt(CorruptReason),
}

/// A frame ready to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Ethernet frame bytes (without metadata).
    pub len: usize,
    /// Metadata bytes before the frame.
    pub meta_len: usize,
    /// Segments the frame occupies.
    pub segments: u32,
}

/// What was wrong with a ring the consumer gave up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptReason {
    /// Head and tail are further apart than the ring is long.
    Indices,
    /// A descriptor's start, end or length does not fit its segment.
    Extent,
    /// A descriptor's next index is not the following segment.
    Next,
    /// A frame does not start with a first-segment descriptor, or one appears mid-frame.
    Framing,
    /// A frame's last segment is not within the published part.
    Truncated,
    /// A frame's total length, metadata length or segment count is out of range.
    Length,
}

/// Reads frames from one ring. Owned by the ring's destination peer.
pub struct Consumer {
    raw: RawRegion,
    g: RingGeom,
    /// Next segment to read (published or not).
    tail: u32,
    /// Tail as last published.
    published: u32,
    /// Head as last read from the producer.
    head_cache: u32,
    /// Byte ranges (absolute offsets) of the current frame, metadata excluded.
    ranges: Vec<(usize, usize)>,
    /// Byte range of the current frame's metadata.
    meta: (usize, usize),
    current: Option<FrameInfo>,
    /// Scratch space for a frame's descriptors (allocated once).
    desc_buf: Vec<u8>,
    frames: u64,
    bytes: u64,
    stale: u64,
    corrupt: u64,
    drop_deliver: u64,
    drop_size: u64,
    drop_offload: u64,
    drop_source: u64,
    dirty: bool,
}

/// Why a consumer discarded a valid frame instead of delivering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxDrop {
    /// The local interface refused it.
    Deliver,
    /// Shorter than an Ethernet header, or it (offloaded: its segments) longer than the
    /// consumer's MTU allows.
    Size,
    /// Its metadata was invalid or asks for an offload the consumer does not accept.
    Offload,
    /// Its source MAC is not the one its producer joined with (`--pin-macs`).
    Source,
}

impl Consumer {
    /// Takes over the consumer side of the ring `src -> dst`, discarding everything queued for
    /// an earlier life of the destination.
    pub fn new(region: &Region, src: u32, dst: u32) -> Self {
        let g = RingGeom::new(region, src, dst);
        let raw = region.raw().clone();
        // Acquire: pairs with the producer's release of head.
        let head = raw.u32_at(g.base + ring::HEAD).load(Ordering::Acquire);
        // Release: hands every segment up to head back to the producer.
        raw.u32_at(g.base + ring::TAIL).store(head, Ordering::Release);
        raw.u32_at(g.base + ring::CONSUMER_WAITING).store(0, Ordering::Relaxed);
        for off in [
            ring::RX_FRAMES,
            ring::RX_BYTES,
            ring::RX_DROP_STALE,
            ring::RX_CORRUPT,
            ring::RX_DROP_DELIVER,
            ring::RX_DROP_SIZE,
            ring::RX_DROP_OFFLOAD,
            ring::RX_DROP_SOURCE,
        ] {
            raw.u64_at(g.base + off).store(0, Ordering::Relaxed);
        }
        let max_segs = g.max_frame.div_ceil(g.slot_size) as usize;
        Consumer {
            raw,
            g,
            tail: head,
            published: head,
            head_cache: head,
            ranges: Vec::with_capacity(max_segs),
            meta: (0, 0),
            current: None,
            desc_buf: Vec::with_capacity(max_segs * DESC_SIZE),
            frames: 0,
            bytes: 0,
            stale: 0,
            corrupt: 0,
            drop_deliver: 0,
            drop_size: 0,
            drop_offload: 0,
            drop_source: 0,
            dirty: false,
        }
    }

    /// Re-reads the producer's head. Returns the number of published, unread segments, or
    /// `None` (after resynchronising) if head is impossible.
    #[inline]
    fn refresh(&mut self) -> Option<u32> {
        // Acquire: pairs with the release store of head in `Producer::publish`; the descriptors
        // and data of every segment before head are visible after this load.
        let head = self.raw.u32_at(self.g.base + ring::HEAD).load(Ordering::Acquire);
        let avail = head.wrapping_sub(self.tail);
        if avail > self.g.slots {
            self.resync(head);
            return None;
        }
        self.head_cache = head;
        Some(avail)
    }

    fn resync(&mut self, head: u32) {
        self.tail = head;
        self.head_cache = head;
        self.current = None;
        self.corrupt += 1;
        self.dirty = true;
    }

    /// Copies `count` descriptors starting at index `idx` into `desc_buf`.
    fn load_descs(&mut self, idx: u32, count: u32) {
        self.desc_buf.clear();
        if count == 0 {
            return;
        }
        let start = idx & self.g.mask();
        let first = count.min(self.g.slots - start) as usize;
        self.desc_buf.resize(count as usize * DESC_SIZE, 0);
        let (a, b) = self.desc_buf.split_at_mut(first * DESC_SIZE);
        self.raw.copy_out(self.g.desc(start), a).expect("descriptors inside region");
        if !b.is_empty() {
            self.raw.copy_out(self.g.desc(0), b).expect("descriptors inside region");
        }
    }

    fn read_desc(&self, idx: u32) -> SegmentDesc {
        let mut b = [0u8; DESC_SIZE];
        self.raw.copy_out(self.g.desc(idx), &mut b).expect("descriptor inside region");
        SegmentDesc::decode(&b)
    }

    /// Whether anything is published and unread (one acquire load; no side effects beyond
    /// resynchronising a broken ring).
    pub fn has_data(&mut self) -> bool {
        self.current.is_some() || matches!(self.refresh(), Some(n) if n > 0)
    }

    /// Looks at the next frame. `epoch` is the producer's current incarnation (low 32 bits):
    /// frames stamped with another one are skipped as [`Peek::Stale`].
    pub fn peek(&mut self, epoch: u32) -> Peek {
        if let Some(info) = self.current {
            return Peek::Frame(info);
        }
        let mut avail = self.head_cache.wrapping_sub(self.tail);
        if avail == 0 {
            match self.refresh() {
                None => return Peek::Corrupt(CorruptReason::Indices),
                Some(0) => return Peek::Empty,
                Some(n) => avail = n,
            }
        }
        match self.parse(avail) {
            Ok((info, frame_epoch)) => {
                if frame_epoch != epoch {
                    self.tail = self.tail.wrapping_add(info.segments);
                    self.stale += 1;
                    self.dirty = true;
                    return Peek::Stale;
                }
                self.current = Some(info);
                Peek::Frame(info)
            }
            Err(reason) => {
                let head = self.head_cache;
                self.resync(head);
                Peek::Corrupt(reason)
            }
        }
    }

    /// Validates the frame at tail. Every descriptor field is copied out once and checked before
    /// any offset derived from it is used.
    fn parse(&mut self, avail: u32) -> Result<(FrameInfo, u32), CorruptReason> {
        self.ranges.clear();
        let slot = self.g.slot_size;
        let max_segs = self.g.max_frame.div_ceil(slot);
        let first = self.read_desc(self.tail);
        if first.flags & DESC_FIRST == 0 {
            return Err(CorruptReason::Framing);
        }
        let frame_len = first.frame_len;
        let meta_len = first.meta_len as u32;
        if frame_len > self.g.max_frame
            || meta_len > MAX_META
            || frame_len <= meta_len
            || frame_len - meta_len > self.g.max_eth
        {
            return Err(CorruptReason::Length);
        }
        // A well-formed producer fills every segment but the last, so the frame should span
        // this many: read their descriptors in one go (two when the ring wraps). Each is still
        // checked on its own; a producer that segments differently only costs single reads.
        let expect = frame_len.div_ceil(slot).clamp(1, max_segs).min(avail);
        self.load_descs(self.tail.wrapping_add(1), expect - 1);
        let mut total = 0u32;
        let mut k = 0u32;
        let mut d = first;
        loop {
            let idx = self.tail.wrapping_add(k);
            if k > 0 {
                d = match self.desc_buf.get((k as usize - 1) * DESC_SIZE..k as usize * DESC_SIZE) {
                    Some(b) => SegmentDesc::decode(b.try_into().expect("DESC_SIZE bytes")),
                    None => self.read_desc(idx),
                };
                if d.flags & DESC_FIRST != 0 || d.epoch != first.epoch {
                    return Err(CorruptReason::Framing);
                }
            }
            if d.start > d.end || d.end > slot || d.len != d.end - d.start {
                return Err(CorruptReason::Extent);
            }
            if d.next != idx.wrapping_add(1) & self.g.mask() {
                return Err(CorruptReason::Next);
            }
            total = total.checked_add(d.len).ok_or(CorruptReason::Length)?;
            if total > frame_len {
                return Err(CorruptReason::Length);
            }
            let seg = self.g.seg(idx) + d.start as usize;
            let mut off = 0u32;
            if k == 0 {
                if meta_len > d.len {
                    return Err(CorruptReason::Length);
                }
                self.meta = (seg, meta_len as usize);
                off = meta_len;
            }
            if d.len > off {
                let (at, len) = (seg + off as usize, (d.len - off) as usize);
                // Consecutive segments are one range: one copy (one iovec) instead of many.
                match self.ranges.last_mut() {
                    Some(last) if last.0 + last.1 == at => last.1 += len,
                    _ => self.ranges.push((at, len)),
                }
            }
            k += 1;
            if d.flags & DESC_LAST != 0 {
                break;
            }
            if k >= max_segs {
                return Err(CorruptReason::Length);
            }
            if k >= avail {
                return Err(CorruptReason::Truncated);
            }
        }
        if total != frame_len {
            return Err(CorruptReason::Length);
        }
        let info = FrameInfo {
            len: (frame_len - meta_len) as usize,
            meta_len: meta_len as usize,
            segments: k,
        };
        Ok((info, first.epoch))
    }

    /// Byte ranges (absolute region offsets, length) of the frame last returned by `peek`.
    pub fn frame_ranges(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// Copies the current frame into `buf` and returns its length (0 if there is no current
    /// frame or it does not fit).
    pub fn copy_frame(&self, buf: &mut [u8]) -> usize {
        let Some(info) = self.current else { return 0 };
        if info.len > buf.len() {
            return 0;
        }
        let mut at = 0;
        for &(off, len) in &self.ranges {
            self.raw.copy_out(off, &mut buf[at..at + len]).expect("checked by parse");
            at += len;
        }
        at
    }

    /// Copies up to `buf.len()` leading bytes of the current frame (e.g. its Ethernet header)
    /// into `buf`; returns how many were copied.
    pub fn copy_prefix(&self, buf: &mut [u8]) -> usize {
        if self.current.is_none() {
            return 0;
        }
        let mut at = 0;
        for &(off, len) in &self.ranges {
            let n = len.min(buf.len() - at);
            self.raw.copy_out(off, &mut buf[at..at + n]).expect("checked by parse");
            at += n;
            if at == buf.len() {
                break;
            }
        }
        at
    }

    /// Copies the current frame's metadata into `buf`; returns its length.
    pub fn copy_meta(&self, buf: &mut [u8]) -> usize {
        let (off, len) = self.meta;
        if self.current.is_none() || len > buf.len() {
            return 0;
        }
        self.raw.copy_out(off, &mut buf[..len]).expect("checked by parse");
        len
    }

    /// Writes `prefix` (e.g. a virtio-net header, from local memory) and then the current frame
    /// to `fd` with one `writev`, straight from the segments.
    pub fn write_frame_to(
        &self,
        fd: RawFd,
        prefix: &[u8],
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        self.raw
            .writev_to(fd, prefix, &self.ranges, iov)
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// Finishes with the current frame: `delivered` says whether it reached its destination
    /// (counted as a delivery drop if not). The segments return to the producer on `publish`.
    pub fn advance(&mut self, delivered: bool) {
        if delivered {
            if let Some(info) = self.current.take() {
                self.tail = self.tail.wrapping_add(info.segments);
                self.frames += 1;
                self.bytes += info.len as u64;
                self.dirty = true;
            }
        } else {
            self.drop_current(RxDrop::Deliver);
        }
    }

    /// Discards the current frame, counting it under `why`.
    pub fn drop_current(&mut self, why: RxDrop) {
        if let Some(info) = self.current.take() {
            self.tail = self.tail.wrapping_add(info.segments);
            match why {
                RxDrop::Deliver => self.drop_deliver += 1,
                RxDrop::Size => self.drop_size += 1,
                RxDrop::Offload => self.drop_offload += 1,
                RxDrop::Source => self.drop_source += 1,
            }
            self.dirty = true;
        }
    }

    /// Returns consumed segments to the producer and publishes the counters.
    pub fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let base = self.g.base;
        self.raw.u64_at(base + ring::RX_FRAMES).store(self.frames, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_BYTES).store(self.bytes, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_DROP_STALE).store(self.stale, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_CORRUPT).store(self.corrupt, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_DROP_DELIVER).store(self.drop_deliver, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_DROP_SIZE).store(self.drop_size, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_DROP_OFFLOAD).store(self.drop_offload, Ordering::Relaxed);
        self.raw.u64_at(base + ring::RX_DROP_SOURCE).store(self.drop_source, Ordering::Relaxed);
        self.publish_tail();
    }

    /// Publishes the tail only (not the counters).
    #[inline]
    fn publish_tail(&mut self) {
        if self.tail != self.published {
            // Release: our reads of the consumed segments happen before the producer may reuse
            // them; pairs with the acquire load of tail in `Producer::has_room`.
            self.raw.u32_at(self.g.base + ring::TAIL).store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// Returns consumed segments to the producer early, without the counters, once a quarter of
    /// the ring has been consumed since the last publication. Returns true if it published.
    pub fn publish_tail_early(&mut self) -> bool {
        if self.tail.wrapping_sub(self.published) < self.g.early_publish() {
            return false;
        }
        self.publish_tail();
        true
    }

    /// Whether the producer is waiting for space (it asked to be told when we free some).
    pub fn producer_waiting(&self) -> bool {
        self.raw.u32_at(self.g.base + ring::PRODUCER_WAITING).load(Ordering::Relaxed) != 0
    }

    /// Sets the consumer-waiting flag, then re-checks the ring. Returns true if data arrived in
    /// the meantime (the caller must not sleep; the flag is cleared again).
    ///
    /// The SeqCst fence orders the flag store before the head load; it pairs with the fence in
    /// `Producer::publish_and_check_waiting` (DESIGN rule 4: no lost wake-up).
    pub fn prepare_to_sleep(&mut self) -> bool {
        let flag = self.g.base + ring::CONSUMER_WAITING;
        self.raw.u32_at(flag).store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.has_data() {
            self.raw.u32_at(flag).store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Clears the consumer-waiting flag (we are awake and busy: do not ring us).
    pub fn wake(&self) {
        self.raw.u32_at(self.g.base + ring::CONSUMER_WAITING).store(0, Ordering::Relaxed);
    }

    /// Segments published and not yet consumed.
    pub fn backlog(&self) -> u32 {
        self.head_cache.wrapping_sub(self.tail).min(self.g.slots)
    }
}

/// A read-only look at a ring's control part, for `status`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct RingSnapshot {
    /// Producer's head.
    pub head: u32,
    /// Consumer's tail.
    pub tail: u32,
    /// Segments in use (`None` if head and tail are inconsistent).
    pub fill: Option<u32>,
    /// Segments per ring.
    pub slots: u32,
    /// Producer waiting for space.
    pub producer_waiting: bool,
    /// Consumer waiting for data.
    pub consumer_waiting: bool,
    /// Frames published.
    pub tx_frames: u64,
    /// Bytes published.
    pub tx_bytes: u64,
    /// Frames dropped: ring full.
    pub tx_drop_full: u64,
    /// Frames dropped: destination down.
    pub tx_drop_down: u64,
    /// Frames not sent: larger than the destination's MTU.
    pub tx_drop_mtu: u64,
    /// Frames delivered.
    pub rx_frames: u64,
    /// Bytes delivered.
    pub rx_bytes: u64,
    /// Frames dropped: earlier incarnation of the producer.
    pub rx_drop_stale: u64,
    /// Times the ring was found inconsistent.
    pub rx_corrupt: u64,
    /// Frames the consumer could not deliver.
    pub rx_drop_deliver: u64,
    /// Frames dropped by the consumer: shorter than an Ethernet header or longer than its MTU.
    pub rx_drop_size: u64,
    /// Frames dropped by the consumer: offload metadata it does not accept.
    pub rx_drop_offload: u64,
    /// Frames dropped by the consumer: a source MAC other than the producer's (`--pin-macs`).
    pub rx_drop_source: u64,
}

impl RingSnapshot {
    /// Reads the control part of ring `src -> dst`.
    pub fn read(region: &Region, src: u32, dst: u32) -> Self {
        let g = RingGeom::new(region, src, dst);
        let raw = region.raw();
        let u32v = |o: usize| raw.u32_at(g.base + o).load(Ordering::Acquire);
        let u64v = |o: usize| raw.u64_at(g.base + o).load(Ordering::Relaxed);
        let head = u32v(ring::HEAD);
        let tail = u32v(ring::TAIL);
        let fill = head.wrapping_sub(tail);
        RingSnapshot {
            head,
            tail,
            fill: (fill <= g.slots).then_some(fill),
            slots: g.slots,
            producer_waiting: u32v(ring::PRODUCER_WAITING) != 0,
            consumer_waiting: u32v(ring::CONSUMER_WAITING) != 0,
            tx_frames: u64v(ring::TX_FRAMES),
            tx_bytes: u64v(ring::TX_BYTES),
            tx_drop_full: u64v(ring::TX_DROP_FULL),
            tx_drop_down: u64v(ring::TX_DROP_DOWN),
            tx_drop_mtu: u64v(ring::TX_DROP_MTU),
            rx_frames: u64v(ring::RX_FRAMES),
            rx_bytes: u64v(ring::RX_BYTES),
            rx_drop_stale: u64v(ring::RX_DROP_STALE),
            rx_corrupt: u64v(ring::RX_CORRUPT),
            rx_drop_deliver: u64v(ring::RX_DROP_DELIVER),
            rx_drop_size: u64v(ring::RX_DROP_SIZE),
            rx_drop_offload: u64v(ring::RX_DROP_OFFLOAD),
            rx_drop_source: u64v(ring::RX_DROP_SOURCE),
        }
    }
}

/// Raw access to a ring's descriptors and indices for tests that play a hostile producer.
#[cfg(any(test, feature = "test-utils"))]
pub mod hostile {
    use super::*;

    /// Overwrites descriptor `idx` of ring `src -> dst`.
    pub fn write_desc(region: &Region, src: u32, dst: u32, idx: u32, d: &SegmentDesc) {
        let g = RingGeom::new(region, src, dst);
        region.raw().copy_in(g.desc(idx), &d.encode()).unwrap();
    }

    /// Reads descriptor `idx` of ring `src -> dst`.
    pub fn read_desc(region: &Region, src: u32, dst: u32, idx: u32) -> SegmentDesc {
        let g = RingGeom::new(region, src, dst);
        let mut b = [0u8; DESC_SIZE];
        region.raw().copy_out(g.desc(idx), &mut b).unwrap();
        SegmentDesc::decode(&b)
    }

    /// Stores `head` as the producer's head of ring `src -> dst`.
    pub fn set_head(region: &Region, src: u32, dst: u32, head: u32) {
        let g = RingGeom::new(region, src, dst);
        region.raw().u32_at(g.base + ring::HEAD).store(head, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::layout::Geometry;
    use crate::region::{GeometryRequest, HeapMemory};
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Two peers, `slots` segments of 2048 bytes (more in rings under 66 segments); MTU 65521
    /// (64 KiB frames) when the ring is large enough, else 9000 or 1500.
    fn region(slots: u32) -> Region {
        let mtu = match slots {
            128.. => 65521,
            16.. => 9000,
            _ => 1500,
        };
        let req = GeometryRequest {
            max_peers: Some(2),
            ring_slots: Some(slots),
            // A ring always holds two 64 KiB super-frames: small rings get larger segments.
            slot_size: Some(Geometry::min_slot_size(slots, mtu).max(2048)),
            mtu: Some(mtu),
        };
        let size = req.resolve(u64::MAX).unwrap().layout().unwrap().total;
        Region::attach(Arc::new(HeapMemory::new(size)), "ring-test", &req).unwrap()
    }

    /// A frame whose bytes depend on its sequence number and length.
    fn frame(seq: u32, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seq as usize * 31 + i * 7 + (i >> 8)) as u8).collect()
    }

    fn pop(c: &mut Consumer, epoch: u32, buf: &mut [u8]) -> Option<Vec<u8>> {
        match c.peek(epoch) {
            Peek::Empty => None,
            Peek::Frame(info) => {
                let n = c.copy_frame(buf);
                assert_eq!(n, info.len);
                c.advance(true);
                Some(buf[..n].to_vec())
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn test_small_frame_round_trip_and_counters() {
        let r = region(64);
        let mut p = Producer::new(&r, 0, 1, 7);
        let mut c = Consumer::new(&r, 0, 1);
        assert_eq!(c.peek(7), Peek::Empty);
        p.push(&[], b"hello, ring").unwrap();
        assert_eq!(c.peek(7), Peek::Empty, "nothing is visible before publish");
        assert!(p.publish());
        let mut buf = vec![0; 70_000];
        assert_eq!(pop(&mut c, 7, &mut buf).unwrap(), b"hello, ring");
        c.publish();
        let snap = RingSnapshot::read(&r, 0, 1);
        assert_eq!((snap.tx_frames, snap.rx_frames, snap.fill), (1, 1, Some(0)));
    }

    proptest! {
        /// A frame pushed with its checksum completed on the way in arrives as the same bytes
        /// with the reference checksum in its field, wherever the ring wraps within it (also
        /// at an odd offset of the summed range).
        #[test]
        fn push_summed_stores_the_completed_checksum(
            before in 0usize..16,
            len in 40usize..9000,
            start in 14usize..40,
            field in 0usize..20,
            meta_len in prop_oneof![Just(0usize), Just(12), 1usize..64],
            udp in any::<bool>(),
        ) {
            let r = region(16);
            let mut p = Producer::new(&r, 0, 1, 3);
            let mut c = Consumer::new(&r, 0, 1);
            let mut buf = vec![0; 70_000];
            // Move the head so the frame starts at a different segment each case.
            for i in 0..before {
                p.push(&[], &frame(i as u32, 100)).unwrap();
                p.publish();
                pop(&mut c, 3, &mut buf).unwrap();
                c.publish();
            }
            let f = frame(99, len);
            let field = (start + field).min(len - 2);
            let meta = vec![5u8; meta_len];
            let sum = PartialChecksum { start, end: len, field, udp };
            let stored = p.push_summed(&meta, &f, &sum).unwrap();
            p.publish();
            let mut want = f.clone();
            let mut value = csum::finish(csum::add(0, &f[start..]));
            if udp && value == 0 {
                value = 0xffff;
            }
            want[field..field + 2].copy_from_slice(&value.to_be_bytes());
            prop_assert_eq!(stored, value.to_be_bytes());
            let Peek::Frame(info) = c.peek(3) else { panic!("no frame") };
            prop_assert_eq!(info.meta_len, meta_len);
            let mut m = [0u8; 64];
            let n = c.copy_meta(&mut m);
            prop_assert_eq!(&m[..n], &meta[..]);
            prop_assert_eq!(pop(&mut c, 3, &mut buf).unwrap(), want);
        }
    }

    #[test]
    fn test_jumbo_frame_spans_segments_with_meta() {
        let r = region(128);
        let mut p = Producer::new(&r, 0, 1, 1);
        let mut c = Consumer::new(&r, 0, 1);
        let f = frame(1, 65535);
        p.push(&[9; 12], &f).unwrap();
        p.publish();
        let Peek::Frame(info) = c.peek(1) else { panic!() };
        assert_eq!((info.len, info.meta_len, info.segments), (65535, 12, 33));
        let mut meta = [0u8; 64];
        assert_eq!(c.copy_meta(&mut meta), 12);
        assert_eq!(&meta[..12], &[9; 12]);
        let mut buf = vec![0; 70_000];
        assert_eq!(c.copy_frame(&mut buf), 65535);
        assert_eq!(&buf[..65535], &f[..]);
    }

    #[test]
    fn test_full_ring_refuses_then_accepts_after_consume() {
        let r = region(8);
        let g = r.geometry();
        assert_eq!(g.ring_slots, 8);
        let mut p = Producer::new(&r, 0, 1, 1);
        let mut c = Consumer::new(&r, 0, 1);
        for i in 0..8 {
            p.push(&[], &frame(i, 100)).unwrap();
        }
        assert_eq!(p.push(&[], &frame(8, 100)), Err(PushError::Full));
        assert_eq!(p.push(&[], &[]), Err(PushError::Empty));
        p.publish();
        let mut buf = vec![0; 70_000];
        assert_eq!(pop(&mut c, 1, &mut buf).unwrap(), frame(0, 100));
        assert_eq!(
            p.push(&[], &frame(8, 100)),
            Err(PushError::Full),
            "space returns only on publish"
        );
        c.publish();
        p.push(&[], &frame(8, 100)).unwrap();
    }

    #[test]
    fn test_frames_from_an_earlier_life_are_dropped() {
        let r = region(64);
        let mut old = Producer::new(&r, 0, 1, 1);
        let mut c = Consumer::new(&r, 0, 1);
        old.push(&[], &frame(0, 60)).unwrap();
        old.push(&[], &frame(1, 60)).unwrap();
        old.publish();
        // The producer restarts with epoch 2 without the consumer having drained anything.
        let mut new = Producer::new(&r, 0, 1, 2);
        new.push(&[], &frame(2, 60)).unwrap();
        new.publish();
        assert_eq!(c.peek(2), Peek::Stale);
        assert_eq!(c.peek(2), Peek::Stale);
        let mut buf = vec![0; 70_000];
        assert_eq!(pop(&mut c, 2, &mut buf).unwrap(), frame(2, 60));
        c.publish();
        assert_eq!(RingSnapshot::read(&r, 0, 1).rx_drop_stale, 2);
    }

    #[test]
    fn test_restarted_consumer_discards_what_was_queued_for_its_old_life() {
        let r = region(64);
        let mut p = Producer::new(&r, 0, 1, 1);
        p.push(&[], &frame(0, 60)).unwrap();
        p.publish();
        let mut c = Consumer::new(&r, 0, 1);
        assert_eq!(c.peek(1), Peek::Empty);
        assert!(p.is_drained());
    }

    #[test]
    fn test_wait_flags_follow_the_protocol() {
        let r = region(64);
        let mut p = Producer::new(&r, 0, 1, 1);
        let mut c = Consumer::new(&r, 0, 1);
        assert!(!c.prepare_to_sleep(), "empty ring: may sleep");
        p.push(&[], &frame(0, 60)).unwrap();
        assert_eq!(p.publish_and_check_waiting(), Some(true), "consumer sleeps: ring it");
        c.wake();
        p.push(&[], &frame(1, 60)).unwrap();
        assert_eq!(
            p.publish_and_check_waiting(),
            Some(false),
            "consumer busy: do not interrupt it"
        );
        assert_eq!(p.publish_and_check_waiting(), None, "nothing new: nothing to say");
        assert!(c.prepare_to_sleep(), "data arrived: do not sleep");
    }

    #[test]
    fn test_a_quarter_of_the_ring_is_returned_and_announced_early() {
        let r = region(64);
        let mut p = Producer::new(&r, 0, 1, 1);
        let mut c = Consumer::new(&r, 0, 1);
        let mut buf = vec![0; 70_000];
        // The consumer sleeps; 64 one-segment frames fill the ring, a quarter at a time.
        assert!(!c.prepare_to_sleep());
        for i in 0..15 {
            p.push(&[], &frame(i, 100)).unwrap();
            assert!(!p.take_early_and_check_waiting(), "frame {i}: nothing published yet");
        }
        p.push(&[], &frame(15, 100)).unwrap();
        assert!(p.take_early_and_check_waiting(), "a quarter published: ring the sleeper");
        assert!(!p.take_early_and_check_waiting(), "reported once");
        for i in 16..64 {
            p.push(&[], &frame(i, 100)).unwrap();
        }
        assert_eq!(p.push(&[], &frame(64, 100)), Err(PushError::Full));
        assert_eq!(p.publish_and_check_waiting(), Some(true), "the rest is reported at the end");
        c.wake();
        // The producer waits for room, which comes back a quarter at a time, before the
        // consumer's batch ends.
        for i in 0..15 {
            assert_eq!(pop(&mut c, 1, &mut buf).unwrap(), frame(i, 100));
            assert!(!c.publish_tail_early(), "frame {i}: less than a quarter consumed");
        }
        assert_eq!(p.push(&[], &frame(64, 100)), Err(PushError::Full));
        assert_eq!(pop(&mut c, 1, &mut buf).unwrap(), frame(15, 100));
        assert!(c.publish_tail_early());
        assert!(!c.publish_tail_early(), "nothing more consumed");
        for i in 64..80 {
            p.push(&[], &frame(i, 100)).unwrap();
        }
        assert_eq!(p.push(&[], &frame(80, 100)), Err(PushError::Full));
        // Counters still come with the full publication; order is kept across both.
        assert_eq!(RingSnapshot::read(&r, 0, 1).rx_frames, 0);
        c.publish();
        p.publish();
        for i in 16..80 {
            assert_eq!(pop(&mut c, 1, &mut buf).unwrap(), frame(i, 100));
        }
        c.publish();
        let snap = RingSnapshot::read(&r, 0, 1);
        assert_eq!((snap.rx_frames, snap.fill), (80, Some(0)));
    }

    #[test]
    fn test_two_threads_move_frames_intact_and_in_order() {
        let r = region(64);
        let rp = r.clone();
        // The consumer joins first: a consumer that joins later discards what is queued.
        let mut c = Consumer::new(&r, 0, 1);
        const N: u32 = 20_000;
        let prod = std::thread::spawn(move || {
            let mut p = Producer::new(&rp, 0, 1, 5);
            let mut i = 0;
            while i < N {
                let len = 1 + (i as usize * 7919) % 9000;
                match p.push(&[], &frame(i, len)) {
                    Ok(()) => i += 1,
                    Err(PushError::Full) => {
                        p.publish();
                        std::hint::spin_loop();
                    }
                    Err(e) => panic!("{e}"),
                }
                if i % 8 == 0 {
                    p.publish();
                }
            }
            p.publish();
        });
        let mut buf = vec![0; 70_000];
        let mut i = 0;
        while i < N {
            match pop(&mut c, 5, &mut buf) {
                Some(f) => {
                    let len = 1 + (i as usize * 7919) % 9000;
                    assert!(f == frame(i, len), "frame {i} differs (length {} vs {len})", f.len());
                    i += 1;
                    if i % 4 == 0 {
                        c.publish();
                    }
                }
                None => {
                    c.publish();
                    std::hint::spin_loop();
                }
            }
        }
        prod.join().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of sizes from 1 to 65535 bytes arrives intact and in order, through
        /// wrap-around, whatever the interleaving of pushes and pops.
        #[test]
        fn prop_frames_arrive_intact_in_order(
            sizes in prop::collection::vec(prop_oneof![1usize..=128, 1usize..=65535, Just(65535usize)], 1..60),
            drain_every in 1usize..6,
        ) {
            let r = region(128);
            let mut p = Producer::new(&r, 0, 1, 3);
            let mut c = Consumer::new(&r, 0, 1);
            let mut buf = vec![0; 70_000];
            let mut next_out = 0usize;
            let mut check = |c: &mut Consumer, next_out: &mut usize| {
                while let Some(f) = pop(c, 3, &mut buf) {
                    prop_assert_eq!(&f, &frame(*next_out as u32, sizes[*next_out]));
                    *next_out += 1;
                }
                c.publish();
                Ok(())
            };
            for (i, &len) in sizes.iter().enumerate() {
                loop {
                    match p.push(&[], &frame(i as u32, len)) {
                        Ok(()) => break,
                        Err(PushError::Full) => { p.publish(); check(&mut c, &mut next_out)?; }
                        Err(e) => prop_assert!(false, "{}", e),
                    }
                }
                if i % drain_every == 0 {
                    p.publish();
                    check(&mut c, &mut next_out)?;
                }
            }
            p.publish();
            check(&mut c, &mut next_out)?;
            prop_assert_eq!(next_out, sizes.len());
        }

        /// A producer that scribbles over its descriptors and head makes the consumer report
        /// errors or drop frames; it never panics, never loops forever, and every frame it
        /// hands out lies inside the ring's data area.
        #[test]
        fn prop_corrupt_ring_never_panics_or_escapes(
            writes in prop::collection::vec((0u32..64, any::<[u32; 8]>()), 0..40),
            heads in prop::collection::vec(any::<u32>(), 1..6),
            good in 0usize..20,
        ) {
            let r = region(64);
            let l = *r.layout();
            let data_lo = l.ring(0, 1) + l.ring_data;
            let data_hi = data_lo + 64 * l.geometry.slot_size as usize;
            let mut p = Producer::new(&r, 0, 1, 1);
            for i in 0..good {
                let _ = p.push(&[], &frame(i as u32, 1 + i * 900));
            }
            p.publish();
            for (idx, w) in &writes {
                let d = SegmentDesc {
                    start: w[0] % 4096, end: w[1] % 4096, len: w[2] % 4096, next: w[3] % 80,
                    flags: (w[4] % 4) as u16, meta_len: (w[5] % 100) as u16, epoch: w[6] % 3,
                    frame_len: if w[7] % 2 == 0 { w[7] } else { w[7] % 70_000 },
                };
                hostile::write_desc(&r, 0, 1, *idx, &d);
            }
            let mut c = Consumer::new(&r, 0, 1);
            let mut buf = vec![0; 70_000];
            for &h in &heads {
                hostile::set_head(&r, 0, 1, if h % 3 == 0 { h } else { h % 70 });
                for _ in 0..200 {
                    match c.peek(1) {
                        Peek::Empty => break,
                        Peek::Frame(info) => {
                            for &(off, len) in c.frame_ranges() {
                                prop_assert!(off >= data_lo && off + len <= data_hi);
                            }
                            prop_assert!(info.len <= 65535 + 18);
                            prop_assert_eq!(c.copy_frame(&mut buf), info.len);
                            c.advance(true);
                        }
                        Peek::Stale | Peek::Corrupt(_) => {}
                    }
                }
                c.publish();
            }
        }
    }
}
