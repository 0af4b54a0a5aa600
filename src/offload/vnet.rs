//! The 12-byte `virtio_net_hdr_v1` that precedes every frame on a TAP opened with
//! `IFF_VNET_HDR` and travels with the frame in the ring's per-frame metadata, plus the feature
//! bits a receiver uses to say which offloaded frames it takes as they are.
//!
//! Layout and rules follow linux `include/uapi/linux/virtio_net.h` and the write-side checks of
//! `__virtio_net_hdr_to_skb` / `tun_get_user` (`research/offloads.md` §1, §2). The header is
//! stored little-endian on the ring, which is what the TAP gives once `TUNSETVNETLE` is set
//! (pitfall 1: otherwise tun uses the host's native order).

use thiserror::Error;

/// Length of `virtio_net_hdr_v1` (the legacy header plus `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// `flags`: the checksum from `csum_start` to the end is still to be computed; the field at
/// `csum_start + csum_offset` holds the uncomplemented pseudo-header sum.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been verified (read side only; the kernel ignores it on write).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;

/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4, segments of `gso_size` payload bytes.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (UFO); the kernel never produces it on read and ivnet
/// refuses it.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation offload (USO), IPv4 or IPv6: datagrams of `gso_size` bytes.
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: TCP GSO whose first segment carries CWR (ECN).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// `TUNSETOFFLOAD` bits (linux `if_tun.h`).
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUNSETOFFLOAD`: TCP segmentation offload over IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUNSETOFFLOAD`: TCP segmentation offload over IPv6.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUNSETOFFLOAD`: TSO with ECN (CWR on the first segment).
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// `TUNSETOFFLOAD`: UDP segmentation offload over IPv4 (Linux >= 6.2, only together with USO6).
pub const TUN_F_USO4: u32 = 0x20;
/// `TUNSETOFFLOAD`: UDP segmentation offload over IPv6.
pub const TUN_F_USO6: u32 = 0x40;

/// Largest number of datagrams in one USO frame the kernel accepts on write (`UDP_MAX_SEGMENTS`).
pub const USO_MAX_SEGMENTS: usize = 128;

/// `gso_size` value the kernel reserves for `GSO_BY_FRAGS`; refused on write.
const GSO_BY_FRAGS: u16 = 0xffff;
/// Offset of the checksum in a TCP header.
pub(crate) const TCP_CSUM_OFFSET: u16 = 16;
/// Offset of the checksum in a UDP header.
pub(crate) const UDP_CSUM_OFFSET: u16 = 6;
const ETH_HLEN: usize = 14;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

/// A `virtio_net_hdr_v1`, decoded. `num_buffers` is not kept: it means nothing on a TAP and is
/// written as 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with the ECN bit.
    pub gso_type: u8,
    /// A hint on a TAP read (pitfall 2): never used to find headers.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS, or the datagram size for USO).
    pub gso_size: u16,
    /// Where the checksummed range starts, counted from the Ethernet header.
    pub csum_start: u16,
    /// Where the checksum field is, counted from `csum_start`.
    pub csum_offset: u16,
}

/// The segmentation a header asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gso {
    /// A single frame.
    None,
    /// TCP over IPv4; `ecn`: the first segment's CWR must stay on the first segment only.
    Tcp4 {
        /// The ECN bit of `gso_type`.
        ecn: bool,
    },
    /// TCP over IPv6.
    Tcp6 {
        /// The ECN bit of `gso_type`.
        ecn: bool,
    },
    /// UDP segmentation offload (`UDP_L4`), IPv4 or IPv6.
    Udp,
}

/// A header a receiver must not pass to its TAP. Each variant names the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VnetError {
    /// Not one of NONE, TCPV4, TCPV6, UDP_L4 (with ECN only on TCP); includes UFO (3).
    #[error(
        "virtio-net header: unsupported gso_type {0:#04x} (known: 0, 1, 4, 5, ECN bit 0x80 on TCP)"
    )]
    UnknownGsoType(u8),
    /// Flag bits other than NEEDS_CSUM and DATA_VALID (RSC_INFO, UDP_TUNNEL_CSUM, ...).
    #[error("virtio-net header: unsupported flags {0:#04x} (known: NEEDS_CSUM 1, DATA_VALID 2)")]
    UnknownFlags(u8),
    /// GSO needs a segment size; 0xffff is the kernel's `GSO_BY_FRAGS` marker.
    #[error("virtio-net header: gso_type {gso_type:#04x} with invalid gso_size {gso_size}")]
    BadGsoSize {
        /// The header's gso_type.
        gso_type: u8,
        /// The header's gso_size.
        gso_size: u16,
    },
    /// The frame is shorter than an Ethernet header.
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    FrameTooShort(usize),
    /// NEEDS_CSUM points at bytes outside the frame.
    #[error("virtio-net header: checksum at csum_start {csum_start} + csum_offset {csum_offset} (needs {needed} bytes) lies outside the {frame_len}-byte frame")]
    CsumOutOfFrame {
        /// The header's csum_start.
        csum_start: u16,
        /// The header's csum_offset.
        csum_offset: u16,
        /// Bytes the kernel needs from the frame start.
        needed: usize,
        /// The frame's length.
        frame_len: usize,
    },
    /// TCP GSO with a partial checksum must point at the TCP checksum (offset 16).
    #[error("virtio-net header: TCP GSO with csum_offset {0}, must be 16")]
    TcpCsumOffset(u16),
    /// USO frames must carry NEEDS_CSUM.
    #[error("virtio-net header: UDP GSO without NEEDS_CSUM (flags {0:#04x})")]
    UsoWithoutCsum(u8),
    /// USO must point at the UDP checksum (offset 6).
    #[error("virtio-net header: UDP GSO with csum_offset {0}, must be 6")]
    UsoCsumOffset(u16),
    /// USO would produce more datagrams than the kernel takes.
    #[error("virtio-net header: UDP GSO payload of {payload} bytes in {gso_size}-byte datagrams exceeds {USO_MAX_SEGMENTS} segments")]
    UsoTooManySegments {
        /// UDP payload bytes (after the first UDP header).
        payload: usize,
        /// The header's gso_size.
        gso_size: u16,
    },
    /// hdr_len larger than the frame, or smaller than an Ethernet header but not 0.
    #[error("virtio-net header: hdr_len {hdr_len} invalid for a {frame_len}-byte frame")]
    BadHdrLen {
        /// The header's hdr_len.
        hdr_len: u16,
        /// The frame's length.
        frame_len: usize,
    },
}

impl VnetHdr {
    /// A header that asks for nothing (a complete frame).
    pub const PLAIN: VnetHdr =
        VnetHdr { flags: 0, gso_type: 0, hdr_len: 0, gso_size: 0, csum_start: 0, csum_offset: 0 };

    /// Decodes the little-endian wire form.
    pub fn decode(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    /// Encodes the little-endian wire form, `num_buffers` = 0.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// True if the frame is complete as it is: no partial checksum and no GSO (DATA_VALID
    /// does not matter), so any receiver can take it.
    pub fn is_plain(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 && self.gso_type == VIRTIO_NET_HDR_GSO_NONE
    }

    /// True if the checksum is still to be completed.
    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }

    /// The segmentation this header asks for; UFO, unknown types and ECN on anything but TCP
    /// are errors.
    pub fn gso(&self) -> Result<Gso, VnetError> {
        let ecn = self.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0;
        match (self.gso_type & !VIRTIO_NET_HDR_GSO_ECN, ecn) {
            (VIRTIO_NET_HDR_GSO_NONE, false) => Ok(Gso::None),
            (VIRTIO_NET_HDR_GSO_TCPV4, ecn) => Ok(Gso::Tcp4 { ecn }),
            (VIRTIO_NET_HDR_GSO_TCPV6, ecn) => Ok(Gso::Tcp6 { ecn }),
            (VIRTIO_NET_HDR_GSO_UDP_L4, false) => Ok(Gso::Udp),
            _ => Err(VnetError::UnknownGsoType(self.gso_type)),
        }
    }

    /// What a receiver must accept to take this frame as it is. A gso_type that [`Self::gso`]
    /// refuses requires [`Features::UNSATISFIABLE`], which no receiver has.
    pub fn required(&self) -> Features {
        let mut f = if self.needs_csum() { Features::CSUM } else { Features::NONE };
        match self.gso() {
            Ok(Gso::None) => {}
            Ok(Gso::Tcp4 { ecn }) => {
                f = f | Features::CSUM | Features::TSO4;
                if ecn {
                    f = f | Features::TSO_ECN;
                }
            }
            Ok(Gso::Tcp6 { ecn }) => {
                f = f | Features::CSUM | Features::TSO6;
                if ecn {
                    f = f | Features::TSO_ECN;
                }
            }
            Ok(Gso::Udp) => f = f | Features::CSUM | Features::USO,
            Err(_) => f = Features::UNSATISFIABLE,
        }
        f
    }

    /// Checks this header against `frame` (the Ethernet frame it came with) the way the
    /// kernel's TAP write does (`__virtio_net_hdr_to_skb`, `tun_get_user`), so that a header from
    /// an untrusted peer is refused here, counted, instead of failing the TAP write. Stricter
    /// than the kernel in two places: UFO and unknown flag bits are refused.
    ///
    /// It does not parse the frame: a GSO frame that passes may still be refused by
    /// [`crate::offload::Segmenter::plan`], and the kernel checks the headers itself.
    pub fn validate(&self, frame: &[u8]) -> Result<(), VnetError> {
        self.validate_len(frame.len())
    }

    /// [`Self::validate`] for a frame of `len` bytes that is not at hand as one slice (a frame
    /// still in a ring): the checks use only its length.
    pub fn validate_len(&self, len: usize) -> Result<(), VnetError> {
        if len < ETH_HLEN {
            return Err(VnetError::FrameTooShort(len));
        }
        let known = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;
        if self.flags & !known != 0 {
            return Err(VnetError::UnknownFlags(self.flags));
        }
        let gso = self.gso()?;
        // The kernel pulls at least the minimal L4 header of a GSO frame behind csum_start.
        let thlen = match gso {
            Gso::None => 0,
            Gso::Tcp4 { .. } | Gso::Tcp6 { .. } => TCP_MIN_HLEN,
            Gso::Udp => UDP_HLEN,
        };
        if gso != Gso::None && (self.gso_size == 0 || self.gso_size == GSO_BY_FRAGS) {
            return Err(VnetError::BadGsoSize { gso_type: self.gso_type, gso_size: self.gso_size });
        }
        if self.needs_csum() {
            let needed =
                usize::from(self.csum_start) + thlen.max(usize::from(self.csum_offset) + 2);
            if needed > len {
                return Err(VnetError::CsumOutOfFrame {
                    csum_start: self.csum_start,
                    csum_offset: self.csum_offset,
                    needed,
                    frame_len: len,
                });
            }
        }
        match gso {
            Gso::Tcp4 { .. } | Gso::Tcp6 { .. } => {
                if self.needs_csum() && self.csum_offset != TCP_CSUM_OFFSET {
                    return Err(VnetError::TcpCsumOffset(self.csum_offset));
                }
            }
            Gso::Udp => {
                if !self.needs_csum() {
                    return Err(VnetError::UsoWithoutCsum(self.flags));
                }
                if self.csum_offset != UDP_CSUM_OFFSET {
                    return Err(VnetError::UsoCsumOffset(self.csum_offset));
                }
                let payload = len - (usize::from(self.csum_start) + UDP_HLEN);
                if payload > usize::from(self.gso_size) * USO_MAX_SEGMENTS {
                    return Err(VnetError::UsoTooManySegments { payload, gso_size: self.gso_size });
                }
            }
            Gso::None => {}
        }
        let hdr_len = usize::from(self.hdr_len);
        if hdr_len > len || (hdr_len != 0 && hdr_len < ETH_HLEN) {
            return Err(VnetError::BadHdrLen { hdr_len: self.hdr_len, frame_len: len });
        }
        Ok(())
    }

    /// The Ethernet length of the largest frame a receiver's stack will see once this frame is
    /// segmented (headers + `gso_size`), or the frame's own length if it is not GSO or fits in
    /// one segment: what a receiver compares with its MTU before taking a frame as it is.
    ///
    /// The headers end is `csum_start` plus the TCP header length read from the frame (or 8 for
    /// UDP), never `hdr_len`. `None` if that cannot be determined (GSO without NEEDS_CSUM,
    /// an unknown type, a TCP header outside the frame): such a frame is not deliverable as it is.
    pub fn largest_segment_len(&self, frame: &[u8]) -> Option<usize> {
        self.largest_segment_len_of(frame, frame.len())
    }

    /// [`Self::largest_segment_len`] for a frame of `frame_len` bytes of which only the first
    /// bytes, `head` (enough to hold its headers), are at hand.
    pub fn largest_segment_len_of(&self, head: &[u8], frame_len: usize) -> Option<usize> {
        let l4 = usize::from(self.csum_start);
        let l4_hlen = match self.gso().ok()? {
            Gso::None => return Some(frame_len),
            // Without NEEDS_CSUM the kernel finds the headers itself; a sender that completed the
            // checksum keeps csum_start (ivnet does), else the headers cannot be told here.
            _ if !self.needs_csum() && self.csum_start == 0 => return None,
            Gso::Tcp4 { .. } | Gso::Tcp6 { .. } => {
                let doff = usize::from(*head.get(l4 + 12)? >> 4) * 4;
                if doff < TCP_MIN_HLEN {
                    return None;
                }
                doff
            }
            Gso::Udp => UDP_HLEN,
        };
        let headers = l4 + l4_hlen;
        if headers > frame_len {
            return None;
        }
        Some(frame_len.min(headers + usize::from(self.gso_size)))
    }
}

/// What a receiver takes as it is, as a bitset; stored in the region's peer table, so the bit
/// values are a wire format (pinned by a test).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features(u32);

impl Features {
    /// Nothing: every frame must arrive complete and MTU-sized.
    pub const NONE: Features = Features(0);
    /// Partial checksums (NEEDS_CSUM).
    pub const CSUM: Features = Features(1);
    /// TCP GSO over IPv4.
    pub const TSO4: Features = Features(2);
    /// TCP GSO over IPv6.
    pub const TSO6: Features = Features(4);
    /// TCP GSO with the ECN bit.
    pub const TSO_ECN: Features = Features(8);
    /// UDP GSO (`UDP_L4`), IPv4 and IPv6.
    pub const USO: Features = Features(16);
    /// Every offload ivnet knows (what a TAP may take).
    pub const ALL: Features = Features(31);
    /// Not an offload of the interface but a choice of its owner: it takes frames with a
    /// partial checksum (NEEDS_CSUM) straight from the ring, to be handed to its kernel
    /// unverified, because it trusts the other members not to scribble on the region
    /// (`--trust-peer-checksums`). Without it, senders complete every checksum before a frame
    /// enters shared memory, and the receiving kernel verifies it.
    pub const TRUST_CSUM: Features = Features(32);
    /// Every bit a peer table entry may carry.
    const KNOWN: Features = Features(Self::ALL.0 | Self::TRUST_CSUM.0);
    /// Required by headers ivnet cannot forward as they are; [`Features::from_bits_truncate`]
    /// never yields it, so no receiver has it.
    pub const UNSATISFIABLE: Features = Features(1 << 31);

    /// The raw bits, as stored in the peer table.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Features from raw bits (e.g. read from the untrusted peer table); unknown bits dropped.
    pub const fn from_bits_truncate(bits: u32) -> Features {
        Features(bits & Self::KNOWN.0)
    }

    /// True if every feature in `other` is in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// Features in both.
    pub const fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// True if a receiver with these features takes a frame with `hdr` as it is (MTU aside; see
    /// [`VnetHdr::largest_segment_len`]).
    pub fn accepts(self, hdr: &VnetHdr) -> bool {
        self.contains(hdr.required())
    }

    /// True if a receiver with these features takes a frame with `hdr` from the ring as it is:
    /// it accepts its offloads, and a partial checksum only if it trusts the other members
    /// ([`Features::TRUST_CSUM`]).
    pub fn takes_from_ring(self, hdr: &VnetHdr) -> bool {
        self.accepts(hdr) && (!hdr.needs_csum() || self.contains(Self::TRUST_CSUM))
    }

    /// The `TUNSETOFFLOAD` argument that enables these features on a TAP. The kernel takes
    /// TSO, ECN and USO only together with CSUM, and USO4 only with USO6; this maps bit for bit
    /// and leaves it to `TUNSETOFFLOAD` to refuse a set it does not take.
    pub const fn to_tun_flags(self) -> u32 {
        let mut f = 0;
        if self.0 & Self::CSUM.0 != 0 {
            f |= TUN_F_CSUM;
        }
        if self.0 & Self::TSO4.0 != 0 {
            f |= TUN_F_TSO4;
        }
        if self.0 & Self::TSO6.0 != 0 {
            f |= TUN_F_TSO6;
        }
        if self.0 & Self::TSO_ECN.0 != 0 {
            f |= TUN_F_TSO_ECN;
        }
        if self.0 & Self::USO.0 != 0 {
            f |= TUN_F_USO4 | TUN_F_USO6;
        }
        f
    }

    /// The features a `TUNSETOFFLOAD` argument enables; USO only if both USO4 and USO6 are set.
    pub const fn from_tun_flags(flags: u32) -> Features {
        let mut f = 0;
        if flags & TUN_F_CSUM != 0 {
            f |= Self::CSUM.0;
        }
        if flags & TUN_F_TSO4 != 0 {
            f |= Self::TSO4.0;
        }
        if flags & TUN_F_TSO6 != 0 {
            f |= Self::TSO6.0;
        }
        if flags & TUN_F_TSO_ECN != 0 {
            f |= Self::TSO_ECN.0;
        }
        if flags & (TUN_F_USO4 | TUN_F_USO6) == TUN_F_USO4 | TUN_F_USO6 {
            f |= Self::USO.0;
        }
        Features(f)
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl std::fmt::Display for Features {
    /// `csum,tso4,tso6,tso_ecn,uso,trust_csum`, or `none`; for `ivnet status`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (Self::CSUM, "csum"),
            (Self::TSO4, "tso4"),
            (Self::TSO6, "tso6"),
            (Self::TSO_ECN, "tso_ecn"),
            (Self::USO, "uso"),
            (Self::TRUST_CSUM, "trust_csum"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.contains(bit) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wire_bits_are_pinned() {
        // Stored in the peer table: a peer built from another commit must read the same bits.
        assert_eq!(Features::CSUM.bits(), 1);
        assert_eq!(Features::TSO4.bits(), 2);
        assert_eq!(Features::TSO6.bits(), 4);
        assert_eq!(Features::TSO_ECN.bits(), 8);
        assert_eq!(Features::USO.bits(), 16);
        assert_eq!(Features::ALL.bits(), 31);
        assert_eq!(Features::TRUST_CSUM.bits(), 32);
        assert_eq!(Features::from_bits_truncate(0xffff_ffff), Features::ALL | Features::TRUST_CSUM);
        assert_eq!(Features::TRUST_CSUM.to_tun_flags(), 0, "not a TAP offload");
        assert!(!Features::from_bits_truncate(u32::MAX).contains(Features::UNSATISFIABLE));
    }

    #[test]
    fn header_layout_is_little_endian() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 0x0201,
            gso_size: 0x0403,
            csum_start: 0x0605,
            csum_offset: 0x0807,
        };
        let b = h.encode();
        assert_eq!(b, [1, 0x81, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0]);
        assert_eq!(VnetHdr::decode(&b), h);
        // num_buffers is ignored on decode.
        let mut b2 = b;
        b2[10] = 9;
        b2[11] = 9;
        assert_eq!(VnetHdr::decode(&b2), h);
    }

    #[test]
    fn gso_types() {
        let g = |t| VnetHdr { gso_type: t, ..VnetHdr::PLAIN }.gso();
        assert_eq!(g(0), Ok(Gso::None));
        assert_eq!(g(1), Ok(Gso::Tcp4 { ecn: false }));
        assert_eq!(g(0x81), Ok(Gso::Tcp4 { ecn: true }));
        assert_eq!(g(4), Ok(Gso::Tcp6 { ecn: false }));
        assert_eq!(g(0x84), Ok(Gso::Tcp6 { ecn: true }));
        assert_eq!(g(5), Ok(Gso::Udp));
        for bad in [3u8, 0x83, 0x85, 0x80, 2, 6, 0x10, 0x20, 0x41, 0xff] {
            assert_eq!(g(bad), Err(VnetError::UnknownGsoType(bad)), "gso_type {bad:#x}");
        }
    }

    #[test]
    fn plain_ignores_data_valid() {
        assert!(VnetHdr::PLAIN.is_plain());
        assert!(VnetHdr { flags: VIRTIO_NET_HDR_F_DATA_VALID, ..VnetHdr::PLAIN }.is_plain());
        assert!(!VnetHdr { flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, ..VnetHdr::PLAIN }.is_plain());
        assert!(!VnetHdr { gso_type: 1, ..VnetHdr::PLAIN }.is_plain());
    }

    #[test]
    fn required_features() {
        let r = |flags, gso_type| VnetHdr { flags, gso_type, ..VnetHdr::PLAIN }.required();
        assert_eq!(r(0, 0), Features::NONE);
        assert_eq!(r(2, 0), Features::NONE);
        assert_eq!(r(1, 0), Features::CSUM);
        assert_eq!(r(1, 1), Features::CSUM | Features::TSO4);
        assert_eq!(r(1, 0x81), Features::CSUM | Features::TSO4 | Features::TSO_ECN);
        assert_eq!(r(1, 4), Features::CSUM | Features::TSO6);
        assert_eq!(r(1, 0x84), Features::CSUM | Features::TSO6 | Features::TSO_ECN);
        assert_eq!(r(1, 5), Features::CSUM | Features::USO);
        assert_eq!(r(1, 3), Features::UNSATISFIABLE);
        assert!(!Features::ALL.accepts(&VnetHdr { gso_type: 3, ..VnetHdr::PLAIN }));
        let tso4 = VnetHdr { flags: 1, gso_type: 1, ..VnetHdr::PLAIN };
        assert!(Features::ALL.accepts(&tso4));
        assert!(!(Features::CSUM | Features::TSO6).accepts(&tso4));
        assert!(!Features::TSO4.accepts(&tso4), "TSO without CSUM is not enough");
        // From the ring, a partial checksum needs trust as well.
        assert!(!Features::ALL.takes_from_ring(&tso4));
        assert!((Features::ALL | Features::TRUST_CSUM).takes_from_ring(&tso4));
        let complete = VnetHdr { flags: 0, ..tso4 };
        assert!(Features::ALL.takes_from_ring(&complete));
        assert!(!Features::TRUST_CSUM.takes_from_ring(&complete), "trust is not an offload");
    }

    #[test]
    fn tun_flags() {
        assert_eq!(Features::NONE.to_tun_flags(), 0);
        assert_eq!(Features::ALL.to_tun_flags(), 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40);
        assert_eq!(Features::USO.to_tun_flags(), 0x60);
        assert_eq!((Features::CSUM | Features::TSO6).to_tun_flags(), 0x05);
        for bits in 0..32 {
            let f = Features::from_bits_truncate(bits);
            assert_eq!(Features::from_tun_flags(f.to_tun_flags()), f);
        }
        assert_eq!(Features::from_tun_flags(0x21), Features::CSUM, "USO4 alone is not USO");
        assert_eq!(Features::from_tun_flags(0x10), Features::NONE, "UFO is not a feature");
    }

    #[test]
    fn display() {
        assert_eq!(Features::NONE.to_string(), "none");
        assert_eq!(Features::ALL.to_string(), "csum,tso4,tso6,tso_ecn,uso");
        assert_eq!((Features::CSUM | Features::USO).to_string(), "csum,uso");
        assert_eq!((Features::CSUM | Features::TRUST_CSUM).to_string(), "csum,trust_csum");
    }

    fn tso(gso_type: u8, gso_size: u16) -> VnetHdr {
        VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: 66,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    #[test]
    fn validate_write_rules() {
        let frame = vec![0u8; 3000];
        assert_eq!(tso(1, 1448).validate(&frame), Ok(()));
        assert_eq!(VnetHdr::PLAIN.validate(&frame[..14]), Ok(()));
        assert_eq!(VnetHdr::PLAIN.validate(&frame[..13]), Err(VnetError::FrameTooShort(13)));
        assert_eq!(
            VnetHdr { gso_type: 3, ..tso(1, 1448) }.validate(&frame),
            Err(VnetError::UnknownGsoType(3))
        );
        assert_eq!(
            VnetHdr { flags: 5, ..tso(1, 1448) }.validate(&frame),
            Err(VnetError::UnknownFlags(5))
        );
        assert_eq!(
            tso(1, 0).validate(&frame),
            Err(VnetError::BadGsoSize { gso_type: 1, gso_size: 0 })
        );
        assert_eq!(
            tso(4, 0xffff).validate(&frame),
            Err(VnetError::BadGsoSize { gso_type: 4, gso_size: 0xffff })
        );
        assert_eq!(
            VnetHdr { csum_offset: 6, ..tso(1, 1448) }.validate(&frame),
            Err(VnetError::TcpCsumOffset(6))
        );
        // TCP GSO without NEEDS_CSUM: the kernel finds the headers itself.
        assert_eq!(VnetHdr { flags: 0, csum_offset: 0, ..tso(1, 1448) }.validate(&frame), Ok(()));
        // The TCP header (20 bytes) must be in the frame, not just the checksum field.
        assert_eq!(
            tso(1, 1448).validate(&frame[..34 + 19]),
            Err(VnetError::CsumOutOfFrame {
                csum_start: 34,
                csum_offset: 16,
                needed: 54,
                frame_len: 53
            })
        );
        let csum_only = VnetHdr { gso_type: 0, gso_size: 0, hdr_len: 0, ..tso(0, 0) };
        assert_eq!(csum_only.validate(&frame[..52]), Ok(()));
        assert!(csum_only.validate(&frame[..51]).is_err());
        assert_eq!(
            VnetHdr { csum_start: 65535, csum_offset: 65535, ..csum_only }.validate(&frame),
            Err(VnetError::CsumOutOfFrame {
                csum_start: 65535,
                csum_offset: 65535,
                needed: 65535 + 65537,
                frame_len: 3000
            })
        );
        let uso = VnetHdr { gso_type: 5, csum_offset: 6, gso_size: 10, ..tso(5, 10) };
        assert_eq!(uso.validate(&frame[..34 + 8 + 1280]), Ok(()));
        assert_eq!(
            uso.validate(&frame[..34 + 8 + 1281]),
            Err(VnetError::UsoTooManySegments { payload: 1281, gso_size: 10 })
        );
        assert_eq!(
            VnetHdr { flags: 0, ..uso }.validate(&frame[..100]),
            Err(VnetError::UsoWithoutCsum(0))
        );
        assert_eq!(
            VnetHdr { csum_offset: 16, ..uso }.validate(&frame[..100]),
            Err(VnetError::UsoCsumOffset(16))
        );
        assert_eq!(
            VnetHdr { gso_type: 0x85, ..uso }.validate(&frame[..100]),
            Err(VnetError::UnknownGsoType(0x85))
        );
        assert_eq!(
            VnetHdr { hdr_len: 3001, ..tso(1, 1448) }.validate(&frame),
            Err(VnetError::BadHdrLen { hdr_len: 3001, frame_len: 3000 })
        );
        assert_eq!(
            VnetHdr { hdr_len: 13, ..tso(1, 1448) }.validate(&frame),
            Err(VnetError::BadHdrLen { hdr_len: 13, frame_len: 3000 })
        );
        assert_eq!(VnetHdr { hdr_len: 0, ..tso(1, 1448) }.validate(&frame), Ok(()));
    }

    #[test]
    fn largest_segment() {
        let mut frame = vec![0u8; 3000];
        frame[34 + 12] = 8 << 4; // TCP header of 32 bytes
        assert_eq!(tso(1, 1448).largest_segment_len(&frame), Some(34 + 32 + 1448));
        assert_eq!(tso(1, 5000).largest_segment_len(&frame), Some(3000));
        assert_eq!(VnetHdr::PLAIN.largest_segment_len(&frame), Some(3000));
        let uso = VnetHdr { gso_type: 5, csum_offset: 6, ..tso(5, 1200) };
        assert_eq!(uso.largest_segment_len(&frame), Some(34 + 8 + 1200));
        // GSO without NEEDS_CSUM: the headers end where csum_start (kept by a sender that
        // completed the checksum) says, and cannot be told without it.
        assert_eq!(
            VnetHdr { flags: 0, ..tso(1, 1448) }.largest_segment_len(&frame),
            Some(34 + 32 + 1448)
        );
        assert_eq!(
            VnetHdr { flags: 0, csum_start: 0, ..tso(1, 1448) }.largest_segment_len(&frame),
            None
        );
        assert_eq!(tso(1, 1448).largest_segment_len(&frame[..40]), None);
        frame[34 + 12] = 4 << 4;
        assert_eq!(tso(1, 1448).largest_segment_len(&frame), None, "data offset below 5");
        assert_eq!(VnetHdr { gso_type: 3, ..tso(1, 1448) }.largest_segment_len(&frame), None);
    }

    proptest! {
        #[test]
        fn roundtrip(b in any::<[u8; 10]>()) {
            let mut w = [0u8; 12];
            w[..10].copy_from_slice(&b);
            let h = VnetHdr::decode(&w);
            prop_assert_eq!(h.encode(), w);
        }

        #[test]
        fn never_panics(
            b in any::<[u8; 12]>(),
            frame in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let h = VnetHdr::decode(&b);
            let ok = h.validate(&frame).is_ok();
            let _ = h.largest_segment_len(&frame);
            let _ = h.required();
            if ok && h.needs_csum() {
                prop_assert!(usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 <= frame.len());
            }
        }
    }
}
