//! The local interface: a Linux TAP (`tap-shm` by default), or a fake one for tests.
//!
//! [`FrameIo`] is the seam (after crosvm's `TapT` and Firecracker's mock TAP): the data path is
//! generic over it, so its logic is tested without root, and the real TAP is tested in CI.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::offload::{Features, VNET_HDR_LEN};
use crate::region::ring::{Consumer, Producer};
use crate::sys;

/// Frames in and out of the local network stack.
pub trait FrameIo {
    /// Reads one frame into `buf` without blocking (`WouldBlock` when none is queued). With
    /// offloads ([`FrameIo::offloads`] is `Some`) the frame is preceded by its virtio-net header.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Like [`FrameIo::recv`], but straight into space reserved in a ring
    /// ([`Producer::reserve`]), which saves a copy when the frame is for that ring's peer.
    fn recv_into_ring(
        &mut self,
        prod: &Producer,
        ranges: &[(usize, usize); 2],
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize>;
    /// Writes the consumer's current frame, straight from the ring where possible, preceded by
    /// `vnet_hdr` (empty when the interface takes no header).
    fn send_from_ring(
        &mut self,
        cons: &Consumer,
        vnet_hdr: &[u8],
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize>;
    /// The descriptor to wait on for readability, if any.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Frames the kernel dropped before we could read them, if it tells.
    fn kernel_drops(&self) -> Option<u64> {
        None
    }
    /// The offloads the interface produces and accepts: `Some` means every frame read or
    /// written is preceded by a virtio-net header; `None`, plain frames only.
    fn offloads(&self) -> Option<Features> {
        None
    }
}

/// Whether the TAP uses the kernel's segmentation and checksum offloads (`--offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadMode {
    /// On when the kernel's TAP accepts them, else off (with a log line saying why).
    #[default]
    Auto,
    /// On, or the agent does not start.
    On,
    /// Off: plain frames of at most the MTU, checksums complete.
    Off,
}

impl std::str::FromStr for OffloadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(OffloadMode::Auto),
            "on" => Ok(OffloadMode::On),
            "off" => Ok(OffloadMode::Off),
            _ => Err(format!("{s:?} is not an offload mode: use auto, on or off")),
        }
    }
}

impl std::fmt::Display for OffloadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OffloadMode::Auto => "auto",
            OffloadMode::On => "on",
            OffloadMode::Off => "off",
        })
    }
}

/// Why the TAP could not be set up. Each variant names the step and what to check.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has characters Linux refuses.
    #[error(
        "interface name {0:?} is invalid: use 1 to {max} characters, no '/', ':' or whitespace",
        max = sys::IFNAME_MAX
    )]
    InvalidName(String),
    /// Creating a TAP needs CAP_NET_ADMIN.
    #[error(
        "creating TAP {name} needs CAP_NET_ADMIN: run as root (or grant the capability); \
         without privileges use `ivnet stack` instead"
    )]
    NotPermitted {
        /// Interface name.
        name: String,
    },
    /// /dev/net/tun missing or TUNSETIFF failed for another reason.
    #[error("cannot create TAP {name} (is the tun module loaded and /dev/net/tun present?)")]
    Open {
        /// Interface name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The interface exists but is not ours to attach (e.g. an existing non-TAP interface).
    #[error("cannot create TAP {name}: an interface of that name exists and is busy or not a TAP")]
    Busy {
        /// Interface name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `--offload on` and the kernel refused the virtio-net header or every offload.
    #[error(
        "TAP {name}: the kernel refused {what}, so --offload on cannot be honoured: use \
         --offload auto (falls back to plain frames) or --offload off"
    )]
    Offload {
        /// Interface name.
        name: String,
        /// What was refused.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A configuration ioctl failed.
    #[error("TAP {name}: cannot {step}")]
    Configure {
        /// Interface name.
        name: String,
        /// What was being done ("set MTU 9000", ...).
        step: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = name.is_empty()
        || name.len() > sys::IFNAME_MAX
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if bad {
        return Err(TapError::InvalidName(name.into()));
    }
    Ok(())
}

/// A TAP interface, open non-blocking, removed when dropped.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    offloads: Option<Features>,
}

/// Offload sets to try, largest first: TUNSETOFFLOAD refuses any bit the kernel does not know
/// (USO arrived in Linux 6.2), so the first one accepted is what this kernel can do.
const OFFLOAD_PROBES: [Features; 3] = [
    Features::ALL,
    Features::from_bits_truncate(Features::ALL.bits() & !Features::USO.bits()),
    Features::CSUM,
];

fn open_error(name: &str, source: io::Error) -> TapError {
    match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::NotPermitted { name: name.into() },
        Some(libc::EBUSY) | Some(libc::EINVAL) => TapError::Busy { name: name.into(), source },
        _ => TapError::Open { name: name.into(), source },
    }
}

impl Tap {
    /// Creates (or attaches to a persistent) TAP called `name`, with offloads as `mode` asks.
    pub fn create(name: &str, mode: OffloadMode) -> Result<Tap, TapError> {
        validate_name(name)?;
        if mode == OffloadMode::Off {
            return Self::open_plain(name);
        }
        let (fd, actual) = sys::tun::open_tap(name, true).map_err(|e| open_error(name, e))?;
        let refused = |what: &'static str, source: io::Error| -> Result<Tap, TapError> {
            if mode == OffloadMode::On {
                return Err(TapError::Offload { name: name.into(), what, source });
            }
            log::warn!(
                "TAP {name}: the kernel refused {what} ({source}); using plain frames without \
                 offloads (slower; --offload off says so explicitly)"
            );
            Self::open_plain(name)
        };
        if let Err(e) = sys::tun::set_vnet_hdr(fd.as_raw_fd(), VNET_HDR_LEN) {
            drop(fd);
            return refused("the virtio-net header (TUNSETVNETHDRSZ/TUNSETVNETLE)", e);
        }
        let mut last = None;
        for want in OFFLOAD_PROBES {
            match sys::tun::set_offload(fd.as_raw_fd(), want.to_tun_flags()) {
                Ok(()) => {
                    let tap = Tap { fd, name: actual, offloads: Some(want) };
                    // A write is charged to this buffer until the kernel frees it (a TCP socket
                    // holds it until the application reads): 64 KiB frames would exhaust a small
                    // one at once (QEMU sets the same).
                    tap.step(
                        "set its send buffer".into(),
                        sys::tun::set_sndbuf(tap.fd.as_raw_fd(), libc::c_int::MAX),
                    )?;
                    return Ok(tap);
                }
                Err(e) => last = Some(e),
            }
        }
        drop(fd);
        refused(
            "every offload (TUNSETOFFLOAD)",
            last.unwrap_or_else(|| io::ErrorKind::Unsupported.into()),
        )
    }

    fn open_plain(name: &str) -> Result<Tap, TapError> {
        let (fd, actual) = sys::tun::open_tap(name, false).map_err(|e| open_error(name, e))?;
        Ok(Tap { fd, name: actual, offloads: None })
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn step(&self, step: String, r: io::Result<()>) -> Result<(), TapError> {
        r.map_err(|source| TapError::Configure { name: self.name.clone(), step, source })
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        self.step(format!("set MTU {mtu}"), sys::set_mtu(&self.name, mtu))
    }

    /// Sets the MAC address.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), TapError> {
        let m = crate::mac::Mac(mac);
        self.step(format!("set MAC {m}"), sys::set_mac(&self.name, mac))
    }

    /// Adds an address.
    pub fn add_address(&self, addr: IpAddr, prefix: u8) -> Result<(), TapError> {
        self.step(
            format!("add address {addr}/{prefix}"),
            sys::add_address(&self.name, addr, prefix),
        )
    }

    /// Brings the link up or down.
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let what = if up { "bring the link up" } else { "bring the link down" };
        self.step(what.into(), sys::set_up(&self.name, up))
    }
}

impl FrameIo for Tap {
    #[inline]
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::tun::read_frame(self.fd.as_raw_fd(), buf)
    }

    #[inline]
    fn recv_into_ring(
        &mut self,
        prod: &Producer,
        ranges: &[(usize, usize); 2],
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        prod.read_reserved_from(self.fd.as_raw_fd(), ranges, iov)
    }

    #[inline]
    fn send_from_ring(
        &mut self,
        cons: &Consumer,
        vnet_hdr: &[u8],
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        cons.write_frame_to(self.fd.as_raw_fd(), vnet_hdr, iov)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn kernel_drops(&self) -> Option<u64> {
        // The TAP's transmit side is the kernel handing frames to us.
        let path = format!("/sys/class/net/{}/statistics/tx_dropped", self.name);
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn offloads(&self) -> Option<Features> {
        self.offloads
    }
}

/// An in-memory interface: frames to "read" are queued in `inbound`; frames "written" land in
/// `outbound`.
#[derive(Default)]
pub struct FakeTap {
    /// Frames the data path will read, oldest first.
    pub inbound: VecDeque<Vec<u8>>,
    /// Frames the data path wrote, oldest first.
    pub outbound: Vec<Vec<u8>>,
    /// When set, writes fail with this error kind.
    pub fail_writes: Option<io::ErrorKind>,
    /// Offloads it claims (frames read and written then carry a virtio-net header, which is
    /// part of the queued and recorded bytes).
    pub offloads: Option<Features>,
    /// Frames the data path read straight into a ring.
    pub reads_into_ring: usize,
}

impl FrameIo for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbound.pop_front() {
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn recv_into_ring(
        &mut self,
        prod: &Producer,
        ranges: &[(usize, usize); 2],
        _iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        match self.inbound.pop_front() {
            Some(f) => {
                self.reads_into_ring += 1;
                Ok(prod.fill_reserved(ranges, &f))
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn send_from_ring(
        &mut self,
        cons: &Consumer,
        vnet_hdr: &[u8],
        _iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        if let Some(kind) = self.fail_writes {
            return Err(kind.into());
        }
        let mut buf = vec![0u8; 70_000];
        let n = cons.copy_frame(&mut buf);
        buf.truncate(n);
        let mut out = vnet_hdr.to_vec();
        out.extend_from_slice(&buf);
        let len = out.len();
        self.outbound.push(out);
        Ok(len)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn offloads(&self) -> Option<Features> {
        self.offloads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_name_of_15_chars_is_accepted_16_refused() {
        assert!(validate_name("abcdefghijklmno").is_ok());
        let e = validate_name("abcdefghijklmnop").unwrap_err();
        assert!(e.to_string().contains("1 to 15 characters"), "{e}");
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
    }
}
