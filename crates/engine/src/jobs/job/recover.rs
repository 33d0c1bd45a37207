//! The phase tables: what `seal` and `unseal` do from each phase a record can be found in
//! (see the table on [`pdguard_core::Phase`]), finishing or rolling back a crashed job.

use super::*;

/// Seal an image, or finish or roll back whatever job a crash interrupted on it.
/// Refused while the image is attached to a loop device: the kernel could write it
/// through the device while the seal moves its sectors.
pub fn seal(
    storage: &dyn Storage,
    opts: &SealOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
    let key = opts.master_key.as_ref();
    let _lock = lock_image(storage, LockMode::Exclusive)?;
    let loops = storage
        .loop_devices()
        .map_err(|source| JobScope(storage).store(source))?;
    if !loops.is_empty() {
        return Err(JobError::InUse {
            image: storage.image_name(),
            devices: loops.join(", "),
        });
    }
    let Some(rec) = load(storage, key, Use::Act)? else {
        return fresh_seal(storage, opts, progress);
    };
    let from = Some(rec.phase);
    let done = |job: Job, outcome| job.report(outcome, from);
    let open = |rec| {
        Job::open(
            storage,
            progress,
            rec,
            Direction::Seal,
            key,
            opts.memory_bytes,
        )
    };
    match rec.phase {
        Phase::SealScatter => {
            let mut job = open(rec)?;
            job.check_seed()?;
            job.check_plaintext()?;
            job.seal_scatter()?;
            job.seal_gather()?;
            Ok(done(job, Outcome::Sealed))
        }
        Phase::SealGather => {
            let mut job = open(rec)?;
            job.seal_gather()?;
            Ok(done(job, Outcome::Sealed))
        }
        Phase::Sealed => {
            // A crash after the final record write may have left the thin disk behind.
            let _ = storage.remove_thin(&rec.seal_id);
            Err(JobError::AlreadySealed {
                image: storage.image_name(),
                record: storage.record_name(),
            })
        }
        Phase::UnsealScatter => {
            let mut job = open(rec)?;
            job.check_still_sealed()?;
            job.abandon_unseal_scatter()?;
            Ok(done(job, Outcome::UnsealRolledBack))
        }
        Phase::UnsealGather => {
            let mut job = open(rec)?;
            // The thin disk is the one complete copy: without it nothing is touched.
            drop(job.open_thin()?);
            job.commit(Phase::SealGather)?;
            job.seal_gather()?;
            Ok(done(job, Outcome::UnsealRolledBack))
        }
        Phase::Unsealed => {
            // The record is dropped (with its key slot) only over the plaintext it names.
            let job = open(rec)?;
            job.check_plain()?;
            finish_unsealed(storage, &job.rec)?;
            drop(job);
            fresh_seal(storage, opts, progress)
        }
        // A shred is final: its tombstone says the data is gone, and a new seal would
        // replace that evidence. The user removes the tombstone on purpose to reuse the image.
        Phase::Shredding | Phase::Migrating => Err(in_progress(storage, rec.phase)),
        Phase::Shredded => Err(JobError::SealOverShred {
            image: storage.image_name(),
            record: storage.record_name(),
        }),
    }
}

/// Unseal an image, or finish or roll back whatever job a crash interrupted on it.
pub fn unseal(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    progress: &dyn Progress,
) -> Result<JobReport> {
    unseal_with(storage, key, progress, strategy::DEFAULT_MEMORY_BYTES)
}

/// [`unseal`] with a memory budget for the passes (`--memory`).
pub fn unseal_with(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    progress: &dyn Progress,
    memory_bytes: u64,
) -> Result<JobReport> {
    let _lock = lock_image(storage, LockMode::Exclusive)?;
    let (bytes, rec) =
        load_with(storage, key, Use::Act, true)?.ok_or_else(|| not_sealed(storage))?;
    if rec.phase.is_shred() || rec.phase == Phase::Migrating {
        return Err(in_progress(storage, rec.phase));
    }
    let from = (rec.phase != Phase::Sealed).then_some(rec.phase);
    let mut job = Job::open(storage, progress, rec, Direction::Unseal, key, memory_bytes)?;
    // An unseal that finds the image sealed and fails verification puts the record back
    // as it was read: a refusal touches nothing.
    if matches!(job.rec.phase, Phase::Sealed | Phase::UnsealScatter) {
        job.restore = Some((bytes, job.rec.phase));
    }
    let outcome = match job.rec.phase {
        Phase::SealScatter => {
            // The image was never touched: dropping the thin disk, the record and then the
            // key slot is the rollback, once the image is seen to be the plaintext.
            job.check_plaintext()?;
            let image = storage.image_name();
            drop_seal(storage, &job.rec.seal_id).map_err(|source| job.interrupted(source))?;
            tracing::info!(%image, "rolled back an interrupted seal");
            Outcome::SealRolledBack
        }
        // A phase that gathers the plaintext checks it region by region: the tree is
        // loaded and checked against the record's root before anything is written.
        Phase::SealGather => {
            drop(job.open_thin()?);
            job.load_tree()?;
            job.commit(Phase::UnsealGather)?;
            job.unseal_gather()?;
            Outcome::SealRolledBack
        }
        Phase::Sealed => {
            job.check_fingerprint()?;
            job.load_tree()?;
            job.unseal_scatter()?;
            job.unseal_gather()?;
            Outcome::Unsealed
        }
        Phase::UnsealScatter => {
            job.load_tree()?;
            job.unseal_scatter()?;
            job.unseal_gather()?;
            Outcome::Unsealed
        }
        Phase::UnsealGather => {
            job.load_tree()?;
            job.unseal_gather()?;
            Outcome::Unsealed
        }
        Phase::Unsealed => {
            job.check_plain()?;
            finish_unsealed(storage, &job.rec)?;
            Outcome::Unsealed
        }
        Phase::Shredding | Phase::Shredded | Phase::Migrating => unreachable!("refused above"),
    };
    Ok(job.report(outcome, from))
}

/// Undo a seal that never wrote the image: thin disk, region digest tree, placement table,
/// record, then key slot (a slot left by a crash here has no record and is destroyed by
/// the next seal; a tree or table left so is replaced by the next seal's).
pub(super) fn drop_seal(storage: &dyn Storage, seal_id: &str) -> Result<(), StoreError> {
    storage.remove_thin(seal_id)?;
    storage.remove_tree()?;
    storage.remove_place()?;
    storage.remove_record()?;
    storage.destroy_key_slot()
}

/// After phase `unsealed`: the thin disk, an instant reclaim's evacuation copy and moved
/// map (a crash may leave them after its record said `unsealed`), the record, the key slot.
pub(super) fn finish_unsealed(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    storage
        .remove_migration_file(MigrationFile::EvacuationCopy)
        .and_then(|()| storage.remove_migration_file(MigrationFile::MovedMap))
        .and_then(|()| drop_seal(storage, &rec.seal_id))
        .map_err(|source| JobScope(storage).store(source))
}
