//! Software offloads for a receiver that cannot take a frame as it is: completing a partial
//! checksum (NEEDS_CSUM) and segmenting a GSO super-frame (TCP over IPv4/IPv6, with or without
//! ECN, and UDP_L4/USO) into standard frames with complete checksums.
//!
//! The rules are Linux's (`tcp_gso_segment`, `__udp_gso_segment`, `inet_gso_segment`; see
//! `research/offloads.md` §3): per segment the IPv4 total length, ID (ID₀ + i) and header
//! checksum, or the IPv6 payload length; TCP sequence number seq₀ + offset, FIN and PSH on the
//! last segment only, CWR on the first only; the TCP/UDP checksum over pseudo-header, header and
//! payload; the UDP length per datagram and a computed UDP checksum of 0 sent as 0xFFFF. Header
//! lengths come from parsing the frame (cross-checked against `csum_start`), never from
//! `hdr_len` (pitfall 2). Every length is checked, so a malformed frame, also one from an
//! untrusted peer, is a [`GsoError`] and never a panic or an out-of-bounds slice.
//!
//! Nothing is allocated: a segment is handed out as a slice of the [`Segmenter`]'s small
//! header scratch plus a borrowed slice of the original frame's payload.
//!
//! Parsed: Ethernet II, at most one 802.1Q tag, IPv4 (with options, not a fragment), IPv6
//! without extension headers, TCP (with options) and UDP.

use etherparse::{EtherType, Ethernet2HeaderSlice, Ipv4HeaderSlice, Ipv6HeaderSlice};
use etherparse::{SingleVlanHeaderSlice, TcpHeaderSlice};
use thiserror::Error;

use super::csum;
use super::vnet::{Gso, VnetError, VnetHdr, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET};

/// Largest header block (L2 + L3 + L4, or the prefix up to a completed checksum) the segmenter
/// builds: Ethernet + VLAN (18) + IPv4 with options (60) + TCP with options (60) is 138.
pub const MAX_HEADERS_LEN: usize = 256;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// Why a frame could not be completed or segmented. The caller counts it as a drop.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GsoError {
    /// The virtio-net header itself is unusable (unknown gso_type, gso_size 0).
    #[error(transparent)]
    Header(#[from] VnetError),
    /// The frame ends inside a header.
    #[error("frame of {len} bytes ends inside its {what}")]
    Truncated {
        /// Which header.
        what: &'static str,
        /// The frame's length.
        len: usize,
    },
    /// Not IPv4 or IPv6 behind at most one 802.1Q tag.
    #[error("ethertype {0:#06x} is not IPv4 or IPv6 behind at most one 802.1Q tag")]
    EtherType(u16),
    /// A malformed IPv4 header.
    #[error("IPv4 header: {0}")]
    Ipv4(etherparse::err::ipv4::HeaderSliceError),
    /// A malformed IPv6 header.
    #[error("IPv6 header: {0}")]
    Ipv6(etherparse::err::ipv6::HeaderSliceError),
    /// A malformed TCP header.
    #[error("TCP header: {0}")]
    Tcp(etherparse::err::tcp::HeaderSliceError),
    /// The IP length field disagrees with the frame (GSO frames must end with the IP packet).
    #[error("IP packet of {ip_len} bytes at offset {l3} does not fit a {frame_len}-byte frame")]
    IpLength {
        /// Offset of the IP header.
        l3: usize,
        /// Total length from the IP header(s).
        ip_len: usize,
        /// The frame's length.
        frame_len: usize,
    },
    /// IPv4 fragments are not segmented.
    #[error("IPv4 fragment (offset {offset}, more fragments: {more}) cannot be segmented")]
    Fragment {
        /// Fragment offset in 8-byte units.
        offset: u16,
        /// The more-fragments flag.
        more: bool,
    },
    /// The gso_type does not match what the frame carries (an IPv6 extension header shows up
    /// here as its next-header number).
    #[error("gso_type {gso_type:#04x} does not fit IPv{version} carrying protocol {protocol} (IPv6 extension headers are not supported)")]
    L4Mismatch {
        /// The header's gso_type.
        gso_type: u8,
        /// IP version of the frame.
        version: u8,
        /// IPv4 protocol or IPv6 next header.
        protocol: u8,
    },
    /// NEEDS_CSUM with a csum_start that is not where the parsed L4 header starts.
    #[error("csum_start {csum_start} is not the L4 header offset {l4}")]
    CsumStart {
        /// The header's csum_start.
        csum_start: u16,
        /// Offset of the L4 header found by parsing.
        l4: usize,
    },
    /// NEEDS_CSUM with a csum_offset that is not the L4 protocol's checksum field.
    #[error("csum_offset {csum_offset} must be {expected} for this protocol")]
    CsumOffset {
        /// The header's csum_offset.
        csum_offset: u16,
        /// 16 for TCP, 6 for UDP.
        expected: u16,
    },
    /// The partial checksum to complete is not inside the L4 part of the IP packet.
    #[error("partial checksum at csum_start {csum_start} + csum_offset {csum_offset} is outside the L4 data at {l4}..{end}")]
    CsumOutOfPacket {
        /// The header's csum_start.
        csum_start: u16,
        /// The header's csum_offset.
        csum_offset: u16,
        /// Offset of the L4 header found by parsing.
        l4: usize,
        /// End of the IP packet.
        end: usize,
    },
    /// [`complete_checksum`] on a header without NEEDS_CSUM.
    #[error("header has no NEEDS_CSUM flag (flags {0:#04x}): no checksum to complete")]
    NoPartialChecksum(u8),
    /// [`complete_checksum`] on a GSO frame; it must be segmented instead.
    #[error("GSO frame (gso_type {0:#04x}) must be segmented, not completed")]
    GsoFrame(u8),
    /// The UDP length of a USO super-frame disagrees with the IP length.
    #[error("UDP length {udp_len} does not match the {l4_len} bytes behind the IP header")]
    UdpLength {
        /// The UDP header's length field.
        udp_len: u16,
        /// L4 bytes according to the IP header.
        l4_len: usize,
    },
    /// A SYN spread over several segments (its sequence number would be counted twice).
    #[error("TCP SYN with {payload} payload bytes would need {segments} segments")]
    SynSegmented {
        /// TCP payload bytes.
        payload: usize,
        /// Segments it would need.
        segments: usize,
    },
    /// The headers (or the prefix up to the checksum) do not fit the segmenter's scratch.
    #[error("headers of {0} bytes exceed the segmenter's {MAX_HEADERS_LEN}-byte scratch")]
    HeadersTooLong(usize),
    /// A frame that is not GSO is larger than the receiver takes.
    #[error("frame of {len} bytes exceeds the receiver's maximum frame of {max}")]
    TooLong {
        /// The frame's length.
        len: usize,
        /// The receiver's largest Ethernet frame.
        max: usize,
    },
    /// The headers alone fill the receiver's largest frame.
    #[error("headers of {headers} bytes leave no payload room in a {max}-byte frame")]
    NoRoomForPayload {
        /// Length of the L2-L4 headers.
        headers: usize,
        /// The receiver's largest Ethernet frame.
        max: usize,
    },
    /// A USO datagram is larger than the receiver takes; datagrams cannot be split.
    #[error("UDP datagram frame of {len} bytes exceeds the receiver's maximum frame of {max}")]
    DatagramTooLong {
        /// Length of one datagram's Ethernet frame.
        len: usize,
        /// The receiver's largest Ethernet frame.
        max: usize,
    },
    /// [`Segmenter::emit`] was given a frame other than the one planned.
    #[error("plan was made for a {planned}-byte frame, given {len} bytes")]
    PlanMismatch {
        /// Frame length the plan was made for.
        planned: usize,
        /// Length of the frame given.
        len: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IpVersion {
    V4,
    V6,
}

/// Where the network layer is and what it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct L3 {
    /// Offset of the IP header (14, or 18 behind a VLAN tag).
    l3: usize,
    version: IpVersion,
    /// Offset just behind the IP header.
    l4: usize,
    /// IPv4 protocol or IPv6 next header.
    protocol: u8,
    /// End of the IP packet according to its length field (bytes behind it are padding).
    end: usize,
}

fn parse_l3(frame: &[u8]) -> Result<L3, GsoError> {
    let len = frame.len();
    let eth = Ethernet2HeaderSlice::from_slice(frame)
        .map_err(|_| GsoError::Truncated { what: "Ethernet header", len })?;
    let (l3, ether_type) = match eth.ether_type() {
        EtherType::VLAN_TAGGED_FRAME => {
            let vlan = SingleVlanHeaderSlice::from_slice(&frame[ETH_HLEN..])
                .map_err(|_| GsoError::Truncated { what: "VLAN tag", len })?;
            (ETH_HLEN + VLAN_HLEN, vlan.ether_type())
        }
        t => (ETH_HLEN, t),
    };
    let rest = &frame[l3..];
    match ether_type {
        EtherType::IPV4 => {
            let ip = Ipv4HeaderSlice::from_slice(rest).map_err(GsoError::Ipv4)?;
            let ihl = ip.slice().len();
            let ip_len = usize::from(ip.total_len());
            if ip_len < ihl || ip_len > rest.len() {
                return Err(GsoError::IpLength { l3, ip_len, frame_len: len });
            }
            Ok(L3 {
                l3,
                version: IpVersion::V4,
                l4: l3 + ihl,
                protocol: ip.protocol().0,
                end: l3 + ip_len,
            })
        }
        EtherType::IPV6 => {
            let ip = Ipv6HeaderSlice::from_slice(rest).map_err(GsoError::Ipv6)?;
            let ip_len = IPV6_HLEN + usize::from(ip.payload_length());
            if ip_len > rest.len() {
                return Err(GsoError::IpLength { l3, ip_len, frame_len: len });
            }
            Ok(L3 {
                l3,
                version: IpVersion::V6,
                l4: l3 + IPV6_HLEN,
                protocol: ip.next_header().0,
                end: l3 + ip_len,
            })
        }
        t => Err(GsoError::EtherType(t.0)),
    }
}

/// Where the checksum of a NEEDS_CSUM frame without GSO is summed and stored: found by
/// [`partial_checksum`], completed by [`PartialChecksum::complete`] or by a copy that sums as it
/// goes (`Producer::push_summed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialChecksum {
    /// `csum_start`: the first summed byte.
    pub start: usize,
    /// End of the IP packet: padding behind it is not summed.
    pub end: usize,
    /// Offset of the 16-bit checksum field (inside `start..end`).
    pub field: usize,
    /// A UDP checksum, which is never sent as 0 (0 means "no checksum").
    pub udp: bool,
}

impl PartialChecksum {
    /// The two bytes that complete `frame`'s checksum, to store at `self.field`.
    pub fn complete(&self, frame: &[u8]) -> [u8; 2] {
        self.value(csum::add(0, &frame[self.start..self.end]))
    }

    /// The two bytes to store at `self.field`, from the partial sum of `start..end` (taken
    /// however the caller likes, e.g. while copying).
    pub fn value(&self, sum: u64) -> [u8; 2] {
        match csum::finish(sum) {
            0 if self.udp => 0xffff_u16,
            v => v,
        }
        .to_be_bytes()
    }

    /// Writes `value` (from [`PartialChecksum::complete`] or a summing copy) into `frame`'s
    /// checksum field, which makes its checksum complete.
    pub fn store(&self, frame: &mut [u8], value: [u8; 2]) {
        frame[self.field..self.field + 2].copy_from_slice(&value);
    }
}

/// Where to complete the checksum of a NEEDS_CSUM frame without GSO.
///
/// As in Linux's `skb_checksum_help` and wireguard-go's `gsoNoneChecksum`: the field holds the
/// uncomplemented pseudo-header sum, so the one's-complement sum from `csum_start` to the end of
/// the IP packet (field included) is folded and complemented. Padding behind the IP packet is
/// not summed.
pub fn partial_checksum(frame: &[u8], hdr: &VnetHdr) -> Result<PartialChecksum, GsoError> {
    if !hdr.needs_csum() {
        return Err(GsoError::NoPartialChecksum(hdr.flags));
    }
    if hdr.gso()? != Gso::None {
        return Err(GsoError::GsoFrame(hdr.gso_type));
    }
    let l3 = parse_l3(frame)?;
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if start < l3.l4 || field + 2 > l3.end {
        return Err(GsoError::CsumOutOfPacket {
            csum_start: hdr.csum_start,
            csum_offset: hdr.csum_offset,
            l4: l3.l4,
            end: l3.end,
        });
    }
    let udp = l3.protocol == IPPROTO_UDP || hdr.csum_offset == UDP_CSUM_OFFSET;
    Ok(PartialChecksum { start, end: l3.end, field, udp })
}

/// The checksum that completes a NEEDS_CSUM frame without GSO (see [`partial_checksum`]): the
/// byte offset of the checksum field and the two bytes to store there.
pub fn complete_checksum(frame: &[u8], hdr: &VnetHdr) -> Result<(usize, [u8; 2]), GsoError> {
    let p = partial_checksum(frame, hdr)?;
    Ok((p.field, p.complete(frame)))
}

/// The headers of a GSO frame, found by parsing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    l3: L3,
    /// End of the L4 header: where the payload starts.
    hl: usize,
    /// Pseudo-header sum without the length.
    pseudo: u64,
}

fn parse_gso(frame: &[u8], hdr: &VnetHdr, gso: Gso) -> Result<Layout, GsoError> {
    if hdr.gso_size == 0 {
        return Err(VnetError::BadGsoSize { gso_type: hdr.gso_type, gso_size: 0 }.into());
    }
    let l3 = parse_l3(frame)?;
    let version = match l3.version {
        IpVersion::V4 => 4,
        IpVersion::V6 => 6,
    };
    let (protocol, csum_offset) = match (gso, l3.version) {
        (Gso::Tcp4 { .. }, IpVersion::V4) | (Gso::Tcp6 { .. }, IpVersion::V6) => {
            (IPPROTO_TCP, TCP_CSUM_OFFSET)
        }
        (Gso::Udp, _) => (IPPROTO_UDP, UDP_CSUM_OFFSET),
        _ => (0, 0),
    };
    if protocol == 0 || l3.protocol != protocol {
        return Err(GsoError::L4Mismatch {
            gso_type: hdr.gso_type,
            version,
            protocol: l3.protocol,
        });
    }
    if l3.version == IpVersion::V4 {
        let frag = u16::from_be_bytes([frame[l3.l3 + 6], frame[l3.l3 + 7]]);
        if frag & 0x3fff != 0 {
            return Err(GsoError::Fragment { offset: frag & 0x1fff, more: frag & 0x2000 != 0 });
        }
    }
    // A super-frame is exactly one IP packet: no padding to account for.
    if l3.end != frame.len() {
        return Err(GsoError::IpLength {
            l3: l3.l3,
            ip_len: l3.end - l3.l3,
            frame_len: frame.len(),
        });
    }
    if hdr.needs_csum() {
        if usize::from(hdr.csum_start) != l3.l4 {
            return Err(GsoError::CsumStart { csum_start: hdr.csum_start, l4: l3.l4 });
        }
        if hdr.csum_offset != csum_offset {
            return Err(GsoError::CsumOffset {
                csum_offset: hdr.csum_offset,
                expected: csum_offset,
            });
        }
    }
    let l4 = &frame[l3.l4..l3.end];
    let l4_hlen = if protocol == IPPROTO_TCP {
        TcpHeaderSlice::from_slice(l4).map_err(GsoError::Tcp)?.slice().len()
    } else {
        if l4.len() < UDP_HLEN {
            return Err(GsoError::Truncated { what: "UDP header", len: frame.len() });
        }
        let udp_len = u16::from_be_bytes([l4[4], l4[5]]);
        if usize::from(udp_len) != l4.len() {
            return Err(GsoError::UdpLength { udp_len, l4_len: l4.len() });
        }
        UDP_HLEN
    };
    let hl = l3.l4 + l4_hlen;
    if hl > MAX_HEADERS_LEN {
        return Err(GsoError::HeadersTooLong(hl));
    }
    // parse_l3 saw the whole fixed IP header, so the address ranges are inside the frame.
    let ip = &frame[l3.l3..];
    let pseudo = match l3.version {
        IpVersion::V4 => {
            let (mut src, mut dst) = ([0u8; 4], [0u8; 4]);
            src.copy_from_slice(&ip[12..16]);
            dst.copy_from_slice(&ip[16..20]);
            csum::pseudo_ipv4(src, dst, protocol, 0)
        }
        IpVersion::V6 => {
            let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            csum::pseudo_ipv6(&src, &dst, protocol, 0)
        }
    };
    Ok(Layout { l3, hl, pseudo })
}

/// How one frame goes to one receiver: how many frames of which lengths, so the caller can check
/// ring room for all of them before writing any. Made by [`Segmenter::plan`], used by
/// [`Segmenter::emit`] on the same frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    segments: usize,
    segment_len: usize,
    last_len: usize,
    frame_len: usize,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Complete already: sent as it is.
    Whole,
    /// Checksum completed: the prefix up to `split` is copied with `value` at `at`.
    Patched { at: usize, value: [u8; 2], split: usize },
    /// TCP segments of `mss` payload bytes.
    Tcp { layout: Layout, mss: usize },
    /// UDP datagrams of `size` payload bytes.
    Udp { layout: Layout, size: usize },
}

impl Plan {
    /// Number of frames [`Segmenter::emit`] produces (at least 1).
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Ethernet length of every frame but the last.
    pub fn segment_len(&self) -> usize {
        self.segment_len
    }

    /// Ethernet length of the last frame (the only one if [`Self::segments`] is 1).
    pub fn last_len(&self) -> usize {
        self.last_len
    }

    /// Sum of all frame lengths.
    pub fn total_len(&self) -> usize {
        self.segment_len * (self.segments - 1) + self.last_len
    }

    /// True if the frame is sent unchanged (a plain frame).
    pub fn is_unchanged(&self) -> bool {
        self.kind == Kind::Whole
    }
}

/// Builds the standard frames for a receiver that cannot take a frame as it is. Holds only a
/// scratch buffer for one segment's headers; keep one per thread and reuse it.
pub struct Segmenter {
    headers: [u8; MAX_HEADERS_LEN],
}

impl Default for Segmenter {
    fn default() -> Self {
        Self::new()
    }
}

impl Segmenter {
    /// A segmenter with an empty scratch buffer.
    pub fn new() -> Self {
        Segmenter { headers: [0; MAX_HEADERS_LEN] }
    }

    /// Plans how `frame` (with its virtio-net header `hdr`) goes to a receiver whose largest
    /// Ethernet frame is `max_frame_len` (MTU + 14, + 4 with a VLAN tag) and which takes only
    /// complete frames:
    /// - a plain frame is sent unchanged; a NEEDS_CSUM frame with its checksum completed (both
    ///   must fit `max_frame_len`, or [`GsoError::TooLong`]);
    /// - TCP GSO is cut into segments of min(`gso_size`, what fits `max_frame_len`) payload
    ///   bytes (TCP may be re-segmented smaller);
    /// - USO is cut into datagrams of `gso_size` bytes; if one does not fit `max_frame_len`,
    ///   [`GsoError::DatagramTooLong`] (datagram boundaries are kept).
    ///
    /// The checksum of a NEEDS_CSUM frame is computed here, once, so a plan can be emitted to
    /// several receivers; segment checksums are computed in [`Self::emit`].
    pub fn plan(
        &self,
        frame: &[u8],
        hdr: &VnetHdr,
        max_frame_len: usize,
    ) -> Result<Plan, GsoError> {
        let gso = hdr.gso()?;
        let frame_len = frame.len();
        let one = |kind| Plan {
            segments: 1,
            segment_len: frame_len,
            last_len: frame_len,
            frame_len,
            kind,
        };
        if gso == Gso::None {
            if frame_len > max_frame_len {
                return Err(GsoError::TooLong { len: frame_len, max: max_frame_len });
            }
            if !hdr.needs_csum() {
                return Ok(one(Kind::Whole));
            }
            let (at, value) = complete_checksum(frame, hdr)?;
            let split = at + 2;
            if split > MAX_HEADERS_LEN {
                return Err(GsoError::HeadersTooLong(split));
            }
            return Ok(one(Kind::Patched { at, value, split }));
        }
        let layout = parse_gso(frame, hdr, gso)?;
        let hl = layout.hl;
        let payload = frame_len - hl;
        let gso_size = usize::from(hdr.gso_size);
        let (kind, step) = if gso == Gso::Udp {
            let len = hl + gso_size.min(payload);
            if len > max_frame_len {
                return Err(GsoError::DatagramTooLong { len, max: max_frame_len });
            }
            (Kind::Udp { layout, size: gso_size }, gso_size)
        } else {
            if hl >= max_frame_len {
                return Err(GsoError::NoRoomForPayload { headers: hl, max: max_frame_len });
            }
            let mss = gso_size.min(max_frame_len - hl);
            (Kind::Tcp { layout, mss }, mss)
        };
        let segments = payload.div_ceil(step).max(1);
        if let Kind::Tcp { .. } = kind {
            if segments > 1 && frame[layout.l3.l4 + 13] & TCP_FLAG_SYN != 0 {
                return Err(GsoError::SynSegmented { payload, segments });
            }
        }
        Ok(Plan {
            segments,
            segment_len: hl + step.min(payload),
            last_len: hl + (payload - (segments - 1) * step),
            frame_len,
            kind,
        })
    }

    /// Produces the frames of `plan` for `frame` (the frame the plan was made for), in order:
    /// for each, `out(head, payload)` where the frame is `head` followed by `payload`; `head`
    /// is this segmenter's scratch (valid during the call), `payload` is borrowed from `frame`
    /// (either may be empty). `out` returns false to stop. Returns how many frames were handed
    /// to `out`.
    pub fn emit(
        &mut self,
        frame: &[u8],
        plan: &Plan,
        mut out: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<usize, GsoError> {
        if frame.len() != plan.frame_len {
            return Err(GsoError::PlanMismatch { planned: plan.frame_len, len: frame.len() });
        }
        let (layout, step, udp) = match plan.kind {
            Kind::Whole => {
                out(&[], frame);
                return Ok(1);
            }
            Kind::Patched { at, value, split } => {
                let head = &mut self.headers[..split];
                head.copy_from_slice(&frame[..split]);
                head[at..at + 2].copy_from_slice(&value);
                out(head, &frame[split..]);
                return Ok(1);
            }
            Kind::Tcp { layout, mss } => (layout, mss, false),
            Kind::Udp { layout, size } => (layout, size, true),
        };
        let L3 { l3, version, l4, .. } = layout.l3;
        let hl = layout.hl;
        let h = &mut self.headers[..hl];
        h.copy_from_slice(&frame[..hl]);
        let id0 = u16::from_be_bytes([h[l3 + 4], h[l3 + 5]]);
        // TCP only: a UDP header ends at l4 + 8.
        let (seq0, flags0) = if udp {
            (0, 0)
        } else {
            (u32::from_be_bytes([h[l4 + 4], h[l4 + 5], h[l4 + 6], h[l4 + 7]]), h[l4 + 13])
        };
        let payload_all = &frame[hl..];
        for i in 0..plan.segments {
            let off = i * step;
            let len = step.min(payload_all.len() - off);
            let payload = &payload_all[off..off + len];
            let l4_len = hl - l4 + len;
            match version {
                IpVersion::V4 => {
                    // Fits: at most the super-frame's own IPv4 total length.
                    let tot = (l4_len + (l4 - l3)) as u16;
                    h[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                    h[l3 + 4..l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
                    h[l3 + 10..l3 + 12].fill(0);
                    let c = csum::checksum(&h[l3..l4]);
                    h[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
                }
                IpVersion::V6 => {
                    let plen = (l4_len + (l4 - l3 - IPV6_HLEN)) as u16;
                    h[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
                }
            }
            let csum_at = if udp {
                h[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                l4 + usize::from(UDP_CSUM_OFFSET)
            } else {
                let seq = seq0.wrapping_add(off as u32);
                h[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                let mut flags = flags0;
                if i + 1 < plan.segments {
                    flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
                }
                if i > 0 {
                    flags &= !TCP_FLAG_CWR;
                }
                h[l4 + 13] = flags;
                l4 + usize::from(TCP_CSUM_OFFSET)
            };
            h[csum_at..csum_at + 2].fill(0);
            let sum = csum::combine(layout.pseudo, l4_len as u64);
            let mut c = csum::finish(csum::add(csum::add(sum, &h[l4..hl]), payload));
            if udp && c == 0 {
                c = 0xffff;
            }
            h[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            if !out(h, payload) {
                return Ok(i + 1);
            }
        }
        Ok(plan.segments)
    }

    /// [`Self::plan`] and [`Self::emit`] in one call, for a caller that needs no room check.
    pub fn segment(
        &mut self,
        frame: &[u8],
        hdr: &VnetHdr,
        max_frame_len: usize,
        out: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<usize, GsoError> {
        let plan = self.plan(frame, hdr, max_frame_len)?;
        self.emit(frame, &plan, out)
    }
}

#[cfg(test)]
#[path = "gso_tests.rs"]
mod tests;
