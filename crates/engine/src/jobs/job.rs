//! The seal and unseal state machine over [`Storage`]. See the phase table on
//! [`pdguard_core::Phase`] for what each phase means after a crash.

use std::time::{SystemTime, UNIX_EPOCH};

use pdguard_core::cipher::XtsAes256;
use pdguard_core::digest::{DigestScheme, ImageHasher};
use pdguard_core::keys::{self, DataKey, MasterKey};
use pdguard_core::keyslot;
use pdguard_core::record::{
    self, DenseRef, KeySlotRef, WrappedKey, KEY_SLOT_VERSION, RECORD_VERSION,
};
use pdguard_core::{
    fingerprint_sectors, placement, seed, Geometry, Phase, Placement, PlacementKind, Profile,
    SealRecord,
};
use zeroize::Zeroizing;

use super::dense::{self, Dense};
use super::error::{JobError, Result};
use super::strategy::{self, PassCtx, Strategy};
use super::Progress;
use crate::store::{Disk, ExtentView, ImageLock, LockMode, Sparse, Storage, StoreError};

mod migrate;
mod rescue;
pub use migrate::{migrate, MigrateReport};
pub use rescue::{rescue, RescueReport};

/// How to seal an image that is not sealed yet.
#[derive(Debug, Clone)]
pub struct SealOptions {
    pub profile: Profile,
    pub sector_size: u32,
    pub word_length: u32,
    pub thin_slack_pct: u32,
    /// `None`: the profile's default (`patent` in the patent profile).
    pub placement: Option<PlacementKind>,
    pub strategy: String,
    /// The master key: required by the secure profile, unused by the patent profile.
    pub master_key: Option<MasterKey>,
    /// Memory the passes may use for buffers (`--memory`); never changes the bytes and is
    /// not recorded.
    pub memory_bytes: u64,
    /// Secure profile only (`--keep-holes`): sectors of zeros are not encrypted, so a sparse
    /// disk stays sparse and seals in proportion to its data, at the price of revealing how
    /// many of its sectors are zeros. The patent profile always keeps zeros as zeros.
    /// A new seal with `keep_holes` uses dense placement (record version 4): only the
    /// sectors of the image's data ranges are placed, among the first `D` sectors.
    pub keep_holes: bool,
    /// With `keep_holes`: dense placement (the default). `false` seals with the scattered
    /// placement of record version 3 (every sector among all `N` slots), for comparison.
    pub dense: bool,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self {
            profile: Profile::Patent,
            sector_size: pdguard_core::geometry::DEFAULT_SECTOR_SIZE,
            word_length: pdguard_core::geometry::DEFAULT_WORD_LENGTH,
            thin_slack_pct: 0,
            placement: None,
            strategy: strategy::DEFAULT_STRATEGY.into(),
            master_key: None,
            memory_bytes: strategy::DEFAULT_MEMORY_BYTES,
            keep_holes: false,
            dense: true,
        }
    }
}

/// What a seal or unseal command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The image is sealed now.
    Sealed,
    /// The image is plaintext again, verified against the seal-time digest.
    Unsealed,
    /// `unseal` found a seal interrupted and rolled it back: the image is plaintext.
    SealRolledBack,
    /// `seal` found an unseal interrupted and rolled it back: the image is sealed.
    UnsealRolledBack,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sealed => "sealed",
            Self::Unsealed => "unsealed",
            Self::SealRolledBack => "seal-rolled-back",
            Self::UnsealRolledBack => "unseal-rolled-back",
        }
    }
}

/// The result of a seal or unseal.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub outcome: Outcome,
    /// The phase an interrupted job was found in, if any.
    pub resumed_from: Option<Phase>,
    /// The record as last written (after an unseal, its final `unsealed` state).
    pub record: SealRecord,
}

/// The result of a successful verify.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub record: SealRecord,
    pub digest: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read and parse the record (checksum and consistency only).
fn decode(storage: &dyn Storage) -> Result<Option<(Vec<u8>, SealRecord)>> {
    let bytes = storage.read_record().map_err(|source| JobError::Store {
        image: storage.image_name(),
        source,
    })?;
    bytes
        .map(|b| {
            let rec = SealRecord::decode(&b).map_err(|source| JobError::Record {
                record: storage.record_name(),
                source,
            })?;
            Ok((b, rec))
        })
        .transpose()
}

/// Take the image's lock for a whole job, before its record is read: one job per image,
/// across processes and threads. A second job fails at once as busy.
fn lock_image(storage: &dyn Storage, mode: LockMode) -> Result<ImageLock> {
    storage.lock_image(mode).map_err(|source| match source {
        StoreError::Busy { .. } => JobError::Busy(source),
        source => JobError::Store {
            image: storage.image_name(),
            source,
        },
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
fn load(storage: &dyn Storage, key: Option<&MasterKey>, why: Use) -> Result<Option<SealRecord>> {
    Ok(load_with(storage, key, why, true)?.map(|(_, rec)| rec))
}

/// [`load`], returning the bytes the record was read from too, with the derived thin-disk
/// check only when `thin` (a command that never touches a thin disk, like `verify`, does
/// not judge which directory it was in).
fn load_with(
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
fn check_thin_path(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    let Some(named) = &rec.thin_path else {
        return Ok(());
    };
    let derived = storage
        .thin_name(&rec.seal_id)
        .map_err(|source| JobError::Store {
            image: storage.image_name(),
            source,
        })?;
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
fn authentic(
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
        record::authenticate(&bytes, &rec, &mac_key).map_err(|source| JobError::Record {
            record: storage.record_name(),
            source,
        })?;
    }
    Ok((bytes, rec))
}

/// A record that cannot carry a MAC (patent profile, or version 1 or 2) is refused when a
/// key slot exists: only a secure seal of version 3 on has one.
fn refuse_beside_slot(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    let slot = storage.read_key_slot().map_err(|source| JobError::Store {
        image: storage.image_name(),
        source,
    })?;
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

fn old_record(storage: &dyn Storage, rec: &SealRecord, hint: &str) -> JobError {
    JobError::OldRecord {
        image: storage.image_name(),
        record: storage.record_name(),
        version: rec.version,
        hint: hint.into(),
    }
}

/// The key of a record's MAC: secure profile, version 3 on, with the master key.
fn mac_key_for(rec: &SealRecord, key: Option<&MasterKey>) -> Option<zeroize::Zeroizing<[u8; 32]>> {
    match (rec.profile, key) {
        (Profile::Secure, Some(k)) if rec.version >= KEY_SLOT_VERSION => {
            Some(keys::record_mac_key(k, &rec.seal_id))
        }
        _ => None,
    }
}

fn not_sealed(storage: &dyn Storage) -> JobError {
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
    if rec.profile == Profile::Secure && key.is_some() {
        Keys::resolve(storage, &rec, key)?;
    }
    let store_err = |source| JobError::Store {
        image: storage.image_name(),
        source,
    };
    let image = storage.open_image(false).map_err(store_err)?;
    check_size(storage, &rec, &*image)?;
    // Like unseal: a record of another image is named as such, not as tampering.
    check_sealed_fingerprint(storage, &rec, &*image)?;
    progress.pass("verify", rec.image_bytes);
    let scheme = rec.digest_scheme().ok_or_else(|| JobError::Record {
        record: storage.record_name(),
        source: pdguard_core::RecordError::Inconsistent(format!(
            "unknown digest scheme {:?}",
            rec.digest
        )),
    })?;
    let digest = match &rec.dense {
        None => hash_image(&*image, scheme, None, progress),
        Some(d) => {
            let region = d.sectors * u64::from(rec.sector_size);
            let tail_ok = dense::tail_is_zero(&*image, region).map_err(store_err)?;
            if !tail_ok {
                return Err(JobError::Verification {
                    image: storage.image_name(),
                    why: format!("it holds data past its dense region (byte {region} on), where a dense seal leaves only holes: the sealed image was tampered with"),
                });
            }
            hash_image(&ExtentView::prefix(&*image, region), scheme, None, progress)
        }
    }
    .map_err(store_err)?;
    let expected = rec.sealed_digest.clone().unwrap_or_default();
    if digest != expected {
        return Err(JobError::Verification {
            image: storage.image_name(),
            why: format!("its BLAKE3 digest is {digest} but the seal record says {expected}: the sealed image was corrupted or tampered with"),
        });
    }
    Ok(VerifyReport {
        record: rec,
        digest,
    })
}

/// The digest of `image` (keyed by `key`: the plaintext digest of the secure profile),
/// reading only its data ranges.
fn hash_image(
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
fn sampled_fingerprint(image: &dyn Disk, g: Geometry) -> Result<String, StoreError> {
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
fn check_sealed_fingerprint(
    storage: &dyn Storage,
    rec: &SealRecord,
    image: &dyn Disk,
) -> Result<()> {
    let Some(want) = &rec.sealed_fingerprint else {
        return Ok(());
    };
    let g = rec.geometry().map_err(|e| JobError::Record {
        record: storage.record_name(),
        source: pdguard_core::RecordError::Inconsistent(e.to_string()),
    })?;
    let fp = sampled_fingerprint(image, g).map_err(|source| JobError::Store {
        image: storage.image_name(),
        source,
    })?;
    if *want != fp {
        return Err(JobError::Mismatch {
            image: storage.image_name(),
            record: storage.record_name(),
            why: "sampled sectors of the image differ from the sealed image the record describes"
                .into(),
        });
    }
    Ok(())
}

fn in_progress(storage: &dyn Storage, phase: Phase) -> JobError {
    let image = storage.image_name();
    match phase {
        Phase::Shredded => return JobError::Shredded { image },
        Phase::Shredding => return JobError::ShredInterrupted { image },
        _ => {}
    }
    let command = match phase {
        Phase::SealScatter | Phase::SealGather => "seal",
        _ => "unseal",
    };
    JobError::InProgress {
        image,
        phase: phase.name(),
        command,
    }
}

fn check_size(storage: &dyn Storage, rec: &SealRecord, image: &dyn Disk) -> Result<()> {
    if image.len() != rec.image_bytes {
        return Err(JobError::Mismatch {
            image: storage.image_name(),
            record: storage.record_name(),
            why: format!(
                "the image is {} bytes, the record is for {} bytes",
                image.len(),
                rec.image_bytes
            ),
        });
    }
    Ok(())
}

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
    let loops = storage.loop_devices().map_err(|source| JobError::Store {
        image: storage.image_name(),
        source,
    })?;
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
    let open = |rec| Job::open(storage, progress, rec, "seal", key, opts.memory_bytes);
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
        Phase::Shredding => Err(in_progress(storage, rec.phase)),
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
    if rec.phase.is_shred() {
        return Err(in_progress(storage, rec.phase));
    }
    let from = (rec.phase != Phase::Sealed).then_some(rec.phase);
    let mut job = Job::open(storage, progress, rec, "unseal", key, memory_bytes)?;
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
        Phase::SealGather => {
            drop(job.open_thin()?);
            job.commit(Phase::UnsealGather)?;
            job.unseal_gather()?;
            Outcome::SealRolledBack
        }
        Phase::Sealed => {
            job.check_fingerprint()?;
            job.unseal_scatter()?;
            job.unseal_gather()?;
            Outcome::Unsealed
        }
        Phase::UnsealScatter => {
            job.unseal_scatter()?;
            job.unseal_gather()?;
            Outcome::Unsealed
        }
        Phase::UnsealGather => {
            job.unseal_gather()?;
            Outcome::Unsealed
        }
        Phase::Unsealed => {
            job.check_plain()?;
            finish_unsealed(storage, &job.rec)?;
            Outcome::Unsealed
        }
        Phase::Shredding | Phase::Shredded => unreachable!("refused above"),
    };
    Ok(job.report(outcome, from))
}

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
    let store_err = |source| JobError::Store {
        image: storage.image_name(),
        source,
    };
    let mac_key = key.map(|k| keys::record_mac_key(k, &rec.seal_id));
    let mut rec = match rec.phase {
        // `authentic` migrated a record of version 1 or 2, or refused it: the wrapped key
        // is in the key slot, and nowhere else.
        Phase::Sealed => {
            let mut marked = rec;
            marked.version = RECORD_VERSION;
            marked.wrapped_key = None;
            marked.plain_digest = None;
            marked.phase = Phase::Shredding;
            marked.updated_unix = now();
            let bytes = marked.encode_with_mac(mac_key.as_deref());
            storage.write_record(&bytes).map_err(store_err)?;
            marked
        }
        Phase::Shredding => rec,
        other => return Err(in_progress(storage, other)),
    };
    let slot = match storage.read_key_slot().map_err(store_err)? {
        Some(_) => SlotFate::Overwritten,
        None => SlotFate::Absent,
    };
    storage.destroy_key_slot().map_err(store_err)?;
    rec.key_slot = None;
    rec.phase = Phase::Shredded;
    rec.updated_unix = now();
    let bytes = rec.encode_with_mac(mac_key.as_deref());
    storage.write_record(&bytes).map_err(store_err)?;
    Ok(ShredReport { record: rec, slot })
}

/// Undo a seal that never wrote the image: thin disk, record, then key slot (a slot left
/// by a crash here has no record and is destroyed by the next seal).
fn drop_seal(storage: &dyn Storage, seal_id: &str) -> Result<(), StoreError> {
    storage.remove_thin(seal_id)?;
    storage.remove_record()?;
    storage.destroy_key_slot()
}

fn finish_unsealed(storage: &dyn Storage, rec: &SealRecord) -> Result<()> {
    drop_seal(storage, &rec.seal_id).map_err(|source| JobError::Store {
        image: storage.image_name(),
        source,
    })
}

fn fresh_seal(
    storage: &dyn Storage,
    opts: &SealOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
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
    let image_name = storage.image_name();
    let store_err = |source| JobError::Store {
        image: image_name.clone(),
        source,
    };
    // A key slot without a record is a secure seal's that crashed before its record was
    // written (destroyed by the next secure seal), or one whose record was lost (restore
    // it): a patent seal never leaves it beside its own record, which has no MAC.
    if opts.profile == Profile::Patent && storage.read_key_slot().map_err(store_err)?.is_some() {
        return Err(JobError::Unsupported(format!(
            "{image_name} has a key slot {} but no seal record: it belongs to a secure seal whose record is missing. Restore that record from a backup; if that seal never started (a crash at its start), delete the slot, then seal again",
            storage.key_slot_name()
        )));
    }
    let image = storage.open_image(true).map_err(store_err)?;
    let geometry = Geometry::new(
        image.len(),
        opts.sector_size,
        opts.word_length,
        opts.thin_slack_pct,
    )
    .map_err(|source| JobError::Geometry {
        image: image_name.clone(),
        source,
    })?;
    let seed = read_seed(&*image, geometry).map_err(store_err)?;
    let sector = u64::from(geometry.sector_size());
    let dense = match opts.keep_holes && opts.dense && opts.profile == Profile::Secure {
        true => dense::plan(&*image, sector).map_err(store_err)?,
        false => None,
    };
    // Dense placement seals a compacted image of D sectors: the thin disk has its slots.
    let placed = match &dense {
        Some(d) => Geometry::new(
            d.sectors * sector,
            opts.sector_size,
            opts.word_length,
            opts.thin_slack_pct,
        )
        .map_err(|source| JobError::Geometry {
            image: image_name.clone(),
            source,
        })?,
        None => geometry,
    };
    let seal_id = hex::encode(rand::random::<[u8; 16]>());
    let t = now();
    let default_placement = match opts.profile {
        Profile::Patent => PlacementKind::Patent,
        Profile::Secure => PlacementKind::Feistel,
    };
    let thin_path = storage.thin_name(&seal_id).map_err(store_err)?;
    let mut rec = SealRecord {
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
        created_unix: t,
        updated_unix: t,
        writer: concat!("pdguard ", env!("CARGO_PKG_VERSION")).into(),
    };
    let mut slot = None;
    if let (Profile::Secure, Some(master)) = (opts.profile, &opts.master_key) {
        let data_key = DataKey::from_bytes(rand::random());
        if let Some(d) = &dense {
            let aad = pdguard_core::dense::map_aad(
                &rec.seal_id,
                rec.image_bytes,
                rec.sector_size,
                d.sectors,
            );
            let sk = data_key.derive(&rec.seal_id);
            rec.dense = Some(DenseRef {
                sectors: d.sectors,
                map: d.ranges.seal(&sk.dense_map, &aad),
            });
        }
        let aad = keys::wrap_aad(&rec);
        let wrapped = keys::wrap(master, &data_key, &seed, rand::random(), &aad);
        let bytes = keyslot::encode(&rec.seal_id, &wrapped).map_err(|e| {
            JobError::Unsupported(format!("the key slot of {image_name} cannot be made: {e}"))
        })?;
        rec.key_slot = Some(KeySlotRef {
            algorithm: wrapped.algorithm.clone(),
            master_key_id: wrapped.master_key_id.clone(),
            bytes: bytes.len() as u64,
            checksum: blake3::hash(&bytes).to_hex().to_string(),
        });
        slot = Some((bytes, wrapped));
    }
    let key = opts.master_key.as_ref();
    let keys = Keys::from_wrapped(storage, &rec, key, slot.as_ref().map(|s| &s.1))?;
    let mut job = Job::with_image(
        storage,
        progress,
        rec,
        "seal",
        image,
        keys,
        key,
        opts.memory_bytes,
    )?;
    // Everything that can be checked is checked before the first write. The key slot is
    // written before the record that names it: a crash in between leaves a slot without a
    // record, which the next seal destroys.
    job.check_space()?;
    if let Some((bytes, _)) = &slot {
        storage.create_key_slot(bytes).map_err(store_err)?;
    }
    job.rec.updated_unix = now();
    let bytes = job.record_bytes();
    storage.write_record(&bytes).map_err(store_err)?;
    job.seal_scatter()?;
    job.seal_gather()?;
    Ok(job.report(Outcome::Sealed, None))
}

/// The [040] seed: XOR of every word of the first `min(10, N)` sectors.
fn read_seed(image: &dyn Disk, g: Geometry) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let mut first = Zeroizing::new(vec![
        0u8;
        seed::seed_span(g.sector_size(), g.sectors()) as usize
    ]);
    image.read_at(&mut first, 0)?;
    Ok(seed::derive(&first, g.word_length()))
}

/// One seal or unseal in progress on one image.
struct Job<'a> {
    storage: &'a dyn Storage,
    progress: &'a dyn Progress,
    rec: SealRecord,
    image: Box<dyn Disk>,
    /// The geometry of the passes: the image's, or with dense placement the compacted
    /// image's (`D` sectors).
    geometry: Geometry,
    /// The image's own geometry (`N` sectors): its seed.
    image_geometry: Geometry,
    /// Dense placement: the original's data map, from the record.
    dense: Option<Dense>,
    placement: Box<dyn Placement>,
    strategy: Box<dyn Strategy>,
    keys: Keys,
    /// Keys the record's MAC (secure profile, record version 3 on).
    mac_key: Option<Zeroizing<[u8; 32]>>,
    digest: DigestScheme,
    /// The command the user ran: `seal` or `unseal`.
    command: &'static str,
    memory_bytes: u64,
    /// The record's bytes as read and their phase, when a failed verification is to put
    /// them back (an unseal that found the image sealed).
    restore: Option<(Vec<u8>, Phase)>,
}

/// What a record's profile and key give a job: the [040] seed, the key the placement is
/// built from and, in the secure profile, the sector cipher and the digest key.
struct Keys {
    data_seed: Zeroizing<Vec<u8>>,
    placement_key: Zeroizing<Vec<u8>>,
    cipher: Option<XtsAes256>,
    digest_key: Option<Zeroizing<[u8; 32]>>,
    /// Opens a dense seal's data map.
    dense_map_key: Option<Zeroizing<[u8; 32]>>,
}

impl Keys {
    /// The keys of a record, reading the wrapped key from its key slot (version 3) or from
    /// the record itself (versions 1 and 2).
    fn resolve(
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
    fn from_wrapped(
        storage: &dyn Storage,
        rec: &SealRecord,
        master: Option<&MasterKey>,
        slot: Option<&WrappedKey>,
    ) -> Result<Self> {
        let image = storage.image_name();
        let record_err = |e: &str| JobError::Record {
            record: storage.record_name(),
            source: pdguard_core::RecordError::Inconsistent(e.into()),
        };
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

/// The data map of a dense seal, decrypted and checked against the record.
fn open_dense(storage: &dyn Storage, rec: &SealRecord, keys: &Keys) -> Result<Option<Dense>> {
    let Some(d) = &rec.dense else {
        return Ok(None);
    };
    let record_err = |e: String| JobError::Record {
        record: storage.record_name(),
        source: pdguard_core::RecordError::Inconsistent(e),
    };
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
fn read_slot(storage: &dyn Storage, rec: &SealRecord, want: &KeySlotRef) -> Result<WrappedKey> {
    let bad = |why: String| JobError::KeySlot {
        image: storage.image_name(),
        slot: storage.key_slot_name(),
        why,
    };
    let bytes = storage
        .read_key_slot()
        .map_err(|source| JobError::Store {
            image: storage.image_name(),
            source,
        })?
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

impl<'a> Job<'a> {
    fn open(
        storage: &'a dyn Storage,
        progress: &'a dyn Progress,
        rec: SealRecord,
        command: &'static str,
        key: Option<&MasterKey>,
        memory_bytes: u64,
    ) -> Result<Self> {
        // Keys first: a wrong or missing key is refused before the image is opened.
        let keys = Keys::resolve(storage, &rec, key)?;
        let image = storage.open_image(true).map_err(|source| JobError::Store {
            image: storage.image_name(),
            source,
        })?;
        Self::with_image(
            storage,
            progress,
            rec,
            command,
            image,
            keys,
            key,
            memory_bytes,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn with_image(
        storage: &'a dyn Storage,
        progress: &'a dyn Progress,
        rec: SealRecord,
        command: &'static str,
        image: Box<dyn Disk>,
        keys: Keys,
        key: Option<&MasterKey>,
        memory_bytes: u64,
    ) -> Result<Self> {
        let mac_key = mac_key_for(&rec, key);
        check_size(storage, &rec, &*image)?;
        let record_err = |e: String| JobError::Record {
            record: storage.record_name(),
            source: pdguard_core::RecordError::Inconsistent(e),
        };
        let geometry = rec.geometry().map_err(|e| record_err(e.to_string()))?;
        let strategy = strategy::by_name(&rec.strategy).ok_or_else(|| {
            JobError::Unsupported(format!(
                "seal record {} names strategy {:?}, unknown to this pdguard; upgrade pdguard",
                storage.record_name(),
                rec.strategy
            ))
        })?;
        let kind = rec
            .placement_kind()
            .ok_or_else(|| record_err(format!("unknown placement {:?}", rec.placement)))?;
        let digest = rec
            .digest_scheme()
            .ok_or_else(|| record_err(format!("unknown digest scheme {:?}", rec.digest)))?;
        let image_geometry =
            Geometry::with_slots(rec.sectors, rec.sectors, rec.sector_size, rec.word_length)
                .map_err(|e| record_err(e.to_string()))?;
        let dense = open_dense(storage, &rec, &keys)?;
        let placement = placement::build(
            kind,
            &keys.placement_key,
            geometry.sectors(),
            geometry.thin_sectors(),
        )
        .map_err(|source| JobError::Placement {
            image: storage.image_name(),
            source,
        })?;
        Ok(Self {
            storage,
            progress,
            rec,
            image,
            geometry,
            image_geometry,
            dense,
            placement,
            strategy,
            keys,
            mac_key,
            digest,
            command,
            memory_bytes,
            restore: None,
        })
    }

    fn report(self, outcome: Outcome, resumed_from: Option<Phase>) -> JobReport {
        JobReport {
            outcome,
            resumed_from,
            record: self.rec,
        }
    }

    fn ctx(&self) -> PassCtx<'_> {
        PassCtx {
            geometry: self.geometry,
            placement: &*self.placement,
            cipher: self
                .keys
                .cipher
                .as_ref()
                .map(|c| c as &dyn pdguard_core::cipher::SectorCipher),
            digest_key: self.keys.digest_key.as_deref(),
            digest: self.digest,
            keep_holes: self.rec.keep_holes,
            progress: self.progress,
            memory_bytes: self.memory_bytes,
        }
    }

    fn image_name(&self) -> String {
        self.storage.image_name()
    }

    /// `disk` as a pass sees it: holes not read, zeros not written into them.
    fn sparse<'d>(&self, disk: &'d dyn Disk) -> Result<Sparse<'d>, StoreError> {
        Sparse::new(disk, self.geometry.sector_size().into())
    }

    fn action(&self) -> &'static str {
        if self.command == "seal" {
            "sealing"
        } else {
            "unsealing"
        }
    }

    /// An error after the record exists: the job can be finished or rolled back later.
    fn interrupted(&self, source: StoreError) -> JobError {
        JobError::Interrupted {
            action: self.action(),
            image: self.image_name(),
            phase: self.rec.phase.name(),
            command: self.command,
            source,
        }
    }

    /// The record's bytes, with its MAC when the seal has a key.
    fn record_bytes(&self) -> Vec<u8> {
        self.rec.encode_with_mac(self.mac_key.as_deref())
    }

    /// Write the record with a new phase, atomically and durably.
    fn commit(&mut self, phase: Phase) -> Result<()> {
        self.rec.phase = phase;
        self.rec.updated_unix = now();
        let bytes = self.record_bytes();
        self.storage
            .write_record(&bytes)
            .map_err(|e| self.interrupted(e))
    }

    fn thin_name(&self) -> String {
        self.storage
            .thin_name(&self.rec.seal_id)
            .unwrap_or_else(|_| format!("the thin disk of seal {}", self.rec.seal_id))
    }

    fn check_space(&self) -> Result<()> {
        let free = self
            .storage
            .free_bytes(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        let need = self.thin_need().map_err(|e| self.interrupted(e))?;
        if free < need {
            return Err(JobError::NoSpace {
                thin: self.thin_name(),
                need,
                free,
            });
        }
        Ok(())
    }

    /// Bytes the thin disk of the next scatter may take: the whole disk, unless zeros stay
    /// zeros (patent profile, or `keep_holes`), when only the sectors in the image's data
    /// ranges are written there. Packed in windows, they may take a few more pages than in
    /// the image (a part page where each run ends): a quarter more and 16 MiB cover it. (A
    /// sealed image's data ranges are pages holding scattered sectors, so for an unseal this
    /// is generous.)
    fn thin_need(&self) -> Result<u64, StoreError> {
        let disk = self.geometry.disk_bytes();
        if self.keys.cipher.is_some() && !self.rec.keep_holes {
            return Ok(disk);
        }
        let data = self.image.data_map()?.data_bytes();
        Ok(disk.min(data.saturating_add(data / 4).saturating_add(16 << 20)))
    }

    /// A seal interrupted in scatter is resumed only on the image it started on.
    fn check_seed(&self) -> Result<()> {
        let seed = read_seed(&*self.image, self.image_geometry).map_err(|e| self.interrupted(e))?;
        if *seed != *self.keys.data_seed {
            return Err(JobError::Mismatch {
                image: self.image_name(),
                record: self.storage.record_name(),
                why: "the image's first sectors do not give the seed the record was made from"
                    .into(),
            });
        }
        Ok(())
    }

    /// With dense placement, the dense region the sealed passes read and write.
    fn sealed_view(&self) -> Option<ExtentView<'_>> {
        let sector = self.geometry.sector_size().into();
        self.dense.as_ref().map(|d| d.region(&*self.image, sector))
    }

    fn fingerprint(&self) -> Result<String, StoreError> {
        sampled_fingerprint(&*self.image, self.geometry)
    }

    fn check_fingerprint(&self) -> Result<()> {
        let fp = self.fingerprint().map_err(|source| JobError::Store {
            image: self.image_name(),
            source,
        })?;
        match &self.rec.sealed_fingerprint {
            Some(want) if *want != fp => Err(JobError::Mismatch {
                image: self.image_name(),
                record: self.storage.record_name(),
                why:
                    "sampled sectors of the image differ from the sealed image the record describes"
                        .into(),
            }),
            _ => Ok(()),
        }
    }

    /// Seal pass 1, scatter: the image is read linearly and each sector goes to its slot
    /// of a new thin disk (claims 1-2). The image is untouched, so a failure rolls back.
    fn seal_scatter(&mut self) -> Result<()> {
        let seal_id = self.rec.seal_id.clone();
        let run = |job: &Self| -> Result<blake3::Hash> {
            job.storage
                .remove_thin(&seal_id)
                .map_err(|e| job.interrupted(e))?;
            job.check_space()?;
            job.progress.pass("scatter", job.geometry.disk_bytes());
            let moved = || -> Result<blake3::Hash, StoreError> {
                let thin = job
                    .storage
                    .create_thin(&seal_id, job.geometry.thin_bytes())?;
                let view = job.dense.as_ref().map(|d| d.compacted(&*job.image));
                let plain = view.as_ref().map_or(&*job.image, |v| v as &dyn Disk);
                let (image, thin) = (job.sparse(plain)?, job.sparse(&*thin)?);
                let h = job.strategy.scatter_plain(&job.ctx(), &image, &thin)?;
                thin.sync()?;
                Ok(h)
            };
            moved().map_err(|e| job.interrupted(e))
        };
        let digest = match run(self) {
            Ok(d) => d,
            Err(e) => return Err(self.roll_back_seal_scatter(e)),
        };
        self.rec.plain_digest = Some(digest.to_hex().to_string());
        self.wipe()
    }

    /// Undo a failed seal scatter: the image was only read, so dropping the thin disk and
    /// the record restores the state before the seal.
    fn roll_back_seal_scatter(&self, err: JobError) -> JobError {
        let undone = drop_seal(self.storage, &self.rec.seal_id);
        match (err, undone) {
            (JobError::Interrupted { source, .. }, Ok(())) => JobError::RolledBack {
                action: "sealing",
                image: self.image_name(),
                source,
            },
            (e, _) => e,
        }
    }

    /// Seal pass 2, wipe ([043], claim 5): from this durable record write on, the thin
    /// disk is the one complete copy and the image's plaintext is no longer trusted. The
    /// gather that follows overwrites every sector of the image.
    fn wipe(&mut self) -> Result<()> {
        self.commit(Phase::SealGather)
    }

    fn open_thin(&self) -> Result<Box<dyn Disk>> {
        let thin = self
            .storage
            .open_thin(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        match thin {
            Some(t) if t.len() == self.geometry.thin_bytes() => Ok(t),
            _ => Err(JobError::ThinMissing {
                image: self.image_name(),
                thin: self.thin_name(),
                phase: self.rec.phase.name(),
            }),
        }
    }

    /// Seal pass 3, gather ([043]-[045]): the thin disk is copied back linearly, empty
    /// slots skipped. Restartable: the thin disk is not changed.
    ///
    /// The sealed digest is a fact of the seal, written once by the gather that completes
    /// it. A gather that puts a sealed image back (an unseal rolled back or failed) checks
    /// the image against that digest and never rewrites it: if the thin disk was corrupted,
    /// the record keeps saying what the seal was, so `verify` reports the damage.
    fn seal_gather(&mut self) -> Result<()> {
        let thin = self.open_thin()?;
        self.progress.pass("gather", self.geometry.disk_bytes());
        let view = self.sealed_view();
        let sealed = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
        // Dense placement: the original's data past the dense region is overwritten beside
        // the gather (other bytes, other I/O), synced with it, then deallocated. Without
        // it the tail is empty and this is the gather and the image's sync.
        let tail = match &view {
            Some(v) => dense::tail_ranges(&*self.image, v.len()),
            None => Ok(Vec::new()),
        };
        let digest = tail
            .and_then(|tail| Ok((tail, self.sparse(&*thin)?, self.sparse(sealed)?)))
            .and_then(|(tail, t, i)| {
                dense::gather_and_wipe(&*self.image, &tail, || {
                    self.strategy.gather_sealed(&self.ctx(), &t, &i)
                })
            })
            .and_then(|d| Ok((d, self.fingerprint()?)))
            .map_err(|e| self.interrupted(e));
        drop(view);
        let (digest, fingerprint) = digest?;
        let digest = digest.to_hex().to_string();
        let put_back = match &self.rec.sealed_digest {
            Some(want) => (*want != digest).then(|| want.clone()),
            None => {
                self.rec.sealed_digest = Some(digest.clone());
                self.rec.sealed_fingerprint = Some(fingerprint);
                None
            }
        };
        self.commit(Phase::Sealed)?;
        drop(thin);
        self.storage
            .remove_thin(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        match put_back {
            None => Ok(()),
            Some(want) => Err(JobError::Verification {
                image: self.image_name(),
                why: format!("the sealed data put back from the thin disk has the BLAKE3 digest {digest}, but the seal's is {want}: the thin disk was corrupted; the image stays sealed and the record keeps the seal's digest, so `pdguard image verify` reports the damage"),
            }),
        }
    }

    /// Unseal pass 1: the sealed image is read linearly back into the thin-disk layout,
    /// and its digest checked before anything is written to the image.
    fn unseal_scatter(&mut self) -> Result<()> {
        let seal_id = self.rec.seal_id.clone();
        self.storage
            .remove_thin(&seal_id)
            .map_err(|e| self.interrupted(e))?;
        self.check_space()?;
        if self.rec.phase != Phase::UnsealScatter {
            self.commit(Phase::UnsealScatter)?;
        }
        self.progress.pass("scatter", self.geometry.disk_bytes());
        let moved = || -> Result<blake3::Hash, StoreError> {
            let thin = self
                .storage
                .create_thin(&seal_id, self.geometry.thin_bytes())?;
            let view = self.sealed_view();
            let sealed = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
            let (image, thin) = (self.sparse(sealed)?, self.sparse(&*thin)?);
            let h = self.strategy.scatter_sealed(&self.ctx(), &image, &thin)?;
            thin.sync()?;
            Ok(h)
        };
        let digest = match moved() {
            Ok(d) => d.to_hex().to_string(),
            Err(e) => return Err(self.roll_back_unseal_scatter(e)),
        };
        if self.rec.sealed_digest.as_deref() != Some(digest.as_str()) {
            let why = format!("the sealed image's BLAKE3 digest is {digest} but the seal record says {}: it was corrupted or tampered with after sealing; it is left sealed as it is", self.rec.sealed_digest.as_deref().unwrap_or("nothing"));
            self.abandon_unseal_scatter()?;
            return Err(JobError::Verification {
                image: self.image_name(),
                why,
            });
        }
        self.commit(Phase::UnsealGather)
    }

    fn roll_back_unseal_scatter(&mut self, source: StoreError) -> JobError {
        match self.abandon_unseal_scatter() {
            Ok(()) => JobError::RolledBack {
                action: "unsealing",
                image: self.image_name(),
                source,
            },
            Err(_) => self.interrupted(source),
        }
    }

    /// Drop an unseal's thin disk; the image is still sealed and untouched.
    fn abandon_unseal_scatter(&mut self) -> Result<()> {
        self.storage
            .remove_thin(&self.rec.seal_id)
            .map_err(|e| self.interrupted(e))?;
        match self.restore.is_some() {
            true => self.put_record_back(),
            false => self.commit(Phase::Sealed),
        }
    }

    /// After a failed verification of an unseal that found the image sealed, with the
    /// sealed image in place again: the record as it was read, byte for byte.
    fn put_record_back(&mut self) -> Result<()> {
        let Some((bytes, phase)) = self.restore.take() else {
            return Ok(());
        };
        self.rec.phase = phase;
        self.storage
            .write_record(&bytes)
            .map_err(|e| self.interrupted(e))
    }

    /// The plaintext view of the image: the compacted one with dense placement.
    fn plain_digest_now(&self) -> Result<String> {
        let view = self.dense.as_ref().map(|d| d.compacted(&*self.image));
        let plain = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
        self.progress.pass("verify", self.geometry.disk_bytes());
        let key = self.keys.digest_key.as_deref();
        hash_image(plain, self.digest, key, self.progress).map_err(|source| JobError::Store {
            image: self.image_name(),
            source,
        })
    }

    fn not_plaintext(&self, why: String) -> JobError {
        JobError::Verification {
            image: self.image_name(),
            why: format!("its seal record says phase {}, {why}; the record was edited or the image changed, so nothing was touched", self.rec.phase.name()),
        }
    }

    /// The image is the plaintext whose digest the record names (phase `unsealed`): the
    /// record and key slot are dropped only over it.
    fn check_plain(&self) -> Result<()> {
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
    fn check_plaintext(&self) -> Result<()> {
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
    fn check_still_sealed(&self) -> Result<()> {
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

    /// Unseal pass 3: every sector comes back from its slot, and the plaintext digest is
    /// checked. On a mismatch the sealed image is put back from the thin disk.
    fn unseal_gather(&mut self) -> Result<()> {
        let thin = self.open_thin()?;
        self.progress.pass("gather", self.geometry.disk_bytes());
        let view = self.dense.as_ref().map(|d| d.compacted(&*self.image));
        let plain = view.as_ref().map_or(&*self.image, |v| v as &dyn Disk);
        let digest = self
            .sparse(&*thin)
            .and_then(|t| Ok((t, self.sparse(plain)?)))
            .and_then(|(t, i)| self.strategy.gather_plain(&self.ctx(), &t, &i))
            .and_then(|d| self.image.sync().map(|()| d))
            .and_then(|d| match &self.dense {
                Some(dn) => dense::restore_holes(&*self.image, &dn.ranges).map(|()| d),
                None => Ok(d),
            })
            .map_err(|e| self.interrupted(e))?
            .to_hex()
            .to_string();
        drop((thin, view));
        if self.rec.plain_digest.as_deref() != Some(digest.as_str()) {
            let why = format!(
                "the unsealed data's BLAKE3 digest is {digest} but the seal record says {}",
                self.rec.plain_digest.as_deref().unwrap_or("nothing")
            );
            // Put the sealed data back from the thin disk; seal_gather checks it against
            // the seal's digest and never rewrites that digest.
            self.commit(Phase::SealGather)?;
            let put_back = match self.seal_gather() {
                Ok(()) => {
                    self.put_record_back()?;
                    "the sealed data was put back in place and matches the seal's digest"
                        .to_string()
                }
                Err(JobError::Verification { why, .. }) => why,
                Err(e) => return Err(e),
            };
            return Err(JobError::Verification {
                image: self.image_name(),
                why: format!("{why}; {put_back}"),
            });
        }
        self.commit(Phase::Unsealed)?;
        finish_unsealed(self.storage, &self.rec).map_err(|e| match e {
            JobError::Store { source, .. } => self.interrupted(source),
            other => other,
        })
    }
}
