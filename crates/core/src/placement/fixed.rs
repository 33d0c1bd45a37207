//! [`FixedPlacement`]: an explicit list of draws, so tests can replay a placement given on
//! paper, such as FIG. 2 of the patent (`N = 6`, `M = 12`, draws 5, 3, 0, 4, 2, 1).

use std::collections::BTreeMap;

use super::{Placement, PlacementError};

/// Sector `i` goes to slot `draws[i]`.
///
/// The inverse is a sorted map rather than an `M`-entry array, so a test may use a huge thin
/// disk with a handful of draws without allocating `M` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedPlacement {
    slots: u64,
    slot_of: Vec<u64>,
    sector_of: BTreeMap<u64, u64>,
}

impl FixedPlacement {
    /// The placement sending sector `i` to `draws[i]` on a thin disk of `slots` slots.
    ///
    /// # Errors
    /// [`PlacementError::Fixed`] for a draw outside `[0, slots)` or a draw that repeats an
    /// earlier one: either would break the map, and gather would lose a sector.
    pub fn new(draws: Vec<u64>, slots: u64) -> Result<Self, PlacementError> {
        let mut sector_of = BTreeMap::new();
        for (sector, &slot) in (0u64..).zip(&draws) {
            if slot >= slots {
                return Err(PlacementError::Fixed(format!(
                    "draw {slot} for sector {sector} is outside the thin disk's {slots} slots"
                )));
            }
            if let Some(earlier) = sector_of.insert(slot, sector) {
                return Err(PlacementError::Fixed(format!(
                    "draw {slot} for sector {sector} repeats the draw of sector {earlier}"
                )));
            }
        }
        Ok(Self {
            slots,
            slot_of: draws,
            sector_of,
        })
    }
}

impl Placement for FixedPlacement {
    fn sectors(&self) -> u64 {
        self.slot_of.len() as u64
    }

    fn slots(&self) -> u64 {
        self.slots
    }

    /// # Panics
    /// If `sector >= N` (a caller bug: there is no slot to name).
    fn slot_of(&self, sector: u64) -> u64 {
        let index = usize::try_from(sector).unwrap_or(usize::MAX);
        match self.slot_of.get(index) {
            Some(&slot) => slot,
            None => panic!(
                "sector {sector} is outside the disk's {} sectors",
                self.sectors()
            ),
        }
    }

    fn sector_of(&self, slot: u64) -> Option<u64> {
        self.sector_of.get(&slot).copied()
    }
}

/// Checks the whole [`Placement`] contract of `p` by brute force: `slot_of` is injective and
/// lands in `[0, M)`, `sector_of` inverts it, exactly `N` slots are used, and a slot past the
/// end is empty. Shared by the tests of every placement.
#[cfg(test)]
pub(super) fn assert_placement_contract(p: &dyn Placement) {
    let (n, m) = (p.sectors(), p.slots());
    assert!(m >= n, "M = {m} < N = {n}");
    let mut taken = vec![false; usize::try_from(m).expect("test M fits in memory")];
    for i in 0..n {
        let s = p.slot_of(i);
        assert!(s < m, "slot_of({i}) = {s} is outside [0, {m})");
        let seen = &mut taken[s as usize];
        assert!(!*seen, "slot {s} is used twice (again by sector {i})");
        *seen = true;
        assert_eq!(p.sector_of(s), Some(i), "sector_of(slot_of({i}))");
    }
    let mut used = 0u64;
    for s in 0..m {
        if let Some(i) = p.sector_of(s) {
            used += 1;
            assert!(i < n, "sector_of({s}) = {i} is outside [0, {n})");
            assert_eq!(p.slot_of(i), s, "slot_of(sector_of({s}))");
        }
    }
    assert_eq!(used, n, "number of used slots");
    assert_eq!(p.sector_of(m), None, "slot M = {m} is past the end");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// FIG. 2 of the patent: N = 6, M = 12, draws 5, 3, 0, 4, 2, 1.
    fn fig2() -> FixedPlacement {
        FixedPlacement::new(vec![5, 3, 0, 4, 2, 1], 12).unwrap()
    }

    #[test]
    fn fig2_places_x0_to_x5_at_t5_t3_t0_t4_t2_t1() {
        let p = fig2();
        assert_eq!((p.sectors(), p.slots()), (6, 12));
        let slots: Vec<u64> = (0..6).map(|i| p.slot_of(i)).collect();
        assert_eq!(slots, [5, 3, 0, 4, 2, 1]);
        assert_placement_contract(&p);
    }

    #[test]
    fn fig2_slots_t6_to_t11_are_empty() {
        let p = fig2();
        for s in 6..12 {
            assert_eq!(p.sector_of(s), None, "T{s}");
        }
    }

    #[test]
    fn fig2_gather_in_slot_order_gives_x2_x5_x4_x1_x3_x0() {
        let p = fig2();
        let gathered: Vec<u64> = (0..12).filter_map(|s| p.sector_of(s)).collect();
        assert_eq!(gathered, [2, 5, 4, 1, 3, 0]);
    }

    #[test]
    fn repeated_draw_is_refused() {
        let err = FixedPlacement::new(vec![5, 3, 5], 12).unwrap_err();
        assert_eq!(
            err,
            PlacementError::Fixed("draw 5 for sector 2 repeats the draw of sector 0".into())
        );
    }

    #[test]
    fn out_of_range_draw_is_refused() {
        let err = FixedPlacement::new(vec![0, 12], 12).unwrap_err();
        assert_eq!(
            err,
            PlacementError::Fixed(
                "draw 12 for sector 1 is outside the thin disk's 12 slots".into()
            )
        );
    }

    #[test]
    fn empty_placement_is_allowed() {
        let p = FixedPlacement::new(Vec::new(), 3).unwrap();
        assert_eq!(p.sectors(), 0);
        assert_placement_contract(&p);
    }

    #[test]
    #[should_panic(expected = "outside the disk")]
    fn slot_of_past_the_disk_panics() {
        fig2().slot_of(6);
    }
}
