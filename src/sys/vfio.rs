//! The few VFIO ioctls needed to drive the ivshmem device in VFIO's no-IOMMU mode
//! (`vfio.enable_unsafe_noiommu_mode=1`, group `/dev/vfio/noiommu-N`), which pci-driver does not
//! support (it always sets up a Type1v2 IOMMU container). With an IOMMU, the `vfio` backend uses
//! pci-driver instead.
//!
//! NOT TESTED: Debian's kernels (the ones this project's tests boot) are built without
//! CONFIG_VFIO_NOIOMMU. The calls follow `linux/vfio.h`; the same sequence with VFIO_TYPE1v2_IOMMU
//! was verified in a guest during development (tests/vm/README.md, "VFIO recipe").

use std::fs::{File, OpenOptions};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

const VFIO_TYPE: u32 = b';' as u32;
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE << 8) | (100 + nr)) as libc::c_ulong
}
const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);

const VFIO_API_VERSION: libc::c_int = 0;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_NOIOMMU_IOMMU: libc::c_ulong = 8;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RegionInfoRaw {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// Where a device region sits in the VFIO device file.
#[derive(Debug, Clone, Copy)]
pub struct RegionInfo {
    /// Bytes.
    pub size: u64,
    /// Offset in the device file.
    pub offset: u64,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Names the step that failed: "VFIO_SET_IOMMU: No such device".
fn step(what: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A PCI device opened through a VFIO no-IOMMU group.
pub struct NoIommuDevice {
    _container: File,
    _group: File,
    device: File,
    bar0: RegionInfo,
    bar2: RegionInfo,
    config: RegionInfo,
}

impl NoIommuDevice {
    /// Opens device `addr` (e.g. `0000:00:01.0`) in no-IOMMU group `group`.
    pub fn open(group: u32, addr: &str) -> io::Result<NoIommuDevice> {
        Self::open_with(&format!("/dev/vfio/noiommu-{group}"), VFIO_NOIOMMU_IOMMU, addr)
    }

    /// The same calls with an ordinary IOMMU group and a Type1v2 container: lets the tests run
    /// everything but the no-IOMMU specifics (group path, IOMMU type) on a kernel without the
    /// mode (`IVNET_VFIO_RAW=1`).
    pub fn open_type1(group: u32, addr: &str) -> io::Result<NoIommuDevice> {
        Self::open_with(&format!("/dev/vfio/{group}"), VFIO_TYPE1V2_IOMMU, addr)
    }

    fn open_with(group_path: &str, iommu: libc::c_ulong, addr: &str) -> io::Result<NoIommuDevice> {
        let rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
        let container = rw("/dev/vfio/vfio").map_err(step("open /dev/vfio/vfio"))?;
        // SAFETY: argument-less ioctl on the container descriptor we own.
        let v = cvt(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION as _) })
            .map_err(step("VFIO_GET_API_VERSION"))?;
        if v != VFIO_API_VERSION {
            return Err(io::Error::other(format!(
                "VFIO API version {v}, expected {VFIO_API_VERSION}"
            )));
        }
        // SAFETY: CHECK_EXTENSION takes an integer argument, no pointer.
        let ok =
            cvt(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_CHECK_EXTENSION as _, iommu) })
                .map_err(step("VFIO_CHECK_EXTENSION"))?;
        if ok == 0 {
            return Err(io::Error::other(format!("the kernel's VFIO lacks IOMMU type {iommu}")));
        }
        let group_file = rw(group_path).map_err(step("open the VFIO group"))?;
        let mut status = GroupStatus { argsz: mem::size_of::<GroupStatus>() as u32, flags: 0 };
        // SAFETY: `status` is a properly sized vfio_group_status that the kernel fills in.
        cvt(unsafe {
            libc::ioctl(group_file.as_raw_fd(), VFIO_GROUP_GET_STATUS as _, &mut status)
        })
        .map_err(step("VFIO_GROUP_GET_STATUS"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(
                "the VFIO group is not viable: bind every device in it to vfio-pci",
            ));
        }
        let cfd: libc::c_int = container.as_raw_fd();
        // SAFETY: SET_CONTAINER reads an int (the container fd) through the pointer.
        cvt(unsafe { libc::ioctl(group_file.as_raw_fd(), VFIO_GROUP_SET_CONTAINER as _, &cfd) })
            .map_err(step("VFIO_GROUP_SET_CONTAINER"))?;
        // SAFETY: SET_IOMMU takes an integer argument.
        cvt(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_SET_IOMMU as _, iommu) })
            .map_err(step("VFIO_SET_IOMMU"))?;
        let name = std::ffi::CString::new(addr).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated name that outlives the call and returns a
        // new descriptor, which we own from here on.
        let fd = cvt(unsafe {
            libc::ioctl(group_file.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr())
        })
        .map_err(step("VFIO_GROUP_GET_DEVICE_FD"))?;
        // SAFETY: `fd` is a fresh descriptor returned to us by the kernel.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let info = |index: u32| -> io::Result<RegionInfo> {
            let mut r = RegionInfoRaw {
                argsz: mem::size_of::<RegionInfoRaw>() as u32,
                index,
                ..Default::default()
            };
            // SAFETY: `r` is a properly sized vfio_region_info that the kernel fills in.
            cvt(unsafe {
                libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO as _, &mut r)
            })
            .map_err(step("VFIO_DEVICE_GET_REGION_INFO"))?;
            Ok(RegionInfo { size: r.size, offset: r.offset })
        };
        let (bar0, bar2, config) = (info(0)?, info(2)?, info(VFIO_PCI_CONFIG_REGION_INDEX)?);
        Ok(NoIommuDevice { _container: container, _group: group_file, device, bar0, bar2, config })
    }

    /// Maps BAR2 (the shared memory).
    pub fn map_bar2(&self) -> io::Result<memmap2::MmapRaw> {
        let len = usize::try_from(self.bar2.size).map_err(|_| io::ErrorKind::InvalidData)?;
        memmap2::MmapOptions::new().offset(self.bar2.offset).len(len).map_raw(&self.device)
    }

    /// Reads a BAR0 register.
    pub fn read_bar0(&self, off: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.device.read_exact_at(&mut b, self.bar0.offset + off)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a BAR0 register.
    pub fn write_bar0(&self, off: u64, v: u32) -> io::Result<()> {
        self.device.write_all_at(&v.to_le_bytes(), self.bar0.offset + off)
    }

    /// Sets Bus Master in the PCI command register (vfio-pci leaves it off; MSI-X needs it).
    pub fn set_bus_master(&self) -> io::Result<()> {
        let mut b = [0u8; 2];
        self.device.read_exact_at(&mut b, self.config.offset + 4)?;
        let cmd = u16::from_le_bytes(b) | 0x4;
        self.device.write_all_at(&cmd.to_le_bytes(), self.config.offset + 4)
    }

    /// Routes MSI-X vectors 0..fds.len() to the eventfds `fds`.
    pub fn enable_msix(&self, fds: &[RawFd]) -> io::Result<()> {
        // struct vfio_irq_set { argsz, flags, index, start, count } followed by the fds.
        let mut buf: Vec<u32> = vec![0; 5 + fds.len()];
        buf[0] = (buf.len() * 4) as u32;
        buf[1] = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        buf[2] = VFIO_PCI_MSIX_IRQ_INDEX;
        buf[3] = 0;
        buf[4] = fds.len() as u32;
        for (slot, &fd) in buf[5..].iter_mut().zip(fds) {
            *slot = fd as u32;
        }
        // SAFETY: `buf` is a vfio_irq_set of `argsz` bytes with `count` eventfds after the
        // header; the kernel only reads it.
        cvt(unsafe {
            libc::ioctl(self.device.as_raw_fd(), VFIO_DEVICE_SET_IRQS as _, buf.as_ptr())
        })
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + n), as listed in tests/vm/README.md from a working probe.
        assert_eq!(VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3B6E);
        assert_eq!(mem::size_of::<RegionInfoRaw>(), 32);
    }
}
