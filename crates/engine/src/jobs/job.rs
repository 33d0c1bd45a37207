//! The seal and unseal state machine over [`Storage`]. See the phase table on
//! [`pdguard_core::Phase`] for what each phase means after a crash.
//!
//! This file holds the options, the reports and [`Job`] (one seal or unseal in progress);
//! each other part of a job has its own room:
//!
//! | room            | what                                                              |
//! |-----------------|-------------------------------------------------------------------|
//! | `record_io.rs`  | read, lock, authenticate the record; hold it to its thin disk     |
//! | `keyring.rs`    | the keys a record and a master key give; the key slot; dense map  |
//! | `verify.rs`     | `verify`, digests, fingerprints, the checks before a job ends     |
//! | `recover.rs`    | the phase tables of `seal` and `unseal`                           |
//! | `passes.rs`     | scatter, wipe and gather, both ways                               |
//! | `fresh.rs`      | a new seal                                                        |
//! | `tree.rs`       | the region digest tree: recorded, loaded, checked per region      |
//! | `place.rs`      | the placement table: recorded at seal, read by an instant reclaim |
//! | `shred.rs`      | crypto-erase                                                      |
//! | `migrate.rs`    | old record versions to the current one                            |
//! | `rescue.rs`     | `unseal --force --output`                                         |
//! | `reclaim_open.rs` | open a seal for an instant reclaim (`jobs/reclaim/`)            |
//! | `reclaim_offline.rs` | an instant reclaim driven to its end offline (`image unseal`) |

use std::time::{SystemTime, UNIX_EPOCH};

use pdguard_core::cipher::XtsAes256;
use pdguard_core::digest::{DigestScheme, ImageHasher};
use pdguard_core::keys::{self, DataKey, MasterKey};
use pdguard_core::keyslot;
use pdguard_core::record::{
    self, DenseRef, KeySlotRef, RegionTreeRef, WrappedKey, KEY_SLOT_VERSION, RECORD_VERSION,
};
use pdguard_core::region_tree::{RegionKeys, RegionLayout, RegionTree, REGION_BYTES};
use pdguard_core::{
    fingerprint_sectors, placement, seed, Geometry, Phase, Placement, PlacementKind, Profile,
    SealRecord,
};
use zeroize::Zeroizing;

use super::dense::{self, Dense};
use super::error::{JobError, Result};
use super::strategy::{self, PassCtx, RegionTap, Strategy};
use super::Progress;
use crate::store::{
    Disk, ExtentView, ImageLock, LockMode, MigrationFile, Sparse, Storage, StoreError,
};

mod fresh;
mod keyring;
mod migrate;
mod passes;
mod place;
mod reclaim_offline;
mod reclaim_open;
mod record_io;
mod recover;
mod rescue;
mod scope;
mod shred;
mod tree;
mod verify;
use fresh::*;
use keyring::*;
pub use migrate::{migrate, MigrateReport};
pub(crate) use place::ReclaimPlacement;
use place::*;
pub use reclaim_offline::{
    reclaim_offline, verify_migrating, OfflineReclaim, OfflineReport, MIGRATE_END_PASS,
    MIGRATE_PASS,
};
pub(crate) use reclaim_open::{drop_unsealed, open_for_reclaim, plain_digest, SealOpened};
pub use record_io::inspect;
use record_io::*;
use recover::*;
pub use recover::{seal, unseal, unseal_with};
pub use rescue::{rescue, RescueReport};
use scope::JobScope;
pub use shred::{shred, shred_report, ShredReport, SlotFate};
pub use tree::load_tree_for_migration;
use verify::*;
pub use verify::{verify, VerifyReport};

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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which way a job moves the data; named by the command that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Seal,
    Unseal,
}

impl Direction {
    /// The command that finishes (or, run the other way, rolls back) a job going this way.
    pub fn command(self) -> &'static str {
        match self {
            Self::Seal => "seal",
            Self::Unseal => "unseal",
        }
    }

    /// What a job going this way is doing, for messages: `sealing`, `unsealing`.
    pub fn action(self) -> &'static str {
        match self {
            Self::Seal => "sealing",
            Self::Unseal => "unsealing",
        }
    }

    /// The direction of the job a record in `phase` was interrupted in.
    pub fn of(phase: Phase) -> Self {
        match phase {
            Phase::SealScatter | Phase::SealGather => Self::Seal,
            _ => Self::Unseal,
        }
    }
}

/// What [`Job::with_image`] builds a job from.
struct Parts<'a> {
    storage: &'a dyn Storage,
    progress: &'a dyn Progress,
    rec: SealRecord,
    direction: Direction,
    /// The image, opened for writing (or only reading, for a rescue).
    image: Box<dyn Disk>,
    keys: Keys,
    /// Keys the record's MAC (secure profile, record version 3 on).
    mac_key: Option<Zeroizing<[u8; 32]>>,
    memory_bytes: u64,
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
    /// The command the user ran.
    direction: Direction,
    memory_bytes: u64,
    /// The record's bytes as read and their phase, when a failed verification is to put
    /// them back (an unseal that found the image sealed).
    restore: Option<(Vec<u8>, Phase)>,
    /// The seal's region digest tree, loaded and checked against the record's root
    /// ([`Job::load_tree`]) by a job that gathers the plaintext.
    tree: Option<RegionTree>,
}

impl<'a> Job<'a> {
    fn open(
        storage: &'a dyn Storage,
        progress: &'a dyn Progress,
        rec: SealRecord,
        direction: Direction,
        key: Option<&MasterKey>,
        memory_bytes: u64,
    ) -> Result<Self> {
        // Keys first: a wrong or missing key is refused before the image is opened.
        let keys = Keys::resolve(storage, &rec, key)?;
        let image = storage
            .open_image(true)
            .map_err(|e| JobScope(storage).store(e))?;
        Self::with_image(Parts {
            storage,
            progress,
            mac_key: mac_key_for(&rec, key),
            rec,
            direction,
            image,
            keys,
            memory_bytes,
        })
    }

    /// A job from its parts: the record is checked against the image (size, geometry,
    /// strategy, placement, digest scheme, dense map) before anything is written.
    fn with_image(parts: Parts<'a>) -> Result<Self> {
        let Parts {
            storage,
            progress,
            rec,
            direction,
            image,
            keys,
            mac_key,
            memory_bytes,
        } = parts;
        let scope = JobScope(storage);
        check_size(storage, &rec, &*image)?;
        let geometry = rec
            .geometry()
            .map_err(|e| scope.inconsistent(e.to_string()))?;
        let strategy = strategy::by_name(&rec.strategy).ok_or_else(|| {
            JobError::Unsupported(format!(
                "seal record {} names strategy {:?}, unknown to this pdguard; upgrade pdguard",
                storage.record_name(),
                rec.strategy
            ))
        })?;
        let image_geometry =
            Geometry::with_slots(rec.sectors, rec.sectors, rec.sector_size, rec.word_length)
                .map_err(|e| scope.inconsistent(e.to_string()))?;
        let Named {
            digest,
            dense,
            placement,
        } = named_by_record(storage, &rec, &keys, &geometry)?;
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
            direction,
            memory_bytes,
            restore: None,
            tree: None,
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
        self.ctx_with(None)
    }

    /// [`Self::ctx`] with a region hasher for the plain pass.
    fn ctx_with<'c>(&'c self, regions: Option<&'c RegionTap>) -> PassCtx<'c> {
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
            regions,
        }
    }

    fn image_name(&self) -> String {
        self.storage.image_name()
    }

    /// What this job's errors name.
    fn scope(&self) -> JobScope<'a> {
        JobScope(self.storage)
    }

    /// `disk` as a pass sees it: holes not read, zeros not written into them.
    fn sparse<'d>(&self, disk: &'d dyn Disk) -> Result<Sparse<'d>, StoreError> {
        Sparse::new(disk, self.geometry.sector_size().into())
    }

    /// An error after the record exists: the job can be finished or rolled back later.
    fn interrupted(&self, source: StoreError) -> JobError {
        JobError::Interrupted {
            action: self.direction.action(),
            image: self.image_name(),
            phase: self.rec.phase.name(),
            command: self.direction.command(),
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

    /// With dense placement, the dense region the sealed passes read and write.
    fn sealed_view(&self) -> Option<ExtentView<'_>> {
        let sector = self.geometry.sector_size().into();
        self.dense.as_ref().map(|d| d.region(&*self.image, sector))
    }
}
