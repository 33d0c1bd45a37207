//! Checking an image against its record: `verify`, the digests and sampled fingerprints,
//! and the checks a job makes before it ends "unsealed" or "rolled back".

use super::*;

/// The result of a successful verify.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub record: SealRecord,
    pub digest: String,
}

/// Check a sealed image against its record's digest without unsealing it ([015]).
///
/// With a master key, also check that it opens the seal's wrapped key (secure profile).
/// Holds a shared lock: verifies may run together, but not beside a job that is changing
/// the image (it would report a digest of bytes in motion).
pub fn verify(
    storage: &dyn Storage,
    key: Option<&MasterKey>,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let _lock = lock_image(storage, LockMode::Shared)?;
    // The sampled sectors below say whether the record belongs to the image.
    let (_, rec) = load_with(storage, key, Use::Read, false)?.ok_or_else(|| not_sealed(storage))?;
    if rec.phase != Phase::Sealed {
        return Err(in_progress(storage, rec.phase));
    }
    // The region digest tree is of the plaintext, keyed in the secure profile: it is
    // checked when the key is given, and always in the patent profile.
    let by_regions = rec.region_tree.is_some() && (rec.profile == Profile::Patent || key.is_some());
    let keys = match (rec.profile == Profile::Secure && key.is_some()) || by_regions {
        true => Some(Keys::resolve(storage, &rec, key)?),
        false => None,
    };
    let store_err = |source| JobScope(storage).store(source);
    let image = storage.open_image(false).map_err(store_err)?;
    check_size(storage, &rec, &*image)?;
    // Like unseal: a record of another image is named as such, not as tampering.
    check_sealed_fingerprint(storage, &rec, &*image)?;
    let (image, rec) = match (by_regions, keys) {
        (true, Some(keys)) => check_regions(storage, rec, key, keys, image, progress)?,
        _ => (image, rec),
    };
    progress.pass("verify", rec.image_bytes);
    let scheme = rec.digest_scheme().ok_or_else(|| {
        JobScope(storage).inconsistent(format!("unknown digest scheme {:?}", rec.digest))
    })?;
    let digest = match &rec.dense {
        None => hash_image(&*image, scheme, None, progress),
        Some(d) => {
            let region = d.sectors * u64::from(rec.sector_size);
            let tail_ok = dense::tail_is_zero(&*image, region).map_err(store_err)?;
            if !tail_ok {
                return Err(JobScope(storage).verification(format!("it holds data past its dense region (byte {region} on), where a dense seal leaves only holes: the sealed image was tampered with")));
            }
            hash_image(&ExtentView::prefix(&*image, region), scheme, None, progress)
        }
    }
    .map_err(store_err)?;
    let expected = rec.sealed_digest.clone().unwrap_or_default();
    if digest != expected {
        return Err(JobScope(storage).verification(format!("its BLAKE3 digest is {digest} but the seal record says {expected}: the sealed image was corrupted or tampered with")));
    }
    Ok(VerifyReport {
        record: rec,
        digest,
    })
}

/// Every region of the sealed image's plaintext against the seal's region digest tree,
/// naming the first that does not match; gives the image and record back.
fn check_regions<'a>(
    storage: &'a dyn Storage,
    rec: SealRecord,
    key: Option<&MasterKey>,
    keys: Keys,
    image: Box<dyn Disk>,
    progress: &'a dyn Progress,
) -> Result<(Box<dyn Disk>, SealRecord)> {
    let mut job = Job::with_image(Parts {
        storage,
        progress,
        mac_key: mac_key_for(&rec, key),
        rec,
        direction: Direction::Unseal,
        image,
        keys,
        memory_bytes: strategy::DEFAULT_MEMORY_BYTES,
    })?;
    job.load_tree()?;
    job.check_sealed_regions()?;
    Ok((job.image, job.rec))
}

/// The digest of `image` (keyed by `key`: the plaintext digest of the secure profile),
/// reading only its data ranges.
pub(super) fn hash_image(
    image: &dyn Disk,
    scheme: DigestScheme,
    key: Option<&[u8; 32]>,
    progress: &dyn Progress,
) -> Result<String, StoreError> {
    let mut hasher = ImageHasher::new(scheme, key);
    let mut buf = vec![0u8; 1 << 20];
    let map = image.data_map()?;
    for (r, data) in map.pieces(0, map.len()) {
        if !data {
            hasher.update_zeros(r.end - r.start);
            progress.advance(r.end - r.start);
            continue;
        }
        let mut off = r.start;
        while off < r.end {
            let n = (r.end - off).min(buf.len() as u64) as usize;
            image.read_at(&mut buf[..n], off)?;
            hasher.update(&buf[..n]);
            progress.advance(n as u64);
            off += n as u64;
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// BLAKE3 of the sampled sectors of `image` ([`fingerprint_sectors`]), each with its index.
pub(super) fn sampled_fingerprint(image: &dyn Disk, g: Geometry) -> Result<String, StoreError> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; g.sector_size() as usize];
    for j in fingerprint_sectors(g.sectors()) {
        image.read_at(&mut buf, g.offset(j))?;
        h.update(&j.to_le_bytes());
        h.update(&buf);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The sealed image's sampled sectors are the ones the record saw at the end of the seal;
/// otherwise the record is of another image (or those sectors were rewritten).
pub(super) fn check_sealed_fingerprint(
    storage: &dyn Storage,
    rec: &SealRecord,
    image: &dyn Disk,
) -> Result<()> {
    let Some(want) = &rec.sealed_fingerprint else {
        return Ok(());
    };
    let g = rec
        .geometry()
        .map_err(|e| JobScope(storage).inconsistent(e.to_string()))?;
    let fp = sampled_fingerprint(image, g).map_err(|source| JobScope(storage).store(source))?;
    if *want != fp {
        return Err(JobScope(storage).mismatch(
            "sampled sectors of the image differ from the sealed image the record describes",
        ));
    }
    Ok(())
}

pub(super) fn check_size(storage: &dyn Storage, rec: &SealRecord, image: &dyn Disk) -> Result<()> {
    if image.len() != rec.image_bytes {
        return Err(JobScope(storage).mismatch(format!(
            "the image is {} bytes, the record is for {} bytes",
            image.len(),
            rec.image_bytes
        )));
    }
    Ok(())
}

impl Job<'_> {
    /// A seal interrupted in scatter is resumed only on the image it started on.
    pub(super) fn check_seed(&self) -> Result<()> {
        let seed = read_seed(&*self.image, self.image_geometry).map_err(|e| self.interrupted(e))?;
        if *seed != *self.keys.data_seed {
            return Err(self.scope().mismatch(
                "the image's first sectors do not give the seed the record was made from",
            ));
        }
        Ok(())
    }

    pub(super) fn fingerprint(&self) -> Result<String, StoreError> {
        sampled_fingerprint(&*self.image, self.geometry)
    }

    pub(super) fn check_fingerprint(&self) -> Result<()> {
        let fp = self
            .fingerprint()
            .map_err(|source| self.scope().store(source))?;
        match &self.rec.sealed_fingerprint {
            Some(want) if *want != fp => Err(self.scope().mismatch(
                "sampled sectors of the image differ from the sealed image the record describes",
            )),
            _ => Ok(()),
        }
    }

    /// The plaintext view of the image: the compacted one with dense placement.
    pub(super) fn plain_digest_now(&self) -> Result<String> {
        let view = self.dense.as_ref().map(|d| d.compacted(&*self.image));
        let plain = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
        self.progress.pass("verify", self.geometry.disk_bytes());
        let key = self.keys.digest_key.as_deref();
        hash_image(plain, self.digest, key, self.progress)
            .map_err(|source| self.scope().store(source))
    }

    pub(super) fn not_plaintext(&self, why: String) -> JobError {
        self.scope().verification(format!("its seal record says phase {}, {why}; the record was edited or the image changed, so nothing was touched", self.rec.phase.name()))
    }

    /// The image is the plaintext whose digest the record names (phase `unsealed`): the
    /// record and key slot are dropped only over it.
    pub(super) fn check_plain(&self) -> Result<()> {
        let want = self.rec.plain_digest.as_deref().unwrap_or("nothing");
        let have = self.plain_digest_now()?;
        if have != want {
            return Err(self.not_plaintext(format!(
                "which means the image is plaintext with the BLAKE3 digest {want}, but its digest is {have}"
            )));
        }
        Ok(())
    }

    /// A seal found in scatter never wrote the image: it is the plaintext the seed was
    /// taken from (and the one the plaintext digest names, if the record has one), not the
    /// sealed image the record's fingerprint names.
    pub(super) fn check_plaintext(&self) -> Result<()> {
        if let Some(want) = &self.rec.sealed_fingerprint {
            let fp = self.fingerprint().map_err(|e| self.interrupted(e))?;
            if *want == fp {
                return Err(self.not_plaintext(
                    "but the image is the sealed image the record's fingerprint names".into(),
                ));
            }
        }
        if self.rec.plain_digest.is_some() {
            self.check_plain()?;
        }
        let seed = read_seed(&*self.image, self.image_geometry).map_err(|e| self.interrupted(e))?;
        if *seed != *self.keys.data_seed {
            return Err(self.not_plaintext(
                "but the image's first sectors do not give the seed the seal was made from".into(),
            ));
        }
        Ok(())
    }

    /// An unseal found in scatter never wrote the image: it is still the sealed image the
    /// record's fingerprint names.
    pub(super) fn check_still_sealed(&self) -> Result<()> {
        let Some(want) = &self.rec.sealed_fingerprint else {
            return Ok(());
        };
        let fp = self.fingerprint().map_err(|e| self.interrupted(e))?;
        if *want != fp {
            return Err(self.not_plaintext(
                "so the image is sealed, but its sampled sectors differ from the sealed image the record describes".into(),
            ));
        }
        Ok(())
    }
}
