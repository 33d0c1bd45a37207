//! The region digest tree parser (`pdguard_core::region_tree`) against the byte table of
//! its module doc and docs/instant-reclaim.md: it accepts exactly the files the table
//! allows (with the geometry the header names and the root computed here from the leaves
//! by the documented formula, written out with `blake3` alone), reads every leaf from its
//! offset, refuses any other root, and whatever parses encodes back to the same bytes.
//!
//! Input: one mode byte, then
//! - mode 0: the bytes of a tree file;
//! - mode 1: bytes 16.. of a file: the check writes the magic and the trailing checksum,
//!   so that the fuzzer reaches the fields behind it;
//! - mode 2: as 1, and the check also writes the region count the sizes imply and cuts or
//!   pads the leaves to it (when at most [`MAX_LEAVES`]), so that valid trees are common.

use pdguard_core::region_tree::{
    RegionKeys, RegionLayout, RegionTree, RegionTreeError, MAX_REGION_BYTES, MIN_REGION_BYTES,
    TREE_MAGIC,
};

const HEAD: usize = 36;
const SUM: usize = 32;
/// Most leaves mode 2 pads to (a run stays fast).
const MAX_LEAVES: u64 = 1024;
/// The key material of the trees the check reads (a secure seal's digest key).
const KEY: [u8; 32] = [0x6b; 32];

pub fn check(data: &[u8]) {
    let (mode, rest) = super::split_mode(data);
    match mode % 3 {
        0 => file(rest),
        1 => file(&framed(rest.to_vec())),
        _ => {
            let mut body = rest.to_vec();
            body.resize(body.len().max(HEAD - 16), 0);
            let mut b = TREE_MAGIC.to_vec();
            b.extend_from_slice(&body);
            let (region, image) = (le(&b[16..20]), le(&b[20..28]));
            if region != 0 {
                let regions = image.div_ceil(region);
                if regions <= MAX_LEAVES {
                    b[28..36].copy_from_slice(&regions.to_le_bytes());
                    b.resize(HEAD + 32 * regions as usize, 0);
                }
            }
            file(&framed(b[16..].to_vec()))
        }
    }
}

/// Magic, then `fields`, then the BLAKE3 of both.
fn framed(fields: Vec<u8>) -> Vec<u8> {
    let mut b = TREE_MAGIC.to_vec();
    b.extend_from_slice(&fields);
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x))
}

/// The root of the documented formula, from `blake3` alone.
fn reference_root(region: u64, image: u64, leaves: &[u8]) -> [u8; 32] {
    let root_key = blake3::derive_key("pdguard 2026-12 region tree root v1", &KEY);
    let mut h = blake3::Hasher::new_keyed(&root_key);
    h.update(&(region as u32).to_le_bytes());
    h.update(&image.to_le_bytes());
    h.update(leaves);
    h.finalize().into()
}

fn file(b: &[u8]) {
    let keys = RegionKeys::new(Some(&KEY));
    let long = b.len() >= HEAD + SUM;
    let magic = b.starts_with(TREE_MAGIC);
    let (region, image, regions) = if long {
        (le(&b[16..20]), le(&b[20..28]), le(&b[28..36]))
    } else {
        (0, 0, 0)
    };
    let sized = region.is_power_of_two()
        && (u64::from(MIN_REGION_BYTES)..=u64::from(MAX_REGION_BYTES)).contains(&region);
    let leaves = if long {
        &b[HEAD..b.len() - SUM]
    } else {
        &[][..]
    };
    let valid = long
        && magic
        && blake3::hash(&b[..b.len() - SUM]).as_bytes()[..] == b[b.len() - SUM..]
        && sized
        && regions == image.div_ceil(region.max(1))
        && leaves.len() as u64 == regions.saturating_mul(32);
    // The geometry the record would name: the header's when it is one, else any.
    let layout = RegionLayout::new(region, image)
        .or_else(|_| RegionLayout::new(u64::from(MIN_REGION_BYTES), image));
    let layout = match layout {
        Ok(l) => l,
        Err(e) => panic!("a 4 KiB region layout refused: {e}"),
    };
    let root = reference_root(region, image, leaves);
    let got = RegionTree::parse(b, &layout, &keys, &root);
    let tree = match got {
        Err(e) => {
            assert!(!valid, "a valid tree refused: {e}");
            if long && !magic {
                assert_eq!(e, RegionTreeError::NotATree);
            }
            return;
        }
        Ok(t) => t,
    };
    assert!(valid, "a tree accepted against the table");
    assert_eq!(tree.layout(), layout);
    assert_eq!(tree.leaves().len() as u64, regions);
    for (k, leaf) in tree.leaves().iter().enumerate() {
        assert_eq!(leaf[..], leaves[32 * k..32 * k + 32], "leaf {k}");
    }
    assert_eq!(tree.root(&keys), root);
    assert_eq!(tree.encode(), b, "encode of parse");
    let mut other = root;
    other[0] ^= 1;
    assert_eq!(
        RegionTree::parse(b, &layout, &keys, &other),
        Err(RegionTreeError::NotAuthentic)
    );
}
