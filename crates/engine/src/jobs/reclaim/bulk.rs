//! The bulk move pass (`docs/instant-reclaim.md`, section 4.2, "The move pass in bulk").
//!
//! A move gathers its regions' sectors from their sealed places: for a window of `W` bytes
//! of an image of `B` bytes, one sector in every `B / W` of the evacuation copy, so about
//! one read per sector once the image outgrows the window. That is fine from the page
//! cache and ruinous from a disk: a 16 GiB image that no longer fits in memory beside its
//! evacuation copy moved at 40 MB/s of 512-byte random reads (7 % in 8 minutes).
//!
//! So once every region is evacuated, the background moves what is left in one pass of
//! large sequential I/O, the way an unseal does: the `window` strategy's sealed scatter
//! reads the evacuation copy (a byte-for-byte copy of the sealed image) in order and
//! buckets it into a scratch thin disk **T**, then its plain gather merges **T** back into
//! plaintext in image order. The gather's writes do not go to the image: they fill a
//! [`MoveSink`], which cuts the stream into windows of regions and moves each window that
//! is still `evacuated` and free with the usual checks and commit (leaf, write, fsync,
//! commit `plain`). **T** is a cache, never a place of record: nothing reads it after a
//! crash (a resume deletes it), nothing is committed from it unchecked (a region whose
//! plaintext from **T** does not match its leaf is left `evacuated`, for the region-by-region
//! move from the evacuation copy to decide), so it needs no fsync.

use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, MutexGuard};

use pdguard_core::cipher::SectorCipher;
use pdguard_core::moved_map::{RegionEvent, RegionState};

use super::requests::StepDone;
use super::{Migration, ReclaimError, Result, Shared};
use crate::jobs::strategy::{self, PassCtx, Strategy, DEFAULT_MEMORY_BYTES};
use crate::jobs::NoProgress;
use crate::store::{Disk, Sparse, StoreError};

/// Where the bulk pass stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bulk {
    /// Not run yet (it runs once every region is evacuated).
    Waiting,
    /// A step runs it; other steps move region by region meanwhile.
    Running,
    /// Run, or not to be run (no scratch thin disk, too little left to move).
    Over,
}

impl Migration {
    /// Under the lock: whether this step runs the bulk pass (taking it if so). It runs
    /// once, when no region is `sealed` any more and at least a quarter of them are still
    /// `evacuated`; with less left, reading the whole evacuation copy twice costs more
    /// than gathering the rest region by region.
    pub(super) fn take_bulk(&self, g: &mut Shared) -> bool {
        if g.bulk != Bulk::Waiting || g.map.count(RegionState::Sealed) > 0 {
            return false;
        }
        let left = g.map.count(RegionState::Evacuated);
        if self.bulk_thin.is_none() || left == 0 || left * 4 < g.map.regions() {
            g.bulk = Bulk::Over;
            return false;
        }
        g.bulk = Bulk::Running;
        true
    }

    /// The bulk pass (taken by [`Self::take_bulk`]). An error of its own I/O fails the
    /// migration as any other does; a region it could not move stays for the
    /// region-by-region moves.
    pub(super) fn bulk_move(&self) -> Result<StepDone> {
        let done = self.bulk_passes();
        self.lock().bulk = Bulk::Over;
        let moved = done?;
        tracing::info!(image = %self.image_name, moved, "instant reclaim: bulk move pass done");
        Ok(StepDone::Moved(0..self.layout.regions()))
    }

    /// **E** bucketed into **T**, then **T** merged into the [`MoveSink`]; the regions moved.
    fn bulk_passes(&self) -> Result<u64> {
        let Some(thin) = self.bulk_thin.as_deref() else {
            return Ok(0);
        };
        let store = |e| self.fail(self.store_error(e));
        let geometry = self.seal.rec.geometry().map_err(|e| {
            self.fail(ReclaimError::Job(crate::jobs::JobError::Unsupported(
                e.to_string(),
            )))
        })?;
        let ctx = PassCtx {
            geometry,
            placement: self.address.placement(),
            cipher: self.seal.cipher.as_ref().map(|c| c as &dyn SectorCipher),
            digest_key: None,
            digest: self.seal.digest,
            keep_holes: self.seal.rec.keep_holes,
            progress: &NoProgress,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            regions: None,
        };
        let window = strategy::Window::default();
        let sector = self.sector;
        // With dense placement the sealed data is the first `D` sectors.
        let e_view = self
            .seal
            .dense
            .as_ref()
            .map(|d| d.region(&*self.evacuation, sector));
        let sealed = e_view
            .as_ref()
            .map_or(&*self.evacuation, |v| v as &dyn Disk);
        Sparse::new(sealed, sector)
            .and_then(|e| Ok((e, Sparse::new(thin, sector)?)))
            .and_then(|(e, t)| window.scatter_sealed(&ctx, &e, &t))
            .map_err(store)?;
        // The windows are moved on a thread of their own, so that the merge goes on while
        // a window is written and fsynced: two windows in flight at most.
        std::thread::scope(|scope| {
            let (full, windows) = sync_channel::<Window>(1);
            let (back, spare) = channel::<Vec<u8>>();
            let mover = scope.spawn(move || -> Result<u64> {
                let mut moved = 0;
                for w in windows {
                    moved += self.bulk_window(w.first, w.end, &w.buf)?;
                    let _ = back.send(w.buf);
                }
                Ok(moved)
            });
            let sink = MoveSink::new(self, full, spare);
            let view = self.seal.dense.as_ref().map(|d| d.compacted(&sink));
            let plain = view.as_ref().map_or(&sink as &dyn Disk, |v| v as &dyn Disk);
            let gathered = Sparse::new(thin, sector)
                .and_then(|t| window.gather_plain(&ctx, &t, plain))
                .map(drop);
            drop(view);
            let ended = gathered.and_then(|()| sink.finish());
            // The last window is sent: the mover ends when the channel closes.
            drop(sink);
            let moved = mover.join().unwrap_or_else(|_| {
                Err(
                    self.fail(ReclaimError::Job(crate::jobs::JobError::Unsupported(
                        "the bulk move's mover thread panicked (a bug of pdguard)".into(),
                    ))),
                )
            });
            match (moved, ended) {
                (Err(e), _) => Err(e),
                (Ok(_), Err(e)) => Err(store(e)),
                (Ok(n), Ok(())) => Ok(n),
            }
        })
    }

    /// Move the regions of `first..end` (plaintext in `buf`, from byte `first * R`) that
    /// are still `evacuated` and free, in groups as large as the background's window now;
    /// the regions moved.
    fn bulk_window(&self, first: u64, end: u64, buf: &[u8]) -> Result<u64> {
        let region = u64::from(self.layout.region_bytes());
        let base = first * region;
        let mut moved = 0;
        let mut r = first;
        while r < end {
            self.yield_to_demand();
            let (taken, next) = {
                let mut g = self.lock();
                self.refuse_if_failed(&g)?;
                let next = (r + self.window_now(&g)).min(end);
                let taken: Vec<u64> = (r..next)
                    .filter(|&k| {
                        let free = !g.busy[k as usize]
                            && g.map.state(k).ok() == Some(RegionState::Evacuated);
                        // `evacuated` takes `StartMove`: a refusal is impossible here.
                        free && g.map.apply(k, RegionEvent::StartMove).is_ok()
                    })
                    .collect();
                for &k in &taken {
                    g.busy[k as usize] = true;
                }
                (taken, next)
            };
            let slice = |k: u64| {
                let range = self.range(k);
                &buf[(range.start - base) as usize..(range.end - base) as usize]
            };
            // A region that does not match its leaf from T is left to the region-by-region
            // move, which gathers it from the evacuation copy and decides.
            let (good, bad): (Vec<u64>, Vec<u64>) = taken
                .iter()
                .partition(|&&k| self.check_leaf(k, slice(k)).is_ok());
            if !bad.is_empty() {
                tracing::warn!(image = %self.image_name, regions = ?bad, "instant reclaim: regions from the bulk pass do not match their leaves; moving them one by one from the evacuation copy");
                let _ = self.apply_all(&bad, RegionEvent::AbortMove);
                self.release(&bad);
            }
            if !good.is_empty() {
                let bufs: Vec<&[u8]> = good.iter().map(|&k| slice(k)).collect();
                self.write_and_commit(&good, &bufs, RegionEvent::CommitMove)?;
                moved += good.len() as u64;
            }
            r = next;
        }
        Ok(moved)
    }
}

/// A window of the bulk pass's stream, full: regions `first..end`, their plaintext.
struct Window {
    first: u64,
    end: u64,
    buf: Vec<u8>,
}

/// The plaintext stream of the bulk pass's gather, in image order (original coordinates),
/// cut into windows of regions that are sent to the mover as they fill: a write at or past
/// a window's end completes it.
struct MoveSink<'m> {
    m: &'m Migration,
    state: Mutex<SinkState>,
}

struct SinkState {
    /// The window filling now: bytes `[start, end)` of the image, in `buf`.
    start: u64,
    end: u64,
    buf: Vec<u8>,
    /// To the mover; `None` once the stream has ended.
    full: Option<SyncSender<Window>>,
    /// Buffers the mover is done with.
    spare: Receiver<Vec<u8>>,
}

impl<'m> MoveSink<'m> {
    fn new(m: &'m Migration, full: SyncSender<Window>, spare: Receiver<Vec<u8>>) -> Self {
        let region = u64::from(m.layout.region_bytes());
        let window = m.window_regions * region;
        let end = window.min(m.layout.image_bytes());
        Self {
            m,
            state: Mutex::new(SinkState {
                start: 0,
                end,
                buf: vec![0; end as usize],
                full: Some(full),
                spare,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send the window filling now to the mover and open the next one (zeros: a dense
    /// seal's holes are never written to the sink).
    fn complete(&self, st: &mut SinkState) -> Result<(), StoreError> {
        let region = u64::from(self.m.layout.region_bytes());
        let size = self.m.layout.image_bytes();
        let next_end = (st.end + self.m.window_regions * region).min(size);
        let mut fresh = st.spare.try_recv().unwrap_or_default();
        fresh.clear();
        fresh.resize((next_end - st.end) as usize, 0);
        let w = Window {
            first: st.start / region,
            end: st.end.div_ceil(region),
            buf: std::mem::replace(&mut st.buf, fresh),
        };
        // A mover that left has failed the migration; its error is the one reported.
        let sent = st.full.as_ref().is_some_and(|f| f.send(w).is_ok());
        if !sent {
            return Err(stopped());
        }
        st.start = st.end;
        st.end = next_end;
        Ok(())
    }

    /// `len` bytes at `offset`: from `data`, or zeros.
    fn feed(&self, mut offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), StoreError> {
        let mut st = self.state();
        if offset < st.start || offset + len > self.m.layout.image_bytes() {
            return Err(sink_error(
                "take",
                format!(
                    "{len} bytes at {offset} of the bulk move's stream: it went back or past the image (window at {}; a bug of pdguard)",
                    st.start
                ),
            ));
        }
        let mut done = 0u64;
        while done < len {
            while offset >= st.end {
                self.complete(&mut st)?;
            }
            let n = (len - done).min(st.end - offset);
            let at = (offset - st.start) as usize;
            let to = &mut st.buf[at..at + n as usize];
            match data {
                Some(d) => to.copy_from_slice(&d[done as usize..(done + n) as usize]),
                None => to.fill(0),
            }
            done += n;
            offset += n;
        }
        Ok(())
    }

    /// Send the windows left once the stream has ended, then close the channel.
    fn finish(&self) -> Result<(), StoreError> {
        let mut st = self.state();
        while st.start < self.m.layout.image_bytes() {
            self.complete(&mut st)?;
        }
        st.full = None;
        Ok(())
    }
}

fn sink_error(op: &'static str, what: String) -> StoreError {
    StoreError::Io {
        op,
        what,
        source: std::io::Error::other("the bulk move's stream"),
    }
}

fn stopped() -> StoreError {
    sink_error(
        "go on with",
        "the bulk move: a move failed and the migration stopped".into(),
    )
}

impl Disk for MoveSink<'_> {
    fn len(&self) -> u64 {
        self.m.layout.image_bytes()
    }

    fn read_at(&self, _buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        Err(sink_error(
            "read",
            format!("byte {offset} of the bulk move's stream: it is write-only (a bug of pdguard)"),
        ))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.feed(offset, Some(buf), buf.len() as u64)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.feed(offset, None, len)
    }

    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
