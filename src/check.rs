//! `--check-config`: everything about an agent's or a server's configuration that can be
//! checked without starting it: the privileges and devices it needs, its paths and their
//! permissions, an existing region (is it ivnet's, does its geometry match, does the MTU fit,
//! is its size a power of two for the server), the ivshmem device in a VM. Nothing is created,
//! bound, joined or connected to.
//!
//! Values, keys and conflicts are checked before this, by [`crate::config`]: a configuration
//! that gets here parsed.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::backend::pci::{DeviceSpec, IvshmemDevice};
use crate::config::{AgentConfig, BackendChoice, ByteSize};
use crate::region::{Geometry, GeometryRequest, Region, RegionError};
use crate::server::ServerConfig;

/// What a check found.
#[derive(Debug, Default)]
pub struct Findings {
    /// Things that would make the agent or server fail to start (or misbehave).
    pub problems: Vec<String>,
    /// Things worth knowing that are not errors.
    pub notes: Vec<String>,
}

impl Findings {
    fn problem(&mut self, s: impl Into<String>) {
        self.problems.push(s.into());
    }

    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Notes and problems as TOML comments, to follow the effective configuration.
    pub fn to_comments(&self) -> String {
        let mut out = String::new();
        for n in &self.notes {
            out.push_str(&format!("# note: {n}\n"));
        }
        for p in &self.problems {
            out.push_str(&format!("# problem: {p}\n"));
        }
        out
    }
}

/// Linux's CAP_NET_ADMIN bit.
const CAP_NET_ADMIN: u32 = 12;

/// Whether this process has `cap` in its effective set (from /proc/self/status).
fn has_capability(cap: u32) -> Option<bool> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    let bits = u64::from_str_radix(hex, 16).ok()?;
    Some(bits & (1 << cap) != 0)
}

/// Checks an agent configuration.
pub fn agent(cfg: &AgentConfig) -> Findings {
    let mut f = Findings::default();
    match has_capability(CAP_NET_ADMIN) {
        Some(true) => {}
        Some(false) => f.problem(
            "this process lacks CAP_NET_ADMIN: run the agent as root (or with that capability) \
             to create its TAP",
        ),
        None => f.note("cannot read /proc/self/status to check for CAP_NET_ADMIN"),
    }
    match fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => {}
        Err(e) => f.problem(format!(
            "cannot open /dev/net/tun ({e}): the agent needs it for its TAP (modprobe tun)"
        )),
    }
    if Path::new("/sys/class/net").join(&cfg.tap).exists() {
        f.note(format!(
            "an interface {} exists already (a running agent's?): another agent with the same \
             tap fails to start",
            cfg.tap
        ));
    }
    let region = match &cfg.backend {
        BackendChoice::File { path, size } => region_file(&mut f, path, *size, &cfg.geometry, None),
        BackendChoice::Server { socket } => {
            server_socket(&mut f, socket);
            None
        }
        BackendChoice::Pci { spec, bind } => device(&mut f, spec, *bind, &cfg.geometry),
    };
    if let Some(g) = region {
        if cfg.mtu > g.mtu {
            f.problem(format!(
                "mtu {} is larger than the segment's MTU {} (set when the region was created)",
                cfg.mtu, g.mtu
            ));
        }
    }
    f
}

/// Checks a server configuration.
pub fn server(cfg: &ServerConfig) -> Findings {
    let mut f = Findings::default();
    let parent = parent_dir(&cfg.socket);
    match crate::sys::access::check(parent, false, true) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => f.problem(format!(
            "the socket's directory {} does not exist (under systemd the unit's \
             RuntimeDirectory=ivnet creates /run/ivnet)",
            parent.display()
        )),
        Err(e) => f.problem(format!("cannot create the socket in {}: {e}", parent.display())),
    }
    match fs::symlink_metadata(&cfg.socket) {
        Ok(m) if m.file_type().is_socket() => f.note(format!(
            "{} exists: if a server listens there, this one refuses to start; a stale socket is \
             replaced",
            cfg.socket.display()
        )),
        Ok(_) => f.problem(format!(
            "{} exists and is not a socket: the server refuses to remove it",
            cfg.socket.display()
        )),
        Err(_) => {}
    }
    region_file(&mut f, &cfg.shm, cfg.size, &cfg.geometry, Some(()));
    f
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A region file: `server` is Some for the server (whose region must be a power of two).
/// Returns the geometry the region has or will have, if known.
fn region_file(
    f: &mut Findings,
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
    server: Option<()>,
) -> Option<Geometry> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = parent_dir(path);
            if let Err(e) = crate::sys::access::check(parent, false, true) {
                f.problem(format!(
                    "region file {} does not exist and cannot be created in {}: {e}",
                    path.display(),
                    parent.display()
                ));
            }
            let Some(size) = size else {
                f.problem(format!(
                    "region file {} does not exist and no size is given to create it",
                    path.display()
                ));
                return None;
            };
            return match req.resolve(size) {
                Ok(g) => {
                    f.note(format!(
                        "region file {} will be created with {} ({} peer slots, {} segments of \
                         {} bytes per ring, segment MTU {})",
                        path.display(),
                        ByteSize(size),
                        g.max_peers,
                        g.ring_slots,
                        g.slot_size,
                        g.mtu
                    ));
                    Some(g)
                }
                Err(e) => {
                    f.problem(format!("region file {}: {e}", path.display()));
                    None
                }
            };
        }
        Err(e) => {
            f.problem(format!("cannot inspect region file {}: {e}", path.display()));
            return None;
        }
    };
    if meta.is_dir() {
        f.problem(format!("region file {} is a directory", path.display()));
        return None;
    }
    if !meta.is_file() {
        f.problem(format!("region file {} is not a regular file", path.display()));
        return None;
    }
    if let Err(e) = crate::sys::access::check(path, true, true) {
        f.problem(format!(
            "cannot open region file {} for reading and writing: {e}",
            path.display()
        ));
    }
    let len = meta.len();
    if server.is_some() && len > 0 && !len.is_power_of_two() {
        f.problem(format!(
            "region file {} exists with {len} bytes, not a power of two as QEMU's ivshmem needs; \
             --size cannot change an existing file: remove it once no member uses it",
            path.display()
        ));
    }
    if len == 0 {
        match size {
            Some(s) => f.note(format!(
                "region file {} is empty: it will be sized to {}",
                path.display(),
                ByteSize(s)
            )),
            None => f.problem(format!(
                "region file {} is empty and no size is given to size it",
                path.display()
            )),
        }
        return size.and_then(|s| req.resolve(s).ok());
    }
    if let Some(s) = size.filter(|&s| s != len) {
        f.note(format!(
            "region file {} exists with {} bytes: size {} is not used",
            path.display(),
            len,
            ByteSize(s)
        ));
    }
    match crate::backend::file::open_read_only(path) {
        Ok(region) => existing_region(f, &region, req),
        Err(crate::backend::file::FileBackendError::Region(RegionError::Blank { .. })) => {
            match req.resolve(len) {
                Ok(g) => Some(g),
                Err(e) => {
                    f.problem(format!("region file {} ({len} bytes): {e}", path.display()));
                    None
                }
            }
        }
        Err(e) => {
            f.problem(error_chain(&e));
            None
        }
    }
}

/// An initialised region: its geometry must match what was asked for.
fn existing_region(f: &mut Findings, region: &Region, req: &GeometryRequest) -> Option<Geometry> {
    let g = region.geometry();
    let up = (0..g.max_peers)
        .filter(|&id| region.peer(id).state() == crate::region::PeerState::Up)
        .count();
    f.note(format!(
        "{}: an ivnet region of {} bytes, {} peer slots ({up} up), segment MTU {}",
        region.name(),
        region.size(),
        g.max_peers,
        g.mtu
    ));
    for (key, want, have) in [
        ("max-peers", req.max_peers, g.max_peers),
        ("slots", req.ring_slots, g.ring_slots),
        ("slot-size", req.slot_size, g.slot_size),
        ("segment-mtu", req.mtu, g.mtu),
    ] {
        if let Some(w) = want.filter(|&w| w != have) {
            f.problem(format!(
                "{key} {w} does not match the region's {have} (drop it to adopt the region's \
                 value, or recreate the region)"
            ));
        }
    }
    Some(g)
}

fn server_socket(f: &mut Findings, socket: &Path) {
    match fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            if let Err(e) = crate::sys::access::check(socket, false, true) {
                f.problem(format!("cannot connect to {} ({e})", socket.display()));
            }
        }
        Ok(_) => f.problem(format!("{} is not a socket", socket.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => f.problem(format!(
            "no socket at {}: start `ivnet server` first (systemctl start ivnet-server)",
            socket.display()
        )),
        Err(e) => f.problem(format!("cannot inspect {}: {e}", socket.display())),
    }
}

/// The ivshmem device in a VM: present, how the agent will use it, its region.
fn device(
    f: &mut Findings,
    spec: &DeviceSpec,
    bind: bool,
    req: &GeometryRequest,
) -> Option<Geometry> {
    let dev = match IvshmemDevice::find(spec) {
        Ok(d) => d,
        Err(e) => {
            f.problem(error_chain(&e));
            return None;
        }
    };
    let kind = if dev.is_doorbell() { "ivshmem-doorbell" } else { "ivshmem-plain" };
    let driver = dev.driver.clone().unwrap_or_else(|| "no driver".into());
    let group = dev.iommu_group();
    f.note(format!(
        "{kind} device {} (BAR2 {} bytes), bound to {driver}, IOMMU group {}",
        dev.addr,
        dev.bars[2].len,
        group.map_or_else(|| "none".to_string(), |g| g.to_string())
    ));
    let on_vfio = dev.driver.as_deref() == Some("vfio-pci");
    if group.is_none() {
        f.note(
            "no IOMMU group: the agent will use the device through sysfs (polling, no \
                doorbell wake-ups)",
        );
    } else if !on_vfio && !bind {
        f.note(
            "not bound to vfio-pci and bind is off: the agent will use sysfs (polling); \
                set bind = true for VFIO with MSI-X",
        );
    } else if !on_vfio {
        if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
            f.problem(
                "bind is on but the vfio-pci driver is not loaded (modprobe vfio-pci; \
                       the package's modules-load.d entry loads it at boot)",
            );
        }
        if let Err(e) = crate::sys::access::check(&dev.path.join("driver_override"), false, true) {
            f.problem(format!("cannot bind {} to vfio-pci: driver_override: {e}", dev.addr));
        }
    }
    if on_vfio {
        f.note(
            "the device is held by vfio-pci (a running agent's?): its region cannot be read \
                from here",
        );
        return None;
    }
    match crate::backend::sysfs::SysfsDevice::open_read_only(&dev) {
        Ok(region) => existing_region(f, &region, req),
        Err(e) => {
            f.note(format!("cannot read the device's region: {}", error_chain(&e)));
            None
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
