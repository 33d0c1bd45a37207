//! Which file a disk adopted through the API really is (STYLE.md 13: compare files by
//! device and inode, never by path text), and whether the daemon may take it.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::ServiceError;
use crate::registry::{Disk, Registry};
use crate::store::safe_open::{self, How, Parents};
use crate::store::{inuse, FileIdentity};

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

/// The state directory, resolved once at start.
pub fn canonical_state_dir(state: &Path) -> Result<PathBuf, ServiceError> {
    std::fs::canonicalize(state).map_err(|source| ServiceError::Io {
        what: format!("cannot resolve the state directory {}", state.display()),
        source,
    })
}

/// (device, inode) of an existing file.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// What the file at `path` is, for the registry: opened never through a symbolic link (in
/// any component: `path` is canonical), never waiting, a regular file of `size` bytes.
/// Taken when a disk is made or adopted; every job checks it again (DESIGN.md §6).
pub fn identity_of(path: &Path, size: u64) -> Result<FileIdentity, ServiceError> {
    let how = How::READ.parents(Parents::NoSymlinks);
    let io = |source| ServiceError::Io {
        what: format!("cannot open the disk file {}", path.display()),
        source,
    };
    let file = safe_open::open(path, "disk file", how)
        .map_err(|e| ServiceError::Invalid(e.to_string()))?
        .ok_or_else(|| io(io::ErrorKind::NotFound.into()))?;
    let id = FileIdentity::of(&file).map_err(io)?;
    if id.size != size {
        return Err(ServiceError::Invalid(format!(
            "disk file {} has {}, not {}; give its real size or another path",
            path.display(),
            crate::units::bytes(id.size),
            crate::units::bytes(size)
        )));
    }
    Ok(id)
}

/// Registry entries written before disks had an identity get the one of the file their
/// path names now, if it is a regular file of the disk's size reached without a symbolic
/// link; otherwise the entry stays without one (a job still never follows a link, and
/// pins the file it opens first) and a warning says why.
pub fn record_missing_identity(d: &mut Disk, registry: &Registry) {
    if d.identity.is_some() {
        return;
    }
    // A managed disk's path was derived from the state directory as given (perhaps through
    // a symbolic link); it lives in the daemon's own directory, so its canonical form is
    // the one to keep. An adopted path was canonical already.
    if d.managed {
        if let Ok(p) = std::fs::canonicalize(&d.path) {
            d.path = p;
        }
    }
    match identity_of(&d.path, d.size) {
        Ok(id) => {
            d.identity = Some(id);
            match registry.put_disk(d) {
                Ok(()) => {
                    tracing::info!(disk = %d.name, identity = %id, "recorded the identity of the disk's file (an entry from before identities were kept)")
                }
                Err(e) => {
                    tracing::warn!(disk = %d.name, error = %e, "cannot record the identity of the disk's file")
                }
            }
        }
        Err(e) => {
            tracing::warn!(disk = %d.name, error = %e, "cannot record the identity of the disk's file; its jobs will refuse it if it is not a regular file")
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::DiskState;

    fn disk(path: PathBuf, size: u64) -> Disk {
        Disk {
            name: "old".into(),
            id: "00".repeat(16),
            path,
            size,
            sector_size: 512,
            state: DiskState::Sealed,
            dangling: true,
            managed: false,
            grace_until_ms: None,
            error: None,
            created_unix: 1,
            record_expected: true,
            volume: None,
            identity: None,
        }
    }

    /// An entry from before identities were kept gets the one of its file, durably; a
    /// symbolic link or a file of another size in its place is not taken for it.
    #[test]
    fn an_old_entry_gets_its_identity_unless_the_path_is_a_link_or_the_size_differs() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("registry.redb")).unwrap();
        let f = std::fs::canonicalize(dir.path()).unwrap().join("a.img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let mut d = disk(f.clone(), 4096);
        record_missing_identity(&mut d, &reg);
        let id = d.identity.unwrap();
        assert_eq!(id.ino, std::fs::metadata(&f).unwrap().ino());
        assert_eq!(reg.disks().unwrap()[0].identity, Some(id));

        let mut wrong_size = disk(f.clone(), 8192);
        record_missing_identity(&mut wrong_size, &reg);
        assert_eq!(wrong_size.identity, None);

        let link = f.with_file_name("link.img");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let mut linked = disk(link, 4096);
        record_missing_identity(&mut linked, &reg);
        assert_eq!(linked.identity, None);
    }
}
