//! Passing file descriptors over UNIX sockets (SCM_RIGHTS), as QEMU's ivshmem protocol does.

use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Room for this many descriptors in one received message (the protocol sends at most one; more
/// are closed).
const MAX_FDS: usize = 4;

/// Sends `bytes` on the stream socket `sock` without blocking, with `fd` attached to the first
/// byte when given. Returns how many bytes went out (possibly fewer than `bytes.len()`).
pub fn send_with_fd(sock: RawFd, bytes: &[u8], fd: Option<RawFd>) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // Control buffer large enough for one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    attach_fds(&mut msg, &mut control, fd.as_slice());
    // SAFETY: `msg` refers to `iov` (pointing at `bytes`) and `control`, all alive for the call;
    // the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Attaches `fds` to `msg` as one SCM_RIGHTS control message written into `control` (nothing
/// when `fds` is empty). `control` must stay alive, and not move, until `msg` has been sent.
///
/// # Panics
///
/// If `control` cannot hold the message: a caller's sizing bug.
pub(super) fn attach_fds(msg: &mut libc::msghdr, control: &mut [u64], fds: &[RawFd]) {
    if fds.is_empty() {
        return;
    }
    let data_len = mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
    assert!(space <= mem::size_of_val(control), "no room for {} descriptors", fds.len());
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` writable bytes (checked above), room for one header
    // with `fds.len()` descriptors; CMSG_* only compute addresses inside that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, &fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), fd);
        }
    }
}

/// Receives into `buf` from the stream socket `sock` without blocking; descriptors that came
/// with the data are appended to `fds` (close-on-exec). Returns the byte count (0 at EOF).
/// Descriptors that could not be received (see [`recv_with_fds_lossy`]) are an error.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let r = recv_with_fds_lossy(sock, buf, fds)?;
    if r.fds_lost {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "ancillary data truncated"));
    }
    Ok(r.bytes)
}

/// What [`recv_with_fds_lossy`] received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes received (0 at EOF).
    pub bytes: usize,
    /// Descriptors came with the bytes but some were not received (MSG_CTRUNC): most often the
    /// process reached its descriptor limit (RLIMIT_NOFILE) and the kernel closed them.
    pub fds_lost: bool,
}

/// Like [`recv_with_fds`], but a truncated control message is reported, not an error: the bytes
/// were received and the stream stays in step.
pub fn recv_with_fds_lossy(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `buf` and `control`, both writable and alive for the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `msg.msg_control` with `msg_controllen` valid bytes; the CMSG_*
    // macros walk only within that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                let count = (len / mem::size_of::<RawFd>()).min(MAX_FDS * 4);
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // Each received descriptor is new in this process and owned by nobody else.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received { bytes: n as usize, fds_lost: msg.msg_flags & libc::MSG_CTRUNC != 0 })
}

/// Sends `bytes` with every descriptor of `fds` attached (at most 253, the kernel's limit), for
/// tests and fuzzing that play a server sending more than the protocol allows.
#[cfg(any(test, feature = "test-utils"))]
pub fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let fds = &fds[..fds.len().min(253)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of_val(fds) as u32) } as usize;
    // Aligned for cmsghdr (8 bytes).
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    attach_fds(&mut msg, &mut control, fds);
    // SAFETY: `msg` refers to `iov` (pointing at `bytes`) and `control`, all alive for the call;
    // the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
