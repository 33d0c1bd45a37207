//! Reading a seal record: parse, take the image's lock, authenticate (a record cannot
//! switch its own authentication off), and hold it to its derived thin disk.

use super::*;

/// Read and parse the record (checksum and consistency only).
pub(super) fn decode(storage: &dyn Storage) -> Result<Option<(Vec<u8>, SealRecord)>> {
    let bytes = storage
        .read_record()
        .map_err(|source| JobScope(storage).store(source))?;
    bytes
        .map(|b| {
            let rec = SealRecord::decode(&b).map_err(|source| JobScope(storage).record(source))?;
            Ok((b, rec))
        })
        .transpose()
}

/// Take the image's lock for a whole job, before its record is read: one job per image,
/// across processes and threads. A second job fails at once as busy.
pub(super) fn lock_image(storage: &dyn Storage, mode: LockMode) -> Result<ImageLock> {
    storage.lock_image(mode).map_err(|source| match source {
        StoreError::Busy { .. } => JobError::Busy(source),
        source => JobScope(storage).store(source),
    })
}

/// What a job will do with the record it loads, which decides the records it may act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// Only read the image (verify, rescue).
    Read,
    /// Seal, unseal or shred: may write the image, or destroy or wrap a key.
    Act,
}

/// The record as a job may use it: parsed, authenticated under the master key when the
/// seal has one and a key is given (every field, before any file is touched), and naming
/// no thin disk but the one derived from the seal id.
pub(super) fn load(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    why: Use,
) -> Result<Option<SealRecord>> {
    Ok(load_with(storage, key, why, true)?.map(|(_, rec)| rec))
}

/// [`load`], returning the bytes the record was read from too, with the derived thin-disk
/// check only when `thin` (a command that never touches a thin disk, like `verify`, does
/// not judge which directory it was in).
pub(super) fn load_with(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    why: Use,
    thin: bool,
) -> Result<Option<(Vec<u8>, SealRecord)>> {
    let Some((bytes, rec)) = decode(storage)? else {
        return Ok(None);
    };
    // The MAC is judged first (an edited record is named as such); a record without one
    // is held to its thin disk before a migration writes it.
    let old = rec.version < KEY_SLOT_VERSION;
    if thin && old {
        check_thin_path(storage, &rec)?;
    }
    let (bytes, rec) = authentic(storage, bytes, rec, key, why)?;
    if thin && !old {
        check_thin_path(storage, &rec)?;
    }
    Ok(Some((bytes, rec)))
}

/// The record's `thin_path` is the one derived from its seal id.
pub(super) fn check_thin_path(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    let Some(named) = &rec.thin_path else {
        return Ok(());
    };
    let derived = storage
        .thin_name(&rec.seal_id)
        .map_err(|source| JobScope(storage).store(source))?;
    if *named == derived {
        return Ok(());
    }
    let (n, d) = (std::path::Path::new(named), std::path::Path::new(&derived));
    let fix = if n.file_name() == d.file_name() {
        format!("if the record is genuine, run the command again with --thin-dir {}, else restore the record from a backup", n.parent().unwrap_or(n).display())
    } else {
        format!("the record does not belong to image {} (or was edited); pass the record of this image with --record, or restore it from a backup", storage.image_name())
    };
    Err(JobError::ThinPathMismatch {
        record: storage.record_name(),
        named: named.clone(),
        derived,
        fix,
    })
}

/// A record may switch its own authentication off only by lying about its version or
/// profile, so: a key slot beside a record means the record is a secure one of a version
/// with a MAC (3 on); with the master key, that MAC is checked; and a secure record of
/// version 1 or 2 (no MAC) is acted on only once migrated, which the master key does here
/// on the next write (after checking that its wrapped key is bound to it), and which
/// `pdguard image migrate` does on purpose. Without the key such a record is only read.
pub(super) fn authentic(
    storage: &dyn Storage,
    bytes: Vec<u8>,
    rec: SealRecord,
    key: Option<&MasterKey>,
    why: Use,
) -> Result<(Vec<u8>, SealRecord)> {
    let old = rec.version < KEY_SLOT_VERSION;
    if old && rec.profile == Profile::Secure && !rec.phase.is_shred() {
        return match (key, why) {
            (Some(master), Use::Act) => migrate::upgrade(storage, rec, master),
            (Some(_), Use::Read) => Err(old_record(storage, &rec, "")),
            (None, _) => {
                refuse_beside_slot(storage, &rec)?;
                match why {
                    Use::Read => Ok((bytes, rec)),
                    Use::Act => Err(old_record(storage, &rec, " (without the master key it cannot be migrated: a version 1 or 2 record holds the wrapped key itself, so overwriting and deleting the record file, e.g. with `shred -u`, destroys the key)")),
                }
            }
        };
    }
    if old || rec.profile != Profile::Secure {
        refuse_beside_slot(storage, &rec)?;
    }
    if let (Profile::Secure, Some(master)) = (rec.profile, key) {
        if let Some(want) = rec.master_key_id() {
            if master.id() != want {
                return Err(JobError::WrongKey {
                    image: storage.image_name(),
                    have: master.id(),
                    want: want.into(),
                });
            }
        }
        let mac_key = keys::record_mac_key(master, &rec.seal_id);
        record::authenticate(&bytes, &rec, &mac_key)
            .map_err(|source| JobScope(storage).record(source))?;
    }
    Ok((bytes, rec))
}

/// A record that cannot carry a MAC (patent profile, or version 1 or 2) is refused when a
/// key slot exists: only a secure seal of version 3 on has one.
pub(super) fn refuse_beside_slot(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    let slot = storage
        .read_key_slot()
        .map_err(|source| JobScope(storage).store(source))?;
    if slot.is_none() {
        return Ok(());
    }
    Err(JobError::Downgraded {
        record: storage.record_name(),
        slot: storage.key_slot_name(),
        why: format!(
            "it says {} profile, record version {}, which has no MAC",
            rec.profile.name(),
            rec.version
        ),
    })
}

pub(super) fn old_record(storage: &dyn Storage, rec: &SealRecord, hint: &str) -> JobError {
    JobError::OldRecord {
        image: storage.image_name(),
        record: storage.record_name(),
        version: rec.version,
        hint: hint.into(),
    }
}

/// The key of a record's MAC: secure profile, version 3 on, with the master key.
pub(super) fn mac_key_for(
    rec: &SealRecord,
    key: Option<&MasterKey>,
) -> Option<zeroize::Zeroizing<[u8; 32]>> {
    match (rec.profile, key) {
        (Profile::Secure, Some(k)) if rec.version >= KEY_SLOT_VERSION => {
            Some(keys::record_mac_key(k, &rec.seal_id))
        }
        _ => None,
    }
}

pub(super) fn not_sealed(storage: &dyn Storage) -> JobError {
    JobError::NotSealed {
        image: storage.image_name(),
        record: storage.record_name(),
    }
}

/// The seal record of an image, for `inspect`: parsed and checked, not authenticated
/// (showing it touches nothing).
pub fn inspect(storage: &dyn Storage) -> Result<SealRecord> {
    decode(storage)?
        .map(|(_, rec)| rec)
        .ok_or_else(|| not_sealed(storage))
}

pub(super) fn in_progress(storage: &dyn Storage, phase: Phase) -> JobError {
    let image = storage.image_name();
    match phase {
        Phase::Shredded => return JobError::Shredded { image },
        Phase::Shredding => return JobError::ShredInterrupted { image },
        Phase::Migrating => return JobError::Reclaiming { image },
        _ => {}
    }
    JobError::InProgress {
        image,
        phase: phase.name(),
        command: Direction::of(phase).command(),
    }
}
