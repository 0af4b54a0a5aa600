//! Command-line flags and the TOML file (`/etc/ivnet/ivnet.toml`) -> one validated configuration.
//!
//! Flags win over the file; the file wins over the defaults. Every key of the file has the
//! flag's name (`peer-id = 1`, `address = ["10.0.0.1/24"]`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::agent::tap::OffloadMode;
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
    /// The file is not valid TOML or has unknown keys.
    #[error("configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
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

/// A byte size written as `65536`, `64K`, `16M`, `1G` (binary multiples; `MiB` etc. also accepted).
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
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => return Err(format!("{s:?} has an unknown unit: use K, M or G")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
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
    /// Size of the region file when it is created (e.g. 64M). An existing file keeps its size.
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
}

/// Flags of `ivnet agent`.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// Configuration file (TOML, keys named like the flags). Default: /etc/ivnet/ivnet.toml
    /// if it exists.
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
    /// MAC address of the TAP. Default: 02:69:76:6e:HH:LL from the peer id (stable).
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
    /// With doorbells: keep polling this long after the last activity before sleeping on the
    /// doorbell, in µs (0: never spin, sleep at once). Default 100.
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
    /// UNIX socket on which the agent answers `ivnet status` (created mode 0660, removed on
    /// exit); `none` turns it off. Default /run/ivnet/<TAP>.sock.
    #[arg(long, value_name = "PATH|none")]
    pub control_socket: Option<PathBuf>,
}

/// Flags of `ivnet server`.
#[derive(Debug, Clone, Args)]
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
}

impl ServerArgs {
    /// Checks the flags and builds the server configuration.
    pub fn to_config(&self) -> Result<crate::server::ServerConfig, ConfigError> {
        let Some(shm) = self.region.shm.clone() else {
            return Err(invalid(
                "shm",
                "the server needs --shm PATH (the region file to create or serve)",
            ));
        };
        Ok(crate::server::ServerConfig {
            socket: self.socket.clone(),
            shm,
            size: self.region.size.map(|s| s.0).or(Some(DEFAULT_SERVER_SIZE)),
            vectors: self.vectors,
            geometry: self.region.geometry(),
            max_queue: 4096,
        })
    }
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

/// The keys the configuration file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    shm: Option<PathBuf>,
    size: Option<String>,
    max_peers: Option<u32>,
    slots: Option<u32>,
    slot_size: Option<u32>,
    segment_mtu: Option<u32>,
    peer_id: Option<u32>,
    tap: Option<String>,
    mtu: Option<u32>,
    mac: Option<String>,
    address: Option<Vec<String>>,
    poll_us: Option<u64>,
    poll_idle_us: Option<u64>,
    link_timeout_ms: Option<u64>,
    socket: Option<PathBuf>,
    spin_us: Option<u64>,
    device: Option<String>,
    bind: Option<bool>,
    offload: Option<String>,
    pin_macs: Option<bool>,
    control_socket: Option<PathBuf>,
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
    /// TAP MAC (None: derived from the peer id).
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

fn load_file(explicit: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok(FileConfig::default()),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path, message: e.message().to_string() })
}

impl AgentConfig {
    /// Merges flags over the configuration file and checks every value.
    pub fn from_args(args: &AgentArgs) -> Result<Self, ConfigError> {
        let file = load_file(args.config.as_deref())?;
        let r = &args.region;
        let size = match (&r.size, &file.size) {
            (Some(s), _) => Some(s.0),
            (None, Some(s)) => Some(s.parse::<ByteSize>().map_err(|m| invalid("size", m))?.0),
            (None, None) => None,
        };
        let file_device = match &file.device {
            Some(d) => Some(d.parse().map_err(|m: String| invalid("device", m))?),
            None => None,
        };
        let bind = args.bind || file.bind.unwrap_or(false);
        let backend = if let Some(spec) = args.device.clone() {
            BackendChoice::Pci { spec, bind }
        } else if let Some(socket) = args.socket.clone() {
            BackendChoice::Server { socket }
        } else if let Some(path) = r.shm.clone() {
            BackendChoice::File { path, size }
        } else if let Some(spec) = file_device {
            BackendChoice::Pci { spec, bind }
        } else if let Some(socket) = file.socket {
            BackendChoice::Server { socket }
        } else if let Some(path) = file.shm {
            BackendChoice::File { path, size }
        } else {
            return Err(ConfigError::NoBackend {
                more: ", --socket PATH (a doorbell server) or --device auto (the ivshmem PCI device in a VM)",
            });
        };
        let geometry = GeometryRequest {
            max_peers: r.max_peers.or(file.max_peers),
            ring_slots: r.slots.or(file.slots),
            slot_size: r.slot_size.or(file.slot_size),
            mtu: r.segment_mtu.or(file.segment_mtu),
        };
        let spin_us = args.spin_us.or(file.spin_us).unwrap_or(DEFAULT_SPIN_US);
        if spin_us > 1_000_000 {
            return Err(invalid("spin-us", format!("{spin_us} is out of range: use 0..=1000000")));
        }
        let tap = args.tap.clone().or(file.tap).unwrap_or_else(|| DEFAULT_TAP.into());
        crate::agent::tap::validate_name(&tap).map_err(|e| invalid("tap", e.to_string()))?;
        let mtu = args.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU);
        if !(68..=65521).contains(&mtu) {
            return Err(invalid("mtu", format!("{mtu} is out of range: use 68..=65521")));
        }
        let mac = match (args.mac, file.mac) {
            (Some(m), _) => Some(m),
            (None, Some(s)) => Some(s.parse::<Mac>().map_err(|e| invalid("mac", e.to_string()))?),
            (None, None) => None,
        };
        let addresses = if !args.address.is_empty() {
            args.address.clone()
        } else {
            file.address
                .unwrap_or_default()
                .iter()
                .map(|s| s.parse::<Cidr>().map_err(|m| invalid("address", m)))
                .collect::<Result<_, _>>()?
        };
        let poll_us = args.poll_us.or(file.poll_us).unwrap_or(DEFAULT_POLL_US);
        if !(1..=1_000_000).contains(&poll_us) {
            return Err(invalid("poll-us", format!("{poll_us} is out of range: use 1..=1000000")));
        }
        let poll_idle_us = args.poll_idle_us.or(file.poll_idle_us).unwrap_or(DEFAULT_POLL_IDLE_US);
        if !(1..=1_000_000).contains(&poll_idle_us) {
            return Err(invalid(
                "poll-idle-us",
                format!("{poll_idle_us} is out of range: use 1..=1000000"),
            ));
        }
        let timeout_ms =
            args.link_timeout_ms.or(file.link_timeout_ms).unwrap_or(DEFAULT_LINK_TIMEOUT_MS);
        if !(50..=600_000).contains(&timeout_ms) {
            return Err(invalid(
                "link-timeout-ms",
                format!("{timeout_ms} is out of range: use 50..=600000"),
            ));
        }
        let offload = match (args.offload, &file.offload) {
            (Some(m), _) => m,
            (None, Some(s)) => s.parse().map_err(|m| invalid("offload", m))?,
            (None, None) => OffloadMode::default(),
        };
        Ok(AgentConfig {
            offload,
            pin_macs: args.pin_macs || file.pin_macs.unwrap_or(false),
            control_socket: args.control_socket.clone().or(file.control_socket),
            backend,
            geometry,
            peer_id: args.peer_id.or(file.peer_id),
            tap,
            mtu,
            mac,
            addresses,
            poll: Duration::from_micros(poll_us),
            poll_idle: Duration::from_micros(poll_idle_us),
            link_timeout: Duration::from_millis(timeout_ms),
            spin: Duration::from_micros(spin_us),
        })
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

    #[test]
    fn test_shipped_example_configuration_parses() {
        let text = include_str!("../config/ivnet.toml");
        let parsed: FileConfig = toml::from_str(text).expect("config/ivnet.toml must parse");
        assert_eq!(parsed.device.as_deref(), Some("auto"));
        let path = std::env::temp_dir().join(format!("ivnet-example-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let c =
            AgentConfig::from_args(&AgentArgs { config: Some(path.clone()), ..Default::default() });
        std::fs::remove_file(&path).unwrap();
        let c = c.unwrap();
        assert!(matches!(c.backend, BackendChoice::Pci { bind: true, .. }));
        assert_eq!((c.tap.as_str(), c.mtu), ("tap-shm", 1500));
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
