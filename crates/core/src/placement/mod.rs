//! Placement: the injective map `pi: [0, N) -> [0, M)` that sends sector `i` of the disk to
//! slot `pi(i)` of the thin disk (claim 2: "writing the each read data onto the thin disk at
//! an offset sector location of the thin disk determined as the random number").
//!
//! Three implementations share the [`Placement`] trait:
//! - [`PatentPlacement`]: the patent's literal method, a seeded PRNG drawing in `[0, M)`;
//!   a number already drawn is skipped and the next draw taken ([039]).
//! - [`FeistelPlacement`]: a keyed pseudo-random permutation of `[0, 2^k)` (Feistel network)
//!   with cycle-walking into `[0, M)`; O(1) memory, each index and its inverse computable alone.
//! - [`FixedPlacement`]: an explicit list of draws, for tests (FIG. 2: 5, 3, 0, 4, 2, 1).

mod feistel;
mod fixed;
mod patent;

pub use feistel::FeistelPlacement;
pub use fixed::FixedPlacement;
pub use patent::PatentPlacement;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("thin disk of {slots} slots is smaller than the disk's {sectors} sectors")]
    Range { sectors: u64, slots: u64 },
    #[error("the patent placement supports at most 2^32 - 1 thin-disk slots, not {0}; use --placement feistel")]
    TooManySlots(u64),
    #[error("fixed placement is not injective or leaves the range: {0}")]
    Fixed(String),
}

/// Which placement a seal uses; stored in the seal record by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlacementKind {
    Patent,
    Feistel,
}

impl PlacementKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Patent => "patent",
            Self::Feistel => "feistel",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "patent" => Some(Self::Patent),
            "feistel" => Some(Self::Feistel),
            _ => None,
        }
    }
}

/// An injective map from disk sectors `[0, N)` to thin-disk slots `[0, M)`.
pub trait Placement: Send + Sync {
    /// `N`: sectors of the disk (the domain).
    fn sectors(&self) -> u64;
    /// `M`: slots of the thin disk (the range), `M >= N`.
    fn slots(&self) -> u64;
    /// `pi(i)`: the thin-disk slot of disk sector `sector` (`sector < N`).
    fn slot_of(&self, sector: u64) -> u64;
    /// `pi^-1(s)`: the disk sector stored in thin-disk slot `slot`, or `None` for an empty
    /// slot (`slot < M`). Gather skips empty slots ([045]) by this map, never by looking at
    /// the bytes: a sector of zeros is data too.
    fn sector_of(&self, slot: u64) -> Option<u64>;
    /// `out[k] = pi(first + k)`, for `first + out.len() <= N`. The same values as
    /// [`slot_of`](Self::slot_of); a placement may compute many at once, faster.
    fn slots_of(&self, first: u64, out: &mut [u64]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.slot_of(first + k as u64);
        }
    }
    /// `out[k] = pi^-1(first + k)`, or [`EMPTY`] for an empty slot, for
    /// `first + out.len() <= M`. The same values as [`sector_of`](Self::sector_of).
    fn sectors_of(&self, first: u64, out: &mut [u64]) {
        for (k, o) in out.iter_mut().enumerate() {
            *o = self.sector_of(first + k as u64).unwrap_or(EMPTY);
        }
    }
}

/// An empty slot in [`Placement::sectors_of`].
pub const EMPTY: u64 = u64::MAX;

/// Build the placement `kind` for `sectors` -> `slots`, keyed by `key` (for `patent`, the
/// [040] seed or a keyed hash of it; for `feistel`, a 32-byte key derived from the same).
pub fn build(
    kind: PlacementKind,
    key: &[u8],
    sectors: u64,
    slots: u64,
) -> Result<Box<dyn Placement>, PlacementError> {
    Ok(match kind {
        PlacementKind::Patent => Box::new(PatentPlacement::new(key, sectors, slots)?),
        PlacementKind::Feistel => Box::new(FeistelPlacement::new(key, sectors, slots)?),
    })
}
