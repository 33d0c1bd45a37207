//! Sequential I/O threads: the reader of a disk in order and the writer of what a pass
//! produces, with write-behind (`Disk::release`).

use super::*;

/// A piece of a disk read in order: bytes, or a hole (zeros that were not read).
pub(super) enum Chunk {
    Data(Vec<u8>),
    Zeros(u64),
}

impl Chunk {
    pub(super) fn len(&self) -> u64 {
        match self {
            Self::Data(b) => b.len() as u64,
            Self::Zeros(n) => *n,
        }
    }
}

/// Reads `disk` bytes `[0, len)` in order in `chunk`-byte pieces, into at most `depth`
/// buffers that the consumer sends back; a piece that is all hole in the disk's
/// [data map](Disk::data_map) is sent as [`Chunk::Zeros`] without being read. Hashes what
/// it reads if given a hasher.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_sequential(
    disk: &dyn Disk,
    len: u64,
    chunk: usize,
    depth: usize,
    back: Receiver<Vec<u8>>,
    out: SyncSender<Chunk>,
    mut hasher: Option<PassHasher<'_>>,
) -> Result<Option<blake3::Hash>> {
    let map = disk.data_map()?;
    let mut made = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk as u64) as usize;
        let piece = if map.is_hole(off, n as u64) {
            if let Some(h) = hasher.as_mut() {
                h.update_zeros(n as u64);
            }
            Chunk::Zeros(n as u64)
        } else {
            let Ok(mut buf) = spare(&back, &mut made, depth, chunk) else {
                return Ok(None); // the consumer left; it says why
            };
            buf.resize(n, 0);
            disk.read_at(&mut buf, off)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&buf);
            }
            Chunk::Data(buf)
        };
        if out.send(piece).is_err() {
            return Ok(None);
        }
        off += n as u64;
    }
    Ok(hasher.map(|h| h.finalize()))
}

/// What a writer thread writes.
pub(super) enum Out {
    /// Bytes at an offset.
    Bytes(u64, Vec<u8>),
    /// Runs at their offsets, in order: bytes of the buffer, or zeros (skipped where the
    /// destination is a hole, see [`Disk::write_zeros`]). One message for many small runs.
    Runs(Vec<u8>, Vec<(u64, Run)>),
}

pub(super) enum Run {
    Bytes(std::ops::Range<usize>),
    Zeros(u64),
}

/// Writes what it receives, in order, and sends byte buffers back (still holding their
/// bytes: a consumer that overwrites one whole need not clear or zero it); hashes what it
/// writes if given a hasher.
pub(super) fn write_jobs(
    disk: &dyn Disk,
    jobs: Receiver<Out>,
    back: Sender<Vec<u8>>,
    mut hasher: Option<PassHasher<'_>>,
) -> Result<Option<blake3::Hash>> {
    let mut behind = WriteBehind::default();
    let put = |bytes: &[u8], off: u64, behind: &mut WriteBehind| -> Result<()> {
        disk.write_at(bytes, off)?;
        behind.wrote(disk, off, bytes.len() as u64);
        Ok(())
    };
    for out in jobs {
        let buf = match out {
            Out::Bytes(off, buf) => {
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf);
                }
                put(&buf, off, &mut behind)?;
                buf
            }
            Out::Runs(buf, runs) => {
                for (off, run) in runs {
                    match run {
                        Run::Bytes(r) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update(&buf[r.clone()]);
                            }
                            put(&buf[r], off, &mut behind)?;
                        }
                        Run::Zeros(len) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update_zeros(len);
                            }
                            disk.write_zeros(off, len)?;
                        }
                    }
                }
                buf
            }
        };
        let _ = back.send(buf);
    }
    behind.flush(disk);
    Ok(hasher.map(|h| h.finalize()))
}

/// The range written last and not yet [released](Disk::release): a write that continues it
/// extends it up to [`RELEASE_BYTES`]; any other write releases it first. Sequential writes
/// go to writeback in a few large requests, interleaved ones (a plain scatter's windows)
/// one buffer at a time, which is what measured fastest for each.
#[derive(Default)]
pub(super) struct WriteBehind {
    pub(super) pending: Option<(u64, u64)>,
}

impl WriteBehind {
    pub(super) fn wrote(&mut self, disk: &dyn Disk, off: u64, len: u64) {
        let start = match self.pending.take() {
            Some((start, end)) if end == off => start,
            Some((start, end)) => {
                // A small range on its own (a sealed sparse image's scattered pages) is left
                // to the final fsync, which writes such pages back sorted and merged; one
                // writeback request per page costs more than the whole write.
                if end - start >= MIN_RELEASE_BYTES {
                    disk.release(start, end - start);
                }
                off
            }
            None => off,
        };
        let end = off + len;
        if end - start >= RELEASE_BYTES {
            disk.release(start, end - start);
        } else {
            self.pending = Some((start, end));
        }
    }

    pub(super) fn flush(self, disk: &dyn Disk) {
        if let Some((start, end)) = self.pending {
            if end - start >= MIN_RELEASE_BYTES {
                disk.release(start, end - start);
            }
        }
    }
}
