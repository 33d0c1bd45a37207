//! Storage behind small traits: the persistent disk, the thin disk and the seal record.
//!
//! [`Disk`] is one file-like thing addressed by byte offset; [`Storage`] is everything a
//! job touches for one image. [`file`] implements them on real files and block devices;
//! [`sim`] implements them in memory with power-loss and fault injection for crash tests.

pub mod file;
pub mod loopfs;
pub mod sim;
mod sparse;

use std::io;

use thiserror::Error;

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
    /// Make every write so far durable (fsync). After a failure the disk refuses further I/O.
    fn sync(&self) -> Result<()>;
    /// A hint, never a durability point (only [`sync`](Self::sync) is one): the pass is done
    /// with `[offset, offset + len)` for now. Start writing it back if it is dirty and drop it
    /// from the page cache once clean, so that a long pass keeps the device busy instead of
    /// leaving gigabytes for `sync` (and the thin disk's `unlink`) at the end. Default: nothing.
    fn release(&self, _offset: u64, _len: u64) {}
    /// Which bytes may hold data now (`SEEK_DATA`/`SEEK_HOLE`); everything else is a hole
    /// and reads as zeros. Conservative: a range not known to be a hole is data. Default:
    /// all of it.
    fn data_map(&self) -> Result<DataMap> {
        Ok(DataMap::full(self.len()))
    }
}

pub use sparse::{DataMap, Sparse};

/// Everything one job touches: the image, its thin disk and its seal record.
pub trait Storage {
    /// The image as a human names it (its path), for messages.
    fn image_name(&self) -> String;
    /// The record's path, for messages.
    fn record_name(&self) -> String;
    /// Open the image, for reading and writing when `write`.
    fn open_image(&self, write: bool) -> Result<Box<dyn Disk>>;
    /// Where a new seal with id `seal_id` puts its thin disk.
    fn new_thin_path(&self, seal_id: &str) -> String;
    /// Bytes free for a thin disk at `thin_path`.
    fn free_bytes(&self, thin_path: &str) -> Result<u64>;
    /// Create an empty sparse thin disk of `bytes` at `thin_path`, replacing any stale one;
    /// its directory entry is durable when this returns.
    fn create_thin(&self, thin_path: &str, bytes: u64) -> Result<Box<dyn Disk>>;
    /// Open an existing thin disk, `None` if there is none.
    fn open_thin(&self, thin_path: &str) -> Result<Option<Box<dyn Disk>>>;
    /// Delete the thin disk if it exists.
    fn remove_thin(&self, thin_path: &str) -> Result<()>;
    /// The record's bytes, `None` if there is no record.
    fn read_record(&self) -> Result<Option<Vec<u8>>>;
    /// Replace the record atomically and durably.
    fn write_record(&self, bytes: &[u8]) -> Result<()>;
    /// Delete the record durably.
    fn remove_record(&self) -> Result<()>;
    /// Overwrite the record file's bytes in place with zeros and fsync (crypto-erase: the
    /// blocks that held the wrapped key are overwritten, not just unlinked).
    fn overwrite_record(&self) -> Result<()>;
}
