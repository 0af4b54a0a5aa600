//! `ivnet status`: the header, every peer and every ring of a region, read from outside (no
//! TAP, no root; a readable file suffices). Reads only: it never writes to the region.
//!
//! A peer's state is judged, not just read: a slot that says `up` is shown `down` when its
//! owner's process is gone from this host, or when its heartbeat is older than
//! [`STALE_AFTER`] and does not move while `status` watches it for a moment (the wall clock of
//! another VM may differ from ours, so age alone does not condemn a member elsewhere).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::region::layout::{DoorbellCounter, PeerCounter};
use crate::region::ring::RingSnapshot;
use crate::region::{Geometry, PeerSnapshot, PeerState, Region};

/// A heartbeat older than this (by the wall clock) makes `status` look closer at a member.
pub const STALE_AFTER: Duration = Duration::from_secs(2);
/// How long `status` watches heartbeat counters of members whose wall-clock age looks stale.
const HEARTBEAT_WATCH: Duration = Duration::from_millis(300);

/// Whether a member is there, as `status` judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Never used.
    Free,
    /// Claimed, not up yet.
    Joining,
    /// Up and heartbeating.
    Up,
    /// The slot says up, but its owner is gone (see `down_reason`).
    Down,
    /// Left cleanly.
    Left,
    /// A state this build does not know.
    Unknown,
}

/// One peer as `status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer id.
    pub id: u32,
    /// Judged state: the slot's state, except that a slot whose owner is gone is `down`.
    pub state: Liveness,
    /// Why a slot that says up is shown down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_reason: Option<String>,
    /// The entry.
    #[serde(flatten)]
    pub entry: PeerSnapshot,
    /// Age of the last heartbeat by the wall clock, in ms (approximate across VMs).
    pub heartbeat_age_ms: Option<u64>,
    /// The offloads it accepts as-is (from `features`): `none`, or e.g. `csum,tso4,tso6`.
    pub offloads: String,
    /// The owner's counters.
    pub counters: PeerCounters,
    /// The owner's doorbell counters.
    pub doorbells: DoorbellCounters,
    /// The owner's IP addresses with prefix length (from the peer info table; empty when it
    /// published none, e.g. an older member).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Counters of a peer's local interface and switch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerCounters {
    /// Frames read from the local interface.
    pub local_rx_frames: u64,
    /// Bytes read from the local interface.
    pub local_rx_bytes: u64,
    /// Frames written to the local interface.
    pub local_tx_frames: u64,
    /// Bytes written to the local interface.
    pub local_tx_bytes: u64,
    /// Frames flooded.
    pub flooded: u64,
    /// Dropped: no peer up.
    pub drop_no_peer: u64,
    /// Dropped: destination behind the member itself.
    pub drop_to_self: u64,
    /// Dropped: larger than the MTU.
    pub drop_oversize: u64,
    /// Dropped: shorter than an Ethernet header.
    pub drop_runt: u64,
    /// Local interface errors.
    pub local_io_errors: u64,
    /// Frames the kernel dropped before the agent read them (TAP tx_dropped).
    pub local_kernel_drops: u64,
    /// Dropped: an offload header that was invalid, or a frame that could not be segmented or
    /// checksummed for a peer that needed it.
    pub drop_offload: u64,
}

/// Doorbell counters of a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoorbellCounters {
    /// Doorbells rung.
    pub rung: u64,
    /// Publishes that needed no doorbell.
    pub suppressed: u64,
    /// Wake-ups by a doorbell.
    pub wakeups: u64,
    /// Busy-poll rounds that found work.
    pub spins_with_work: u64,
}

/// One ring as `status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingStatus {
    /// Producer.
    pub src: u32,
    /// Consumer.
    pub dst: u32,
    /// Control part and counters.
    #[serde(flatten)]
    pub ring: RingSnapshot,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Region name (path).
    pub region: String,
    /// Layout version.
    pub version: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Initialisations so far.
    pub generation: u64,
    /// Required features.
    pub incompat_features: u32,
    /// Optional features.
    pub compat_features: u32,
    /// Geometry.
    pub geometry: Geometry,
    /// Peers that are or were members (never-used slots are left out).
    pub peers: Vec<PeerStatus>,
    /// Rings between members that are or were present, with any traffic or fill.
    pub rings: Vec<RingStatus>,
    /// The agent that answered, when the status came from its control socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<crate::control::AgentInfo>,
}

impl Status {
    /// Reads the region.
    pub fn read(region: &Region) -> Status {
        let g = region.geometry();
        let now_ms = crate::sys::wall_ms();
        let peers: Vec<PeerStatus> = (0..g.max_peers)
            .filter_map(|id| {
                let slot = region.peer(id);
                let entry = slot.snapshot();
                if entry.state == PeerState::Free && entry.incarnation == 0 {
                    return None;
                }
                let c = |k: PeerCounter| slot.counter(k);
                let addresses = match region.peer_info(id).read(entry.incarnation) {
                    crate::region::info::InfoRead::Current(a) => {
                        a.addrs.iter().map(|(ip, p)| format!("{ip}/{p}")).collect()
                    }
                    _ => Vec::new(),
                };
                let d = |k: DoorbellCounter| slot.doorbell_counter(k);
                Some(PeerStatus {
                    id,
                    offloads: crate::offload::Features::from_bits_truncate(entry.features)
                        .to_string(),
                    state: Liveness::Unknown,
                    down_reason: None,
                    heartbeat_age_ms: (entry.heartbeat_ms != 0)
                        .then(|| now_ms.saturating_sub(entry.heartbeat_ms)),
                    entry,
                    counters: PeerCounters {
                        local_rx_frames: c(PeerCounter::LocalRxFrames),
                        local_rx_bytes: c(PeerCounter::LocalRxBytes),
                        local_tx_frames: c(PeerCounter::LocalTxFrames),
                        local_tx_bytes: c(PeerCounter::LocalTxBytes),
                        flooded: c(PeerCounter::Flooded),
                        drop_no_peer: c(PeerCounter::DropNoPeer),
                        drop_to_self: c(PeerCounter::DropToSelf),
                        drop_oversize: c(PeerCounter::DropOversize),
                        drop_runt: c(PeerCounter::DropRunt),
                        local_io_errors: c(PeerCounter::LocalIoErrors),
                        local_kernel_drops: c(PeerCounter::LocalKernelDrops),
                        drop_offload: c(PeerCounter::DropOffload),
                    },
                    doorbells: DoorbellCounters {
                        rung: d(DoorbellCounter::Rung),
                        suppressed: d(DoorbellCounter::Suppressed),
                        wakeups: d(DoorbellCounter::Wakeups),
                        spins_with_work: d(DoorbellCounter::SpinsWithWork),
                    },
                    addresses,
                })
            })
            .collect();
        let mut peers = peers;
        judge(region, &mut peers);
        let ids: Vec<u32> = peers.iter().map(|p| p.id).collect();
        let mut rings = Vec::new();
        for &src in &ids {
            for &dst in ids.iter().filter(|&&d| d != src) {
                rings.push(RingStatus { src, dst, ring: RingSnapshot::read(region, src, dst) });
            }
        }
        let (incompat_features, compat_features) = region.features();
        Status {
            region: region.name().to_string(),
            version: crate::region::layout::VERSION,
            size: region.size(),
            generation: region.generation(),
            incompat_features,
            compat_features,
            geometry: g,
            peers,
            rings,
            agent: None,
        }
    }

    /// Human-readable form.
    pub fn to_text(&self) -> String {
        let g = &self.geometry;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "region {}: layout v{}, {} bytes, generation {}, features {:#x}/{:#x}",
            self.region,
            self.version,
            self.size,
            self.generation,
            self.incompat_features,
            self.compat_features
        );
        let _ = writeln!(
            s,
            "geometry: {} peer slots, {} segments of {} bytes per ring, segment MTU {}",
            g.max_peers, g.ring_slots, g.slot_size, g.mtu
        );
        if let Some(a) = &self.agent {
            s.push_str(&a.to_text());
        }
        if self.peers.is_empty() {
            let _ = writeln!(s, "no peers have joined");
            return s;
        }
        let _ = writeln!(
            s,
            "\n{:>4}  {:<8} {:<6} {:<17} {:>11} {:>8} {:>9} {:>6} {:<37} {:>10} {:>10} {:>8}",
            "peer",
            "state",
            "kind",
            "MAC",
            "incarnation",
            "pid",
            "hb age",
            "mtu",
            "offloads",
            "tap rx",
            "tap tx",
            "drops"
        );
        for p in &self.peers {
            let e = &p.entry;
            let age = match p.heartbeat_age_ms {
                Some(ms) if ms < 10_000 => format!("{:.2}s", ms as f64 / 1000.0),
                Some(ms) => format!("{}s", ms / 1000),
                None => "-".into(),
            };
            let c = &p.counters;
            // The counters come from the region, which any member can write: they must not
            // overflow the sum (found by fuzz/fuzz_targets/region.rs).
            let drops = [
                c.drop_to_self,
                c.drop_oversize,
                c.drop_runt,
                c.drop_offload,
                c.local_kernel_drops,
            ]
            .iter()
            .fold(c.drop_no_peer, |sum, &n| sum.saturating_add(n));
            // A stack peer has no TAP: its local counters are smoltcp's, not shown as TAP ones.
            let has_tap = e.kind != crate::region::PeerKind::Stack;
            let tap = |v: u64| if has_tap { v.to_string() } else { "-".into() };
            let _ = writeln!(
                s,
                "{:>4}  {:<8} {:<6} {:<17} {:>11} {:>8} {:>9} {:>6} {:<37} {:>10} {:>10} {:>8}",
                p.id,
                format!("{:?}", p.state).to_lowercase(),
                format!("{:?}", e.kind).to_lowercase(),
                crate::mac::Mac(e.mac).to_string(),
                e.incarnation,
                e.pid,
                age,
                e.mtu,
                p.offloads,
                tap(c.local_rx_frames),
                tap(c.local_tx_frames),
                drops
            );
            if let Some(why) = &p.down_reason {
                let _ = writeln!(s, "      down: {why}");
            }
            if !p.addresses.is_empty() {
                let _ = writeln!(s, "      addresses: {}", p.addresses.join(" "));
            }
            if drops > 0 {
                let _ = writeln!(
                    s,
                    "      drops: no peer up {}, to self {}, oversize {}, runt {}, offload {}, kernel (TAP read too slowly) {}",
                    c.drop_no_peer, c.drop_to_self, c.drop_oversize, c.drop_runt, c.drop_offload, c.local_kernel_drops
                );
            }
            let d = &p.doorbells;
            if let Some(id) = e.doorbell_id {
                let _ = writeln!(
                    s,
                    "      doorbell id {id}: rung {} suppressed {} wake-ups {} spins with work {}",
                    d.rung, d.suppressed, d.wakeups, d.spins_with_work
                );
            }
        }
        let _ = writeln!(
            s,
            "\n{:>8}  {:>11} {:>10} {:>14} {:>10} {:>14}  drops (full/down/mtu | stale/corrupt/deliver/size/offload/source)",
            "ring", "fill", "tx frames", "tx bytes", "rx frames", "rx bytes"
        );
        for r in &self.rings {
            let x = &r.ring;
            let fill = match x.fill {
                Some(f) => format!("{}/{}", f, x.slots),
                None => "corrupt".into(),
            };
            let _ = writeln!(
                s,
                "{:>8}  {:>11} {:>10} {:>14} {:>10} {:>14}  {}/{}/{} | {}/{}/{}/{}/{}/{}",
                format!("{}->{}", r.src, r.dst),
                fill,
                x.tx_frames,
                x.tx_bytes,
                x.rx_frames,
                x.rx_bytes,
                x.tx_drop_full,
                x.tx_drop_down,
                x.tx_drop_mtu,
                x.rx_drop_stale,
                x.rx_corrupt,
                x.rx_drop_deliver,
                x.rx_drop_size,
                x.rx_drop_offload,
                x.rx_drop_source
            );
        }
        s
    }
}

/// Judges every peer's liveness (see the module docs).
fn judge(region: &Region, peers: &mut [PeerStatus]) {
    let me = crate::sys::host_token();
    let mut watch = Vec::new();
    for (i, p) in peers.iter_mut().enumerate() {
        let e = &p.entry;
        p.state = match e.state {
            PeerState::Free => Liveness::Free,
            PeerState::Joining => Liveness::Joining,
            PeerState::Left => Liveness::Left,
            PeerState::Unknown => Liveness::Unknown,
            PeerState::Up => Liveness::Up,
        };
        if e.state != PeerState::Up {
            continue;
        }
        let (host, pid) = region.peer(p.id).owner();
        let stale = p.heartbeat_age_ms.is_none_or(|a| a > STALE_AFTER.as_millis() as u64);
        if host != 0 && host == me && pid != 0 {
            // Same host and pid namespace: the process answers for itself, and the clocks agree.
            if !crate::sys::process_exists(pid) {
                p.state = Liveness::Down;
                p.down_reason = Some(format!("process {pid} is gone"));
            } else if stale {
                p.state = Liveness::Down;
                p.down_reason = Some(format!(
                    "process {pid} runs but has not heartbeaten for {:.1} s (stopped?)",
                    p.heartbeat_age_ms.unwrap_or(0) as f64 / 1000.0
                ));
            }
        } else if stale {
            watch.push((i, e.heartbeat));
        }
    }
    if watch.is_empty() {
        return;
    }
    // Members elsewhere with an old-looking heartbeat: does the counter move?
    let deadline = Instant::now() + HEARTBEAT_WATCH;
    while Instant::now() < deadline && !watch.is_empty() {
        std::thread::sleep(Duration::from_millis(20));
        watch.retain(|&(i, hb)| region.peer(peers[i].id).heartbeat() == hb);
    }
    for (i, _) in watch {
        let p = &mut peers[i];
        p.state = Liveness::Down;
        p.down_reason = Some(format!(
            "its heartbeat has not moved for {:.1} s",
            p.heartbeat_age_ms.unwrap_or(0) as f64 / 1000.0
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{GeometryRequest, HeapMemory, PeerKind};
    use std::sync::Arc;

    fn member(r: &Region, id: u32, pid: u32, age_ms: u64) {
        let slot = r.peer(id);
        let inc = slot.try_claim(slot.incarnation()).unwrap();
        slot.set_info([2, 0, 0, 0, 0, id as u8], 1500, 0, PeerKind::Agent, pid);
        slot.set_heartbeat(7, crate::sys::wall_ms() - age_ms);
        slot.set_state(PeerState::Up, inc);
    }

    fn state_of(st: &Status, id: u32) -> Liveness {
        st.peers.iter().find(|p| p.id == id).unwrap().state
    }

    #[test]
    fn test_status_judges_liveness_not_only_the_state_word() {
        let req = GeometryRequest { max_peers: Some(4), ..Default::default() };
        let r = Region::attach(Arc::new(HeapMemory::new(4 << 20)), "s", &req).unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        member(&r, 0, std::process::id(), 0);
        member(&r, 1, dead, 5000);
        member(&r, 2, dead, 0);
        // A member elsewhere (another VM): its clock says 5 s, but its counter moves.
        member(&r, 3, 1, 5000);
        r.raw()
            .u64_at(r.layout().peer(3) + crate::region::layout::peer::HOST)
            .store(0xfeed, std::sync::atomic::Ordering::Relaxed);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r2, s2) = (r.clone(), stop.clone());
        let beater = std::thread::spawn(move || {
            let mut hb = 8;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                r2.peer(3).set_heartbeat(hb, 1);
                hb += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let st = Status::read(&r);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        beater.join().unwrap();
        assert_eq!(state_of(&st, 0), Liveness::Up);
        assert_eq!(state_of(&st, 1), Liveness::Down, "pid gone, heartbeat 5 s old");
        assert_eq!(state_of(&st, 2), Liveness::Down, "pid gone");
        assert_eq!(state_of(&st, 3), Liveness::Up, "a moving heartbeat elsewhere is up");
        assert!(st.to_text().contains(&format!("process {dead} is gone")));
        // Now the member elsewhere stops too.
        let st = Status::read(&r);
        assert_eq!(state_of(&st, 3), Liveness::Down);
    }
}
