//! Evacuation (`docs/instant-reclaim.md`, section 4.2): copy the image bytes of some
//! `sealed` regions (their sealed stores) to the same offsets of the evacuation copy,
//! `fdatasync(E)`, then set them `evacuated` and commit the moved map. The image is only
//! read. A run of zeros is not written: the evacuation copy starts as zeros and is written
//! only with the image's own bytes of a `sealed` region, which do not change, so whatever a
//! crashed earlier copy left there is those bytes or zeros.

use pdguard_core::digest::is_zero;
use pdguard_core::moved_map::RegionEvent;

use super::{Migration, Result};
use crate::store::StoreError;

/// Bytes copied per read.
const CHUNK_BYTES: u64 = 1 << 20;

impl Migration {
    /// Evacuate `regions` (busy, `sealed`); releases them when done, failed or not. The
    /// `background` pass yields to demand moves between its reads.
    pub(super) fn evacuate(&self, regions: &[u64], background: bool) -> Result<()> {
        if let Err(e) = self.copy_to_evacuation(regions, background) {
            let e = self.fail(self.store_error(e));
            self.release(regions);
            return Err(e);
        }
        let upto = self.apply_all(regions, RegionEvent::Evacuate);
        let committed = upto.and_then(|upto| self.commit_through(upto));
        self.release(regions);
        committed
    }

    fn copy_to_evacuation(&self, regions: &[u64], background: bool) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for &r in regions {
            let range = self.range(r);
            let mut at = range.start;
            while at < range.end {
                if background {
                    self.yield_to_demand();
                }
                let n = (range.end - at).min(CHUNK_BYTES);
                buf.resize(n as usize, 0);
                self.seal.image.read_at(&mut buf, at)?;
                if !is_zero(&buf) {
                    self.evacuation.write_at(&buf, at)?;
                }
                at += n;
                self.advanced(n);
            }
        }
        self.evacuation.sync()
    }

    /// Apply `event` to each of `regions` in memory; the change number to commit through.
    pub(super) fn apply_all(&self, regions: &[u64], event: RegionEvent) -> Result<u64> {
        let mut g = self.lock();
        for &r in regions {
            if let Err(source) = g.map.apply(r, event) {
                drop(g);
                return Err(self.fail(super::ReclaimError::Map {
                    image: self.image_name.clone(),
                    file: self.moved.name().into(),
                    source,
                }));
            }
        }
        g.changes += 1;
        Ok(g.changes)
    }
}
