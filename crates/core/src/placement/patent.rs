//! [`PatentPlacement`]: the patent's literal placement.
//!
//! [039]: a pseudo-random number generator, seeded by the [040] seed, draws numbers in the
//! range of the thin disk's sectors; a number already drawn is skipped and the next one
//! taken, so the `k`-th accepted draw is the thin-disk slot of disk sector `k`. Claim 3:
//! "the random number is generated ... using the seed ... within the range of the number of
//! sectors of the thin disk".
//!
//! The map cannot be inverted without replaying every draw, so both directions are kept:
//! `slot_of` (`4 N` bytes) from the draw, `sector_of` (`4 M` bytes) inverted from it when
//! first asked for (a `window` seal that keeps `pi` between its passes never asks).

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::sync::mpsc::{channel, sync_channel};
use std::sync::OnceLock;

use super::{Placement, PlacementError};

/// Domain separation of the PRNG seed: the caller's key is never used as a ChaCha key as is.
const CONTEXT: &str = "pdguard 2026-11 patent placement v1";

/// Draws per block passed from the drawing thread to the keeping one (see
/// [`PatentPlacement::draw`]), and blocks drawn ahead.
const DRAW_BLOCK: usize = 1 << 14;
const DRAW_BLOCKS_AHEAD: usize = 4;

/// Marks an empty slot in the inverse map. No sector can be `u32::MAX` because sectors are
/// below `N <= M <= MAX_SLOTS = u32::MAX`.
const EMPTY: u32 = u32::MAX;

/// Largest thin disk: slots `0..M` and sectors `0..N` must fit in a `u32` next to [`EMPTY`],
/// i.e. be at most `u32::MAX - 1`, so `M <= u32::MAX` (2^32 - 1, as the error message says).
const MAX_SLOTS: u64 = u32::MAX as u64;

/// The placement of [039]: sector `k` goes to the `k`-th distinct draw of a seeded PRNG.
#[derive(Clone)]
pub struct PatentPlacement {
    /// `slot_of[i]`: the slot of sector `i`; `N` entries.
    slot_of: Vec<u32>,
    /// `M`.
    slots: usize,
    /// `sector_of[s]`: the sector in slot `s`, or [`EMPTY`]; `M` entries, inverted from
    /// `slot_of` on first use. A seal whose passes keep `slot_of` between them never asks;
    /// the inversion's random stores cost about as much as the draw itself.
    sector_of: OnceLock<Vec<u32>>,
}

impl PartialEq for PatentPlacement {
    /// `sector_of` follows from `slot_of` and `M`.
    fn eq(&self, other: &Self) -> bool {
        self.slots == other.slots && self.slot_of == other.slot_of
    }
}

impl Eq for PatentPlacement {}

impl PatentPlacement {
    /// Draws the placement of `sectors` disk sectors onto `slots` thin-disk slots, seeding
    /// ChaCha20 with `blake3::derive_key(CONTEXT, key)`.
    ///
    /// # Errors
    /// [`PlacementError::Range`] if `slots < sectors` (no injection exists);
    /// [`PlacementError::TooManySlots`] if `slots > 2^32 - 1` (the maps store `u32`; the
    /// Feistel placement has no such limit).
    pub fn new(key: &[u8], sectors: u64, slots: u64) -> Result<Self, PlacementError> {
        if slots < sectors {
            return Err(PlacementError::Range { sectors, slots });
        }
        let too_many = || PlacementError::TooManySlots(slots);
        if slots > MAX_SLOTS {
            return Err(too_many());
        }
        // Only fails on a 16-bit target, where no such map fits in memory anyway.
        let m = usize::try_from(slots).map_err(|_| too_many())?;
        let n = usize::try_from(sectors).map_err(|_| too_many())?;
        Ok(Self::draw(key, n, m))
    }

    /// The draw-and-skip of [039] for `n <= m <= u32::MAX` (checked by [`Self::new`]).
    ///
    /// Two threads: one draws (ChaCha20 and the reduction, most of the cost), the other
    /// skips repeats and keeps the rest, taking the draws in their order in blocks of
    /// [`DRAW_BLOCK`]; the map is the one a single thread would draw. The drawing thread
    /// may run a few blocks ahead; those draws are discarded.
    fn draw(key: &[u8], n: usize, m: usize) -> Self {
        let rng = ChaCha20Rng::from_seed(blake3::derive_key(CONTEXT, key));
        let mut draws = UniformBelow::new(rng, m as u64);
        let mut slot_of = Vec::with_capacity(n);
        // The "already drawn" set of [039]. At M / 8 bytes the bitmap stays in cache
        // through the coupon-collector tail, where most draws are repeats.
        let mut seen = Bitmap::new(m);
        if n > 0 {
            let (tx, rx) = sync_channel::<Vec<u32>>(DRAW_BLOCKS_AHEAD);
            let (back_tx, back_rx) = channel::<Vec<u32>>();
            std::thread::scope(|sc| {
                sc.spawn(move || loop {
                    let mut block = back_rx
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(DRAW_BLOCK));
                    block.clear();
                    // `m <= u32::MAX`: every draw fits in a `u32`.
                    block.extend((0..DRAW_BLOCK).map(|_| draws.next() as u32));
                    if tx.send(block).is_err() {
                        break; // every sector has its slot
                    }
                });
                'all: for block in rx {
                    for &slot in &block {
                        if seen.insert(slot as usize) {
                            slot_of.push(slot);
                            if slot_of.len() == n {
                                break 'all;
                            }
                        }
                    }
                    let _ = back_tx.send(block);
                }
                // The loop took `rx` and dropped it: the drawing thread stops.
            });
        }
        // Draws are endless, so only a panic of the drawing thread leaves sectors without
        // a slot; `scope` re-raises it above.
        debug_assert_eq!(slot_of.len(), n);
        Self {
            slot_of,
            slots: m,
            sector_of: OnceLock::new(),
        }
    }

    /// The placement whose `slot_of` table is `slot_of` (`RECORD.place`), onto `slots`
    /// slots: an injection into `[0, slots)`, `slots <= u32::MAX`, which the caller has
    /// checked (`place_table::decode`). Its inverse is built on first use, as for a drawn one.
    pub(crate) fn from_table(slot_of: Vec<u32>, slots: usize) -> Self {
        Self {
            slot_of,
            slots,
            sector_of: OnceLock::new(),
        }
    }

    /// The inverse map, built on first use.
    fn inverse(&self) -> &[u32] {
        self.sector_of.get_or_init(|| {
            let mut sector_of = vec![EMPTY; self.slots];
            // Its random stores are the cost: two threads, each storing into its half of
            // the slots (and reading all of `slot_of`, which is sequential and cheap).
            let (low, high) = sector_of.split_at_mut(self.slots / 2);
            let fill = |part: &mut [u32], first: usize| {
                // `n <= m <= u32::MAX`: sectors fit in a `u32`.
                for (sector, &slot) in self.slot_of.iter().enumerate() {
                    if let Some(s) = (slot as usize)
                        .checked_sub(first)
                        .and_then(|k| part.get_mut(k))
                    {
                        *s = sector as u32;
                    }
                }
            };
            let half = low.len();
            std::thread::scope(|sc| {
                sc.spawn(|| fill(low, 0));
                fill(high, half);
            });
            sector_of
        })
    }
}

impl Placement for PatentPlacement {
    fn sectors(&self) -> u64 {
        self.slot_of.len() as u64
    }

    fn slots(&self) -> u64 {
        self.slots as u64
    }

    /// # Panics
    /// If `sector >= N` (a caller bug: there is no slot to name).
    fn slot_of(&self, sector: u64) -> u64 {
        let index = usize::try_from(sector).unwrap_or(usize::MAX);
        match self.slot_of.get(index) {
            Some(&slot) => slot.into(),
            None => panic!(
                "sector {sector} is outside the disk's {} sectors",
                self.sectors()
            ),
        }
    }

    fn sector_of(&self, slot: u64) -> Option<u64> {
        let index = usize::try_from(slot).ok()?;
        match self.inverse().get(index) {
            Some(&sector) if sector != EMPTY => Some(sector.into()),
            _ => None,
        }
    }
}

/// Hand-written: millions of map entries are useless in a log; the shape is what matters.
impl std::fmt::Debug for PatentPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatentPlacement")
            .field("sectors", &self.sectors())
            .field("slots", &self.slots())
            .finish_non_exhaustive()
    }
}

/// Unbiased uniform draws in `[0, range)` from ChaCha20's `next_u64`, written by hand so that
/// the placement is value-stable: it depends only on ChaCha20 and this code, not on how some
/// version of `rand` samples a range.
///
/// Scheme: Lemire's multiply-and-reject ("Fast random integer generation in an interval",
/// ACM TOMACS 2019). For a 64-bit `v`, the 128-bit product `v * range` has high half
/// `floor(v * range / 2^64)` in `[0, range)`. Each output value is hit by either
/// `floor(2^64 / range)` or one more `v`; rejecting the products whose low half is below
/// `threshold = 2^64 mod range` removes exactly the surplus, leaving `floor(2^64 / range)`
/// values of `v` per output. A draw is rejected with probability below `range / 2^64` (never
/// when `range` is a power of two), and costs one multiplication, no division.
///
/// ChaCha20 itself comes from `rand_chacha`, whose stream for a given seed is fixed by the
/// ChaCha20 specification; the regression vectors below would catch a change.
struct UniformBelow {
    rng: ChaCha20Rng,
    range: u64,
    threshold: u64,
}

impl UniformBelow {
    /// A `range` of 0 (an empty thin disk) is accepted, but then [`Self::next`] must not be
    /// called; nothing is drawn for an empty disk.
    fn new(rng: ChaCha20Rng, range: u64) -> Self {
        // (2^64 - range) mod range == 2^64 mod range, computed in 64 bits.
        let threshold = range.wrapping_neg().checked_rem(range).unwrap_or(0);
        Self {
            rng,
            range,
            threshold,
        }
    }

    fn next(&mut self) -> u64 {
        loop {
            let product = u128::from(self.rng.next_u64()) * u128::from(self.range);
            // Truncation is the point: the low and high 64-bit halves of the product.
            if product as u64 >= self.threshold {
                return (product >> 64) as u64;
            }
        }
    }
}

/// A set of `[0, len)` as one bit per element.
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }

    /// Adds `i`; true if it was not there yet.
    fn insert(&mut self, i: usize) -> bool {
        let (word, bit) = (&mut self.0[i / 64], 1u64 << (i % 64));
        let new = *word & bit == 0;
        *word |= bit;
        new
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::fixed::assert_placement_contract;
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"patent placement test key";

    fn map(p: &PatentPlacement) -> Vec<u64> {
        (0..p.sectors()).map(|i| p.slot_of(i)).collect()
    }

    #[test]
    fn contract_holds_for_many_shapes() {
        let shapes = [
            (0, 0),
            (0, 5),
            (1, 1),
            (1, 12),
            (2, 2),
            (2, 12),
            (3, 3),
            (3, 12),
            (6, 12),
            (1000, 1000),
            (1000, 1500),
            (100_000, 100_000),
            (100_000, 110_000),
        ];
        for (n, m) in shapes {
            let p = PatentPlacement::new(KEY, n, m).unwrap();
            assert_eq!((p.sectors(), p.slots()), (n, m));
            assert_placement_contract(&p);
        }
    }

    /// N = M = 8: with eight slots the PRNG repeats itself long before the last sector, so
    /// the map is a permutation only if repeated draws are really skipped.
    #[test]
    fn repeated_draws_are_skipped() {
        let p = PatentPlacement::new(KEY, 8, 8).unwrap();
        let mut slots = map(&p);
        slots.sort_unstable();
        assert_eq!(slots, (0..8).collect::<Vec<_>>());

        // And the draws did repeat: count them by replaying the generator.
        let rng = ChaCha20Rng::from_seed(blake3::derive_key(CONTEXT, KEY));
        let mut draws = UniformBelow::new(rng, 8);
        let mut seen = [false; 8];
        let (mut accepted, mut total) = (0, 0);
        while accepted < 8 {
            let s = draws.next() as usize;
            total += 1;
            if !seen[s] {
                seen[s] = true;
                accepted += 1;
            }
        }
        assert!(total > 8, "no draw repeated; the test proves nothing");
    }

    /// Pins the value-stable algorithm (BLAKE3 derive_key -> ChaCha20 -> Lemire draw ->
    /// skip repeats). If this changes, every sealed disk of this placement becomes
    /// unreadable: do not update the vector, fix the code.
    #[test]
    fn regression_vector_zero_key_16_sectors() {
        let p = PatentPlacement::new(&[0u8; 32], 16, 16).unwrap();
        assert_eq!(map(&p), PINNED_ZERO_KEY_16);
        let p = PatentPlacement::new(&[0u8; 32], 10, 13).unwrap();
        assert_eq!(map(&p), PINNED_ZERO_KEY_10_13);
    }

    /// Also reproduced by an independent Python model (BLAKE3 key from this crate, ChaCha20
    /// from the `cryptography` package) when the algorithm was written.
    const PINNED_ZERO_KEY_16: [u64; 16] = [12, 10, 9, 3, 2, 7, 6, 0, 15, 11, 14, 1, 5, 4, 8, 13];
    /// M = 13 is not a power of two: pins the multiply-high reduction as well.
    const PINNED_ZERO_KEY_10_13: [u64; 10] = [10, 8, 7, 2, 5, 0, 12, 9, 6, 4];

    /// The draw runs on two threads, handing draws over in blocks: the map must be the
    /// single-threaded draw-and-skip of [039] across many blocks (and the coupon-collector
    /// tail, N = M), and the inverse (built on two threads, by halves of the slots) its
    /// exact inverse.
    #[test]
    fn the_two_threads_draw_what_one_thread_draws() {
        for (n, m) in [
            (100_000usize, 100_000usize),
            (70_001, 123_457),
            (1, 1 << 20),
        ] {
            let key = [n as u8; 32];
            let rng = ChaCha20Rng::from_seed(blake3::derive_key(CONTEXT, &key));
            let mut draws = UniformBelow::new(rng, m as u64);
            let mut seen = vec![false; m];
            let mut want = Vec::with_capacity(n);
            let mut total = 0;
            while want.len() < n {
                let s = draws.next();
                total += 1;
                if !std::mem::replace(&mut seen[s as usize], true) {
                    want.push(s);
                }
            }
            assert!(n < 2 || total > 2 * DRAW_BLOCK, "one block: proves nothing");
            let p = PatentPlacement::new(&key, n as u64, m as u64).unwrap();
            assert_eq!(map(&p), want, "N = {n}, M = {m}");
            let mut inverse = vec![None; m];
            for (i, &s) in want.iter().enumerate() {
                inverse[s as usize] = Some(i as u64);
            }
            assert!((0..m as u64).all(|s| p.sector_of(s) == inverse[s as usize]));
        }
    }

    #[test]
    fn same_key_same_map() {
        let a = PatentPlacement::new(KEY, 1000, 1200).unwrap();
        let b = PatentPlacement::new(KEY, 1000, 1200).unwrap();
        assert!(a == b);
    }

    #[test]
    fn different_key_different_map() {
        let a = PatentPlacement::new(b"key a", 1000, 1200).unwrap();
        let b = PatentPlacement::new(b"key b", 1000, 1200).unwrap();
        assert_ne!(map(&a), map(&b));
    }

    /// Tiny shapes have few maps, so two keys may agree by chance; 32 keys may not all agree.
    #[test]
    fn tiny_shapes_depend_on_the_key() {
        for (n, m) in [(1, 2), (2, 2), (2, 3), (3, 3), (1, 12), (3, 12)] {
            let maps: std::collections::BTreeSet<Vec<u64>> = (0u8..32)
                .map(|k| map(&PatentPlacement::new(&[k], n, m).unwrap()))
                .collect();
            assert!(maps.len() > 1, "N = {n}, M = {m}: every key gives {maps:?}");
        }
    }

    #[test]
    fn almost_no_fixed_points() {
        let n = 131_072;
        let p = PatentPlacement::new(KEY, n, n).unwrap();
        let moved = (0..n).filter(|&i| p.slot_of(i) != i).count() as u64;
        assert!(moved * 100 >= n * 99, "only {moved} of {n} sectors moved");
    }

    #[test]
    fn refuses_thin_disk_smaller_than_disk() {
        let err = PatentPlacement::new(KEY, 5, 4).unwrap_err();
        assert_eq!(
            err,
            PlacementError::Range {
                sectors: 5,
                slots: 4
            }
        );
    }

    #[test]
    fn refuses_more_slots_than_u32_can_name() {
        let m = u64::from(u32::MAX) + 1;
        let err = PatentPlacement::new(KEY, 1, m).unwrap_err();
        assert_eq!(err, PlacementError::TooManySlots(m));
    }

    #[test]
    fn draws_are_uniform_enough() {
        // 60_000 draws in [0, 3): each count within 5 sigma (~ 580) of 20_000. A biased
        // or off-by-one reduction (e.g. never drawing range - 1) fails this.
        let rng = ChaCha20Rng::from_seed([7; 32]);
        let mut draws = UniformBelow::new(rng, 3);
        let mut counts = [0u32; 3];
        for _ in 0..60_000 {
            counts[draws.next() as usize] += 1;
        }
        for c in counts {
            assert!((19_420..=20_580).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn threshold_is_two_to_the_64_mod_range() {
        let rng = || ChaCha20Rng::from_seed([0; 32]);
        assert_eq!(UniformBelow::new(rng(), 1).threshold, 0);
        assert_eq!(UniformBelow::new(rng(), 8).threshold, 0);
        assert_eq!(UniformBelow::new(rng(), 3).threshold, 1); // 2^64 = 3 * q + 1
        assert_eq!(UniformBelow::new(rng(), 10).threshold, 6); // 2^64 ends in ...616
    }

    proptest! {
        #[test]
        fn round_trip_for_random_keys_and_shapes(
            key in proptest::collection::vec(any::<u8>(), 0..48),
            n in 0u64..400,
            slack in 0u64..400,
        ) {
            let p = PatentPlacement::new(&key, n, n + slack).unwrap();
            assert_placement_contract(&p);
        }
    }
}
