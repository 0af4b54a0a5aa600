//! The local interface: a Linux TAP (`tap-shm` by default), or a fake one for tests.
//!
//! [`FrameIo`] is the seam (after crosvm's `TapT` and Firecracker's mock TAP): the data path is
//! generic over it, so its logic is tested without root, and the real TAP is tested in CI.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};

use crate::region::ring::Consumer;
use crate::sys;

/// Frames in and out of the local network stack.
pub trait FrameIo {
    /// Reads one frame into `buf` without blocking (`WouldBlock` when none is queued).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes the consumer's current frame, straight from the ring where possible.
    fn send_from_ring(&mut self, cons: &Consumer, iov: &mut Vec<libc::iovec>) -> io::Result<usize>;
    /// The descriptor to wait on for readability, if any.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Frames the kernel dropped before we could read them, if it tells.
    fn kernel_drops(&self) -> Option<u64> {
        None
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
    iface: tun_tap::Iface,
    name: String,
}

impl Tap {
    /// Creates (or attaches to a persistent) TAP called `name`.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        let iface =
            tun_tap::Iface::without_packet_info(name, tun_tap::Mode::Tap).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        TapError::NotPermitted { name: name.into() }
                    }
                    Some(libc::EBUSY) | Some(libc::EINVAL) => {
                        TapError::Busy { name: name.into(), source }
                    }
                    _ => TapError::Open { name: name.into(), source },
                }
            })?;
        iface.set_non_blocking().map_err(|source| TapError::Configure {
            name: name.into(),
            step: "make it non-blocking".into(),
            source,
        })?;
        Ok(Tap { name: iface.name().to_string(), iface })
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
        self.iface.recv(buf)
    }

    #[inline]
    fn send_from_ring(&mut self, cons: &Consumer, iov: &mut Vec<libc::iovec>) -> io::Result<usize> {
        cons.write_frame_to(self.iface.as_raw_fd(), iov)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.iface.as_raw_fd())
    }

    fn kernel_drops(&self) -> Option<u64> {
        // The TAP's transmit side is the kernel handing frames to us.
        let path = format!("/sys/class/net/{}/statistics/tx_dropped", self.name);
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
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

    fn send_from_ring(
        &mut self,
        cons: &Consumer,
        _iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        if let Some(kind) = self.fail_writes {
            return Err(kind.into());
        }
        let mut buf = vec![0u8; 70_000];
        let n = cons.copy_frame(&mut buf);
        buf.truncate(n);
        self.outbound.push(buf);
        Ok(n)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
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
