//! The agent's control socket and the addresses of its interface: a UNIX listener whose file
//! mode is set before anyone can connect, and `getifaddrs(3)` for one interface.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use super::cvt;

/// Binds a non-blocking UNIX stream listener at `path` with file mode `mode`: bind, chmod,
/// then listen, so nobody can connect while the mode is still the umask's.
pub fn bind_unix_listener(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path must be 1 to {} bytes without NUL", addr.sun_path.len() - 1),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the descriptor is checked and then owned.
    let fd = cvt(unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0)
    })?;
    // SAFETY: `fd` is fresh and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call; `len` covers the
    // family and the NUL-terminated path inside it.
    cvt(unsafe {
        libc::bind(fd, &addr as *const libc::sockaddr_un as *const libc::sockaddr, len)
    })?;
    let cpath = std::ffi::CString::new(bytes).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `cpath` is a valid NUL-terminated string for the duration of the call.
    if let Err(e) = cvt(unsafe { libc::chmod(cpath.as_ptr(), mode as libc::mode_t) }) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: plain listen(2) on the socket we own.
    if let Err(e) = cvt(unsafe { libc::listen(fd, 16) }) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(sock))
}

/// The IP addresses (with prefix lengths) of interface `ifname`, IPv4 first, in the kernel's
/// order otherwise. An interface that does not exist has none.
///
/// `getifaddrs(3)` asks the kernel over netlink; where a sandbox forbids netlink sockets
/// (systemd's `RestrictAddressFamilies=` without `AF_NETLINK`) this falls back to what needs
/// none: `SIOCGIFCONF`/`SIOCGIFNETMASK` on an `AF_INET` socket and `/proc/net/if_inet6`.
pub fn if_addresses(ifname: &str) -> io::Result<Vec<(IpAddr, u8)>> {
    match getifaddrs_of(ifname) {
        Ok(v) => Ok(v),
        Err(e) => {
            log::debug!("getifaddrs: {e}; reading addresses without netlink");
            let mut v = ipv4_by_ioctl(ifname)?;
            v.extend(ipv6_from_proc(
                ifname,
                &std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default(),
            ));
            Ok(v)
        }
    }
}

/// `struct ifreq` as SIOCGIFCONF fills it on 64-bit Linux: the name, then a sockaddr, 40 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReqAddr {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

#[repr(C)]
struct IfConf {
    len: libc::c_int,
    buf: *mut IfReqAddr,
}

const SIOCGIFCONF: libc::c_ulong = 0x8912;
const SIOCGIFNETMASK: libc::c_ulong = 0x891b;

/// IPv4 addresses of `ifname` (and its labels `ifname:N`) through ioctls on an AF_INET socket.
fn ipv4_by_ioctl(ifname: &str) -> io::Result<Vec<(IpAddr, u8)>> {
    let sock = super::ctl_socket_inet()?;
    use std::os::fd::AsRawFd;
    const MAX: usize = 256;
    // SAFETY: IfReqAddr is plain old data; all zeroes is valid.
    let mut reqs: Vec<IfReqAddr> = vec![unsafe { std::mem::zeroed() }; MAX];
    let mut conf = IfConf {
        len: (MAX * std::mem::size_of::<IfReqAddr>()) as libc::c_int,
        buf: reqs.as_mut_ptr(),
    };
    // SAFETY: `conf` points to a buffer of `len` bytes that outlives the call; the kernel
    // writes at most that many and sets `len` to what it wrote.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFCONF as _, &mut conf as *mut IfConf) })?;
    let n = (conf.len.max(0) as usize / std::mem::size_of::<IfReqAddr>()).min(MAX);
    let mut out = Vec::new();
    for r in &reqs[..n] {
        let end = r.name.iter().position(|&b| b == 0).unwrap_or(r.name.len());
        let name = &r.name[..end];
        let ours = name == ifname.as_bytes()
            || name.strip_prefix(ifname.as_bytes()).is_some_and(|rest| rest.first() == Some(&b':'));
        if !ours || r.addr.sin_family != libc::AF_INET as libc::sa_family_t {
            continue;
        }
        let ip = Ipv4Addr::from(u32::from_be(r.addr.sin_addr.s_addr));
        let mut q = *r;
        // SAFETY: `q` is an initialised ifreq naming the address's label; SIOCGIFNETMASK
        // writes a sockaddr_in into it.
        let prefix = match cvt(unsafe {
            libc::ioctl(sock.as_raw_fd(), SIOCGIFNETMASK as _, &mut q as *mut IfReqAddr)
        }) {
            Ok(_) => u32::from_be(q.addr.sin_addr.s_addr).count_ones() as u8,
            Err(_) => 32,
        };
        out.push((IpAddr::V4(ip), prefix));
    }
    Ok(out)
}

/// IPv6 addresses of `ifname` from the text of `/proc/net/if_inet6` (address, index, prefix
/// length, scope, flags, name; hex).
fn ipv6_from_proc(ifname: &str, text: &str) -> Vec<(IpAddr, u8)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 6 || f[5] != ifname || f[0].len() != 32 {
                return None;
            }
            let mut b = [0u8; 16];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = u8::from_str_radix(f[0].get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            let prefix = u8::from_str_radix(f[2], 16).ok().filter(|&p| p <= 128)?;
            Some((IpAddr::V6(Ipv6Addr::from(b)), prefix))
        })
        .collect()
}

fn getifaddrs_of(ifname: &str) -> io::Result<Vec<(IpAddr, u8)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != ifname.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to at least a sockaddr.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
        match family {
            libc::AF_INET => {
                // SAFETY: the family says both are sockaddr_in (the netmask may be null).
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                let prefix = if ifa.ifa_netmask.is_null() {
                    32
                } else {
                    // SAFETY: as above.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
                    u32::from_be(m.sin_addr.s_addr).count_ones() as u8
                };
                v4.push((IpAddr::V4(ip), prefix));
            }
            libc::AF_INET6 => {
                // SAFETY: the family says both are sockaddr_in6 (the netmask may be null).
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let prefix = if ifa.ifa_netmask.is_null() {
                    128
                } else {
                    // SAFETY: as above.
                    let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in6) };
                    m.sin6_addr.s6_addr.iter().map(|b| b.count_ones() as u8).sum()
                };
                v6.push((IpAddr::V6(ip), prefix));
            }
            _ => {}
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(head) };
    v4.extend(v6);
    Ok(v4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn test_loopback_has_127_0_0_1() {
        let a = if_addresses("lo").unwrap();
        assert!(a.contains(&(IpAddr::V4(Ipv4Addr::LOCALHOST), 8)), "{a:?}");
        assert!(if_addresses("nosuchif0").unwrap().is_empty());
    }

    #[test]
    fn test_addresses_without_netlink_match_getifaddrs_on_loopback() {
        let v4 = ipv4_by_ioctl("lo").unwrap();
        assert!(v4.contains(&(IpAddr::V4(Ipv4Addr::LOCALHOST), 8)), "{v4:?}");
        let text = "00000000000000000000000000000001 01 80 10 80       lo\n\
                    fe80000000000000006976fffe6e0000 05 40 20 80  tap-shm\n\
                    zz80000000000000006976fffe6e0001 05 40 20 80  tap-shm\n";
        assert_eq!(ipv6_from_proc("lo", text), vec![(IpAddr::V6(Ipv6Addr::LOCALHOST), 128)]);
        let tap = ipv6_from_proc("tap-shm", text);
        assert_eq!(
            tap,
            vec![("fe80::69:76ff:fe6e:0".parse().unwrap(), 64)],
            "the bad line is skipped"
        );
    }

    #[test]
    fn test_listener_gets_the_mode_and_accepts() {
        let dir = std::env::temp_dir().join(format!("ivnet-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let l = bind_unix_listener(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        // A second bind on the same path fails: the caller decides what to do.
        assert!(bind_unix_listener(&path, 0o600).is_err());
        let long = dir.join("x".repeat(200));
        assert_eq!(
            bind_unix_listener(&long, 0o600).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
