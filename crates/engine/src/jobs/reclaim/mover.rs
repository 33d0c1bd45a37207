//! Moves (`docs/instant-reclaim.md`, sections 4.2 and 4.3): gather the plaintext of some
//! `evacuated` regions from their sealed places (all in the evacuation copy by then),
//! check each against its leaf of the region digest tree, drain the image reads of their
//! sealed stores, write them at their plain places, `fdatasync(I)`, then commit them
//! `plain` — or, for a demand move carrying a user write, `dirty`
//! (`CommitMoveWritten`). A region that fails its leaf, or any I/O error, aborts the move
//! (`AbortMove`: nothing was written, the region stays at its sealed places) and fails the
//! migration.

use pdguard_core::digest::is_zero;
use pdguard_core::moved_map::RegionEvent;

use super::{Migration, ReclaimError, Result};
use crate::store::StoreError;

/// A user write carried by a demand move: `data` at byte `at` of the region.
#[derive(Clone, Copy)]
pub(super) struct Merge<'d> {
    pub(super) at: usize,
    pub(super) data: &'d [u8],
}

impl Migration {
    /// Move `regions` (busy, `moving`); releases them when done, failed or not. With
    /// `merge` (one region), the write is applied before the region is written.
    pub(super) fn move_regions(&self, regions: &[u64], merge: Option<Merge<'_>>) -> Result<()> {
        let bufs = match self.plaintext_of(regions, merge) {
            Ok(bufs) => bufs,
            Err(e) => return Err(self.abort_move(regions, e)),
        };
        let event = match merge {
            Some(_) => RegionEvent::CommitMoveWritten,
            None => RegionEvent::CommitMove,
        };
        let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
        self.write_and_commit(regions, &slices, event)
    }

    /// The rest of a move once the plaintext of `regions` (busy, `moving`) is known and
    /// checked: write it at the plain places, `fdatasync(I)`, commit `event`; release them.
    pub(super) fn write_and_commit(
        &self,
        regions: &[u64],
        bufs: &[&[u8]],
        event: RegionEvent,
    ) -> Result<()> {
        if let Err(e) = self.write_plain(regions, bufs) {
            return Err(self.abort_move(regions, e));
        }
        let committed = self
            .apply_all(regions, event)
            .and_then(|upto| self.commit_through(upto));
        self.release(regions);
        committed
    }

    /// A move that failed: nothing reached the image's plain places durably under a map
    /// saying so. The regions stay at their sealed places; the migration fails.
    fn abort_move(&self, regions: &[u64], e: ReclaimError) -> ReclaimError {
        let _ = self.apply_all(regions, RegionEvent::AbortMove);
        let e = self.fail(e);
        self.release(regions);
        e
    }

    /// The plaintext of `regions`, checked against their leaves, `merge` applied.
    fn plaintext_of(&self, regions: &[u64], merge: Option<Merge<'_>>) -> Result<Vec<Vec<u8>>> {
        let whole = match (regions, merge) {
            ([r], Some(m)) => {
                let range = self.range(*r);
                m.at == 0 && m.data.len() as u64 == range.end - range.start
            }
            _ => false,
        };
        // A write over the whole region needs nothing of its old content.
        let mut bufs = match merge {
            Some(m) if whole => vec![m.data.to_vec()],
            _ => self.gather(regions)?,
        };
        if !whole {
            self.check_leaves(regions, &bufs)?;
        }
        if let (Some(m), Some(buf)) = (merge, bufs.first_mut()) {
            buf[m.at..m.at + m.data.len()].copy_from_slice(m.data);
        }
        Ok(bufs)
    }

    /// Write each region's plaintext at its plain place (after the image reads of their
    /// sealed stores drained), then `fdatasync(I)`.
    fn write_plain(&self, regions: &[u64], bufs: &[&[u8]]) -> Result<()> {
        self.drain_image_reads(regions);
        let written = regions
            .iter()
            .zip(bufs)
            .try_for_each(|(&r, buf)| {
                self.write_region(r, buf)?;
                self.advanced(buf.len() as u64);
                Ok(())
            })
            .and_then(|()| self.seal.image.sync());
        written.map_err(|e| self.store_error(e))
    }

    /// Each region against its leaf, before anything is written.
    fn check_leaves(&self, regions: &[u64], bufs: &[Vec<u8>]) -> Result<()> {
        for (&r, buf) in regions.iter().zip(bufs) {
            self.check_leaf(r, buf)?;
        }
        Ok(())
    }

    /// Region `r`'s plaintext against its leaf (nothing to check without a tree).
    pub(super) fn check_leaf(&self, r: u64, buf: &[u8]) -> Result<()> {
        let Some(tree) = &self.tree else {
            return Ok(());
        };
        tree.check_region(&self.region_keys, r, buf)
            .map_err(|source| ReclaimError::Region {
                image: self.image_name.clone(),
                source,
            })
    }

    /// Wait until no gather reads the sealed stores of `regions` from the image: from
    /// here on their bytes are overwritten. (No new such read starts: they are not
    /// `sealed` any more.)
    fn drain_image_reads(&self, regions: &[u64]) {
        let mut g = self.lock();
        while regions.iter().any(|&r| g.image_readers[r as usize] > 0) {
            g = self.wait(g);
        }
    }

    /// Region `r`'s plaintext at its plain place. A dense seal's sectors in the original's
    /// holes that are still zeros are punched, so the original's holes come back.
    fn write_region(&self, r: u64, buf: &[u8]) -> Result<(), StoreError> {
        let start = self.range(r).start;
        if self.seal.dense.is_none() {
            return self.seal.image.write_at(buf, start);
        }
        let s = self.sector as usize;
        let hole = |k: usize| {
            let i = (start + (k * s) as u64) / self.sector;
            self.address.locate(i).is_none() && is_zero(&buf[k * s..(k + 1) * s])
        };
        let sectors = buf.len() / s;
        let mut k = 0;
        while k < sectors {
            let kind = hole(k);
            let mut end = k + 1;
            while end < sectors && hole(end) == kind {
                end += 1;
            }
            let at = start + (k * s) as u64;
            if kind {
                self.seal.image.punch(at, ((end - k) * s) as u64)?;
            } else {
                self.seal.image.write_at(&buf[k * s..end * s], at)?;
            }
            k = end;
        }
        Ok(())
    }
}
