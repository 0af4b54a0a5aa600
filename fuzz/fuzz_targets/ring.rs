//! Ring parsing against a hostile peer. A region over heap memory with two peers: we (peer 1)
//! consume ring 0 -> 1 and produce ring 1 -> 0. The input interleaves what the other side may
//! do (write any byte of either ring, or push well-formed frames) with every operation of our
//! consumer and producer. Checks: no panic; our operations write nothing but our own fields
//! (the consumer's control words of ring 0 -> 1; the producer's control words, descriptors and
//! data of ring 1 -> 0); a frame handed out lies inside the ring's data area, within the MTU,
//! and copies out whole.

#![no_main]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ivnet::region::layout::{ring, MAX_META};
use ivnet::region::ring::{hostile, Consumer, Peek, Producer, SegmentDesc};
use ivnet::region::{GeometryRequest, HeapMemory, Region};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const MTU: u32 = 1500;

#[derive(Arbitrary, Debug)]
enum Op {
    // The other side (not checked: it may write anything).
    Poke {
        ring_b: bool,
        off: u16,
        bytes: Vec<u8>,
    },
    PokeU32 {
        ring_b: bool,
        word: u8,
        value: u32,
    },
    PokeDesc {
        idx: u8,
        d: [u32; 7],
        flags: u16,
        meta_len: u16,
    },
    /// Changes one field of the descriptor `back` segments before the published head (so that
    /// a frame that was well formed becomes subtly wrong).
    PokeDescField {
        back: u8,
        field: u8,
        value: u32,
    },
    HonestPush {
        meta: u8,
        len: u16,
        fill: u8,
    },
    HonestPublish,
    HonestRestart {
        epoch: u32,
    },
    // Our consumer of ring 0 -> 1.
    Peek {
        honest_epoch: bool,
        epoch: u32,
    },
    CopyFrame {
        len: u16,
    },
    CopyPrefix {
        len: u8,
    },
    CopyMeta {
        len: u8,
    },
    WriteFrame,
    Advance {
        delivered: bool,
    },
    ConsumerPublish,
    HasData,
    PrepareToSleep,
    Wake,
    Backlog,
    ProducerWaiting,
    NewConsumer,
    // Our producer of ring 1 -> 0.
    Push {
        meta: u8,
        len: u16,
    },
    ProducerPublish,
    CanPush {
        len: u16,
    },
    TailMoved,
    IsDrained,
    InFlight,
    SetWaiting {
        on: bool,
    },
    CountDrops,
    NewProducer {
        epoch: u32,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    slot_size_x256: u8,
    ops: Vec<Op>,
}

struct Rig {
    region: Region,
    /// Byte ranges our side may write.
    ours: Vec<(usize, usize)>,
    ring_a: usize,
    ring_b: usize,
    stride: usize,
    data_a: (usize, usize),
    max_eth: usize,
}

impl Rig {
    fn new(slot_size: u32) -> Rig {
        let req = GeometryRequest {
            max_peers: Some(2),
            ring_slots: Some(16),
            slot_size: Some(slot_size),
            mtu: Some(MTU),
        };
        let g =
            ivnet::region::layout::Geometry { max_peers: 2, ring_slots: 16, slot_size, mtu: MTU };
        let l = g.layout().expect("a valid geometry");
        let region =
            Region::attach(Arc::new(HeapMemory::new(l.total)), "fuzz", &req).expect("attach");
        let (ring_a, ring_b) = (l.ring(0, 1), l.ring(1, 0));
        let ours = vec![
            (ring_a + ring::TAIL, ring_a + ring::RX_DROP_SOURCE + 8),
            (ring_b + ring::HEAD, ring_b + ring::TX_DROP_MTU + 8),
            (ring_b + l.ring_descs, ring_b + l.ring_stride),
        ];
        let data_a = (ring_a + l.ring_data, ring_a + l.ring_data + 16 * slot_size as usize);
        Rig {
            region,
            ours,
            ring_a,
            ring_b,
            stride: l.ring_stride,
            data_a,
            // A ring carries offloaded super-frames whatever the MTU.
            max_eth: g.max_ethernet_frame() as usize,
        }
    }

    fn snapshot(&self, into: &mut Vec<u8>) {
        into.resize(self.region.raw().len(), 0);
        self.region.raw().copy_out(0, into).expect("whole region");
    }

    /// Panics if a byte outside our fields differs between `before` and `after`.
    fn check_untouched(&self, before: &[u8], after: &[u8], what: &Op) {
        // `ours` is sorted and disjoint: compare the gaps between its ranges.
        let mut from = 0;
        for &(start, end) in self.ours.iter().chain([(after.len(), after.len())].iter()) {
            if before[from..start] != after[from..start] {
                let i = (from..start).find(|&i| before[i] != after[i]).expect("a difference");
                panic!("{what:?} wrote byte {i} outside its own fields");
            }
            from = end;
        }
    }
}

fuzz_target!(|input: Input| {
    // The smallest segments with which 16 of them hold two 64 KiB super-frames, and a few
    // larger ones.
    let slot_size =
        ivnet::region::Geometry::min_slot_size(16, MTU) + 256 * u32::from(input.slot_size_x256 % 4);
    let rig = Rig::new(slot_size);
    let r = &rig.region;
    let mut honest_epoch = 1u32;
    let mut honest = Producer::new(r, 0, 1, honest_epoch);
    let mut cons = Consumer::new(r, 0, 1);
    let mut prod = Producer::new(r, 1, 0, 7);
    let mut current: Option<usize> = None;
    let mut buf = vec![0u8; 70_000];
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    let mut iov = Vec::new();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for op in input.ops.iter().take(256) {
        rig.snapshot(&mut before);
        let mut ours = true;
        match op {
            Op::Poke { ring_b, off, bytes } => {
                ours = false;
                let base = if *ring_b { rig.ring_b } else { rig.ring_a };
                let off = *off as usize % rig.stride;
                let n = bytes.len().min(rig.stride - off);
                r.raw().copy_in(base + off, &bytes[..n]).expect("inside the ring");
            }
            Op::PokeU32 { ring_b, word, value } => {
                ours = false;
                let base = if *ring_b { rig.ring_b } else { rig.ring_a };
                let off = (*word as usize * 4) % 256;
                r.raw().copy_in(base + off, &value.to_le_bytes()).expect("inside the ring");
            }
            Op::PokeDesc { idx, d, flags, meta_len } => {
                ours = false;
                let desc = SegmentDesc {
                    start: d[0],
                    end: d[1],
                    len: d[2],
                    next: d[3],
                    flags: *flags,
                    meta_len: *meta_len,
                    epoch: d[5],
                    frame_len: d[6],
                };
                hostile::write_desc(r, 0, 1, u32::from(*idx), &desc);
            }
            Op::PokeDescField { back, field, value } => {
                ours = false;
                let head = r.raw().u32_at(rig.ring_a + ring::HEAD).load(Ordering::Relaxed);
                let idx = head.wrapping_sub(1).wrapping_sub(u32::from(*back % 16));
                let mut d = hostile::read_desc(r, 0, 1, idx);
                match field % 8 {
                    0 => d.start = *value,
                    1 => d.end = *value,
                    2 => d.len = *value,
                    3 => d.next = *value,
                    4 => d.flags = *value as u16,
                    5 => d.meta_len = *value as u16,
                    6 => d.epoch = *value,
                    _ => d.frame_len = *value,
                }
                hostile::write_desc(r, 0, 1, idx, &d);
            }
            Op::HonestPush { meta, len, fill } => {
                ours = false;
                let meta = vec![*fill; (*meta as usize) % (MAX_META as usize + 1)];
                let frame = vec![fill.wrapping_add(1); (*len as usize) % (rig.max_eth + 1)];
                let _ = honest.push(&meta, &frame);
            }
            Op::HonestPublish => {
                ours = false;
                honest.publish();
            }
            Op::HonestRestart { epoch } => {
                ours = false;
                honest_epoch = *epoch;
                honest = Producer::new(r, 0, 1, honest_epoch);
            }
            Op::Peek { honest_epoch: h, epoch } => {
                let epoch = if *h { honest_epoch } else { *epoch };
                match cons.peek(epoch) {
                    Peek::Frame(info) => {
                        assert!(info.len <= rig.max_eth, "frame of {} bytes", info.len);
                        assert!(info.meta_len <= MAX_META as usize);
                        assert!((1..=16).contains(&info.segments));
                        let mut total = 0;
                        for &(off, len) in cons.frame_ranges() {
                            assert!(off >= rig.data_a.0 && off + len <= rig.data_a.1, "range");
                            total += len;
                        }
                        assert_eq!(total, info.len, "ranges add up to the frame");
                        current = Some(info.len);
                    }
                    _ => current = None,
                }
            }
            Op::CopyFrame { len } => {
                let n = cons.copy_frame(&mut buf[..*len as usize]);
                match current {
                    Some(l) if l <= *len as usize => assert_eq!(n, l),
                    _ => assert_eq!(n, 0),
                }
            }
            Op::CopyPrefix { len } => {
                let n = cons.copy_prefix(&mut buf[..*len as usize]);
                assert!(n <= *len as usize && n <= current.unwrap_or(0));
            }
            Op::CopyMeta { len } => {
                let n = cons.copy_meta(&mut buf[..*len as usize]);
                assert!(n <= MAX_META as usize);
            }
            Op::WriteFrame => {
                if current.is_some() {
                    use std::os::fd::AsRawFd;
                    let n =
                        cons.write_frame_to(devnull.as_raw_fd(), &[], &mut iov).expect("writev");
                    assert_eq!(Some(n), current);
                }
            }
            Op::Advance { delivered } => {
                cons.advance(*delivered);
                current = None;
            }
            Op::ConsumerPublish => cons.publish(),
            Op::HasData => {
                cons.has_data();
            }
            Op::PrepareToSleep => {
                cons.prepare_to_sleep();
            }
            Op::Wake => cons.wake(),
            Op::Backlog => assert!(cons.backlog() <= 16),
            Op::ProducerWaiting => {
                cons.producer_waiting();
            }
            Op::NewConsumer => {
                cons = Consumer::new(r, 0, 1);
                current = None;
            }
            Op::Push { meta, len } => {
                let meta = vec![0xa5; (*meta as usize) % (MAX_META as usize + 2)];
                let frame = vec![0x5a; (*len as usize) % (rig.max_eth + 2)];
                let _ = prod.push(&meta, &frame);
            }
            Op::ProducerPublish => {
                prod.publish_and_check_waiting();
            }
            Op::CanPush { len } => {
                prod.can_push(*len as usize);
            }
            Op::TailMoved => {
                prod.tail_moved();
            }
            Op::IsDrained => {
                prod.is_drained();
            }
            Op::InFlight => assert!(prod.in_flight() <= 16),
            Op::SetWaiting { on } => prod.set_waiting(*on),
            Op::CountDrops => {
                prod.count_drop_full();
                prod.count_drop_down();
            }
            Op::NewProducer { epoch } => prod = Producer::new(r, 1, 0, *epoch),
        }
        if ours {
            rig.snapshot(&mut after);
            rig.check_untouched(&before, &after, op);
        }
    }
});
