//! The `file` backend: a plain shared file (`/dev/shm/...`, a hugetlbfs file, any file), mapped
//! shared, polled for new frames. For tests and simple single-host setups.
//!
//! Memory faults are errors, not deaths: the file is allocated up front (`fallocate`), so a full
//! tmpfs is a clear error at start rather than a SIGBUS under traffic; the mapping is guarded
//! ([`crate::sys::sigbus`]) against a truncation by someone else; a file this process created is
//! removed again when the start fails; and a file deleted or replaced under running members is
//! reported by their heartbeat (see [`crate::region::BackingCheck`]). New files are created with
//! mode 0600 unless the caller says otherwise ([`CreateMode`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::region::raw::ReadOnlyMapping;
use crate::region::{BackingCheck, GeometryRequest, PeerState, Region, RegionError};
use crate::sys;

/// Why the region file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileBackendError {
    /// Open or create failed.
    #[error("cannot open region file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file does not exist and no size was given to create it.
    #[error("region file {path} does not exist: give --size to create it")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// Sizing the new file failed.
    #[error("cannot size region file {path} to {size} bytes: {source}")]
    Size {
        /// The file.
        path: PathBuf,
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is empty and cannot be mapped.
    #[error("region file {path} is empty: give --size to size it")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// mmap failed.
    #[error("cannot map region file {path}: {source}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The filesystem has no room for the region.
    #[error(
        "no room for region file {path}: it needs {size} bytes but its filesystem has {free} \
         free; use a smaller --size, or give the filesystem more room (a tmpfs: mount -o \
         size=..., Docker: --shm-size)"
    )]
    NoSpace {
        /// The file.
        path: PathBuf,
        /// Bytes the region needs.
        size: u64,
        /// Bytes free on the filesystem.
        free: u64,
    },
    /// Setting the new file's mode or group failed.
    #[error("cannot set mode {mode:o} and group {group:?} of new region file {path}: {source}")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Requested mode.
        mode: u32,
        /// Requested group.
        group: Option<u32>,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The contents are not a usable region.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// What `status` was given is not a region file (empty, too short, not a regular file).
    #[error("{path} is not an ivnet region: {why}")]
    NotARegion {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        why: String,
    },
}

/// Mode and group of a region file (or socket) that ivnet creates. The default, 0600 with the
/// creator's group, lets in nobody but the creating user; QEMU or libvirt running as another
/// user are let in by group (`--mode 0660 --group kvm`, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateMode {
    /// Permission bits (at most 0o777).
    pub mode: u32,
    /// Group id to give the file, if not the creator's.
    pub group: Option<u32>,
}

impl Default for CreateMode {
    fn default() -> Self {
        CreateMode { mode: 0o600, group: None }
    }
}

impl CreateMode {
    /// Applies mode and group to a file just created (exactly: the umask does not apply).
    pub fn apply(&self, file: &File) -> io::Result<()> {
        if let Some(gid) = self.group {
            std::os::unix::fs::fchown(file, None, Some(gid))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(self.mode & 0o7777))
    }

    /// Applies mode and group to a path just created (a socket).
    pub fn apply_to_path(&self, path: &Path) -> io::Result<()> {
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode & 0o7777))
    }
}

/// A region file joined by [`attach_with`].
pub struct Attached {
    /// The open file (the doorbell server hands its descriptor out).
    pub file: File,
    /// The region in it.
    pub region: Region,
    /// Whether this process created the file.
    pub created: bool,
    path: PathBuf,
}

impl Attached {
    /// After a failed start: removes the file if this process created it and no other member
    /// has ever joined it (so nobody is split off), leaving nothing behind.
    pub fn discard_if_unused(&self) {
        if !self.created {
            return;
        }
        let max = self.region.geometry().max_peers;
        let used = (0..max).filter(|&id| self.region.peer(id).incarnation() != 0).count();
        let lively = (0..max)
            .filter(|&id| {
                !matches!(self.region.peer(id).state(), PeerState::Free | PeerState::Left)
            })
            .count();
        if used <= 1 && lively == 0 {
            remove_created(&self.path);
        } else {
            log::info!(
                "leaving region file {} in place: other members have joined it",
                self.path.display()
            );
        }
    }
}

fn remove_created(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            log::info!("removed region file {} (created by this failed start)", path.display())
        }
        Err(e) => {
            log::warn!("cannot remove region file {} that this start created: {e}", path.display())
        }
    }
}

/// Reports a region file deleted, replaced or truncated under running members.
struct FileBacking {
    path: PathBuf,
    file: File,
    dev: u64,
    ino: u64,
    len: u64,
}

impl BackingCheck for FileBacking {
    fn problem(&self) -> Option<String> {
        let split = "this member stays on the old segment, and a member that creates the file \
                     again starts a separate one: restart every member on one file";
        let open = self.file.metadata().ok()?;
        if open.nlink() == 0 {
            return Some(format!(
                "region file {} was deleted while in use; {split}",
                self.path.display()
            ));
        }
        if open.len() < self.len {
            return Some(format!(
                "region file {} was truncated to {} bytes while in use (it was {}): the lost \
                 pages read as zeros; recreate the region and restart its members",
                self.path.display(),
                open.len(),
                self.len
            ));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => None,
            Ok(_) => Some(format!(
                "region file {} was replaced by another file while in use; {split}",
                self.path.display()
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(format!(
                "region file {} was removed (renamed away?) while in use; {split}",
                self.path.display()
            )),
            Err(_) => None,
        }
    }
}

/// An exclusive `flock` for the duration of the sizing step (an OS lock, released by the
/// kernel if we die: never a lock in shared memory).
struct FlockGuard<'f>(&'f File);

/// The longest wait for another process's sizing step (a stopped process may hold the lock).
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl<'f> FlockGuard<'f> {
    fn new(f: &'f File) -> io::Result<Self> {
        let deadline = std::time::Instant::now() + LOCK_TIMEOUT;
        loop {
            match sys::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => return Ok(FlockGuard(f)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "another process has held its lock for {LOCK_TIMEOUT:?} (a \
                                 member stopped while creating the file?)"
                            ),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = sys::flock(self.0.as_raw_fd(), libc::LOCK_UN) {
            log::debug!("unlocking region file: {e}");
        }
    }
}

/// Opens (creating with `size` bytes if absent or empty, mode 0600) and joins the region file at
/// `path`.
pub fn attach(
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
) -> Result<Region, FileBackendError> {
    attach_with(path, size, req, &CreateMode::default()).map(|a| a.region)
}

/// As [`attach`], also returning the open file (the doorbell server hands its descriptor out).
pub fn attach_with_file(
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
) -> Result<(File, Region), FileBackendError> {
    attach_with(path, size, req, &CreateMode::default()).map(|a| (a.file, a.region))
}

/// Opens (creating it with `size` bytes, and `mode`, if absent or empty) and joins the region
/// file at `path`. The file is allocated in full first. If this fails, a file this call created
/// is removed again.
pub fn attach_with(
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
    mode: &CreateMode,
) -> Result<Attached, FileBackendError> {
    let open_err = |source| FileBackendError::Open { path: path.into(), source };
    let (file, created) = match size {
        Some(_) => match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode.mode & 0o777)
            .open(path)
        {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                (OpenOptions::new().read(true).write(true).open(path).map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        },
        None => {
            let f =
                OpenOptions::new().read(true).write(true).open(path).map_err(
                    |source| match source.kind() {
                        io::ErrorKind::NotFound => FileBackendError::Missing { path: path.into() },
                        _ => FileBackendError::Open { path: path.into(), source },
                    },
                )?;
            (f, false)
        }
    };
    let result = prepare(&file, path, size, req, mode, created);
    match result {
        Ok(region) => Ok(Attached { file, region, created, path: path.into() }),
        Err(e) => {
            if created {
                remove_created(path);
            }
            Err(e)
        }
    }
}

/// Sets permissions, sizes, allocates, maps and joins an open region file.
fn prepare(
    file: &File,
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
    mode: &CreateMode,
    created: bool,
) -> Result<Region, FileBackendError> {
    let req_err = |source| FileBackendError::Open { path: path.into(), source };
    if created {
        mode.apply(file).map_err(|source| FileBackendError::Permissions {
            path: path.into(),
            mode: mode.mode,
            group: mode.group,
            source,
        })?;
    }
    let len = {
        // Several members may start at once: size the file under an OS lock so they agree.
        let _lock = FlockGuard::new(file).map_err(req_err)?;
        let len = file.metadata().map_err(req_err)?.len();
        let target = if len == 0 {
            let Some(size) = size else {
                return Err(FileBackendError::Empty { path: path.into() });
            };
            size
        } else if let Some(size) = size.filter(|&s| s > len && is_blank(file, len)) {
            // Nobody initialised it (e.g. an earlier attempt with a too small --size): grow it
            // rather than trap the user with the old size.
            log::info!("growing blank region file {} from {len} to {size} bytes", path.display());
            size
        } else {
            if let Some(size) = size.filter(|&s| s != len) {
                log::info!(
                    "region file {} already exists with {len} bytes; using that, not --size {size}",
                    path.display()
                );
            }
            len
        };
        allocate(file, path, target, len)?;
        if len == 0 {
            log::info!("created region file {} of {target} bytes", path.display());
        }
        target
    };
    let map = memmap2::MmapOptions::new()
        .map_raw(file)
        .map_err(|source| FileBackendError::Map { path: path.into(), source })?;
    let mem = sys::sigbus::guard(Arc::new(map));
    let region = Region::attach(mem, &path.display().to_string(), req)?;
    let meta = file.metadata().map_err(req_err)?;
    let backing = FileBacking {
        path: path.into(),
        file: file.try_clone().map_err(req_err)?,
        dev: meta.dev(),
        ino: meta.ino(),
        len,
    };
    Ok(region.with_backing(Arc::new(backing)))
}

/// Sizes the file to `size` bytes (from `old`) and allocates all of it, so that writes through
/// the mapping never meet a full filesystem (a SIGBUS). A filesystem without `fallocate` is
/// used as it is, with a warning.
fn allocate(file: &File, path: &Path, size: u64, old: u64) -> Result<(), FileBackendError> {
    let free_before = sys::free_space(file.as_raw_fd()).unwrap_or(u64::MAX);
    if size != old {
        file.set_len(size).map_err(|source| FileBackendError::Size {
            path: path.into(),
            size,
            source,
        })?;
    }
    match sys::fallocate(file.as_raw_fd(), size) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            // Leave the file as we found it.
            if size != old {
                let _ = file.set_len(old);
            }
            Err(FileBackendError::NoSpace { path: path.into(), size, free: free_before })
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            log::warn!(
                "cannot allocate region file {} up front ({e}): if its filesystem fills up, \
                 writes to the region will fault",
                path.display()
            );
            Ok(())
        }
        Err(source) => Err(FileBackendError::Size { path: path.into(), size, source }),
    }
}

/// Whether the first page of the file is all zeros (no region header was ever written).
fn is_blank(file: &File, len: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(4096) as usize];
    file.read_exact_at(&mut buf, 0).is_ok() && buf.iter().all(|&b| b == 0)
}

/// Maps the region file at `path` read-only, for `status` (no write permission needed).
pub fn open_read_only(path: &Path) -> Result<Region, FileBackendError> {
    let file =
        File::open(path).map_err(|source| FileBackendError::Open { path: path.into(), source })?;
    let meta =
        file.metadata().map_err(|source| FileBackendError::Open { path: path.into(), source })?;
    // Say what it is, as opening it for writing (the agent) would; suggest nothing `status`
    // cannot do (it has no --size).
    let not_a_region = |why: String| FileBackendError::NotARegion { path: path.into(), why };
    if meta.is_dir() {
        let source = io::Error::from_raw_os_error(libc::EISDIR);
        return Err(FileBackendError::Open { path: path.into(), source });
    }
    if !meta.is_file() {
        return Err(not_a_region("it is not a regular file".into()));
    }
    let len = meta.len();
    if len == 0 {
        return Err(not_a_region("it is empty (no member has created the region in it)".into()));
    }
    let header = crate::region::layout::HEADER_SIZE as u64;
    if len < header {
        return Err(not_a_region(format!(
            "it has {len} bytes, fewer than a region's header ({header})"
        )));
    }
    let map = memmap2::MmapOptions::new()
        .map_raw_read_only(&file)
        .map_err(|source| FileBackendError::Map { path: path.into(), source })?;
    let mem = sys::sigbus::guard(Arc::new(ReadOnlyMapping(map)));
    Ok(Region::open_read_only(mem, &path.display().to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ivnet-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn test_new_files_are_private_unless_asked() {
        let dir = scratch("mode");
        let req = GeometryRequest::default();
        let a = attach_with(&dir.join("a"), Some(32 << 20), &req, &CreateMode::default()).unwrap();
        assert_eq!(a.file.metadata().unwrap().mode() & 0o777, 0o600);
        assert!(a.created);
        let open = CreateMode { mode: 0o640, group: None };
        let b = attach_with(&dir.join("b"), Some(32 << 20), &req, &open).unwrap();
        assert_eq!(b.file.metadata().unwrap().mode() & 0o777, 0o640);
        // Joining an existing file neither creates it nor changes its mode.
        let again = attach_with(&dir.join("b"), Some(32 << 20), &req, &CreateMode::default());
        let again = again.unwrap();
        assert!(!again.created);
        assert_eq!(again.file.metadata().unwrap().mode() & 0o777, 0o640);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn test_failed_start_removes_only_a_file_it_created() {
        let dir = scratch("cleanup");
        let req = GeometryRequest::default();
        let path = dir.join("small");
        let e = attach_with(&path, Some(64 << 10), &req, &CreateMode::default()).err();
        assert!(e.is_some_and(|e| e.to_string().contains("use a larger --size")));
        assert!(!path.exists(), "a failed start left the file it created");
        // A file that was there before stays.
        std::fs::write(&path, b"").unwrap();
        assert!(attach_with(&path, Some(64 << 10), &req, &CreateMode::default()).is_err());
        assert!(path.exists(), "a file the start did not create was removed");
        // After a later failure: removed if nobody else joined, kept otherwise.
        let p2 = dir.join("later");
        let a = attach_with(&p2, Some(32 << 20), &req, &CreateMode::default()).unwrap();
        a.discard_if_unused();
        assert!(!p2.exists());
        let a = attach_with(&p2, Some(32 << 20), &req, &CreateMode::default()).unwrap();
        let other = a.region.peer(3);
        let inc = other.try_claim(0).unwrap();
        other.set_state(crate::region::PeerState::Up, inc);
        a.discard_if_unused();
        assert!(p2.exists(), "a file another member joined was removed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn test_deleted_or_replaced_file_is_reported() {
        let dir = scratch("backing");
        let path = dir.join("r");
        let req = GeometryRequest::default();
        let a = attach_with(&path, Some(32 << 20), &req, &CreateMode::default()).unwrap();
        assert_eq!(a.region.backing_problem(), None);
        std::fs::remove_file(&path).unwrap();
        let p = a.region.backing_problem().unwrap();
        assert!(p.contains("was deleted while in use"), "{p}");
        // Someone creates the path again: another segment, also reported.
        let b = attach_with(&path, Some(32 << 20), &req, &CreateMode::default()).unwrap();
        assert_eq!(b.region.backing_problem(), None);
        assert!(a.region.backing_problem().unwrap().contains("deleted"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
