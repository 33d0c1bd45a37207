//! Instant reclaim: the migration that unseals an image **while it is served**
//! (`docs/instant-reclaim.md`; not the record-version migration of `pdguard image migrate`,
//! which is `job/migrate.rs`).
//!
//! Every region goes through two durable steps: **evacuate** (its sealed store is copied
//! to the evacuation copy **E**, same offsets, fsynced) and **move** (its plaintext is
//! gathered from the sealed places, checked against the region digest tree, written at its
//! plain place, fsynced). The **moved map** **M** (`RECORD.moved`, two slots) says after
//! each commit where each region is; the record says phase `migrating` (version 5).
//! Requests move the region they need first (a **demand move**), so a request is always
//! served at the plain place.
//!
//! | room            | what                                                            |
//! |-----------------|-----------------------------------------------------------------|
//! | `start.rs`      | start (4.1), resume from phase `migrating` (7), the end (4.4)   |
//! | `moved_file.rs` | the moved map file: create, load, A/B commit                    |
//! | `gather.rs`     | a region's plaintext from its sealed places                     |
//! | `evacuate.rs`   | evacuation windows                                              |
//! | `mover.rs`      | move windows and demand moves (with a merged write)             |
//! | `bulk.rs`       | the move pass in bulk: **E** bucketed, merged back in order     |
//! | `requests.rs`   | `read`, `write`, `flush`, and the background `step`             |
//! | `check.rs`      | every region against its leaf, wherever it is (`image verify`)  |
//!
//! Concurrency: every thread works through one [`Shared`] under a mutex. A region being
//! evacuated, moved or marked `dirty` is **busy** until its commit is durable; anyone else
//! who needs it waits on the condition variable (notified at every release) and looks
//! again. So a state another thread acts on is always a committed one. Reads of a sealed
//! store in the image are counted per store, and a move drains them before it overwrites
//! that store's region.

mod bulk;
mod check;
mod error;
mod evacuate;
mod gather;
mod moved_file;
mod mover;
mod requests;
mod start;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use pdguard_core::moved_map::MovedMap;
use pdguard_core::region_tree::{RegionKeys, RegionLayout, RegionTree};
use pdguard_core::sealed_address::SealedAddress;

pub use check::RegionCheck;
pub use error::{ReclaimError, Result};
pub use requests::StepDone;
pub use start::{Finished, MigrationOptions};

use super::job::SealOpened;
use super::Progress;
use crate::store::{Disk, StoreError};
use moved_file::MovedFile;

/// How long after a request last needed a demand move the background keeps to windows of
/// one region.
const DEMAND_RECENT: Duration = Duration::from_secs(1);
/// The longest the background waits for demand moves at a time before its next piece.
const YIELD_AT_MOST: Duration = Duration::from_millis(250);

/// One migration in progress: built by [`Migration::start`] (or resumed by it from phase
/// `migrating`), served by [`Migration::read`] and [`Migration::write`], driven by
/// [`Migration::step`], ended by [`Migration::finish`].
pub struct Migration {
    /// The image's name, for messages.
    image_name: String,
    seal: SealOpened,
    address: SealedAddress<'static>,
    layout: RegionLayout,
    sector: u64,
    /// **E**.
    evacuation: Box<dyn Disk>,
    /// **T**, the bulk move pass's scratch thin disk (`bulk.rs`); `None`: moves go region
    /// by region only.
    bulk_thin: Option<Box<dyn Disk>>,
    /// **M**.
    moved: MovedFile,
    tree: Option<RegionTree>,
    region_keys: RegionKeys,
    window_regions: u64,
    shared: Mutex<Shared>,
    /// Notified whenever a region stops being busy, a store's image reads drain, or the
    /// migration fails.
    changed: Condvar,
    /// Found in phase `migrating` and resumed.
    resumed: bool,
    /// The read path's placement was read from the seal's placement table (not rebuilt
    /// from its key).
    placement_from_table: bool,
    /// Told the bytes each evacuation and move writes (a progress bar, the test hook).
    progress: Option<Arc<dyn Progress>>,
}

/// What the threads share.
struct Shared {
    map: MovedMap,
    /// A region being evacuated, moved or marked dirty, until its commit is durable.
    busy: Vec<bool>,
    /// Reads of sealed store `r` from the image in flight.
    image_readers: Vec<u32>,
    /// Changes made to `map` in memory, and how many of them are committed.
    changes: u64,
    committed: u64,
    /// The first failure: every request after it is refused.
    failed: Option<String>,
    /// Where the evacuation pass (0) and the move pass (1) look for their next window.
    pass_from: [u64; 2],
    /// Demand moves and evacuations doing their I/O now (not those waiting for a busy
    /// region): the background yields the disk to them (see [`Migration::yield_to_demand`]).
    demand_io: u32,
    /// When a request last needed a demand move or evacuation.
    last_demand: Option<std::time::Instant>,
    /// Where the bulk move pass stands.
    bulk: bulk::Bulk,
}

impl Migration {
    /// The read path's placement was read from the seal's placement table at the start
    /// (`docs/instant-reclaim.md`, section 5), not rebuilt from the seal's key.
    pub fn placement_from_table(&self) -> bool {
        self.placement_from_table
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock is a bug reported already; the data stays as the
        // moved map on disk says.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'g>(&self, g: MutexGuard<'g, Shared>) -> MutexGuard<'g, Shared> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    fn store_error(&self, source: StoreError) -> ReclaimError {
        ReclaimError::Store {
            image: self.image_name.clone(),
            source,
        }
    }

    /// Refuse everything from now on, remembering why; give the error back.
    fn fail(&self, e: ReclaimError) -> ReclaimError {
        let mut g = self.lock();
        if g.failed.is_none() {
            g.failed = Some(e.to_string());
        }
        drop(g);
        self.changed.notify_all();
        e
    }

    fn refuse_if_failed(&self, g: &Shared) -> Result<()> {
        match &g.failed {
            Some(first) => Err(ReclaimError::Failed {
                image: self.image_name.clone(),
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Make every change made in memory up to change number `upto` durable: one commit
    /// of the whole map, shared by every change made before it (group commit).
    fn commit_through(&self, upto: u64) -> Result<()> {
        let _one_at_a_time = self.moved.commit_lock();
        let (commit, changes) = {
            let g = self.lock();
            if g.committed >= upto {
                return Ok(());
            }
            let commit = g
                .map
                .next_commit(self.moved.key())
                .map_err(|source| ReclaimError::Map {
                    image: self.image_name.clone(),
                    file: self.moved.name().into(),
                    source,
                });
            (commit, g.changes)
        };
        let commit = commit.map_err(|e| self.fail(e))?;
        self.moved
            .write(&commit)
            .map_err(|e| self.fail(self.store_error(e)))?;
        let mut g = self.lock();
        g.map.committed(commit.generation);
        g.committed = changes;
        Ok(())
    }

    /// Release `regions` (busy no more) and wake whoever waits.
    fn release(&self, regions: &[u64]) {
        let mut g = self.lock();
        for &r in regions {
            g.busy[r as usize] = false;
        }
        drop(g);
        self.changed.notify_all();
    }

    /// The bytes of region `r`.
    fn range(&self, r: u64) -> std::ops::Range<u64> {
        // Every region index used here comes from the layout itself.
        self.layout.range(r).unwrap_or(0..0)
    }

    /// The moved map's counts, for progress and tests: (sealed, evacuated, plain, dirty).
    pub fn counts(&self) -> [u64; 4] {
        use pdguard_core::moved_map::RegionState as S;
        let g = self.lock();
        [S::Sealed, S::Evacuated, S::Plain, S::Dirty].map(|s| g.map.count(s))
    }

    /// The background's turn (`docs/instant-reclaim.md` section 4.2, "priority"): a
    /// request that needs its region moved is waiting on the disk, and on a slow disk every
    /// read of the background's queued ahead of the request's delays it (a mounted file
    /// system's first reads waited behind whole 64 MiB evacuation windows). So the
    /// background waits while a demand move does its I/O (at most [`YIELD_AT_MOST`] at a
    /// time, so it always makes progress), and works in windows of one region while
    /// requests have needed moves within [`DEMAND_RECENT`].
    fn yield_to_demand(&self) {
        let until = std::time::Instant::now() + YIELD_AT_MOST;
        let mut g = self.lock();
        while g.demand_io > 0 && g.failed.is_none() {
            let now = std::time::Instant::now();
            if now >= until {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, until - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Regions of the background's next window: one while requests need demand moves.
    fn window_now(&self, g: &Shared) -> u64 {
        match g.last_demand {
            Some(t) if t.elapsed() < DEMAND_RECENT => 1,
            _ => self.window_regions,
        }
    }

    /// Regions of the image.
    pub fn regions(&self) -> u64 {
        self.layout.regions()
    }

    /// Report to `progress` the bytes every evacuation and move writes from now on, as
    /// they are written (before their fsync and commit): a progress bar, or the test hook
    /// that stops a migration at a chosen byte to kill it there (`tests/kill.rs`).
    pub fn observe(&mut self, progress: Arc<dyn Progress>) {
        self.progress = Some(progress);
    }

    /// Bytes the background steps have left to copy: each `sealed` region is copied twice
    /// (evacuated, then moved), each `evacuated` one once.
    pub fn bytes_left(&self) -> u64 {
        use pdguard_core::moved_map::RegionState as S;
        let g = self.lock();
        (0..self.layout.regions())
            .map(|r| {
                let range = self.range(r);
                let times = match g.map.state(r) {
                    Ok(S::Sealed) => 2,
                    Ok(S::Evacuated | S::Moving) => 1,
                    _ => 0,
                };
                times * (range.end - range.start)
            })
            .sum()
    }

    /// `bytes` more were copied by an evacuation or a move.
    fn advanced(&self, bytes: u64) {
        if let Some(p) = &self.progress {
            p.advance(bytes);
        }
    }
}

#[cfg(test)]
mod tests;
