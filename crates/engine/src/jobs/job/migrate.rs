//! `pdguard image migrate`: bring a seal record of an older version to the current one.
//!
//! A secure record of version 1 or 2 holds its wrapped key and has no MAC; pdguard acts on
//! it only once migrated (`authentic` in `job.rs`), so that nothing an attacker can
//! rewrite without a key (an old version number, a wrapped key copied from a key slot)
//! decides whether a key is destroyed or wrapped again. Migrating needs the master key: the
//! old wrapped key must open under the old record's associated data (which binds its
//! version, seal id and geometry), so a newer record rewritten as an old version is refused
//! here. The data key is then wrapped for the current version into a new key slot, written
//! before the record that names it, and the record is written with its MAC. A crash in
//! between leaves the old record beside a slot bound to the record it would become: the
//! next migration recognises it by opening it, and finishes.
//!
//! The old record file held the wrapped key; it is replaced like any record (written new,
//! renamed over), so its blocks may stay in the file system's free space until reused, as
//! `docs/seal-record.md` says.

use super::*;

/// What a migration did.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    /// The version the record was found in.
    pub from: u32,
    /// The record as it is now.
    pub record: SealRecord,
}

impl MigrateReport {
    /// True when the record was rewritten.
    pub fn migrated(&self) -> bool {
        self.from != self.record.version
    }
}

/// Migrate the record of `storage` to the current version (nothing to do for a record of
/// version 3 on, which is authenticated when the key is given).
pub fn migrate(storage: &dyn Storage, key: Option<&MasterKey>) -> Result<MigrateReport> {
    let _lock = lock_image(storage, LockMode::Exclusive)?;
    let (bytes, rec) = decode(storage)?.ok_or_else(|| not_sealed(storage))?;
    let from = rec.version;
    if from >= KEY_SLOT_VERSION || rec.phase.is_shred() {
        let (_, record) = authentic(storage, bytes, rec, key, Use::Read)?;
        return Ok(MigrateReport { from, record });
    }
    let (_, record) = match rec.profile {
        Profile::Secure => {
            let master = key.ok_or_else(|| JobError::KeyMissing {
                image: storage.image_name(),
            })?;
            upgrade(storage, rec, master)?
        }
        // No key and no MAC in the patent profile: only the version number changes.
        Profile::Patent => {
            refuse_beside_slot(storage, &rec)?;
            let mut new = rec;
            new.version = RECORD_VERSION;
            new.updated_unix = now();
            let bytes = new.encode();
            write(storage, &bytes)?;
            (bytes, new)
        }
    };
    tracing::info!(image = %storage.image_name(), from, "migrated the seal record");
    Ok(MigrateReport { from, record })
}

/// Migrate a secure record of version 1 or 2 (checked by the caller) under `master`;
/// returns the new record and its bytes.
pub(super) fn upgrade(
    storage: &dyn Storage,
    rec: SealRecord,
    master: &MasterKey,
) -> Result<(Vec<u8>, SealRecord)> {
    let image = storage.image_name();
    let unauthentic = |why: &'static str| {
        JobScope(storage).record(pdguard_core::RecordError::Unauthenticated(why))
    };
    let old = rec
        .wrapped_key
        .clone()
        .ok_or_else(|| unauthentic("it is an old secure record without a wrapped key"))?;
    if master.id() != old.master_key_id {
        return Err(JobError::WrongKey {
            image,
            have: master.id(),
            want: old.master_key_id,
        });
    }
    let (data_key, seed) = keys::unwrap(master, &old, &keys::wrap_aad(&rec)).map_err(|_| {
        unauthentic("it says version 1 or 2, but its wrapped key is not bound to such a record (a newer record rewritten as an old version?)")
    })?;
    let from = rec.version;
    let mut new = rec;
    new.version = RECORD_VERSION;
    new.wrapped_key = None;
    let aad = keys::wrap_aad(&new);
    let store_err = |source| JobScope(storage).store(source);
    let slot = match storage.read_key_slot().map_err(store_err)? {
        // An interrupted migration: its slot opens under the record it was made for.
        Some(bytes) => {
            let ours = keyslot::decode(&bytes).ok().filter(|s| {
                s.seal_id == new.seal_id
                    && keys::unwrap(master, &s.wrapped, &aad)
                        .is_ok_and(|(_, other)| *other == *seed)
            });
            if ours.is_none() {
                return Err(JobError::Downgraded {
                    record: storage.record_name(),
                    slot: storage.key_slot_name(),
                    why: format!("it says secure profile, record version {from}, which has no MAC"),
                });
            }
            bytes
        }
        None => {
            let wrapped = keys::wrap(master, &data_key, &seed, rand::random(), &aad);
            let bytes = keyslot::encode(&new.seal_id, &wrapped).map_err(|e| {
                JobError::Unsupported(format!("the key slot of {image} cannot be made: {e}"))
            })?;
            storage.create_key_slot(&bytes).map_err(store_err)?;
            bytes
        }
    };
    new.key_slot = Some(KeySlotRef {
        algorithm: keys::WRAP_ALGORITHM.into(),
        master_key_id: master.id(),
        bytes: slot.len() as u64,
        checksum: blake3::hash(&slot).to_hex().to_string(),
    });
    new.updated_unix = now();
    let bytes = new.encode_with_mac(Some(&keys::record_mac_key(master, &new.seal_id)));
    write(storage, &bytes)?;
    Ok((bytes, new))
}

fn write(storage: &dyn Storage, bytes: &[u8]) -> Result<()> {
    storage
        .write_record(bytes)
        .map_err(|source| JobScope(storage).store(source))
}
