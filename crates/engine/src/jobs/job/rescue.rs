//! `image unseal --force --output FILE`: the best-effort plaintext of a sealed image that
//! no longer verifies, written to a new file. The sealed image and its record are only
//! read (a shared lock, like verify): the damage stays where it is, for a later attempt
//! or a forensic look. The scratch thin disk is the one a normal unseal of this seal would
//! use, and is removed afterwards (a crash leaves it for the next unseal, which drops it).

use super::*;

/// What a rescue found: each digest as computed, and whether it matches the record.
#[derive(Debug, Clone)]
pub struct RescueReport {
    pub record: SealRecord,
    pub sealed_digest: String,
    pub sealed_ok: bool,
    pub plain_digest: String,
    pub plain_ok: bool,
}

/// Unseal the sealed image of `storage` into `output` (a new, empty file of the image's
/// size), without changing the image or its record. A digest mismatch is reported, not
/// refused: that is the point.
pub fn rescue(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    output: &dyn Disk,
    progress: &dyn Progress,
    memory_bytes: u64,
) -> Result<RescueReport> {
    let _lock = lock_image(storage, LockMode::Shared)?;
    let rec = load(storage, key, Use::Read)?.ok_or_else(|| not_sealed(storage))?;
    if rec.phase != Phase::Sealed {
        return Err(in_progress(storage, rec.phase));
    }
    if rec.profile == Profile::Secure && key.is_none() {
        return Err(JobError::KeyMissing {
            image: storage.image_name(),
        });
    }
    let keys = Keys::resolve(storage, &rec, key)?;
    let store_err = |source| JobScope(storage).store(source);
    let image = storage.open_image(false).map_err(store_err)?;
    if output.len() != rec.image_bytes {
        return Err(JobError::Unsupported(format!(
            "the output file is {} bytes, the sealed image {} bytes",
            output.len(),
            rec.image_bytes
        )));
    }
    let job = Job::with_image(Parts {
        storage,
        progress,
        mac_key: mac_key_for(&rec, key),
        rec,
        direction: Direction::Unseal,
        image,
        keys,
        memory_bytes,
    })?;
    let seal_id = job.rec.seal_id.clone();
    let run = || -> Result<(blake3::Hash, blake3::Hash), StoreError> {
        storage.remove_thin(&seal_id)?;
        let thin = storage.create_thin(&seal_id, job.geometry.thin_bytes())?;
        progress.pass("scatter", job.geometry.disk_bytes());
        let sealed = {
            let (i, t) = (job.sparse(&*job.image)?, job.sparse(&*thin)?);
            job.strategy.scatter_sealed(&job.ctx(), &i, &t)?
        };
        progress.pass("gather", job.geometry.disk_bytes());
        let plain = {
            let (t, o) = (job.sparse(&*thin)?, job.sparse(output)?);
            job.strategy.gather_plain(&job.ctx(), &t, &o)?
        };
        output.sync()?;
        Ok((sealed, plain))
    };
    let moved = run();
    let _ = storage.remove_thin(&seal_id);
    let (sealed, plain) = moved.map_err(store_err)?;
    let (sealed, plain) = (sealed.to_hex().to_string(), plain.to_hex().to_string());
    Ok(RescueReport {
        sealed_ok: job.rec.sealed_digest.as_deref() == Some(sealed.as_str()),
        plain_ok: job.rec.plain_digest.as_deref() == Some(plain.as_str()),
        sealed_digest: sealed,
        plain_digest: plain,
        record: job.rec,
    })
}
