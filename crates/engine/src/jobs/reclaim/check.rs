//! `image verify` of a migration nobody serves (`docs/instant-reclaim.md`, section 6):
//! every region checked against its leaf of the region digest tree from where the moved
//! map says it is — a `plain` region at its plain place, a `sealed` or `evacuated` one
//! gathered from its sealed places (the image or the evacuation copy) — and the `dirty`
//! regions, changed by their user since their move, counted and skipped. Reads only.

use pdguard_core::moved_map::RegionState;

use super::{Migration, ReclaimError, Result};
use crate::jobs::Progress;

/// What [`Migration::check_regions`] found: every region it checked matched its leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionCheck {
    /// Regions checked against their leaves.
    pub checked: u64,
    /// The moved map's counts: sealed, evacuated, plain, dirty (not checked).
    pub counts: [u64; 4],
}

impl Migration {
    /// Check every region but the `dirty` ones against its leaf, naming the first that
    /// does not match; `progress` sees pass `verify regions`. Only for a migration that
    /// nothing else serves (`image verify` holds the image's lock): it takes no region.
    pub fn check_regions(&self, progress: &dyn Progress) -> Result<RegionCheck> {
        let Some(tree) = &self.tree else {
            return Err(ReclaimError::Tree {
                image: self.image_name.clone(),
                why: "its seal recorded none (sealed by a pdguard before region trees), so its regions cannot be checked one by one".into(),
            });
        };
        progress.pass("verify regions", self.layout.image_bytes());
        let mut checked = 0;
        for r in 0..self.layout.regions() {
            let state = {
                let g = self.lock();
                self.refuse_if_failed(&g)?;
                g.map.state(r).map_err(|source| ReclaimError::Map {
                    image: self.image_name.clone(),
                    file: self.moved.name().into(),
                    source,
                })?
            };
            let range = self.range(r);
            let plain = state == RegionState::Plain;
            let buf = match state {
                RegionState::Dirty => None,
                RegionState::Plain => {
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    self.seal
                        .image
                        .read_at(&mut buf, range.start)
                        .map_err(|e| self.store_error(e))?;
                    Some(buf)
                }
                _ => self.gather(&[r])?.pop(),
            };
            if let Some(buf) = buf {
                let image = self.image_name.clone();
                tree.check_region(&self.region_keys, r, &buf)
                    .map_err(|source| match plain {
                        true => ReclaimError::RegionChanged { image, source },
                        false => ReclaimError::Region { image, source },
                    })?;
                checked += 1;
            }
            progress.advance(range.end - range.start);
        }
        Ok(RegionCheck {
            checked,
            counts: self.counts(),
        })
    }
}
