//! The region digest tree: one digest (leaf) per fixed-size region of the plaintext image,
//! made at seal time, and a root over them, so that an instant reclaim can check each
//! region the first time it is read or moved (`docs/instant-reclaim.md`, section 6).
//!
//! With `K` the digest key material of `plain_digest` (the secure profile's plaintext
//! digest key; empty in the patent profile):
//! - `leaf_key = BLAKE3-derive_key("pdguard 2026-12 region tree leaf v1", K)`,
//!   `root_key = BLAKE3-derive_key("pdguard 2026-12 region tree root v1", K)`;
//! - leaf of region `r` of `l` bytes: `BLAKE3-keyed(leaf_key, r u64 LE ‖ l u64 LE ‖ 0x00)`
//!   when every byte is zero (computed without reading a hole), else
//!   `BLAKE3-keyed(leaf_key, r u64 LE ‖ l u64 LE ‖ 0x01 ‖ bytes)`;
//! - root: `BLAKE3-keyed(root_key, region_bytes u32 LE ‖ image_bytes u64 LE ‖ leaves)`.
//!
//! The file `RECORD.tree` (integers little-endian):
//!
//! | bytes        | content                                                   |
//! |--------------|-----------------------------------------------------------|
//! | 0..16        | magic `PDGUARD-REGIONS1` (the 1 is the format version)    |
//! | 16..20       | `region_bytes`, u32: a power of two, 4 KiB to 1 GiB       |
//! | 20..28       | `image_bytes`, u64                                        |
//! | 28..36       | `regions`, u64: `ceil(image_bytes / region_bytes)`        |
//! | 36..36+32n   | the leaves, in order                                      |
//! | end-32..end  | checksum: BLAKE3 of every byte before it                  |
//!
//! The checksum catches a torn or damaged file; the root, recomputed and compared with the
//! record's, authenticates the leaves. Pure: no I/O.

use std::ops::Range;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::digest::is_zero;

/// Region size of new seals: 1 MiB.
pub const REGION_BYTES: u32 = 1 << 20;
/// Smallest region size a tree or moved map may name.
pub const MIN_REGION_BYTES: u32 = 4 << 10;
/// Largest region size a tree or moved map may name.
pub const MAX_REGION_BYTES: u32 = 1 << 30;
/// First 16 bytes of a tree file.
pub const TREE_MAGIC: &[u8; 16] = b"PDGUARD-REGIONS1";
/// Suffix of the tree beside its record: `disk.img.pdguard` -> `disk.img.pdguard.tree`.
pub const TREE_SUFFIX: &str = ".tree";
/// Bytes of a leaf, and of the root.
pub const LEAF_BYTES: usize = 32;

const LEAF_CONTEXT: &str = "pdguard 2026-12 region tree leaf v1";
const ROOT_CONTEXT: &str = "pdguard 2026-12 region tree root v1";
const HEAD: usize = 36;
const SUM: usize = 32;
const TAG_ZEROS: u8 = 0;
const TAG_DATA: u8 = 1;
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RegionTreeError {
    #[error("region size {0} is not a power of two from 4096 to 2^30 bytes")]
    RegionSize(u64),
    #[error("the region hasher was given {fed} bytes for an image of {expected} bytes")]
    Fed { fed: u64, expected: u64 },
    #[error("it is not a pdguard region digest tree (no PDGUARD-REGIONS1 magic)")]
    NotATree,
    #[error("it is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("it does not belong to this seal: {0}")]
    Inconsistent(String),
    #[error("its leaves do not give the seal record's root (edited, or from another seal's tree)")]
    NotAuthentic,
    #[error("there is no region {region}: the image has {regions}")]
    OutOfRange { region: u64, regions: u64 },
    #[error("region {region} (bytes {start}..{end}) does not match the seal's digest tree")]
    Mismatch { region: u64, start: u64, end: u64 },
}

/// How an image is cut into regions: region `r` is bytes `[r R, min((r+1) R, B))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    region_bytes: u32,
    image_bytes: u64,
}

impl RegionLayout {
    /// # Errors
    /// [`RegionTreeError::RegionSize`] unless `region_bytes` is a power of two in
    /// [`MIN_REGION_BYTES`]`..=`[`MAX_REGION_BYTES`].
    pub fn new(region_bytes: u64, image_bytes: u64) -> Result<Self, RegionTreeError> {
        let ok = region_bytes.is_power_of_two()
            && (u64::from(MIN_REGION_BYTES)..=u64::from(MAX_REGION_BYTES)).contains(&region_bytes);
        match u32::try_from(region_bytes) {
            Ok(region_bytes) if ok => Ok(Self {
                region_bytes,
                image_bytes,
            }),
            _ => Err(RegionTreeError::RegionSize(region_bytes)),
        }
    }

    pub fn region_bytes(&self) -> u32 {
        self.region_bytes
    }

    pub fn image_bytes(&self) -> u64 {
        self.image_bytes
    }

    /// `ceil(image_bytes / region_bytes)`.
    pub fn regions(&self) -> u64 {
        self.image_bytes.div_ceil(u64::from(self.region_bytes))
    }

    /// The bytes of region `region`.
    pub fn range(&self, region: u64) -> Result<Range<u64>, RegionTreeError> {
        let regions = self.regions();
        if region >= regions {
            return Err(RegionTreeError::OutOfRange { region, regions });
        }
        // `region < regions` so `region * R <= image_bytes - 1`: no overflow.
        let start = region.saturating_mul(u64::from(self.region_bytes));
        let end = start
            .saturating_add(u64::from(self.region_bytes))
            .min(self.image_bytes);
        Ok(start..end)
    }

    /// The region holding byte `offset`, if it is inside the image.
    pub fn region_of(&self, offset: u64) -> Option<u64> {
        (offset < self.image_bytes).then(|| offset / u64::from(self.region_bytes))
    }
}

/// The leaf and root keys of a tree, wiped when dropped.
pub struct RegionKeys {
    leaf: Zeroizing<[u8; 32]>,
    root: Zeroizing<[u8; 32]>,
}

impl RegionKeys {
    /// From the digest key material `K` (the secure profile's plaintext digest key, or
    /// nothing in the patent profile).
    pub fn new(material: Option<&[u8; 32]>) -> Self {
        let material: &[u8] = material.map_or(&[], |k| k.as_slice());
        Self {
            leaf: Zeroizing::new(blake3::derive_key(LEAF_CONTEXT, material)),
            root: Zeroizing::new(blake3::derive_key(ROOT_CONTEXT, material)),
        }
    }

    fn leaf_hasher(&self, region: u64, len: u64, tag: u8) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.leaf);
        h.update(&region.to_le_bytes());
        h.update(&len.to_le_bytes());
        h.update(&[tag]);
        h
    }

    /// The leaf of region `region` holding `bytes`.
    pub fn leaf(&self, region: u64, bytes: &[u8]) -> [u8; 32] {
        let len = bytes.len() as u64;
        if is_zero(bytes) {
            return self.zero_leaf(region, len);
        }
        let mut h = self.leaf_hasher(region, len, TAG_DATA);
        h.update(bytes);
        h.finalize().into()
    }

    /// The leaf of region `region` of `len` bytes that are all zeros (a hole).
    pub fn zero_leaf(&self, region: u64, len: u64) -> [u8; 32] {
        self.leaf_hasher(region, len, TAG_ZEROS).finalize().into()
    }

    fn root(&self, layout: &RegionLayout, leaves: &[[u8; 32]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.root);
        h.update(&layout.region_bytes.to_le_bytes());
        h.update(&layout.image_bytes.to_le_bytes());
        for leaf in leaves {
            h.update(leaf);
        }
        h.finalize().into()
    }
}

/// Builds a [`RegionTree`] from the plaintext image fed in order, in pieces of any size,
/// data or known zeros (as [`crate::digest::ImageHasher`] is fed).
pub struct RegionHasher {
    layout: RegionLayout,
    keys: RegionKeys,
    leaves: Vec<[u8; 32]>,
    /// The current region's hasher, once it has seen a byte that is not zero.
    data: Option<blake3::Hasher>,
    /// Zeros seen at the start of the current region and not yet hashed.
    zeros: u64,
    /// Bytes of the current region seen so far.
    filled: u64,
    /// Bytes seen in all (may pass `image_bytes`: [`Self::finish`] refuses it).
    total: u64,
}

impl RegionHasher {
    pub fn new(layout: RegionLayout, keys: RegionKeys) -> Self {
        Self {
            layout,
            keys,
            leaves: Vec::new(),
            data: None,
            zeros: 0,
            filled: 0,
            total: 0,
        }
    }

    fn region_len(&self) -> u64 {
        let r = self.leaves.len() as u64;
        self.layout.range(r).map_or(0, |x| x.end - x.start)
    }

    /// The next `bytes` of the image.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.region_len() - self.filled;
            if room == 0 {
                // Past the image: counted, not hashed.
                self.total += bytes.len() as u64;
                return;
            }
            let n = usize::try_from(room).map_or(bytes.len(), |r| r.min(bytes.len()));
            let (piece, rest) = bytes.split_at(n);
            if self.data.is_none() && is_zero(piece) {
                self.zeros += n as u64;
            } else {
                self.start_data().update(piece);
            }
            self.advance(n as u64);
            bytes = rest;
        }
    }

    /// The next `len` bytes of the image are zeros (a hole): hashed without a buffer, and
    /// not at all while the region has seen nothing else.
    pub fn update_zeros(&mut self, mut len: u64) {
        while len > 0 {
            let room = self.region_len() - self.filled;
            if room == 0 {
                self.total += len;
                return;
            }
            let n = room.min(len);
            match &mut self.data {
                None => self.zeros += n,
                Some(h) => feed_zeros(h, n),
            }
            self.advance(n);
            len -= n;
        }
    }

    /// The current region's hasher, started (with its leading zeros) if it was not.
    fn start_data(&mut self) -> &mut blake3::Hasher {
        let (region, len, zeros) = (self.leaves.len() as u64, self.region_len(), self.zeros);
        self.zeros = 0;
        self.data.get_or_insert_with(|| {
            let mut h = self.keys.leaf_hasher(region, len, TAG_DATA);
            feed_zeros(&mut h, zeros);
            h
        })
    }

    fn advance(&mut self, n: u64) {
        self.filled += n;
        self.total += n;
        let len = self.region_len();
        if self.filled == len {
            let region = self.leaves.len() as u64;
            let leaf = match self.data.take() {
                Some(h) => h.finalize().into(),
                None => self.keys.zero_leaf(region, len),
            };
            self.leaves.push(leaf);
            self.zeros = 0;
            self.filled = 0;
        }
    }

    /// The tree and its root, once exactly `image_bytes` bytes were fed.
    ///
    /// # Errors
    /// [`RegionTreeError::Fed`] if more or fewer bytes were fed.
    pub fn finish(self) -> Result<(RegionTree, [u8; 32]), RegionTreeError> {
        if self.total != self.layout.image_bytes {
            return Err(RegionTreeError::Fed {
                fed: self.total,
                expected: self.layout.image_bytes,
            });
        }
        let tree = RegionTree {
            layout: self.layout,
            leaves: self.leaves,
        };
        let root = tree.root(&self.keys);
        Ok((tree, root))
    }
}

fn feed_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64);
        h.update(&ZEROS[..k as usize]);
        n -= k;
    }
}

/// The leaves of every region of an image, as recorded at seal time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTree {
    layout: RegionLayout,
    leaves: Vec<[u8; 32]>,
}

impl RegionTree {
    pub fn layout(&self) -> RegionLayout {
        self.layout
    }

    pub fn leaves(&self) -> &[[u8; 32]] {
        &self.leaves
    }

    /// The root, as the record keeps it.
    pub fn root(&self, keys: &RegionKeys) -> [u8; 32] {
        keys.root(&self.layout, &self.leaves)
    }

    /// Check region `region`, holding `bytes` (its whole length), against its leaf.
    ///
    /// # Errors
    /// [`RegionTreeError::OutOfRange`] for a region past the image;
    /// [`RegionTreeError::Mismatch`] (naming the region and its bytes) if `bytes` is not
    /// the region's length or does not give its leaf.
    pub fn check_region(
        &self,
        keys: &RegionKeys,
        region: u64,
        bytes: &[u8],
    ) -> Result<(), RegionTreeError> {
        let range = self.layout.range(region)?;
        let mismatch = || RegionTreeError::Mismatch {
            region,
            start: range.start,
            end: range.end,
        };
        let expected = usize::try_from(region)
            .ok()
            .and_then(|r| self.leaves.get(r))
            .ok_or_else(mismatch)?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(mismatch());
        }
        if keys.leaf(region, bytes) != *expected {
            return Err(mismatch());
        }
        Ok(())
    }

    /// The file `RECORD.tree`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + LEAF_BYTES * self.leaves.len() + SUM);
        out.extend_from_slice(TREE_MAGIC);
        out.extend_from_slice(&self.layout.region_bytes.to_le_bytes());
        out.extend_from_slice(&self.layout.image_bytes.to_le_bytes());
        out.extend_from_slice(&(self.leaves.len() as u64).to_le_bytes());
        for leaf in &self.leaves {
            out.extend_from_slice(leaf);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// The bytes of the tree of `layout`: what a reader may expect before reading.
    pub fn file_bytes(layout: &RegionLayout) -> Option<u64> {
        let leaves = layout.regions().checked_mul(LEAF_BYTES as u64)?;
        leaves.checked_add((HEAD + SUM) as u64)
    }

    /// Parse `bytes`, the tree of the seal whose record names `expected` (region size and
    /// image size) and `root`; every bound is checked before a leaf is read.
    ///
    /// # Errors
    /// [`RegionTreeError::NotATree`], [`RegionTreeError::Corrupt`] (length, checksum),
    /// [`RegionTreeError::Inconsistent`] (another geometry), [`RegionTreeError::NotAuthentic`]
    /// (the leaves do not give `root`).
    pub fn parse(
        bytes: &[u8],
        expected: &RegionLayout,
        keys: &RegionKeys,
        root: &[u8; 32],
    ) -> Result<Self, RegionTreeError> {
        if bytes.len() < HEAD + SUM {
            return Err(RegionTreeError::Corrupt("it is shorter than its header"));
        }
        if bytes.get(..16) != Some(TREE_MAGIC.as_slice()) {
            return Err(RegionTreeError::NotATree);
        }
        let (body, sum) = bytes.split_at(bytes.len() - SUM);
        if blake3::hash(body).as_bytes().as_slice() != sum {
            return Err(RegionTreeError::Corrupt("its checksum does not match"));
        }
        let region_bytes = u64::from(le_u32(body, 16));
        let image_bytes = le_u64(body, 20);
        let regions = le_u64(body, 28);
        let layout = RegionLayout::new(region_bytes, image_bytes)
            .map_err(|e| RegionTreeError::Inconsistent(e.to_string()))?;
        if layout != *expected {
            return Err(RegionTreeError::Inconsistent(format!(
                "it is of {image_bytes} bytes in regions of {region_bytes}, the record says {} in regions of {}",
                expected.image_bytes, expected.region_bytes
            )));
        }
        if regions != layout.regions() {
            return Err(RegionTreeError::Corrupt(
                "its region count does not match its sizes",
            ));
        }
        let leaves_bytes = &body[HEAD..];
        if Some(leaves_bytes.len() as u64) != regions.checked_mul(LEAF_BYTES as u64) {
            return Err(RegionTreeError::Corrupt(
                "its length does not match its region count",
            ));
        }
        let leaves: Vec<[u8; 32]> = leaves_bytes
            .chunks_exact(LEAF_BYTES)
            .map(|c| {
                let mut leaf = [0u8; 32];
                leaf.copy_from_slice(c);
                leaf
            })
            .collect();
        let tree = Self { layout, leaves };
        if tree.root(keys) != *root {
            return Err(RegionTreeError::NotAuthentic);
        }
        Ok(tree)
    }
}

/// Little-endian u32 at `at`; the caller has checked `at + 4 <= bytes.len()`.
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Little-endian u64 at `at`; the caller has checked `at + 8 <= bytes.len()`.
pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
#[path = "region_tree_tests.rs"]
mod tests;
