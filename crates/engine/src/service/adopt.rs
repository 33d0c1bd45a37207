//! Which file a disk adopted through the API really is (STYLE.md 13: compare files by
//! device and inode, never by path text), and whether the daemon may take it.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::ServiceError;
use crate::store::inuse;

/// The canonical form of an absolute `path` that may not exist yet: symlinks and `..`
/// resolved (the parent must exist; the last component, if it does not exist, must be a
/// plain name).
pub fn canonical(path: &Path) -> Result<PathBuf, ServiceError> {
    let io_err = |source| ServiceError::Io {
        what: format!("cannot resolve the disk path {}", path.display()),
        source,
    };
    match std::fs::canonicalize(path) {
        Ok(p) => return Ok(p),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(e)),
        Err(_) => {}
    }
    let (Some(parent), Some(Component::Normal(name))) =
        (path.parent(), path.components().next_back())
    else {
        return Err(ServiceError::Invalid(format!(
            "disk path {} does not name a file; give the full path of a file",
            path.display()
        )));
    };
    let parent = std::fs::canonicalize(parent).map_err(|e| {
        ServiceError::Invalid(format!(
            "the directory of disk path {} cannot be used ({e}); create it first",
            path.display()
        ))
    })?;
    Ok(parent.join(name))
}

/// Refuse a path the daemon must not adopt: inside its state directory (its registry,
/// its managed disks), or in use by the kernel (attached to a loop device, mounted).
pub fn check_adoptable(path: &Path, state_dir: &Path) -> Result<(), ServiceError> {
    let state = std::fs::canonicalize(state_dir).map_err(|source| ServiceError::Io {
        what: format!("cannot resolve the state directory {}", state_dir.display()),
        source,
    })?;
    if path.starts_with(&state) {
        return Err(ServiceError::Invalid(format!(
            "disk path {} is inside the state directory {} (it holds the registry and the managed disks); pick a path outside it",
            path.display(),
            state.display()
        )));
    }
    if !path.exists() {
        return Ok(());
    }
    let used = inuse::describe_use(path).map_err(|source| ServiceError::Io {
        what: format!("cannot tell whether {} is in use", path.display()),
        source,
    })?;
    match used {
        Some(how) => Err(ServiceError::Busy(format!(
            "{} is {how}: sealing it would rewrite it under its users; unmount and detach it first, or pick another file",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// (device, inode) of an existing file.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
