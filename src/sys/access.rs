//! Permission checks without opening anything (`--check-config`): faccessat(2) with the
//! effective ids, as the service itself would be checked.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Whether this process may read and/or write `path` (and, for a directory, write means create
/// entries in it). `Err` carries the reason (EACCES, EROFS, ENOENT, ...).
pub fn check(path: &Path, read: bool, write: bool) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut mode = 0;
    if read {
        mode |= libc::R_OK;
    }
    if write {
        mode |= libc::W_OK;
    }
    if mode == 0 {
        mode = libc::F_OK;
    }
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call; faccessat reads
    // it and nothing else.
    let r = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_access_reports_missing_and_present_paths() {
        assert!(check(Path::new("/"), true, false).is_ok());
        let e = check(Path::new("/nonexistent/ivnet"), true, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
