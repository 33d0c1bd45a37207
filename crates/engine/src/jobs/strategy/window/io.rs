//! Sequential I/O threads: the reader of a disk in order and the writer of what a pass
//! produces, with write-behind (`Disk::release`).

use super::*;

/// A piece of a disk read in order: bytes, or a hole (zeros that were not read).
pub(super) enum Chunk {
    Data(Shared),
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

/// A buffer read by two threads at once (a pass thread and the [hashing
/// thread](hash_regions)): whichever drops it last sends it back to its pool.
pub(super) struct Shared {
    buf: Option<Arc<Vec<u8>>>,
    back: Sender<Vec<u8>>,
}

impl Shared {
    pub(super) fn new(buf: Vec<u8>, back: &Sender<Vec<u8>>) -> Self {
        Self {
            buf: Some(Arc::new(buf)),
            back: back.clone(),
        }
    }

    /// Another handle on the same bytes.
    pub(super) fn share(&self) -> Self {
        Self {
            buf: self.buf.clone(),
            back: self.back.clone(),
        }
    }
}

impl std::ops::Deref for Shared {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take().and_then(Arc::into_inner) {
            let _ = self.back.send(buf); // no pool left: the pass is over
        }
    }
}

/// What the hashing thread hashes, in image order.
pub(super) enum ToHash {
    /// Runs of a buffer: byte ranges of it, or zeros.
    Runs(Shared, Vec<Run>),
    Zeros(u64),
    /// The pass fed every byte: the tree goes back to its tap.
    Done,
}

/// Messages queued to the hashing thread; each holds a buffer of the pass's pool.
pub(super) const HASH_DEPTH: usize = 2;

/// The hashing thread of a plain pass: feeds the region tree with what the pass's reader
/// or writer hashes into the image digest, so that the two BLAKE3 hashes of the plaintext
/// run on two cores. Hands the tree back only after [`ToHash::Done`].
pub(super) fn hash_regions(mut half: RegionHalf<'_>, jobs: Receiver<ToHash>) -> Result<()> {
    for job in jobs {
        match job {
            ToHash::Runs(buf, runs) => {
                for run in runs {
                    match run {
                        Run::Bytes(r) => half.update(&buf[r]),
                        Run::Zeros(n) => half.update_zeros(n),
                    }
                }
            }
            ToHash::Zeros(n) => half.update_zeros(n),
            ToHash::Done => {
                half.finish();
                break;
            }
        }
    }
    Ok(())
}

/// Sends `job` to the hashing thread, if there is one; it quits only on [`ToHash::Done`],
/// so a failed send means it panicked (its join says so).
fn tee(to: Option<&SyncSender<ToHash>>, job: impl FnOnce() -> ToHash) -> Result<()> {
    match to {
        Some(t) => t
            .send(job())
            .map_err(|_| internal("the hashing thread stopped")),
        None => Ok(()),
    }
}

/// Reads `disk` bytes `[0, len)` in order in `chunk`-byte pieces, into at most `depth`
/// buffers that the consumer drops when done with them (they come back through `back`); a
/// piece that is all hole in the disk's [data map](Disk::data_map) is sent as
/// [`Chunk::Zeros`] without being read. Hashes what it reads if given a hasher, its region
/// tree on a thread of its own if given `regions`.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_sequential(
    disk: &dyn Disk,
    len: u64,
    chunk: usize,
    depth: usize,
    back: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    out: SyncSender<Chunk>,
    mut hasher: Option<PassHasher<'_>>,
    regions: Option<SyncSender<ToHash>>,
) -> Result<Option<blake3::Hash>> {
    let map = disk.data_map()?;
    let (back_tx, back) = back;
    let mut made = 0;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk as u64) as usize;
        let piece = if map.is_hole(off, n as u64) {
            if let Some(h) = hasher.as_mut() {
                h.update_zeros(n as u64);
            }
            tee(regions.as_ref(), || ToHash::Zeros(n as u64))?;
            Chunk::Zeros(n as u64)
        } else {
            let Ok(mut buf) = spare(&back, &mut made, depth, chunk) else {
                return Ok(None); // the consumer left; it says why
            };
            buf.resize(n, 0);
            disk.read_at(&mut buf, off)?;
            let buf = Shared::new(buf, &back_tx);
            tee(regions.as_ref(), || {
                ToHash::Runs(buf.share(), vec![Run::Bytes(0..n)])
            })?;
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
    tee(regions.as_ref(), || ToHash::Done)?;
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

#[derive(Clone)]
pub(super) enum Run {
    Bytes(std::ops::Range<usize>),
    Zeros(u64),
}

/// Writes what it receives, in order, and sends byte buffers back (still holding their
/// bytes: a consumer that overwrites one whole need not clear or zero it); hashes what it
/// writes if given a hasher, its region tree on a thread of its own if given `regions`
/// (which then holds each buffer until it has hashed it).
pub(super) fn write_jobs(
    disk: &dyn Disk,
    jobs: Receiver<Out>,
    back: Sender<Vec<u8>>,
    mut hasher: Option<PassHasher<'_>>,
    regions: Option<SyncSender<ToHash>>,
) -> Result<Option<blake3::Hash>> {
    let mut behind = WriteBehind::default();
    let put = |bytes: &[u8], off: u64, behind: &mut WriteBehind| -> Result<()> {
        disk.write_at(bytes, off)?;
        behind.wrote(disk, off, bytes.len() as u64);
        Ok(())
    };
    for out in jobs {
        let (buf, runs) = match out {
            Out::Bytes(off, buf) => {
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf);
                }
                put(&buf, off, &mut behind)?;
                let runs = match regions {
                    Some(_) => vec![Run::Bytes(0..buf.len())],
                    None => Vec::new(),
                };
                (buf, runs)
            }
            Out::Runs(buf, runs) => {
                for (off, run) in &runs {
                    match run {
                        Run::Bytes(r) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update(&buf[r.clone()]);
                            }
                            put(&buf[r.clone()], *off, &mut behind)?;
                        }
                        Run::Zeros(len) => {
                            if let Some(h) = hasher.as_mut() {
                                h.update_zeros(*len);
                            }
                            disk.write_zeros(*off, *len)?;
                        }
                    }
                }
                (buf, runs.into_iter().map(|(_, r)| r).collect())
            }
        };
        match &regions {
            Some(_) => {
                let buf = Shared::new(buf, &back);
                tee(regions.as_ref(), || ToHash::Runs(buf.share(), runs))?;
            }
            None => {
                let _ = back.send(buf);
            }
        }
    }
    tee(regions.as_ref(), || ToHash::Done)?;
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
