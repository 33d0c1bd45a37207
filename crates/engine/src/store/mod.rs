//! Storage behind small traits: the persistent disk, the thin disk and the seal record.
//!
//! [`Disk`] is one file-like thing addressed by byte offset; [`Storage`] is everything a
//! job touches for one image. [`file`] implements them on real files and block devices;
//! [`sim`] implements them in memory with power-loss and fault injection for crash tests.

pub mod file;
pub mod fuse_file;
pub mod inuse;
mod lock;
pub mod loopfs;
pub mod safe_open;
pub mod sim;
mod sparse;
mod view;

use std::io;

use thiserror::Error;

pub use safe_open::{FileIdentity, SafeOpenError};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot {op} {what}")]
    Io {
        op: &'static str,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} refused further I/O after an earlier failed write or fsync")]
    Poisoned { what: String },
    #[error("simulated power loss")]
    Crashed,
    /// Another job holds the image's lock ([`Storage::lock_image`]).
    #[error("busy: {} holds {image}; wait for it to finish (or stop it) and run the command again", holder_text(*.holder))]
    Busy { image: String, holder: Option<u32> },
    /// A file pdguard reads was refused before a byte was read: a symbolic link, a FIFO,
    /// a device ([`safe_open`]).
    #[error(transparent)]
    Untrusted(Box<SafeOpenError>),
    /// The image's path names another file than the one pdguard took it for.
    #[error(transparent)]
    Replaced(Box<ImageReplaced>),
}

/// The image's path names another file than the one pdguard took it for (adopted, or
/// opened first by this command): compared by device, inode, size and birth time at every open.
#[derive(Debug, Error)]
#[error("image {image} is not the file pdguard took it for: that was {expected}, the path now names {found}; nothing was read or written: put the original file back at this path (or forget the disk and adopt the new file)")]
pub struct ImageReplaced {
    pub image: String,
    pub expected: FileIdentity,
    pub found: String,
}

impl From<SafeOpenError> for StoreError {
    fn from(e: SafeOpenError) -> Self {
        Self::Untrusted(Box::new(e))
    }
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!("another pdguard job (pid {pid})"),
        None => "another pdguard job".into(),
    }
}

impl StoreError {
    pub fn io(op: &'static str, what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            op,
            what: what.into(),
            source,
        }
    }

    /// True when the cause is a full file system (ENOSPC or EDQUOT).
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
            }
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A disk addressed by byte offset. Methods take `&self` so that one disk can be shared by
/// a reader and a writer thread.
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`; a short read is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Write `len` zero bytes at `offset` (a [`Sparse`] disk skips its holes).
    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(ZEROS.len() as u64);
            self.write_at(&ZEROS[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }
    /// Deallocate `[offset, offset + len)`: it reads as zeros afterwards. Not a wipe
    /// (DESIGN.md §3): callers overwrite and sync first. Default: write zeros, which is
    /// what a disk that cannot deallocate (or the simulator, whose holes are its zero
    /// blocks) can do.
    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeros(offset, len)
    }
    /// Make every write so far durable (fsync). After a failure the disk refuses further I/O.
    fn sync(&self) -> Result<()>;
    /// A hint, never a durability point (only [`sync`](Self::sync) is one): the pass is done
    /// with `[offset, offset + len)` for now. Start writing it back if it is dirty and drop it
    /// from the page cache once clean, so that a long pass keeps the device busy instead of
    /// leaving gigabytes for `sync` (and the thin disk's `unlink`) at the end. Default: nothing.
    fn release(&self, _offset: u64, _len: u64) {}
    /// A hint: the reads to come are not sequential, or ask for exactly what they need, so
    /// the kernel reads nothing ahead (an instant reclaim on a slow disk: a read-ahead of
    /// megabytes queued ahead of a request's read delays it). Default: nothing.
    fn no_read_ahead(&self) {}
    /// Which bytes may hold data now (`SEEK_DATA`/`SEEK_HOLE`); everything else is a hole
    /// and reads as zeros. Conservative: a range not known to be a hole is data. Default:
    /// all of it.
    fn data_map(&self) -> Result<DataMap> {
        Ok(DataMap::full(self.len()))
    }
}

pub use lock::{flock_file, flock_path, ImageLock, LockMode};
pub use sparse::{DataMap, Sparse};
pub use view::ExtentView;

/// Everything one job touches: the image, its thin disk and its seal record.
pub trait Storage {
    /// The image as a human names it (its path), for messages.
    fn image_name(&self) -> String;
    /// Take the image's lock without waiting: [`LockMode::Exclusive`] for a job that may
    /// write the image, its record or its thin disk (seal, unseal, shred, and the crash
    /// recovery they start with), [`LockMode::Shared`] for one that only reads the image and
    /// must not see it change underneath (verify). Held until the returned guard drops.
    /// Fails at once with [`StoreError::Busy`] when a conflicting lock is held, by this
    /// process or another one.
    fn lock_image(&self, mode: LockMode) -> Result<ImageLock>;
    /// Loop devices the image is attached to (the kernel may write it through them at any
    /// moment), e.g. `/dev/loop3`. Default: none (in-memory storage).
    fn loop_devices(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// The record's path, for messages.
    fn record_name(&self) -> String;
    /// Open the image, for reading and writing when `write`.
    fn open_image(&self, write: bool) -> Result<Box<dyn Disk>>;
    /// The thin disk of seal `seal_id`, as a path for messages and for the record's
    /// informational `thin_path`. Derived only from what the storage was built with (thin
    /// directory, image file name) and the seal id, which must be 32 lowercase hex digits;
    /// never from a record.
    fn thin_name(&self, seal_id: &str) -> Result<String>;
    /// Bytes free for the thin disk of seal `seal_id`.
    fn free_bytes(&self, seal_id: &str) -> Result<u64>;
    /// Create an empty sparse thin disk of `bytes` for seal `seal_id`: a stale file of that
    /// name is removed first, then the new one is created exclusively (`O_EXCL`, never
    /// through a symbolic link); its directory entry is durable when this returns.
    fn create_thin(&self, seal_id: &str, bytes: u64) -> Result<Box<dyn Disk>>;
    /// Open the existing thin disk of seal `seal_id` (never through a symbolic link),
    /// `None` if there is none.
    fn open_thin(&self, seal_id: &str) -> Result<Option<Box<dyn Disk>>>;
    /// Delete the thin disk of seal `seal_id` if it exists (a symbolic link in its place is
    /// removed, never followed).
    fn remove_thin(&self, seal_id: &str) -> Result<()>;
    /// The key slot's path, for messages.
    fn key_slot_name(&self) -> String;
    /// Write the key slot once: a stale one is destroyed first, then the new one is created
    /// exclusively, written, fsynced, and its directory fsynced. Never renamed.
    fn create_key_slot(&self, bytes: &[u8]) -> Result<()>;
    /// The key slot's bytes, `None` if there is none. Never read through a symbolic link.
    fn read_key_slot(&self) -> Result<Option<Vec<u8>>>;
    /// Crypto-erase the key slot: overwrite its bytes in place with random bytes, fsync,
    /// delete it and fsync its directory. Nothing to do when there is none; a symbolic link
    /// or a file with other names (hard links) in its place is refused, not overwritten.
    fn destroy_key_slot(&self) -> Result<()>;
    /// Versions 1 and 2 kept the wrapped key inside the record: give the record's current
    /// file a second name, the key slot's (a hard link), so that the next record write
    /// leaves it there to be destroyed in place instead of in free space.
    fn link_record_as_key_slot(&self) -> Result<()>;
    /// The region digest tree's path (`RECORD.tree`), for messages.
    fn tree_name(&self) -> String;
    /// Write the region digest tree once: a stale one is removed first, then the new one
    /// is created exclusively (`O_EXCL | O_NOFOLLOW`, mode 0600), written, fsynced, and
    /// its directory fsynced. Its path is derived from the record's, never read from one.
    fn write_tree(&self, bytes: &[u8]) -> Result<()>;
    /// The region digest tree's first `limit` bytes (a longer file is read that far and
    /// no further), `None` if there is none. Never read through a symbolic link.
    fn read_tree(&self, limit: u64) -> Result<Option<Vec<u8>>>;
    /// Delete the region digest tree if it exists (a symbolic link in its place is
    /// removed, never followed), and fsync its directory.
    fn remove_tree(&self) -> Result<()>;
    /// The placement table's path (`RECORD.place`), for messages.
    fn place_name(&self) -> String;
    /// Write the placement table once, as [`Storage::write_tree`] writes the tree: a stale
    /// one removed first, the new one created exclusively, written, fsynced, and its
    /// directory fsynced. Its path is derived from the record's, never read from one.
    fn write_place(&self, bytes: &[u8]) -> Result<()>;
    /// The placement table's first `limit` bytes, `None` if there is none. Never read
    /// through a symbolic link.
    fn read_place(&self, limit: u64) -> Result<Option<Vec<u8>>>;
    /// Delete the placement table if it exists (a symbolic link in its place is removed,
    /// never followed), and fsync its directory.
    fn remove_place(&self) -> Result<()>;
    /// The record's bytes, `None` if there is no record.
    fn read_record(&self) -> Result<Option<Vec<u8>>>;
    /// Replace the record atomically and durably.
    fn write_record(&self, bytes: &[u8]) -> Result<()>;
    /// Delete the record durably.
    fn remove_record(&self) -> Result<()>;

    // An instant reclaim's files beside the record (`docs/instant-reclaim.md`, section 4).
    /// The path of a migration's file, for messages: the record's path and the file's
    /// suffix, derived from what the storage was built with, never from a record.
    fn migration_file_name(&self, which: MigrationFile) -> String;
    /// Create a migration's file of `bytes` (sparse): a stale file of that name is removed
    /// first, then the new one is created exclusively (`O_EXCL`, never through a symbolic
    /// link), fsynced, and its directory fsynced.
    fn create_migration_file(&self, which: MigrationFile, bytes: u64) -> Result<Box<dyn Disk>>;
    /// Open a migration's existing file (never through a symbolic link), `None` if absent.
    fn open_migration_file(&self, which: MigrationFile) -> Result<Option<Box<dyn Disk>>>;
    /// Delete a migration's file if it exists (a symbolic link in its place is removed,
    /// never followed), and fsync its directory.
    fn remove_migration_file(&self, which: MigrationFile) -> Result<()>;
}

/// The files of an instant reclaim, beside the record (`docs/instant-reclaim.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationFile {
    /// **E**, the evacuation copy: the sealed image copied region by region, same offsets.
    EvacuationCopy,
    /// **M**, the moved map: two slots, committed in turn (`pdguard_core::moved_map`).
    MovedMap,
}

impl MigrationFile {
    /// What follows the record's path: `disk.img.pdguard.evacuation`, `disk.img.pdguard.moved`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::EvacuationCopy => ".evacuation",
            Self::MovedMap => pdguard_core::moved_map::MAP_SUFFIX,
        }
    }

    /// What the file is, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Self::EvacuationCopy => "evacuation copy",
            Self::MovedMap => "moved map",
        }
    }
}

/// Refuse a seal id that could be anything but 32 lowercase hex digits before it becomes
/// part of a file name.
pub fn check_seal_id(seal_id: &str) -> Result<()> {
    if pdguard_core::record::valid_seal_id(seal_id) {
        return Ok(());
    }
    Err(StoreError::io(
        "name the thin disk of",
        format!("seal {seal_id:?}"),
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a seal id is exactly 32 lowercase hex digits",
        ),
    ))
}
