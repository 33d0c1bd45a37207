//! An instant reclaim driven to its end offline, with no front-end serving the image:
//! `pdguard image unseal` on a record in phase `migrating` (its daemon died and is not
//! restarted, or the disk was moved to another host) resumes the migration
//! (`docs/instant-reclaim.md`, section 7) and runs its background steps to the end (4.4);
//! `pdguard image unseal --migrate` starts one on a sealed image (4.1) and does the same —
//! an unseal by the instant reclaim's path, to compare with the copy unseal and to kill
//! at random moments (`tests/kill.rs`). Either ends as an unseal does: the plaintext in
//! place, checked, the record and its files gone.

use std::sync::Arc;

use super::*;
use crate::jobs::reclaim::{Migration, MigrationOptions, ReclaimError, RegionCheck, StepDone};

/// The progress pass of the background steps (`PDGUARD_TEST_PAUSE_AT=migrate:BYTES`).
pub const MIGRATE_PASS: &str = "migrate";
/// The progress pass of the end (`finish`), of no bytes: every region is at its plain
/// place and the record still says `migrating` as it starts.
pub const MIGRATE_END_PASS: &str = "migrate-end";

/// How [`reclaim_offline`] runs.
#[derive(Debug, Clone)]
pub struct OfflineReclaim {
    /// Start a migration on a sealed image (`--migrate`); without it only a record in
    /// phase `migrating` is taken (and a sealed one is refused).
    pub start: bool,
    /// Bytes of one background window (see [`MigrationOptions::window_bytes`]).
    pub window_bytes: u64,
}

/// What [`reclaim_offline`] did.
#[derive(Debug, Clone)]
pub struct OfflineReport {
    /// As an unseal's: `Unsealed`, resumed from `migrating` when the migration was found.
    pub job: JobReport,
    /// Regions written by a user of the image while a front-end served the migration:
    /// checked against the seal's digest tree when moved, then changed, so the end checks
    /// them against nothing (their content is the user's).
    pub dirty_regions: u64,
    pub regions: u64,
}

/// Resume the instant reclaim of `storage`'s image (or, with `opts.start`, start one on a
/// sealed image) and drive it to its end. `progress` sees the pass [`MIGRATE_PASS`],
/// advanced by every byte an evacuation or a move writes, then [`MIGRATE_END_PASS`].
pub fn reclaim_offline(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    progress: Arc<dyn Progress>,
    opts: &OfflineReclaim,
) -> Result<OfflineReport, ReclaimError> {
    let rec = inspect(storage)?;
    if rec.phase == Phase::Sealed && !opts.start {
        return Err(JobError::Unsupported(format!(
            "{} is sealed, not being reclaimed; unseal it with `pdguard image unseal {}` (add --instant to unseal it region by region, as an instant reclaim does)",
            storage.image_name(),
            storage.image_name()
        ))
        .into());
    }
    // The tree is authenticated against the record before the migration writes anything.
    let tree = load_tree_for_migration(storage, key)?;
    let migration_opts = MigrationOptions {
        window_bytes: opts.window_bytes,
        ..MigrationOptions::default()
    };
    let mut m = match opts.start {
        true => Migration::start(storage, key, tree, &migration_opts)?,
        false => Migration::resume(storage, key, tree, &migration_opts)?,
    };
    progress.pass(MIGRATE_PASS, m.bytes_left());
    m.observe(progress.clone());
    let regions = m.regions();
    while m.step()? != StepDone::Complete {}
    progress.pass(MIGRATE_END_PASS, 0);
    let done = m.finish(storage)?;
    Ok(OfflineReport {
        job: JobReport {
            outcome: Outcome::Unsealed,
            resumed_from: done.resumed.then_some(Phase::Migrating),
            record: done.record,
        },
        dirty_regions: done.dirty_regions,
        regions,
    })
}

/// `image verify` of an image in phase `migrating` that nothing serves: every region
/// checked against the seal's region digest tree where the moved map says it is (`dirty`
/// regions counted, not checked). Writes nothing; a record in another phase is refused.
/// Needs the master key in the secure profile (the moved map and the tree are keyed).
pub fn verify_migrating(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    progress: &dyn Progress,
) -> Result<RegionCheck, ReclaimError> {
    let tree = load_tree_for_migration(storage, key)?;
    let opts = MigrationOptions {
        bulk: false,
        ..MigrationOptions::default()
    };
    let m = Migration::resume(storage, key, tree, &opts)?;
    m.check_regions(progress)
}
