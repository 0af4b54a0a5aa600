//! The `vfio` backend: the ivshmem device bound to vfio-pci (pci-driver crate). BAR2 is the
//! region, BAR0 holds IVPosition and the Doorbell register, and MSI-X vectors arrive as eventfds
//! that the agent's event loop waits on.
//!
//! pci-driver sets its container up with the Type1v2 IOMMU, so this needs an IOMMU in the guest
//! (QEMU `intel-iommu`); MSI-X additionally needs interrupt remapping (`intremap=on`) or the
//! type1 module's `allow_unsafe_interrupts`. Without MSI-X the agent still works, polling.
//! VFIO's no-IOMMU mode (`/dev/vfio/noiommu-N`), which pci-driver cannot set up, goes through
//! the small set of VFIO calls in `sys::vfio` instead (untested: Debian's kernels lack it).

use std::io;
use std::path::Path;
use std::sync::Arc;

use pci_driver::backends::vfio::VfioPciDevice;
use pci_driver::device::PciDevice;
use pci_driver::regions::{OwningPciRegion, PciRegion, Permissions};

use super::pci::{IvshmemDevice, REG_IVPOSITION};
use super::Registers;
use crate::region::raw::VfioBar;
use crate::region::{GeometryRequest, Region, RegionError};
use crate::sys::vfio::NoIommuDevice;
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
pub enum VfioRegisters {
    /// Through pci-driver (IOMMU container).
    Pci(OwningPciRegion),
    /// Through our own no-IOMMU VFIO calls.
    NoIommu(Arc<NoIommuDevice>),
}

impl Registers for VfioRegisters {
    fn read_u32(&self, off: u64) -> io::Result<u32> {
        match self {
            VfioRegisters::Pci(r) => r.read_le_u32(off),
            VfioRegisters::NoIommu(d) => d.read_bar0(off),
        }
    }
    fn write_u32(&self, off: u64, v: u32) -> io::Result<()> {
        match self {
            VfioRegisters::Pci(r) => r.write_le_u32(off, v),
            VfioRegisters::NoIommu(d) => d.write_bar0(off, v),
        }
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
    _device: Option<VfioPciDevice>,
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
        if Path::new(&format!("/dev/vfio/noiommu-{group}")).exists() {
            return Self::open_raw(dev, group, req, want_vectors, true);
        }
        if std::env::var_os("IVNET_VFIO_RAW").is_some_and(|v| v == "1") {
            // Test hook: the no-IOMMU code path on an IOMMU group (see sys::vfio).
            return Self::open_raw(dev, group, req, want_vectors, false);
        }
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
        Ok(VfioDevice {
            region,
            registers: VfioRegisters::Pci(bar0),
            vectors,
            _device: Some(device),
        })
    }

    /// VFIO's no-IOMMU mode (pci-driver only does IOMMU containers). Not tested: see
    /// `sys::vfio`.
    fn open_raw(
        dev: &IvshmemDevice,
        group: u32,
        req: &GeometryRequest,
        want_vectors: usize,
        noiommu: bool,
    ) -> Result<VfioDevice, VfioError> {
        let addr = dev.addr.clone();
        let d = if noiommu {
            log::warn!(
                "{addr}: VFIO no-IOMMU mode (group noiommu-{group}): the device is not \
                 isolated; the no-IOMMU specifics are not covered by ivnet's tests"
            );
            NoIommuDevice::open(group, &addr)
        } else {
            log::info!("{addr}: IVNET_VFIO_RAW=1: ivnet's own VFIO calls on IOMMU group {group}");
            NoIommuDevice::open_type1(group, &addr)
        };
        let d =
            Arc::new(d.map_err(|source| VfioError::Open { addr: addr.clone(), group, source })?);
        let map =
            d.map_bar2().map_err(|source| VfioError::Bar { addr: addr.clone(), bar: 2, source })?;
        let name = format!("ivshmem {} (vfio, own calls)", dev.addr);
        let region = Region::attach(Arc::new(map), &name, req)?;
        let mut vectors = Vec::new();
        if dev.is_doorbell() {
            if let Err(e) = d.set_bus_master() {
                log::warn!("{addr}: cannot set PCI Bus Master ({e}); MSI-X may not be delivered");
            }
            match (0..want_vectors).map(|_| EventFd::new()).collect::<io::Result<Vec<EventFd>>>() {
                Ok(fds) => {
                    let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                    match d.enable_msix(&raw) {
                        Ok(()) => vectors = fds,
                        Err(e) => log::warn!("{addr}: cannot enable MSI-X ({e}); polling"),
                    }
                }
                Err(e) => log::warn!("{addr}: cannot create eventfds ({e}); polling"),
            }
        }
        Ok(VfioDevice { region, registers: VfioRegisters::NoIommu(d), vectors, _device: None })
    }

    /// The IVPosition register.
    pub fn ivposition(&self) -> u32 {
        self.registers.read_u32(REG_IVPOSITION).unwrap_or(0)
    }
}
