//! Free space on the file system that holds a path.

use crate::error::{Error, Result};
use std::path::Path;

/// Bytes an unprivileged process may still write on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(path).map_err(|e| Error::io("statvfs", path, e.into()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_temp_dir_has_some_free_space() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(super::free_bytes(d.path()).expect("statvfs") > 0);
        assert!(super::free_bytes(&d.path().join("missing")).is_err());
    }
}
