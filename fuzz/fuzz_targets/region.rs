//! A region whose header, peer table and ring control words a member (or a stale file) wrote
//! arbitrarily: opening it read-only (`ivnet status`), joining it, and reading its status
//! (text and JSON). Checks: no panic, no hang; an accepted region's layout fits its memory.

#![no_main]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ivnet::region::layout::{hdr, init};
use ivnet::region::{Geometry, GeometryRequest, HeapMemory, Region};
use ivnet::status::Status;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A header word (any of the first 128 bytes, 4-byte aligned).
    Header32 {
        word: u8,
        value: u32,
    },
    Header64 {
        word: u8,
        value: u64,
    },
    /// Any bytes anywhere (header, peer table, rings).
    Bytes {
        at: u16,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    blank: bool,
    max_peers: u8,
    extra_kib: u8,
    ops: Vec<Op>,
}

/// Segment size of the smallest valid ring of 8 segments (it holds two 64 KiB super-frames).
const SLOT_SIZE: u32 = 16448;

fuzz_target!(|input: Input| {
    debug_assert_eq!(SLOT_SIZE, Geometry::min_slot_size(8, 576));
    let max_peers = 2 + u32::from(input.max_peers % 3);
    let g = Geometry { max_peers, ring_slots: 8, slot_size: SLOT_SIZE, mtu: 576 };
    let size = g.layout().expect("a valid geometry").total + usize::from(input.extra_kib) * 1024;
    let mem = Arc::new(HeapMemory::new(size));
    if !input.blank {
        let req = GeometryRequest {
            max_peers: Some(max_peers),
            ring_slots: Some(8),
            slot_size: Some(SLOT_SIZE),
            mtu: Some(576),
        };
        Region::attach(mem.clone(), "fuzz", &req).expect("a fresh region");
    }
    let raw = ivnet::region::RawRegion::new(mem.clone());
    for op in input.ops.iter().take(64) {
        match op {
            Op::Header32 { word, value } => {
                raw.u32_at((*word as usize % 32) * 4).store(*value, Ordering::Relaxed)
            }
            Op::Header64 { word, value } => {
                raw.u64_at((*word as usize % 16) * 8).store(*value, Ordering::Relaxed)
            }
            Op::Bytes { at, bytes } => {
                let at = *at as usize % size;
                let n = bytes.len().min(size - at);
                raw.copy_in(at, &bytes[..n]).expect("inside");
            }
        }
    }
    if let Ok(r) = Region::open_read_only(mem.clone(), "fuzz") {
        assert!(r.layout().total <= size, "layout beyond the memory");
        let s = Status::read(&r);
        let _ = s.to_text();
        let _ = serde_json::to_string(&s);
    }
    // Joining waits for an initialisation in progress: only when none is.
    let word = raw.u64_at(hdr::INIT).load(Ordering::Relaxed) as u32;
    if word != init::INITIALISING {
        if let Ok(r) = Region::attach(mem, "fuzz", &GeometryRequest::default()) {
            assert!(r.layout().total <= size, "layout beyond the memory");
        }
    }
});
