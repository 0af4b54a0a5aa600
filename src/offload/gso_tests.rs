//! Tests of checksum completion and segmentation: on frames captured from a real TAP
//! (`testdata/`, see its README) and on generated super-frames (proptest). Every produced frame
//! is parsed and its checksums are verified with etherparse, not with our own `csum`.

use super::*;
use crate::offload::vnet::{
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN,
};
use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, NetSlice, SingleVlanHeader,
    SlicedPacket, TcpHeader, TransportSlice, UdpHeader, VlanId,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Independent verification with etherparse

/// What etherparse finds in one complete frame; panics (fails the test) if the frame does not
/// parse, if a length field disagrees with the frame, or if a checksum does not verify.
#[derive(Debug)]
struct Verified {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the L4 header.
    l4: usize,
    /// Offset of the payload.
    payload_at: usize,
    ipv4_id: Option<u16>,
    tcp: Option<TcpHeader>,
    udp_len: Option<u16>,
}

fn verify_frame(frame: &[u8]) -> Verified {
    let p = SlicedPacket::from_ethernet(frame).expect("segment parses with etherparse");
    let l3 = if p.link_exts.is_empty() { 14 } else { 18 };
    let (src4, dst4, src6, dst6, l4, ipv4_id) = match p.net.as_ref().expect("has an IP header") {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            assert_eq!(usize::from(h.total_len()), frame.len() - l3, "IPv4 total length");
            assert_eq!(
                h.to_header().calc_header_checksum(),
                h.header_checksum(),
                "IPv4 header checksum"
            );
            (
                h.source(),
                h.destination(),
                [0; 16],
                [0; 16],
                l3 + h.slice().len(),
                Some(h.identification()),
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            assert_eq!(
                usize::from(h.payload_length()),
                frame.len() - l3 - 40,
                "IPv6 payload length"
            );
            ([0; 4], [0; 4], h.source(), h.destination(), l3 + 40, None)
        }
        NetSlice::Arp(_) => panic!("ARP"),
    };
    let v4 = ipv4_id.is_some();
    match p.transport.expect("has a TCP or UDP header") {
        TransportSlice::Tcp(t) => {
            let want = if v4 {
                t.calc_checksum_ipv4(src4, dst4).expect("fits")
            } else {
                t.calc_checksum_ipv6(src6, dst6).expect("fits")
            };
            assert_eq!(t.checksum(), want, "TCP checksum");
            Verified {
                l3,
                l4,
                payload_at: l4 + t.header_len(),
                ipv4_id,
                tcp: Some(t.to_header()),
                udp_len: None,
            }
        }
        TransportSlice::Udp(u) => {
            assert_eq!(usize::from(u.length()), frame.len() - l4, "UDP length");
            let h = u.to_header();
            let want = if v4 {
                h.calc_checksum_ipv4_raw(src4, dst4, u.payload()).expect("fits")
            } else {
                h.calc_checksum_ipv6_raw(src6, dst6, u.payload()).expect("fits")
            };
            assert_ne!(u.checksum(), 0, "UDP checksum 0 must be sent as 0xffff");
            assert_eq!(u.checksum(), want, "UDP checksum");
            Verified { l3, l4, payload_at: l4 + 8, ipv4_id, tcp: None, udp_len: Some(u.length()) }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// The original super-frame's headers, read with etherparse (its checksum fields are partial,
/// so nothing is verified here).
struct Original<'a> {
    l3: usize,
    l4: usize,
    hl: usize,
    ipv4_id: Option<u16>,
    tcp: Option<TcpHeader>,
    payload: &'a [u8],
}

fn read_original(frame: &[u8]) -> Original<'_> {
    let p = SlicedPacket::from_ethernet(frame).expect("super-frame parses with etherparse");
    let l3 = if p.link_exts.is_empty() { 14 } else { 18 };
    let (l4, ipv4_id) = match p.net.as_ref().expect("IP") {
        NetSlice::Ipv4(ip) => (l3 + ip.header().slice().len(), Some(ip.header().identification())),
        NetSlice::Ipv6(_) => (l3 + 40, None),
        NetSlice::Arp(_) => panic!("ARP"),
    };
    match p.transport.expect("L4") {
        TransportSlice::Tcp(t) => Original {
            l3,
            l4,
            hl: l4 + t.header_len(),
            ipv4_id,
            tcp: Some(t.to_header()),
            payload: t.payload(),
        },
        TransportSlice::Udp(u) => {
            Original { l3, l4, hl: l4 + 8, ipv4_id, tcp: None, payload: u.payload() }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// Segments `frame` for a receiver of `max` bytes and checks every rule of the module docs on
/// the result. Returns the number of segments.
fn check_segmentation(frame: &[u8], hdr: &VnetHdr, max: usize) -> usize {
    let mut seg = Segmenter::new();
    let plan = seg.plan(frame, hdr, max).expect("plan");
    let mut frames: Vec<(Vec<u8>, usize)> = Vec::new();
    let n = seg
        .emit(frame, &plan, |head, payload| {
            let mut f = head.to_vec();
            f.extend_from_slice(payload);
            frames.push((f, head.len()));
            true
        })
        .expect("emit");
    assert_eq!(n, plan.segments());
    assert_eq!(frames.len(), plan.segments());
    assert_eq!(frames.iter().map(|f| f.0.len()).sum::<usize>(), plan.total_len());

    let orig = read_original(frame);
    let gso_size = usize::from(hdr.gso_size);
    let gso = hdr.gso().expect("known type");
    let step = match (gso, &orig.tcp) {
        (Gso::None, _) => usize::MAX,
        (_, Some(_)) => gso_size.min(max - orig.hl),
        (_, None) => gso_size,
    };
    // A completed checksum is patched into a copy of the prefix up to the checksum field.
    let want_head = match (gso, hdr.needs_csum()) {
        (Gso::None, true) => usize::from(hdr.csum_start + hdr.csum_offset) + 2,
        (Gso::None, false) => 0,
        _ => orig.hl,
    };
    let mut payload = Vec::new();
    let last = frames.len() - 1;
    for (i, (f, head_len)) in frames.iter().enumerate() {
        assert!(f.len() <= max, "segment {i} of {} bytes exceeds {max}", f.len());
        let want_len = if i == last { plan.last_len() } else { plan.segment_len() };
        assert_eq!(f.len(), want_len, "segment {i} length");
        assert_eq!(*head_len, want_head, "head is the headers, payload borrowed");
        let v = verify_frame(f);
        assert_eq!((v.l3, v.l4, v.payload_at), (orig.l3, orig.l4, orig.hl));
        let seg_payload = &f[v.payload_at..];
        let rest = orig.payload.len() - payload.len();
        assert_eq!(seg_payload.len(), step.min(rest), "segment {i} payload size");
        // Link header, addresses, TTL, ports: everything but the per-segment fields is copied.
        assert_eq!(f[..orig.l3], frame[..orig.l3], "L2 header");
        if let Some(id0) = orig.ipv4_id {
            assert_eq!(v.ipv4_id, Some(id0.wrapping_add(i as u16)), "IPv4 ID of segment {i}");
            let (a, b) = (&f[orig.l3..orig.l4], &frame[orig.l3..orig.l4]);
            assert_eq!((&a[0..2], &a[6..10], &a[12..]), (&b[0..2], &b[6..10], &b[12..]));
        } else {
            let (a, b) = (&f[orig.l3..orig.l4], &frame[orig.l3..orig.l4]);
            assert_eq!((&a[0..4], &a[6..]), (&b[0..4], &b[6..]));
        }
        match (&orig.tcp, &v.tcp) {
            (Some(o), Some(t)) => {
                let off = payload.len() as u32;
                assert_eq!(t.sequence_number, o.sequence_number.wrapping_add(off), "seq");
                assert_eq!(t.fin, o.fin && i == last, "FIN only on the last segment");
                assert_eq!(t.psh, o.psh && i == last, "PSH only on the last segment");
                assert_eq!(t.cwr, o.cwr && i == 0, "CWR only on the first segment");
                let same = |h: &TcpHeader| {
                    (h.source_port, h.destination_port, h.acknowledgment_number, h.ns, h.syn)
                };
                assert_eq!(same(t), same(o));
                let flags = |h: &TcpHeader| (h.rst, h.ack, h.ece, h.urg, h.window_size);
                assert_eq!(flags(t), flags(o));
                assert_eq!(
                    (t.urgent_pointer, t.options.as_slice()),
                    (o.urgent_pointer, o.options.as_slice())
                );
            }
            (None, None) => {
                assert_eq!(v.udp_len, Some((8 + seg_payload.len()) as u16));
                assert_eq!(f[orig.l4..orig.l4 + 4], frame[orig.l4..orig.l4 + 4], "UDP ports");
            }
            _ => panic!("L4 protocol changed"),
        }
        payload.extend_from_slice(seg_payload);
    }
    assert_eq!(payload, orig.payload, "concatenated payloads give back the original");
    frames.len()
}

// ---------------------------------------------------------------------------------------------
// Frames captured from a real TAP

fn fixtures() -> Vec<(String, VnetHdr, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/offload/testdata");
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).expect("testdata directory") {
        let path = e.expect("dir entry").path();
        if path.extension().is_some_and(|x| x == "bin") {
            let bytes = std::fs::read(&path).expect("fixture");
            let hdr = VnetHdr::decode(bytes[..VNET_HDR_LEN].try_into().expect("12 bytes"));
            let name = path.file_stem().expect("name").to_string_lossy().into_owned();
            v.push((name, hdr, bytes[VNET_HDR_LEN..].to_vec()));
        }
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Inserts an 802.1Q tag the way the kernel re-inserts one on a TAP read (csum_start + 4).
fn with_vlan(frame: &[u8], hdr: &VnetHdr, id: u16) -> (Vec<u8>, VnetHdr) {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    (f, VnetHdr { csum_start: hdr.csum_start + 4, ..*hdr })
}

#[test]
fn fixtures_are_the_expected_set() {
    let names: Vec<String> = fixtures().into_iter().map(|f| f.0).collect();
    for want in [
        "tcp4_gso",
        "tcp4_gso_fin",
        "tcp4_ecn_gso",
        "tcp6_gso",
        "tcp6_gso_fin",
        "tcp6_gso_tail",
        "tcp6_ecn_gso_cwr",
        "udp4_uso",
        "udp6_uso",
        "tcp4_csum",
        "tcp4_csum_data",
        "tcp6_csum",
        "tcp6_csum_data",
        "udp4_csum",
        "udp6_csum",
    ] {
        assert!(names.iter().any(|n| n == want), "fixture {want}.bin missing (have {names:?})");
    }
}

#[test]
fn captured_headers_are_what_the_kernel_promises() {
    for (name, hdr, frame) in fixtures() {
        assert_eq!(hdr.validate(&frame), Ok(()), "{name}: kernel headers pass the write rules");
        assert!(hdr.needs_csum(), "{name}: TAP reads with TUN_F_CSUM give NEEDS_CSUM");
        let gso = hdr.gso().expect("known type");
        assert_eq!(name.contains("_gso") || name.contains("_uso"), gso != Gso::None, "{name}");
        assert_eq!(name.contains("_ecn"), hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0, "{name}");
        let orig = read_original(&frame);
        assert_eq!(usize::from(hdr.csum_start), orig.l4, "{name}: csum_start is the L4 offset");
        if gso != Gso::None {
            assert!(orig.payload.len() > usize::from(hdr.gso_size), "{name}: really GSO");
            let largest = hdr.largest_segment_len(&frame).expect("derivable");
            assert_eq!(largest, orig.hl + usize::from(hdr.gso_size), "{name}");
        }
        if name.contains("cwr") || name.contains("ecn") {
            // The kernel marks exactly the skb that carries CWR with the ECN gso bit.
            assert!(orig.tcp.as_ref().expect("TCP").cwr, "{name}: CWR set");
        }
        if name.ends_with("_fin") {
            assert!(orig.tcp.as_ref().expect("TCP").fin, "{name}: FIN set");
        }
        if name.ends_with("_tail") {
            assert_ne!(orig.payload.len() % usize::from(hdr.gso_size), 0, "{name}: tail");
        }
    }
}

#[test]
fn captured_gso_frames_segment_correctly() {
    let mut checked = 0;
    for (name, hdr, frame) in fixtures() {
        let gso = hdr.gso().expect("known type");
        if gso == Gso::None {
            continue;
        }
        let orig = read_original(&frame);
        let gso_size = usize::from(hdr.gso_size);
        // The MTU the kernel segmented for, a jumbo receiver, and a small one (TCP is cut
        // smaller; USO datagrams cannot be, so that is an error).
        for max in [orig.hl + gso_size, 1514, 9014, 65535 + 18, 590] {
            let fits = orig.hl + gso_size <= max;
            if gso == Gso::Udp && !fits {
                let e = Segmenter::new().plan(&frame, &hdr, max);
                assert!(matches!(e, Err(GsoError::DatagramTooLong { .. })), "{name}: {e:?}");
                continue;
            }
            let n = check_segmentation(&frame, &hdr, max);
            let step = if fits { gso_size } else { max - orig.hl };
            assert_eq!(n, orig.payload.len().div_ceil(step), "{name} at {max}");
            // The same frame behind a VLAN tag, for a receiver 4 bytes larger.
            let (vf, vh) = with_vlan(&frame, &hdr, 7);
            assert_eq!(check_segmentation(&vf, &vh, max + 4), n, "{name} with VLAN");
        }
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} GSO fixtures");
}

#[test]
fn captured_partial_checksums_complete() {
    let mut checked = 0;
    for (name, hdr, frame) in fixtures() {
        if hdr.gso().expect("known type") != Gso::None {
            assert!(matches!(complete_checksum(&frame, &hdr), Err(GsoError::GsoFrame(_))));
            continue;
        }
        let (at, bytes) = complete_checksum(&frame, &hdr).expect("completes");
        assert_eq!(at, usize::from(hdr.csum_start + hdr.csum_offset), "{name}");
        assert_ne!(frame[at..at + 2], bytes, "{name}: the kernel left the pseudo-header sum");
        let mut f = frame.clone();
        f[at..at + 2].copy_from_slice(&bytes);
        verify_frame(&f);
        // Through the segmenter: one frame, the patched prefix plus the rest.
        assert_eq!(check_segmentation(&frame, &hdr, frame.len()), 1, "{name}");
        let mut seg = Segmenter::new();
        let plan = seg.plan(&frame, &hdr, 1514).expect("plan");
        assert!(!plan.is_unchanged());
        seg.emit(&frame, &plan, |h, p| {
            assert_eq!([h, p].concat(), f, "{name}");
            true
        })
        .expect("emit");
        // Too long for the receiver: refused, not truncated.
        assert_eq!(
            seg.plan(&frame, &hdr, frame.len() - 1),
            Err(GsoError::TooLong { len: frame.len(), max: frame.len() - 1 })
        );
        let (vf, vh) = with_vlan(&frame, &hdr, 4094);
        let (vat, vbytes) = complete_checksum(&vf, &vh).expect("completes with VLAN");
        assert_eq!((vat, vbytes), (at + 4, bytes));
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} partial-checksum fixtures");
}

#[test]
fn plain_frames_pass_unchanged() {
    let (_, hdr, frame) =
        fixtures().into_iter().find(|f| f.0 == "tcp4_csum_data").expect("fixture");
    let (at, bytes) = complete_checksum(&frame, &hdr).expect("completes");
    let mut f = frame.clone();
    f[at..at + 2].copy_from_slice(&bytes);
    let mut seg = Segmenter::new();
    let plan = seg.plan(&f, &VnetHdr::PLAIN, 1514).expect("plan");
    assert!(plan.is_unchanged());
    assert_eq!((plan.segments(), plan.total_len()), (1, f.len()));
    let mut got = Vec::new();
    seg.emit(&f, &plan, |h, p| {
        got = [h, p].concat();
        false
    })
    .expect("emit");
    assert_eq!(got, f);
    assert_eq!(
        seg.plan(&f, &VnetHdr::PLAIN, 1500),
        Err(GsoError::TooLong { len: 1514, max: 1500 })
    );
    assert_eq!(complete_checksum(&f, &VnetHdr::PLAIN), Err(GsoError::NoPartialChecksum(0)));
}

#[test]
fn emit_stops_when_asked_and_checks_the_frame() {
    let (_, hdr, frame) = fixtures().into_iter().find(|f| f.0 == "tcp4_gso").expect("fixture");
    let mut seg = Segmenter::new();
    let plan = seg.plan(&frame, &hdr, 1514).expect("plan");
    assert!(plan.segments() > 3);
    let mut calls = 0;
    let n = seg
        .emit(&frame, &plan, |_, _| {
            calls += 1;
            calls < 3
        })
        .expect("emit");
    assert_eq!((n, calls), (3, 3));
    assert_eq!(
        seg.emit(&frame[..frame.len() - 1], &plan, |_, _| true),
        Err(GsoError::PlanMismatch { planned: frame.len(), len: frame.len() - 1 })
    );
}

#[test]
fn header_inconsistencies_are_refused() {
    let (_, hdr, frame) = fixtures().into_iter().find(|f| f.0 == "tcp4_gso_fin").expect("fixture");
    let seg = Segmenter::new();
    let plan = |f: &[u8], h: &VnetHdr| Segmenter::new().plan(f, h, 1514);
    assert!(seg.plan(&frame, &hdr, 1514).is_ok());
    // hdr_len is a hint and never used.
    assert!(plan(&frame, &VnetHdr { hdr_len: 0, ..hdr }).is_ok());
    assert!(plan(&frame, &VnetHdr { hdr_len: 9999, ..hdr }).is_ok());
    assert_eq!(
        plan(&frame, &VnetHdr { csum_start: hdr.csum_start + 4, ..hdr }),
        Err(GsoError::CsumStart { csum_start: hdr.csum_start + 4, l4: 34 })
    );
    assert_eq!(
        plan(&frame, &VnetHdr { csum_offset: 6, ..hdr }),
        Err(GsoError::CsumOffset { csum_offset: 6, expected: 16 })
    );
    assert_eq!(
        plan(&frame, &VnetHdr { gso_type: VIRTIO_NET_HDR_GSO_TCPV6, ..hdr }),
        Err(GsoError::L4Mismatch { gso_type: 4, version: 4, protocol: 6 })
    );
    assert_eq!(
        plan(&frame, &VnetHdr { gso_type: VIRTIO_NET_HDR_GSO_UDP_L4, csum_offset: 6, ..hdr }),
        Err(GsoError::L4Mismatch { gso_type: 5, version: 4, protocol: 6 })
    );
    assert_eq!(
        plan(&frame, &VnetHdr { gso_size: 0, ..hdr }),
        Err(GsoError::Header(VnetError::BadGsoSize { gso_type: 1, gso_size: 0 }))
    );
    assert_eq!(
        plan(&frame, &VnetHdr { gso_type: 3, ..hdr }),
        Err(GsoError::Header(VnetError::UnknownGsoType(3)))
    );
    // Without NEEDS_CSUM the headers are still found by parsing.
    assert!(plan(&frame, &VnetHdr { flags: 0, csum_start: 0, csum_offset: 0, ..hdr }).is_ok());
    // Trailing bytes behind the IP packet, a truncated frame, a wrong IP length.
    let mut longer = frame.clone();
    longer.push(0);
    assert!(matches!(plan(&longer, &hdr), Err(GsoError::IpLength { .. })));
    assert!(matches!(plan(&frame[..frame.len() - 1], &hdr), Err(GsoError::IpLength { .. })));
    // A fragment.
    let mut frag = frame.clone();
    frag[14 + 6] |= 0x20;
    assert_eq!(plan(&frag, &hdr), Err(GsoError::Fragment { offset: 0, more: true }));
    // A SYN cannot be spread over segments.
    let mut syn = frame.clone();
    syn[34 + 13] |= 0x02;
    assert!(matches!(plan(&syn, &hdr), Err(GsoError::SynSegmented { .. })));
    // Headers that fill the receiver's frame.
    assert_eq!(
        seg.plan(&frame, &hdr, 66),
        Err(GsoError::NoRoomForPayload { headers: 66, max: 66 })
    );
    assert!(seg.plan(&frame, &hdr, 67).is_ok(), "one payload byte per segment");
    // Not IP.
    let mut arp = frame.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(plan(&arp, &hdr), Err(GsoError::EtherType(0x0806)));
    let (mut qinq, qh) = with_vlan(&frame, &hdr, 5);
    qinq[16..18].copy_from_slice(&0x8100u16.to_be_bytes());
    assert_eq!(plan(&qinq, &qh), Err(GsoError::EtherType(0x8100)));
}

#[test]
fn ipv6_extension_headers_are_refused() {
    let (_, hdr, frame) = fixtures().into_iter().find(|f| f.0 == "tcp6_gso").expect("fixture");
    let mut f = frame.clone();
    f[14 + 6] = 0; // next header: hop-by-hop
    assert_eq!(
        Segmenter::new().plan(&f, &hdr, 1514),
        Err(GsoError::L4Mismatch { gso_type: 4, version: 6, protocol: 0 })
    );
}

#[test]
fn udp_checksum_zero_is_sent_as_ffff() {
    // Datagrams whose checksum computes to 0: a payload word equal to the checksum it would
    // have with that word zero makes the sum 0xffff.
    let mk = |w: [u8; 2], datagrams: usize| {
        let s = Spec {
            vlan: None,
            v6: false,
            udp: true,
            ip_options: vec![],
            tcp_options: vec![],
            flags: 0,
            seq: 0,
            ip_id: 0,
            ecn_gso: false,
            gso_size: 2,
            payload_len: 2 * datagrams,
            seed: 0,
            partial: 0,
            hdr_len: 0,
        };
        let (mut f, h) = build(&s);
        for d in 0..datagrams {
            f[42 + 2 * d..44 + 2 * d].copy_from_slice(&w);
        }
        (f, h)
    };
    // The checksum of one datagram with payload 00 00, the long way (etherparse).
    let ip = Ipv4Header::new(10, 64, IpNumber::UDP, [10, 77, 0, 1], [10, 77, 0, 2]).expect("ip");
    let c0 = UdpHeader::with_ipv4_checksum(40000, 5201, &ip, &[0, 0]).expect("fits").checksum;
    assert_ne!(c0, 0xffff, "pick other ports: this case would test nothing");
    let (frame, hdr) = mk(c0.to_be_bytes(), 3);
    let mut outs = Vec::new();
    Segmenter::new()
        .segment(&frame, &hdr, 1514, |h, p| {
            outs.push([h, p].concat());
            true
        })
        .expect("segments");
    assert_eq!(outs.len(), 3);
    for o in &outs {
        assert_eq!(o[40..42], [0xff, 0xff], "computed 0 goes out as 0xffff");
        verify_frame(o);
    }
    // The same datagram as a single NEEDS_CSUM frame.
    let one = &outs[0];
    let mut partial = one.clone();
    let pseudo = naive_pseudo_sum(one, 14, false, 17, 10);
    partial[40..42].copy_from_slice(&pseudo.to_be_bytes());
    let h = VnetHdr { gso_type: 0, gso_size: 0, ..hdr };
    assert_eq!(complete_checksum(&partial, &h), Ok((40, [0xff, 0xff])));
}

// ---------------------------------------------------------------------------------------------
// Generated super-frames

#[derive(Debug, Clone)]
struct Spec {
    vlan: Option<u16>,
    v6: bool,
    udp: bool,
    ip_options: Vec<u8>,
    tcp_options: Vec<u8>,
    /// TCP flag bits other than SYN and RST: FIN, PSH, ACK, URG, ECE, CWR, NS.
    flags: u16,
    seq: u32,
    ip_id: u16,
    ecn_gso: bool,
    gso_size: u16,
    payload_len: usize,
    seed: u64,
    /// What the kernel leaves in the L4 checksum field; must not matter.
    partial: u16,
    hdr_len: u16,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (proptest::option::of(0u16..4095), any::<bool>(), any::<bool>()),
        (0usize..=10, 0usize..=10, any::<u16>(), any::<u32>(), any::<u16>(), any::<bool>()),
        (prop_oneof![1u16..=64, 500u16..=1500, 1u16..=9000], 0usize..4, any::<usize>()),
        (any::<u64>(), any::<u16>(), any::<u16>()),
    )
        .prop_map(
            |(
                (vlan, v6, udp),
                (ipo, tcpo, flags, seq, ip_id, ecn),
                (gso, mode, raw),
                (seed, partial, hdr_len),
            )| {
                // IPv4 options: NOPs and an end-of-list; TCP options: NOPs with a timestamp-sized
                // block of arbitrary bytes is not valid, so use NOPs and a valid timestamp.
                let ip_options = vec![1u8; ipo * 4];
                let mut tcp_options = Vec::new();
                for i in 0..tcpo {
                    if i % 3 == 2 && tcp_options.len() + 12 <= 40 {
                        tcp_options.extend_from_slice(&[1, 1, 8, 10]);
                        tcp_options.extend_from_slice(&seed.to_be_bytes());
                    } else if tcp_options.len() + 4 <= 40 {
                        tcp_options.extend_from_slice(&[1, 1, 1, 1]);
                    }
                }
                let g = usize::from(gso);
                let hl = 18
                    + if v6 { 40 } else { 20 + ipo * 4 }
                    + if udp { 8 } else { 20 + tcp_options.len() };
                let max_payload = if v6 { 65535 - (hl - 18 - 40) } else { 65535 - (hl - 18) };
                // Payload lengths: exact multiples, 1-byte tails, below one segment, and any.
                let k = raw % (max_payload / g + 1);
                let payload_len = match mode {
                    0 => k * g,
                    1 => k * g + 1,
                    2 => raw % (g + 1),
                    _ => raw % (max_payload + 1),
                }
                .min(max_payload);
                Spec {
                    vlan,
                    v6,
                    udp,
                    ip_options,
                    tcp_options,
                    flags: flags & !0x006, // no SYN, no RST
                    seq,
                    ip_id,
                    ecn_gso: ecn && !udp,
                    gso_size: gso,
                    payload_len,
                    seed,
                    partial,
                    hdr_len,
                }
            },
        )
}

fn payload_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds the super-frame and the header a TAP read would give for it.
fn build(s: &Spec) -> (Vec<u8>, VnetHdr) {
    let payload = payload_bytes(s.seed, s.payload_len);
    let ip_type = if s.v6 { EtherType::IPV6 } else { EtherType::IPV4 };
    let mut f = Vec::new();
    let eth = Ethernet2Header {
        source: [2, 0, 0, 0, 0, 1],
        destination: [2, 0, 0, 0, 0, 2],
        ether_type: if s.vlan.is_some() { EtherType::VLAN_TAGGED_FRAME } else { ip_type },
    };
    f.extend_from_slice(&eth.to_bytes());
    if let Some(id) = s.vlan {
        let v = SingleVlanHeader {
            vlan_id: VlanId::try_new(id).expect("< 4095"),
            ether_type: ip_type,
            ..Default::default()
        };
        f.extend_from_slice(&v.to_bytes());
    }
    let protocol = if s.udp { IpNumber::UDP } else { IpNumber::TCP };
    let mut tcp = TcpHeader::new(40000, 5201, s.seq, 501);
    tcp.fin = s.flags & 0x001 != 0;
    tcp.psh = s.flags & 0x008 != 0;
    tcp.ack = s.flags & 0x010 != 0;
    tcp.urg = s.flags & 0x020 != 0;
    tcp.ece = s.flags & 0x040 != 0;
    tcp.cwr = s.flags & 0x080 != 0 || s.ecn_gso;
    tcp.ns = s.flags & 0x100 != 0;
    tcp.acknowledgment_number = s.seq.rotate_left(7);
    tcp.urgent_pointer = if tcp.urg { 3 } else { 0 };
    tcp.set_options_raw(&s.tcp_options).expect("options fit");
    tcp.checksum = s.partial;
    let l4_len = if s.udp { 8 } else { tcp.header_len() } + payload.len();
    if s.v6 {
        let ip = Ipv6Header {
            traffic_class: 0x02,
            flow_label: etherparse::Ipv6FlowLabel::try_new(0x12345).expect("20 bits"),
            payload_length: l4_len as u16,
            next_header: protocol,
            hop_limit: 64,
            source: [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            destination: [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        };
        f.extend_from_slice(&ip.to_bytes());
    } else {
        let mut ip =
            Ipv4Header::new(0, 64, protocol, [10, 77, 0, 1], [10, 77, 0, 2]).expect("valid");
        ip.options = s.ip_options.as_slice().try_into().expect("options fit");
        ip.identification = s.ip_id;
        ip.dont_fragment = true;
        ip.total_len = (ip.header_len() + l4_len) as u16;
        ip.header_checksum = ip.calc_header_checksum();
        f.extend_from_slice(&ip.to_bytes());
    }
    let l4 = f.len();
    if s.udp {
        let u = UdpHeader {
            source_port: 40000,
            destination_port: 5201,
            length: l4_len as u16,
            checksum: s.partial,
        };
        f.extend_from_slice(&u.to_bytes());
    } else {
        f.extend_from_slice(&tcp.to_bytes());
    }
    f.extend_from_slice(&payload);
    let gso_type = match (s.udp, s.v6) {
        (true, _) => VIRTIO_NET_HDR_GSO_UDP_L4,
        (false, false) => VIRTIO_NET_HDR_GSO_TCPV4,
        (false, true) => VIRTIO_NET_HDR_GSO_TCPV6,
    } | if s.ecn_gso { VIRTIO_NET_HDR_GSO_ECN } else { 0 };
    let hdr = VnetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type,
        hdr_len: s.hdr_len,
        gso_size: s.gso_size,
        csum_start: l4 as u16,
        csum_offset: if s.udp { 6 } else { 16 },
    };
    (f, hdr)
}

/// The uncomplemented pseudo-header sum, computed the long way (RFC 1071, 16-bit words).
fn naive_pseudo_sum(frame: &[u8], l3: usize, v6: bool, protocol: u8, l4_len: usize) -> u16 {
    let mut words: Vec<u32> = Vec::new();
    let addrs = if v6 { &frame[l3 + 8..l3 + 40] } else { &frame[l3 + 12..l3 + 20] };
    for p in addrs.chunks(2) {
        words.push(u32::from(u16::from_be_bytes([p[0], p[1]])));
    }
    words.push(u32::from(protocol));
    words.push((l4_len >> 16) as u32);
    words.push((l4_len & 0xffff) as u32);
    let mut s: u32 = words.iter().sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn generated_super_frames_segment_correctly(s in spec(), max_sel in 0usize..4, max_raw in any::<usize>()) {
        let (frame, hdr) = build(&s);
        let hl = usize::from(hdr.csum_start) + if s.udp { 8 } else { 20 + s.tcp_options.len() };
        let max = match max_sel {
            0 => 1514 + if s.vlan.is_some() { 4 } else { 0 },
            1 => 9018,
            2 => hl + usize::from(s.gso_size),
            _ => hl + 1 + max_raw % 9000,
        };
        let datagram = hl + usize::from(s.gso_size).min(s.payload_len);
        if s.udp && datagram > max {
            prop_assert_eq!(
                Segmenter::new().plan(&frame, &hdr, max),
                Err(GsoError::DatagramTooLong { len: datagram, max })
            );
        } else {
            let n = check_segmentation(&frame, &hdr, max);
            prop_assert!(n >= 1);
        }
    }

    #[test]
    fn generated_partial_checksums_complete(s in spec()) {
        // A frame of one segment with the kernel's partial checksum in the L4 field.
        let s = Spec { payload_len: s.payload_len % 2000, gso_size: 9000, ..s };
        let (mut frame, gso_hdr) = build(&s);
        let hdr = VnetHdr { gso_type: 0, gso_size: 0, ..gso_hdr };
        let l3 = if s.vlan.is_some() { 18 } else { 14 };
        let l4 = usize::from(hdr.csum_start);
        let at = l4 + usize::from(hdr.csum_offset);
        let protocol = if s.udp { 17 } else { 6 };
        let pseudo = naive_pseudo_sum(&frame, l3, s.v6, protocol, frame.len() - l4);
        frame[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        let (got_at, bytes) = complete_checksum(&frame, &hdr).expect("completes");
        prop_assert_eq!(got_at, at);
        frame[at..at + 2].copy_from_slice(&bytes);
        verify_frame(&frame);
    }

    #[test]
    fn garbage_never_panics(
        hdr in any::<[u8; 12]>(),
        frame in proptest::collection::vec(any::<u8>(), 0..200),
        max in 0usize..2000,
    ) {
        let hdr = VnetHdr::decode(&hdr);
        let _ = complete_checksum(&frame, &hdr);
        emit_all_consistent(&frame, &hdr, max)?;
    }

    #[test]
    fn corrupted_super_frames_never_panic(
        s in spec(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
        cut_it in any::<bool>(),
        hdr_noise in any::<[u8; 12]>(),
        noisy_hdr in any::<bool>(),
        max in 0usize..10000,
    ) {
        let (mut frame, mut hdr) = build(&Spec { payload_len: s.payload_len % 5000, ..s });
        // Damage the headers (the first 140 bytes), where lengths live.
        for (pos, x) in flips {
            let n = frame.len().min(140);
            frame[pos % n] ^= x;
        }
        if cut_it {
            frame.truncate(cut % (frame.len() + 1));
        }
        if noisy_hdr {
            hdr = VnetHdr::decode(&hdr_noise);
        }
        let _ = complete_checksum(&frame, &hdr);
        emit_all_consistent(&frame, &hdr, max)?;
    }
}

/// Whatever `plan` accepts, `emit` produces exactly as planned, within the receiver's size.
fn emit_all_consistent(frame: &[u8], hdr: &VnetHdr, max: usize) -> Result<(), TestCaseError> {
    let mut seg = Segmenter::new();
    if let Ok(plan) = seg.plan(frame, hdr, max) {
        let mut lens = Vec::new();
        let n = seg
            .emit(frame, &plan, |h, p| {
                lens.push(h.len() + p.len());
                true
            })
            .map_err(|e| TestCaseError::fail(format!("emit after plan: {e}")))?;
        prop_assert_eq!(n, plan.segments());
        prop_assert_eq!(lens.len(), plan.segments());
        for (i, l) in lens.iter().enumerate() {
            let want = if i + 1 == lens.len() { plan.last_len() } else { plan.segment_len() };
            prop_assert_eq!(*l, want);
            prop_assert!(*l <= max);
        }
    }
    Ok(())
}

/// Writes every fixture, completed or segmented for a 1514-byte receiver, to the directory in
/// `IVNET_OFFLOAD_DUMP` as `<fixture>.frames` (each frame: u32 LE length, then the bytes), for
/// `testdata/kernel_check.py`, which hands them to a real kernel and reads its checksum-error
/// counters. See `testdata/README.md`.
#[test]
#[ignore = "writes files for testdata/kernel_check.py; run by hand"]
fn dump_segments_for_kernel_check() {
    let dir = std::env::var("IVNET_OFFLOAD_DUMP").expect("set IVNET_OFFLOAD_DUMP to a directory");
    let mut seg = Segmenter::new();
    for (name, hdr, frame) in fixtures() {
        let mut out = Vec::new();
        seg.segment(&frame, &hdr, 1514, |h, p| {
            out.extend_from_slice(&((h.len() + p.len()) as u32).to_le_bytes());
            out.extend_from_slice(h);
            out.extend_from_slice(p);
            true
        })
        .expect("segments");
        std::fs::write(format!("{dir}/{name}.frames"), out).expect("write");
    }
}
