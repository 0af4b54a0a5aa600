//! virtio-net offloads for frames that travel between a TAP opened with `IFF_VNET_HDR` and the
//! rings: the 12-byte header ([`vnet`]), the internet checksum ([`csum`]), and checksum completion
//! and software segmentation ([`gso`]) for receivers that cannot take a frame as it is
//! (DESIGN rule 9: a frame a peer cannot take never reaches it).
//!
//! The rules come from the kernel (`include/linux/virtio_net.h`, `drivers/net/tun.c`,
//! `net/ipv4/tcp_offload.c`, `net/ipv4/udp_offload.c`), summarised with sources in
//! `research/offloads.md`. The sender's decision per receiver:
//! 1. `receiver.accepts(&hdr)` ([`Features::accepts`]) and
//!    [`VnetHdr::largest_segment_len`] within the receiver's MTU: send the frame and header as
//!    they are;
//! 2. otherwise [`Segmenter::plan`] (room check on the ring) and [`Segmenter::emit`]: complete
//!    frames with a plain header.
//!
//! A receiver runs [`VnetHdr::validate`] on every header from a peer before writing the frame
//! to its TAP. Nothing here allocates or logs; errors are values to count.

pub mod csum;
pub mod gso;
pub mod vnet;

pub use gso::{
    complete_checksum, partial_checksum, GsoError, PartialChecksum, Plan, Segmenter,
    MAX_HEADERS_LEN,
};
pub use vnet::{Features, Gso, VnetError, VnetHdr, VNET_HDR_LEN};
