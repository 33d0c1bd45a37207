//! Where a plaintext sector is in a sealed image: the read path of an instant reclaim
//! (`docs/instant-reclaim.md`, section 5) and the gather of a move.
//!
//! The sealed gather writes the used thin-disk slots `u_0 < u_1 < ...` in ascending order,
//! so sealed sector `j` holds slot `u_j`, and plaintext sector `i` (index `c` of the
//! compacted image with dense placement, else `c = i`) is at sealed sector
//! `sigma(i) = rank(pi(c))`, the number of used slots below `pi(c)`, encrypted with the
//! tweak `pi(c)`.
//!
//! - Without slack (`M` = the placed sectors, the default) every slot is used and `rank` is
//!   the identity: nothing is kept, and the Feistel placement computes `pi` alone, so the
//!   read path is ready at once at any size.
//! - With slack, a [`RankDirectory`]: one bit per slot (used or not) and the count of used
//!   slots before every 512, `M/8 + M/64` bytes, built by one pass of `pi^-1` over the
//!   slots.
//! - The patent placement computes `pi` only by replaying its draws ([039]); its table is
//!   built when the placement is (`4 (N + M)` bytes).
//!
//! Both are written at seal time to the seal's placement table (`place_table.rs`), which a
//! migration's start reads instead of replaying the draws or passing over the slots
//! ([`SealedAddress::owning_with_rank`]); a seal without one (older) builds them.
//!
//! A dense seal's sectors in the original's holes have no sealed place: they are zeros.

use std::ops::Range;

use crate::dense::DataRanges;
use crate::placement::{Placement, EMPTY};

/// Slots per count of a [`RankDirectory`] (8 words of 64 bits).
const BLOCK_SLOTS: u64 = 512;

/// The used slots of a placement, for `rank` in O(1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankDirectory {
    /// Bit `s % 64` of word `s / 64`: slot `s` is used.
    bits: Vec<u64>,
    /// `before[b]`: used slots below slot `b * 512`.
    before: Vec<u64>,
}

impl RankDirectory {
    /// One pass of `pi^-1` over the slots of `placement`, in batches.
    pub fn build(placement: &dyn Placement) -> Self {
        let m = placement.slots();
        let words = usize::try_from(m.div_ceil(64)).unwrap_or(usize::MAX);
        let mut bits = vec![0u64; words];
        let mut batch = vec![0u64; 1 << 12];
        let mut first = 0u64;
        while first < m {
            let n = (m - first).min(batch.len() as u64) as usize;
            placement.sectors_of(first, &mut batch[..n]);
            for (k, &sector) in batch[..n].iter().enumerate() {
                if sector != EMPTY {
                    let s = first + k as u64;
                    bits[(s / 64) as usize] |= 1 << (s % 64);
                }
            }
            first += n as u64;
        }
        Self::from_words(bits)
    }

    /// The directory of a used-slot bitmap (bit `s % 64` of word `s / 64`), its counts
    /// rebuilt in `O(M / 64)`. The caller checked the bitmap (`place_table.rs`).
    pub fn from_words(bits: Vec<u64>) -> Self {
        let mut before = Vec::with_capacity(bits.len().div_ceil(8));
        let mut used = 0u64;
        for block in bits.chunks(8) {
            before.push(used);
            used += block.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        Self { bits, before }
    }

    /// The used-slot bitmap, one bit per slot.
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Used slots below `slot` (`slot <= M`).
    pub fn rank(&self, slot: u64) -> u64 {
        let block = (slot / BLOCK_SLOTS) as usize;
        let mut r = self
            .before
            .get(block)
            .copied()
            .unwrap_or_else(|| self.total());
        let first_word = block * 8;
        let word = (slot / 64) as usize;
        for w in self.bits.iter().take(word).skip(first_word) {
            r += u64::from(w.count_ones());
        }
        if let Some(w) = self.bits.get(word) {
            let below = (1u64 << (slot % 64)) - 1;
            r += u64::from((w & below).count_ones());
        }
        r
    }

    fn total(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        8 * (self.bits.len() + self.before.len()) as u64
    }
}

/// Where one plaintext sector is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// `sigma(i)`: the sealed sector (of the image, or of the evacuation copy at the same
    /// offset) that holds it.
    pub sealed_sector: u64,
    /// `pi(c)`: its thin-disk slot, the tweak of its encryption.
    pub slot: u64,
}

/// A placement borrowed (a pass, a test) or owned (a migration that keeps its map for its
/// whole life).
enum PlacementRef<'a> {
    Borrowed(&'a dyn Placement),
    Owned(Box<dyn Placement>),
}

impl PlacementRef<'_> {
    fn get(&self) -> &dyn Placement {
        match self {
            Self::Borrowed(p) => *p,
            Self::Owned(p) => &**p,
        }
    }
}

/// The read path's map from plaintext sectors to sealed sectors.
pub struct SealedAddress<'a> {
    placement: PlacementRef<'a>,
    /// `None` when every slot is used (no slack): `rank` is the identity.
    rank: Option<RankDirectory>,
    /// Dense placement: the original's data extents in sectors, and the compacted index
    /// of each one's first sector.
    dense: Option<Vec<(Range<u64>, u64)>>,
    image_sectors: u64,
}

impl<'a> SealedAddress<'a> {
    /// For an image of `image_sectors` sectors of `sector_size` bytes sealed with
    /// `placement` (of the compacted image's `D` sectors when `dense` gives the original's
    /// data map).
    pub fn new(
        placement: &'a dyn Placement,
        dense: Option<&DataRanges>,
        image_sectors: u64,
        sector_size: u64,
    ) -> Self {
        Self::build(
            PlacementRef::Borrowed(placement),
            None,
            dense,
            image_sectors,
            sector_size,
        )
    }

    /// [`Self::new`], keeping `placement`.
    pub fn owning(
        placement: Box<dyn Placement>,
        dense: Option<&DataRanges>,
        image_sectors: u64,
        sector_size: u64,
    ) -> SealedAddress<'static> {
        SealedAddress::owning_with_rank(placement, None, dense, image_sectors, sector_size)
    }

    /// [`Self::owning`] with the rank directory already made (read from the seal's
    /// placement table, `place_table.rs`) when `rank` is given: nothing is built but the
    /// dense extents. `rank` must be of `placement`'s used slots, and is ignored when the
    /// placement has no slack.
    pub fn owning_with_rank(
        placement: Box<dyn Placement>,
        rank: Option<RankDirectory>,
        dense: Option<&DataRanges>,
        image_sectors: u64,
        sector_size: u64,
    ) -> SealedAddress<'static> {
        SealedAddress::build(
            PlacementRef::Owned(placement),
            rank,
            dense,
            image_sectors,
            sector_size,
        )
    }

    fn build(
        placement: PlacementRef<'a>,
        rank: Option<RankDirectory>,
        dense: Option<&DataRanges>,
        image_sectors: u64,
        sector_size: u64,
    ) -> Self {
        let rank = {
            let placement = placement.get();
            (placement.slots() != placement.sectors())
                .then(|| rank.unwrap_or_else(|| RankDirectory::build(placement)))
        };
        let dense = dense.map(|d| {
            let mut at = 0u64;
            d.sector_extents(sector_size)
                .into_iter()
                .map(|bytes| {
                    let sectors = bytes.start / sector_size..bytes.end / sector_size;
                    let first = at;
                    at += sectors.end - sectors.start;
                    (sectors, first)
                })
                .collect()
        });
        Self {
            placement,
            rank,
            dense,
            image_sectors,
        }
    }

    /// Bytes held besides the placement (the rank directory and the dense extents).
    pub fn bytes(&self) -> u64 {
        self.rank.as_ref().map_or(0, RankDirectory::bytes)
            + self.dense.as_ref().map_or(0, |d| 24 * d.len() as u64)
    }

    /// The placement `pi` (of the compacted image with dense placement).
    pub fn placement(&self) -> &dyn Placement {
        self.placement.get()
    }

    /// Where plaintext sector `sector` is sealed; `None` for a sector past the image, or in
    /// a hole of a dense seal's original (zeros, with no sealed place).
    pub fn locate(&self, sector: u64) -> Option<Located> {
        if sector >= self.image_sectors {
            return None;
        }
        let c = match &self.dense {
            None => sector,
            Some(extents) => {
                let k = extents.partition_point(|(r, _)| r.end <= sector);
                let (r, first) = extents.get(k)?;
                if !r.contains(&sector) {
                    return None;
                }
                first + (sector - r.start)
            }
        };
        let placement = self.placement.get();
        if c >= placement.sectors() {
            return None;
        }
        let slot = placement.slot_of(c);
        let sealed_sector = self.rank.as_ref().map_or(slot, |r| r.rank(slot));
        Some(Located {
            sealed_sector,
            slot,
        })
    }
}

#[cfg(test)]
#[path = "sealed_address_tests.rs"]
mod tests;
