//! Command-line flags and the TOML file (`/etc/ivnet/ivnet.toml`) -> one validated configuration.
//!
//! Flags win over the file; the file wins over the defaults. Every key of the file has the
//! flag's name (`peer-id = 1`, `address = ["10.0.0.1/24"]`). An error in the file names the
//! file, the line and the key; an unknown key also lists the keys there are. The file, like the
//! flags, gives exactly one way to reach the region (`shm`, `socket` or `device`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use toml::Spanned;

use crate::agent::tap::OffloadMode;
use crate::backend::file::CreateMode;
use crate::mac::Mac;
use crate::region::GeometryRequest;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/ivnet/ivnet.toml";

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("configuration file {path} line {line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line of the error (1-based).
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A key of the file is unknown, has a bad value or conflicts with another key.
    #[error("configuration file {path} line {line}: {key}: {message}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// Line of the key (1-based).
        line: usize,
        /// The key.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("{key}: {message}")]
    Invalid {
        /// The flag or key.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// No way to reach a region was given.
    #[error("no region given: use --shm PATH (a shared file){more}")]
    NoBackend {
        /// Other options to mention.
        more: &'static str,
    },
}

/// A byte size written as `65536`, `64K`, `16M`, `1G` or `64MiB`: binary multiples (K = 1024).
/// `KB`, `MB` and `GB` are refused as ambiguous (decimal to some, binary to others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 64M or 1G"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            u @ ("kb" | "mb" | "gb") => {
                let b = u[..1].to_ascii_uppercase();
                return Err(format!(
                    "{s:?} is ambiguous: sizes are binary here, write {n}{b} (the same as {n}{b}iB)"
                ));
            }
            _ => return Err(format!("{s:?} has an unknown unit: use K, M or G (binary)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    /// The shortest exact form: `64M`, `1536K`, `1000`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

/// An interface address with its prefix length, like `10.0.0.1/24` or `fd00::1/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} needs a prefix length, like 10.0.0.1/24"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{a:?} is not an IP address"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("{p:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max} bits"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Flags that choose and shape the region (shared by `agent`, `server` and `stack`).
#[derive(Debug, Clone, Default, Args)]
pub struct RegionArgs {
    /// Region file (`file` backend): a shared file such as /dev/shm/ivnet, created if absent.
    #[arg(long, value_name = "PATH")]
    pub shm: Option<PathBuf>,
    /// Size of the region file when it is created: K, M or G are binary (64M = 64 MiB; KB, MB
    /// and GB are refused as ambiguous). An existing file keeps its size.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<ByteSize>,
    /// Peer slots in a new region (2..=64). On an existing region: must match if given.
    #[arg(long, value_name = "N")]
    pub max_peers: Option<u32>,
    /// Segments per ring in a new region (power of two; default: the most that fit).
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// Bytes per ring segment in a new region (multiple of 64, default 2048).
    #[arg(long, value_name = "BYTES")]
    pub slot_size: Option<u32>,
    /// Largest MTU the segment carries (default 65521, the TAP maximum).
    #[arg(long, value_name = "BYTES")]
    pub segment_mtu: Option<u32>,
    /// Permissions of a region file (and the server's socket) this command creates, in octal.
    /// Default 0600: only the creating user. Every member can read and write the whole region.
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// Group of a region file (and the server's socket) this command creates (name or id), so
    /// that QEMU or libvirt running as another user can be let in with `--mode 0660`.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
}

/// Parses a permission mode written in octal (`0660`, `660`, `0o660`).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(t, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not a permission mode like 0600 or 0660")),
    }
}

/// Resolves a group given by name or number.
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.trim().parse::<u32>() {
        return Ok(gid);
    }
    crate::sys::group_id(s.trim()).ok_or_else(|| format!("there is no group {s:?}"))
}

impl RegionArgs {
    /// Mode and group for files these flags make the command create (`file` given by a
    /// configuration file: its `mode`/`group` keys, which the flags override).
    pub fn create_mode(
        &self,
        file_mode: Option<&str>,
        file_group: Option<&str>,
    ) -> Result<CreateMode, ConfigError> {
        let mode = match (self.mode, file_mode) {
            (Some(m), _) => m,
            (None, Some(m)) => parse_mode(m).map_err(|m| invalid("mode", m))?,
            (None, None) => CreateMode::default().mode,
        };
        let group = match self.group.as_deref().or(file_group) {
            Some(g) => Some(parse_group(g).map_err(|m| invalid("group", m))?),
            None => None,
        };
        Ok(CreateMode { mode, group })
    }
}

/// Flags of `ivnet agent`.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// Configuration file (TOML, keys named like the flags). Flags win over it; a --shm,
    /// --socket or --device flag replaces its way to the segment. Default:
    /// /etc/ivnet/ivnet.toml if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub region: RegionArgs,
    /// Our peer id (slot in the peer table). Default: claim a free slot.
    #[arg(long, value_name = "ID")]
    pub peer_id: Option<u32>,
    /// Name of the TAP interface to create (1 to 15 characters). Default tap-shm.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// MTU of the TAP interface (68..=65521, at most the segment MTU). Default 1500.
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,
    /// MAC address of the TAP. Default: derived from /etc/machine-id and the TAP name (stable
    /// across restarts), or 02:69:76:6e:HH:LL from the peer id if another member of the segment
    /// already has that MAC (namespaces on one host share the machine id).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<Mac>,
    /// Address to give the TAP, e.g. 10.0.0.1/24 (repeat for several). The link is brought up
    /// in any case.
    #[arg(long, value_name = "CIDR")]
    pub address: Vec<Cidr>,
    /// Interval at which the inbound rings are polled when there is no doorbell, in µs.
    /// Default 100.
    #[arg(long, value_name = "US")]
    pub poll_us: Option<u64>,
    /// Without doorbells, the poll interval backs off to this when there has been no traffic
    /// for 200 ms (any frame returns it to --poll-us at once), in µs. Default 2000.
    #[arg(long, value_name = "US")]
    pub poll_idle_us: Option<u64>,
    /// A peer whose heartbeat stops for this long is marked down, in ms. Default 1000.
    #[arg(long, value_name = "MS")]
    pub link_timeout_ms: Option<u64>,
    /// Join through the doorbell server on this UNIX socket (`server` backend): peer id, region
    /// and doorbells come from the server, as for QEMU.
    #[arg(long, value_name = "PATH", conflicts_with = "shm")]
    pub socket: Option<PathBuf>,
    /// Keep polling this long after the last activity, in µs (0: never spin): with doorbells
    /// before sleeping on them, without before waiting for the next poll interval. Default 100.
    #[arg(long, value_name = "US")]
    pub spin_us: Option<u64>,
    /// In a VM: use the ivshmem PCI device (`auto` finds it, or a PCI address like
    /// 0000:00:03.0): through vfio-pci with MSI-X doorbells, else through sysfs, polling.
    #[arg(long, value_name = "auto|ADDR", conflicts_with_all = ["shm", "socket"])]
    pub device: Option<crate::backend::pci::DeviceSpec>,
    /// With --device: bind the device to vfio-pci (driver_override) if it is not bound yet.
    #[arg(long, requires = "device")]
    pub bind: bool,
    /// Checksum and segmentation offloads on the TAP (virtio-net header, TSO, USO): the kernel
    /// then hands over and takes frames of up to 64 KiB, which is several times faster. `auto`:
    /// on when the kernel's TAP accepts them; `on`: fail if it does not; `off`: plain frames.
    /// Peers without offloads get segmented, checksummed frames either way. Default auto.
    #[arg(long, value_name = "auto|on|off")]
    pub offload: Option<OffloadMode>,
    /// Accept from each peer only frames whose source MAC is the one in its slot when it came
    /// up: a guard against mistakes and casual spoofing (a peer can still write the region),
    /// which also cuts off hosts bridged behind a peer.
    #[arg(long)]
    pub pin_macs: bool,
    /// Trust the other members' checksums: peers then send frames with the checksum left for
    /// the kernel to fill in (as virtio-net does), this agent hands them to the kernel as they
    /// are, and neither side makes a pass over the bytes for it (measured here with doorbells:
    /// 9-19% more bulk TCP at a tenth less CPU; see bench/README.md). A member that scribbles
    /// on the region then corrupts data undetected: only for members that trust each other.
    /// Needs offloads; peers without it still get complete checksums.
    #[arg(long)]
    pub trust_peer_checksums: bool,
    /// Check the configuration (flags and file) without starting: print the effective
    /// configuration and every problem found (values, conflicts, paths and their permissions,
    /// the device or region); exit 0 if there is none, 1 otherwise.
    #[arg(long)]
    pub check_config: bool,
    /// UNIX socket on which the agent answers `ivnet status` (created mode 0660, removed on
    /// exit); `none` turns it off. Default /run/ivnet/<TAP>.sock.
    #[arg(long, value_name = "PATH|none")]
    pub control_socket: Option<PathBuf>,
}

/// Flags of `ivnet server`.
#[derive(Debug, Clone, Args)]
#[command(
    mut_arg("shm", |a| a.required(true).help("Region file to create (or serve, if it exists), \
        e.g. /dev/shm/ivnet")),
    mut_arg("size", |a| a.help("Size of the region file when it is created: a power of two, \
        since QEMU maps it as a PCI BAR (16M, 64M, 1G; K, M, G are binary; KB, MB, GB are \
        refused). An existing file keeps its size [default: 64M]")),
)]
pub struct ServerArgs {
    /// UNIX socket to listen on (QEMU: -chardev socket,path=PATH,id=ivs).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub region: RegionArgs,
    /// Interrupt vectors (eventfds) per peer; QEMU's -device ivshmem-doorbell,vectors=N must
    /// match. ivnet uses vector 0 for link changes and 1 for data.
    #[arg(long, value_name = "N", default_value_t = crate::server::DEFAULT_VECTORS)]
    pub vectors: u32,
    /// A client must have read its whole setup within this time or it is disconnected, in ms
    /// (QEMU reads it at once; afterwards clients may stay silent). Default 5000.
    #[arg(long, value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Most clients at once. Default: the peer slots (fewer if the descriptor limit is low).
    #[arg(long, value_name = "N")]
    pub max_clients: Option<u32>,
    /// Most clients of one user at once (uid 0 is not limited). Default: peer slots - 1, so no
    /// single user can fill the segment; with libvirt every guest runs under one uid.
    #[arg(long, value_name = "N")]
    pub max_clients_per_uid: Option<u32>,
    /// Check the flags without starting: print the effective configuration and every problem
    /// found (values, the socket's and the region's paths and permissions, an existing
    /// region's size and geometry); exit 0 if there is none, 1 otherwise.
    #[arg(long)]
    pub check_config: bool,
}

impl ServerArgs {
    /// The client limits these flags ask for.
    pub fn limits(&self) -> crate::server::Limits {
        let d = crate::server::Limits::default();
        crate::server::Limits {
            handshake_timeout: self
                .handshake_timeout_ms
                .map_or(d.handshake_timeout, Duration::from_millis),
            max_clients: self.max_clients,
            max_clients_per_uid: self.max_clients_per_uid,
        }
    }

    /// Checks the flags and builds the server configuration.
    pub fn to_config(&self) -> Result<crate::server::ServerConfig, ConfigError> {
        let Some(shm) = self.region.shm.clone() else {
            return Err(invalid(
                "shm",
                "the server needs --shm PATH (the region file to create or serve)",
            ));
        };
        let size = self.region.size.map_or(DEFAULT_SERVER_SIZE, |s| s.0);
        if !size.is_power_of_two() {
            let (lo, hi) = (1u64 << (63 - size.leading_zeros()), size.next_power_of_two());
            return Err(invalid(
                "size",
                format!(
                    "{} is not a power of two, which QEMU's ivshmem needs (the region is a PCI \
                     BAR): use {} or {}",
                    ByteSize(size),
                    ByteSize(lo),
                    ByteSize(hi)
                ),
            ));
        }
        let max_vectors = crate::server::protocol::MAX_VECTORS;
        if !(1..=max_vectors).contains(&self.vectors) {
            return Err(invalid(
                "vectors",
                format!("{} is out of range: use 1..={max_vectors}", self.vectors),
            ));
        }
        Ok(crate::server::ServerConfig {
            socket: self.socket.clone(),
            shm,
            size: Some(size),
            vectors: self.vectors,
            geometry: self.region.geometry(),
            max_queue: 4096,
            mode: self.region.create_mode(None, None)?,
            limits: self.limits(),
        })
    }
}

impl ServerArgs {
    /// The effective server configuration as TOML-style lines (`ivnet server --check-config`).
    pub fn to_toml(&self, cfg: &crate::server::ServerConfig) -> String {
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut lines = vec![
            ("socket", q(&cfg.socket), "flag"),
            ("shm", q(&cfg.shm), "flag"),
            (
                "size",
                format!("{:?}", ByteSize(cfg.size.unwrap_or(DEFAULT_SERVER_SIZE)).to_string()),
                if self.region.size.is_some() { "flag" } else { "default" },
            ),
            ("vectors", cfg.vectors.to_string(), "flag or default"),
        ];
        for (key, v) in geometry_keys(&cfg.geometry) {
            lines.push((key, v.to_string(), "flag"));
        }
        lines.into_iter().map(|(k, v, o)| format!("{:<40} # {o}\n", format!("{k} = {v}"))).collect()
    }
}

/// The geometry values given, under their keys in the configuration file.
fn geometry_keys(g: &GeometryRequest) -> impl Iterator<Item = (&'static str, u32)> {
    [
        ("max-peers", g.max_peers),
        ("slots", g.ring_slots),
        ("slot-size", g.slot_size),
        ("segment-mtu", g.mtu),
    ]
    .into_iter()
    .filter_map(|(key, v)| v.map(|v| (key, v)))
}

/// Size of a region the server creates when no --size is given.
pub const DEFAULT_SERVER_SIZE: u64 = 64 << 20;

impl RegionArgs {
    /// The geometry these flags ask for.
    pub fn geometry(&self) -> GeometryRequest {
        GeometryRequest {
            max_peers: self.max_peers,
            ring_slots: self.slots,
            slot_size: self.slot_size,
            mtu: self.segment_mtu,
        }
    }
}

/// The keys the configuration file may hold, each with where its value was written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    shm: Option<Spanned<PathBuf>>,
    size: Option<Spanned<String>>,
    max_peers: Option<Spanned<u32>>,
    slots: Option<Spanned<u32>>,
    slot_size: Option<Spanned<u32>>,
    segment_mtu: Option<Spanned<u32>>,
    peer_id: Option<Spanned<u32>>,
    tap: Option<Spanned<String>>,
    mtu: Option<Spanned<u32>>,
    mac: Option<Spanned<String>>,
    address: Option<Spanned<Vec<String>>>,
    poll_us: Option<Spanned<u64>>,
    poll_idle_us: Option<Spanned<u64>>,
    link_timeout_ms: Option<Spanned<u64>>,
    socket: Option<Spanned<PathBuf>>,
    spin_us: Option<Spanned<u64>>,
    device: Option<Spanned<String>>,
    bind: Option<Spanned<bool>>,
    offload: Option<Spanned<String>>,
    pin_macs: Option<Spanned<bool>>,
    trust_peer_checksums: Option<Spanned<bool>>,
    mode: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    control_socket: Option<Spanned<PathBuf>>,
}

/// The keys of the configuration file, as an error about an unknown key lists them.
pub const FILE_KEYS: &[&str] = &[
    "shm",
    "size",
    "socket",
    "device",
    "bind",
    "peer-id",
    "tap",
    "mtu",
    "mac",
    "address",
    "poll-us",
    "poll-idle-us",
    "spin-us",
    "link-timeout-ms",
    "offload",
    "pin-macs",
    "trust-peer-checksums",
    "mode",
    "group",
    "control-socket",
    "max-peers",
    "slots",
    "slot-size",
    "segment-mtu",
];

/// A configuration file as read: its keys, and its text for line numbers.
struct LoadedFile {
    path: PathBuf,
    text: String,
    keys: FileConfig,
}

impl LoadedFile {
    /// The 1-based line of byte offset `at`.
    fn line(&self, at: usize) -> usize {
        line_of(&self.text, at)
    }
}

fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag,
    /// The configuration file, at this line.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// Nobody set it.
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag => f.write_str("flag"),
            Origin::File { path, line } => write!(f, "{} line {line}", path.display()),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// How the agent reaches its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// A shared file.
    File {
        /// Path.
        path: PathBuf,
        /// Size to create it with.
        size: Option<u64>,
    },
    /// The doorbell server on a UNIX socket.
    Server {
        /// Socket path.
        socket: PathBuf,
    },
    /// The ivshmem PCI device (in a VM).
    Pci {
        /// Which device.
        spec: crate::backend::pci::DeviceSpec,
        /// Bind it to vfio-pci if needed.
        bind: bool,
    },
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the region is.
    pub backend: BackendChoice,
    /// Geometry wishes.
    pub geometry: GeometryRequest,
    /// Requested peer id.
    pub peer_id: Option<u32>,
    /// TAP name.
    pub tap: String,
    /// TAP MTU.
    pub mtu: u32,
    /// TAP MAC (None: derived from /etc/machine-id and the TAP name, else from the peer id).
    pub mac: Option<Mac>,
    /// Addresses for the TAP.
    pub addresses: Vec<Cidr>,
    /// Poll interval without doorbells.
    pub poll: Duration,
    /// Longest poll interval when idle.
    pub poll_idle: Duration,
    /// Link timeout.
    pub link_timeout: Duration,
    /// Busy-poll window after activity (doorbell backends).
    pub spin: Duration,
    /// Offloads on the TAP.
    pub offload: OffloadMode,
    /// Drop frames whose source MAC is not their sender's own.
    pub pin_macs: bool,
    /// Take partial checksums from peers unverified (see `AgentArgs::trust_peer_checksums`).
    pub trust_peer_checksums: bool,
    /// Mode and group of a region file the agent creates.
    pub create_mode: CreateMode,
    /// Where each key's value came from (keys as in the file), for `--check-config`.
    pub origins: Vec<(&'static str, Origin)>,
    /// The control socket (`None`: the default for the TAP name; `none`: off).
    pub control_socket: Option<PathBuf>,
}

/// Default spin window in µs (see bench/README.md for the measurement behind it).
pub const DEFAULT_SPIN_US: u64 = 100;

/// Default TAP name.
pub const DEFAULT_TAP: &str = "tap-shm";
/// Default TAP MTU.
pub const DEFAULT_MTU: u32 = 1500;
/// Default poll interval in µs.
pub const DEFAULT_POLL_US: u64 = 100;
/// Default idle poll interval in µs.
pub const DEFAULT_POLL_IDLE_US: u64 = 2000;
/// Default link timeout in ms.
pub const DEFAULT_LINK_TIMEOUT_MS: u64 = 1000;

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// The file to read: the one given, else the default one if it exists, else none.
fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None if Path::new(DEFAULT_CONFIG).exists() => Some(PathBuf::from(DEFAULT_CONFIG)),
        None => None,
    }
}

fn load_file(explicit: Option<&Path>) -> Result<Option<LoadedFile>, ConfigError> {
    let Some(path) = config_path(explicit) else { return Ok(None) };
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    parse_file(path, text).map(Some)
}

fn parse_file(path: PathBuf, text: String) -> Result<LoadedFile, ConfigError> {
    match toml::from_str::<FileConfig>(&text) {
        Ok(keys) => {
            let file = LoadedFile { path, text, keys };
            check_file_conflicts(&file)?;
            Ok(file)
        }
        Err(e) => {
            let line = e.span().map_or(1, |s| line_of(&text, s.start));
            let message = e.message().trim().lines().collect::<Vec<_>>().join("; ");
            // serde: "unknown field `bogus`, expected one of `shm`, `size`, ..."
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let key = rest.split('`').next().unwrap_or(rest).to_string();
                return Err(ConfigError::InFile {
                    path,
                    line,
                    key,
                    message: format!("unknown key; the keys are {}", FILE_KEYS.join(", ")),
                });
            }
            // A bad value: name the key written on that line, if it is one of ours.
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim().to_string())
                .filter(|k| FILE_KEYS.contains(&k.as_str()));
            match key {
                Some(key) => Err(ConfigError::InFile { path, line, key, message }),
                None => Err(ConfigError::Parse { path, line, message }),
            }
        }
    }
}

/// The file alone must make sense: at most one way to reach the region, and `size`/`bind`/
/// `peer-id` only with the backend they belong to.
fn check_file_conflicts(f: &LoadedFile) -> Result<(), ConfigError> {
    let k = &f.keys;
    let at = |key: &str, span: std::ops::Range<usize>, message: String| ConfigError::InFile {
        path: f.path.clone(),
        line: f.line(span.start),
        key: key.to_string(),
        message,
    };
    let backends: Vec<(&str, std::ops::Range<usize>)> = [
        ("shm", k.shm.as_ref().map(Spanned::span)),
        ("socket", k.socket.as_ref().map(Spanned::span)),
        ("device", k.device.as_ref().map(Spanned::span)),
    ]
    .into_iter()
    .filter_map(|(key, span)| span.map(|s| (key, s)))
    .collect();
    // Report the one written later, naming the earlier one.
    let mut backends = backends;
    backends.sort_by_key(|(_, span)| span.start);
    if let [(first, first_span), (second, second_span), ..] = backends.as_slice() {
        return Err(at(
            second,
            second_span.clone(),
            format!(
                "conflicts with {first} (line {}): give exactly one of shm, socket and device \
                 (comment out the others)",
                f.line(first_span.start)
            ),
        ));
    }
    let backend = backends.first().map(|(key, _)| *key);
    if let (Some(size), Some(b)) = (&k.size, backend.filter(|b| *b != "shm")) {
        return Err(at("size", size.span(), format!("only used with shm, not with {b}")));
    }
    if let (Some(bind), Some(b)) = (&k.bind, backend.filter(|b| *b != "device")) {
        if *bind.get_ref() {
            return Err(at("bind", bind.span(), format!("only used with device, not with {b}")));
        }
    }
    if let (Some(id), Some(b)) = (&k.peer_id, backend.filter(|b| *b != "shm")) {
        return Err(at(
            "peer-id",
            id.span(),
            format!("only used with shm: with {b} the peer id is assigned"),
        ));
    }
    Ok(())
}

/// Merges one key at a time (flag over file over default) and remembers where each value came
/// from, so that a bad value is reported where it was written.
struct Merge<'f> {
    file: Option<&'f LoadedFile>,
    origins: Vec<(&'static str, Origin)>,
}

impl<'f> Merge<'f> {
    fn origin(&self, key: &str) -> Origin {
        self.origins.iter().find(|(k, _)| *k == key).map_or(Origin::Default, |(_, o)| o.clone())
    }

    fn record(&mut self, key: &'static str, origin: Origin) {
        self.origins.retain(|(k, _)| *k != key);
        self.origins.push((key, origin));
    }

    fn record_file<T>(&mut self, key: &'static str, v: &Spanned<T>) {
        let file = self.file.expect("a value from the file implies a file");
        let origin = Origin::File { path: file.path.clone(), line: file.line(v.span().start) };
        self.record(key, origin);
    }

    /// The flag's value, else the file's, else None.
    fn pick<T: Clone>(
        &mut self,
        key: &'static str,
        flag: Option<T>,
        file: Option<&Spanned<T>>,
    ) -> Option<T> {
        if let Some(v) = flag {
            self.record(key, Origin::Flag);
            return Some(v);
        }
        if let Some(v) = file {
            self.record_file(key, v);
            return Some(v.get_ref().clone());
        }
        self.record(key, Origin::Default);
        None
    }

    /// As [`Merge::pick`], parsing the file's text with `parse`.
    fn pick_parsed<T>(
        &mut self,
        key: &'static str,
        flag: Option<T>,
        file: Option<&Spanned<String>>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match (flag, file) {
            (Some(v), _) => {
                self.record(key, Origin::Flag);
                Ok(Some(v))
            }
            (None, Some(s)) => {
                self.record_file(key, s);
                parse(s.get_ref()).map(Some).map_err(|m| self.invalid(key, m))
            }
            (None, None) => {
                self.record(key, Origin::Default);
                Ok(None)
            }
        }
    }

    /// An error about `key`, at the line of the file that set it if the file did.
    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        match self.origin(key) {
            Origin::File { path, line } => {
                ConfigError::InFile { path, line, key: key.to_string(), message: message.into() }
            }
            _ => invalid(key, message),
        }
    }
}

impl AgentConfig {
    /// Merges flags over the configuration file and checks every value.
    pub fn from_args(args: &AgentArgs) -> Result<Self, ConfigError> {
        let loaded = load_file(args.config.as_deref())?;
        let empty = FileConfig::default();
        let file = loaded.as_ref().map_or(&empty, |l| &l.keys);
        let mut m = Merge { file: loaded.as_ref(), origins: Vec::new() };
        let r = &args.region;
        // A backend flag replaces the file's backend, and with it the file's keys that belong
        // to another backend (size and peer-id go with shm, bind with device).
        let flag_backend = args.device.is_some() || args.socket.is_some() || r.shm.is_some();
        let file_keeps = |backend_key: bool| !flag_backend || backend_key;
        let size = m.pick_parsed(
            "size",
            r.size,
            file.size.as_ref().filter(|_| file_keeps(r.shm.is_some())),
            |s| s.parse::<ByteSize>(),
        )?;
        let (device, socket, shm) = if flag_backend {
            (
                m.pick("device", args.device.clone(), None),
                m.pick("socket", args.socket.clone(), None),
                m.pick("shm", r.shm.clone(), None),
            )
        } else {
            (
                m.pick_parsed("device", None, file.device.as_ref(), |s| s.parse())?,
                m.pick("socket", None, file.socket.as_ref()),
                m.pick("shm", None, file.shm.as_ref()),
            )
        };
        let file_bind = file.bind.as_ref().filter(|_| file_keeps(args.device.is_some()));
        let bind = m.pick("bind", args.bind.then_some(true), file_bind).unwrap_or(false);
        let backend = match (device, socket, shm) {
            (Some(spec), _, _) => BackendChoice::Pci { spec, bind },
            (None, Some(socket), _) => BackendChoice::Server { socket },
            (None, None, Some(path)) => BackendChoice::File { path, size: size.map(|s| s.0) },
            (None, None, None) => {
                return Err(ConfigError::NoBackend {
                    more: ", --socket PATH (a doorbell server) or --device auto (the ivshmem PCI \
                           device in a VM), on the command line or in the configuration file",
                });
            }
        };
        let file_peer_id = file.peer_id.as_ref().filter(|_| file_keeps(r.shm.is_some()));
        let peer_id = m.pick("peer-id", args.peer_id, file_peer_id);
        match &backend {
            BackendChoice::File { .. } => {}
            other => {
                let what =
                    if matches!(other, BackendChoice::Pci { .. }) { "device" } else { "socket" };
                if size.is_some() {
                    return Err(m.invalid("size", format!("only used with shm, not with {what}")));
                }
                if peer_id.is_some() {
                    return Err(m.invalid(
                        "peer-id",
                        format!("only used with shm: with {what} the peer id is assigned"),
                    ));
                }
            }
        }
        if bind && !matches!(backend, BackendChoice::Pci { .. }) {
            return Err(m.invalid("bind", "only used with device"));
        }
        let create_mode = r.create_mode(
            file.mode.as_ref().map(|s| s.get_ref().as_str()),
            file.group.as_ref().map(|s| s.get_ref().as_str()),
        )?;
        let geometry = GeometryRequest {
            max_peers: m.pick("max-peers", r.max_peers, file.max_peers.as_ref()),
            ring_slots: m.pick("slots", r.slots, file.slots.as_ref()),
            slot_size: m.pick("slot-size", r.slot_size, file.slot_size.as_ref()),
            mtu: m.pick("segment-mtu", r.segment_mtu, file.segment_mtu.as_ref()),
        };
        let spin_us =
            m.pick("spin-us", args.spin_us, file.spin_us.as_ref()).unwrap_or(DEFAULT_SPIN_US);
        if spin_us > 1_000_000 {
            return Err(m.invalid("spin-us", format!("{spin_us} is out of range: use 0..=1000000")));
        }
        let tap = m
            .pick("tap", args.tap.clone(), file.tap.as_ref())
            .unwrap_or_else(|| DEFAULT_TAP.into());
        crate::agent::tap::validate_name(&tap).map_err(|e| m.invalid("tap", e.to_string()))?;
        let mtu = m.pick("mtu", args.mtu, file.mtu.as_ref()).unwrap_or(DEFAULT_MTU);
        if !(68..=65521).contains(&mtu) {
            return Err(m.invalid("mtu", format!("{mtu} is out of range: use 68..=65521")));
        }
        let mac = m.pick_parsed("mac", args.mac, file.mac.as_ref(), |s| {
            s.parse::<Mac>().map_err(|e| e.to_string())
        })?;
        let addresses = if !args.address.is_empty() {
            m.record("address", Origin::Flag);
            args.address.clone()
        } else {
            match m.pick("address", None, file.address.as_ref()) {
                Some(list) => list
                    .iter()
                    .map(|s| s.parse::<Cidr>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| m.invalid("address", e))?,
                None => Vec::new(),
            }
        };
        let poll_us =
            m.pick("poll-us", args.poll_us, file.poll_us.as_ref()).unwrap_or(DEFAULT_POLL_US);
        if !(1..=1_000_000).contains(&poll_us) {
            return Err(m.invalid("poll-us", format!("{poll_us} is out of range: use 1..=1000000")));
        }
        let poll_idle_us = m
            .pick("poll-idle-us", args.poll_idle_us, file.poll_idle_us.as_ref())
            .unwrap_or(DEFAULT_POLL_IDLE_US);
        if !(1..=1_000_000).contains(&poll_idle_us) {
            return Err(m.invalid(
                "poll-idle-us",
                format!("{poll_idle_us} is out of range: use 1..=1000000"),
            ));
        }
        let timeout_ms = m
            .pick("link-timeout-ms", args.link_timeout_ms, file.link_timeout_ms.as_ref())
            .unwrap_or(DEFAULT_LINK_TIMEOUT_MS);
        if !(50..=600_000).contains(&timeout_ms) {
            return Err(m.invalid(
                "link-timeout-ms",
                format!("{timeout_ms} is out of range: use 50..=600000"),
            ));
        }
        let offload = m
            .pick_parsed("offload", args.offload, file.offload.as_ref(), |s| s.parse())?
            .unwrap_or_default();
        let pin_macs = m
            .pick("pin-macs", args.pin_macs.then_some(true), file.pin_macs.as_ref())
            .unwrap_or(false);
        let trust_peer_checksums = m
            .pick(
                "trust-peer-checksums",
                args.trust_peer_checksums.then_some(true),
                file.trust_peer_checksums.as_ref(),
            )
            .unwrap_or(false);
        Ok(AgentConfig {
            offload,
            pin_macs,
            trust_peer_checksums,
            control_socket: m.pick(
                "control-socket",
                args.control_socket.clone(),
                file.control_socket.as_ref(),
            ),
            backend,
            geometry,
            peer_id,
            tap,
            mtu,
            mac,
            addresses,
            poll: Duration::from_micros(poll_us),
            poll_idle: Duration::from_micros(poll_idle_us),
            link_timeout: Duration::from_millis(timeout_ms),
            spin: Duration::from_micros(spin_us),
            create_mode,
            origins: m.origins,
        })
    }

    /// Where `key`'s value came from.
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.iter().find(|(k, _)| *k == key).map_or(Origin::Default, |(_, o)| o.clone())
    }

    /// The effective configuration as a configuration file, each key with where its value came
    /// from (`ivnet agent --check-config` prints it).
    pub fn to_toml(&self) -> String {
        let q = |s: &str| format!("{s:?}");
        let mut lines: Vec<(&str, String)> = Vec::new();
        match &self.backend {
            BackendChoice::File { path, size } => {
                lines.push(("shm", q(&path.display().to_string())));
                if let Some(s) = size {
                    lines.push(("size", q(&ByteSize(*s).to_string())));
                }
            }
            BackendChoice::Server { socket } => {
                lines.push(("socket", q(&socket.display().to_string())));
            }
            BackendChoice::Pci { spec, bind } => {
                let d = match spec {
                    crate::backend::pci::DeviceSpec::Auto => "auto".to_string(),
                    crate::backend::pci::DeviceSpec::Address(a) => a.clone(),
                };
                lines.push(("device", q(&d)));
                lines.push(("bind", bind.to_string()));
            }
        }
        if let Some(id) = self.peer_id {
            lines.push(("peer-id", id.to_string()));
        }
        lines.push(("tap", q(&self.tap)));
        lines.push(("mtu", self.mtu.to_string()));
        if let Some(mac) = self.mac {
            lines.push(("mac", q(&mac.to_string())));
        }
        let addrs: Vec<String> = self.addresses.iter().map(|a| q(&a.to_string())).collect();
        lines.push(("address", format!("[{}]", addrs.join(", "))));
        lines.push(("poll-us", self.poll.as_micros().to_string()));
        lines.push(("poll-idle-us", self.poll_idle.as_micros().to_string()));
        lines.push(("spin-us", self.spin.as_micros().to_string()));
        lines.push(("link-timeout-ms", self.link_timeout.as_millis().to_string()));
        lines.push(("offload", q(&self.offload.to_string())));
        lines.push(("pin-macs", self.pin_macs.to_string()));
        lines.push(("trust-peer-checksums", self.trust_peer_checksums.to_string()));
        for (key, v) in geometry_keys(&self.geometry) {
            lines.push((key, v.to_string()));
        }
        let mut out = String::new();
        for (key, value) in lines {
            let line = format!("{key} = {value}");
            out.push_str(&format!("{line:<40} # {}\n", self.origin(key)));
        }
        if self.mac.is_none() {
            out.push_str(
                "# mac: derived from /etc/machine-id and the TAP name (the peer id's MAC if \
                 another member has it)\n",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sizes_parse_with_binary_units() {
        assert_eq!("65536".parse::<ByteSize>(), Ok(ByteSize(65536)));
        assert_eq!("64M".parse::<ByteSize>(), Ok(ByteSize(64 << 20)));
        assert_eq!("1GiB".parse::<ByteSize>(), Ok(ByteSize(1 << 30)));
        assert!("12X".parse::<ByteSize>().is_err());
        assert!("M".parse::<ByteSize>().is_err());
        let e = "64MB".parse::<ByteSize>().unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("64M"), "{e}");
        assert!("1gb".parse::<ByteSize>().is_err());
    }

    #[test]
    fn test_sizes_print_in_their_shortest_exact_form() {
        for (n, s) in [(64 << 20, "64M"), (1 << 30, "1G"), (1536 << 10, "1536K"), (1000, "1000")] {
            assert_eq!(ByteSize(n).to_string(), s);
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)));
        }
    }

    #[test]
    fn test_cidrs_parse_v4_and_v6() {
        let c: Cidr = "10.0.0.1/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.1/24");
        assert!("fd00::1/64".parse::<Cidr>().is_ok());
        assert!("10.0.0.1".parse::<Cidr>().is_err());
        assert!("10.0.0.1/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn test_file_values_apply_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("ivnet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ivnet.toml");
        std::fs::write(
            &f,
            "shm = \"/dev/shm/x\"\nmtu = 9000\naddress = [\"10.1.0.1/24\"]\ntap = \"from-file\"\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(f.clone()),
            tap: Some("from-flag".into()),
            ..Default::default()
        };
        let c = AgentConfig::from_args(&args).unwrap();
        assert_eq!(c.mtu, 9000);
        assert_eq!(c.tap, "from-flag");
        assert_eq!(c.addresses.len(), 1);
        std::fs::write(&f, "shm = \"/dev/shm/x\"\nbogus = 1\n").unwrap();
        let e = AgentConfig::from_args(&args).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Writes `text` to a scratch file; returns its path (removed by the caller's `Scratch`).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, text: &str) -> Scratch {
            let p =
                std::env::temp_dir().join(format!("ivnet-cfg-{}-{name}.toml", std::process::id()));
            std::fs::write(&p, text).unwrap();
            Scratch(p)
        }

        fn args(&self) -> AgentArgs {
            AgentArgs { config: Some(self.0.clone()), ..Default::default() }
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn test_shipped_example_configurations_parse() {
        let guest = Scratch::new("guest", include_str!("../config/ivnet.toml"));
        let c = AgentConfig::from_args(&guest.args()).expect("config/ivnet.toml is valid");
        assert!(matches!(c.backend, BackendChoice::Pci { bind: true, .. }));
        assert_eq!((c.tap.as_str(), c.mtu), ("tap-shm", 1500));
        assert!(
            matches!(c.origin("device"), Origin::File { line: 9, .. }),
            "{:?}",
            c.origin("device")
        );
        let host = Scratch::new("host", include_str!("../config/ivnet-host.toml"));
        let c = AgentConfig::from_args(&host.args()).expect("config/ivnet-host.toml is valid");
        assert_eq!(c.backend, BackendChoice::Server { socket: "/run/ivnet/ivnet.sock".into() });
    }

    #[test]
    fn test_unknown_keys_are_named_with_their_line_and_the_keys_allowed() {
        let f = Scratch::new("unknown", "shm = \"/dev/shm/x\"\n\n  tapp = \"x\"\n");
        let e = AgentConfig::from_args(&f.args()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(&e, ConfigError::InFile { line: 3, key, .. } if key == "tapp"), "{msg}");
        for k in FILE_KEYS {
            assert!(msg.contains(k), "{msg} does not list {k}");
        }
    }

    #[test]
    fn test_bad_values_in_the_file_name_key_and_line() {
        for (text, key, line) in [
            ("shm = \"/x\"\nmtu = 70000\n", "mtu", 2),
            ("shm = \"/x\"\n\nmtu = \"big\"\n", "mtu", 3),
            ("address = [\"10.0.0.1\"]\nshm = \"/x\"\n", "address", 1),
            ("shm = \"/x\"\nsize = \"64MB\"\n", "size", 2),
            ("shm = \"/x\"\nmac = \"01:00:5e:00:00:01\"\n", "mac", 2),
            ("shm = \"/x\"\noffload = \"maybe\"\n", "offload", 2),
            ("shm = \"/x\"\ntap = \"a-name-longer-than-15\"\n", "tap", 2),
            ("shm = \"/x\"\nlink-timeout-ms = 1\n", "link-timeout-ms", 2),
        ] {
            let f = Scratch::new("value", text);
            let e = AgentConfig::from_args(&f.args()).unwrap_err();
            assert!(
                matches!(&e, ConfigError::InFile { line: l, key: k, .. } if *l == line && k == key),
                "{text:?}: {e}"
            );
            assert!(e.to_string().contains(&format!("line {line}: {key}: ")), "{e}");
        }
    }

    #[test]
    fn test_the_file_gives_exactly_one_backend_and_its_own_keys() {
        for (text, key, what) in [
            ("shm = \"/x\"\ndevice = \"auto\"\n", "device", "conflicts with shm (line 1)"),
            ("socket = \"/s\"\nshm = \"/x\"\n", "shm", "exactly one of shm, socket and device"),
            ("socket = \"/s\"\nsize = \"64M\"\n", "size", "only used with shm"),
            ("shm = \"/x\"\nbind = true\n", "bind", "only used with device"),
            ("device = \"auto\"\npeer-id = 2\n", "peer-id", "assigned"),
        ] {
            let f = Scratch::new("conflict", text);
            let e = AgentConfig::from_args(&f.args()).unwrap_err();
            assert!(matches!(&e, ConfigError::InFile { key: k, .. } if k == key), "{text:?}: {e}");
            assert!(e.to_string().contains(what), "{text:?}: {e}");
        }
        // Flags: a backend flag replaces the file's, with the file's keys of that backend; the
        // flags' own keys must fit it.
        let f = Scratch::new("replace", "device = \"auto\"\nbind = true\n");
        let c =
            AgentConfig::from_args(&AgentArgs { socket: Some("/s".into()), ..f.args() }).unwrap();
        assert_eq!(c.backend, BackendChoice::Server { socket: "/s".into() });
        let f = Scratch::new("replace1", "shm = \"/x\"\nsize = \"16M\"\npeer-id = 3\n");
        let args = AgentArgs {
            region: RegionArgs { shm: Some("/y".into()), ..Default::default() },
            ..f.args()
        };
        let c = AgentConfig::from_args(&args).unwrap();
        assert_eq!(c.backend, BackendChoice::File { path: "/y".into(), size: Some(16 << 20) });
        assert_eq!(c.peer_id, Some(3));
        let f = Scratch::new("replace2", "device = \"auto\"\nmtu = 9000\n");
        let c =
            AgentConfig::from_args(&AgentArgs { socket: Some("/s".into()), ..f.args() }).unwrap();
        assert_eq!((c.backend, c.mtu), (BackendChoice::Server { socket: "/s".into() }, 9000));
        let e = AgentConfig::from_args(&AgentArgs {
            socket: Some("/s".into()),
            region: RegionArgs { size: Some(ByteSize(1 << 26)), ..Default::default() },
            config: Some("/dev/null".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("size: only used with shm"), "{e}");
    }

    #[test]
    fn test_effective_configuration_reads_back_as_the_same() {
        let f = Scratch::new(
            "effective",
            "shm = \"/dev/shm/x\"\nsize = \"16M\"\nmtu = 9000\naddress = [\"10.1.0.1/24\"]\n",
        );
        let args = AgentArgs { tap: Some("from-flag".into()), pin_macs: true, ..f.args() };
        let c = AgentConfig::from_args(&args).unwrap();
        let text = c.to_toml();
        assert!(text.contains("mtu = 9000") && text.contains("line 3"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("tap = ") && l.ends_with("# flag")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("poll-us") && l.ends_with("# default")));
        let again = Scratch::new("again", &text);
        let d = AgentConfig::from_args(&again.args()).expect("the effective configuration parses");
        assert_eq!(
            format!("{:?}", (&c.backend, &c.tap, c.mtu, &c.addresses, c.poll, c.pin_macs)),
            format!("{:?}", (&d.backend, &d.tap, d.mtu, &d.addresses, d.poll, d.pin_macs))
        );
    }

    #[test]
    fn test_server_sizes_must_be_powers_of_two() {
        let args = |size: Option<u64>, vectors: u32| ServerArgs {
            socket: "/run/ivnet/ivnet.sock".into(),
            region: RegionArgs {
                shm: Some("/dev/shm/x".into()),
                size: size.map(ByteSize),
                ..Default::default()
            },
            vectors,
            check_config: false,
            handshake_timeout_ms: None,
            max_clients: None,
            max_clients_per_uid: None,
        };
        assert_eq!(args(None, 2).to_config().unwrap().size, Some(DEFAULT_SERVER_SIZE));
        let e = args(Some(48 << 20), 2).to_config().unwrap_err().to_string();
        assert!(e.contains("48M is not a power of two") && e.contains("32M or 64M"), "{e}");
        let e = args(None, 0).to_config().unwrap_err().to_string();
        assert!(e.starts_with("vectors: 0 is out of range"), "{e}");
    }

    #[test]
    fn test_bad_values_are_refused_with_the_key() {
        let base = AgentArgs {
            region: RegionArgs { shm: Some("/x".into()), ..Default::default() },
            config: Some("/dev/null".into()),
            ..Default::default()
        };
        let e =
            AgentConfig::from_args(&AgentArgs { mtu: Some(70000), ..base.clone() }).unwrap_err();
        assert!(e.to_string().starts_with("mtu: 70000"), "{e}");
        let e = AgentConfig::from_args(&AgentArgs {
            tap: Some("a-name-longer-than-15".into()),
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("tap:"), "{e}");
        let e = AgentConfig::from_args(&AgentArgs {
            config: Some("/dev/null".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::NoBackend { .. }));
    }
}
