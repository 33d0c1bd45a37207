//! The placement table of a seal (`pdguard_core::place_table`, `docs/seal-record.md`):
//! written by the seal's scatter to `RECORD.place` before the record names it (as the
//! region digest tree is), read and checked by an instant reclaim's start instead of
//! replaying the patent placement's draws or passing over every slot; deleted with the
//! record and the tree.

use pdguard_core::place_table::{self, Expected, PlaceTable};
use pdguard_core::record::PlaceTableRef;
use pdguard_core::sealed_address::RankDirectory;

use super::*;

/// The read path's placement for an instant reclaim, and how it was had.
pub(crate) struct ReclaimPlacement {
    pub(crate) placement: Box<dyn Placement>,
    /// The used slots, read from the table (`None`: built from the placement when the
    /// seal has slack).
    pub(crate) rank: Option<RankDirectory>,
    /// Read from the seal's placement table (else built from the key: a seal that names
    /// no table, or one that needs none).
    pub(crate) from_table: bool,
}

/// The placement of `rec`'s seal for the read path: from `RECORD.place` when the record
/// names one (checked against the record's size and digest, and as an injection, before
/// use), else built from the key as an unseal builds it.
pub(super) fn placement_for_reclaim(
    storage: &dyn Storage,
    rec: &SealRecord,
    keys: &Keys,
    geometry: &Geometry,
) -> Result<ReclaimPlacement> {
    let Some(t) = &rec.placement_table else {
        return Ok(ReclaimPlacement {
            placement: build_placement(storage, rec, keys, geometry)?,
            rank: None,
            from_table: false,
        });
    };
    let scope = JobScope(storage);
    let name = storage.place_name();
    let image = storage.image_name();
    let digest = t.digest_bytes().ok_or_else(|| {
        scope.inconsistent("placement_table.digest is not 64 lowercase hex digits")
    })?;
    let want = Expected {
        bytes: t.bytes,
        digest,
        sectors: geometry.sectors(),
        slots: geometry.thin_sectors(),
    };
    let bytes = storage
        .read_place(t.bytes.saturating_add(1))
        .map_err(|e| scope.store(e))?;
    let fix = format!("nothing was written: restore it from a backup, or unseal {image} with `pdguard image unseal` (not instant), which rebuilds the placement from its key");
    let Some(bytes) = bytes else {
        return Err(scope.verification(format!(
            "its seal record names a placement table, but {name} is missing; {fix}"
        )));
    };
    let table = place_table::decode(bytes, &want, &keys.placement_key).map_err(|e| {
        scope.verification(format!("its placement table {name} is refused: {e}; {fix}"))
    })?;
    let patent = rec.placement_kind() == Some(PlacementKind::Patent);
    match table {
        PlaceTable::Patent(p, rank) if patent => Ok(ReclaimPlacement {
            placement: Box::new(p),
            rank,
            from_table: true,
        }),
        PlaceTable::Used(rank) if !patent => Ok(ReclaimPlacement {
            placement: build_placement(storage, rec, keys, geometry)?,
            rank: Some(rank),
            from_table: true,
        }),
        _ => Err(scope.verification(format!(
            "its placement table {name} is refused: it is not of the {} placement; {fix}",
            rec.placement
        ))),
    }
}

impl Job<'_> {
    /// After the seal's scatter, beside [`Job::record_tree`]: the placement table written
    /// (and fsynced, with its directory) to `RECORD.place` and named in the record, which
    /// is written next. Nothing for a record older than version 4 or a seal that needs no
    /// table (Feistel without slack). A crash before that record write leaves an orphan
    /// table, replaced by the next seal's scatter or removed with the record by an
    /// unseal's roll back.
    pub(super) fn record_place(&mut self) -> Result<(), StoreError> {
        if self.rec.version < RECORD_VERSION {
            return Ok(());
        }
        let patent = self.rec.placement_kind() == Some(PlacementKind::Patent);
        let bytes = place_table::encode(&*self.placement, patent, &self.keys.placement_key)
            .map_err(|e| {
                StoreError::io(
                    "write the placement table of",
                    self.image_name(),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        let Some(bytes) = bytes else {
            self.rec.placement_table = None;
            return Ok(());
        };
        self.storage.write_place(&bytes)?;
        self.rec.placement_table = Some(PlaceTableRef {
            bytes: bytes.len() as u64,
            digest: hex::encode(place_table::digest(&bytes)),
        });
        Ok(())
    }
}
