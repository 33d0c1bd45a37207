//! The start of a migration (`docs/instant-reclaim.md`, section 4.1), its resume from
//! phase `migrating` after a crash (section 7), and its end (4.4).
//!
//! Start: open the seal as an unseal does (record authenticated, keys, size, sealed
//! fingerprint); create **E** (sparse, exclusive, directory fsynced) and **M** (first
//! commit, every region `sealed` but a dense seal's regions past its sealed data, which
//! start `evacuated`), then write the record in phase `migrating` (version 5). Resume:
//! load **M**'s newer valid slot and open **E**; nothing is `moving` on disk. End: every
//! region `plain` or `dirty`; `fdatasync(I)`; the plaintext digest is checked against the
//! record's when no region is `dirty`, else recorded as the user's image's digest; the
//! record is written `unsealed` (version 4); **E** and **M** are deleted, then the record
//! and the key slot.

use std::sync::{Condvar, Mutex};

use pdguard_core::keys::MasterKey;
use pdguard_core::moved_map::{MapIdentity, MapKey, MovedMap, RegionState};
use pdguard_core::record::{MIGRATING_VERSION, RECORD_VERSION};
use pdguard_core::region_tree::{RegionKeys, RegionLayout, RegionTree, REGION_BYTES};
use pdguard_core::sealed_address::SealedAddress;
use pdguard_core::{Phase, SealRecord};

use super::moved_file::{MovedFile, MovedFileError};
use super::{Migration, ReclaimError, Result, Shared};
use crate::jobs::job::{drop_unsealed, open_for_reclaim, plain_digest, SealOpened};
use crate::store::{Disk, MigrationFile, Storage};

/// How a migration cuts and walks the image.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Region size when no region digest tree is given (with one, the tree's).
    pub region_bytes: u32,
    /// Bytes of one background window (at least one region): the move pass holds a
    /// window of plaintext in memory, and the larger it is, the more of the sealed sectors
    /// each read of the evacuation copy finds together.
    pub window_bytes: u64,
    /// A front-end serves the image from the start (a reclaim's client reads at once: a
    /// file system's mount, a boot): the background starts in windows of one region, as
    /// if a demand move had just been made, rather than holding the first window busy.
    /// Off for a migration nobody serves (`image unseal --instant`).
    pub served: bool,
    /// The move pass may run as one bulk pass (`bulk.rs`): the evacuation copy bucketed
    /// into a scratch thin disk by the `window` strategy's sealed scatter, then merged
    /// back in image order, so that it reads large runs instead of one sector at a time.
    /// Off for a migration that only reads (`image verify`): it creates no file.
    pub bulk: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            region_bytes: REGION_BYTES,
            window_bytes: 64 << 20,
            served: false,
            bulk: true,
        }
    }
}

/// The end of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Regions changed by their user since the reclaim began.
    pub dirty_regions: u64,
    /// The image's plaintext digest now (the seal's, when no region is dirty).
    pub plain_digest: String,
    /// The migration was found in phase `migrating` and resumed.
    pub resumed: bool,
    /// The record as last written (phase `unsealed`, version 4) before it was deleted.
    pub record: SealRecord,
}

impl Migration {
    /// Start the migration of `storage`'s sealed image, or resume it from phase
    /// `migrating`. `tree` is the seal's region digest tree (authenticated by the caller
    /// against the record): with it, each region is checked against its leaf when moved.
    pub fn start(
        storage: &dyn Storage,
        key: Option<&MasterKey>,
        tree: Option<RegionTree>,
        opts: &MigrationOptions,
    ) -> Result<Self> {
        Self::open(storage, key, tree, opts, true)
    }

    /// [`Migration::start`] for a migration in phase `migrating` only: a record in any
    /// other phase is refused before anything is written (what `image verify` and the
    /// offline finish without `--instant` use, so that they never begin a migration).
    pub fn resume(
        storage: &dyn Storage,
        key: Option<&MasterKey>,
        tree: Option<RegionTree>,
        opts: &MigrationOptions,
    ) -> Result<Self> {
        Self::open(storage, key, tree, opts, false)
    }

    fn open(
        storage: &dyn Storage,
        key: Option<&MasterKey>,
        tree: Option<RegionTree>,
        opts: &MigrationOptions,
        may_begin: bool,
    ) -> Result<Self> {
        let (mut seal, placement) = open_for_reclaim(storage, key)?;
        if !may_begin && seal.rec.phase != Phase::Migrating {
            return Err(ReclaimError::NotMigrating {
                image: storage.image_name(),
                phase: seal.rec.phase.name(),
            });
        }
        let image_name = storage.image_name();
        let sector = u64::from(seal.rec.sector_size);
        let region_bytes = tree
            .as_ref()
            .map_or(opts.region_bytes, |t| t.layout().region_bytes());
        let layout = layout_of(&image_name, &seal, region_bytes, sector, tree.as_ref())?;
        let mut seal_id = [0u8; 16];
        hex::decode_to_slice(&seal.rec.seal_id, &mut seal_id).map_err(|_| {
            ReclaimError::Job(crate::jobs::JobError::Unsupported(format!(
                "seal record {} has a seal id that is not hex",
                storage.record_name()
            )))
        })?;
        let identity = MapIdentity { seal_id, layout };
        let map_key = MapKey::new(seal.mac_key.as_deref());
        let resumed = seal.rec.phase == Phase::Migrating;
        let (evacuation, moved, map) = if resumed {
            resume(storage, &image_name, &identity, map_key)?
        } else {
            begin(storage, &mut seal, &identity, map_key, sector)?
        };
        // Every read of a migration asks for exactly what it needs; a read-ahead (megabytes
        // on some disks) queued ahead of a demand move's reads would delay the request.
        seal.image.no_read_ahead();
        evacuation.no_read_ahead();
        let bulk_thin = match opts.bulk {
            true => bulk_thin(storage, &seal, &*evacuation)?,
            false => None,
        };
        let regions = layout.regions() as usize;
        let from_table = placement.from_table;
        let address = SealedAddress::owning_with_rank(
            placement.placement,
            placement.rank,
            seal.dense.as_ref().map(|d| &d.ranges),
            seal.rec.sectors,
            sector,
        );
        let region_keys = RegionKeys::new(seal.digest_key.as_deref());
        tracing::info!(image = %image_name, resumed, regions, from_table, "migration of an instant reclaim started");
        Ok(Self {
            image_name,
            address,
            layout,
            sector,
            evacuation,
            bulk_thin,
            moved,
            tree,
            region_keys,
            window_regions: (opts.window_bytes / u64::from(region_bytes)).max(1),
            shared: Mutex::new(Shared {
                map,
                busy: vec![false; regions],
                image_readers: vec![0; regions],
                changes: 0,
                committed: 0,
                failed: None,
                pass_from: [0; 2],
                demand_io: 0,
                last_demand: opts.served.then(std::time::Instant::now),
                bulk: super::bulk::Bulk::Waiting,
            }),
            changed: Condvar::new(),
            resumed,
            placement_from_table: from_table,
            progress: None,
            seal,
        })
    }

    /// The end (section 4.4), once [`Migration::step`] said `Complete`.
    pub fn finish(mut self, storage: &dyn Storage) -> Result<Finished> {
        let (left, dirty) = {
            let g = self.lock();
            self.refuse_if_failed(&g)?;
            let left =
                g.map.regions() - g.map.count(RegionState::Plain) - g.map.count(RegionState::Dirty);
            (left, g.map.count(RegionState::Dirty))
        };
        if left > 0 {
            return Err(ReclaimError::NotComplete {
                image: self.image_name.clone(),
                left,
            });
        }
        let store = |e| ReclaimError::Store {
            image: self.image_name.clone(),
            source: e,
        };
        self.seal.image.sync().map_err(store)?;
        let digest_key = self.seal.digest_key.as_deref();
        let have = plain_digest(
            &*self.seal.image,
            self.seal.dense.as_ref(),
            self.seal.digest,
            digest_key,
        )
        .map_err(store)?;
        let want = self.seal.rec.plain_digest.clone().unwrap_or_default();
        if dirty == 0 && have != want {
            return Err(ReclaimError::Verification {
                image: self.image_name.clone(),
                want,
                have,
            });
        }
        let rec = &mut self.seal.rec;
        rec.plain_digest = Some(have.clone());
        rec.phase = Phase::Unsealed;
        rec.version = RECORD_VERSION;
        rec.updated_unix = unix_now();
        let bytes = rec.encode_with_mac(self.seal.mac_key.as_deref());
        storage.write_record(&bytes).map_err(store)?;
        storage
            .remove_migration_file(MigrationFile::EvacuationCopy)
            .and_then(|()| storage.remove_migration_file(MigrationFile::MovedMap))
            .map_err(store)?;
        drop_unsealed(storage, &self.seal.rec)?;
        tracing::info!(image = %self.image_name, dirty, "migration of an instant reclaim ended");
        Ok(Finished {
            dirty_regions: dirty,
            plain_digest: have,
            resumed: self.resumed,
            record: self.seal.rec,
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// **T**, the bulk move pass's scratch thin disk, made anew (one a crash left is deleted
/// first: it is a cache, never read after a restart) when the file system has room for it
/// beside what the evacuation copy still needs; `None` (moves region by region) when not.
fn bulk_thin(
    storage: &dyn Storage,
    seal: &SealOpened,
    evacuation: &dyn Disk,
) -> Result<Option<Box<dyn Disk>>> {
    let image = storage.image_name();
    let store = |source| ReclaimError::Store {
        image: image.clone(),
        source,
    };
    let id = &seal.rec.seal_id;
    storage.remove_thin(id).map_err(store)?;
    let geometry = seal
        .rec
        .geometry()
        .map_err(|e| ReclaimError::Job(crate::jobs::JobError::Unsupported(e.to_string())))?;
    let thin = geometry.thin_bytes();
    let sealed = geometry.disk_bytes();
    let evacuated = evacuation.data_map().map_err(store)?.data_bytes();
    let need = thin.saturating_add(sealed.saturating_sub(evacuated));
    let free = storage.free_bytes(id).map_err(store)?;
    if free < need {
        tracing::info!(image = %image, need, free, "instant reclaim: too little free space for the bulk move pass's thin disk; moving region by region");
        return Ok(None);
    }
    storage.create_thin(id, thin).map(Some).map_err(store)
}

/// The regions of the image: the tree's when given (it must be of this image), else of
/// `region_bytes`; a region holds whole sectors.
fn layout_of(
    image: &str,
    seal: &SealOpened,
    region_bytes: u32,
    sector: u64,
    tree: Option<&RegionTree>,
) -> Result<RegionLayout> {
    let bad = |why: String| ReclaimError::Tree {
        image: image.into(),
        why,
    };
    let layout = RegionLayout::new(region_bytes.into(), seal.rec.image_bytes)
        .map_err(|e| bad(e.to_string()))?;
    if u64::from(region_bytes) % sector != 0 {
        return Err(bad(format!(
            "regions of {region_bytes} bytes do not hold whole sectors of {sector} bytes"
        )));
    }
    if let Some(t) = tree {
        if t.layout() != layout {
            return Err(bad(format!(
                "it is of an image of {} bytes, this one has {}",
                t.layout().image_bytes(),
                seal.rec.image_bytes
            )));
        }
    }
    Ok(layout)
}

/// Section 4.1, steps 3 and 4.
fn begin(
    storage: &dyn Storage,
    seal: &mut SealOpened,
    identity: &MapIdentity,
    key: MapKey,
    sector: u64,
) -> Result<(Box<dyn Disk>, MovedFile, MovedMap)> {
    let image = storage.image_name();
    if seal.rec.version != RECORD_VERSION {
        // Its key is bound to its version, and the record goes back to version 4 at the end.
        return Err(ReclaimError::Job(crate::jobs::JobError::Unsupported(format!(
            "seal record {} is version {}, and an instant reclaim needs version {RECORD_VERSION}; unseal {image} with `pdguard image unseal` instead (nothing was touched)",
            storage.record_name(),
            seal.rec.version
        ))));
    }
    let store = |source| ReclaimError::Store {
        image: image.clone(),
        source,
    };
    let evacuation = storage
        .create_migration_file(MigrationFile::EvacuationCopy, seal.rec.image_bytes)
        .map_err(store)?;
    // A dense seal's sealed data is its first `D` sectors; the regions past them hold none.
    let region = u64::from(identity.layout.region_bytes());
    let sealed_regions = match &seal.dense {
        Some(d) => (d.sectors * sector).div_ceil(region),
        None => identity.layout.regions(),
    };
    let map_error = |source| ReclaimError::Map {
        image: image.clone(),
        file: storage.migration_file_name(MigrationFile::MovedMap),
        source,
    };
    let mut map = MovedMap::new(*identity, sealed_regions).map_err(map_error)?;
    let moved = MovedFile::create(storage, &mut map, key).map_err(|e| match e {
        MovedFileError::Store(s) => store(s),
        MovedFileError::Map(m) => map_error(m),
        MovedFileError::Missing => ReclaimError::Missing {
            image: image.clone(),
            file: storage.migration_file_name(MigrationFile::MovedMap),
        },
    })?;
    seal.rec.phase = Phase::Migrating;
    seal.rec.version = MIGRATING_VERSION;
    seal.rec.updated_unix = unix_now();
    let bytes = seal.rec.encode_with_mac(seal.mac_key.as_deref());
    storage.write_record(&bytes).map_err(store)?;
    Ok((evacuation, moved, map))
}

/// Section 7: the newer valid slot of **M**, and **E**.
fn resume(
    storage: &dyn Storage,
    image: &str,
    identity: &MapIdentity,
    key: MapKey,
) -> Result<(Box<dyn Disk>, MovedFile, MovedMap)> {
    let store = |source| ReclaimError::Store {
        image: image.into(),
        source,
    };
    let missing = |which| ReclaimError::Missing {
        image: image.into(),
        file: storage.migration_file_name(which),
    };
    let (moved, map) = MovedFile::load(storage, identity, key).map_err(|e| match e {
        MovedFileError::Store(s) => store(s),
        MovedFileError::Map(source) => ReclaimError::Map {
            image: image.into(),
            file: storage.migration_file_name(MigrationFile::MovedMap),
            source,
        },
        MovedFileError::Missing => missing(MigrationFile::MovedMap),
    })?;
    let evacuation = storage
        .open_migration_file(MigrationFile::EvacuationCopy)
        .map_err(store)?
        .ok_or_else(|| missing(MigrationFile::EvacuationCopy))?;
    if evacuation.len() != identity.layout.image_bytes() {
        return Err(ReclaimError::Store {
            image: image.into(),
            source: crate::store::StoreError::io(
                "use",
                storage.migration_file_name(MigrationFile::EvacuationCopy),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "it is {} bytes, the image {}",
                        evacuation.len(),
                        identity.layout.image_bytes()
                    ),
                ),
            ),
        });
    }
    Ok((evacuation, moved, map))
}
