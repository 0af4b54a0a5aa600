//! Findings of the fuzz targets (fuzz/, scripts/fuzz.sh), each replayed as a plain test. The
//! crashing inputs themselves are in the targets' seed corpus (fuzz/corpus/TARGET/), so the
//! fuzzer replays them on every run too.

use std::sync::Arc;

use ivnet::region::layout::PEER_COUNTERS;
use ivnet::region::{GeometryRequest, HeapMemory, PeerKind, PeerState, Region};
use ivnet::status::Status;

fn region(max_peers: u32) -> Region {
    let req = GeometryRequest {
        max_peers: Some(max_peers),
        ring_slots: Some(8),
        // The smallest rings that hold two 64 KiB super-frames.
        slot_size: Some(ivnet::region::Geometry::min_slot_size(8, 576)),
        mtu: Some(576),
    };
    let size = req.resolve(u64::MAX).and_then(|g| g.layout()).expect("a valid geometry").total;
    Region::attach(Arc::new(HeapMemory::new(size)), "fuzz-regression", &req).unwrap()
}

/// fuzz target `region`, fuzz/corpus/region/crash-d9ac4644ee086505c933f618933130ce211b7f28: a
/// member that writes huge counters into its peer entry made `ivnet status` overflow when it
/// summed the drop counters (a panic in debug builds, a wrong sum in release builds).
#[test]
fn status_survives_counters_near_the_maximum() {
    let r = region(2);
    let p = r.peer(1);
    let inc = p.try_claim(0).unwrap();
    p.set_info([2, 0, 0, 0, 0, 1], 1500, 0, PeerKind::Agent, 1);
    p.set_state(PeerState::Up, inc);
    p.store_counters(&[u64::MAX - 1; PEER_COUNTERS]);
    let text = Status::read(&r).to_text();
    assert!(text.contains(&u64::MAX.to_string()), "the sum saturates:\n{text}");
}
