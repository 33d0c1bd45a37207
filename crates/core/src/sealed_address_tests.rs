#![allow(clippy::unwrap_used)]

use super::*;
use crate::placement::{FeistelPlacement, FixedPlacement, PatentPlacement};
use proptest::prelude::*;

/// The sealed gather, literally: the used slots in ascending order; sealed sector `j`
/// holds the placed sector in slot `u_j`.
fn gathered(p: &dyn Placement) -> Vec<(u64, u64)> {
    (0..p.slots())
        .filter_map(|s| p.sector_of(s).map(|c| (c, s)))
        .collect()
}

/// For every placed sector `c`: (sealed sector, slot), from the gather.
fn by_gather(p: &dyn Placement) -> Vec<Located> {
    let mut out = vec![
        Located {
            sealed_sector: u64::MAX,
            slot: u64::MAX
        };
        p.sectors() as usize
    ];
    for (j, (c, s)) in gathered(p).into_iter().enumerate() {
        out[c as usize] = Located {
            sealed_sector: j as u64,
            slot: s,
        };
    }
    out
}

#[test]
fn fig2_of_the_patent_reads_x2_x5_x4_x1_x3_x0_back_in_order() {
    // N = 6, M = 12, draws 5, 3, 0, 4, 2, 1: the sealed image holds X2, X5, X4, X1, X3, X0.
    let p = FixedPlacement::new(vec![5, 3, 0, 4, 2, 1], 12).unwrap();
    let a = SealedAddress::new(&p, None, 6, 512);
    let sealed: Vec<u64> = (0..6).map(|i| a.locate(i).unwrap().sealed_sector).collect();
    // X0 is sealed sector 5, X1 sector 3, ...: the inverse of 2, 5, 4, 1, 3, 0.
    assert_eq!(sealed, [5, 3, 0, 4, 2, 1]);
    assert_eq!(a.locate(6), None);
}

#[test]
fn slack_makes_the_sealed_sector_the_rank_of_the_slot() {
    // Slots 1, 4, 7, 8 used of 10: sealed sectors 0..4 hold the sectors of slots 1, 4, 7, 8.
    let p = FixedPlacement::new(vec![7, 1, 8, 4], 10).unwrap();
    let a = SealedAddress::new(&p, None, 4, 512);
    let got: Vec<(u64, u64)> = (0..4)
        .map(|i| {
            let l = a.locate(i).unwrap();
            (l.sealed_sector, l.slot)
        })
        .collect();
    assert_eq!(got, [(2, 7), (0, 1), (3, 8), (1, 4)]);
    assert!(a.bytes() > 0, "a rank directory is kept with slack");
}

#[test]
fn without_slack_nothing_is_kept() {
    let p = FeistelPlacement::new(&[3; 32], 5000, 5000).unwrap();
    let a = SealedAddress::new(&p, None, 5000, 512);
    assert_eq!(a.bytes(), 0);
    for (c, want) in by_gather(&p).into_iter().enumerate() {
        assert_eq!(a.locate(c as u64), Some(want));
    }
}

#[test]
fn a_dense_seal_maps_through_the_compacted_image_and_holes_have_no_place() {
    // Data at sectors 2..4 and 9..10 of 12 (bytes rounded out to sectors): D = 3.
    let ranges = DataRanges::new(vec![1100..2000, 4608..5000], 12 * 512).unwrap();
    let p = FixedPlacement::new(vec![2, 0, 1], 3).unwrap();
    let a = SealedAddress::new(&p, Some(&ranges), 12, 512);
    let got: Vec<Option<u64>> = (0..12)
        .map(|i| a.locate(i).map(|l| l.sealed_sector))
        .collect();
    let mut want = vec![None; 12];
    want[2] = Some(2);
    want[3] = Some(0);
    want[9] = Some(1);
    assert_eq!(got, want);
}

#[test]
fn rank_at_the_end_counts_every_used_slot() {
    for m in [1u64, 63, 64, 65, 511, 512, 513, 1024, 1500] {
        let n = m / 2 + 1;
        let p = PatentPlacement::new(&m.to_le_bytes(), n.min(m), m).unwrap();
        let r = RankDirectory::build(&p);
        assert_eq!(r.rank(m), n.min(m), "M = {m}");
        assert_eq!(r.rank(0), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every sector is found where the sealed gather put it, for both placements, with
    /// and without slack.
    #[test]
    fn every_sector_is_where_the_gather_put_it(
        n in 0u64..3000,
        slack in prop::sample::select(vec![0u64, 1, 10, 100, 300]),
        key in any::<[u8; 8]>(),
        patent in any::<bool>(),
    ) {
        let m = n + (n * slack).div_ceil(100);
        let p: Box<dyn Placement> = if patent {
            Box::new(PatentPlacement::new(&key, n, m).unwrap())
        } else {
            Box::new(FeistelPlacement::new(&key, n, m).unwrap())
        };
        let a = SealedAddress::new(&*p, None, n, 4096);
        for (c, want) in by_gather(&*p).into_iter().enumerate() {
            prop_assert_eq!(a.locate(c as u64), Some(want), "sector {}", c);
        }
        prop_assert_eq!(a.locate(n), None);
    }

    /// The rank directory counts the used slots below any slot, up to `M`.
    #[test]
    fn rank_is_the_count_of_used_slots_below(m in 1u64..2100, frac in 0u64..=100, key in any::<[u8; 8]>()) {
        let n = m * frac / 100;
        let p = FeistelPlacement::new(&key, n, m).unwrap();
        let r = RankDirectory::build(&p);
        let mut used = 0;
        for s in 0..=m {
            prop_assert_eq!(r.rank(s), used, "slot {}", s);
            if s < m && p.sector_of(s).is_some() {
                used += 1;
            }
        }
    }

    /// Dense: sector `i` of a data extent is compacted sector `c`, sealed where the gather
    /// put `c`; a sector in a hole has no sealed place.
    #[test]
    fn dense_sectors_are_found_through_the_compacted_image(
        gaps in proptest::collection::vec((0u64..6, 1u64..6), 1..8),
        key in any::<[u8; 8]>(),
    ) {
        let mut ranges = Vec::new();
        let mut at = 0u64;
        for (k, (gap, len)) in gaps.into_iter().enumerate() {
            let start = at + gap + u64::from(k > 0);
            ranges.push(start * 512..(start + len) * 512);
            at = start + len;
        }
        let image_sectors = at + 3;
        let map = DataRanges::new(ranges.clone(), image_sectors * 512).unwrap();
        let compacted: Vec<u64> = ranges.iter().flat_map(|r| r.start / 512..r.end / 512).collect();
        let d = compacted.len() as u64;
        let p = FeistelPlacement::new(&key, d, d + d / 3).unwrap();
        let a = SealedAddress::new(&p, Some(&map), image_sectors, 512);
        let at_gather = by_gather(&p);
        for i in 0..image_sectors {
            let want = compacted.iter().position(|&s| s == i).map(|c| at_gather[c]);
            prop_assert_eq!(a.locate(i), want, "sector {}", i);
        }
    }
}
