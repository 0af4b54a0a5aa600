//! How a member reaches a region and its doorbells. Each backend yields a [`Region`] (and, where
//! it has them, doorbells); the agent and the stack never see a file, a socket or a PCI device.
//!
//! - `file`: a shared file, polled.
//! - `server_client`: a host process joins through `ivnet server`, like QEMU.
//! - `vfio`: in a guest, the ivshmem PCI device through vfio-pci, with MSI-X doorbells.
//! - `sysfs`: in a guest, the same device through sysfs resource files, polled.

pub mod file;
pub mod pci;
pub mod server_client;
pub mod sysfs;
pub mod vfio;

use std::io;
use std::time::Duration;

use crate::agent::datapath::Notifier;
use crate::agent::Wakeups;
use crate::region::{GeometryRequest, Region};
use pci::{DeviceSpec, IvshmemDevice, PciError, REG_DOORBELL};

/// 32-bit device registers (the ivshmem BAR0).
pub trait Registers {
    /// Reads the register at byte offset `off`.
    fn read_u32(&self, off: u64) -> io::Result<u32>;
    /// Writes the register at byte offset `off`.
    fn write_u32(&self, off: u64, v: u32) -> io::Result<()>;
}

/// Rings peers through the ivshmem Doorbell register: `peer << 16 | vector` (QEMU delivers it
/// to that peer's MSI-X vector).
pub struct DoorbellRegister<R: Registers>(pub R);

impl<R: Registers> Notifier for DoorbellRegister<R> {
    fn notify(&mut self, peer: u32, vector: u16) -> bool {
        if peer > 0xffff {
            return false;
        }
        self.0.write_u32(REG_DOORBELL, (peer << 16) | vector as u32).is_ok()
    }
}

/// A member reached through the ivshmem PCI device.
pub struct PciMember {
    /// The region (BAR2).
    pub region: Region,
    /// The peer id the device imposes (IVPosition of an ivshmem-doorbell), if any.
    pub assigned_id: Option<u32>,
    /// Doorbells, when MSI-X works (VFIO); `None` means poll.
    pub wakeups: Option<Wakeups>,
    /// Which backend was used, for logs: "vfio (MSI-X)", "vfio (polling)", "sysfs (polling)".
    pub backend: &'static str,
}

/// Why no PCI backend could be used.
#[derive(Debug, thiserror::Error)]
pub enum PciBackendError {
    /// Finding the device failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// Both VFIO and sysfs failed.
    #[error("cannot use the ivshmem device through VFIO ({vfio}) nor through sysfs")]
    Sysfs {
        /// Why VFIO was not used.
        vfio: String,
        /// Why sysfs failed.
        #[source]
        source: sysfs::SysfsError,
    },
}

/// Opens the ivshmem device `spec`: through VFIO with MSI-X doorbells when possible (binding it
/// to vfio-pci if `bind`), else through sysfs, polling. The fallback is logged with its reason.
pub fn open_pci(
    spec: &DeviceSpec,
    bind: bool,
    req: &GeometryRequest,
    spin: Duration,
) -> Result<PciMember, PciBackendError> {
    let mut dev = IvshmemDevice::find(spec)?;
    let kind = if dev.is_doorbell() { "ivshmem-doorbell" } else { "ivshmem-plain" };
    log::info!(
        "found {kind} at {} (BAR2 {} bytes, driver {:?})",
        dev.addr,
        dev.bars[2].len,
        dev.driver
    );
    let vfio_reason = match dev.ensure_vfio(bind) {
        Ok(group) => match vfio::VfioDevice::open(&dev, group, req, 2) {
            Ok(v) => {
                let assigned_id = dev.is_doorbell().then(|| v.ivposition());
                let region = v.region.clone();
                if v.vectors.is_empty() {
                    return Ok(PciMember {
                        region,
                        assigned_id,
                        wakeups: None,
                        backend: "vfio (polling, no MSI-X)",
                    });
                }
                let own = v.vectors.into_iter().collect();
                let wakeups = Wakeups {
                    own,
                    notifier: Box::new(DoorbellRegister(v.registers)),
                    spin,
                    control: None,
                };
                return Ok(PciMember {
                    region,
                    assigned_id,
                    wakeups: Some(wakeups),
                    backend: "vfio (MSI-X)",
                });
            }
            Err(vfio::VfioError::Region(e)) => {
                return Err(PciBackendError::Sysfs {
                    vfio: "the region is unusable".into(),
                    source: sysfs::SysfsError::Region(e),
                })
            }
            Err(e) => error_chain(&e),
        },
        Err(e) => error_chain(&e),
    };
    log::warn!(
        "VFIO unavailable: {vfio_reason}; falling back to sysfs (polling, no doorbell wake-ups)"
    );
    let s = sysfs::SysfsDevice::open(&dev, req)
        .map_err(|source| PciBackendError::Sysfs { vfio: vfio_reason.clone(), source })?;
    let assigned_id = dev.is_doorbell().then(|| s.ivposition());
    Ok(PciMember { region: s.region, assigned_id, wakeups: None, backend: "sysfs (polling)" })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
