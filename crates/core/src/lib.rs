//! pdguard-core: the pure part of pdguard — no I/O, no threads, no clocks.
//!
//! Geometry, the patent's seed ([040]), placements ([038]-[039]), the seal record format
//! and the sector maps of the seal and unseal passes; for instant reclaim (designed in
//! `docs/instant-reclaim.md`), the region digest tree, the region states and moved map, and
//! the read path's sealed addresses. Everything that touches a file lives in
//! `pdguard-engine`.

pub mod cipher;
pub mod dense;
pub mod digest;
pub mod geometry;
pub mod keys;
pub mod keyslot;
pub mod moved_map;
pub mod place_table;
pub mod placement;
pub mod region_tree;
pub mod sealed_address;
pub mod seed;

pub use geometry::{Geometry, GeometryError};
pub use placement::{Placement, PlacementError, PlacementKind};
pub mod record;

pub use record::{Phase, Profile, RecordError, SealRecord};

/// Sectors sampled for a sealed image's fingerprint: up to 8, spread evenly, first and last
/// included. Cheap to read; enough to tell one image from another before an unseal.
pub fn fingerprint_sectors(sectors: u64) -> Vec<u64> {
    if sectors == 0 {
        return Vec::new();
    }
    let mut v: Vec<u64> = (0..8u64).map(|k| k * (sectors - 1) / 7).collect();
    v.dedup();
    v
}
