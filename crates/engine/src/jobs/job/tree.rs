//! The region digest tree of a seal (`docs/instant-reclaim.md`, section 6): made by the
//! seal's scatter beside the plaintext digest and written to `RECORD.tree` before the
//! record names it; loaded and checked against the record's root by a job that gathers
//! the plaintext, which then checks every region against its leaf; and `verify` with the
//! key checks the sealed image region by region.

use pdguard_core::sealed_address::SealedAddress;

use super::*;

impl Job<'_> {
    /// The tree's keys: from the plaintext digest's key material (none in the patent
    /// profile).
    fn region_keys(&self) -> RegionKeys {
        RegionKeys::new(self.keys.digest_key.as_deref())
    }

    /// A region hasher cut as `layout`, fed in the original image's coordinates by a
    /// plain pass (which, with dense placement, sees the compacted image).
    fn tap(&self, layout: RegionLayout) -> RegionTap {
        let extents = self.dense.as_ref().map(|d| d.extents.clone());
        RegionTap::new(layout, self.region_keys(), extents)
    }

    /// The region hasher of a new seal's scatter; none for a record older than version 4
    /// (resumed by this pdguard, it keeps its version and gains no field).
    pub(super) fn new_tree_tap(&self) -> Option<RegionTap> {
        if self.rec.version < RECORD_VERSION {
            return None;
        }
        let layout = RegionLayout::new(REGION_BYTES.into(), self.rec.image_bytes).ok()?;
        Some(self.tap(layout))
    }

    /// After the seal's scatter: the tree written (and fsynced, with its directory) to
    /// `RECORD.tree` and named in the record, which is written next (phase `seal-gather`).
    /// A crash before that record write leaves an orphan tree, replaced by the next
    /// seal's scatter or removed with the record by an unseal's roll back.
    pub(super) fn record_tree(&mut self, tap: RegionTap) -> Result<(), StoreError> {
        let Some((tree, root)) = tap.finish() else {
            return Err(StoreError::io(
                "hash the regions of",
                self.image_name(),
                std::io::Error::other(
                    "the scatter did not feed the region hasher the whole image (a bug of pdguard)",
                ),
            ));
        };
        self.storage.write_tree(&tree.encode())?;
        let layout = tree.layout();
        self.rec.region_tree = Some(RegionTreeRef {
            region_bytes: layout.region_bytes().into(),
            regions: layout.regions(),
            root: hex::encode(root),
        });
        Ok(())
    }

    /// Load `RECORD.tree` when the record names one and check it against the record's
    /// root (the record's MAC covers the root in the secure profile). Refused before
    /// anything is written: a missing, torn, edited or swapped tree.
    pub(super) fn load_tree(&mut self) -> Result<()> {
        self.tree = checked_tree(self.storage, &self.rec, &self.region_keys())?;
        Ok(())
    }

    /// The region hasher of an unseal's gather, when a tree was loaded.
    pub(super) fn check_tap(&self) -> Option<RegionTap> {
        self.tree.as_ref().map(|t| self.tap(t.layout()))
    }

    /// After a gather fed `tap`: the first region whose plaintext does not give the
    /// seal's leaf, as a message; `None` when every region matches (or no tree).
    pub(super) fn bad_region(&self, tap: Option<RegionTap>) -> Option<String> {
        let tree = self.tree.as_ref()?;
        let layout = tree.layout();
        let leaves = tap.and_then(RegionTap::finish).map(|(t, _)| t);
        let first_bad = match &leaves {
            None => 0,
            Some(got) => {
                let pairs = tree.leaves().iter().zip(got.leaves());
                let differs = pairs.take_while(|(a, b)| a == b).count() as u64;
                if differs == layout.regions() {
                    return None;
                }
                differs
            }
        };
        let range = layout.range(first_bad).ok()?;
        let e = pdguard_core::region_tree::RegionTreeError::Mismatch {
            region: first_bad,
            start: range.start,
            end: range.end,
        };
        Some(format!(
            "{e}: the sealed image was corrupted or tampered with after sealing"
        ))
    }

    /// `verify` with the key (or in the patent profile): every region of the plaintext,
    /// decrypted from its sealed places, checked against its leaf; names the first bad one.
    pub(super) fn check_sealed_regions(&self) -> Result<()> {
        let Some(tree) = &self.tree else {
            return Ok(());
        };
        let keys = self.region_keys();
        let s = u64::from(self.rec.sector_size);
        let addr = SealedAddress::new(
            &*self.placement,
            self.dense.as_ref().map(|d| &d.ranges),
            self.rec.sectors,
            s,
        );
        let layout = tree.layout();
        let ctx = self.ctx();
        let mut buf = vec![0u8; layout.region_bytes() as usize];
        self.progress.pass("verify regions", self.rec.image_bytes);
        for r in 0..layout.regions() {
            let range = layout
                .range(r)
                .map_err(|e| self.scope().inconsistent(e.to_string()))?;
            let bytes = &mut buf[..(range.end - range.start) as usize];
            for (k, sector) in bytes.chunks_mut(s as usize).enumerate() {
                match addr.locate(range.start / s + k as u64) {
                    None => sector.fill(0),
                    Some(at) => {
                        self.image
                            .read_at(sector, at.sealed_sector * s)
                            .map_err(|e| self.scope().store(e))?;
                        ctx.decrypt(at.slot, sector);
                    }
                }
            }
            if let Err(e) = tree.check_region(&keys, r, bytes) {
                return Err(self.scope().verification(format!(
                    "{e}: the sealed image was corrupted or tampered with after sealing"
                )));
            }
            self.progress.advance(range.end - range.start);
        }
        Ok(())
    }
}

/// `RECORD.tree` when `rec` names one, checked against the record's root (the record's
/// MAC covers the root in the secure profile); `None` when it names none. Refused: a
/// missing, torn, edited or swapped tree.
pub(super) fn checked_tree(
    storage: &dyn Storage,
    rec: &SealRecord,
    keys: &RegionKeys,
) -> Result<Option<RegionTree>> {
    let Some(t) = &rec.region_tree else {
        return Ok(None);
    };
    let scope = JobScope(storage);
    let layout = RegionLayout::new(t.region_bytes, rec.image_bytes)
        .map_err(|e| scope.inconsistent(format!("region_tree: {e}")))?;
    let root = t
        .root_bytes()
        .ok_or_else(|| scope.inconsistent("region_tree.root is not 64 lowercase hex digits"))?;
    let name = storage.tree_name();
    let limit = RegionTree::file_bytes(&layout)
        .ok_or_else(|| scope.inconsistent("region_tree: too many regions"))?
        .saturating_add(1);
    let bytes = storage.read_tree(limit).map_err(|e| scope.store(e))?;
    let Some(bytes) = bytes else {
        return Err(scope.verification(format!("its seal record names a region digest tree, but {name} is missing; nothing was written: restore that file from a backup (or the record without its tree: then only the whole image is checked)")));
    };
    let tree = RegionTree::parse(&bytes, &layout, keys, &root).map_err(|e| {
        scope.verification(format!("its region digest tree {name} is refused: {e}; nothing was written: restore that file from a backup"))
    })?;
    Ok(Some(tree))
}
