#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

const R: u64 = 4096;

fn layout(image_bytes: u64) -> RegionLayout {
    RegionLayout::new(R, image_bytes).unwrap()
}

/// The tree of `image`, fed in one piece.
fn tree_of(image: &[u8], key: Option<&[u8; 32]>) -> (RegionTree, [u8; 32]) {
    let mut h = RegionHasher::new(layout(image.len() as u64), RegionKeys::new(key));
    h.update(image);
    h.finish().unwrap()
}

/// The documented formulas, written out literally with `blake3` alone.
fn literal_tree(image: &[u8], key: Option<&[u8; 32]>, region_bytes: usize) -> Vec<[u8; 32]> {
    let material: &[u8] = key.map_or(&[], |k| k.as_slice());
    let leaf_key = blake3::derive_key("pdguard 2026-12 region tree leaf v1", material);
    image
        .chunks(region_bytes)
        .enumerate()
        .map(|(r, bytes)| {
            let mut msg = Vec::new();
            msg.extend_from_slice(&(r as u64).to_le_bytes());
            msg.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            if bytes.iter().all(|&b| b == 0) {
                msg.push(0);
            } else {
                msg.push(1);
                msg.extend_from_slice(bytes);
            }
            blake3::keyed_hash(&leaf_key, &msg).into()
        })
        .collect()
}

fn literal_root(leaves: &[[u8; 32]], key: Option<&[u8; 32]>, image_bytes: u64) -> [u8; 32] {
    let material: &[u8] = key.map_or(&[], |k| k.as_slice());
    let root_key = blake3::derive_key("pdguard 2026-12 region tree root v1", material);
    let mut msg = (R as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&image_bytes.to_le_bytes());
    for l in leaves {
        msg.extend_from_slice(l);
    }
    blake3::keyed_hash(&root_key, &msg).into()
}

/// An image of `regions` regions plus `tail` bytes, with a zero region, a region holding
/// one byte, and bytes everywhere else.
fn sample(tail: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..(3 * R as usize + tail))
        .map(|o| ((o as u64 * 2654435761) >> 13) as u8 | 1)
        .collect();
    v[..R as usize].fill(0);
    v[R as usize..2 * R as usize].fill(0);
    v[R as usize + 17] = 9;
    v
}

#[test]
fn leaves_and_root_are_the_documented_formulas() {
    for key in [None, Some(&[7u8; 32])] {
        for tail in [0, 1, 100] {
            let image = sample(tail);
            let (tree, root) = tree_of(&image, key);
            let literal = literal_tree(&image, key, R as usize);
            assert_eq!(tree.leaves(), literal.as_slice(), "tail {tail}");
            assert_eq!(root, literal_root(&literal, key, image.len() as u64));
            assert_eq!(tree.leaves().len(), 3 + usize::from(tail > 0));
        }
    }
}

#[test]
fn equal_regions_have_different_leaves_and_the_key_hides_zero_regions() {
    let image = vec![0u8; 2 * R as usize];
    let (plain, _) = tree_of(&image, None);
    assert_ne!(plain.leaves()[0], plain.leaves()[1]);
    let (keyed, _) = tree_of(&image, Some(&[1; 32]));
    // Without the key, nobody can compute a keyed zero leaf to compare with.
    assert_ne!(keyed.leaves()[0], plain.leaves()[0]);
    let (other_key, _) = tree_of(&image, Some(&[2; 32]));
    assert_ne!(keyed.leaves()[0], other_key.leaves()[0]);
}

#[test]
fn a_hasher_given_too_few_or_too_many_bytes_refuses_to_finish() {
    let l = layout(3 * R);
    let mut h = RegionHasher::new(l, RegionKeys::new(None));
    h.update(&[1; 100]);
    assert_eq!(
        h.finish().unwrap_err(),
        RegionTreeError::Fed {
            fed: 100,
            expected: 3 * R
        }
    );
    let mut h = RegionHasher::new(l, RegionKeys::new(None));
    h.update_zeros(3 * R);
    h.update(&[1]);
    assert_eq!(
        h.finish().unwrap_err(),
        RegionTreeError::Fed {
            fed: 3 * R + 1,
            expected: 3 * R
        }
    );
}

#[test]
fn an_empty_image_has_no_leaves() {
    let (tree, root) = tree_of(&[], None);
    assert!(tree.leaves().is_empty());
    assert_eq!(root, literal_root(&[], None, 0));
}

#[test]
fn region_sizes_are_bounded_powers_of_two() {
    for bad in [0, 1, 2048, 4095, 4097, 3 << 20, 1 << 31, u64::MAX] {
        assert_eq!(
            RegionLayout::new(bad, 1 << 20),
            Err(RegionTreeError::RegionSize(bad))
        );
    }
    for good in [4096, 1 << 20, 1 << 30] {
        assert!(RegionLayout::new(good, 1).is_ok());
    }
}

#[test]
fn the_last_region_is_short_and_regions_past_the_image_do_not_exist() {
    let l = layout(2 * R + 5);
    assert_eq!(l.regions(), 3);
    assert_eq!(l.range(2).unwrap(), 2 * R..2 * R + 5);
    assert_eq!(
        l.range(3),
        Err(RegionTreeError::OutOfRange {
            region: 3,
            regions: 3
        })
    );
    assert_eq!(l.region_of(2 * R + 4), Some(2));
    assert_eq!(l.region_of(2 * R + 5), None);
    let huge = RegionLayout::new(1 << 30, u64::MAX).unwrap();
    assert_eq!(huge.range(huge.regions() - 1).unwrap().end, u64::MAX);
}

#[test]
fn check_region_names_the_region_and_refuses_a_wrong_length() {
    let image = sample(10);
    let keys = RegionKeys::new(None);
    let (tree, _) = tree_of(&image, None);
    let r2 = &image[2 * R as usize..3 * R as usize];
    tree.check_region(&keys, 2, r2).unwrap();
    let err = tree.check_region(&keys, 1, r2).unwrap_err();
    assert_eq!(
        err,
        RegionTreeError::Mismatch {
            region: 1,
            start: R,
            end: 2 * R
        }
    );
    assert_eq!(
        err.to_string(),
        "region 1 (bytes 4096..8192) does not match the seal's digest tree"
    );
    assert!(tree.check_region(&keys, 2, &r2[1..]).is_err());
    assert!(tree
        .check_region(&keys, 3, &image[3 * R as usize..])
        .is_ok());
    assert!(matches!(
        tree.check_region(&keys, 4, &[]),
        Err(RegionTreeError::OutOfRange { .. })
    ));
    // The wrong key fails every region.
    let other = RegionKeys::new(Some(&[3; 32]));
    assert!(tree.check_region(&other, 2, r2).is_err());
}

#[test]
fn parse_refuses_every_malformed_file() {
    let image = sample(10);
    let keys = RegionKeys::new(None);
    let (tree, root) = tree_of(&image, None);
    let l = tree.layout();
    let file = tree.encode();
    assert_eq!(file.len() as u64, RegionTree::file_bytes(&l).unwrap());
    assert_eq!(RegionTree::parse(&file, &l, &keys, &root).unwrap(), tree);

    // Every truncation.
    for cut in 0..file.len() {
        assert!(
            RegionTree::parse(&file[..cut], &l, &keys, &root).is_err(),
            "cut {cut}"
        );
    }
    // Every flipped byte.
    for at in 0..file.len() {
        let mut f = file.clone();
        f[at] ^= 0x40;
        let err = RegionTree::parse(&f, &l, &keys, &root).unwrap_err();
        let want = if at < 16 {
            RegionTreeError::NotATree
        } else {
            RegionTreeError::Corrupt("its checksum does not match")
        };
        assert_eq!(err, want, "byte {at}");
    }
    // Another root, key or geometry.
    assert_eq!(
        RegionTree::parse(&file, &l, &keys, &[0; 32]),
        Err(RegionTreeError::NotAuthentic)
    );
    assert_eq!(
        RegionTree::parse(&file, &l, &RegionKeys::new(Some(&[1; 32])), &root),
        Err(RegionTreeError::NotAuthentic)
    );
    let other = RegionLayout::new(R, l.image_bytes() + 1).unwrap();
    assert!(matches!(
        RegionTree::parse(&file, &other, &keys, &root),
        Err(RegionTreeError::Inconsistent(_))
    ));
}

/// A file whose checksum is right but whose header lies.
fn rechecksummed(mut body: Vec<u8>) -> Vec<u8> {
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    body
}

#[test]
fn parse_refuses_a_header_that_lies_under_a_valid_checksum() {
    let image = sample(0);
    let keys = RegionKeys::new(None);
    let (tree, root) = tree_of(&image, None);
    let l = tree.layout();
    let file = tree.encode();
    let body = file[..file.len() - 32].to_vec();

    let mut count = body.clone();
    count[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        RegionTree::parse(&rechecksummed(count), &l, &keys, &root),
        Err(RegionTreeError::Corrupt(
            "its region count does not match its sizes"
        ))
    );
    let mut short = body.clone();
    short.truncate(body.len() - 32);
    assert_eq!(
        RegionTree::parse(&rechecksummed(short), &l, &keys, &root),
        Err(RegionTreeError::Corrupt(
            "its length does not match its region count"
        ))
    );
    let mut size = body;
    size[16..20].copy_from_slice(&3000u32.to_le_bytes());
    assert!(matches!(
        RegionTree::parse(&rechecksummed(size), &l, &keys, &root),
        Err(RegionTreeError::Inconsistent(m)) if m.contains("3000")
    ));
}

/// An image of up to 9 regions and a tail, with runs of zeros, cut into pieces.
fn arb_image() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    (0usize..9 * R as usize + 300)
        .prop_flat_map(|len| {
            (
                proptest::collection::vec((0..len.max(1), 0..2 * R as usize, any::<u8>()), 0..6),
                proptest::collection::vec(0..len + 1, 0..12),
                Just(len),
            )
        })
        .prop_map(|(runs, mut cuts, len)| {
            let mut image = vec![0u8; len];
            for (start, run, byte) in runs {
                let end = (start + run).min(len);
                image[start..end].fill(byte);
            }
            cuts.sort_unstable();
            (image, cuts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Fed in any pieces, zeros given as zeros or as holes, the tree is the same.
    #[test]
    fn the_tree_does_not_depend_on_how_the_image_is_fed((image, cuts) in arb_image()) {
        let key = Some(&[5u8; 32]);
        let (whole, root) = tree_of(&image, key);
        let mut h = RegionHasher::new(layout(image.len() as u64), RegionKeys::new(key));
        let mut at = 0;
        for cut in cuts.into_iter().chain(std::iter::once(image.len())) {
            let piece = &image[at..cut];
            if !piece.is_empty() && piece.iter().all(|&b| b == 0) && cut % 2 == 0 {
                h.update_zeros(piece.len() as u64);
            } else {
                h.update(piece);
            }
            at = cut;
        }
        let (fed, fed_root) = h.finish().unwrap();
        prop_assert_eq!(&fed, &whole);
        prop_assert_eq!(fed_root, root);
        let literal = literal_tree(&image, key, R as usize);
        prop_assert_eq!(whole.leaves(), literal.as_slice());
    }

    #[test]
    fn a_tree_round_trips_through_its_file((image, _) in arb_image(), keyed in any::<bool>()) {
        let key = keyed.then_some(&[9u8; 32]);
        let (tree, root) = tree_of(&image, key);
        let keys = RegionKeys::new(key);
        let back = RegionTree::parse(&tree.encode(), &tree.layout(), &keys, &root).unwrap();
        prop_assert_eq!(back, tree);
    }

    /// Any one changed byte fails its own region, and only that one.
    #[test]
    fn one_changed_byte_fails_its_region_only(
        (image, _) in arb_image(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        prop_assume!(!image.is_empty());
        let keys = RegionKeys::new(None);
        let (tree, _) = tree_of(&image, None);
        let mut changed = image.clone();
        let at = at.index(image.len());
        changed[at] ^= xor;
        let bad = at as u64 / R;
        for (r, bytes) in changed.chunks(R as usize).enumerate() {
            let result = tree.check_region(&keys, r as u64, bytes);
            if r as u64 == bad {
                prop_assert!(result.is_err(), "region {} passed with byte {} changed", r, at);
            } else {
                prop_assert!(result.is_ok(), "region {} failed, byte {} is in {}", r, at, bad);
            }
        }
    }
}
