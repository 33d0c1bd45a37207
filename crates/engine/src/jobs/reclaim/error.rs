//! Errors of an instant reclaim's migration. Each names the image, the cause and the fix.

use pdguard_core::moved_map::MapError;
use pdguard_core::region_tree::RegionTreeError;
use thiserror::Error;

use crate::jobs::JobError;
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum ReclaimError {
    /// The seal could not be opened (record, keys, image), as an unseal would refuse it.
    #[error(transparent)]
    Job(#[from] JobError),

    #[error("the reclaim of {image} stopped; no data is lost (every region is at the place its moved map names): start the reclaim again to resume it")]
    Store {
        image: String,
        #[source]
        source: StoreError,
    },

    #[error("moved map {file} of {image} cannot be used; restore it from a backup (without it the migration cannot tell which regions were moved)")]
    Map {
        image: String,
        file: String,
        #[source]
        source: MapError,
    },

    #[error("{file} of {image} is missing, but the seal record says phase migrating; restore it from a backup to the same path (nothing was touched)")]
    Missing { image: String, file: String },

    #[error("the region digest tree given for {image} does not fit it: {why}; pass the tree of this seal")]
    Tree { image: String, why: String },

    #[error("{image}: {source}: the sealed image or the evacuation copy was corrupted or tampered with; the region stays sealed, intact for a forensic copy, and nothing of it was served")]
    Region {
        image: String,
        #[source]
        source: RegionTreeError,
    },

    #[error("{image}: {source}: the region was checked when it was moved to its plain place, and something other than the reclaim changed it since (its user's writes would have marked it dirty)")]
    RegionChanged {
        image: String,
        #[source]
        source: RegionTreeError,
    },

    #[error("the reclaim of {image} refuses every request after an earlier failure ({first}); repair the cause and start the reclaim again")]
    Failed { image: String, first: String },

    #[error("a request of {len} bytes at byte {offset} reaches past the end of {image} ({size} bytes); ask within the disk")]
    OutOfRange {
        image: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("{image} failed verification at the end of its reclaim: no region was written by its user, yet its plaintext digest is {have}, not the seal's {want}; the record stays in phase migrating")]
    Verification {
        image: String,
        want: String,
        have: String,
    },

    #[error("{image} is not being reclaimed (its seal record says phase {phase}, not migrating), so there is no migration to resume; unseal it with `pdguard image unseal {image}` (nothing was touched)")]
    NotMigrating { image: String, phase: &'static str },

    #[error("the reclaim of {image} is not done: {left} regions are not moved yet; run its steps until it is complete")]
    NotComplete { image: String, left: u64 },
}

impl ReclaimError {
    /// True for a failed integrity check (exit code 3 in the CLI contract): a region that
    /// does not match its leaf, the end's digest, or a tree or seal refused as such.
    pub fn is_verification(&self) -> bool {
        match self {
            Self::Region { .. } | Self::RegionChanged { .. } | Self::Verification { .. } => true,
            Self::Job(e) => e.is_verification(),
            _ => false,
        }
    }
}

pub type Result<T, E = ReclaimError> = std::result::Result<T, E>;
