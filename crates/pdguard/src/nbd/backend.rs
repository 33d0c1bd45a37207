//! The export's storage: the disk as the service's claimed handle ([`ClaimedIo`]) serves
//! it, blocking positional I/O through the disk's gate (FIG. 3), then on its file, or on its
//! migration while an instant reclaim runs. The connection calls these only with a request
//! `wire::check` accepted, so every offset and length here is already inside the export.
//!
//! While the disk is migrating, what only a file can do has another answer: TRIM is a hint
//! ignored (nothing is lost), WRITE_ZEROES writes zeros through the migration, CACHE does
//! nothing, and BLOCK_STATUS reports the whole range as data.

use std::fs::File;
use std::io;
use std::num::NonZeroU64;

use pdguard_engine::service::ClaimedIo;
use rustix::fs::{FallocateFlags, SeekFrom};

use super::wire::{errno, STATE_HOLE, STATE_ZERO};

/// Most extents in one `BLOCK_STATUS` reply (the spec asks for at most 2^20).
pub const MAX_EXTENTS: usize = 1024;

pub struct Backend {
    io: ClaimedIo,
}

impl Backend {
    /// The export's handle, claimed from the service ([`Service::claim`]: the file recorded
    /// for the disk only, never through a link; its gate; its migration).
    ///
    /// [`Service::claim`]: pdguard_engine::service::Service::claim
    pub fn new(io: ClaimedIo) -> Self {
        Self { io }
    }

    pub fn size(&self) -> u64 {
        self.io.size()
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.io.read_at(buf, offset)
    }

    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.io.write_at(data, offset)?;
        self.fua(fua)
    }

    fn fua(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.io.flush()?;
        }
        Ok(())
    }

    /// fdatasync flushes the file, whichever descriptor wrote it: that is why a flush on
    /// one connection covers writes acknowledged on every other (`CAN_MULTI_CONN`).
    pub fn flush(&self) -> io::Result<()> {
        self.io.flush()
    }

    /// TRIM is a hint: punch a hole where the file system can, ignore it where it cannot
    /// (and while the disk migrates).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        self.io.on_file(true, |f| {
            match rustix::fs::fallocate(f, flags, offset, len) {
                Ok(()) => Ok(()),
                Err(e) if unsupported(e) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })?;
        self.fua(fua)
    }

    /// WRITE_ZEROES: a hole if allowed, else allocated zeros, else written zeros (always
    /// written through the migration while the disk migrates).
    pub fn zero(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let done = self
            .io
            .on_file(true, |f| allocate_zeros(f, offset, len, may_trim))?;
        if done != Some(true) {
            self.io.write_zeroes_at(offset, len)?;
        }
        self.fua(fua)
    }

    /// CACHE: ask the kernel to read the range ahead (nothing while the disk migrates).
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let advice = rustix::fs::Advice::WillNeed;
        self.io.on_file(false, |f| {
            rustix::fs::fadvise(f, offset, NonZeroU64::new(len), advice).map_err(Into::into)
        })?;
        Ok(())
    }

    /// `base:allocation` extents from `offset`, covering at most `len` bytes (the request is
    /// inside the export), at most `max` of them: holes (`SEEK_HOLE`) are `HOLE | ZERO`,
    /// data is 0. Where the file system cannot tell, and while the disk migrates, the whole
    /// range is data.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u32, u32)>> {
        let found = self
            .io
            .on_file(false, |f| Ok(file_extents(f, offset, len, max)))?;
        Ok(found.unwrap_or_else(|| vec![(len as u32, 0)]))
    }
}

/// Zeros by `fallocate` (a hole when `may_trim`); false when the file system cannot.
fn allocate_zeros(f: &File, offset: u64, len: u64, may_trim: bool) -> io::Result<bool> {
    let mut tries = Vec::with_capacity(2);
    if may_trim {
        tries.push(FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE);
    }
    tries.push(FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE);
    for flags in tries {
        match rustix::fs::fallocate(f, flags, offset, len) {
            Ok(()) => return Ok(true),
            Err(e) if unsupported(e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

fn file_extents(f: &File, offset: u64, len: u64, max: usize) -> Vec<(u32, u32)> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end && out.len() < max {
        let data = match rustix::fs::seek(f, SeekFrom::Data(at)) {
            Ok(d) => d.min(end),
            // No data at or after `at`: a hole to the end of the file.
            Err(rustix::io::Errno::NXIO) => end,
            Err(_) => return vec![(len as u32, 0)],
        };
        let (next, flags) = if data > at {
            (data, STATE_HOLE | STATE_ZERO)
        } else {
            match rustix::fs::seek(f, SeekFrom::Hole(at)) {
                Ok(h) => (h.min(end).max(at + 1), 0),
                Err(_) => (end, 0),
            }
        };
        out.push(((next - at) as u32, flags));
        at = next;
    }
    out
}

fn unsupported(e: rustix::io::Errno) -> bool {
    matches!(
        e,
        rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL
    )
}

/// The NBD error for an I/O error (proto.md "Error values": `EDQUOT` and `EFBIG` are
/// `ENOSPC`).
pub fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(c) if c == rustix::io::Errno::NOSPC.raw_os_error() => errno::ENOSPC,
        Some(c) if c == rustix::io::Errno::DQUOT.raw_os_error() => errno::ENOSPC,
        Some(c) if c == rustix::io::Errno::FBIG.raw_os_error() => errno::ENOSPC,
        Some(c) if c == rustix::io::Errno::PERM.raw_os_error() => errno::EPERM,
        Some(c) if c == rustix::io::Errno::ROFS.raw_os_error() => errno::EPERM,
        Some(c) if c == rustix::io::Errno::NOMEM.raw_os_error() => errno::ENOMEM,
        // The gate of a sealed disk (`ClaimedIo`).
        None if e.kind() == io::ErrorKind::PermissionDenied => errno::EPERM,
        _ => errno::EIO,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_follow_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let e = file_extents(&b, 0, 4 << 20, MAX_EXTENTS);
        assert_eq!(
            e,
            vec![
                (1 << 20, STATE_HOLE | STATE_ZERO),
                (8192, 0),
                ((3 << 20) - 8192, STATE_HOLE | STATE_ZERO)
            ]
        );
        assert_eq!(e.iter().map(|x| u64::from(x.0)).sum::<u64>(), 4 << 20);
        // A range inside the data, and a cap of one extent.
        assert_eq!(file_extents(&b, (1 << 20) + 512, 1024, 8), vec![(1024, 0)]);
        assert_eq!(file_extents(&b, 0, 4 << 20, 1).len(), 1);
        // Zeroing punches a hole; NO_HOLE keeps the range allocated but zero.
        assert!(allocate_zeros(&b, 1 << 20, 4096, true).unwrap());
        let mut buf = [9u8; 4096];
        b.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        assert!(allocate_zeros(&b, (1 << 20) + 4096, 4096, false).unwrap());
        b.read_exact_at(&mut buf, (1 << 20) + 4096).unwrap();
        assert_eq!(buf, [0u8; 4096]);
    }
}
