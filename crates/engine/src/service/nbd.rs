//! The NBD front-end's side of the service: its associations come from the data path. A
//! connection that enters transmission on an export is a running container `nbd:<peer>`
//! associated with that disk; when it closes (cleanly or not) the association is dropped
//! at once, as for a removed container ([028]), and a disk left with no operational
//! container enters its grace period. `NBD_OPT_GO` on a sealed or sealing disk is a
//! reclaim ([030]): an instant one (`serve --reclaim instant`, the default, for a record of
//! version 4) returns as soon as the disk's migration serves it, and the connection's
//! requests go through [`Service::claim`]'s handle; a copy reclaim returns only when the
//! disk is unsealed, its digest checked and its gate open.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::lifecycle::Event;
use super::{now_ms, Result, Service, ServiceError};
use crate::registry::{Container, ContainerState, Disk, DiskState, Origin};
use crate::store::file::open_identified;
use crate::store::{FileIdentity, StoreError};

/// Containers whose id starts with this are NBD connections.
pub const NBD_CONTAINER_PREFIX: &str = "nbd:";

/// What the NBD server needs to know about a disk to export it.
#[derive(Debug, Clone)]
pub struct NbdExport {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub state: DiskState,
    /// What the disk's file is (recorded at adoption): the export opens only that file.
    pub identity: Option<FileIdentity>,
}

impl NbdExport {
    fn of(d: &Disk) -> Self {
        Self {
            name: d.name.clone(),
            path: d.path.clone(),
            size: d.size,
            state: d.state,
            identity: d.identity,
        }
    }
}

impl Service {
    /// Every disk, as an export.
    pub async fn nbd_exports(&self) -> Vec<NbdExport> {
        let st = self.s.state.lock().await;
        st.disks.values().map(NbdExport::of).collect()
    }

    /// One disk, as an export.
    pub async fn nbd_export(&self, name: &str) -> Result<NbdExport> {
        let st = self.s.state.lock().await;
        let d = st.disks.get(name).ok_or_else(|| ServiceError::NotFound {
            kind: "disk",
            name: name.into(),
        })?;
        Ok(NbdExport::of(d))
    }

    /// Open an attached export's file for the connection's I/O, as every job opens it
    /// ([`open_identified`]): never through a symbolic link, never waiting on a FIFO, and
    /// only if it is the file recorded at adoption. A file swapped in at the disk's path
    /// (a link, another file renamed over it) is refused before a byte is read or written,
    /// and the disk is marked `failed` with both identities, so that no other front-end or
    /// job uses it either until the operator puts the right file back.
    pub async fn nbd_open(&self, export: &NbdExport) -> Result<File> {
        let (path, name, id) = (export.path.clone(), export.name.clone(), export.identity);
        let opened = tokio::task::spawn_blocking(move || open_export(&path, &name, id))
            .await
            .map_err(|e| {
                ServiceError::Invalid(format!("the open of the disk's file failed: {e}"))
            })?;
        match opened {
            Ok(f) => Ok(f),
            Err(source @ StoreError::Replaced(_)) => {
                let why = crate::error_chain(&source);
                tracing::error!(disk = %export.name, error = %why, "NBD export refused");
                let mut st = self.s.state.lock().await;
                if let Err(e) = self.apply(&mut st, &export.name, Event::Refused { why }) {
                    tracing::error!(disk = %export.name, error = %crate::error_chain(&e), "cannot mark the disk failed");
                }
                Err(ServiceError::Store {
                    disk: export.name.clone(),
                    source,
                })
            }
            Err(source) => Err(ServiceError::Store {
                disk: export.name.clone(),
                source,
            }),
        }
    }

    /// A connection (`id`, which starts with `nbd:`) enters transmission on `disk`: record
    /// the association, then reclaim the disk if it is dangling, sealing or sealed (an
    /// instant reclaim when the daemon and the record allow it). Returns when the disk is
    /// usable; on failure, or when the caller drops the future (the client
    /// went away mid-handshake), the association is dropped again, so a disk whose reclaim
    /// nobody waits for any more is sealed again after its grace.
    pub async fn nbd_attach(&self, id: &str, disk: &str) -> Result<NbdExport> {
        debug_assert!(id.starts_with(NBD_CONTAINER_PREFIX));
        {
            let mut st = self.s.state.lock().await;
            if !st.disks.contains_key(disk) {
                return Err(ServiceError::NotFound {
                    kind: "disk",
                    name: disk.into(),
                });
            }
            let c = Container {
                id: id.into(),
                state: ContainerState::Running,
                since_ms: now_ms(),
                disks: vec![disk.into()],
                origin: Some(Origin::Nbd),
            };
            self.s.registry.put_container(&c)?;
            st.containers.insert(id.into(), c);
        }
        let undo = super::Undo::new(self, id, None);
        if let Err(e) = self.reclaim_with(disk, true).await {
            undo.disarm();
            self.nbd_detach(id).await;
            return Err(e);
        }
        undo.disarm();
        self.nbd_export(disk).await
    }

    /// A connection closed: drop its association (a disk with no operational container
    /// left enters its grace period) and forget the connection.
    pub async fn nbd_detach(&self, id: &str) {
        if let Err(e) = self.container_down(id, ContainerState::Removed).await {
            tracing::warn!(container = %id, error = %e, "cannot end the NBD association");
        }
        let mut st = self.s.state.lock().await;
        st.containers.remove(id);
        if let Err(e) = self.s.registry.remove_container(id) {
            tracing::warn!(container = %id, error = %e, "cannot forget the NBD connection");
        }
    }

    /// At start: NBD connections recorded by an earlier process died with it; their disks
    /// enter the grace period like those of any container that went away.
    pub(super) async fn nbd_forget_stale(&self) {
        let stale: Vec<String> = {
            let st = self.s.state.lock().await;
            st.containers
                .keys()
                .filter(|id| id.starts_with(NBD_CONTAINER_PREFIX))
                .cloned()
                .collect()
        };
        for id in stale {
            tracing::info!(container = %id, "NBD connection from before the restart is gone");
            self.nbd_detach(&id).await;
        }
    }
}

/// The export's file, opened for reading and writing: the recorded file, or (an entry older
/// than identities, which the start could not give one) whatever regular file or block
/// device is there, never through a symbolic link.
fn open_export(
    path: &Path,
    name: &str,
    id: Option<FileIdentity>,
) -> std::result::Result<File, StoreError> {
    use crate::store::safe_open::{self, Accept, How, Parents};
    if let Some(id) = id {
        return open_identified(path, name, true, id);
    }
    let how = How::READ
        .write(true)
        .accept(Accept::RegularOrBlock)
        .parents(Parents::NoSymlinks);
    safe_open::open(path, "disk file", how)?.ok_or_else(|| {
        StoreError::io(
            "open",
            format!("image {name}"),
            std::io::ErrorKind::NotFound.into(),
        )
    })
}

/// Flush a disk's file before a job reads it: with the gate blocked and I/O in flight
/// drained, every write a front-end acknowledged is durable before the seal's first read.
pub(super) fn flush_disk(path: &std::path::Path) -> std::io::Result<()> {
    use crate::store::safe_open::{self, Accept, How, Parents};
    // Never through a symbolic link, never waiting on a FIFO swapped in for the disk.
    let how = How::READ
        .accept(Accept::RegularOrBlock)
        .parents(Parents::NoSymlinks);
    match safe_open::open(path, "disk file", how) {
        Ok(Some(f)) => f.sync_all(),
        Ok(None) => Ok(()),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}
