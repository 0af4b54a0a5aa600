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

use crate::doorbell::{Notifier, Wakeups};
use crate::region::{GeometryRequest, Region};
use pci::{DeviceSpec, IvshmemDevice, PciError, REG_DOORBELL};

/// 32-bit device registers (the ivshmem BAR0).
pub trait Registers {
    /// Reads the register at byte offset `off`.
    fn read_u32(&self, off: u64) -> io::Result<u32>;
    /// Writes the register at byte offset `off`.
    fn write_u32(&self, off: u64, v: u32) -> io::Result<()>;
}

/// Rings peers through the ivshmem Doorbell register: `id << 16 | vector` (QEMU delivers it
/// to that peer's MSI-X vector), where `id` is the doorbell id the server paired with the
/// peer's slot.
pub struct DoorbellRegister<R: Registers> {
    /// BAR0.
    pub registers: R,
    /// The region, for the slot -> doorbell id table.
    pub region: Region,
    /// Vectors per member (the server gives every member the same number): with fewer than
    /// two, data doorbells go to the last one, since QEMU ignores a ring on a missing vector.
    pub vectors: u16,
}

impl<R: Registers> Notifier for DoorbellRegister<R> {
    fn notify(&mut self, peer: u32, vector: u16) -> bool {
        let vector = vector.min(self.vectors.saturating_sub(1));
        match self.region.peer(peer).doorbell_id() {
            Some(id) if id <= 0xffff => {
                self.registers.write_u32(REG_DOORBELL, (id << 16) | vector as u32).is_ok()
            }
            _ => false,
        }
    }
}

/// A member reached through the ivshmem PCI device.
pub struct PciMember {
    /// The region (BAR2).
    pub region: Region,
    /// The peer slot the device imposes (the slot the server paired with the device's
    /// IVPosition, for an ivshmem-doorbell), if any.
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
                let region = v.region.clone();
                let assigned_id = slot_for(&region, dev.is_doorbell().then(|| v.ivposition()));
                let backend =
                    if v.vectors.is_empty() { "vfio (polling, no MSI-X)" } else { "vfio (MSI-X)" };
                // Without MSI-X we poll but can still ring peers that sleep on theirs.
                // Without MSI-X we cannot tell how many vectors the device has: assume ivnet's 2.
                let vectors = if v.vectors.is_empty() { 2 } else { v.vectors.len() as u16 };
                let wakeups = dev.is_doorbell().then(|| Wakeups {
                    own: v.vectors,
                    notifier: Box::new(DoorbellRegister {
                        registers: v.registers,
                        region: region.clone(),
                        vectors,
                    }),
                    spin,
                    control: None,
                });
                return Ok(PciMember { region, assigned_id, wakeups, backend });
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
    let assigned_id = slot_for(&s.region, dev.is_doorbell().then(|| s.ivposition()));
    // We get no interrupts, but can still ring peers that sleep on theirs.
    let wakeups = dev.is_doorbell().then(|| Wakeups {
        own: Vec::new(),
        notifier: Box::new(DoorbellRegister {
            registers: s.registers,
            region: s.region.clone(),
            vectors: 2,
        }),
        spin,
        control: None,
    });
    Ok(PciMember { region: s.region, assigned_id, wakeups, backend: "sysfs (polling)" })
}

/// The slot the doorbell server paired with this device's IVPosition. Without a pairing (a
/// region not served by `ivnet server`) the agent claims a free slot itself.
fn slot_for(region: &Region, ivposition: Option<u32>) -> Option<u32> {
    let id = ivposition?;
    let slot = region.slot_of_doorbell_id(id);
    match slot {
        Some(s) => log::info!("IVPosition {id} is peer slot {s}"),
        None => log::warn!(
            "IVPosition {id} is not paired with a peer slot in the region (not an ivnet server?); \
             claiming a free slot instead"
        ),
    }
    slot
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
