//! The moved map file **M** (`RECORD.moved`, `docs/instant-reclaim.md` section 3): made
//! once with the first commit in slot 1 and zeros in slot 0, then only overwritten in
//! place, one slot per commit (`pwrite`, `fdatasync`), so a torn commit damages only the
//! slot being written and the other keeps the previous commit.

use std::sync::{Mutex, MutexGuard};

use pdguard_core::moved_map::{slot_bytes, Commit, MapError, MapIdentity, MapKey, MovedMap};

use crate::store::{Disk, MigrationFile, Storage, StoreError};

/// The open moved map file.
pub(super) struct MovedFile {
    disk: Box<dyn Disk>,
    key: MapKey,
    name: String,
    /// One commit at a time: two would race for the same slot.
    commits: Mutex<()>,
}

/// Why the file could not be made or read.
pub(super) enum MovedFileError {
    Store(StoreError),
    Map(MapError),
    Missing,
}

impl MovedFile {
    /// Create the file of a new migration holding `map`'s first commit (generation 1),
    /// durable (file and directory) when this returns.
    pub(super) fn create(
        storage: &dyn Storage,
        map: &mut MovedMap,
        key: MapKey,
    ) -> Result<Self, MovedFileError> {
        let bytes = map.create_file(&key).map_err(MovedFileError::Map)?;
        let disk = storage
            .create_migration_file(MigrationFile::MovedMap, bytes.len() as u64)
            .map_err(MovedFileError::Store)?;
        disk.write_at(&bytes, 0)
            .and_then(|()| disk.sync())
            .map_err(MovedFileError::Store)?;
        Ok(Self::with(storage, disk, key))
    }

    /// Open the file of migration `identity` and load the newer valid slot.
    pub(super) fn load(
        storage: &dyn Storage,
        identity: &MapIdentity,
        key: MapKey,
    ) -> Result<(Self, MovedMap), MovedFileError> {
        let disk = storage
            .open_migration_file(MigrationFile::MovedMap)
            .map_err(MovedFileError::Store)?
            .ok_or(MovedFileError::Missing)?;
        // Read no more than two slots of this map: a longer file is refused by `load`
        // from its length alone.
        let regions = identity.layout.regions();
        let want = slot_bytes(regions).map_or(0, |s| 2 * s as u64);
        let len = disk.len().min(want.saturating_add(1));
        let mut bytes = vec![0u8; len as usize];
        disk.read_at(&mut bytes, 0).map_err(MovedFileError::Store)?;
        let map = MovedMap::load(&bytes, identity, &key).map_err(MovedFileError::Map)?;
        Ok((Self::with(storage, disk, key), map))
    }

    fn with(storage: &dyn Storage, disk: Box<dyn Disk>, key: MapKey) -> Self {
        Self {
            disk,
            key,
            name: storage.migration_file_name(MigrationFile::MovedMap),
            commits: Mutex::new(()),
        }
    }

    pub(super) fn key(&self) -> &MapKey {
        &self.key
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Held for the whole of one commit.
    pub(super) fn commit_lock(&self) -> MutexGuard<'_, ()> {
        self.commits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write one commit into its slot and make it durable.
    pub(super) fn write(&self, commit: &Commit) -> Result<(), StoreError> {
        self.disk.write_at(&commit.bytes, commit.offset)?;
        self.disk.sync()
    }
}
