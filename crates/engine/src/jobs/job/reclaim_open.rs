//! What an instant reclaim (`jobs/reclaim/`) takes from a seal: the record, authenticated
//! and checked against the image as an unseal checks it, and what its keys give. The
//! migration itself is in `jobs/reclaim/`; this room only opens the seal for it.

use super::*;

/// A sealed (or migrating) image opened for a migration, its lock held.
pub(crate) struct SealOpened {
    /// Held for the migration's life.
    pub(crate) _lock: ImageLock,
    pub(crate) rec: SealRecord,
    pub(crate) image: Box<dyn Disk>,
    pub(crate) cipher: Option<XtsAes256>,
    /// Keys the plaintext digest and the region digest tree (secure profile).
    pub(crate) digest_key: Option<Zeroizing<[u8; 32]>>,
    pub(crate) digest: DigestScheme,
    pub(crate) dense: Option<Dense>,
    /// Keys the record's MAC and the moved map's checksum (secure profile).
    pub(crate) mac_key: Option<Zeroizing<[u8; 32]>>,
}

/// Lock `storage`'s image, load its record (phase `sealed` or `migrating`), resolve the
/// keys and check the image as an unseal does (size; the sealed fingerprint when `sealed`).
/// Also gives the seal's placement (of the compacted image's `D` sectors with dense
/// placement), read from its placement table when the record names one (`place.rs`).
pub(crate) fn open_for_reclaim(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
) -> Result<(SealOpened, ReclaimPlacement)> {
    let lock = lock_image(storage, LockMode::Exclusive)?;
    let rec = load(storage, key, Use::Act)?.ok_or_else(|| not_sealed(storage))?;
    if !matches!(rec.phase, Phase::Sealed | Phase::Migrating) {
        return Err(in_progress(storage, rec.phase));
    }
    let scope = JobScope(storage);
    let keys = Keys::resolve(storage, &rec, key)?;
    let image = storage.open_image(true).map_err(|e| scope.store(e))?;
    check_size(storage, &rec, &*image)?;
    if rec.phase == Phase::Sealed {
        check_sealed_fingerprint(storage, &rec, &*image)?;
    }
    let geometry = rec
        .geometry()
        .map_err(|e| scope.inconsistent(e.to_string()))?;
    let (digest, dense) = named_but_placement(storage, &rec, &keys)?;
    let placement = placement_for_reclaim(storage, &rec, &keys, &geometry)?;
    let opened = SealOpened {
        _lock: lock,
        mac_key: mac_key_for(&rec, key),
        rec,
        image,
        cipher: keys.cipher,
        digest_key: keys.digest_key,
        digest,
        dense,
    };
    Ok((opened, placement))
}

/// The plaintext digest of `image` as the record's `plain_digest` is made (over the
/// compacted image with dense placement).
pub(crate) fn plain_digest(
    image: &dyn Disk,
    dense: Option<&Dense>,
    digest: DigestScheme,
    key: Option<&[u8; 32]>,
) -> Result<String, StoreError> {
    let view = dense.map(|d| d.compacted(image));
    let plain = view.as_ref().map_or(image, |v| v as &dyn Disk);
    hash_image(plain, digest, key, &super::super::NoProgress)
}

/// After phase `unsealed`: drop the record, then the key slot, as an unseal does.
pub(crate) fn drop_unsealed(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    finish_unsealed(storage, rec)
}
