//! The versioned layout of a region: header, peer table and ring matrix.
//!
//! ```text
//! 0        header (4 KiB): magic, version, init word, features, geometry, offsets
//! 4096     peer table: max_peers entries of 256 bytes (state, incarnation, heartbeat, MAC, ...)
//! info     peer info table: max_peers entries of 256 bytes (the owner's IP addresses), v2
//! rings    max_peers * (max_peers - 1) rings, one per ordered pair (src, dst), src != dst,
//!          each `ring_stride` bytes (page aligned): control, descriptors, data segments
//! ```
//!
//! All integers are little-endian. Offsets of fields are pinned by tests because a guest built
//! from another commit must read the same bytes. Every value read from a region made by someone
//! else is checked against the layout recomputed here before it is used (DESIGN rule 1).

/// `b"IVNETSEG"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"IVNETSEG");
/// Layout version this build writes and understands. Version 2 added the peer info table
/// (members' IP addresses) between the peer table and the rings.
pub const VERSION: u32 = 2;
/// Bytes reserved for the header.
pub const HEADER_SIZE: usize = 4096;
/// Bytes per peer-table entry.
pub const PEER_ENTRY_SIZE: usize = 256;
/// Bytes per peer-info entry (see [`info`]).
pub const INFO_ENTRY_SIZE: usize = 256;
/// IP addresses a peer-info entry holds.
pub const INFO_MAX_ADDRS: usize = 10;
/// Bytes of ring control (a producer line and a consumer line, 128 bytes each so that adjacent
/// line prefetching does not make them share).
pub const RING_CONTROL_SIZE: usize = 256;
/// Bytes per segment descriptor.
pub const DESC_SIZE: usize = 32;
/// Largest number of peers a region may be laid out for.
pub const MAX_PEERS_LIMIT: u32 = 64;
/// Largest Ethernet frame a TAP with segmentation offloads hands over (and so the largest frame
/// a ring carries, whatever the MTU): an Ethernet header with one VLAN tag, an IPv6 header and
/// the largest IPv6 payload (a USO datagram can fill it; TSO frames stay below 64 KiB).
pub const SUPER_FRAME_MAX: u32 = 14 + 4 + 40 + 65535;
/// Largest MTU (the TAP driver's own limit is 65521).
pub const MTU_LIMIT: u32 = 65535;
/// Room reserved before each frame for per-frame metadata: a frame with offloads (a GSO
/// super-frame, or a partial checksum) carries its 12-byte virtio-net header there.
pub const MAX_META: u32 = 64;
/// Bytes an Ethernet header with one VLAN tag adds to the MTU.
pub const ETH_OVERHEAD: u32 = 18;

/// Header field offsets.
pub mod hdr {
    /// u64 magic ([`super::MAGIC`]); written last by the initialiser, before the init word.
    pub const MAGIC: usize = 0;
    /// u32 layout version.
    pub const VERSION: usize = 8;
    /// u32 header size.
    pub const HEADER_SIZE: usize = 12;
    /// u64 init word: low 32 bits state (0 blank, 1 initialising, 2 ready), high 32 a nonce.
    pub const INIT: usize = 16;
    /// u32 features a peer must understand to join.
    pub const INCOMPAT_FEATURES: usize = 24;
    /// u32 features a peer may ignore.
    pub const COMPAT_FEATURES: usize = 28;
    /// u64 region size the layout was made for.
    pub const REGION_SIZE: usize = 32;
    /// u32 max peers.
    pub const MAX_PEERS: usize = 40;
    /// u32 segments per ring.
    pub const RING_SLOTS: usize = 44;
    /// u32 bytes per segment.
    pub const SLOT_SIZE: usize = 48;
    /// u32 largest MTU the segment carries.
    pub const MTU: usize = 52;
    /// u64 offset of the peer table.
    pub const PEER_TABLE: usize = 56;
    /// u32 bytes per peer entry.
    pub const PEER_ENTRY: usize = 64;
    /// u32 reserved.
    pub const RESERVED0: usize = 68;
    /// u64 offset of the first ring.
    pub const RINGS: usize = 72;
    /// u64 bytes per ring.
    pub const RING_STRIDE: usize = 80;
    /// u64 count of initialisations of this region (bumped on each one).
    pub const GENERATION: usize = 88;
    /// u64 offset of the peer info table (v2).
    pub const INFO_TABLE: usize = 96;
    /// u32 bytes per peer-info entry (v2).
    pub const INFO_ENTRY: usize = 104;
    /// u32 reserved.
    pub const RESERVED1: usize = 108;
}

/// Init word states.
pub mod init {
    /// Nothing written yet.
    pub const BLANK: u32 = 0;
    /// Someone is writing the header.
    pub const INITIALISING: u32 = 1;
    /// The header is complete and may be read (after an acquire load of the init word).
    pub const READY: u32 = 2;
}

/// Peer-entry field offsets (relative to the entry).
pub mod peer {
    /// u64 incarnation: bumped with a compare-and-swap by whoever claims the slot.
    pub const INCARNATION: usize = 0;
    /// u32: [`super::PeerState`] in the low 8 bits, the low 24 bits of the incarnation it was
    /// written under above them; written by the owner.
    pub const STATE: usize = 8;
    /// u32 process id of the owner (informational).
    pub const PID: usize = 12;
    /// u64 heartbeat counter, bumped by the owner.
    pub const HEARTBEAT: usize = 16;
    /// u64 wall-clock time of the last heartbeat, ms since the Unix epoch (informational: clocks
    /// of different VMs may disagree, liveness uses the counter).
    pub const HEARTBEAT_MS: usize = 24;
    /// u64 MAC address in the low 48 bits (byte 0 of the MAC in the lowest byte).
    pub const MAC: usize = 32;
    /// u32 MTU of the owner's interface.
    pub const MTU: usize = 40;
    /// u32 offloads the owner accepts as-is (`offload::Features` bits: frames with a partial
    /// checksum, TSO, USO); a sender segments and checksums for a peer that lacks one.
    pub const FEATURES: usize = 44;
    /// u32 kind of member (agent, stack, ...), informational.
    pub const KIND: usize = 48;
    /// u32 doorbell id + 1 (0: none) the doorbell server gave the client it put in this slot:
    /// the id QEMU knows the member by (IVPosition, Doorbell register, protocol messages).
    /// Written by the server only. Doorbell ids are never reused promptly (QEMU cannot take a
    /// reused id), slots are; this field maps one to the other.
    pub const DOORBELL_ID: usize = 52;
    /// u64 token of the owner's host and pid namespace (0: unknown): a claimer on the same host
    /// can tell at once that an owner whose pid no longer exists is dead.
    pub const HOST: usize = 56;
    /// Owner's counters: 16 u64 starting here (see [`super::PeerCounter`]).
    pub const COUNTERS: usize = 64;
    /// Owner's doorbell counters: 8 u64 starting here (see [`super::DoorbellCounter`]).
    pub const DOORBELL_COUNTERS: usize = 192;
}

/// Peer-info entry field offsets (relative to the entry). Written by the slot's owner only,
/// under a sequence word: the owner makes it odd, writes, and makes it even again; a reader
/// keeps what it read only if the word was even and unchanged around its reads. Every value is
/// checked by the reader (count, family, prefix length).
pub mod info {
    /// u32 sequence word: odd while the owner writes the entry.
    pub const SEQ: usize = 0;
    /// u32: number of addresses in the low 8 bits ([`super::INFO_MAX_ADDRS`] at most); bit 8
    /// set when the owner had more than fit.
    pub const COUNT: usize = 4;
    /// u64 the owner's incarnation when it wrote the entry: a reader ignores an entry written
    /// by an earlier owner of the slot.
    pub const INCARNATION: usize = 8;
    /// [`super::INFO_MAX_ADDRS`] addresses of [`ADDR_SIZE`] bytes from here.
    pub const ADDRS: usize = 16;
    /// Bytes per address: u8 family (4 or 6), u8 prefix length, 6 bytes zero, then 16 bytes of
    /// address (an IPv4 address in the first 4), as three u64 words.
    pub const ADDR_SIZE: usize = 24;
    /// Bit of [`COUNT`] set when addresses were left out.
    pub const TRUNCATED: u32 = 1 << 8;
}

/// Ring control field offsets (relative to the ring).
pub mod ring {
    /// u32 producer's head: the index after the newest published segment (producer line).
    pub const HEAD: usize = 0;
    /// u32 set by the producer while it waits for space (producer line).
    pub const PRODUCER_WAITING: usize = 4;
    /// u64 frames published (producer line).
    pub const TX_FRAMES: usize = 8;
    /// u64 bytes published.
    pub const TX_BYTES: usize = 16;
    /// u64 frames dropped because the ring was full.
    pub const TX_DROP_FULL: usize = 24;
    /// u64 frames dropped because the destination was down.
    pub const TX_DROP_DOWN: usize = 32;
    /// u64 frames not sent because they (or their segments) were larger than the destination's
    /// MTU, or could not be segmented for it.
    pub const TX_DROP_MTU: usize = 40;
    /// u32 consumer's tail: the oldest unread segment (consumer line).
    pub const TAIL: usize = 128;
    /// u32 set by the consumer before it sleeps waiting for data (consumer line).
    pub const CONSUMER_WAITING: usize = 132;
    /// u64 frames delivered.
    pub const RX_FRAMES: usize = 136;
    /// u64 bytes delivered.
    pub const RX_BYTES: usize = 144;
    /// u64 frames dropped because they came from an earlier incarnation of the producer.
    pub const RX_DROP_STALE: usize = 152;
    /// u64 times the consumer found the ring inconsistent and skipped what was published.
    pub const RX_CORRUPT: usize = 160;
    /// u64 frames the consumer could not deliver (its interface refused them).
    pub const RX_DROP_DELIVER: usize = 168;
    /// u64 frames dropped because of their size: shorter than an Ethernet header, or longer
    /// (offloaded: segments longer) than the consumer's MTU allows.
    pub const RX_DROP_SIZE: usize = 176;
    /// u64 frames dropped because their metadata was invalid or asked for an offload the
    /// consumer does not accept.
    pub const RX_DROP_OFFLOAD: usize = 184;
    /// u64 frames dropped because their source MAC is not the producer's own (`--pin-macs`).
    pub const RX_DROP_SOURCE: usize = 192;
}

/// Descriptor flag: first segment of a frame.
pub const DESC_FIRST: u16 = 1;
/// Descriptor flag: last segment of a frame (seed claim 45's "last fragment").
pub const DESC_LAST: u16 = 2;

/// Incompatible features this build understands.
pub const KNOWN_INCOMPAT: u32 = 0;

/// Life cycle of a peer-table slot, written by its owner only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Never used.
    Free,
    /// Claimed; the owner is resetting its rings.
    Joining,
    /// Running and heartbeating.
    Up,
    /// Left cleanly.
    Left,
    /// A value this build does not know (a newer or broken peer).
    #[serde(other)]
    Unknown,
}

impl PeerState {
    /// The value stored in the table.
    pub fn to_raw(self) -> u32 {
        match self {
            PeerState::Free => 0,
            PeerState::Joining => 1,
            PeerState::Up => 2,
            PeerState::Left => 3,
            PeerState::Unknown => u32::MAX,
        }
    }
    /// Interprets a value read from the table.
    pub fn from_raw(v: u32) -> Self {
        match v {
            0 => PeerState::Free,
            1 => PeerState::Joining,
            2 => PeerState::Up,
            3 => PeerState::Left,
            _ => PeerState::Unknown,
        }
    }
}

/// What kind of member owns a slot (informational, for `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// `ivnet agent` with a TAP.
    Agent = 1,
    /// `ivnet stack` (smoltcp, no TAP).
    Stack = 2,
    /// Unknown or unset (last: any other name read back from JSON is this one).
    #[serde(other)]
    Unknown = 0,
}

impl PeerKind {
    /// Interprets a value read from the table.
    pub fn from_raw(v: u32) -> Self {
        match v {
            1 => PeerKind::Agent,
            2 => PeerKind::Stack,
            _ => PeerKind::Unknown,
        }
    }
}

/// Per-peer counters kept in the owner's peer entry (index into [`peer::COUNTERS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum PeerCounter {
    /// Frames read from the local interface.
    LocalRxFrames = 0,
    /// Bytes read from the local interface.
    LocalRxBytes,
    /// Frames written to the local interface.
    LocalTxFrames,
    /// Bytes written to the local interface.
    LocalTxBytes,
    /// Frames flooded (broadcast, multicast, unknown unicast).
    Flooded,
    /// Frames dropped: no peer is up to receive them.
    DropNoPeer,
    /// Frames dropped: addressed to a MAC behind this peer itself.
    DropToSelf,
    /// Frames dropped: larger than the segment's MTU.
    DropOversize,
    /// Frames dropped: too short to be Ethernet.
    DropRunt,
    /// Errors reading or writing the local interface.
    LocalIoErrors,
    /// Frames the kernel dropped on the way to us because we read the TAP too slowly (its
    /// `tx_dropped`; TCP sees these as losses).
    LocalKernelDrops,
    /// Local frames dropped because their offload header was invalid, or they could not be
    /// segmented or checksummed for a peer that needed it.
    DropOffload,
}

/// Number of counter slots reserved in a peer entry.
pub const PEER_COUNTERS: usize = 16;

/// Doorbell counters kept in the owner's peer entry (index into [`peer::DOORBELL_COUNTERS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DoorbellCounter {
    /// Doorbells rung to wake a waiting consumer.
    Rung = 0,
    /// Doorbells not rung because the consumer was busy (not waiting).
    Suppressed,
    /// Wake-ups by a doorbell.
    Wakeups,
    /// Busy-poll rounds that found work.
    SpinsWithWork,
    /// Wake-ups that found nothing to do.
    SpuriousWakeups,
}

/// Number of doorbell counter slots reserved in a peer entry.
pub const DOORBELL_COUNTERS: usize = 8;

/// The shape of a region: how many peers, and the rings between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Geometry {
    /// Peer slots (ids 0..max_peers).
    pub max_peers: u32,
    /// Segments per ring (a power of two).
    pub ring_slots: u32,
    /// Bytes per segment (a multiple of 64).
    pub slot_size: u32,
    /// Largest MTU any member may use.
    pub mtu: u32,
}

/// Why a geometry cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// Peer count out of range.
    #[error("max peers {0} is out of range: use 2..={MAX_PEERS_LIMIT}")]
    MaxPeers(u32),
    /// Segments per ring not a power of two or out of range.
    #[error("ring slots {0} must be a power of two between 8 and 65536")]
    RingSlots(u32),
    /// Segment size not acceptable.
    #[error("slot size {0} must be a multiple of 64 between 256 and 65536 bytes")]
    SlotSize(u32),
    /// MTU out of range.
    #[error("MTU {0} is out of range: use 68..={MTU_LIMIT}")]
    Mtu(u32),
    /// A largest frame does not fit in a ring.
    #[error(
        "a ring must hold two of the largest frames ({frame} bytes with metadata: an offloaded \
         64 KiB super-frame, whatever the MTU), which need {need} segments of {slot_size} bytes \
         each, but a ring has only {slots}: raise --slots, or --slot-size to at least {min_slot_size}"
    )]
    FrameTooLargeForRing {
        /// Largest frame with metadata.
        frame: u32,
        /// Segments it needs.
        need: u32,
        /// Segment size.
        slot_size: u32,
        /// Segments per ring.
        slots: u32,
        /// The smallest segment size that would do with this many segments.
        min_slot_size: u32,
    },
    /// The layout needs more memory than the region has.
    #[error(
        "the region is {size} bytes but {max_peers} peers with {slots} segments of {slot_size} \
         bytes per ring need {needed} bytes: use a larger --size, fewer --max-peers or --slots"
    )]
    TooSmall {
        /// Region size.
        size: u64,
        /// Bytes needed.
        needed: u64,
        /// Peers.
        max_peers: u32,
        /// Segments per ring.
        slots: u32,
        /// Bytes per segment.
        slot_size: u32,
    },
}

/// Byte offsets derived from a [`Geometry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The geometry it was derived from.
    pub geometry: Geometry,
    /// Offset of the peer table.
    pub peer_table: usize,
    /// Offset of the peer info table.
    pub info_table: usize,
    /// Offset of the first ring.
    pub rings: usize,
    /// Bytes per ring (page aligned).
    pub ring_stride: usize,
    /// Offset of the descriptors within a ring.
    pub ring_descs: usize,
    /// Offset of the data segments within a ring.
    pub ring_data: usize,
    /// Total bytes the layout needs.
    pub total: usize,
}

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

impl Geometry {
    /// Default bytes per segment: a standard 1500-byte frame fits in one.
    pub const DEFAULT_SLOT_SIZE: u32 = 2048;
    /// Default peer slots.
    pub const DEFAULT_MAX_PEERS: u32 = 8;
    /// Default segment MTU: the TAP driver's maximum, so every member can choose its own up to it.
    pub const DEFAULT_MTU: u32 = 65521;

    /// Largest Ethernet frame (without metadata) a ring carries: a full-MTU frame, or an
    /// offloaded super-frame, whichever is larger.
    pub fn max_ethernet_frame(&self) -> u32 {
        (self.mtu + ETH_OVERHEAD).max(SUPER_FRAME_MAX)
    }

    /// Largest frame (with metadata) a member may publish.
    pub fn max_frame(&self) -> u32 {
        self.max_ethernet_frame() + MAX_META
    }

    /// Segments the largest frame needs.
    pub fn max_segments_per_frame(&self) -> u32 {
        self.max_frame().div_ceil(self.slot_size)
    }

    /// The smallest segment size (a multiple of 64) with which a ring of `slots` segments holds
    /// two of the largest frames at `mtu` (see [`GeometryError::FrameTooLargeForRing`]).
    pub fn min_slot_size(slots: u32, mtu: u32) -> u32 {
        let g = Geometry { max_peers: 2, ring_slots: slots, slot_size: 64, mtu };
        let half = (slots / 2).max(1);
        (g.max_frame().div_ceil(half).div_ceil(64) * 64).max(256)
    }

    /// Number of rings (one per ordered pair of distinct peers).
    pub fn ring_count(&self) -> u32 {
        self.max_peers * (self.max_peers - 1)
    }

    /// Checks the values and computes the byte layout (without a region size).
    pub fn layout(&self) -> Result<Layout, GeometryError> {
        if !(2..=MAX_PEERS_LIMIT).contains(&self.max_peers) {
            return Err(GeometryError::MaxPeers(self.max_peers));
        }
        if !self.ring_slots.is_power_of_two() || !(8..=65536).contains(&self.ring_slots) {
            return Err(GeometryError::RingSlots(self.ring_slots));
        }
        if !self.slot_size.is_multiple_of(64) || !(256..=65536).contains(&self.slot_size) {
            return Err(GeometryError::SlotSize(self.slot_size));
        }
        if !(68..=MTU_LIMIT).contains(&self.mtu) {
            return Err(GeometryError::Mtu(self.mtu));
        }
        let need = self.max_segments_per_frame();
        // A frame must fit with room to spare, or one large frame would stall the ring.
        if need > self.ring_slots / 2 {
            return Err(GeometryError::FrameTooLargeForRing {
                frame: self.max_frame(),
                need,
                slot_size: self.slot_size,
                slots: self.ring_slots,
                min_slot_size: Geometry::min_slot_size(self.ring_slots, self.mtu),
            });
        }
        let peer_table = HEADER_SIZE;
        let info_table = peer_table + self.max_peers as usize * PEER_ENTRY_SIZE;
        let rings = align_up(info_table + self.max_peers as usize * INFO_ENTRY_SIZE, 4096);
        let ring_descs = RING_CONTROL_SIZE;
        let ring_data = align_up(ring_descs + self.ring_slots as usize * DESC_SIZE, 64);
        let ring_stride =
            align_up(ring_data + self.ring_slots as usize * self.slot_size as usize, 4096);
        let total = rings + self.ring_count() as usize * ring_stride;
        Ok(Layout {
            geometry: *self,
            peer_table,
            info_table,
            rings,
            ring_stride,
            ring_descs,
            ring_data,
            total,
        })
    }

    /// Checks that the layout fits in `size` bytes.
    pub fn layout_in(&self, size: u64) -> Result<Layout, GeometryError> {
        let layout = self.layout()?;
        if layout.total as u64 > size {
            return Err(GeometryError::TooSmall {
                size,
                needed: layout.total as u64,
                max_peers: self.max_peers,
                slots: self.ring_slots,
                slot_size: self.slot_size,
            });
        }
        Ok(layout)
    }

    /// The largest power-of-two segment count (at most 4096) whose layout fits in `size`.
    pub fn fit_slots(max_peers: u32, slot_size: u32, mtu: u32, size: u64) -> Option<u32> {
        let mut slots = 4096;
        while slots >= 8 {
            let g = Geometry { max_peers, ring_slots: slots, slot_size, mtu };
            if g.layout_in(size).is_ok() {
                return Some(slots);
            }
            slots /= 2;
        }
        None
    }
}

impl Layout {
    /// Offset of peer entry `id` (must be `< max_peers`).
    pub fn peer(&self, id: u32) -> usize {
        assert!(id < self.geometry.max_peers, "peer id {id} out of range");
        self.peer_table + id as usize * PEER_ENTRY_SIZE
    }

    /// Offset of peer-info entry `id` (must be `< max_peers`).
    pub fn info(&self, id: u32) -> usize {
        assert!(id < self.geometry.max_peers, "peer id {id} out of range");
        self.info_table + id as usize * INFO_ENTRY_SIZE
    }

    /// Offset of the ring from `src` to `dst` (both `< max_peers`, distinct).
    pub fn ring(&self, src: u32, dst: u32) -> usize {
        let n = self.geometry.max_peers;
        assert!(src < n && dst < n && src != dst, "ring {src}->{dst} out of range");
        let col = if dst < src { dst } else { dst - 1 };
        self.rings + (src * (n - 1) + col) as usize * self.ring_stride
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(max_peers: u32, ring_slots: u32, slot_size: u32, mtu: u32) -> Geometry {
        Geometry { max_peers, ring_slots, slot_size, mtu }
    }

    #[test]
    fn test_layout_offsets_are_pinned() {
        // These numbers are the wire format: changing them needs a new VERSION.
        assert_eq!(MAGIC.to_le_bytes(), *b"IVNETSEG");
        assert_eq!(hdr::GENERATION, 88);
        assert_eq!(peer::COUNTERS + PEER_COUNTERS * 8, peer::DOORBELL_COUNTERS);
        assert_eq!(peer::DOORBELL_COUNTERS + DOORBELL_COUNTERS * 8, PEER_ENTRY_SIZE);
        assert_eq!(ring::TAIL, 128);
        assert_eq!(VERSION, 2);
        assert_eq!(hdr::INFO_TABLE, 96);
        assert_eq!(hdr::INFO_ENTRY, 104);
        assert_eq!(info::ADDRS + INFO_MAX_ADDRS * info::ADDR_SIZE, INFO_ENTRY_SIZE);
        let l = g(8, 512, 2048, 65521).layout().unwrap();
        assert_eq!(l.peer_table, 4096);
        assert_eq!(l.info_table, 4096 + 8 * 256);
        assert_eq!(l.info(3), 4096 + 8 * 256 + 3 * 256);
        // With 8 peers both tables fit in the page after the header: the rings did not move.
        assert_eq!(l.rings, 8192);
        assert_eq!(l.ring_descs, 256);
        assert_eq!(l.ring_data, 256 + 512 * 32);
        assert_eq!(l.ring_stride, 1_069_056);
        assert_eq!(l.total, 8192 + 56 * 1_069_056);
    }

    #[test]
    fn test_info_table_sits_between_peer_table_and_rings() {
        for n in [2, 8, 16, 33, 64] {
            let l = g(n, 128, 2048, 1500).layout().unwrap();
            assert_eq!(l.info_table, l.peer_table + n as usize * PEER_ENTRY_SIZE);
            assert!(l.info(n - 1) + INFO_ENTRY_SIZE <= l.rings, "{n} peers");
            assert_eq!(l.rings % 4096, 0);
        }
        // 64 peers: 16 KiB of peer table and 16 KiB of info table after the header.
        assert_eq!(g(64, 128, 2048, 1500).layout().unwrap().rings, 4096 + 2 * 64 * 256);
    }

    #[test]
    fn test_ring_matrix_skips_the_diagonal_and_is_dense() {
        let l = g(4, 128, 2048, 1500).layout().unwrap();
        let mut seen = Vec::new();
        for s in 0..4 {
            for d in 0..4 {
                if s != d {
                    seen.push((l.ring(s, d) - l.rings) / l.ring_stride);
                }
            }
        }
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn test_geometry_errors_name_the_bad_value() {
        assert_eq!(g(1, 64, 2048, 1500).layout(), Err(GeometryError::MaxPeers(1)));
        assert_eq!(g(2, 100, 2048, 1500).layout(), Err(GeometryError::RingSlots(100)));
        assert_eq!(g(2, 64, 1000, 1500).layout(), Err(GeometryError::SlotSize(1000)));
        assert!(matches!(
            g(2, 16, 2048, 65521).layout(),
            Err(GeometryError::FrameTooLargeForRing { need: 33, .. })
        ));
        let e = g(8, 512, 2048, 1500).layout_in(1 << 20).unwrap_err();
        assert!(e.to_string().contains("1048576 bytes"), "{e}");
    }

    #[test]
    fn test_fit_slots_picks_the_largest_that_fits() {
        assert_eq!(Geometry::fit_slots(8, 2048, 65521, 64 << 20), Some(512));
        assert_eq!(Geometry::fit_slots(2, 2048, 65521, 1 << 20), Some(128));
        assert_eq!(Geometry::fit_slots(8, 2048, 65521, 1 << 20), None);
    }
}
