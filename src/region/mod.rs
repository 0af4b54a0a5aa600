//! The shared region: the only code that touches shared memory.
//!
//! A backend maps memory (a file, a PCI BAR, a descriptor from the doorbell server) and hands it
//! over as a [`SharedMemory`]; this module gives out safe, typed, bounds-checked views of the
//! header, the peer table and the rings. Raw pointer work is confined to [`raw`].

pub mod info;
pub mod layout;
pub mod raw;
pub mod ring;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use layout::{Geometry, GeometryError, Layout, PeerKind, PeerState};
pub use raw::{HeapMemory, RawRegion, SharedMemory};

use layout::{hdr, init, peer, MAGIC, VERSION};

/// Why a region cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The memory holds something that is not an ivnet region.
    #[error(
        "{name}: foreign magic {found:#018x} (expected {MAGIC:#018x}, \"IVNETSEG\"): this memory \
         holds something else; point ivnet at another file or clear this one"
    )]
    ForeignMagic {
        /// Region name (path or device).
        name: String,
        /// The magic found.
        found: u64,
    },
    /// Written by an incompatible ivnet.
    #[error("{name}: layout version {found}, this ivnet understands version {expected}")]
    VersionMismatch {
        /// Region name.
        name: String,
        /// Version in the header.
        found: u32,
        /// Version of this build.
        expected: u32,
    },
    /// The header requires features this build lacks.
    #[error("{name}: the region requires features {found:#x} that this ivnet does not support (it knows {known:#x})")]
    UnsupportedFeatures {
        /// Region name.
        name: String,
        /// Required features.
        found: u32,
        /// Features this build knows.
        known: u32,
    },
    /// The header's geometry differs from what the caller asked for.
    #[error(
        "{name}: geometry mismatch: the region has {field} {found}, this peer expects {expected} \
         (drop the flag to adopt the region's value, or recreate the region)"
    )]
    GeometryMismatch {
        /// Region name.
        name: String,
        /// Which value differs.
        field: &'static str,
        /// Value in the header.
        found: u32,
        /// Value asked for.
        expected: u32,
    },
    /// The requested or stored geometry is invalid or does not fit.
    #[error("{name}: {source}")]
    Geometry {
        /// Region name.
        name: String,
        /// What is wrong.
        #[source]
        source: GeometryError,
    },
    /// The header contradicts itself.
    #[error("{name}: corrupt header: {what}; recreate the region")]
    CorruptHeader {
        /// Region name.
        name: String,
        /// What is inconsistent.
        what: String,
    },
    /// Another process began initialising and never finished.
    #[error(
        "{name}: the region did not become ready within {timeout:?} (another process keeps \
         initialising it, or its init word keeps changing)"
    )]
    InitStalled {
        /// Region name.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Not even the header fits.
    #[error(
        "{name}: {size} bytes is too small for an ivnet region (the header alone takes \
         {header} bytes): use a larger --size",
        header = layout::HEADER_SIZE
    )]
    TooSmallForHeader {
        /// Region name.
        name: String,
        /// Its size.
        size: usize,
    },
    /// A read-only view cannot initialise a blank region.
    #[error("{name}: the region is blank (no ivnet member has initialised it yet)")]
    Blank {
        /// Region name.
        name: String,
    },
    /// The header is blank or damaged, but members are live in the peer table: initialising
    /// would wipe their table and rings, so this member does not join.
    #[error(
        "{name}: the header is blank or damaged, but {live} member(s) are live in the peer \
         table: refusing to re-initialise the region under them; stop them (or use another \
         region) and try again"
    )]
    LiveMembers {
        /// Region name.
        name: String,
        /// How many live members were found.
        live: u32,
    },
}

/// Geometry values a member asks for; `None` adopts the region's value (or the default, for a
/// blank region).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GeometryRequest {
    /// Peer slots.
    pub max_peers: Option<u32>,
    /// Segments per ring.
    pub ring_slots: Option<u32>,
    /// Bytes per segment.
    pub slot_size: Option<u32>,
    /// Segment MTU.
    pub mtu: Option<u32>,
}

impl GeometryRequest {
    /// The geometry to lay out a blank region of `size` bytes with.
    pub fn resolve(&self, size: u64) -> Result<Geometry, GeometryError> {
        let max_peers = self.max_peers.unwrap_or(Geometry::DEFAULT_MAX_PEERS);
        let slot_size = self.slot_size.unwrap_or(Geometry::DEFAULT_SLOT_SIZE);
        let mtu = self.mtu.unwrap_or(Geometry::DEFAULT_MTU);
        let ring_slots = match self.ring_slots {
            Some(s) => s,
            // Pick the largest ring that fits; if none does, report the smallest usable one.
            None => Geometry::fit_slots(max_peers, slot_size, mtu, size).unwrap_or_else(|| {
                let probe = Geometry { max_peers, ring_slots: 8, slot_size, mtu };
                (2 * probe.max_segments_per_frame()).next_power_of_two().max(8)
            }),
        };
        let g = Geometry { max_peers, ring_slots, slot_size, mtu };
        g.layout_in(size)?;
        Ok(g)
    }
}

/// How long to wait for another process's initialisation before taking it over.
const INIT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest [`Region::attach`] waits in all, whatever the init word does.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a heartbeat is watched before a table entry counts as dead, when judging whether a
/// region with a damaged header still has live members (the default link timeout, plus a
/// heartbeat period).
const LIVE_WATCH: Duration = Duration::from_millis(1100);

/// Something outside the memory that can tell whether the region is still the one members
/// share (the file backend: the region file may be deleted or replaced under running members).
pub trait BackingCheck: Send + Sync {
    /// A description of what went wrong, if anything did since the region was mapped.
    fn problem(&self) -> Option<String>;
}

/// A region with a validated layout. Cheap to clone.
#[derive(Clone)]
pub struct Region {
    raw: RawRegion,
    layout: Layout,
    name: Arc<str>,
    backing: Option<Arc<dyn BackingCheck>>,
}

impl Region {
    /// Joins the region in `mem`, initialising it first if it is blank. Safe when several
    /// processes do this at once: one initialises, the others wait for it (DESIGN rule 5).
    ///
    /// A damaged init word or magic over a complete header is repaired, not taken for a blank
    /// region, and a blank-looking header with live members in the peer table is never
    /// re-initialised. The whole wait is bounded by [`ATTACH_TIMEOUT`].
    pub fn attach(
        mem: Arc<dyn SharedMemory>,
        name: &str,
        req: &GeometryRequest,
    ) -> Result<Region, RegionError> {
        Self::attach_within(mem, name, req, ATTACH_TIMEOUT)
    }

    fn attach_within(
        mem: Arc<dyn SharedMemory>,
        name: &str,
        req: &GeometryRequest,
        limit: Duration,
    ) -> Result<Region, RegionError> {
        let raw = RawRegion::new(mem);
        let start = Instant::now();
        let mut waiting_since: Option<(u64, Instant)> = None;
        loop {
            let magic = read_magic(&raw, name)?;
            // Acquire: pairs with the release store of READY in `initialise`; the header fields
            // written before it are visible after this load.
            let word = raw.u64_at(hdr::INIT).load(Ordering::Acquire);
            if word as u32 == init::READY && magic == MAGIC {
                return Self::validate(raw, name, req);
            }
            if magic != 0 || word as u32 == init::READY {
                // The magic is written last, just before READY, by an initialisation that
                // completed; a header that carries it (or READY) is finished, and whatever
                // else is odd about it was overwritten later. Repair, never re-initialise.
                return Self::recover(raw, name, req, magic, word);
            }
            match word as u32 {
                init::BLANK => {
                    refuse_if_live(&raw, name)?;
                    let mine = init::INITIALISING as u64 | (nonce() << 32);
                    if raw
                        .u64_at(hdr::INIT)
                        .compare_exchange(word, mine, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return Self::initialise(raw, name, req, mine);
                    }
                }
                init::INITIALISING => match waiting_since {
                    Some((w, since)) if w == word && since.elapsed() > INIT_TIMEOUT => {
                        // The initialiser died half way. Take over with a fresh nonce; if the
                        // original was only slow it writes the same values.
                        refuse_if_live(&raw, name)?;
                        log::warn!("{name}: initialisation stalled, taking it over");
                        let mine = init::INITIALISING as u64 | (nonce() << 32);
                        if raw
                            .u64_at(hdr::INIT)
                            .compare_exchange(word, mine, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            return Self::initialise(raw, name, req, mine);
                        }
                    }
                    Some((w, _)) if w == word => {}
                    _ => waiting_since = Some((word, Instant::now())),
                },
                other => {
                    return Err(RegionError::CorruptHeader {
                        name: name.into(),
                        what: format!("init state {other}"),
                    })
                }
            }
            if start.elapsed() >= limit {
                return Err(RegionError::InitStalled { name: name.into(), timeout: limit });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A finished header whose magic or init word was overwritten: validate it as it is and, if
    /// it holds, put the two words back.
    fn recover(
        raw: RawRegion,
        name: &str,
        req: &GeometryRequest,
        magic: u64,
        word: u64,
    ) -> Result<Region, RegionError> {
        if magic != MAGIC && word as u32 != init::READY {
            // Neither word is ours: this memory holds something else.
            return Err(RegionError::ForeignMagic { name: name.into(), found: magic });
        }
        let region = match Self::validate(raw, name, req) {
            Ok(r) => r,
            Err(RegionError::CorruptHeader { .. }) if magic != MAGIC && magic != 0 => {
                return Err(RegionError::ForeignMagic { name: name.into(), found: magic })
            }
            Err(e) => return Err(e),
        };
        if magic != MAGIC {
            let _ = region.raw.u64_at(hdr::MAGIC).compare_exchange(
                magic,
                MAGIC,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            log::warn!("{name}: the region's magic was overwritten ({magic:#x}); restored it");
        }
        if word as u32 != init::READY {
            let ready = init::READY as u64 | (word & 0xffff_ffff_0000_0000);
            let _ = region.raw.u64_at(hdr::INIT).compare_exchange(
                word,
                ready,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            log::warn!(
                "{name}: the init word was overwritten ({word:#x}) over a complete header; \
                 restored it (the peer table and rings were left alone)"
            );
        }
        Ok(region)
    }

    /// Opens an initialised region for reading only (for `status`): never writes.
    pub fn open_read_only(mem: Arc<dyn SharedMemory>, name: &str) -> Result<Region, RegionError> {
        let raw = RawRegion::new(mem);
        let magic = read_magic(&raw, name)?;
        let word = raw.u64_at(hdr::INIT).load(Ordering::Acquire);
        let ready = word as u32 == init::READY;
        if magic != 0 || ready {
            // A finished header is shown even if its magic or init word was overwritten.
            if magic != MAGIC && !ready {
                return Err(RegionError::ForeignMagic { name: name.into(), found: magic });
            }
            return Self::validate(raw, name, &GeometryRequest::default()).map_err(|e| match e {
                RegionError::CorruptHeader { .. } if magic != MAGIC && magic != 0 => {
                    RegionError::ForeignMagic { name: name.into(), found: magic }
                }
                e => e,
            });
        }
        match word as u32 {
            init::BLANK => Err(RegionError::Blank { name: name.into() }),
            _ => Err(RegionError::InitStalled { name: name.into(), timeout: Duration::ZERO }),
        }
    }

    fn initialise(
        raw: RawRegion,
        name: &str,
        req: &GeometryRequest,
        mine: u64,
    ) -> Result<Region, RegionError> {
        let size = raw.len() as u64;
        let geometry = match req.resolve(size) {
            Ok(g) => g,
            Err(source) => {
                // Give the region back so that a peer with a fitting geometry can initialise it.
                let _ = raw.u64_at(hdr::INIT).compare_exchange(
                    mine,
                    init::BLANK as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
                return Err(RegionError::Geometry { name: name.into(), source });
            }
        };
        let layout = geometry.layout_in(size).expect("checked by resolve");
        let set32 = |o: usize, v: u32| raw.u32_at(o).store(v, Ordering::Relaxed);
        let set64 = |o: usize, v: u64| raw.u64_at(o).store(v, Ordering::Relaxed);
        set32(hdr::VERSION, VERSION);
        set32(hdr::HEADER_SIZE, layout::HEADER_SIZE as u32);
        set32(hdr::INCOMPAT_FEATURES, 0);
        set32(hdr::COMPAT_FEATURES, 0);
        set64(hdr::REGION_SIZE, size);
        set32(hdr::MAX_PEERS, geometry.max_peers);
        set32(hdr::RING_SLOTS, geometry.ring_slots);
        set32(hdr::SLOT_SIZE, geometry.slot_size);
        set32(hdr::MTU, geometry.mtu);
        set64(hdr::PEER_TABLE, layout.peer_table as u64);
        set32(hdr::PEER_ENTRY, layout::PEER_ENTRY_SIZE as u32);
        set64(hdr::INFO_TABLE, layout.info_table as u64);
        set32(hdr::INFO_ENTRY, layout::INFO_ENTRY_SIZE as u32);
        set64(hdr::RINGS, layout.rings as u64);
        set64(hdr::RING_STRIDE, layout.ring_stride as u64);
        let generation = raw.u64_at(hdr::GENERATION).load(Ordering::Relaxed);
        set64(hdr::GENERATION, generation.wrapping_add(1));
        // Peer table and ring control/descriptors start from zero; data needs no clearing.
        raw.zero(layout.peer_table, layout.rings - layout.peer_table).expect("inside layout");
        let region = Region { raw, layout, name: name.into(), backing: None };
        for s in 0..geometry.max_peers {
            for d in (0..geometry.max_peers).filter(|&d| d != s) {
                region.raw.zero(layout.ring(s, d), layout.ring_data).expect("inside layout");
            }
        }
        // Release: the magic marks a finished header (see `attach`); pairs with the acquire in
        // `read_magic`.
        region.raw.u64_at(hdr::MAGIC).store(MAGIC, Ordering::Release);
        // Release: publishes the header written above; pairs with the acquire in `attach`.
        region
            .raw
            .u64_at(hdr::INIT)
            .store(init::READY as u64 | (mine & 0xffff_ffff_0000_0000), Ordering::Release);
        log::info!(
            "{name}: initialised region: {} bytes, {} peers, {} segments of {} bytes per ring, MTU {}",
            size,
            geometry.max_peers,
            geometry.ring_slots,
            geometry.slot_size,
            geometry.mtu
        );
        Ok(region)
    }

    fn validate(raw: RawRegion, name: &str, req: &GeometryRequest) -> Result<Region, RegionError> {
        let get32 = |o: usize| raw.u32_at(o).load(Ordering::Relaxed);
        let get64 = |o: usize| raw.u64_at(o).load(Ordering::Relaxed);
        let corrupt = |what: String| RegionError::CorruptHeader { name: name.into(), what };
        let version = get32(hdr::VERSION);
        if version != VERSION {
            return Err(RegionError::VersionMismatch {
                name: name.into(),
                found: version,
                expected: VERSION,
            });
        }
        if get32(hdr::HEADER_SIZE) as usize != layout::HEADER_SIZE {
            return Err(corrupt(format!("header size {}", get32(hdr::HEADER_SIZE))));
        }
        let incompat = get32(hdr::INCOMPAT_FEATURES);
        if incompat & !layout::KNOWN_INCOMPAT != 0 {
            return Err(RegionError::UnsupportedFeatures {
                name: name.into(),
                found: incompat,
                known: layout::KNOWN_INCOMPAT,
            });
        }
        let geometry = Geometry {
            max_peers: get32(hdr::MAX_PEERS),
            ring_slots: get32(hdr::RING_SLOTS),
            slot_size: get32(hdr::SLOT_SIZE),
            mtu: get32(hdr::MTU),
        };
        let wanted = [
            ("max peers", geometry.max_peers, req.max_peers),
            ("ring slots", geometry.ring_slots, req.ring_slots),
            ("slot size", geometry.slot_size, req.slot_size),
            ("segment MTU", geometry.mtu, req.mtu),
        ];
        for (field, found, expected) in wanted {
            if let Some(expected) = expected.filter(|&e| e != found) {
                return Err(RegionError::GeometryMismatch {
                    name: name.into(),
                    field,
                    found,
                    expected,
                });
            }
        }
        let stored_size = get64(hdr::REGION_SIZE);
        let layout = geometry
            .layout_in(stored_size.min(raw.len() as u64))
            .map_err(|source| RegionError::Geometry { name: name.into(), source })?;
        let offsets = [
            ("peer table offset", get64(hdr::PEER_TABLE), layout.peer_table as u64),
            ("peer entry size", get32(hdr::PEER_ENTRY) as u64, layout::PEER_ENTRY_SIZE as u64),
            ("peer info table offset", get64(hdr::INFO_TABLE), layout.info_table as u64),
            ("peer info entry size", get32(hdr::INFO_ENTRY) as u64, layout::INFO_ENTRY_SIZE as u64),
            ("rings offset", get64(hdr::RINGS), layout.rings as u64),
            ("ring stride", get64(hdr::RING_STRIDE), layout.ring_stride as u64),
        ];
        for (what, found, expected) in offsets {
            if found != expected {
                return Err(corrupt(format!("{what} is {found}, the geometry implies {expected}")));
            }
        }
        Ok(Region { raw, layout, name: name.into(), backing: None })
    }

    /// Attaches a check of what backs the memory (see [`BackingCheck`]).
    pub fn with_backing(mut self, check: Arc<dyn BackingCheck>) -> Region {
        self.backing = Some(check);
        self
    }

    /// What went wrong with the memory's backing since it was mapped, if anything (and if the
    /// backend can tell).
    pub fn backing_problem(&self) -> Option<String> {
        self.backing.as_ref().and_then(|b| b.problem())
    }

    /// The raw view (for the ring module and the backends' fd-level I/O).
    pub fn raw(&self) -> &RawRegion {
        &self.raw
    }

    /// The validated layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.layout.geometry
    }

    /// The name given at attach time (path or device).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times the region has been initialised.
    pub fn generation(&self) -> u64 {
        self.raw.u64_at(hdr::GENERATION).load(Ordering::Relaxed)
    }

    /// The region size recorded in the header.
    pub fn size(&self) -> u64 {
        self.raw.u64_at(hdr::REGION_SIZE).load(Ordering::Relaxed)
    }

    /// Features in the header: (incompatible, compatible).
    pub fn features(&self) -> (u32, u32) {
        (
            self.raw.u32_at(hdr::INCOMPAT_FEATURES).load(Ordering::Relaxed),
            self.raw.u32_at(hdr::COMPAT_FEATURES).load(Ordering::Relaxed),
        )
    }

    /// The slot the doorbell server paired with doorbell id `id`, if any. The field is written
    /// by the server only, but anyone can overwrite it: if several slots claim the id, a slot
    /// without a member (free, left) is preferred, since the server pairs a new id with such a
    /// slot and a member that is up got its id long before.
    pub fn slot_of_doorbell_id(&self, id: u32) -> Option<u32> {
        let mut found = None;
        for s in 0..self.layout.geometry.max_peers {
            let slot = self.peer(s);
            if slot.doorbell_id() != Some(id) {
                continue;
            }
            if !matches!(slot.state(), PeerState::Up | PeerState::Joining) {
                return Some(s);
            }
            found.get_or_insert(s);
        }
        found
    }

    /// The peer-table entry of `id` (`id < max_peers`).
    pub fn peer(&self, id: u32) -> PeerSlot<'_> {
        PeerSlot { raw: &self.raw, base: self.layout.peer(id) }
    }

    /// The peer-info entry of `id` (`id < max_peers`): the owner's IP addresses.
    pub fn peer_info(&self, id: u32) -> info::PeerInfo<'_> {
        info::PeerInfo::new(&self.raw, self.layout.info(id))
    }
}

/// The magic word (0: blank), after checking the header fits at all.
fn read_magic(raw: &RawRegion, name: &str) -> Result<u64, RegionError> {
    if raw.len() < layout::HEADER_SIZE {
        return Err(RegionError::TooSmallForHeader { name: name.into(), size: raw.len() });
    }
    // Acquire: pairs with the release store of the magic at the end of `initialise`.
    Ok(raw.u64_at(hdr::MAGIC).load(Ordering::Acquire))
}

/// Refuses to initialise when the peer table (at its fixed place after the header) holds
/// members that are alive: a live process on this host, or a heartbeat that moves while we
/// watch it for [`LIVE_WATCH`]. Only entries that say joining or up are considered, so a
/// blank region is checked at once.
fn refuse_if_live(raw: &RawRegion, name: &str) -> Result<(), RegionError> {
    let live = live_members(raw, LIVE_WATCH);
    if live > 0 {
        return Err(RegionError::LiveMembers { name: name.into(), live });
    }
    Ok(())
}

fn live_members(raw: &RawRegion, watch: Duration) -> u32 {
    let entries = (raw.len().saturating_sub(layout::HEADER_SIZE) / layout::PEER_ENTRY_SIZE)
        .min(layout::MAX_PEERS_LIMIT as usize);
    let me = crate::sys::host_token();
    let mut live = 0;
    let mut watched = Vec::new();
    for i in 0..entries {
        let base = layout::HEADER_SIZE + i * layout::PEER_ENTRY_SIZE;
        let state =
            PeerState::from_raw(raw.u32_at(base + peer::STATE).load(Ordering::Acquire) & 0xff);
        if !matches!(state, PeerState::Up | PeerState::Joining) {
            continue;
        }
        let host = raw.u64_at(base + peer::HOST).load(Ordering::Relaxed);
        let pid = raw.u32_at(base + peer::PID).load(Ordering::Relaxed);
        if host != 0 && host == me && pid != 0 {
            if pid != std::process::id() && crate::sys::process_exists(pid) {
                live += 1;
            }
            continue;
        }
        watched.push((base, raw.u64_at(base + peer::HEARTBEAT).load(Ordering::Relaxed)));
    }
    if watched.is_empty() {
        return live;
    }
    let deadline = Instant::now() + watch;
    while Instant::now() < deadline && !watched.is_empty() {
        std::thread::sleep(Duration::from_millis(10));
        watched.retain(|&(base, hb)| {
            let moved = raw.u64_at(base + peer::HEARTBEAT).load(Ordering::Relaxed) != hb;
            live += u32::from(moved);
            !moved
        });
    }
    live
}

/// A 32-bit value that differs between processes and attempts (for the init word).
fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0);
    let n = (t ^ ((std::process::id() as u64) << 16)) & 0xffff_ffff;
    n.max(1)
}

/// A peer-table entry. Fields are single-writer (the owner) except the incarnation, which
/// claimers change by compare-and-swap.
#[derive(Clone, Copy)]
pub struct PeerSlot<'r> {
    raw: &'r RawRegion,
    base: usize,
}

/// Everything `status` shows of one peer entry, read at one moment.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct PeerSnapshot {
    /// Slot state as its owner wrote it (`status` judges liveness separately).
    #[serde(rename = "slot_state")]
    pub state: PeerState,
    /// Member kind.
    pub kind: PeerKind,
    /// Incarnation counter.
    pub incarnation: u64,
    /// Owner's process id (in its own namespace or VM).
    pub pid: u32,
    /// Heartbeat counter.
    pub heartbeat: u64,
    /// Wall-clock ms of the last heartbeat.
    pub heartbeat_ms: u64,
    /// MAC address.
    #[serde(
        serialize_with = "crate::mac::serialize",
        deserialize_with = "crate::mac::deserialize"
    )]
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Features.
    pub features: u32,
    /// Doorbell id the server paired with this slot.
    pub doorbell_id: Option<u32>,
}

impl<'r> PeerSlot<'r> {
    fn u32f(&self, f: usize) -> &'r std::sync::atomic::AtomicU32 {
        self.raw.u32_at(self.base + f)
    }
    fn u64f(&self, f: usize) -> &'r std::sync::atomic::AtomicU64 {
        self.raw.u64_at(self.base + f)
    }

    /// Current incarnation.
    pub fn incarnation(&self) -> u64 {
        // Acquire: pairs with the AcqRel claim, so a new owner's later writes are ordered after.
        self.u64f(peer::INCARNATION).load(Ordering::Acquire)
    }

    /// Tries to claim the slot: bumps the incarnation from `seen` to `seen + 1`. Exactly one of
    /// several concurrent claimers that saw the same value wins.
    pub fn try_claim(&self, seen: u64) -> Option<u64> {
        let next = seen.wrapping_add(1).max(1);
        self.u64f(peer::INCARNATION)
            .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| next)
    }

    /// Writes our incarnation back over a value someone else stored (owner only, when it has
    /// established that nobody else holds the slot).
    pub fn restore_incarnation(&self, incarnation: u64) {
        self.u64f(peer::INCARNATION).store(incarnation, Ordering::Release);
    }

    /// The raw state word: state in the low 8 bits, the low 24 bits of the incarnation it was
    /// written under above them.
    pub fn state_word(&self) -> u32 {
        self.u32f(peer::STATE).load(Ordering::Acquire)
    }

    /// Slot state.
    pub fn state(&self) -> PeerState {
        PeerState::from_raw(self.u32f(peer::STATE).load(Ordering::Acquire) & 0xff)
    }

    /// Sets the slot state (owner only), tagged with the owner's incarnation. Release:
    /// everything the owner wrote before (its MAC, ring resets) is visible to whoever sees the
    /// new state.
    pub fn set_state(&self, s: PeerState, incarnation: u64) {
        let tag = (incarnation as u32 & 0x00ff_ffff) << 8;
        self.u32f(peer::STATE).store(tag | (s.to_raw() & 0xff), Ordering::Release);
    }

    /// Whether the slot is free to claim without watching anyone's heartbeat: never used, or
    /// left, by the incarnation that is still in the slot. Once a claimer has bumped the
    /// incarnation the tags no longer match, so a second claimer cannot take the slot too.
    pub fn is_free(&self, incarnation: u64) -> bool {
        let word = self.u32f(peer::STATE).load(Ordering::Acquire);
        let state = PeerState::from_raw(word & 0xff);
        matches!(state, PeerState::Free | PeerState::Left)
            && word >> 8 == (incarnation as u32 & 0x00ff_ffff)
    }

    /// Heartbeat counter.
    pub fn heartbeat(&self) -> u64 {
        self.u64f(peer::HEARTBEAT).load(Ordering::Relaxed)
    }

    /// Bumps the heartbeat (owner only).
    pub fn beat(&self, now_ms: u64) {
        let hb = self.u64f(peer::HEARTBEAT);
        hb.store(hb.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        self.u64f(peer::HEARTBEAT_MS).store(now_ms, Ordering::Relaxed);
    }

    /// Sets the heartbeat to the owner's own counter (owner only): an owner that keeps the
    /// count itself can tell when someone else moved it.
    pub fn set_heartbeat(&self, value: u64, now_ms: u64) {
        self.u64f(peer::HEARTBEAT).store(value, Ordering::Relaxed);
        self.u64f(peer::HEARTBEAT_MS).store(now_ms, Ordering::Relaxed);
    }

    /// Wall-clock ms of the last heartbeat, as the owner wrote it.
    pub fn heartbeat_ms(&self) -> u64 {
        self.u64f(peer::HEARTBEAT_MS).load(Ordering::Relaxed)
    }

    /// MTU, features and kind as the owner wrote them.
    pub fn params(&self) -> (u32, u32, u32) {
        (
            self.u32f(peer::MTU).load(Ordering::Relaxed),
            self.u32f(peer::FEATURES).load(Ordering::Relaxed),
            self.u32f(peer::KIND).load(Ordering::Relaxed),
        )
    }

    /// Marks the owner (pid and this host's token) right after a claim, so that the slot names
    /// its new owner before anything else is written (owner only).
    pub fn set_owner(&self, pid: u32) {
        self.u32f(peer::PID).store(pid, Ordering::Relaxed);
        self.u64f(peer::HOST).store(crate::sys::host_token(), Ordering::Relaxed);
    }

    /// Writes the owner's identity without touching its counters (owner only: a repair).
    pub fn set_identity(&self, mac: [u8; 6], mtu: u32, features: u32, kind: PeerKind, pid: u32) {
        let mut m = [0u8; 8];
        m[..6].copy_from_slice(&mac);
        self.u64f(peer::MAC).store(u64::from_le_bytes(m), Ordering::Relaxed);
        self.u32f(peer::MTU).store(mtu, Ordering::Relaxed);
        self.u32f(peer::FEATURES).store(features, Ordering::Relaxed);
        self.u32f(peer::KIND).store(kind as u32, Ordering::Relaxed);
        self.set_owner(pid);
    }

    /// MAC address.
    pub fn mac(&self) -> [u8; 6] {
        let v = self.u64f(peer::MAC).load(Ordering::Relaxed).to_le_bytes();
        [v[0], v[1], v[2], v[3], v[4], v[5]]
    }

    /// Writes the owner's identity and clears its counters (owner only, before it goes up).
    pub fn set_info(&self, mac: [u8; 6], mtu: u32, features: u32, kind: PeerKind, pid: u32) {
        self.set_identity(mac, mtu, features, kind, pid);
        for i in 0..layout::PEER_COUNTERS {
            self.u64f(peer::COUNTERS + i * 8).store(0, Ordering::Relaxed);
        }
        for i in 0..layout::DOORBELL_COUNTERS {
            self.u64f(peer::DOORBELL_COUNTERS + i * 8).store(0, Ordering::Relaxed);
        }
    }

    /// Stores all counters, indexed by [`layout::PeerCounter`] (owner only).
    pub fn store_counters(&self, values: &[u64; layout::PEER_COUNTERS]) {
        for (i, &v) in values.iter().enumerate() {
            self.u64f(peer::COUNTERS + i * 8).store(v, Ordering::Relaxed);
        }
    }

    /// Reads a counter.
    pub fn counter(&self, c: layout::PeerCounter) -> u64 {
        self.u64f(peer::COUNTERS + c as usize * 8).load(Ordering::Relaxed)
    }

    /// Stores all doorbell counters, indexed by [`layout::DoorbellCounter`] (owner only).
    pub fn store_doorbell_counters(&self, values: &[u64; layout::DOORBELL_COUNTERS]) {
        for (i, &v) in values.iter().enumerate() {
            self.u64f(peer::DOORBELL_COUNTERS + i * 8).store(v, Ordering::Relaxed);
        }
    }

    /// Reads a doorbell counter.
    pub fn doorbell_counter(&self, c: layout::DoorbellCounter) -> u64 {
        self.u64f(peer::DOORBELL_COUNTERS + c as usize * 8).load(Ordering::Relaxed)
    }

    /// The doorbell id the server assigned with this slot, if any.
    pub fn doorbell_id(&self) -> Option<u32> {
        // Acquire: pairs with the server's release store, made before it told anyone the id.
        let v = self.u32f(peer::DOORBELL_ID).load(Ordering::Acquire);
        v.checked_sub(1)
    }

    /// Records the doorbell id of the client the server put in this slot (server only).
    pub fn set_doorbell_id(&self, id: Option<u32>) {
        let v = id.map_or(0, |i| i.wrapping_add(1));
        self.u32f(peer::DOORBELL_ID).store(v, Ordering::Release);
    }

    /// The owner's host token and pid, for the same-host liveness shortcut.
    pub fn owner(&self) -> (u64, u32) {
        (
            self.u64f(peer::HOST).load(Ordering::Relaxed),
            self.u32f(peer::PID).load(Ordering::Relaxed),
        )
    }

    /// Reads the whole entry.
    pub fn snapshot(&self) -> PeerSnapshot {
        PeerSnapshot {
            state: self.state(),
            kind: PeerKind::from_raw(self.u32f(peer::KIND).load(Ordering::Relaxed)),
            incarnation: self.incarnation(),
            pid: self.u32f(peer::PID).load(Ordering::Relaxed),
            heartbeat: self.heartbeat(),
            heartbeat_ms: self.u64f(peer::HEARTBEAT_MS).load(Ordering::Relaxed),
            mac: self.mac(),
            mtu: self.u32f(peer::MTU).load(Ordering::Relaxed),
            features: self.u32f(peer::FEATURES).load(Ordering::Relaxed),
            doorbell_id: self.doorbell_id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heap(size: usize) -> Arc<dyn SharedMemory> {
        Arc::new(HeapMemory::new(size))
    }

    #[test]
    fn test_attach_blank_initialises_and_second_attach_validates() {
        let mem = heap(32 << 20);
        let a = Region::attach(mem.clone(), "t", &GeometryRequest::default()).unwrap();
        assert_eq!(a.geometry().max_peers, 8);
        assert_eq!(a.generation(), 1);
        let b = Region::attach(mem, "t", &GeometryRequest::default()).unwrap();
        assert_eq!(a.geometry(), b.geometry());
        assert_eq!(b.generation(), 1);
    }

    #[test]
    fn test_concurrent_attach_initialises_once() {
        let mem = heap(32 << 20);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = mem.clone();
                std::thread::spawn(move || {
                    Region::attach(m, "t", &GeometryRequest::default()).map(|r| r.geometry())
                })
            })
            .collect();
        let geoms: Vec<_> = handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
        assert!(geoms.windows(2).all(|w| w[0] == w[1]));
        let r = Region::attach(mem, "t", &GeometryRequest::default()).unwrap();
        assert_eq!(r.generation(), 1);
    }

    #[test]
    fn test_foreign_magic_is_refused_with_both_values() {
        let mem = heap(1 << 20);
        RawRegion::new(mem.clone()).copy_in(0, b"NOTOURS!").unwrap();
        let e = Region::attach(mem, "f", &GeometryRequest::default()).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, RegionError::ForeignMagic { .. }), "{msg}");
        assert!(msg.contains("0x21535255") && msg.contains("IVNETSEG"), "{msg}");
    }

    #[test]
    fn test_geometry_mismatch_names_both_values() {
        let mem = heap(32 << 20);
        Region::attach(mem.clone(), "g", &GeometryRequest::default()).unwrap();
        let req = GeometryRequest { max_peers: Some(4), ..Default::default() };
        let e = Region::attach(mem, "g", &req).err().unwrap();
        assert!(e.to_string().contains("max peers 8, this peer expects 4"), "{e}");
    }

    #[test]
    fn test_version_mismatch_is_refused() {
        let mem = heap(32 << 20);
        let r = Region::attach(mem.clone(), "v", &GeometryRequest::default()).unwrap();
        r.raw().u32_at(hdr::VERSION).store(7, Ordering::Relaxed);
        let e = Region::attach(mem, "v", &GeometryRequest::default()).err().unwrap();
        let want = format!("version 7, this ivnet understands version {VERSION}");
        assert!(e.to_string().contains(&want), "{e}");
    }

    #[test]
    fn test_too_small_blank_region_is_refused_and_left_blank() {
        let mem = heap(64 << 10);
        let e = Region::attach(mem.clone(), "s", &GeometryRequest::default()).err().unwrap();
        assert!(e.to_string().contains("use a larger --size"), "{e}");
        let word = RawRegion::new(mem).u64_at(hdr::INIT).load(Ordering::Relaxed);
        assert_eq!(word as u32, init::BLANK);
    }

    #[test]
    fn test_corrupt_offsets_are_refused() {
        let mem = heap(32 << 20);
        let r = Region::attach(mem.clone(), "c", &GeometryRequest::default()).unwrap();
        r.raw().u64_at(hdr::RINGS).store(1 << 40, Ordering::Relaxed);
        let e = Region::attach(mem, "c", &GeometryRequest::default()).err().unwrap();
        assert!(matches!(e, RegionError::CorruptHeader { .. }), "{e}");
    }

    #[test]
    fn test_claim_is_exclusive() {
        let r = Region::attach(heap(32 << 20), "p", &GeometryRequest::default()).unwrap();
        let slot = r.peer(3);
        let seen = slot.incarnation();
        assert_eq!(slot.try_claim(seen), Some(seen + 1));
        assert_eq!(slot.try_claim(seen), None);
    }

    /// A member that is up, as far as the table shows (pid: a live process on this host).
    fn put_member(r: &Region, id: u32, pid: u32) {
        let slot = r.peer(id);
        let inc = slot.try_claim(slot.incarnation()).unwrap();
        slot.set_info([2, 0, 0, 0, 0, id as u8], 1500, 0, PeerKind::Agent, pid);
        slot.beat(1);
        slot.set_state(PeerState::Up, inc);
    }

    #[test]
    fn test_init_word_set_back_to_blank_is_restored_not_reinitialised() {
        for scribble in [init::BLANK as u64, init::INITIALISING as u64 | (77 << 32), 9] {
            let mem = heap(32 << 20);
            let r = Region::attach(mem.clone(), "b", &GeometryRequest::default()).unwrap();
            put_member(&r, 2, std::process::id());
            r.raw().u64_at(hdr::INIT).store(scribble, Ordering::Relaxed);
            let again = Region::attach(mem.clone(), "b", &GeometryRequest::default()).unwrap();
            assert_eq!(again.generation(), 1, "re-initialised after init word {scribble:#x}");
            assert_eq!(again.peer(2).state(), PeerState::Up, "the peer table was zeroed");
            let word = r.raw().u64_at(hdr::INIT).load(Ordering::Relaxed);
            assert_eq!(word as u32, init::READY, "init word not restored");
        }
    }

    #[test]
    fn test_overwritten_magic_over_a_ready_header_is_restored() {
        for scribble in [0, 0x1234_5678] {
            let mem = heap(32 << 20);
            let r = Region::attach(mem.clone(), "m", &GeometryRequest::default()).unwrap();
            r.raw().u64_at(hdr::MAGIC).store(scribble, Ordering::Relaxed);
            let again = Region::attach(mem.clone(), "m", &GeometryRequest::default()).unwrap();
            assert_eq!(again.generation(), 1);
            assert_eq!(r.raw().u64_at(hdr::MAGIC).load(Ordering::Relaxed), MAGIC);
        }
    }

    #[test]
    fn test_blank_header_over_live_members_is_not_initialised() {
        let mem = heap(32 << 20);
        let r = Region::attach(mem.clone(), "l", &GeometryRequest::default()).unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        put_member(&r, 1, child.id());
        // Both words that mark a finished header are gone.
        r.raw().u64_at(hdr::MAGIC).store(0, Ordering::Relaxed);
        r.raw().u64_at(hdr::INIT).store(0, Ordering::Relaxed);
        let e = Region::attach(mem.clone(), "l", &GeometryRequest::default()).err();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(e, Some(RegionError::LiveMembers { live: 1, .. })),
            "{:?}",
            e.map(|e| e.to_string())
        );
        assert_eq!(r.peer(1).state(), PeerState::Up, "the table was zeroed");
        // Once the member is gone, the blank region may be initialised again.
        let again = Region::attach(mem, "l", &GeometryRequest::default()).unwrap();
        assert_eq!(again.generation(), 2);
    }

    #[test]
    fn test_attach_gives_up_when_the_init_nonce_keeps_changing() {
        let mem = heap(32 << 20);
        let raw = RawRegion::new(mem.clone());
        // Someone is initialising before we look (else a slow-starting flipper would let the
        // attach find a blank region and initialise it).
        raw.u64_at(hdr::INIT).store(init::INITIALISING as u64, Ordering::Relaxed);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let flipper = std::thread::spawn(move || {
            let mut n = 1u64;
            while !s2.load(Ordering::Relaxed) {
                raw.u64_at(hdr::INIT)
                    .store(init::INITIALISING as u64 | (n << 32), Ordering::Relaxed);
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let start = Instant::now();
        let limit = Duration::from_millis(300);
        let e = Region::attach_within(mem, "n", &GeometryRequest::default(), limit).err();
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(matches!(e, Some(RegionError::InitStalled { .. })));
        // Bounded: well under the stall takeover's own 2 s, which the changing nonce defeats.
        assert!(start.elapsed() < INIT_TIMEOUT, "waited {:?}", start.elapsed());
    }

    #[test]
    fn test_doorbell_id_written_into_a_live_slot_does_not_hide_the_real_one() {
        let r = Region::attach(heap(32 << 20), "d", &GeometryRequest::default()).unwrap();
        put_member(&r, 0, std::process::id());
        r.peer(0).set_doorbell_id(Some(3));
        r.peer(4).set_doorbell_id(Some(7));
        assert_eq!(r.slot_of_doorbell_id(7), Some(4));
        // A scribbler writes 7 into the live slot 0: the free slot 4 is still found.
        r.peer(0).set_doorbell_id(Some(7));
        assert_eq!(r.slot_of_doorbell_id(7), Some(4));
        assert_eq!(r.slot_of_doorbell_id(3), None);
    }
}
