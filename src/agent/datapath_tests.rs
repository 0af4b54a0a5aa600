//! Data-path logic over an in-memory region and fake TAPs: no root, no kernel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::datapath::{Datapath, DatapathOptions};
use super::link::{claim, Claim};
use super::tap::FakeTap;
use crate::doorbell::{NoDoorbells, Notifier, VECTOR_DATA};
use crate::mac::Mac;
use crate::offload::{Features, Gso, VnetHdr, VNET_HDR_LEN};
use crate::region::layout::Geometry;
use crate::region::layout::PeerCounter;
use crate::region::ring::{Producer, RingSnapshot};
use crate::region::{GeometryRequest, HeapMemory, PeerKind, Region};

fn region(peers: u32, slots: u32) -> Region {
    let req = GeometryRequest {
        max_peers: Some(peers),
        ring_slots: Some(slots),
        slot_size: Some(Geometry::min_slot_size(slots, 9000).max(2048)),
        mtu: Some(9000),
    };
    let size = req.resolve(u64::MAX).unwrap().layout().unwrap().total;
    Region::attach(Arc::new(HeapMemory::new(size)), "dp-test", &req).unwrap()
}

fn member(r: &Region, id: u32) -> Datapath<FakeTap> {
    let c: Claim = claim(r, Some(id), Duration::from_millis(50)).unwrap();
    let opts = DatapathOptions { mtu: 9000, ..Default::default() };
    Datapath::join(r.clone(), c, FakeTap::default(), Mac::for_peer(id).0, PeerKind::Agent, opts)
}

/// An Ethernet frame from `src` to `dst` with a recognisable payload.
fn frame(dst: [u8; 6], src: [u8; 6], tag: u8, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(len, tag);
    f
}

fn mac(id: u32) -> [u8; 6] {
    Mac::for_peer(id).0
}

/// One round of every member: links, tx, rx, publish.
fn round(members: &mut [&mut Datapath<FakeTap>]) {
    round_at_all(members, Instant::now());
}

/// One round of every member at `now` (also for the link tests).
pub(super) fn round_at_all(members: &mut [&mut Datapath<FakeTap>], now: Instant) {
    let readers = vec![true; members.len()];
    round_at(members, &readers, now);
}

#[test]
fn test_broadcast_reaches_every_peer_and_unicast_only_its_own() {
    let r = region(3, 64);
    let (mut a, mut b, mut c) = (member(&r, 0), member(&r, 1), member(&r, 2));
    round(&mut [&mut a, &mut b, &mut c]);
    a.tap.inbound.push_back(frame([0xff; 6], mac(0), 1, 60));
    round(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(b.tap.outbound.len(), 1);
    assert_eq!(c.tap.outbound.len(), 1);
    assert_eq!(b.tap.outbound[0], frame([0xff; 6], mac(0), 1, 60));
    // B's MAC is known from the peer table: unicast to it reaches B only.
    for i in 0..10 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i, 1000));
    }
    round(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(b.tap.outbound.len(), 11);
    assert_eq!(c.tap.outbound.len(), 1, "unicast leaked to the third peer");
    assert_eq!(RingSnapshot::read(&r, 0, 2).tx_frames, 1);
}

#[test]
fn test_learned_addresses_behind_a_peer_are_unicast_and_own_ones_dropped() {
    let r = region(3, 64);
    let (mut a, mut b, mut c) = (member(&r, 0), member(&r, 1), member(&r, 2));
    round(&mut [&mut a, &mut b, &mut c]);
    // A host bridged behind B (MAC X) talks: A learns X -> B.
    let x = [2, 0xaa, 0, 0, 0, 1];
    b.tap.inbound.push_back(frame([0xff; 6], x, 1, 60));
    round(&mut [&mut a, &mut b, &mut c]);
    a.tap.inbound.push_back(frame(x, mac(0), 2, 60));
    round(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(b.tap.outbound.len(), 1);
    assert_eq!(c.tap.outbound.len(), 1, "only the broadcast reached C");
    // A frame to an address behind A itself is dropped, not flooded.
    let y = [2, 0xbb, 0, 0, 0, 1];
    a.tap.inbound.push_back(frame([0xff; 6], y, 3, 60));
    round(&mut [&mut a, &mut b, &mut c]);
    let before = (b.tap.outbound.len(), c.tap.outbound.len());
    a.tap.inbound.push_back(frame(y, mac(0), 4, 60));
    round(&mut [&mut a, &mut b, &mut c]);
    assert_eq!((b.tap.outbound.len(), c.tap.outbound.len()), before);
}

#[test]
fn test_full_ring_holds_frames_back_instead_of_dropping_them() {
    let r = region(2, 16);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    // 200 frames of 3 segments each through a 16-segment ring: A must wait for B.
    for i in 0..200u32 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i as u8, 5000));
    }
    let now = Instant::now();
    for _ in 0..500 {
        a.set_tap_readable();
        a.tx(now);
        a.publish(&mut NoDoorbells);
        b.rx(now, &mut NoDoorbells);
        b.publish(&mut NoDoorbells);
        if b.tap.outbound.len() == 200 {
            break;
        }
    }
    assert_eq!(b.tap.outbound.len(), 200);
    for (i, f) in b.tap.outbound.iter().enumerate() {
        assert_eq!(f, &frame(mac(1), mac(0), i as u8, 5000), "frame {i}");
    }
    assert_eq!(RingSnapshot::read(&r, 0, 1).tx_drop_full, 0);
}

#[test]
fn test_nothing_from_a_restarted_peers_earlier_life_is_delivered() {
    let r = region(2, 64);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    // A queues frames, then "dies" before B reads them; a new A takes the slot.
    for i in 0..5 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i, 100));
    }
    a.set_tap_readable();
    a.tx(Instant::now());
    a.publish(&mut NoDoorbells);
    drop(a);
    let mut a2 = member(&r, 0);
    a2.tap.inbound.push_back(frame(mac(1), mac(0), 99, 100));
    round(&mut [&mut a2, &mut b]);
    round(&mut [&mut a2, &mut b]);
    assert_eq!(b.tap.outbound, vec![frame(mac(1), mac(0), 99, 100)]);
    assert_eq!(RingSnapshot::read(&r, 0, 1).rx_drop_stale, 5);
}

#[test]
fn test_frames_to_a_peer_that_left_are_counted_not_queued() {
    let r = region(2, 64);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    b.leave();
    a.force_housekeeping();
    a.housekeeping(Instant::now()).unwrap();
    a.tap.inbound.push_back(frame(mac(1), mac(0), 1, 100));
    a.set_tap_readable();
    a.tx(Instant::now());
    a.publish(&mut NoDoorbells);
    // B's address was forgotten with its link: the frame is flooded to nobody and counted.
    assert_eq!(RingSnapshot::read(&r, 0, 1).tx_frames, 0);
    assert_eq!(r.peer(0).counter(PeerCounter::DropNoPeer), 1);
}

/// Records doorbells instead of ringing them.
#[derive(Default)]
struct Recorder(Vec<(u32, u16)>);

impl Notifier for Recorder {
    fn notify(&mut self, peer: u32, vector: u16) -> bool {
        self.0.push((peer, vector));
        true
    }
}

#[test]
fn test_doorbell_only_for_a_sleeping_consumer() {
    let r = region(2, 64);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    let mut bells = Recorder::default();
    // B is busy (not waiting): no doorbell.
    a.tap.inbound.push_back(frame(mac(1), mac(0), 1, 100));
    a.set_tap_readable();
    a.tx(Instant::now());
    a.publish(&mut bells);
    assert!(bells.0.is_empty());
    b.rx(Instant::now(), &mut NoDoorbells);
    b.publish(&mut NoDoorbells);
    // B goes to sleep: the next frame rings it, on the data vector.
    assert!(!b.prepare_to_sleep());
    a.tap.inbound.push_back(frame(mac(1), mac(0), 2, 100));
    a.set_tap_readable();
    a.tx(Instant::now());
    a.publish(&mut bells);
    assert_eq!(bells.0, vec![(1, VECTOR_DATA)]);
    // Data arrived: B must not sleep.
    assert!(b.prepare_to_sleep());
}

/// Records, for each doorbell, how full the ring towards the rung peer's partner looked then.
struct FillAtBell {
    region: Region,
    /// The ring whose fill is recorded: (src, dst).
    ring: (u32, u32),
    rung: Vec<(u32, Option<u32>)>,
}

impl Notifier for FillAtBell {
    fn notify(&mut self, peer: u32, _vector: u16) -> bool {
        let (src, dst) = self.ring;
        self.rung.push((peer, RingSnapshot::read(&self.region, src, dst).fill));
        true
    }
}

#[test]
fn test_a_waiting_producer_is_rung_when_a_quarter_of_its_ring_is_free() {
    let r = region(2, 64);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    // 70 one-segment frames: 64 fill B's ring, one is kept for B, the rest wait in the TAP.
    for i in 0..70u32 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i as u8, 100));
    }
    a.set_tap_readable();
    let now = Instant::now();
    a.tx(now); // one batch: 64 frames
    a.tx(now);
    a.publish(&mut NoDoorbells);
    assert_eq!(RingSnapshot::read(&r, 0, 1).fill, Some(64));
    assert!(RingSnapshot::read(&r, 0, 1).producer_waiting);
    // B's batch returns the first quarter of the ring (16 segments) before it ends, and rings
    // A then, so that A refills while B delivers the rest.
    let mut bells = FillAtBell { region: r.clone(), ring: (0, 1), rung: Vec::new() };
    b.rx(now, &mut bells);
    assert_eq!(bells.rung.first(), Some(&(0, Some(48))), "doorbells: {:?}", bells.rung);
    b.publish(&mut NoDoorbells);
    for _ in 0..10 {
        a.set_tap_readable();
        a.tx(now);
        a.publish(&mut NoDoorbells);
        b.rx(now, &mut NoDoorbells);
        b.publish(&mut NoDoorbells);
    }
    assert_eq!(b.tap.outbound.len(), 70);
    for (i, f) in b.tap.outbound.iter().enumerate() {
        assert_eq!(f, &frame(mac(1), mac(0), i as u8, 100), "frame {i}");
    }
}

#[test]
fn test_a_sleeping_consumer_is_rung_when_a_quarter_of_its_ring_is_queued() {
    let r = region(2, 64);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    assert!(!b.prepare_to_sleep());
    for i in 0..40u32 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i as u8, 100));
    }
    a.set_tap_readable();
    // A rings B as soon as a quarter of the ring (16 segments) is published, not only when its
    // batch of 40 ends; again at the second quarter, as B's flag says it still sleeps (it may
    // have drained the first quarter and gone back to sleep: that doorbell must not be lost).
    let mut bells = FillAtBell { region: r.clone(), ring: (0, 1), rung: Vec::new() };
    a.tx_ringing(Instant::now(), &mut bells);
    assert_eq!(bells.rung, vec![(1, Some(16)), (1, Some(32))]);
    a.publish(&mut bells);
    assert_eq!(bells.rung.last(), Some(&(1, Some(40))));
}

// ---------------------------------------------------------------------------------------------
// Offloads: per-peer decisions, and a receiver's guards against what it cannot take.
// ---------------------------------------------------------------------------------------------

/// A member whose fake TAP has `offloads` (None: plain frames) and MTU `mtu`.
fn member_with(r: &Region, id: u32, offloads: Option<Features>, mtu: u32) -> Datapath<FakeTap> {
    member_opts(r, id, offloads, DatapathOptions { mtu, ..Default::default() })
}

/// A member whose fake TAP has `offloads`, with these options.
fn member_opts(
    r: &Region,
    id: u32,
    offloads: Option<Features>,
    opts: DatapathOptions,
) -> Datapath<FakeTap> {
    let c: Claim = claim(r, Some(id), Duration::from_millis(50)).unwrap();
    let tap = FakeTap { offloads, ..Default::default() };
    Datapath::join(r.clone(), c, tap, Mac::for_peer(id).0, PeerKind::Agent, opts)
}

/// A member with every offload that trusts its peers' checksums.
fn trusting(r: &Region, id: u32) -> Datapath<FakeTap> {
    let opts = DatapathOptions { mtu: 1500, trust_peer_checksums: true, ..Default::default() };
    member_opts(r, id, Some(Features::ALL), opts)
}

/// A frame the kernel handed a real TAP (see src/offload/testdata/), readdressed from `src` to
/// `dst`: its virtio-net header and the Ethernet frame.
fn captured(name: &str, dst: [u8; 6], src: [u8; 6]) -> (VnetHdr, Vec<u8>) {
    let path = format!("{}/src/offload/testdata/{name}.bin", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hdr = VnetHdr::decode(bytes[..VNET_HDR_LEN].try_into().unwrap());
    let mut frame = bytes[VNET_HDR_LEN..].to_vec();
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    (hdr, frame)
}

/// What a TAP with offloads reads: header, then frame.
fn with_header(hdr: &VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut v = hdr.encode().to_vec();
    v.extend_from_slice(frame);
    v
}

/// The TCP or UDP payload of a complete frame, checking its lengths with etherparse.
fn l4_payload(frame: &[u8]) -> Vec<u8> {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("a parsable frame");
    match p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => t.payload().to_vec(),
        Some(etherparse::TransportSlice::Udp(u)) => u.payload().to_vec(),
        other => panic!("not TCP or UDP: {other:?}"),
    }
}

/// Checks that `frame` (complete, possibly a TCP super-frame) has correct IP and TCP/UDP
/// checksums, computed by etherparse.
fn assert_checksums_complete(frame: &[u8], what: &str) {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("a parsable frame");
    let (tcp, udp) = match &p.transport {
        Some(etherparse::TransportSlice::Tcp(t)) => (Some(t.clone()), None),
        Some(etherparse::TransportSlice::Udp(u)) => (None, Some(u.clone())),
        other => panic!("{what}: not TCP or UDP: {other:?}"),
    };
    let ok = match &p.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(h.calc_header_checksum(), h.header_checksum, "{what}: IPv4 header");
            match (tcp, udp) {
                (Some(t), _) => {
                    t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap() == t.checksum()
                }
                (_, Some(u)) => {
                    u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap() == u.checksum()
                }
                _ => unreachable!(),
            }
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            match (tcp, udp) {
                (Some(t), _) => {
                    t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap() == t.checksum()
                }
                (_, Some(u)) => {
                    u.to_header().calc_checksum_ipv6(&h, u.payload()).unwrap() == u.checksum()
                }
                _ => unreachable!(),
            }
        }
        other => panic!("{what}: not IP: {other:?}"),
    };
    assert!(ok, "{what}: TCP/UDP checksum does not verify");
}

#[test]
fn test_super_frames_go_as_they_are_to_offload_peers_and_segmented_to_others() {
    let r = region(3, 256);
    let all = Some(Features::ALL);
    let (mut a, mut b, mut c) = (
        member_with(&r, 0, all, 1500),
        member_with(&r, 1, all, 1500),
        member_with(&r, 2, None, 1500),
    );
    round(&mut [&mut a, &mut b, &mut c]);
    for name in ["tcp4_gso", "tcp6_gso_fin", "tcp4_ecn_gso", "udp4_uso", "udp6_uso", "tcp4_csum"] {
        let (hdr, to_b) = captured(name, mac(1), mac(0));
        let (_, to_c) = captured(name, mac(2), mac(0));
        a.tap.inbound.push_back(with_header(&hdr, &to_b));
        a.tap.inbound.push_back(with_header(&hdr, &to_c));
        b.tap.outbound.clear();
        c.tap.outbound.clear();
        round(&mut [&mut a, &mut b, &mut c]);
        let tcp_gso = matches!(hdr.gso(), Ok(Gso::Tcp4 { .. } | Gso::Tcp6 { .. }));
        if tcp_gso {
            // B takes TCP super-frames: one frame, the same GSO header but a complete checksum
            // (nothing crosses shared memory with a partial one), bytes otherwise unchanged.
            assert_eq!(b.tap.outbound.len(), 1, "{name}");
            let got = &b.tap.outbound[0];
            let h = VnetHdr::decode(got[..VNET_HDR_LEN].try_into().unwrap());
            assert_eq!((h.gso_type, h.gso_size), (hdr.gso_type, hdr.gso_size), "{name}");
            assert!(!h.needs_csum(), "{name}: a partial checksum crossed the ring");
            let frame = &got[VNET_HDR_LEN..];
            assert_eq!(l4_payload(frame), l4_payload(&to_b), "{name}");
            assert_checksums_complete(frame, name);
        } else {
            // USO and partial-checksum frames reach B complete, like C.
            for f in &b.tap.outbound {
                assert_eq!(&f[..VNET_HDR_LEN], &[0; VNET_HDR_LEN], "{name}: a header for B");
                assert_checksums_complete(&f[VNET_HDR_LEN..], name);
            }
        }
        // C takes no offloads: complete frames of at most its MTU whose payloads add up to the
        // super-frame's.
        assert!(!c.tap.outbound.is_empty(), "{name}");
        let mut payload = Vec::new();
        for f in &c.tap.outbound {
            assert!(f.len() <= 1514, "{name}: a {}-byte frame reached an MTU 1500 peer", f.len());
            assert_checksums_complete(f, name);
            payload.extend_from_slice(&l4_payload(f));
        }
        assert_eq!(payload, l4_payload(&to_c), "{name}: payload differs after segmentation");
    }
    for dst in [1, 2] {
        let s = RingSnapshot::read(&r, 0, dst);
        assert_eq!((s.tx_drop_mtu, s.rx_drop_size, s.rx_drop_offload), (0, 0, 0), "ring 0->{dst}");
    }
}

/// What `dst`'s interface got, as (header, frame) pairs; frames to a peer without offloads
/// carry no header and get a plain one here.
fn delivered(dst: &Datapath<FakeTap>) -> Vec<(VnetHdr, Vec<u8>)> {
    let with_hdr = dst.tap.offloads.is_some();
    let split = |f: &Vec<u8>| match with_hdr {
        true => {
            (VnetHdr::decode(f[..VNET_HDR_LEN].try_into().unwrap()), f[VNET_HDR_LEN..].to_vec())
        }
        false => (VnetHdr::default(), f.clone()),
    };
    dst.tap.outbound.iter().map(split).collect()
}

#[test]
fn test_a_flooded_frame_reaches_each_peer_complete_whichever_comes_first() {
    // The checksum is completed by the first copy into a ring: the peers after it, in either
    // form, must get the completed bytes too.
    for offload_peer_first in [true, false] {
        let r = region(3, 256);
        let (one, two) = match offload_peer_first {
            true => (Some(Features::ALL), None),
            false => (None, Some(Features::ALL)),
        };
        let mut a = member_with(&r, 0, Some(Features::ALL), 1500);
        let (mut b, mut c) = (member_with(&r, 1, one, 1500), member_with(&r, 2, two, 1500));
        round(&mut [&mut a, &mut b, &mut c]);
        for name in ["tcp4_csum", "tcp4_gso"] {
            let (hdr, f) = captured(name, [0xff; 6], mac(0));
            a.tap.inbound.push_back(with_header(&hdr, &f));
            b.tap.outbound.clear();
            c.tap.outbound.clear();
            round(&mut [&mut a, &mut b, &mut c]);
            for (who, m) in [("B", &b), ("C", &c)] {
                let got = delivered(m);
                assert!(!got.is_empty(), "{name}: nothing reached {who}");
                let mut payload = Vec::new();
                for (h, frame) in &got {
                    assert!(!h.needs_csum(), "{name} to {who}: a partial checksum");
                    assert_checksums_complete(frame, &format!("{name} to {who}"));
                    payload.extend_from_slice(&l4_payload(frame));
                }
                assert_eq!(payload, l4_payload(&f), "{name} to {who}: payload");
            }
        }
    }
}

#[test]
fn test_offloaded_frames_kept_for_a_full_ring_arrive_complete() {
    // Two super-frames fill this ring: the rest are kept (completed in private memory) and
    // sent as B drains.
    let r = region(2, 64);
    let (mut a, mut b) = (
        member_with(&r, 0, Some(Features::ALL), 1500),
        member_with(&r, 1, Some(Features::ALL), 1500),
    );
    round(&mut [&mut a, &mut b]);
    let (hdr, f) = captured("tcp4_gso", mac(1), mac(0));
    for _ in 0..6 {
        a.tap.inbound.push_back(with_header(&hdr, &f));
    }
    let now = Instant::now();
    a.set_tap_readable();
    a.tx(now);
    assert!(a.is_blocked(), "the ring took all six: nothing was kept");
    for _ in 0..50 {
        a.publish(&mut NoDoorbells);
        b.rx(now, &mut NoDoorbells);
        b.publish(&mut NoDoorbells);
        a.set_tap_readable();
        a.tx(now);
    }
    let got = delivered(&b);
    assert_eq!(got.len(), 6);
    for (h, frame) in &got {
        assert!(!h.needs_csum());
        assert_checksums_complete(frame, "kept super-frame");
        assert_eq!(l4_payload(frame), l4_payload(&f));
    }
    assert_eq!(RingSnapshot::read(&r, 0, 1).tx_drop_full, 0);
}

#[test]
fn test_super_frames_kept_for_a_slow_peer_without_offloads_arrive_segmented_and_complete() {
    // B takes no offloads and drains four frames a round: two super-frames cut into ~45
    // segments fill A's ring to B, the third is kept (in the buffer it was read into, its
    // checksum still pending) and retried as B drains; the fourth waits in the transmit buffer
    // meanwhile. Every segment must arrive once, in order, with checksums that verify.
    let r = region(2, 128);
    let mut a = member_with(&r, 0, Some(Features::ALL), 1500);
    let mut b = {
        let c: Claim = claim(&r, Some(1), Duration::from_millis(50)).unwrap();
        let opts = DatapathOptions { mtu: 1500, batch: 4, ..Default::default() };
        Datapath::join(r.clone(), c, FakeTap::default(), mac(1), PeerKind::Agent, opts)
    };
    round(&mut [&mut a, &mut b]);
    let (hdr, f) = captured("tcp4_gso", mac(1), mac(0));
    for _ in 0..5 {
        a.tap.inbound.push_back(with_header(&hdr, &f));
    }
    let now = Instant::now();
    let mut was_blocked = false;
    for _ in 0..200 {
        a.set_tap_readable();
        a.tx(now);
        was_blocked |= a.is_blocked();
        a.publish(&mut NoDoorbells);
        b.rx(now, &mut NoDoorbells);
        b.publish(&mut NoDoorbells);
    }
    assert!(was_blocked, "the ring took every super-frame at once: nothing was kept");
    let got = delivered(&b);
    let per_frame = got.len() / 5;
    assert!(per_frame > 40 && got.len() == 5 * per_frame, "{} segments", got.len());
    let mut payload = Vec::new();
    for (i, (h, seg)) in got.iter().enumerate() {
        assert!(h.is_plain(), "segment {i} went with a header to a peer without offloads");
        assert!(seg.len() <= 1514, "segment {i}: {} bytes", seg.len());
        assert_checksums_complete(seg, &format!("segment {i}"));
        payload.extend(l4_payload(seg));
    }
    assert_eq!(payload, l4_payload(&f).repeat(5));
    assert_eq!(RingSnapshot::read(&r, 0, 1).tx_drop_full, 0);
}

#[test]
fn test_a_partial_checksum_from_a_peer_is_refused() {
    let r = region(2, 256);
    let all = Some(Features::ALL);
    let (mut a, mut b) = (member_with(&r, 0, all, 1500), member_with(&r, 1, all, 1500));
    round(&mut [&mut a, &mut b]);
    // A sender that puts frames with NEEDS_CSUM on the ring (ivnet does not): B's kernel would
    // take them unverified, so B refuses them.
    let mut evil = Producer::new(&r, 0, 1, a.claim().epoch());
    for name in ["tcp4_gso", "tcp4_csum"] {
        let (hdr, f) = captured(name, mac(1), mac(0));
        assert!(hdr.needs_csum());
        evil.push(&hdr.encode(), &f).unwrap();
    }
    evil.publish();
    b.rx(Instant::now(), &mut NoDoorbells);
    b.publish(&mut NoDoorbells);
    assert!(b.tap.outbound.is_empty());
    assert_eq!(RingSnapshot::read(&r, 0, 1).rx_drop_offload, 2);
}

#[test]
fn test_a_trusting_peer_gets_frames_as_the_kernel_gave_them_and_the_others_complete_ones() {
    // B trusts its peers' checksums, C does not: each gets what it asked for, in a flood
    // whichever comes first (the completed checksum of a frame sent to C first also serves B).
    for trusting_first in [true, false] {
        let r = region(3, 256);
        let mut a = member_with(&r, 0, Some(Features::ALL), 1500);
        let (mut b, mut c) = match trusting_first {
            true => (trusting(&r, 1), member_with(&r, 2, Some(Features::ALL), 1500)),
            false => (trusting(&r, 2), member_with(&r, 1, Some(Features::ALL), 1500)),
        };
        round(&mut [&mut a, &mut b, &mut c]);
        for name in ["tcp4_gso", "tcp6_gso_fin", "tcp4_csum", "udp4_uso", "udp6_uso"] {
            let bid = b.claim().id;
            let (hdr, to_b) = captured(name, mac(bid), mac(0));
            let (_, flood) = captured(name, [0xff; 6], mac(0));
            assert!(hdr.needs_csum(), "{name}: captured with a partial checksum");
            for f in [&to_b, &flood] {
                a.tap.inbound.push_back(with_header(&hdr, f));
            }
            b.tap.outbound.clear();
            c.tap.outbound.clear();
            round(&mut [&mut a, &mut b, &mut c]);
            // Unicast to B: the kernel's header and bytes, untouched (USO too: not cut up).
            let got = delivered(&b);
            assert_eq!(got.len(), 2, "{name}: {got:?}");
            assert_eq!(got[0], (hdr, to_b.clone()), "{name}: unicast to the trusting peer");
            // The flood: as the kernel gave it if B came first, else completed on the way to C
            // (a USO frame is cut into new datagrams for C and stays as it was).
            let (h, f) = &got[1];
            if trusting_first || matches!(hdr.gso(), Ok(Gso::Udp)) {
                assert_eq!((h, f), (&hdr, &flood), "{name}: flood to the trusting peer");
            } else {
                assert!(!h.needs_csum(), "{name}: {h:?}");
                assert_checksums_complete(f, name);
            }
            // C never sees a partial checksum.
            let got = delivered(&c);
            assert!(!got.is_empty(), "{name}: nothing reached C");
            let mut payload = Vec::new();
            for (h, f) in &got {
                assert!(!h.needs_csum(), "{name}: a partial checksum reached C");
                assert_checksums_complete(f, name);
                payload.extend_from_slice(&l4_payload(f));
            }
            assert_eq!(payload, l4_payload(&flood), "{name}: payload to C");
        }
    }
}

#[test]
fn test_frames_for_a_trusting_peer_are_read_straight_into_its_ring_while_all_peers_trust() {
    let r = region(3, 256);
    let (mut a, mut b) = (trusting(&r, 0), trusting(&r, 1));
    round(&mut [&mut a, &mut b]);
    let names = ["tcp4_gso", "tcp6_gso_fin", "tcp4_csum", "udp4_uso", "tcp4_ecn_gso"];
    let send = |a: &mut Datapath<FakeTap>| {
        let mut sent = Vec::new();
        for name in names {
            let (hdr, f) = captured(name, mac(1), mac(0));
            a.tap.inbound.push_back(with_header(&hdr, &f));
            sent.push((hdr, f));
        }
        sent
    };
    let sent = send(&mut a);
    round(&mut [&mut a, &mut b]);
    // The first frame shows where frames go; the rest are read into B's ring, header and all,
    // and reach B as the kernel gave them.
    assert_eq!(delivered(&b), sent);
    assert_eq!(a.tap.reads_into_ring, names.len() - 1);
    // A peer that does not trust comes up: frames are read into the private buffer again (and
    // still reach B as they were).
    let mut c = member_with(&r, 2, Some(Features::ALL), 1500);
    round(&mut [&mut a, &mut b, &mut c]);
    b.tap.outbound.clear();
    let sent = send(&mut a);
    round(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(delivered(&b), sent);
    assert_eq!(
        a.tap.reads_into_ring,
        names.len() - 1,
        "read into a ring beside a peer that checks"
    );
    let s = RingSnapshot::read(&r, 0, 1);
    assert_eq!((s.rx_drop_offload, s.rx_drop_size), (0, 0));
}

#[test]
fn test_a_trusting_receiver_takes_partial_checksums_from_the_ring() {
    let r = region(2, 256);
    let (mut a, mut b) = (member_with(&r, 0, Some(Features::ALL), 1500), trusting(&r, 1));
    round(&mut [&mut a, &mut b]);
    let mut sender = Producer::new(&r, 0, 1, a.claim().epoch());
    let mut sent = Vec::new();
    for name in ["tcp4_gso", "tcp4_csum", "udp6_uso"] {
        let (hdr, f) = captured(name, mac(1), mac(0));
        sender.push(&hdr.encode(), &f).unwrap();
        sent.push((hdr, f));
    }
    sender.publish();
    b.rx(Instant::now(), &mut NoDoorbells);
    b.publish(&mut NoDoorbells);
    assert_eq!(delivered(&b), sent);
    assert_eq!(RingSnapshot::read(&r, 0, 1).rx_drop_offload, 0);
}

#[test]
fn test_receiver_drops_what_it_cannot_take_and_counts_it() {
    let r = region(2, 256);
    let (mut a, mut b) = (member_with(&r, 0, None, 9000), member_with(&r, 1, None, 1500));
    round(&mut [&mut a, &mut b]);
    // A producer that ignores B's MTU and offloads (a broken or hostile sender).
    let mut evil = Producer::new(&r, 0, 1, a.claim().epoch());
    evil.push(&[], &frame(mac(1), mac(0), 1, 9018)).unwrap();
    let (hdr, gso) = captured("tcp4_gso", mac(1), mac(0));
    evil.push(&hdr.encode(), &gso).unwrap();
    evil.push(&[1, 2, 3], &frame(mac(1), mac(0), 2, 100)).unwrap();
    evil.push(&[], &frame(mac(1), mac(0), 3, 10)).unwrap();
    evil.push(&[], &frame(mac(1), mac(0), 4, 1514)).unwrap();
    evil.publish();
    b.rx(Instant::now(), &mut NoDoorbells);
    b.publish(&mut NoDoorbells);
    assert_eq!(b.tap.outbound, vec![frame(mac(1), mac(0), 4, 1514)], "only the fitting frame");
    let s = RingSnapshot::read(&r, 0, 1);
    assert_eq!((s.rx_drop_size, s.rx_drop_offload), (2, 2), "{s:?}");
}

#[test]
fn test_sender_does_not_send_a_frame_larger_than_the_peers_mtu() {
    let r = region(2, 256);
    let (mut a, mut b) = (member_with(&r, 0, None, 9000), member_with(&r, 1, None, 1500));
    round(&mut [&mut a, &mut b]);
    a.tap.inbound.push_back(frame(mac(1), mac(0), 1, 9018));
    a.tap.inbound.push_back(frame([0xff; 6], mac(0), 2, 4000));
    a.tap.inbound.push_back(frame(mac(1), mac(0), 3, 1518));
    round(&mut [&mut a, &mut b]);
    assert_eq!(b.tap.outbound, vec![frame(mac(1), mac(0), 3, 1518)]);
    let s = RingSnapshot::read(&r, 0, 1);
    assert_eq!((s.tx_drop_mtu, s.rx_drop_size), (2, 0));
}

// ---------------------------------------------------------------------------------------------
// A broken or hostile peer hurts only itself (issue 11). Time is synthetic here: the data path
// takes `now` from its caller, so back-pressure bounds are checked without real waiting.
// ---------------------------------------------------------------------------------------------

/// One round at time `now`: links, every member's tx, then rx of `readers` only.
fn round_at(members: &mut [&mut Datapath<FakeTap>], readers: &[bool], now: Instant) {
    for m in members.iter_mut() {
        m.force_housekeeping();
        m.housekeeping(now).unwrap();
    }
    for m in members.iter_mut() {
        m.set_tap_readable(); // what the TAP's readiness event does in the agent's loop
        m.tx(now);
        m.publish(&mut NoDoorbells);
    }
    for (m, &reads) in members.iter_mut().zip(readers) {
        if reads {
            m.rx(now, &mut NoDoorbells);
            m.publish(&mut NoDoorbells);
        }
    }
}

/// A sends 200 frames to B and 200 to C, interleaved. B's consumer frees room only every
/// `b_every` rounds (never: 0); each round is 10 µs. Returns the round by which C had all its
/// frames, or None.
fn slow_peer_run(b_every: u32) -> (Option<u32>, Datapath<FakeTap>, Region) {
    let r = region(3, 64);
    let (mut a, mut b, mut c) = (member(&r, 0), member(&r, 1), member(&r, 2));
    let t0 = Instant::now();
    round_at(&mut [&mut a, &mut b, &mut c], &[true, true, true], t0);
    for i in 0..200u32 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i as u8, 5000));
        a.tap.inbound.push_back(frame(mac(2), mac(0), i as u8, 5000));
    }
    let mut done = None;
    for k in 1..=1000u32 {
        let now = t0 + Duration::from_micros(10 * u64::from(k));
        let b_reads = b_every > 0 && k % b_every == 0;
        round_at(&mut [&mut a, &mut b, &mut c], &[true, b_reads, true], now);
        if c.tap.outbound.len() == 200 {
            done = Some(k);
            break;
        }
    }
    for (i, f) in c.tap.outbound.iter().enumerate() {
        assert_eq!(f, &frame(mac(2), mac(0), i as u8, 5000), "frame {i} to C");
    }
    (done, a, r)
}

#[test]
fn test_a_full_ring_never_holds_up_frames_to_other_peers() {
    // B never reads: its ring fills, then one frame is kept for it and the next waits at most
    // the head-of-line budget (2 ms = 200 rounds) before B's frames are dropped. C gets all
    // of its frames well within the 250 ms stall timeout that used to hold them.
    let (done, _a, r) = slow_peer_run(0);
    let k = done.expect("C did not get its 200 frames within 10 ms");
    assert!(k <= 300, "C's frames waited {k} rounds (x 10 us) behind B's full ring");
    let s = RingSnapshot::read(&r, 0, 1);
    assert!(s.tx_drop_full > 0, "B's excess frames are dropped and counted: {s:?}");
}

#[test]
fn test_a_slowly_draining_peer_does_not_pace_the_others() {
    // B frees room once every 26 ms (the hostile consumer, scaled: 2600 rounds), which
    // is "progress" but far too slow; C must not be paced by it.
    let (done, _a, _r) = slow_peer_run(2600);
    let k = done.expect("C did not get its 200 frames within 10 ms");
    assert!(k <= 300, "C's frames waited {k} rounds (x 10 us) behind B's slow ring");
}

/// A has 200 frames for B and nothing for anyone else; B's consumer is off its CPU for the
/// first 10 ms (1000 rounds of 10 us). `c_talks`: A sent C a frame just before. `c_leaves`: C
/// then leaves, and A does not scan the peer table itself (no heartbeat in the window).
/// Returns how many frames B got, in order, and the frames A dropped for B's full ring.
fn paused_consumer_run(c_talks: bool, c_leaves: bool) -> (usize, u64) {
    let r = region(3, 64);
    let (mut a, mut b, mut c) = (member(&r, 0), member(&r, 1), member(&r, 2));
    let t0 = Instant::now();
    round_at(&mut [&mut a, &mut b, &mut c], &[true, true, true], t0);
    if c_talks {
        a.tap.inbound.push_back(frame(mac(2), mac(0), 0, 100));
        round_at(&mut [&mut a, &mut b, &mut c], &[true, true, true], t0);
        assert_eq!(c.tap.outbound.len(), 1);
    }
    if c_leaves {
        c.leave();
    }
    for i in 0..200u32 {
        a.tap.inbound.push_back(frame(mac(1), mac(0), i as u8, 5000));
    }
    for k in 1..=3000u32 {
        let now = t0 + Duration::from_micros(10 * u64::from(k));
        if c_leaves {
            a.set_tap_readable();
            a.tx(now);
            a.publish(&mut NoDoorbells);
            if k > 1000 {
                b.rx(now, &mut NoDoorbells);
                b.publish(&mut NoDoorbells);
            }
        } else {
            round_at(&mut [&mut a, &mut b, &mut c], &[true, k > 1000, true], now);
        }
        if b.tap.outbound.len() == 200 {
            break;
        }
    }
    for (i, f) in b.tap.outbound.iter().enumerate() {
        assert_eq!(f, &frame(mac(1), mac(0), i as u8, 5000), "frame {i} to B");
    }
    (b.tap.outbound.len(), RingSnapshot::read(&r, 0, 1).tx_drop_full)
}

#[test]
fn test_a_paused_consumer_loses_nothing_while_nobody_else_is_talked_to() {
    // C is up but A has sent it nothing: no frame can be waiting behind B's, so B's frames wait
    // for it (up to the 250 ms stall timeout) instead of being dropped after 2 ms.
    assert_eq!(paused_consumer_run(false, false), (200, 0));
}

#[test]
fn test_a_paused_consumer_loses_frames_while_another_peer_is_talked_to() {
    // A talked to C within the last second: C's next frame may be behind B's, so B's frames
    // wait only the head-of-line budget; the excess is dropped (and counted).
    let (got, dropped) = paused_consumer_run(true, false);
    assert!(dropped > 0 && got < 200, "B got {got} frames, {dropped} dropped");
}

#[test]
fn test_a_peer_that_left_unseen_does_not_shorten_the_wait() {
    // C, talked to just before, leaves; A has not scanned the table since. Before dropping B's
    // frames, A looks again, finds nobody else up, and keeps waiting.
    assert_eq!(paused_consumer_run(true, true), (200, 0));
}

#[test]
fn test_stale_frames_count_against_the_batch() {
    let r = region(2, 4096);
    let (mut a, mut b) = (member(&r, 0), member(&r, 1));
    round(&mut [&mut a, &mut b]);
    // A producer that stamps its frames with an epoch that is not A's (a hostile or confused
    // writer of A's ring): every one of them is stale to B.
    let mut evil = Producer::new(&r, 0, 1, a.claim().epoch().wrapping_add(7));
    for i in 0..3000u32 {
        evil.push(&[], &frame(mac(1), mac(0), i as u8, 100)).unwrap();
    }
    evil.publish();
    let handled = b.rx(Instant::now(), &mut NoDoorbells);
    b.publish(&mut NoDoorbells);
    let stale = RingSnapshot::read(&r, 0, 1).rx_drop_stale;
    assert_eq!(stale, handled as u64, "every stale frame skipped is counted as work");
    assert!(stale <= 64, "one pass skipped {stale} stale frames: more than a batch");
}

#[test]
fn test_pinned_macs_refuse_a_spoofed_source_and_keep_the_switch_clean() {
    let r = region(3, 64);
    let (mut a, b, mut c) = (member(&r, 0), member(&r, 1), member(&r, 2));
    let mut b_pinned = {
        drop(b);
        let cl: Claim = claim(&r, Some(1), Duration::from_millis(50)).unwrap();
        let opts = DatapathOptions { mtu: 9000, pin_macs: true, ..Default::default() };
        Datapath::join(r.clone(), cl, FakeTap::default(), mac(1), PeerKind::Agent, opts)
    };
    round(&mut [&mut a, &mut b_pinned, &mut c]);
    // A claims C's MAC in a broadcast: B drops it and does not learn C's MAC behind A.
    a.tap.inbound.push_back(frame([0xff; 6], mac(2), 1, 60));
    round(&mut [&mut a, &mut b_pinned, &mut c]);
    assert!(b_pinned.tap.outbound.is_empty(), "B took a frame with a spoofed source");
    assert_eq!(RingSnapshot::read(&r, 0, 1).rx_drop_source, 1);
    // B's frames for C still go to C, not to the spoofer.
    b_pinned.tap.inbound.push_back(frame(mac(2), mac(1), 2, 60));
    round(&mut [&mut a, &mut b_pinned, &mut c]);
    assert_eq!(c.tap.outbound.last(), Some(&frame(mac(2), mac(1), 2, 60)));
    assert_eq!(RingSnapshot::read(&r, 1, 0).tx_frames, 0, "B sent C's frame to the spoofer");
    // A's own frames still pass.
    a.tap.inbound.push_back(frame(mac(1), mac(0), 3, 60));
    round(&mut [&mut a, &mut b_pinned, &mut c]);
    assert_eq!(b_pinned.tap.outbound, vec![frame(mac(1), mac(0), 3, 60)]);
}

#[test]
fn test_segments_that_cannot_all_fit_a_small_ring_go_as_far_as_they_fit() {
    // 16 segments of 8 KiB hold two super-frames, but not the ~45 frames one becomes at MTU
    // 1500: the sender sends what fits, counts the rest, and is not stuck on it.
    let r = region(2, 16);
    let (mut a, mut b) =
        (member_with(&r, 0, Some(Features::ALL), 1500), member_with(&r, 1, None, 1500));
    round(&mut [&mut a, &mut b]);
    let (hdr, f) = captured("tcp4_gso", mac(1), mac(0));
    a.tap.inbound.push_back(with_header(&hdr, &f));
    round(&mut [&mut a, &mut b]);
    let got = b.tap.outbound.len();
    assert!((1..=16).contains(&got), "{got} segments delivered");
    assert_eq!(RingSnapshot::read(&r, 0, 1).tx_drop_full, 1);
    a.tap.inbound.push_back(with_header(&VnetHdr::default(), &frame(mac(1), mac(0), 9, 100)));
    round(&mut [&mut a, &mut b]);
    assert_eq!(b.tap.outbound.last(), Some(&frame(mac(1), mac(0), 9, 100)));
}
