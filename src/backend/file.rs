//! The `file` backend: a plain shared file (`/dev/shm/...`, a hugetlbfs file, any file), mapped
//! shared, polled for new frames. For tests and simple single-host setups.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::region::raw::ReadOnlyMapping;
use crate::region::{GeometryRequest, Region, RegionError};
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

/// An exclusive `flock` for the duration of the sizing step (an OS lock, released by the
/// kernel if we die: never a lock in shared memory).
struct FlockGuard<'f>(&'f File);

impl<'f> FlockGuard<'f> {
    fn new(f: &'f File) -> io::Result<Self> {
        sys::flock(f.as_raw_fd(), libc::LOCK_EX)?;
        Ok(FlockGuard(f))
    }
}

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = sys::flock(self.0.as_raw_fd(), libc::LOCK_UN) {
            log::debug!("unlocking region file: {e}");
        }
    }
}

/// Opens (creating with `size` bytes if absent or empty) and joins the region file at `path`.
pub fn attach(
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
) -> Result<Region, FileBackendError> {
    attach_with_file(path, size, req).map(|(_, region)| region)
}

/// As [`attach`], also returning the open file (the doorbell server hands its descriptor out).
pub fn attach_with_file(
    path: &Path,
    size: Option<u64>,
    req: &GeometryRequest,
) -> Result<(File, Region), FileBackendError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(size.is_some())
        .mode(0o660)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound if size.is_none() => {
                FileBackendError::Missing { path: path.into() }
            }
            _ => FileBackendError::Open { path: path.into(), source },
        })?;
    {
        // Several members may start at once: size the file under an OS lock so they agree.
        let _lock = FlockGuard::new(&file)
            .map_err(|source| FileBackendError::Open { path: path.into(), source })?;
        let len = file
            .metadata()
            .map_err(|source| FileBackendError::Open { path: path.into(), source })?
            .len();
        if len == 0 {
            let Some(size) = size else {
                return Err(FileBackendError::Empty { path: path.into() });
            };
            file.set_len(size).map_err(|source| FileBackendError::Size {
                path: path.into(),
                size,
                source,
            })?;
            log::info!("created region file {} of {size} bytes", path.display());
        } else if let Some(size) = size.filter(|&s| s > len && is_blank(&file, len)) {
            // Nobody initialised it (e.g. an earlier attempt with a too small --size): grow it
            // rather than trap the user with the old size.
            file.set_len(size).map_err(|source| FileBackendError::Size {
                path: path.into(),
                size,
                source,
            })?;
            log::info!("grew blank region file {} from {len} to {size} bytes", path.display());
        } else if let Some(size) = size.filter(|&s| s != len) {
            log::info!(
                "region file {} already exists with {len} bytes; using that, not --size {size}",
                path.display()
            );
        }
    }
    let map = memmap2::MmapOptions::new()
        .map_raw(&file)
        .map_err(|source| FileBackendError::Map { path: path.into(), source })?;
    let region = Region::attach(Arc::new(map), &path.display().to_string(), req)?;
    Ok((file, region))
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
    Ok(Region::open_read_only(Arc::new(ReadOnlyMapping(map)), &path.display().to_string())?)
}
