//! Docker volumes reclaimed instantly (`docker volume create -o reclaim=instant`,
//! docs/instant-reclaim.md §8): a Mount claims the volume ([`Service::claim`]: a sealed
//! volume is served at once through its migration), serves the claimed I/O as a FUSE file
//! (`STATE/fuse/NAME/disk`), puts a loop device on it and mounts its file system at the
//! volume's mountpoint; the Mount answers once it is mounted. Every block the file system
//! reads or writes then passes the disk's gate and the migration (a region is moved and
//! checked against the seal's digest tree before it is served), then the plain file once
//! the migration has ended. The FUSE file stays until the last Unmount (a mounted loop
//! device cannot change its backing file). A daemon that died with such a volume mounted
//! leaves it mounted on a dead FUSE file; the next daemon cleans that at start and again at
//! Mount ([`Service::clean_dead_instant_mounts`], [`loopfs::clean_leftover`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::{lock, Result, Service, ServiceError};
use crate::store::fuse_file::FuseBacking;
use crate::store::loopfs;

impl FuseBacking for super::ClaimedIo {
    fn size(&self) -> u64 {
        super::ClaimedIo::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::ClaimedIo::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        super::ClaimedIo::write_at(self, buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        super::ClaimedIo::flush(self)
    }
}

impl Service {
    /// Where a volume's FUSE file is served: `STATE/fuse/NAME`.
    pub fn fuse_dir(&self, name: &str) -> PathBuf {
        self.s.cfg.state_dir.join("fuse").join(name)
    }

    /// Claim the volume (the caller bounds how long) and mount its file system over a
    /// FUSE file served from the claim; nothing to do when it is mounted so already. The
    /// mount itself runs on a blocking thread that holds the volume's FUSE slot: a Mount
    /// that times out or that dockerd abandons leaves it to finish, and the unmount that
    /// follows waits for it ([`Service::unmount_instant`]), so nothing stays mounted
    /// unknown.
    pub(super) async fn mount_instant(&self, name: &str) -> Result<()> {
        let slot = Arc::clone(lock(&self.s.volumes.fuse).entry(name.into()).or_default());
        if slot.try_lock().is_ok_and(|m| m.is_some()) {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let io = self.claim(name).await?;
        let claimed_ms = t0.elapsed().as_millis() as u64;
        let (fuse_dir, dir) = (self.fuse_dir(name), self.mount_dir(name));
        let volume = name.to_string();
        tokio::task::spawn_blocking(move || {
            let mut m = lock(&slot);
            if m.is_none() {
                // No server of this process serves the volume: what a FUSE mount there
                // holds is a dead daemon's (a second line after the start's own look).
                clean_leftover(&volume, &fuse_dir, &dir)?;
                let mounted = loopfs::mount_over_fuse(Arc::new(io), &fuse_dir, &dir)?;
                let mounted_ms = t0.elapsed().as_millis() as u64;
                tracing::info!(volume = %volume, file = %mounted.file().display(), claimed_ms, mounted_ms, "mounted over a FUSE file served by pdguard (instant reclaim)");
                *m = Some(mounted);
            }
            Ok(())
        })
        .await
        .map_err(|e| ServiceError::Invalid(format!("mount panicked: {e}")))?
        .map_err(|e| super::volumes::volume_io(name, "mount over its FUSE file", e))
    }

    /// At start, before any Mount: clean what a daemon that died (`kill -9`, OOM, a
    /// crash) left of the volumes it had mounted over their FUSE files: a file system at
    /// the mountpoint on a loop device on the dead FUSE file, that loop device, the dead
    /// FUSE mount ([`loopfs::clean_leftover`]). A volume that cannot be cleaned is logged;
    /// its Mount tries again.
    pub(super) async fn clean_dead_instant_mounts(&self) {
        let names: Vec<String> = {
            let st = self.s.state.lock().await;
            st.disks
                .values()
                .filter(|d| d.volume.is_some())
                .map(|d| d.name.clone())
                .collect()
        };
        for name in names {
            let (fuse_dir, dir) = (self.fuse_dir(&name), self.mount_dir(&name));
            let n = name.clone();
            let r = tokio::task::spawn_blocking(move || clean_leftover(&n, &fuse_dir, &dir)).await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(volume = %name, error = %crate::error_chain(&e), "cannot clean what a dead daemon left mounted of the volume; its next Mount tries again")
                }
                Err(e) => tracing::error!(volume = %name, error = %e, "the cleanup panicked"),
            }
        }
    }

    /// Unmount a volume mounted over a FUSE file: the file system and its loop device,
    /// then the FUSE file (after a mount in flight has ended). `None` when the volume is
    /// not mounted so. When the kernel refuses, the FUSE file stays served (and kept) for
    /// the retry.
    pub(super) async fn unmount_instant(
        &self,
        name: &str,
    ) -> Option<Result<(), loopfs::LoopFsError>> {
        let slot = lock(&self.s.volumes.fuse).get(name).cloned()?;
        tokio::task::spawn_blocking(move || {
            let mut m = lock(&slot);
            m.as_ref()?;
            if let Some(Err(e)) = m.as_ref().map(loopfs::FuseMount::unmount) {
                return Some(Err(e));
            }
            m.take().map(loopfs::FuseMount::close)
        })
        .await
        .unwrap_or_else(|e| {
            Some(Err(loopfs::LoopFsError::Io {
                what: "unmount".into(),
                source: io::Error::other(e.to_string()),
            }))
        })
    }
}

/// [`loopfs::clean_leftover`] for a volume no server of this process serves, with one
/// warning line naming what it cleaned.
fn clean_leftover(
    volume: &str,
    fuse_dir: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), loopfs::LoopFsError> {
    if let Some(what) = loopfs::clean_leftover(fuse_dir, dir)? {
        tracing::warn!(volume = %volume, cleaned = %what, "a daemon that died had the volume mounted over its FUSE file; cleaned what it left");
    }
    Ok(())
}
