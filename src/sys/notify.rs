//! The service manager's side channel (systemd's `sd_notify(3)` and `sd_listen_fds(3)`, about
//! fifty lines of our own since the SCM_RIGHTS code is here anyway): state lines such as
//! `READY=1`, descriptors for its fd store (`FDSTORE=1` with `FDNAME=`), removal from the store
//! (`FDSTOREREMOVE=1`), and the descriptors it hands back to a restarted service
//! (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from 3 on).

use std::ffi::OsString;
use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// Most descriptors sent in one notification here (systemd takes up to 253).
const MAX_FDS_PER_MESSAGE: usize = 16;

/// The notification socket, if the process runs under a service manager that wants messages.
pub fn notify_socket() -> Option<OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// Whether `name` is a valid `FDNAME=` (1 to 255 printable ASCII characters, no `:`).
pub fn valid_fd_name(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) with `fds` attached to the service
/// manager. Returns `Ok(false)` when there is no manager to tell (`NOTIFY_SOCKET` unset).
pub fn notify(state: &str, fds: &[RawFd]) -> io::Result<bool> {
    let Some(path) = notify_socket() else { return Ok(false) };
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
    }
    let bytes = path.as_encoded_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty address.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // `@name` is an abstract socket: a NUL byte in place of the `@`.
    let (abstract_ns, name) = match bytes.strip_prefix(b"@") {
        Some(rest) => (true, rest),
        None => (false, bytes),
    };
    let offset = usize::from(abstract_ns);
    if offset + name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET path too long"));
    }
    for (d, &s) in addr.sun_path[offset..].iter_mut().zip(name) {
        *d = s as libc::c_char;
    }
    let addr_len = mem::size_of::<libc::sa_family_t>() + offset + name.len();
    // SAFETY: plain socket(2); the result is checked, then owned.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut iov = libc::iovec { iov_base: state.as_ptr() as *mut _, iov_len: state.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&mut addr as *mut libc::sockaddr_un).cast();
    msg.msg_namelen = addr_len as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // Room for MAX_FDS_PER_MESSAGE descriptors, aligned for cmsghdr.
    let mut control = [0u64; 2 + MAX_FDS_PER_MESSAGE / 2 + 1];
    super::fdpass::attach_fds(&mut msg, &mut control, fds);
    loop {
        // SAFETY: `msg` refers to `addr`, `iov` (pointing at `state`) and `control`, all alive
        // for the call; the kernel only reads them.
        let n = unsafe {
            libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(&sock), &msg, libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A descriptor handed back by the service manager, with the name it was stored under
/// (`unknown` when the manager gave none).
#[derive(Debug)]
pub struct ListenFd {
    /// `FDNAME=` it was stored with, or the socket unit's `FileDescriptorName=`.
    pub name: String,
    /// The descriptor (close-on-exec set).
    pub fd: OwnedFd,
}

/// Takes the descriptors the service manager passed to this process (`LISTEN_PID` must be our
/// pid), sets close-on-exec on them and removes the variables so they are taken only once.
/// Empty when none were passed.
pub fn take_listen_fds() -> Vec<ListenFd> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<usize>().ok());
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID"] {
        std::env::remove_var(v);
    }
    let (true, Some(count)) = (pid_ok, count) else { return Vec::new() };
    let mut names = names.split(':');
    let mut out = Vec::with_capacity(count);
    for i in 0..count.min(4096) {
        let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown").to_string();
        let Some(fd) = LISTEN_FDS_START.checked_add(i as RawFd) else { break };
        // SAFETY: F_GETFD only inspects the descriptor table entry.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue; // not open after all: nothing to take
        }
        // SAFETY: F_SETFD with FD_CLOEXEC on a descriptor that is open (checked above).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the service manager passed this descriptor to us (LISTEN_PID is our pid);
        // nothing else in the process owns it, and the variables were removed above so it is
        // taken once.
        out.push(ListenFd { name, fd: unsafe { OwnedFd::from_raw_fd(fd) } });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fd_names_follow_the_rules() {
        assert!(valid_fd_name("peer-3-0.sock"));
        assert!(!valid_fd_name(""));
        assert!(!valid_fd_name("a:b"));
        assert!(!valid_fd_name("with space"));
        assert!(!valid_fd_name(&"x".repeat(256)));
    }
}
