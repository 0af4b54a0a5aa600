//! Finding QEMU's ivshmem PCI device (vendor 1af4, device 1110) in a guest, and binding it to
//! vfio-pci. Shared by the `vfio` and `sysfs` backends.
//!
//! Register layout (QEMU `docs/specs/ivshmem-spec.rst`): BAR0 holds IVPosition (offset 8, the
//! device's peer id when it is an ivshmem-doorbell) and Doorbell (offset 12, write
//! `peer << 16 | vector`); BAR1 holds the MSI-X table (doorbell devices only); BAR2 is the
//! shared memory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// PCI vendor id of ivshmem (Red Hat / Qumranet).
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// PCI device id of ivshmem.
pub const IVSHMEM_DEVICE: u16 = 0x1110;
/// Offset of the IVPosition register in BAR0.
pub const REG_IVPOSITION: u64 = 8;
/// Offset of the Doorbell register in BAR0.
pub const REG_DOORBELL: u64 = 12;

const SYSFS_PCI: &str = "/sys/bus/pci/devices";

/// Which device to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first ivshmem device found.
    Auto,
    /// The device at this PCI address (`0000:00:03.0` or `00:03.0`).
    Address(String),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(DeviceSpec::Auto);
        }
        let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.to_string() };
        let ok = full.len() == 12
            && full.as_bytes()[4] == b':'
            && full.as_bytes()[7] == b':'
            && full.as_bytes()[10] == b'.'
            && full
                .chars()
                .enumerate()
                .all(|(i, c)| [4, 7, 10].contains(&i) || c.is_ascii_hexdigit());
        if !ok {
            return Err(format!("{s:?} is not `auto` or a PCI address like 0000:00:03.0"));
        }
        Ok(DeviceSpec::Address(full.to_ascii_lowercase()))
    }
}

/// Why the device could not be found or prepared.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No ivshmem device present.
    #[error(
        "no ivshmem PCI device (1af4:1110) found under {SYSFS_PCI}: start the VM with \
         -device ivshmem-doorbell,... or -device ivshmem-plain,..."
    )]
    NotFound,
    /// The given address is not an ivshmem device.
    #[error(
        "PCI device {addr} is not an ivshmem device (vendor:device {found}); use --device auto"
    )]
    NotIvshmem {
        /// Address.
        addr: String,
        /// What is there.
        found: String,
    },
    /// The given address does not exist.
    #[error("no PCI device at {0}: check `ls {SYSFS_PCI}` or use --device auto")]
    NoSuchDevice(String),
    /// Reading sysfs failed.
    #[error("cannot read {path}")]
    Sysfs {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The device is not bound to vfio-pci.
    #[error(
        "ivshmem device {addr} is bound to {driver}, not vfio-pci: add --bind, or run\n  \
         modprobe vfio-pci\n  echo vfio-pci > {SYSFS_PCI}/{addr}/driver_override\n  \
         {unbind}echo {addr} > /sys/bus/pci/drivers_probe"
    )]
    NotBound {
        /// Address.
        addr: String,
        /// Current driver ("no driver" if none).
        driver: String,
        /// The unbind command, if a driver holds it.
        unbind: String,
    },
    /// Binding failed.
    #[error("cannot bind {addr} to vfio-pci: {step}")]
    Bind {
        /// Address.
        addr: String,
        /// Which step.
        step: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// No IOMMU group: VFIO cannot take the device.
    #[error(
        "ivshmem device {0} has no IOMMU group, so VFIO cannot use it: give the VM an IOMMU \
         (QEMU -machine q35 -device intel-iommu,intremap=on, guest kernel intel_iommu=on) or load \
         vfio with enable_unsafe_noiommu_mode=1 where the kernel supports it"
    )]
    NoIommuGroup(String),
}

fn read_sysfs(path: &Path) -> Result<String, PciError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| PciError::Sysfs { path: path.into(), source })
}

fn parse_hex_u64(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// One BAR as sysfs describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bar {
    /// Physical start address.
    pub start: u64,
    /// Length in bytes (0: absent).
    pub len: u64,
}

/// An ivshmem device found in sysfs.
#[derive(Debug, Clone)]
pub struct IvshmemDevice {
    /// PCI address (`0000:00:03.0`).
    pub addr: String,
    /// Its sysfs directory.
    pub path: PathBuf,
    /// BAR0 (registers), BAR1 (MSI-X, doorbell devices only), BAR2 (shared memory).
    pub bars: [Bar; 3],
    /// Bound driver, if any.
    pub driver: Option<String>,
}

impl IvshmemDevice {
    /// Whether this is an ivshmem-doorbell (it has an MSI-X BAR; ivshmem-plain has none).
    pub fn is_doorbell(&self) -> bool {
        self.bars[1].len > 0
    }

    /// The IOMMU group number, if the device is in one.
    pub fn iommu_group(&self) -> Option<u32> {
        let link = fs::read_link(self.path.join("iommu_group")).ok()?;
        link.file_name()?.to_str()?.parse().ok()
    }

    fn load(addr: &str) -> Result<IvshmemDevice, PciError> {
        let path = Path::new(SYSFS_PCI).join(addr);
        if !path.exists() {
            return Err(PciError::NoSuchDevice(addr.into()));
        }
        let vendor = read_sysfs(&path.join("vendor"))?;
        let device = read_sysfs(&path.join("device"))?;
        if parse_hex_u64(&vendor) != Some(IVSHMEM_VENDOR as u64)
            || parse_hex_u64(&device) != Some(IVSHMEM_DEVICE as u64)
        {
            return Err(PciError::NotIvshmem {
                addr: addr.into(),
                found: format!("{vendor}:{device}"),
            });
        }
        let resource = read_sysfs(&path.join("resource"))?;
        let mut bars = [Bar::default(); 3];
        for (bar, line) in bars.iter_mut().zip(resource.lines()) {
            let mut f = line.split_whitespace().map(parse_hex_u64);
            if let (Some(Some(start)), Some(Some(end))) = (f.next(), f.next()) {
                if end > start {
                    *bar = Bar { start, len: end - start + 1 };
                }
            }
        }
        let driver = fs::read_link(path.join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
        Ok(IvshmemDevice { addr: addr.into(), path, bars, driver })
    }

    /// Finds the device `spec` names.
    pub fn find(spec: &DeviceSpec) -> Result<IvshmemDevice, PciError> {
        match spec {
            DeviceSpec::Address(a) => Self::load(a),
            DeviceSpec::Auto => {
                let dir = Path::new(SYSFS_PCI);
                let entries = fs::read_dir(dir)
                    .map_err(|source| PciError::Sysfs { path: dir.into(), source })?;
                let mut addrs: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                addrs.sort();
                let found: Vec<IvshmemDevice> =
                    addrs.iter().filter_map(|a| Self::load(a).ok()).collect();
                if found.len() > 1 {
                    log::warn!(
                        "several ivshmem devices found ({}); using {} (choose with --device)",
                        found.iter().map(|d| d.addr.as_str()).collect::<Vec<_>>().join(", "),
                        found[0].addr
                    );
                }
                found.into_iter().next().ok_or(PciError::NotFound)
            }
        }
    }

    /// Makes sure the device is bound to vfio-pci, binding it when `bind` is set.
    pub fn ensure_vfio(&mut self, bind: bool) -> Result<u32, PciError> {
        if self.driver.as_deref() != Some("vfio-pci") {
            if !bind {
                let driver = self.driver.clone().unwrap_or_else(|| "no driver".into());
                let unbind = match &self.driver {
                    Some(d) => format!("echo {} > /sys/bus/pci/drivers/{d}/unbind\n  ", self.addr),
                    None => String::new(),
                };
                return Err(PciError::NotBound { addr: self.addr.clone(), driver, unbind });
            }
            self.bind_vfio()?;
        }
        let group = self.iommu_group().ok_or_else(|| PciError::NoIommuGroup(self.addr.clone()))?;
        Ok(group)
    }

    fn bind_vfio(&mut self) -> Result<(), PciError> {
        let addr = self.addr.clone();
        let step = |step: &str| {
            let step = step.to_string();
            let addr = addr.clone();
            move |source| PciError::Bind { addr, step, source }
        };
        if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
            // Best effort: the module may be built in or loaded by the init system.
            let status = std::process::Command::new("modprobe").arg("vfio-pci").status();
            log::info!("modprobe vfio-pci: {status:?}");
        }
        fs::write(self.path.join("driver_override"), "vfio-pci")
            .map_err(step("write driver_override"))?;
        if let Some(d) = &self.driver {
            fs::write(self.path.join("driver/unbind"), &self.addr)
                .map_err(step(&format!("unbind it from {d}")))?;
        }
        fs::write("/sys/bus/pci/drivers_probe", &self.addr).map_err(step("probe vfio-pci"))?;
        self.driver = fs::read_link(self.path.join("driver"))
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
        if self.driver.as_deref() != Some("vfio-pci") {
            return Err(PciError::Bind {
                addr: self.addr.clone(),
                step: format!("after probing, the driver is {:?}", self.driver),
                source: io::Error::other(
                    "vfio-pci did not take the device (is the vfio-pci module available?)",
                ),
            });
        }
        log::info!("bound {} to vfio-pci", self.addr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_device_spec_parses_addresses() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("00:03.0".parse::<DeviceSpec>(), Ok(DeviceSpec::Address("0000:00:03.0".into())));
        assert_eq!(
            "0000:00:1F.7".parse::<DeviceSpec>(),
            Ok(DeviceSpec::Address("0000:00:1f.7".into()))
        );
        assert!("eth0".parse::<DeviceSpec>().is_err());
        assert!("0000:00:03".parse::<DeviceSpec>().is_err());
    }
}
