//! The export's storage: blocking positional I/O on the disk's file (or block device). The
//! connection calls these only with a gate guard held and a request `wire::check` accepted,
//! so every offset and length here is already inside the export.

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;

use rustix::fs::{FallocateFlags, SeekFrom};

use super::wire::{errno, STATE_HOLE, STATE_ZERO};

/// Most extents in one `BLOCK_STATUS` reply (the spec asks for at most 2^20).
pub const MAX_EXTENTS: usize = 1024;
/// Zeros are written in pieces of this size when the file system cannot allocate zeros.
const ZERO_CHUNK: usize = 1 << 20;

pub struct Backend {
    file: File,
    size: u64,
}

impl Backend {
    /// The export's file, opened by the service ([`Service::nbd_open`]: only the file
    /// recorded for the disk, never through a link).
    ///
    /// [`Service::nbd_open`]: pdguard_engine::service::Service::nbd_open
    pub fn new(file: File, size: u64) -> Self {
        Self { file, size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.fua(fua)
    }

    fn fua(&self, fua: bool) -> io::Result<()> {
        if fua {
            rustix::fs::fdatasync(&self.file)?;
        }
        Ok(())
    }

    /// fdatasync flushes the file, whichever descriptor wrote it: that is why a flush on
    /// one connection covers writes acknowledged on every other (`CAN_MULTI_CONN`).
    pub fn flush(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&self.file)?;
        Ok(())
    }

    /// TRIM is a hint: punch a hole where the file system can, ignore it where it cannot.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => self.fua(fua),
            Err(e) if unsupported(e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// WRITE_ZEROES: a hole if allowed, else allocated zeros, else written zeros.
    pub fn zero(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        let mut tries = Vec::with_capacity(2);
        if may_trim {
            tries.push(FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE);
        }
        tries.push(FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE);
        for flags in tries {
            match rustix::fs::fallocate(&self.file, flags, offset, len) {
                Ok(()) => return self.fua(fua),
                Err(e) if unsupported(e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.fua(fua)
    }

    /// CACHE: ask the kernel to read the range ahead.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let advice = rustix::fs::Advice::WillNeed;
        rustix::fs::fadvise(&self.file, offset, NonZeroU64::new(len), advice)?;
        Ok(())
    }

    /// `base:allocation` extents from `offset`, covering at most `len` bytes (the request is
    /// inside the export), at most `max` of them: holes (`SEEK_HOLE`) are `HOLE | ZERO`,
    /// data is 0. Where the file system cannot tell, the whole range is data.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u32, u32)>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < max {
            let data = match rustix::fs::seek(&self.file, SeekFrom::Data(at)) {
                Ok(d) => d.min(end),
                // No data at or after `at`: a hole to the end of the file.
                Err(rustix::io::Errno::NXIO) => end,
                Err(_) => return Ok(vec![(len as u32, 0)]),
            };
            let (next, flags) = if data > at {
                (data, STATE_HOLE | STATE_ZERO)
            } else {
                match rustix::fs::seek(&self.file, SeekFrom::Hole(at)) {
                    Ok(h) => (h.min(end).max(at + 1), 0),
                    Err(_) => (end, 0),
                }
            };
            out.push(((next - at) as u32, flags));
            at = next;
        }
        Ok(out)
    }
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
        _ => errno::EIO,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let rw = std::fs::OpenOptions::new().read(true).write(true).open(&p);
        let b = Backend::new(rw.unwrap(), 4 << 20);
        let e = b.extents(0, 4 << 20, MAX_EXTENTS).unwrap();
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
        assert_eq!(
            b.extents((1 << 20) + 512, 1024, 8).unwrap(),
            vec![(1024, 0)]
        );
        assert_eq!(b.extents(0, 4 << 20, 1).unwrap().len(), 1);
        // Zeroing punches a hole; NO_HOLE keeps the range allocated but zero.
        b.zero(1 << 20, 4096, true, false).unwrap();
        let mut buf = [9u8; 4096];
        b.read(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0u8; 4096]);
        b.zero((1 << 20) + 4096, 4096, false, true).unwrap();
        b.read(&mut buf, (1 << 20) + 4096).unwrap();
        assert_eq!(buf, [0u8; 4096]);
    }
}
