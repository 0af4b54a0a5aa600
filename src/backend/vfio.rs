//! The `vfio` backend: the ivshmem device bound to vfio-pci (pci-driver crate). BAR2 is the
//! region, BAR0 holds IVPosition and the Doorbell register, and MSI-X vectors arrive as eventfds
//! that the agent's event loop waits on.
//!
//! pci-driver sets its container up with the Type1v2 IOMMU, so this needs an IOMMU in the guest
//! (QEMU `intel-iommu`); MSI-X additionally needs interrupt remapping (`intremap=on`) or the
//! type1 module's `allow_unsafe_interrupts`. Without MSI-X the agent still works, polling.

use std::io;
use std::sync::Arc;

use pci_driver::backends::vfio::VfioPciDevice;
use pci_driver::device::PciDevice;
use pci_driver::regions::{OwningPciRegion, PciRegion, Permissions};

use super::pci::{IvshmemDevice, REG_IVPOSITION};
use super::Registers;
use crate::region::raw::VfioBar;
use crate::region::{GeometryRequest, Region, RegionError};
use crate::sys::EventFd;

/// Why the device could not be used through VFIO.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// Opening the VFIO group/device failed.
    #[error("cannot open {addr} through VFIO (/dev/vfio/{group})")]
    Open {
        /// PCI address.
        addr: String,
        /// IOMMU group.
        group: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A BAR is missing or cannot be mapped.
    #[error("{addr}: cannot use BAR{bar} through VFIO")]
    Bar {
        /// PCI address.
        addr: String,
        /// BAR index.
        bar: usize,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The region is not usable.
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// BAR0 accessed through the VFIO device file.
pub struct VfioRegisters(OwningPciRegion);

impl Registers for VfioRegisters {
    fn read_u32(&self, off: u64) -> io::Result<u32> {
        self.0.read_le_u32(off)
    }
    fn write_u32(&self, off: u64, v: u32) -> io::Result<()> {
        self.0.write_le_u32(off, v)
    }
}

/// The device opened through VFIO.
pub struct VfioDevice {
    /// The shared region (BAR2).
    pub region: Region,
    /// BAR0.
    pub registers: VfioRegisters,
    /// One eventfd per enabled MSI-X vector (empty if MSI-X could not be enabled).
    pub vectors: Vec<EventFd>,
    _device: VfioPciDevice,
}

impl VfioDevice {
    /// Opens `dev` (already bound to vfio-pci, in IOMMU group `group`), maps its BARs and, for an
    /// ivshmem-doorbell, enables up to `want_vectors` MSI-X vectors.
    pub fn open(
        dev: &IvshmemDevice,
        group: u32,
        req: &GeometryRequest,
        want_vectors: usize,
    ) -> Result<VfioDevice, VfioError> {
        let addr = dev.addr.clone();
        let device = VfioPciDevice::open(&dev.path).map_err(|source| VfioError::Open {
            addr: addr.clone(),
            group,
            source,
        })?;
        let bar_err = |bar: usize| {
            let addr = addr.clone();
            move |source| VfioError::Bar { addr, bar, source }
        };
        let missing = |bar: usize| VfioError::Bar {
            addr: addr.clone(),
            bar,
            source: io::Error::new(io::ErrorKind::NotFound, "BAR not present"),
        };
        let bar0 = device.bar(0).ok_or_else(|| missing(0))?;
        let bar2 = device.bar(2).ok_or_else(|| missing(2))?;
        let mapped = bar2.map(.., Permissions::ReadWrite).map_err(bar_err(2))?;
        let name = format!("ivshmem {} (vfio)", dev.addr);
        let region = Region::attach(Arc::new(VfioBar(mapped)), &name, req)?;
        let mut vectors = Vec::new();
        if dev.is_doorbell() {
            // vfio-pci leaves Bus Master off; without it every MSI-X message is dropped silently.
            if let Err(e) = device.config().command().bus_master_enable().write(true) {
                log::warn!("{addr}: cannot set PCI Bus Master ({e}); MSI-X may not be delivered");
            }
            let interrupts = device.interrupts();
            let msix = interrupts.msi_x();
            let n = want_vectors.min(msix.max());
            let fds: io::Result<Vec<EventFd>> = (0..n).map(|_| EventFd::new()).collect();
            match fds {
                Ok(fds) => {
                    let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                    match msix.enable(&raw) {
                        Ok(()) => {
                            if fds.len() < want_vectors {
                                log::warn!(
                                    "{addr}: the device has {} MSI-X vector(s), ivnet uses \
                                     {want_vectors} (0: link changes, 1: data): data doorbells \
                                     share the last one; start QEMU with vectors={want_vectors} \
                                     and the server with --vectors {want_vectors}",
                                    fds.len()
                                );
                            }
                            vectors = fds
                        }
                        Err(e) => log::warn!(
                            "{addr}: cannot enable MSI-X ({e}); doorbells will not wake this agent, \
                             it polls. (VFIO needs interrupt remapping: QEMU -device \
                             intel-iommu,intremap=on, or vfio_iommu_type1.allow_unsafe_interrupts=1)"
                        ),
                    }
                }
                Err(e) => log::warn!("{addr}: cannot create eventfds ({e}); polling"),
            }
        }
        Ok(VfioDevice { region, registers: VfioRegisters(bar0), vectors, _device: device })
    }

    /// The IVPosition register.
    pub fn ivposition(&self) -> u32 {
        self.registers.read_u32(REG_IVPOSITION).unwrap_or(0)
    }
}
