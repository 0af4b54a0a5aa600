//! The `sysfs` backend: the ivshmem device's BARs through `/sys/bus/pci/devices/ADDR/resource0`
//! and `resource2`, with no driver needed. It can ring doorbells (a write to BAR0) but receives
//! none (no interrupts without a driver), so the agent polls. It is the fallback when VFIO is
//! unavailable.

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::pci::{IvshmemDevice, REG_DOORBELL, REG_IVPOSITION};
use super::Registers;
use crate::region::{GeometryRequest, RawRegion, Region, RegionError};

/// Why the device's BARs could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// Opening or mapping a resource file failed.
    #[error("cannot map {path} (needs root; is the device's memory enabled?)")]
    Map {
        /// Resource file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// vfio-pci holds the device's BARs (an agent uses the device through VFIO), so sysfs cannot
    /// map them.
    #[error(
        "cannot map {path}: the device is bound to vfio-pci, which claims its BARs exclusively \
         while they are in use (by an `ivnet agent` on VFIO, for instance); read the status on \
         the host instead: ivnet status --shm REGION_FILE"
    )]
    HeldByVfio {
        /// Resource file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The region is not usable.
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// BAR0 registers mapped from `resource0`.
pub struct SysfsRegisters {
    raw: RawRegion,
    /// Offset of the BAR's first byte within the mapped page.
    base: usize,
}

impl Registers for SysfsRegisters {
    fn read_u32(&self, off: u64) -> io::Result<u32> {
        Ok(self.raw.u32_at(self.base + off as usize).load(Ordering::SeqCst))
    }
    fn write_u32(&self, off: u64, v: u32) -> io::Result<()> {
        self.raw.u32_at(self.base + off as usize).store(v, Ordering::SeqCst);
        Ok(())
    }
}

/// The device opened through sysfs.
pub struct SysfsDevice {
    /// The shared region (BAR2).
    pub region: Region,
    /// BAR0.
    pub registers: SysfsRegisters,
}

fn map(path: PathBuf, len: Option<usize>) -> Result<memmap2::MmapRaw, SysfsError> {
    let err = |source| SysfsError::Map { path: path.clone(), source };
    let f = OpenOptions::new().read(true).write(true).open(&path).map_err(err)?;
    let mut opts = memmap2::MmapOptions::new();
    if let Some(len) = len {
        opts.len(len);
    }
    opts.map_raw(&f).map_err(err)
}

impl SysfsDevice {
    /// Maps BAR0 and BAR2 of `dev` and joins the region.
    pub fn open(dev: &IvshmemDevice, req: &GeometryRequest) -> Result<SysfsDevice, SysfsError> {
        // BAR0 is 256 bytes; the kernel maps the page that holds it.
        let page = 4096usize;
        let bar0 = map(dev.path.join("resource0"), Some(page))?;
        let base = (dev.bars[0].start as usize) % page;
        let registers = SysfsRegisters { raw: RawRegion::new(Arc::new(bar0)), base };
        let bar2 = map(dev.path.join("resource2"), None)?;
        let name = format!("ivshmem {} (sysfs)", dev.addr);
        let region = Region::attach(Arc::new(bar2), &name, req)?;
        Ok(SysfsDevice { region, registers })
    }

    /// Maps BAR2 of `dev` read-only and opens the region for `status` (never writes).
    pub fn open_read_only(dev: &IvshmemDevice) -> Result<Region, SysfsError> {
        let path = dev.path.join("resource2");
        let err = |source| SysfsError::Map { path: path.clone(), source };
        let f = std::fs::File::open(&path).map_err(err)?;
        let map = memmap2::MmapOptions::new().map_raw_read_only(&f).map_err(|source| {
            if dev.driver.as_deref() == Some("vfio-pci") {
                SysfsError::HeldByVfio { path: path.clone(), source }
            } else {
                err(source)
            }
        })?;
        let name = format!("ivshmem {} (sysfs)", dev.addr);
        Ok(Region::open_read_only(Arc::new(crate::region::raw::ReadOnlyMapping(map)), &name)?)
    }

    /// The device's IVPosition register: its peer id if it is an ivshmem-doorbell.
    pub fn ivposition(&self) -> u32 {
        self.registers.read_u32(REG_IVPOSITION).unwrap_or(0)
    }

    /// Offset of the Doorbell register (for the notifier).
    pub const DOORBELL: u64 = REG_DOORBELL;
}
