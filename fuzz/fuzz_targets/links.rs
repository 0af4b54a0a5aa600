//! The peer-table scan and the link logic against a peer table that anyone may write: the input
//! writes arbitrary words into the peer entries between `Links::tick` calls (with arbitrary time
//! steps), marks peers down as the server would, and claims slots. Checks: no panic; events name
//! only other peers' valid ids; `is_up` and `up_count` agree with the events; a claim returns a
//! slot in range whose incarnation is the one returned.

#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ivnet::agent::link::{claim, claim_assigned, LinkEvent, Links};
use ivnet::region::{GeometryRequest, HeapMemory, PeerState, Region};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A 32-bit word of a peer entry (any of its 64 words).
    Write32 {
        slot: u8,
        word: u8,
        value: u32,
    },
    /// A 64-bit word of a peer entry.
    Write64 {
        slot: u8,
        word: u8,
        value: u64,
    },
    /// A well-behaved owner: state, heartbeat.
    SetState {
        slot: u8,
        state: u8,
        incarnation: u64,
    },
    Beat {
        slot: u8,
    },
    Tick {
        advance_ms: u16,
    },
    ForceDown {
        slot: u8,
    },
    IsUp {
        slot: u8,
    },
    ClaimAssigned {
        slot: u8,
    },
    ClaimFree {
        requested: Option<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    max_peers: u8,
    me: u8,
    timeout_ms: u16,
    ops: Vec<Op>,
}

/// Segment size of the smallest valid ring of 8 segments (it holds two 64 KiB super-frames).
const SLOT_SIZE: u32 = 16448;

fuzz_target!(|input: Input| {
    debug_assert_eq!(SLOT_SIZE, ivnet::region::Geometry::min_slot_size(8, 576));
    let max_peers = 2 + u32::from(input.max_peers % 7);
    let me = u32::from(input.me) % max_peers;
    let req = GeometryRequest {
        max_peers: Some(max_peers),
        ring_slots: Some(8),
        // The smallest valid rings: a ring holds two 64 KiB super-frames.
        slot_size: Some(SLOT_SIZE),
        mtu: Some(576),
    };
    let g = ivnet::region::Geometry { max_peers, ring_slots: 8, slot_size: SLOT_SIZE, mtu: 576 };
    let size = g.layout().expect("a valid geometry").total;
    let region = Region::attach(Arc::new(HeapMemory::new(size)), "fuzz", &req).expect("attach");
    let timeout = Duration::from_millis(50 + u64::from(input.timeout_ms % 5000));
    let mut links = Links::new(&region, me, timeout);
    let mut up = vec![false; max_peers as usize];
    let mut now = Instant::now();
    let entry = |slot: u8| region.layout().peer(u32::from(slot) % max_peers);
    for op in input.ops.iter().take(512) {
        match op {
            Op::Write32 { slot, word, value } => {
                let off = entry(*slot) + (*word as usize % 64) * 4;
                region.raw().u32_at(off).store(*value, std::sync::atomic::Ordering::Relaxed);
            }
            Op::Write64 { slot, word, value } => {
                let off = entry(*slot) + (*word as usize % 32) * 8;
                region.raw().u64_at(off).store(*value, std::sync::atomic::Ordering::Relaxed);
            }
            Op::SetState { slot, state, incarnation } => {
                let s = PeerState::from_raw(u32::from(*state));
                region.peer(u32::from(*slot) % max_peers).set_state(s, *incarnation);
            }
            Op::Beat { slot } => region.peer(u32::from(*slot) % max_peers).beat(0),
            Op::Tick { advance_ms } => {
                now += Duration::from_millis(u64::from(*advance_ms));
                let mut events = Vec::new();
                links.tick(&region, now, |e| events.push(e));
                for e in events {
                    let (id, is_up) = match e {
                        LinkEvent::Up { id, .. } | LinkEvent::Restarted { id, .. } => (id, true),
                        LinkEvent::Down { id } => (id, false),
                    };
                    assert!(id < max_peers && id != me, "event for peer {id}: {e:?}");
                    up[id as usize] = is_up;
                }
            }
            Op::ForceDown { slot } => {
                let id = u32::from(*slot) % max_peers;
                let was = links.is_up(id);
                assert_eq!(links.force_down(id), was);
                up[id as usize] = false;
            }
            Op::IsUp { slot } => {
                // Out-of-range ids are simply not up.
                let id = u32::from(*slot);
                assert_eq!(links.is_up(id), up.get(id as usize).copied().unwrap_or(false));
            }
            Op::ClaimAssigned { slot } => {
                let id = u32::from(*slot) % (max_peers + 1);
                match claim_assigned(&region, id) {
                    Ok(c) => {
                        assert_eq!(c.id, id);
                        assert_eq!(region.peer(id).incarnation(), c.incarnation);
                    }
                    Err(_) => assert!(id >= max_peers),
                }
            }
            Op::ClaimFree { requested } => {
                // Only claims that need no liveness watch (which sleeps): a requested slot that
                // is free, or any slot when one is free.
                let free = |id: u32| region.peer(id).is_free(region.peer(id).incarnation());
                let requested = requested.map(|r| u32::from(r) % (max_peers + 1));
                let quick = match requested {
                    Some(id) => id >= max_peers || free(id),
                    None => (0..max_peers).any(free),
                };
                if quick {
                    // A race with nobody cannot be lost; a free slot may still be refused if the
                    // state word changed in between (it does not here).
                    if let Ok(c) = claim(&region, requested, timeout) {
                        assert!(c.id < max_peers);
                        assert_eq!(region.peer(c.id).incarnation(), c.incarnation);
                    }
                }
            }
        }
        assert_eq!(links.up_count(), up.iter().filter(|&&u| u).count());
    }
});
