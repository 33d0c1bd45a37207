//! The gather of a move: the plaintext of some regions from their sealed places
//! (`docs/instant-reclaim.md`, section 5). Plaintext sector `i` is sealed sector
//! `sigma(i)`, in the image while its sealed store is `sealed` and in the evacuation copy
//! from `evacuated` on, encrypted with the tweak `pi(i)` (secure profile; a sealed sector
//! of zeros is not decrypted under `keep_holes`); a sector in a hole of a dense seal's
//! original has no sealed place and is zeros.
//!
//! The wanted sealed sectors are sorted and read in runs, a gap of up to [`GAP_BYTES`]
//! read through rather than split, each run inside one sealed store (whose source is
//! decided once, under the lock, and its image reads counted until the gather ends).

use pdguard_core::digest::is_zero;
use pdguard_core::moved_map::RegionState;

use super::{Migration, Result};
use crate::store::Disk;

/// Unwanted bytes a run reads through instead of starting a new read.
const GAP_BYTES: u64 = 4 << 10;
/// Most bytes one read of a run takes.
const RUN_BYTES: u64 = 1 << 20;

/// One wanted sealed sector: where it is, its tweak, and where its plaintext goes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Want {
    sealed_sector: u64,
    slot: u64,
    buffer: usize,
    offset: usize,
}

impl Migration {
    /// The plaintext of `regions` (each busy, so nobody else moves them), one buffer each.
    pub(super) fn gather(&self, regions: &[u64]) -> Result<Vec<Vec<u8>>> {
        let s = self.sector;
        let mut bufs: Vec<Vec<u8>> = regions
            .iter()
            .map(|&r| {
                let range = self.range(r);
                vec![0u8; (range.end - range.start) as usize]
            })
            .collect();
        let mut wants = Vec::new();
        for (buffer, &r) in regions.iter().enumerate() {
            let range = self.range(r);
            for i in range.start / s..range.end / s {
                if let Some(at) = self.address.locate(i) {
                    wants.push(Want {
                        sealed_sector: at.sealed_sector,
                        slot: at.slot,
                        buffer,
                        offset: (i * s - range.start) as usize,
                    });
                }
            }
        }
        wants.sort_unstable();
        let stores = self.stores_of(&wants);
        let from_image = self.count_image_reads(&stores);
        let read = self.read_runs(&wants, &stores, &from_image, &mut bufs);
        self.end_image_reads(&stores, &from_image);
        read.map_err(|e| self.fail(self.store_error(e)))?;
        Ok(bufs)
    }

    fn store_of(&self, sealed_sector: u64) -> u64 {
        sealed_sector * self.sector / u64::from(self.layout.region_bytes())
    }

    /// The sealed stores `wants` (sorted) reads, ascending.
    fn stores_of(&self, wants: &[Want]) -> Vec<u64> {
        let mut stores: Vec<u64> = wants
            .iter()
            .map(|w| self.store_of(w.sealed_sector))
            .collect();
        stores.dedup();
        stores
    }

    /// For each store: read from the image (counted, so that no move overwrites its
    /// region meanwhile) or from the evacuation copy.
    fn count_image_reads(&self, stores: &[u64]) -> Vec<bool> {
        let mut g = self.lock();
        stores
            .iter()
            .map(|&st| {
                let sealed = g.map.state(st).ok() == Some(RegionState::Sealed);
                if sealed {
                    g.image_readers[st as usize] += 1;
                }
                sealed
            })
            .collect()
    }

    fn end_image_reads(&self, stores: &[u64], from_image: &[bool]) {
        let mut g = self.lock();
        for (&st, _) in stores.iter().zip(from_image).filter(|(_, &i)| i) {
            g.image_readers[st as usize] -= 1;
        }
        drop(g);
        self.changed.notify_all();
    }

    fn read_runs(
        &self,
        wants: &[Want],
        stores: &[u64],
        from_image: &[bool],
        bufs: &mut [Vec<u8>],
    ) -> Result<(), crate::store::StoreError> {
        let s = self.sector;
        let mut tmp = Vec::new();
        let mut k = 0;
        while k < wants.len() {
            let first = wants[k].sealed_sector;
            let store = self.store_of(first);
            let mut end = k + 1;
            while end < wants.len() {
                let j = wants[end].sealed_sector;
                let gap = (j - wants[end - 1].sealed_sector - 1) * s;
                if self.store_of(j) != store || gap > GAP_BYTES || (j + 1 - first) * s > RUN_BYTES {
                    break;
                }
                end += 1;
            }
            let last = wants[end - 1].sealed_sector;
            let image = stores
                .binary_search(&store)
                .map(|i| from_image[i])
                .unwrap_or(false);
            let disk: &dyn Disk = if image {
                &*self.seal.image
            } else {
                &*self.evacuation
            };
            tmp.resize(((last + 1 - first) * s) as usize, 0);
            disk.read_at(&mut tmp, first * s)?;
            for w in &wants[k..end] {
                let at = ((w.sealed_sector - first) * s) as usize;
                let sector = &mut bufs[w.buffer][w.offset..w.offset + s as usize];
                sector.copy_from_slice(&tmp[at..at + s as usize]);
                self.decrypt(w.slot, sector);
            }
            k = end;
        }
        Ok(())
    }

    /// `D` of the seal (nothing in the patent profile; a sealed sector of zeros stays
    /// zeros under `keep_holes`).
    fn decrypt(&self, slot: u64, sector: &mut [u8]) {
        if let Some(c) = &self.seal.cipher {
            if !(self.seal.rec.keep_holes && is_zero(sector)) {
                use pdguard_core::cipher::SectorCipher;
                c.decrypt(slot, sector);
            }
        }
    }
}
