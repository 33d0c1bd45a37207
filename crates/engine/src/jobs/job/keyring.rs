//! What a record's profile and key give a job: the seed, the placement key, the sector
//! cipher, the digest key, the key slot and the dense data map.

use super::*;

/// What a record's profile and key give a job: the [040] seed, the key the placement is
/// built from and, in the secure profile, the sector cipher and the digest key.
pub(super) struct Keys {
    pub(super) data_seed: Zeroizing<Vec<u8>>,
    pub(super) placement_key: Zeroizing<Vec<u8>>,
    pub(super) cipher: Option<XtsAes256>,
    pub(super) digest_key: Option<Zeroizing<[u8; 32]>>,
    /// Opens a dense seal's data map.
    pub(super) dense_map_key: Option<Zeroizing<[u8; 32]>>,
}

impl Keys {
    /// The keys of a record, reading the wrapped key from its key slot (version 3) or from
    /// the record itself (versions 1 and 2).
    pub(super) fn resolve(
        storage: &dyn Storage,
        rec: &SealRecord,
        master: Option<&MasterKey>,
    ) -> Result<Self> {
        if rec.profile != Profile::Secure || rec.phase.is_shred() || master.is_none() {
            return Self::from_wrapped(storage, rec, master, None);
        }
        let wrapped = match &rec.key_slot {
            Some(want) => Some(read_slot(storage, rec, want)?),
            None => None,
        };
        Self::from_wrapped(storage, rec, master, wrapped.as_ref())
    }

    /// The keys of a record; `slot` is the wrapped key of its key slot, if it has one.
    pub(super) fn from_wrapped(
        storage: &dyn Storage,
        rec: &SealRecord,
        master: Option<&MasterKey>,
        slot: Option<&WrappedKey>,
    ) -> Result<Self> {
        let image = storage.image_name();
        let record_err = |e: &str| JobScope(storage).inconsistent(e);
        match rec.profile {
            Profile::Patent => {
                let seed = rec.seed.as_deref().ok_or_else(|| record_err("no seed"))?;
                let seed =
                    Zeroizing::new(hex::decode(seed).map_err(|_| record_err("seed is not hex"))?);
                Ok(Self {
                    placement_key: seed.clone(),
                    data_seed: seed,
                    cipher: None,
                    digest_key: None,
                    dense_map_key: None,
                })
            }
            Profile::Secure => {
                if rec.phase.is_shred() {
                    return Err(in_progress(storage, rec.phase));
                }
                let master = master.ok_or_else(|| JobError::KeyMissing {
                    image: image.clone(),
                })?;
                let wrapped = slot
                    .or(rec.wrapped_key.as_ref())
                    .ok_or_else(|| record_err("no wrapped key"))?;
                if master.id() != wrapped.master_key_id {
                    return Err(JobError::WrongKey {
                        image,
                        have: master.id(),
                        want: wrapped.master_key_id.clone(),
                    });
                }
                let (data_key, seed) = keys::unwrap(master, wrapped, &keys::wrap_aad(rec))
                    .map_err(|source| JobError::Key {
                        image,
                        record: storage.record_name(),
                        source,
                    })?;
                let sk = data_key.derive(&rec.seal_id);
                let pk = Zeroizing::new(sk.placement_seed(&seed, &rec.seal_id, rec.image_bytes));
                Ok(Self {
                    data_seed: seed,
                    placement_key: Zeroizing::new(pk.to_vec()),
                    cipher: Some(XtsAes256::new(&sk.xts)),
                    digest_key: Some(Zeroizing::new(sk.digest)),
                    dense_map_key: Some(Zeroizing::new(sk.dense_map)),
                })
            }
        }
    }
}

/// What a record names beyond its geometry, each checked: the digest scheme, the dense
/// map, and the placement built from its key over `geometry`'s sectors.
pub(super) struct Named {
    pub digest: DigestScheme,
    pub dense: Option<Dense>,
    pub placement: Box<dyn Placement>,
}

pub(super) fn named_by_record(
    storage: &dyn Storage,
    rec: &SealRecord,
    keys: &Keys,
    geometry: &Geometry,
) -> Result<Named> {
    let (digest, dense) = named_but_placement(storage, rec, keys)?;
    let placement = build_placement(storage, rec, keys, geometry)?;
    Ok(Named {
        digest,
        dense,
        placement,
    })
}

/// [`named_by_record`] but the placement: the digest scheme and the dense map.
pub(super) fn named_but_placement(
    storage: &dyn Storage,
    rec: &SealRecord,
    keys: &Keys,
) -> Result<(DigestScheme, Option<Dense>)> {
    let scope = JobScope(storage);
    let digest = rec
        .digest_scheme()
        .ok_or_else(|| scope.inconsistent(format!("unknown digest scheme {:?}", rec.digest)))?;
    let dense = open_dense(storage, rec, keys)?;
    Ok((digest, dense))
}

/// The placement the record names, built from its key over `geometry`'s sectors (the
/// patent placement replays its draws: about `N ln N`).
pub(super) fn build_placement(
    storage: &dyn Storage,
    rec: &SealRecord,
    keys: &Keys,
    geometry: &Geometry,
) -> Result<Box<dyn Placement>> {
    let scope = JobScope(storage);
    let kind = rec
        .placement_kind()
        .ok_or_else(|| scope.inconsistent(format!("unknown placement {:?}", rec.placement)))?;
    placement::build(
        kind,
        &keys.placement_key,
        geometry.sectors(),
        geometry.thin_sectors(),
    )
    .map_err(|source| JobError::Placement {
        image: scope.image(),
        source,
    })
}

/// The data map of a dense seal, decrypted and checked against the record.
pub(super) fn open_dense(
    storage: &dyn Storage,
    rec: &SealRecord,
    keys: &Keys,
) -> Result<Option<Dense>> {
    let Some(d) = &rec.dense else {
        return Ok(None);
    };
    let record_err = |e: String| JobScope(storage).inconsistent(e);
    let key = keys
        .dense_map_key
        .as_deref()
        .ok_or_else(|| record_err("dense placement without a key".into()))?;
    let aad =
        pdguard_core::dense::map_aad(&rec.seal_id, rec.image_bytes, rec.sector_size, d.sectors);
    let sector = u64::from(rec.sector_size);
    let ranges = pdguard_core::dense::DataRanges::open(
        &d.map,
        key,
        &aad,
        rec.image_bytes,
        sector,
        d.sectors,
    )
    .map_err(|e| record_err(e.to_string()))?;
    Ok(Some(Dense::new(ranges, sector)))
}

/// The wrapped key in the key slot, checked against the record that names it.
pub(super) fn read_slot(
    storage: &dyn Storage,
    rec: &SealRecord,
    want: &KeySlotRef,
) -> Result<WrappedKey> {
    let bad = |why: String| JobError::KeySlot {
        image: storage.image_name(),
        slot: storage.key_slot_name(),
        why,
    };
    let bytes = storage
        .read_key_slot()
        .map_err(|source| JobScope(storage).store(source))?
        .ok_or_else(|| {
            bad("it is missing (without it the sealed data cannot be decrypted)".into())
        })?;
    if bytes.len() as u64 != want.bytes || blake3::hash(&bytes).to_hex().as_str() != want.checksum {
        return Err(bad(
            "it is not the slot the seal record names (size or checksum differ)".into(),
        ));
    }
    let slot = keyslot::decode(&bytes).map_err(|e| bad(e.to_string()))?;
    if slot.seal_id != rec.seal_id || slot.wrapped.master_key_id != want.master_key_id {
        return Err(bad("it belongs to another seal".into()));
    }
    Ok(slot.wrapped)
}

/// The [040] seed: XOR of every word of the first `min(10, N)` sectors.
pub(super) fn read_seed(image: &dyn Disk, g: Geometry) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let mut first = Zeroizing::new(vec![
        0u8;
        seed::seed_span(g.sector_size(), g.sectors()) as usize
    ]);
    image.read_at(&mut first, 0)?;
    Ok(seed::derive(&first, g.word_length()))
}
