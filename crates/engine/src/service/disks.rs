//! Disks are made and forgotten here: `disk create` (a sparse file in `STATE/disks/`, or an
//! adopted file checked by device and inode), `disk rm` (which never loses sealed data
//! unless told to), and the file helpers they share with the volume plugin.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::runner::storage_of;
use super::{adopt, lock, now_ms, valid_name, DiskView, Result, Service, ServiceError};
use crate::jobs;
use crate::registry::{Disk, DiskState};
use crate::store::file::default_record_path;

impl Service {
    /// Register a new disk: a sparse file of `size` bytes in `STATE/disks/`, or at `path`.
    pub async fn create_disk(
        &self,
        name: &str,
        size: u64,
        path: Option<PathBuf>,
    ) -> Result<DiskView> {
        if !valid_name(name, 64) {
            return Err(ServiceError::Invalid(format!(
                "disk name {name:?} is not 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit"
            )));
        }
        let sector = u64::from(self.s.cfg.sector_size);
        if size == 0 || !size.is_multiple_of(sector) {
            return Err(ServiceError::Invalid(format!(
                "size {} is not a positive multiple of the sector size {sector}; use for example 64M or 1G",
                crate::units::bytes(size)
            )));
        }
        let mut st = self.s.state.lock().await;
        if st.disks.contains_key(name) {
            return Err(ServiceError::Exists {
                kind: "disk",
                name: name.into(),
            });
        }
        let managed = path.is_none();
        let path = match path {
            Some(p) if p.is_absolute() => {
                let p = adopt::canonical(&p)?;
                adopt::check_adoptable(&p, &self.s.cfg.state_dir)?;
                p
            }
            Some(p) => {
                return Err(ServiceError::Invalid(format!(
                    "disk path {} is not absolute; give the full path",
                    p.display()
                )))
            }
            None => self
                .s
                .cfg
                .state_dir
                .join("disks")
                .join(format!("{name}.img")),
        };
        let id = adopt::file_id(&path);
        let same = |d: &&Disk| d.path == path || (id.is_some() && adopt::file_id(&d.path) == id);
        if let Some(other) = st.disks.values().find(same) {
            return Err(ServiceError::Busy(format!(
                "{} is the file of disk {:?} already (compared by device and inode); pick another file",
                path.display(),
                other.name
            )));
        }
        let created = create_file(&path, size, managed)?;
        // What the file is, checked again by every job (never through a symbolic link).
        let identity = match adopt::identity_of(&path, size) {
            Ok(id) => id,
            Err(e) => {
                if created {
                    let _ = std::fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        // A file sealed offline (its record beside it) is adopted as what it is: sealed.
        // Its first reclaim unseals it and checks its digests; nothing scrambled is served.
        let record_expected = default_record_path(&path).exists();
        let state = if record_expected {
            DiskState::Sealed
        } else {
            DiskState::Available
        };
        let d = Disk {
            name: name.into(),
            id: hex::encode(rand::random::<[u8; 16]>()),
            path,
            size,
            sector_size: self.s.cfg.sector_size,
            state,
            dangling: false,
            managed,
            grace_until_ms: None,
            error: None,
            created_unix: now_ms() / 1000,
            record_expected,
            volume: None,
            identity: Some(identity),
        };
        if let Err(e) = self.persist(&d) {
            if created {
                let _ = std::fs::remove_file(&d.path);
            }
            return Err(e);
        }
        self.gate(name).set(self.gate_state_for(name, state));
        st.disks.insert(name.into(), d.clone());
        Ok(self.view(&st, &d))
    }

    /// Delete a disk from the registry (and its file too when it lives in the state
    /// directory). A sealed or failed disk, or one whose file has a seal record, holds data
    /// that only its record can bring back: it is removed only when the caller says what to
    /// do with it — `shred` (crypto-erase it first, secure profile) or `keep_file` (keep the
    /// file and its record as they are, so `pdguard image unseal` can still restore it).
    /// Nothing else ever deletes a seal record, and an adopted file is never deleted.
    pub async fn remove_disk(&self, name: &str, shred: bool, keep_file: bool) -> Result<()> {
        let mut st = self.s.state.lock().await;
        let d = st.disk_mut(name)?.clone();
        if st.in_use(name) {
            return Err(ServiceError::Busy(format!(
                "disk {name:?} is attached to a running container ({}); take the container down first",
                st.users(name).join(", ")
            )));
        }
        if matches!(
            d.state,
            DiskState::Sealing | DiskState::Unsealing | DiskState::Migrating
        ) {
            return Err(ServiceError::Busy(format!(
                "disk {name:?} is {}; wait for the job to finish",
                d.state.name()
            )));
        }
        let storage = storage_of(&d);
        let has_record = storage.record_path().exists();
        let holds_sealed = matches!(d.state, DiskState::Sealed | DiskState::Failed) || has_record;
        if holds_sealed && !shred && !keep_file {
            return Err(ServiceError::Invalid(format!(
                "disk {name:?} is {} and its data can only be brought back with its seal record {}; removing it would lose that data: pass --shred to crypto-erase it, or --keep-file to keep the file and its record and only forget the disk (unseal it first to keep the data usable)",
                d.state.name(),
                storage.record_path().display()
            )));
        }
        if shred {
            if !matches!(d.state, DiskState::Sealed | DiskState::Failed) {
                return Err(ServiceError::Invalid(format!(
                    "disk {name:?} is {}, not sealed; only a sealed disk can be shredded",
                    d.state.name()
                )));
            }
            jobs::shred(&storage, self.s.cfg.master_key.as_ref()).map_err(|source| {
                ServiceError::Job {
                    disk: name.into(),
                    action: "shred",
                    source: Arc::new(source.into()),
                }
            })?;
        }
        let mut doomed = None;
        if !keep_file {
            // After a shred the record is a tombstone without key material.
            if shred {
                remove_if_exists(storage.record_path())?;
            }
            if d.managed {
                doomed = move_aside(&d.path)?;
            }
        }
        self.s.registry.remove_disk(name)?;
        st.disks.remove(name);
        for c in st.containers.values_mut() {
            if c.disks.iter().any(|x| x == name) {
                c.disks.retain(|x| x != name);
                self.s.registry.put_container(c)?;
            }
        }
        lock(&self.s.gates).remove(name);
        drop(st);
        // Unlinking a large file can take minutes on a busy host (the file system frees
        // every extent): it was moved aside under the lock, and is deleted without it.
        if let Some(aside) = doomed {
            let what = format!(
                "cannot delete {} (the file of disk {name:?})",
                aside.display()
            );
            tokio::task::spawn_blocking(move || remove_if_exists(&aside))
                .await
                .map_err(|e| ServiceError::Invalid(format!("{what}: {e}")))??;
        }
        Ok(())
    }
}

/// Create the disk file (or check an adopted one). Returns whether a file was made, so that a
/// failed registration can remove it again.
pub(super) fn create_file(path: &Path, size: u64, managed: bool) -> Result<bool> {
    let io = |what: String| move |source| ServiceError::Io { what, source };
    match std::fs::metadata(path) {
        Ok(m) if managed => Err(ServiceError::Busy(format!(
            "{} already exists ({}); remove it or pick another disk name",
            path.display(),
            crate::units::bytes(m.len())
        ))),
        Ok(m) if m.len() != size => Err(ServiceError::Invalid(format!(
            "{} exists with {}, not {}; give its real size or another path",
            path.display(),
            crate::units::bytes(m.len()),
            crate::units::bytes(size)
        ))),
        Ok(_) => Ok(false),
        Err(_) => {
            check_room(path, size)?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io(format!("cannot create disk file {}", path.display())))?;
            if let Err(e) = f.set_len(size).and_then(|()| f.sync_all()) {
                // Leave nothing behind: the name must be free again.
                drop(f);
                let _ = std::fs::remove_file(path);
                let too_big = e.kind() == std::io::ErrorKind::InvalidInput
                    || e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error())
                    || e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error());
                if too_big {
                    return Err(ServiceError::Invalid(format!(
                        "disk size {} is more than the file system of {} allows for one file ({e}); pick a smaller size",
                        crate::units::bytes(size),
                        path.display()
                    )));
                }
                return Err(io(format!("cannot size disk file {}", path.display()))(e));
            }
            Ok(true)
        }
    }
}

/// Refuse a size the file system cannot hold: over the largest file offset, or over the
/// space free for the daemon's user (a sparse file would let writes fail later, inside a
/// container).
fn check_room(path: &Path, size: u64) -> Result<()> {
    if size > i64::MAX as u64 {
        return Err(ServiceError::Invalid(format!(
            "disk size {} is over the largest file size ({}); pick a smaller size",
            crate::units::bytes(size),
            crate::units::bytes(i64::MAX as u64)
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = match rustix::fs::statvfs(dir) {
        Ok(st) => st,
        // A missing directory: creating the file reports it.
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => {
            return Err(ServiceError::Io {
                what: format!("cannot read the free space of {}", dir.display()),
                source: e.into(),
            })
        }
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if size > free {
        return Err(ServiceError::Invalid(format!(
            "disk size {} is more than the {} free in {}; pick a smaller size or free space",
            crate::units::bytes(size),
            crate::units::bytes(free),
            dir.display()
        )));
    }
    Ok(())
}

/// Rename a disk's file to `PATH.removing` (instant, durable with its directory), so that
/// it can be deleted outside the state lock. `None` when there is no file.
fn move_aside(path: &Path) -> Result<Option<PathBuf>> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".removing");
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => Ok(Some(aside)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServiceError::Io {
            what: format!("cannot move {} aside to delete it", path.display()),
            source,
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServiceError::Io {
            what: format!("cannot delete {}", path.display()),
            source,
        }),
    }
}
