//! A new seal: option checks, the new record and the key slot, then the passes.

use super::*;

pub(super) fn fresh_seal(
    storage: &dyn Storage,
    opts: &SealOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
    let strategy = check_options(storage, opts)?;
    let scope = JobScope(storage);
    let image = storage.open_image(true).map_err(|e| scope.store(e))?;
    let (mut rec, seed, dense) = new_record(storage, opts, &*image, strategy)?;
    let slot = match (opts.profile, &opts.master_key) {
        (Profile::Secure, Some(master)) => Some(key_slot(storage, &mut rec, master, &seed, dense)?),
        _ => None,
    };
    let key = opts.master_key.as_ref();
    let keys = Keys::from_wrapped(storage, &rec, key, slot.as_ref().map(|s| &s.1))?;
    let mut job = Job::with_image(Parts {
        storage,
        progress,
        mac_key: mac_key_for(&rec, key),
        rec,
        direction: Direction::Seal,
        image,
        keys,
        memory_bytes: opts.memory_bytes,
    })?;
    // Everything that can be checked is checked before the first write. The key slot is
    // written before the record that names it: a crash in between leaves a slot without a
    // record, which the next seal destroys.
    job.check_space()?;
    if let Some((bytes, _)) = &slot {
        storage.create_key_slot(bytes).map_err(|e| scope.store(e))?;
    }
    job.rec.updated_unix = now();
    let bytes = job.record_bytes();
    storage.write_record(&bytes).map_err(|e| scope.store(e))?;
    job.seal_scatter()?;
    job.seal_gather()?;
    Ok(job.report(Outcome::Sealed, None))
}

/// The options of a new seal, checked before the image is opened; gives the strategy.
fn check_options(storage: &dyn Storage, opts: &SealOptions) -> Result<Box<dyn Strategy>> {
    if opts.profile == Profile::Secure && opts.master_key.is_none() {
        return Err(JobError::KeyMissing {
            image: storage.image_name(),
        });
    }
    if opts.keep_holes && opts.profile != Profile::Secure {
        return Err(JobError::Unsupported(
            "--keep-holes applies to the secure profile only (the patent profile never encrypts, so its holes stay holes anyway); drop it or use --profile secure".into(),
        ));
    }
    let Some(strategy) = strategy::by_name(&opts.strategy) else {
        return Err(JobError::Unsupported(format!(
            "unknown strategy {:?}; choose one of: {}",
            opts.strategy,
            strategy::STRATEGIES.join(", ")
        )));
    };
    // A key slot without a record is a secure seal's that crashed before its record was
    // written (destroyed by the next secure seal), or one whose record was lost (restore
    // it): a patent seal never leaves it beside its own record, which has no MAC.
    let slot_exists = || -> Result<bool> {
        let slot = storage.read_key_slot();
        Ok(slot.map_err(|e| JobScope(storage).store(e))?.is_some())
    };
    if opts.profile == Profile::Patent && slot_exists()? {
        return Err(JobError::Unsupported(format!(
            "{} has a key slot {} but no seal record: it belongs to a secure seal whose record is missing. Restore that record from a backup; if that seal never started (a crash at its start), delete the slot, then seal again",
            storage.image_name(),
            storage.key_slot_name()
        )));
    }
    Ok(strategy)
}

/// The record of a new seal in phase `seal-scatter` (no key slot yet), the [040] seed of
/// the image, and with dense placement its data map.
fn new_record(
    storage: &dyn Storage,
    opts: &SealOptions,
    image: &dyn Disk,
    strategy: Box<dyn Strategy>,
) -> Result<(SealRecord, Zeroizing<Vec<u8>>, Option<Dense>)> {
    let scope = JobScope(storage);
    let geometry_of = |bytes| {
        Geometry::new(
            bytes,
            opts.sector_size,
            opts.word_length,
            opts.thin_slack_pct,
        )
        .map_err(|source| JobError::Geometry {
            image: scope.image(),
            source,
        })
    };
    let geometry = geometry_of(image.len())?;
    let seed = read_seed(image, geometry).map_err(|e| scope.store(e))?;
    let sector = u64::from(geometry.sector_size());
    let dense = match opts.keep_holes && opts.dense && opts.profile == Profile::Secure {
        true => dense::plan(image, sector).map_err(|e| scope.store(e))?,
        false => None,
    };
    // Dense placement seals a compacted image of D sectors: the thin disk has its slots.
    let placed = match &dense {
        Some(d) => geometry_of(d.sectors * sector)?,
        None => geometry,
    };
    let seal_id = hex::encode(rand::random::<[u8; 16]>());
    let t = now();
    let default_placement = match opts.profile {
        Profile::Patent => PlacementKind::Patent,
        Profile::Secure => PlacementKind::Feistel,
    };
    let thin_path = storage.thin_name(&seal_id).map_err(|e| scope.store(e))?;
    let rec = SealRecord {
        version: RECORD_VERSION,
        thin_path: Some(thin_path),
        seal_id,
        profile: opts.profile,
        placement: opts.placement.unwrap_or(default_placement).name().into(),
        strategy: strategy.name().into(),
        image_bytes: geometry.disk_bytes(),
        sector_size: geometry.sector_size(),
        word_length: geometry.word_length(),
        sectors: geometry.sectors(),
        thin_sectors: placed.thin_sectors(),
        seed: (opts.profile == Profile::Patent).then(|| hex::encode(&seed)),
        wrapped_key: None,
        key_slot: None,
        phase: Phase::SealScatter,
        plain_digest: None,
        sealed_digest: None,
        sealed_fingerprint: None,
        digest: DigestScheme::DEFAULT.name().into(),
        keep_holes: opts.keep_holes,
        dense: None,
        region_tree: None,
        placement_table: None,
        created_unix: t,
        updated_unix: t,
        writer: concat!("pdguard ", env!("CARGO_PKG_VERSION")).into(),
    };
    Ok((rec, seed, dense))
}

/// Secure profile: a new data key, the dense map sealed under it into the record, and the
/// key slot's bytes (wrapped under `master`, bound to the record), named by the record.
fn key_slot(
    storage: &dyn Storage,
    rec: &mut SealRecord,
    master: &MasterKey,
    seed: &[u8],
    dense: Option<Dense>,
) -> Result<(Vec<u8>, WrappedKey)> {
    let data_key = DataKey::from_bytes(rand::random());
    if let Some(d) = &dense {
        let aad =
            pdguard_core::dense::map_aad(&rec.seal_id, rec.image_bytes, rec.sector_size, d.sectors);
        let sk = data_key.derive(&rec.seal_id);
        rec.dense = Some(DenseRef {
            sectors: d.sectors,
            map: d.ranges.seal(&sk.dense_map, &aad),
        });
    }
    let aad = keys::wrap_aad(rec);
    let wrapped = keys::wrap(master, &data_key, seed, rand::random(), &aad);
    let bytes = keyslot::encode(&rec.seal_id, &wrapped).map_err(|e| {
        JobError::Unsupported(format!(
            "the key slot of {} cannot be made: {e}",
            storage.image_name()
        ))
    })?;
    rec.key_slot = Some(KeySlotRef {
        algorithm: wrapped.algorithm.clone(),
        master_key_id: wrapped.master_key_id.clone(),
        bytes: bytes.len() as u64,
        checksum: blake3::hash(&bytes).to_hex().to_string(),
    });
    Ok((bytes, wrapped))
}
