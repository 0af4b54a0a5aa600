//! The TUN/TAP character device (`/dev/net/tun`): creating a TAP, the virtio-net header and
//! offload ioctls, and the scatter/gather read and write of one frame.
//!
//! Values and rules from `include/uapi/linux/if_tun.h` and `drivers/net/tun.c` (see
//! `research/offloads.md` §2): TUNSETOFFLOAD refuses any bit it does not know, so offloads are
//! probed from the largest set down; the header size must be at least 10; the header byte order
//! is the host's unless TUNSETVNETLE pins it to little-endian, as ivnet's ring stores it.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{cvt, IfReq};

/// Opens `/dev/net/tun` and attaches it to the TAP `name` (creating it if needed), without
/// packet information, non-blocking and close-on-exec; with `vnet_hdr`, every frame read or
/// written is preceded by a virtio-net header. Returns the descriptor and the name the kernel
/// gave.
pub fn open_tap(name: &str, vnet_hdr: bool) -> io::Result<(OwnedFd, String)> {
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a NUL-terminated string; the returned descriptor is checked, then owned.
    let fd = cvt(unsafe {
        libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)
    })?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut r = IfReq::new(name)?;
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    r.data[..2].copy_from_slice(&(flags as i16).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes the `struct ifreq` that `r` is, which lives across the
    // call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut r as *mut IfReq) })?;
    // SAFETY: the kernel wrote a NUL-terminated name of at most IFNAMSIZ - 1 bytes into
    // `r.name`, which is IFNAMSIZ bytes long.
    let actual = unsafe { CStr::from_ptr(r.name.as_ptr()) }.to_string_lossy().into_owned();
    Ok((fd, actual))
}

fn ioctl_int_ptr(fd: RawFd, req: libc::Ioctl, value: libc::c_int) -> io::Result<()> {
    let mut v = value;
    // SAFETY: the TUN requests used with this helper read one `int` through the pointer, which
    // points to a live local.
    cvt(unsafe { libc::ioctl(fd, req as _, &mut v as *mut libc::c_int) }).map(|_| ())
}

/// Sets the virtio-net header size (TUNSETVNETHDRSZ) and pins its byte order to little-endian
/// (TUNSETVNETLE).
pub fn set_vnet_hdr(fd: RawFd, size: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(size).map_err(|_| io::ErrorKind::InvalidInput)?;
    ioctl_int_ptr(fd, libc::TUNSETVNETHDRSZ, size)?;
    ioctl_int_ptr(fd, libc::TUNSETVNETLE, 1)
}

/// Enables exactly the offloads `tun_flags` (`TUN_F_*`). The kernel refuses unknown bits with
/// EINVAL, and TSO without CSUM.
pub fn set_offload(fd: RawFd, tun_flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD as _, tun_flags as libc::c_ulong) })
        .map(|_| ())
}

/// Sets the TAP's send buffer (TUNSETSNDBUF): how many bytes of frames we wrote may be in
/// flight in the kernel (queued in sockets) before writes fail with EAGAIN.
pub fn set_sndbuf(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    ioctl_int_ptr(fd, libc::TUNSETSNDBUF, bytes)
}

/// Reads one frame into `buf` (`read(2)`): the kernel silently truncates a frame longer than
/// `buf`, so callers size it for the largest frame the TAP can produce.
#[inline]
pub fn read_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
