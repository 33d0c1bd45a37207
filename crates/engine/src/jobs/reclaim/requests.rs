//! The request paths of a migration (`docs/instant-reclaim.md`, section 4.3) and its
//! background step (4.2).
//!
//! A request first brings every region it touches to its plain place (a **demand move**:
//! evacuate it if `sealed`, then move it), then is served there. A write to a `plain`
//! region commits it `dirty` **before** the write is issued; a write to an unmoved region
//! is merged into its demand move, which commits it `dirty` at once
//! (`CommitMoveWritten`). A write reaches the disk when `flush` (`fdatasync(I)`) returns.

use std::ops::Range;

use pdguard_core::moved_map::{RegionEvent, RegionState};

use super::mover::Merge;
use super::{Migration, ReclaimError, Result};

/// What one [`Migration::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDone {
    /// Evacuated these regions (the evacuation pass).
    Evacuated(Range<u64>),
    /// Moved these regions (the move pass).
    Moved(Range<u64>),
    /// Nothing to take: other threads hold the remaining regions; waited for one of them.
    Waited,
    /// Every region is at its plain place: [`Migration::finish`] ends the migration.
    Complete,
}

/// A demand move or evacuation doing its I/O: counted while it lives, so that the
/// background yields the disk to it.
struct DemandIo<'m>(&'m Migration);

impl<'m> DemandIo<'m> {
    fn new(m: &'m Migration) -> Self {
        let mut g = m.lock();
        g.demand_io += 1;
        g.last_demand = Some(std::time::Instant::now());
        Self(m)
    }
}

impl Drop for DemandIo<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.demand_io -= 1;
        g.last_demand = Some(std::time::Instant::now());
        drop(g);
        self.0.changed.notify_all();
    }
}

/// What a region needs before a request is served there.
enum Need {
    Served,
    Evacuate,
    Move,
    MarkDirty(u64),
}

impl Migration {
    /// The next window of the background migration: all evacuations first, in windows of
    /// regions, then the moves.
    pub fn step(&self) -> Result<StepDone> {
        self.yield_to_demand();
        let mut g = self.lock();
        self.refuse_if_failed(&g)?;
        if self.take_bulk(&mut g) {
            drop(g);
            return self.bulk_move();
        }
        let most = self.window_now(&g);
        for (want, evacuate) in [(RegionState::Sealed, true), (RegionState::Evacuated, false)] {
            let Some(window) = self.claim(&mut g, want, most) else {
                continue;
            };
            let regions: Vec<u64> = window.clone().collect();
            if evacuate {
                drop(g);
                self.evacuate(&regions, true)?;
                return Ok(StepDone::Evacuated(window));
            }
            for &r in &regions {
                // `evacuated` takes `StartMove`: a refusal is impossible here.
                let _ = g.map.apply(r, RegionEvent::StartMove);
            }
            drop(g);
            self.move_regions(&regions, None)?;
            return Ok(StepDone::Moved(window));
        }
        if g.map.is_complete() {
            return Ok(StepDone::Complete);
        }
        drop(self.wait(g));
        Ok(StepDone::Waited)
    }

    /// Take (mark busy) the first run of up to `most` consecutive regions in
    /// state `want` that nobody holds, looking from where this pass last took one (then
    /// from the start, for a region that was busy then), so a pass costs O(regions) in all.
    fn claim(&self, g: &mut super::Shared, want: RegionState, most: u64) -> Option<Range<u64>> {
        let free =
            |g: &super::Shared, r: u64| !g.busy[r as usize] && g.map.state(r).ok() == Some(want);
        let pass = usize::from(want != RegionState::Sealed);
        let regions = self.layout.regions();
        let hint = g.pass_from[pass].min(regions);
        let first = (hint..regions).chain(0..hint).find(|&r| free(g, r))?;
        let mut end = first + 1;
        while end < regions && end - first < most && free(g, end) {
            end += 1;
        }
        for r in first..end {
            g.busy[r as usize] = true;
        }
        g.pass_from[pass] = end;
        Some(first..end)
    }

    /// Read `buf.len()` bytes at `offset`, each region checked against its leaf (by its
    /// move) before any byte of it is returned.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let regions = self.request_regions(offset, buf.len())?;
        for r in regions {
            self.make_plain(r, None)?;
        }
        self.seal
            .image
            .read_at(buf, offset)
            .map_err(|e| self.fail(self.store_error(e)))
    }

    /// Write `data` at `offset`. Acknowledged when this returns; durable once a later
    /// [`Migration::flush`] returns (as on any block device).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let regions = self.request_regions(offset, data.len())?;
        let mut issue = Vec::new();
        for r in regions {
            let range = self.range(r);
            let start = offset.max(range.start);
            let end = (offset + data.len() as u64).min(range.end);
            let piece = &data[(start - offset) as usize..(end - offset) as usize];
            let merge = Merge {
                at: (start - range.start) as usize,
                data: piece,
            };
            if !self.make_plain(r, Some(merge))? {
                issue.push((start, piece));
            }
        }
        for (at, piece) in issue {
            self.seal
                .image
                .write_at(piece, at)
                .map_err(|e| self.fail(self.store_error(e)))?;
        }
        Ok(())
    }

    /// `fdatasync(I)`: every write acknowledged so far is durable (their regions' `dirty`
    /// was committed before they were issued).
    pub fn flush(&self) -> Result<()> {
        self.refuse_if_failed(&self.lock())?;
        self.seal
            .image
            .sync()
            .map_err(|e| self.fail(self.store_error(e)))
    }

    /// The regions of a request, after checking it lies inside the image and the migration
    /// has not failed.
    fn request_regions(&self, offset: u64, len: usize) -> Result<Range<u64>> {
        self.refuse_if_failed(&self.lock())?;
        let size = self.layout.image_bytes();
        let end = offset.checked_add(len as u64).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(ReclaimError::OutOfRange {
                image: self.image_name.clone(),
                offset,
                len: len as u64,
                size,
            });
        };
        if len == 0 {
            return Ok(0..0);
        }
        let region = u64::from(self.layout.region_bytes());
        Ok(offset / region..(end - 1) / region + 1)
    }

    /// Bring region `r` to its plain place for a request; a write (`merge`) to a `plain`
    /// region is committed `dirty` first. True when the write was merged into a demand
    /// move (so it is written already).
    fn make_plain(&self, r: u64, merge: Option<Merge<'_>>) -> Result<bool> {
        loop {
            match self.next_need(r, merge.is_some())? {
                Need::Served => return Ok(false),
                Need::Evacuate => {
                    let _demand = DemandIo::new(self);
                    self.evacuate(&[r], false)?
                }
                Need::Move => {
                    let _demand = DemandIo::new(self);
                    self.move_regions(&[r], merge)?;
                    return Ok(merge.is_some());
                }
                Need::MarkDirty(upto) => {
                    let committed = self.commit_through(upto);
                    self.release(&[r]);
                    committed?;
                    return Ok(false);
                }
            }
        }
    }

    /// Under the lock: wait while `r` is busy, then say what it needs, taking it (busy)
    /// when it needs work.
    fn next_need(&self, r: u64, write: bool) -> Result<Need> {
        let mut g = self.lock();
        loop {
            self.refuse_if_failed(&g)?;
            if !g.busy[r as usize] {
                break;
            }
            g = self.wait(g);
        }
        let map_error = |source| ReclaimError::Map {
            image: self.image_name.clone(),
            file: self.moved.name().into(),
            source,
        };
        let need = match g.map.state(r).map_err(map_error)? {
            RegionState::Dirty => Need::Served,
            RegionState::Plain if !write => Need::Served,
            RegionState::Plain => {
                g.map.apply(r, RegionEvent::Write).map_err(map_error)?;
                g.changes += 1;
                Need::MarkDirty(g.changes)
            }
            RegionState::Sealed => Need::Evacuate,
            // `moving` is never found unheld: the transition table refuses it as a bug.
            RegionState::Evacuated | RegionState::Moving => {
                g.map.apply(r, RegionEvent::StartMove).map_err(map_error)?;
                Need::Move
            }
        };
        if !matches!(need, Need::Served) {
            g.busy[r as usize] = true;
        }
        Ok(need)
    }
}
