//! The unsafe core: every raw access to shared memory in ivnet goes through [`RawRegion`].
//!
//! Rules (after rust-vmm's vm-memory):
//! 1. No `&`/`&mut` reference to plain bytes of the region is ever created: another machine may
//!    write them at any time, so such a reference would be undefined behaviour. Bytes move in and
//!    out with `ptr::copy_nonoverlapping` on raw pointers.
//! 2. Words that are shared between writers and readers are accessed only as atomics
//!    (`AtomicU32`/`AtomicU64` references are allowed: atomics permit shared mutation).
//! 3. Every access is bounds-checked here, whatever the caller already checked: a bad offset is a
//!    bug and must not become an access outside the mapping.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

/// Memory that several processes or machines may map at once.
///
/// # Safety
///
/// An implementation guarantees that `base()` points to `size()` bytes that stay mapped, readable
/// (and writable unless `writable()` is false) and 8-byte aligned for as long as the value lives,
/// and that the pointer is usable from any thread.
pub unsafe trait SharedMemory: Send + Sync + 'static {
    /// First byte of the mapping.
    fn base(&self) -> *mut u8;
    /// Length of the mapping in bytes.
    fn size(&self) -> usize;
    /// Whether the mapping may be written (a read-only status view is not).
    fn writable(&self) -> bool {
        true
    }
}

// SAFETY: `MmapRaw` owns a mapping of `len()` bytes at `as_mut_ptr()` that lives until it is
// dropped; mmap returns page-aligned addresses.
unsafe impl SharedMemory for memmap2::MmapRaw {
    fn base(&self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn size(&self) -> usize {
        memmap2::MmapRaw::len(self)
    }
}

/// A read-only file mapping (for `ivnet status`, which needs no write access to the file).
pub struct ReadOnlyMapping(pub memmap2::MmapRaw);

// SAFETY: as for `MmapRaw`; `writable()` is false, so no code path stores through it.
unsafe impl SharedMemory for ReadOnlyMapping {
    fn base(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn size(&self) -> usize {
        self.0.len()
    }
    fn writable(&self) -> bool {
        false
    }
}

/// A PCI BAR mapped through VFIO (the ivshmem device's BAR2 in a guest).
pub struct VfioBar(pub pci_driver::regions::MappedOwningPciRegion);

// SAFETY: the mapping covers `len()` bytes at `as_mut_ptr()`, is page aligned (mmap of the VFIO
// device file) and stays mapped until the value is dropped.
unsafe impl SharedMemory for VfioBar {
    fn base(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
    fn size(&self) -> usize {
        self.0.len()
    }
}

/// Zeroed heap memory that stands in for a shared mapping in tests and benchmarks (and under
/// Miri, which cannot mmap).
pub struct HeapMemory {
    words: Box<[AtomicU64]>,
}

impl HeapMemory {
    /// Allocates `len` zeroed bytes (rounded up to a multiple of 8).
    pub fn new(len: usize) -> Self {
        let words = (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect();
        HeapMemory { words }
    }
}

// SAFETY: the boxed slice is 8-aligned, lives as long as `self`, and `AtomicU64` has interior
// mutability, so writing through the pointer derived from it is allowed.
unsafe impl SharedMemory for HeapMemory {
    fn base(&self) -> *mut u8 {
        self.words.as_ptr() as *mut u8
    }
    fn size(&self) -> usize {
        self.words.len() * 8
    }
}

/// A bounds-checked window on shared memory. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct RawRegion {
    mem: Arc<dyn SharedMemory>,
    base: *mut u8,
    len: usize,
}

// SAFETY: the pointer comes from a `SharedMemory`, which is `Send + Sync` and valid from any
// thread; all accesses through it are atomics or raw copies.
unsafe impl Send for RawRegion {}
// SAFETY: as above; `&RawRegion` only offers atomic and raw-copy accesses.
unsafe impl Sync for RawRegion {}

/// An offset or range that falls outside the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shared-memory access at offset {offset} (+{len} bytes) is outside the {size}-byte region")]
pub struct OutOfBounds {
    /// First byte of the attempted access.
    pub offset: usize,
    /// Length of the attempted access.
    pub len: usize,
    /// Size of the region.
    pub size: usize,
}

impl RawRegion {
    /// Wraps a mapping. The whole mapping becomes the region.
    pub fn new(mem: Arc<dyn SharedMemory>) -> Self {
        let base = mem.base();
        let len = mem.size();
        assert_eq!(base as usize % 8, 0, "shared memory must be 8-byte aligned");
        RawRegion { mem, base, len }
    }

    /// Size of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether stores are allowed (false for a read-only status mapping).
    pub fn writable(&self) -> bool {
        self.mem.writable()
    }

    #[inline]
    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds { offset, len, size: self.len }),
        }
    }

    /// The 32-bit atomic word at `offset`.
    ///
    /// Offsets come from the validated layout, never from shared memory, so a bad one is a bug:
    /// it panics rather than touching memory outside the region.
    #[inline]
    pub fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && self.check(offset, 4).is_ok(),
            "layout bug: u32 at {offset} in a {}-byte region",
            self.len
        );
        // SAFETY: `offset + 4 <= len` and `offset` is 4-aligned (base is 8-aligned), checked
        // above; the mapping lives as long as `self` (it holds the `Arc`), and `AtomicU32` may
        // alias memory that others write concurrently with atomic operations.
        unsafe { AtomicU32::from_ptr(self.base.add(offset).cast::<u32>()) }
    }

    /// The 64-bit atomic word at `offset` (see [`RawRegion::u32_at`]).
    #[inline]
    pub fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && self.check(offset, 8).is_ok(),
            "layout bug: u64 at {offset} in a {}-byte region",
            self.len
        );
        // SAFETY: `offset + 8 <= len`, `offset` is 8-aligned and base is 8-aligned (checked
        // above and in `new`); the mapping outlives the reference, and atomics may alias
        // concurrently written memory.
        unsafe { AtomicU64::from_ptr(self.base.add(offset).cast::<u64>()) }
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    #[inline]
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, dst.len())?;
        // SAFETY: `offset + dst.len() <= len` was checked above; the source is raw shared memory
        // (no reference to it is formed) and `dst` is a local buffer, so they do not overlap.
        unsafe { ptr::copy_nonoverlapping(self.base.add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the region at `offset`.
    #[inline]
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, src.len())?;
        debug_assert!(self.writable(), "store into a read-only mapping");
        // SAFETY: `offset + src.len() <= len` was checked above and the mapping is writable; the
        // destination is raw shared memory (no reference formed), `src` is local memory.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(offset), src.len()) };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with zeros.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        self.check(offset, len)?;
        debug_assert!(self.writable(), "store into a read-only mapping");
        // SAFETY: the range was checked above and the mapping is writable.
        unsafe { ptr::write_bytes(self.base.add(offset), 0, len) };
        Ok(())
    }

    /// Writes `prefix` (local memory, e.g. a virtio-net header; may be empty) followed by the
    /// byte ranges `ranges` (offset, length) of the region to `fd` with one `writev`, without
    /// copying the ranges through a local buffer. `iov` is caller-owned scratch space so the
    /// hot path does not allocate.
    ///
    /// The bytes may be changed by their writer while the kernel copies them; that only garbles
    /// that writer's own frame.
    pub fn writev_to(
        &self,
        fd: RawFd,
        prefix: &[u8],
        ranges: &[(usize, usize)],
        iov: &mut Vec<libc::iovec>,
    ) -> Result<io::Result<usize>, OutOfBounds> {
        iov.clear();
        if !prefix.is_empty() {
            // The kernel only reads through this pointer (writev), so casting away const is fine.
            iov.push(libc::iovec {
                iov_base: prefix.as_ptr() as *mut libc::c_void,
                iov_len: prefix.len(),
            });
        }
        for &(offset, len) in ranges {
            self.check(offset, len)?;
            iov.push(libc::iovec {
                // SAFETY: `offset + len <= self.len` was checked just above.
                iov_base: unsafe { self.base.add(offset) }.cast(),
                iov_len: len,
            });
        }
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points inside the live mapping (checked above) or to `prefix`, which
        // is borrowed for the call, and `count` does not exceed the vector's length; the kernel
        // only reads from these buffers.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), count) };
        Ok(if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) })
    }

    /// Reads one datagram-like unit (a frame from a TAP) from `fd` straight into the region
    /// ranges `ranges`, with one `readv`.
    pub fn readv_from(
        &self,
        fd: RawFd,
        ranges: &[(usize, usize)],
        iov: &mut Vec<libc::iovec>,
    ) -> Result<io::Result<usize>, OutOfBounds> {
        debug_assert!(self.writable(), "store into a read-only mapping");
        iov.clear();
        for &(offset, len) in ranges {
            self.check(offset, len)?;
            iov.push(libc::iovec {
                // SAFETY: `offset + len <= self.len` was checked just above.
                iov_base: unsafe { self.base.add(offset) }.cast(),
                iov_len: len,
            });
        }
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points inside the live, writable mapping (checked above); the
        // kernel writes at most `iov_len` bytes to each.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), count) };
        Ok(if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn test_copy_out_of_bounds_is_refused() {
        let r = RawRegion::new(Arc::new(HeapMemory::new(64)));
        let mut buf = [0u8; 8];
        assert!(r.copy_out(56, &mut buf).is_ok());
        assert_eq!(r.copy_out(57, &mut buf), Err(OutOfBounds { offset: 57, len: 8, size: 64 }));
        assert!(r.copy_out(usize::MAX, &mut buf).is_err());
        assert!(r.copy_in(60, &buf).is_err());
    }

    #[test]
    fn test_atomics_and_copies_see_the_same_bytes() {
        let r = RawRegion::new(Arc::new(HeapMemory::new(64)));
        r.u32_at(4).store(0x0403_0201, Ordering::Relaxed);
        let mut buf = [0u8; 4];
        r.copy_out(4, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        r.copy_in(8, &[9; 8]).unwrap();
        assert_eq!(r.u64_at(8).load(Ordering::Relaxed), 0x0909_0909_0909_0909);
    }

    #[test]
    #[should_panic(expected = "layout bug")]
    fn test_u64_past_the_end_panics_instead_of_touching_memory() {
        let r = RawRegion::new(Arc::new(HeapMemory::new(64)));
        r.u64_at(64);
    }
}
