//! `image shred`: crypto-erase a sealed image by destroying its key slot.

use super::*;

/// Crypto-erase a sealed image (NIST SP 800-88 "Purge" by cryptographic erase). The
/// wrapped key lives in one place, the key slot; in order: the record is marked
/// `shredding` (it holds no key), the slot is overwritten in place with random bytes,
/// fsynced and deleted, and the record becomes a `shredded` tombstone. A shred interrupted
/// anywhere is finished by running it again. Afterwards the sealed data cannot be
/// decrypted even with the master key.
///
/// With the master key, the record is authenticated first; without it the shred still
/// runs (destroying needs no key, and every path it touches is derived, none read from
/// the record).
pub fn shred(storage: &dyn Storage, key: Option<&MasterKey>) -> Result<SealRecord> {
    shred_report(storage, key).map(|r| r.record)
}

/// What a shred did to the key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotFate {
    /// The key slot was there and was overwritten in place with random bytes, then deleted.
    Overwritten,
    /// There was no key slot to overwrite (an interrupted shred had destroyed it, or it was
    /// removed by someone else): nothing was destroyed now.
    Absent,
}

/// The result of a shred.
#[derive(Debug, Clone)]
pub struct ShredReport {
    /// The tombstone record.
    pub record: SealRecord,
    pub slot: SlotFate,
}

/// [`shred`], saying what became of the key slot.
pub fn shred_report(storage: &dyn Storage, key: Option<&MasterKey>) -> Result<ShredReport> {
    let _lock = lock_image(storage, LockMode::Exclusive)?;
    let rec = load(storage, key, Use::Act)?.ok_or_else(|| not_sealed(storage))?;
    if rec.profile != Profile::Secure {
        return Err(JobError::Unsupported(format!(
            "{} was sealed with the patent profile, which has no key to destroy; crypto-erase needs the secure profile (overwrite or delete the image instead)",
            storage.image_name()
        )));
    }
    let store_err = |source| JobScope(storage).store(source);
    let mac_key = key.map(|k| keys::record_mac_key(k, &rec.seal_id));
    let mut rec = match rec.phase {
        // `authentic` migrated a record of version 1 or 2, or refused it: the wrapped key
        // is in the key slot, and nowhere else.
        Phase::Sealed => {
            let mut marked = rec;
            marked.version = RECORD_VERSION;
            marked.wrapped_key = None;
            marked.plain_digest = None;
            marked.region_tree = None;
            marked.placement_table = None;
            marked.phase = Phase::Shredding;
            marked.updated_unix = now();
            let bytes = marked.encode_with_mac(mac_key.as_deref());
            storage.write_record(&bytes).map_err(store_err)?;
            marked
        }
        Phase::Shredding => rec,
        // Part of the image is plaintext already: a shred would erase only the rest.
        Phase::Migrating => {
            return Err(JobError::ShredReclaiming {
                image: storage.image_name(),
            })
        }
        other => return Err(in_progress(storage, other)),
    };
    let slot = match storage.read_key_slot().map_err(store_err)? {
        Some(_) => SlotFate::Overwritten,
        None => SlotFate::Absent,
    };
    storage.destroy_key_slot().map_err(store_err)?;
    storage.remove_tree().map_err(store_err)?;
    storage.remove_place().map_err(store_err)?;
    rec.key_slot = None;
    rec.phase = Phase::Shredded;
    rec.updated_unix = now();
    let bytes = rec.encode_with_mac(mac_key.as_deref());
    storage.write_record(&bytes).map_err(store_err)?;
    Ok(ShredReport { record: rec, slot })
}
