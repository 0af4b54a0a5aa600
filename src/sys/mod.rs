//! Thin, checked wrappers over the Linux system calls ivnet needs beyond std: interface
//! configuration ioctls, timerfd, eventfd, signalfd, descriptor passing, the service manager's
//! notification socket and fd store ([`notify`]), and recovery from memory faults in shared
//! mappings ([`sigbus`]). Each call's result is checked and turned into an `io::Error`; nothing
//! here keeps state except the SIGBUS handler's table of guarded mappings.
#![allow(unsafe_code)]

pub mod access;
pub mod ctl;
pub mod fdpass;
pub mod notify;
pub mod sd;
pub mod sigbus;
pub mod tun;
pub mod vfio;

use std::ffi::CString;
use std::io;
use std::mem;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `struct ifreq` with the union as raw bytes (24 on 64-bit Linux).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(ifname: &str) -> io::Result<Self> {
        if ifname.is_empty() || ifname.len() > IFNAME_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"));
        }
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        for (d, s) in r.name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(r)
    }
}

/// An AF_INET datagram socket used only as a handle for interface ioctls.
pub(crate) fn ctl_socket_inet() -> io::Result<OwnedFd> {
    ctl_socket(libc::AF_INET)
}

/// A datagram socket used only as a handle for interface ioctls.
fn ctl_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned descriptor is checked and then owned.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(fd: RawFd, req: libc::c_ulong, r: &mut IfReq) -> io::Result<()> {
    // SAFETY: `r` is a properly sized, initialised `struct ifreq` that lives across the call;
    // the requests used with it read or write only that struct.
    cvt(unsafe { libc::ioctl(fd, req as _, r as *mut IfReq) }).map(|_| ())
}

/// Sets the MTU of interface `ifname`.
pub fn set_mtu(ifname: &str, mtu: u32) -> io::Result<()> {
    let s = ctl_socket(libc::AF_INET)?;
    let mut r = IfReq::new(ifname)?;
    r.data[..4].copy_from_slice(&(mtu as libc::c_int).to_ne_bytes());
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFMTU, &mut r)
}

/// Sets the Ethernet address of interface `ifname`.
pub fn set_mac(ifname: &str, mac: [u8; 6]) -> io::Result<()> {
    let s = ctl_socket(libc::AF_INET)?;
    let mut r = IfReq::new(ifname)?;
    // struct sockaddr { sa_family_t (u16), sa_data[14] }
    r.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
    r.data[2..8].copy_from_slice(&mac);
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFHWADDR, &mut r)
}

/// Sets or clears IFF_UP on interface `ifname`.
pub fn set_up(ifname: &str, up: bool) -> io::Result<()> {
    let s = ctl_socket(libc::AF_INET)?;
    let mut r = IfReq::new(ifname)?;
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r)?;
    let mut flags = i16::from_ne_bytes([r.data[0], r.data[1]]);
    if up {
        flags |= libc::IFF_UP as i16;
    } else {
        flags &= !(libc::IFF_UP as i16);
    }
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut r)
}

/// The kernel's index of interface `ifname`.
pub fn if_index(ifname: &str) -> io::Result<u32> {
    let c = CString::new(ifname).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(idx)
}

/// Adds the address `addr/prefix` to interface `ifname` (IPv4 or IPv6).
pub fn add_address(ifname: &str, addr: IpAddr, prefix: u8) -> io::Result<()> {
    match addr {
        IpAddr::V4(v4) => {
            let s = ctl_socket(libc::AF_INET)?;
            let sin = |a: [u8; 4]| {
                // struct sockaddr_in { u16 family, u16 port, u32 addr, u8 zero[8] }
                let mut d = [0u8; 24];
                d[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                d[4..8].copy_from_slice(&a);
                d
            };
            let mut r = IfReq::new(ifname)?;
            r.data = sin(v4.octets());
            ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFADDR, &mut r)?;
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix.min(32)) };
            let mut r = IfReq::new(ifname)?;
            r.data = sin(mask.to_be_bytes());
            ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFNETMASK, &mut r)
        }
        IpAddr::V6(v6) => {
            let s = ctl_socket(libc::AF_INET6)?;
            let mut req = libc::in6_ifreq {
                ifr6_addr: libc::in6_addr { s6_addr: v6.octets() },
                ifr6_prefixlen: prefix as u32,
                ifr6_ifindex: if_index(ifname)? as libc::c_int,
            };
            // SAFETY: `req` is an initialised `struct in6_ifreq`, which SIOCSIFADDR on an AF_INET6
            // socket reads and nothing else.
            cvt(unsafe {
                libc::ioctl(s.as_raw_fd(), libc::SIOCSIFADDR as _, &mut req as *mut libc::in6_ifreq)
            })
            .map(|_| ())
        }
    }
}

/// A periodic timer as a file descriptor (sub-millisecond, unlike epoll's timeout).
pub struct TimerFd(OwnedFd);

impl TimerFd {
    /// A non-blocking monotonic timer, disarmed.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain timerfd_create(2); the result is checked and then owned.
        let fd = cvt(unsafe {
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
        })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(TimerFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires every `period` (first after one period); `None` disarms.
    pub fn set_periodic(&self, period: Option<Duration>) -> io::Result<()> {
        let ts = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let p = period.unwrap_or(Duration::ZERO);
        let spec = libc::itimerspec { it_interval: ts(p), it_value: ts(p) };
        // SAFETY: `spec` is a valid itimerspec; a null old-value pointer is allowed.
        cvt(unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })
            .map(|_| ())
    }

    /// Consumes pending expirations; returns how many (0 if none).
    pub fn drain(&self) -> u64 {
        read_u64(self.0.as_raw_fd()).unwrap_or(0)
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn read_u64(fd: RawFd) -> Option<u64> {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into `v`, which is 8 bytes long.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    (n == 8).then_some(v)
}

/// The soft limit on open descriptors (RLIMIT_NOFILE, what `ulimit -n` shows), if finite.
pub fn fd_limit() -> Option<u64> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into `rl`, which lives for the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (r == 0 && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

/// An eventfd (the doorbell primitive QEMU's ivshmem uses).
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); the result is checked and then owned.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wraps a received descriptor, making it non-blocking.
    pub fn from_owned(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(EventFd(fd))
    }

    /// Adds 1 to the counter (wakes a waiter).
    pub fn signal(&self) -> io::Result<()> {
        let v = 1u64;
        // SAFETY: writes exactly 8 bytes from `v`.
        let n = unsafe { libc::write(self.0.as_raw_fd(), (&v as *const u64).cast(), 8) };
        if n == 8 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Resets the counter; returns its value (0 if it was not signalled).
    pub fn drain(&self) -> u64 {
        read_u64(self.0.as_raw_fd()).unwrap_or(0)
    }

    /// The owned descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.0
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// flock(2) on `fd` with operation `op` (LOCK_EX, LOCK_UN, ...).
pub fn flock(fd: RawFd, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock(2) on a descriptor the caller keeps open across the call; no pointers.
    cvt(unsafe { libc::flock(fd, op) }).map(|_| ())
}

/// The process id of the peer of a connected UNIX socket (SO_PEERCRED).
pub fn peer_pid(sock: RawFd) -> Option<u32> {
    peer_cred(sock).and_then(|c| (c.pid > 0).then_some(c.pid))
}

/// Who is at the other end of a connected UNIX socket (SO_PEERCRED: the credentials it had
/// when it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (0 if unknown, e.g. in another pid namespace).
    pub pid: u32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The credentials of the peer of a connected UNIX socket.
pub fn peer_cred(sock: RawFd) -> Option<PeerCred> {
    // SAFETY: ucred is plain data; zeroed is valid.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then(|| PeerCred { pid: cred.pid.max(0) as u32, uid: cred.uid, gid: cred.gid })
}

/// Bytes written to the stream socket `sock` that its peer has not read yet (SIOCOUTQ; for a
/// UNIX socket this includes what sits unread in the peer's receive queue).
pub fn unread_output(sock: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int into `n`, which lives across the call.
    cvt(unsafe { libc::ioctl(sock, libc::TIOCOUTQ as _, &mut n as *mut libc::c_int) })?;
    Ok(n.max(0) as usize)
}

/// Shuts both directions of a socket down, so that its peer sees the end of the connection even
/// while another process (the service manager's fd store) holds a duplicate of it.
pub fn shutdown(sock: RawFd) -> io::Result<()> {
    // SAFETY: shutdown(2) on a descriptor the caller keeps open; no pointers.
    cvt(unsafe { libc::shutdown(sock, libc::SHUT_RDWR) }).map(|_| ())
}

/// Allocates the first `len` bytes of the file `fd` (fallocate mode 0): afterwards writes
/// through a shared mapping cannot fail for lack of space (tmpfs, hugetlbfs, ext4 ...).
/// `EOPNOTSUPP` means the filesystem cannot do it.
pub fn fallocate(fd: RawFd, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate(2) on a descriptor the caller keeps open; no pointers.
        let r = unsafe { libc::fallocate(fd, 0, 0, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `fd` (statfs f_bavail).
pub fn free_space(fd: RawFd) -> io::Result<u64> {
    // SAFETY: statfs is plain data; fstatfs fills it.
    let mut st: libc::statfs = unsafe { mem::zeroed() };
    // SAFETY: `st` is a valid, writable statfs for the duration of the call.
    cvt(unsafe { libc::fstatfs(fd, &mut st) })?;
    Ok((st.f_bavail as u64).saturating_mul(st.f_bsize as u64))
}

/// The soft limit on open descriptors (RLIMIT_NOFILE), if there is one.
pub fn nofile_limit() -> Option<u64> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: `rl` is valid and writable for the duration of the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }).ok()?;
    (rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

/// Whether `fd` is a socket that listens for connections (SO_ACCEPTCONN).
pub fn is_listening_socket(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which is that large.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v != 0
}

/// Sets the process's file mode creation mask; returns the previous one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask(2) cannot fail and takes no pointers.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// The group id of group `name` (from the system's group database), if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `grp` is plain data; getgrnam_r fills it and points its strings into `buf`, which
    // outlives every use (only gr_gid, a plain integer, is read).
    let mut grp: libc::group = unsafe { mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers refer to live buffers of the sizes given.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    (r == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; F_GETFL/F_SETFL take no pointers.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

/// SIGINT, SIGTERM and SIGHUP delivered as a readable descriptor instead of asynchronously.
pub struct SignalFd(OwnedFd);

impl SignalFd {
    /// Blocks SIGINT, SIGTERM and SIGHUP for the calling thread (call before starting threads so
    /// they inherit the mask) and returns a descriptor that reports them.
    pub fn termination() -> io::Result<Self> {
        // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use; the calls only
        // touch it and the thread's signal mask.
        unsafe {
            let mut set: libc::sigset_t = mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            cvt(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()))?;
            let fd = cvt(libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC))?;
            Ok(SignalFd(OwnedFd::from_raw_fd(fd)))
        }
    }

    /// The next pending signal number, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data; zeroed is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { mem::zeroed() };
        let size = mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe { libc::read(self.0.as_raw_fd(), &mut info as *mut _ as *mut _, size) };
        (n as usize == size).then_some(info.ssi_signo as i32)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and takes no arguments.
    unsafe { libc::geteuid() }
}

/// Thread CPU time used by the whole process so far.
pub fn process_cpu_time() -> Duration {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { mem::zeroed() };
    // SAFETY: valid clock id and a pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A token naming this host boot and pid namespace: two processes with the same token can
/// check each other's pids. 0 if it cannot be determined.
pub fn host_token() -> u64 {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let pidns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if boot.is_empty() || pidns.is_empty() {
        return 0;
    }
    // FNV-1a: stable across builds, which std's hasher is not.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in boot.trim().bytes().chain(pidns.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// Whether a process with this pid exists (in our pid namespace).
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Milliseconds since the Unix epoch (wall clock), for informational timestamps.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
