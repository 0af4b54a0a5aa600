//! Memory faults in shared mappings are errors, not deaths.
//!
//! A shared file mapping raises SIGBUS when the page behind an access no longer exists: the file
//! was truncated by someone else, or (without allocation up front) its filesystem ran out of
//! space. Region files are allocated up front (`fallocate`), which is the main defence; this
//! module is the second: for a mapping registered with [`guard`], a SIGBUS handler replaces the
//! faulting page with a private zero page (as Wayland compositors do for client buffers) and
//! counts it, so the access completes and the process lives on. The member then sees zeros
//! where the lost page was (rings there look empty or inconsistent, which the ring parser
//! already survives) and reports the fault at its next heartbeat ([`faults`]).
//!
//! Faults outside guarded mappings go to the previous handler (Rust's own, which reports stack
//! overflows) or, without one, kill the process as before.

use std::mem;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

use crate::region::SharedMemory;

/// Mappings that can be guarded at once (regions are few: one per member, a few in tests).
const MAX_GUARDED: usize = 64;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: (AtomicUsize, AtomicUsize) = (AtomicUsize::new(0), AtomicUsize::new(0));
/// (base, length) of each guarded mapping; base 0 marks a free entry.
static RANGES: [(AtomicUsize, AtomicUsize); MAX_GUARDED] = [EMPTY; MAX_GUARDED];
/// Base of an entry being filled in.
const RESERVED: usize = usize::MAX;
static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Pages replaced with private zero pages since the process started.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// Replaces the page of `addr` (in a mapping of pages of `size` bytes) with a private zero page.
fn replace_page(addr: usize, size: usize) -> bool {
    let page = addr & !(size - 1);
    // SAFETY: MAP_FIXED over a page that lies inside a mapping registered with `guard`, which
    // is alive (it unregisters before it is unmapped). Nothing holds a Rust reference into it
    // (shared memory is accessed through raw pointers and atomics only), so swapping the page
    // under the faulting access is like another process writing zeros into it.
    let p = unsafe {
        libc::mmap(
            page as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a handler installed with SA_SIGINFO.
    let addr = unsafe { (*info).si_addr() } as usize;
    for (base, len) in &RANGES {
        let b = base.load(Ordering::Acquire);
        let l = len.load(Ordering::Acquire);
        if b != 0 && b != RESERVED && addr >= b && addr - b < l {
            // A small page first; a huge-page mapping (hugetlbfs) needs a 2 MiB replacement.
            if replace_page(addr, PAGE_SIZE.load(Ordering::Relaxed)) || replace_page(addr, 2 << 20)
            {
                FAULTS.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    // Not ours: hand over to the handler that was there before.
    match PREVIOUS.get() {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a previous SA_SIGINFO handler has exactly this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a previous plain handler has exactly this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Die as without us: restore the default action; returning re-runs the access.
            // SAFETY: sigaction is plain data; SIG_DFL needs no handler pointer.
            unsafe {
                let mut dfl: libc::sigaction = mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: sigaction is plain data, filled below; the handler has the SA_SIGINFO
        // signature and only calls async-signal-safe functions (mmap, sigaction) and atomics.
        unsafe {
            let mut old: libc::sigaction = mem::zeroed();
            let mut new: libc::sigaction = mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                let _ = PREVIOUS.set(old);
            } else {
                log::warn!(
                    "cannot install a SIGBUS handler: {}; a truncated region file will kill \
                     this process",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// Shared memory whose page faults are recovered from while it is registered.
pub struct Guarded {
    inner: Arc<dyn SharedMemory>,
    index: Option<usize>,
}

// SAFETY: forwards to `inner`, which upholds the contract; the guard only adds bookkeeping.
unsafe impl SharedMemory for Guarded {
    fn base(&self) -> *mut u8 {
        self.inner.base()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn writable(&self) -> bool {
        self.inner.writable()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Unregister before `inner` (dropped after this) unmaps the memory.
        if let Some(i) = self.index {
            RANGES[i].0.store(0, Ordering::Release);
        }
    }
}

/// Registers a mapping for SIGBUS recovery (installing the handler on first use). When the
/// table is full the mapping is returned unguarded (logged): it works, but a truncation of its
/// file would kill the process as before.
pub fn guard(mem: Arc<dyn SharedMemory>) -> Arc<dyn SharedMemory> {
    install();
    let (base, len) = (mem.base() as usize, mem.size());
    let mut index = None;
    for (i, (b, l)) in RANGES.iter().enumerate() {
        // Reserve the entry, then publish length before base: the handler never sees a base
        // with another mapping's length.
        if b.compare_exchange(0, RESERVED, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            l.store(len, Ordering::Release);
            b.store(base, Ordering::Release);
            index = Some(i);
            break;
        }
    }
    if index.is_none() {
        log::debug!("SIGBUS guard table full: mapping at {base:#x} is not guarded");
    }
    Arc::new(Guarded { inner: mem, index })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn test_truncated_file_mapping_reads_zeros_instead_of_killing() {
        let path =
            std::env::temp_dir().join(format!("ivnet-sigbus-{}-{:?}", std::process::id(), 1));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(64 << 10).unwrap();
        let map = memmap2::MmapOptions::new().map_raw(&f).unwrap();
        let mem = guard(Arc::new(map));
        let p = mem.base();
        // SAFETY: the mapping is 64 KiB long and alive; the file backs every page.
        unsafe { p.add(40 << 10).write_volatile(7) };
        let before = faults();
        // Truncate under the mapping: the last pages no longer exist.
        // SAFETY: ftruncate on a descriptor we own.
        assert_eq!(unsafe { libc::ftruncate(f.as_raw_fd(), 8 << 10) }, 0);
        // SAFETY: the address is inside the live mapping; its page is gone from the file, so the
        // access faults and the handler replaces the page.
        let v = unsafe { p.add(40 << 10).read_volatile() };
        assert_eq!(v, 0);
        assert!(faults() > before);
        drop(mem);
        std::fs::remove_file(&path).unwrap();
    }
}
