//! The learning switch, driven by sequences of learn/forward/forget with arbitrary MACs (from
//! a small pool, so that addresses recur, or any), peers (also beyond the table) and time
//! steps (also beyond the ageing time). Checks: no panic; the internal lists stay consistent and
//! within capacity; a unicast answer names the peer the address was last learned behind, within
//! the ageing time (eviction may forget an address, never misdirect one).

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ivnet::agent::switch::{Forward, Switch, MAX_PEER_IDS};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mac {
    Pool(u8),
    Any([u8; 6]),
}

impl Mac {
    fn bytes(self) -> [u8; 6] {
        match self {
            Mac::Pool(n) => [2, 0, 0, 0, n % 4, n],
            Mac::Any(m) => m,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Learn { mac: Mac, peer: u8 },
    Forward { mac: Mac },
    Forget { peer: u8 },
    Wait { ms: u32 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    me: u8,
    capacity: u8,
    ageing_ms: u16,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let me = u32::from(input.me % 70);
    let capacity = usize::from(input.capacity);
    let ageing = Duration::from_millis(1 + u64::from(input.ageing_ms));
    let mut s = Switch::new(me, ageing, capacity);
    let mut now = Instant::now();
    // What a perfect, unbounded table would know: MAC -> (peer, last seen).
    let mut model: HashMap<[u8; 6], (u32, Instant)> = HashMap::new();
    for op in input.ops.iter().take(2000) {
        match *op {
            Op::Learn { mac, peer } => {
                let (mac, peer) = (mac.bytes(), u32::from(peer % 70));
                s.learn(mac, peer, now);
                // Group addresses and peer ids beyond the table are not learned.
                if mac[0] & 1 == 0 && (peer as usize) < MAX_PEER_IDS {
                    model.insert(mac, (peer, now));
                }
            }
            Op::Forward { mac } => {
                let mac = mac.bytes();
                let fresh = model.get(&mac).filter(|(_, seen)| now.duration_since(*seen) < ageing);
                match s.forward(mac, now) {
                    Forward::Flood => {}
                    Forward::Unicast(p) => {
                        assert_ne!(p, me);
                        assert_eq!(fresh.map(|e| e.0), Some(p), "misdirected {mac:02x?}");
                    }
                    Forward::ToSelf => assert_eq!(fresh.map(|e| e.0), Some(me)),
                }
            }
            Op::Forget { peer } => {
                let peer = u32::from(peer % 70);
                s.forget_peer(peer);
                model.retain(|_, e| e.0 != peer);
                assert_eq!(s.len_of(peer), 0);
            }
            Op::Wait { ms } => now += Duration::from_millis(u64::from(ms % 1_000_000)),
        }
        assert!(s.len() <= capacity);
    }
    s.check_invariants();
});
