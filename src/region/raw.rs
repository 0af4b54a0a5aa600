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

use crate::offload::csum;
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

    /// Copies `src` into the region at `offset` and returns its internet-checksum partial sum
    /// (as [`csum::add`]`(0, src)`), in one pass: the sum covers the private bytes, never what
    /// is in shared memory afterwards.
    #[inline]
    pub fn copy_in_summed(&self, offset: usize, src: &[u8]) -> Result<u64, OutOfBounds> {
        self.check(offset, src.len())?;
        debug_assert!(self.writable(), "store into a read-only mapping");
        // SAFETY: as for `copy_in`, offset + src.len() <= len, so `base + offset` and every
        // `at + piece.len() <= src.len()` below stay inside the writable mapping.
        let dst = unsafe { self.base.add(offset) };
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above); `dst` has room for `src` (above).
            return Ok(unsafe { copy_summed_avx2(src, dst) });
        }
        // SAFETY: `dst` has room for `src` (above).
        Ok(unsafe { copy_summed(src, dst) })
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

/// [`RawRegion::copy_in_summed`] on any CPU: 32-byte blocks copied in the summing loop.
///
/// # Safety
///
/// `dst` must be valid for writes of `src.len()` bytes.
unsafe fn copy_summed(src: &[u8], dst: *mut u8) -> u64 {
    csum::add_visiting(0, src, |at, piece| match <&[u8; 32]>::try_from(piece) {
        // A volatile store keeps the copy in the summing loop: a plain one lets the compiler
        // hoist all of them into one memcpy before the loop, two passes again.
        // SAFETY: `at + 32 <= src.len()`, inside the caller's range; `[u8; 32]` has alignment 1.
        Ok(block) => unsafe { ptr::write_volatile(dst.add(at).cast::<[u8; 32]>(), *block) },
        // SAFETY: `at + piece.len() <= src.len()`; `piece` is local memory.
        Err(_) => unsafe { ptr::copy_nonoverlapping(piece.as_ptr(), dst.add(at), piece.len()) },
    })
}

/// [`RawRegion::copy_in_summed`] with AVX2: 64 bytes per step are loaded, stored and summed
/// from the same registers, as 16-bit words in 32-bit lanes (the low and the high half of each
/// lane added separately, so no carry is lost). A lane takes two words per step, so the lanes
/// are emptied into 64-bit sums every [`AVX2_FLUSH`] steps, long before they could overflow.
///
/// The sum of native-order 16-bit words folds to the same value as the native-order 64-bit
/// word sum of the portable path (both are the one's-complement sum, RFC 1071 §2).
///
/// Copies of [`STREAM_MIN`] bytes or more bypass the cache (see [`copy_summed_avx2_lines`]).
///
/// # Safety
///
/// The CPU must support AVX2, and `dst` must be valid for writes of `src.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_summed_avx2(src: &[u8], dst: *mut u8) -> u64 {
    if src.len() < STREAM_MIN {
        // SAFETY: the caller's contract.
        return unsafe { copy_summed_avx2_blocks::<false>(src, dst) };
    }
    // SAFETY: the caller's contract.
    unsafe { copy_summed_avx2_lines(src, dst) }
}

/// [`copy_summed_avx2`] for a large copy: the whole cache lines of the destination are written
/// with non-temporal (streaming) stores, which go to memory without first fetching each line.
/// The consumer of a ring runs on another CPU and read these lines last time round, so an
/// ordinary store must take every line back from that CPU's cache before it can write it; a
/// streaming store does not, and the consumer then reads the frame from memory. Measured here
/// (a producer and a consumer thread on the two CPUs, 64 KiB frames through a 1 MiB ring):
/// 14.6-18.5 GB/s against 2.4-11.8, the low figures when the two vCPUs are far apart on the
/// host. The partial lines at either end are written the ordinary way. Ends with a store fence:
/// streaming stores are weakly ordered, and the index that publishes the frame (a release
/// store) must not become visible before them.
///
/// # Safety
///
/// The CPU must support AVX2, and `dst` must be valid for writes of `src.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_summed_avx2_lines(src: &[u8], dst: *mut u8) -> u64 {
    let head = dst.align_offset(64).min(src.len());
    let (first, rest) = src.split_at(head);
    // SAFETY: `first` goes to `dst .. dst + head`, `rest` to the following bytes, together the
    // caller's range; `dst + head` is 64-byte aligned, as streaming 32-byte stores need.
    let (a, b) = unsafe {
        let a = copy_summed_avx2_blocks::<false>(first, dst);
        let b = copy_summed_avx2_blocks::<true>(rest, dst.add(head));
        std::arch::x86_64::_mm_sfence();
        (a, b)
    };
    // `rest` starts at offset `head` of the summed bytes: swapped back if that is odd.
    csum::combine(a, if head % 2 == 1 { csum::at_odd_offset(b) } else { b })
}

/// Copies below this many bytes use ordinary stores: a frame this small is read by the consumer
/// soon, often from the cache, and a streaming store would send it to memory.
#[cfg(target_arch = "x86_64")]
const STREAM_MIN: usize = 4096;

/// The loop of [`copy_summed_avx2`]; `STREAM`: the 64-byte blocks are written with streaming
/// stores (the caller fences).
///
/// # Safety
///
/// The CPU must support AVX2, and `dst` must be valid for writes of `src.len()` bytes, and
/// 32-byte aligned if `STREAM`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_summed_avx2_blocks<const STREAM: bool>(src: &[u8], dst: *mut u8) -> u64 {
    use std::arch::x86_64::*;
    let low = _mm256_set1_epi32(0xffff);
    let mut total: u64 = 0;
    let (blocks, rest) = src.as_chunks::<64>();
    for (n, chunk) in blocks.chunks(AVX2_FLUSH).enumerate() {
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for (i, block) in chunk.iter().enumerate() {
            let at = (n * AVX2_FLUSH + i) * 64;
            let p = block.as_ptr().cast::<__m256i>();
            // SAFETY: `block` is 64 readable bytes; `dst + at + 64 <= dst + src.len()`, writable
            // by the caller's contract; unaligned loads and stores need no alignment, streaming
            // stores 32 bytes, which `dst` (the caller's contract) and `at` have.
            let (v, w) = unsafe {
                let (v, w) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
                if STREAM {
                    _mm256_stream_si256(dst.add(at).cast(), v);
                    _mm256_stream_si256(dst.add(at + 32).cast(), w);
                } else {
                    _mm256_storeu_si256(dst.add(at).cast(), v);
                    _mm256_storeu_si256(dst.add(at + 32).cast(), w);
                }
                (v, w)
            };
            a = _mm256_add_epi32(
                a,
                _mm256_add_epi32(_mm256_and_si256(v, low), _mm256_srli_epi32(v, 16)),
            );
            b = _mm256_add_epi32(
                b,
                _mm256_add_epi32(_mm256_and_si256(w, low), _mm256_srli_epi32(w, 16)),
            );
        }
        let mut lanes = [0u32; 16];
        // SAFETY: `lanes` is 64 writable bytes.
        unsafe {
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), a);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(8).cast(), b);
        }
        total += lanes.iter().map(|&l| u64::from(l)).sum::<u64>();
    }
    let at = src.len() - rest.len();
    // SAFETY: the tail goes to `dst + at .. dst + src.len()`, inside the caller's range.
    unsafe { ptr::copy_nonoverlapping(rest.as_ptr(), dst.add(at), rest.len()) };
    // The tail starts at a multiple of 64, an even offset: its sum adds as it is.
    csum::combine(csum::from_native(total), csum::add(0, rest))
}

/// Steps of [`copy_summed_avx2`] between emptying its lanes: each step adds at most 2 x 0xffff
/// to a lane, so 16384 steps (1 MiB) stay below 2^32.
#[cfg(target_arch = "x86_64")]
const AVX2_FLUSH: usize = 16384;

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
    fn test_copy_in_summed_copies_and_sums_every_length() {
        let r = RawRegion::new(Arc::new(HeapMemory::new(16384)));
        let src: Vec<u8> = (0..9100u32).map(|i| (i * 37 + 11 + i / 251) as u8).collect();
        // Around the AVX2 block, and around the size from which whole lines are streamed.
        let lens = [0, 1, 2, 31, 32, 33, 63, 64, 65, 128, 191, 300, 4095, 4096, 4097, 9000];
        for len in lens {
            for start in [0, 1, 7] {
                // The destination odd, on a cache line, and just past one.
                for at in [101, 128, 130] {
                    let piece = &src[start..start + len];
                    for way in 0..4 {
                        r.zero(0, 16384).unwrap();
                        // SAFETY: 130 + 9000 bytes lie inside the 16384-byte mapping.
                        let dst = unsafe { r.base.add(at) };
                        let sum = match way {
                            0 => r.copy_in_summed(at, piece).unwrap(),
                            // SAFETY: see `dst`.
                            1 => unsafe { copy_summed(piece, dst) },
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: see `dst`, and the CPU has AVX2.
                            2 if std::is_x86_feature_detected!("avx2") => unsafe {
                                copy_summed_avx2(piece, dst)
                            },
                            // The streaming path at every length, also below STREAM_MIN.
                            #[cfg(target_arch = "x86_64")]
                            // SAFETY: see `dst`, and the CPU has AVX2.
                            3 if std::is_x86_feature_detected!("avx2") => unsafe {
                                copy_summed_avx2_lines(piece, dst)
                            },
                            _ => continue,
                        };
                        let what = format!("way {way}, len {len}, start {start}, at {at}");
                        assert_eq!(csum::fold(sum), csum::fold(csum::add(0, piece)), "{what}");
                        let mut back = vec![0u8; piece.len() + 2];
                        r.copy_out(at - 1, &mut back).unwrap();
                        assert!(&back[1..=piece.len()] == piece, "{what}: bytes differ");
                        assert_eq!((back[0], back[piece.len() + 1]), (0, 0), "{what}: outside");
                    }
                }
            }
        }
        assert!(r.copy_in_summed(16000, &src[..1000]).is_err());
    }

    /// One pass against two: `cargo test --release --lib copy_in_summed_throughput -- --ignored
    /// --nocapture`. Prints figures; asserts nothing.
    #[test]
    #[ignore = "prints a throughput figure; run by hand in release mode"]
    fn copy_in_summed_throughput() {
        // A ring area in cache, and one larger than the caches.
        for area in [1usize << 20, 32 << 20] {
            let r = RawRegion::new(Arc::new(HeapMemory::new(area)));
            let src: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
            let rounds = (256 << 20) / src.len();
            let run = |fused: bool| {
                let t = std::time::Instant::now();
                let mut s = 0u64;
                for i in 0..rounds {
                    let off = (i * src.len()) % area;
                    s = csum::combine(
                        s,
                        if fused {
                            r.copy_in_summed(off, &src).unwrap()
                        } else {
                            let s = csum::add(0, std::hint::black_box(&src));
                            r.copy_in(off, &src).unwrap();
                            s
                        },
                    );
                }
                ((rounds * src.len()) as f64 / t.elapsed().as_secs_f64() / 1e9, s)
            };
            for _ in 0..3 {
                let (two, a) = run(false);
                let (one, b) = run(true);
                assert_eq!(csum::fold(a), csum::fold(b));
                println!(
                    "{} KiB area: sum then copy {two:.1} GB/s, copy while summing {one:.1} GB/s",
                    area >> 10
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "layout bug")]
    fn test_u64_past_the_end_panics_instead_of_touching_memory() {
        let r = RawRegion::new(Arc::new(HeapMemory::new(64)));
        r.u64_at(64);
    }
}
