//! [`FeistelPlacement`]: a keyed pseudo-random permutation of `[0, 2^k)` by a balanced
//! Feistel network, restricted to `[0, M)` by cycle-walking.
//!
//! Unlike the patent's draw-and-skip ([039]), which must replay every draw and keep an
//! `M`-entry map, each `pi(i)` and each `pi^-1(s)` is computed alone in O(1) memory, so a
//! resumed pass needs no state and any thin-disk size works.

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::{Aes256, Block};

use super::{Placement, PlacementError};

/// Domain separation of the AES key: the caller's key is never used as an AES key as is.
const CONTEXT: &str = "pdguard 2026-11 feistel placement v1";

/// Luby–Rackoff: four rounds of a pseudo-random function make a strong pseudo-random
/// permutation (three would only resist chosen-plaintext, not chosen-ciphertext, queries).
const ROUNDS: u8 = 4;

/// Sector `i` goes to the first value of `E(i), E(E(i)), ...` that is below `M`, where `E` is
/// a 4-round Feistel permutation of `[0, 2^k)` with AES-256 round functions.
#[derive(Clone)]
pub struct FeistelPlacement {
    cipher: Aes256,
    sectors: u64,
    slots: u64,
    /// `h = k / 2`: bits of each Feistel half, 1..=32.
    half_bits: u32,
    /// `2^h - 1`.
    mask: u64,
}

impl FeistelPlacement {
    /// The placement of `sectors` disk sectors onto `slots` thin-disk slots, keyed by
    /// `blake3::derive_key(CONTEXT, key)` as the AES-256 key.
    ///
    /// # Errors
    /// [`PlacementError::Range`] if `slots < sectors` (no injection exists).
    pub fn new(key: &[u8], sectors: u64, slots: u64) -> Result<Self, PlacementError> {
        if slots < sectors {
            return Err(PlacementError::Range { sectors, slots });
        }
        let half_bits = domain_bits(slots) / 2;
        Ok(Self {
            cipher: Aes256::new(&blake3::derive_key(CONTEXT, key).into()),
            sectors,
            slots,
            half_bits,
            mask: (1u64 << half_bits) - 1,
        })
    }

    /// Round function `F(r, x)`: the first 8 bytes (little-endian) of
    /// `AES-256(r, 0 x 7, x as 8 little-endian bytes)`, cut to `h` bits.
    fn round(&self, r: u8, x: u64) -> u64 {
        let mut block = Block::default();
        block[0] = r;
        block[8..].copy_from_slice(&x.to_le_bytes());
        self.cipher.encrypt_block(&mut block);
        let mut first = [0u8; 8];
        first.copy_from_slice(&block[..8]);
        u64::from_le_bytes(first) & self.mask
    }

    /// `E`: the Feistel permutation of `[0, 2^k)`. `x` must be below `2^k`.
    fn encrypt(&self, x: u64) -> u64 {
        let (mut left, mut right) = (x >> self.half_bits, x & self.mask);
        for r in 0..ROUNDS {
            (left, right) = (right, left ^ self.round(r, right));
        }
        (left << self.half_bits) | right
    }

    /// `D = E^-1`: the rounds in reverse order, each undone by the same round function.
    fn decrypt(&self, y: u64) -> u64 {
        let (mut left, mut right) = (y >> self.half_bits, y & self.mask);
        for r in (0..ROUNDS).rev() {
            (left, right) = (right ^ self.round(r, left), left);
        }
        (left << self.half_bits) | right
    }
}

/// `k`: the smallest even number `>= 2` with `2^k >= slots`. Even, so the two halves are equal
/// (a balanced network); smallest, so `2^k < 4M` and cycle-walking takes fewer than 4 steps on
/// average. At most 64, since `slots <= 2^64 - 1`.
fn domain_bits(slots: u64) -> u32 {
    // Bits of `slots - 1` = ceil(log2(slots)) for slots >= 2; 0 for slots 0 and 1.
    let bits = u64::BITS - slots.saturating_sub(1).leading_zeros();
    (bits + bits % 2).max(2)
}

impl Placement for FeistelPlacement {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn slots(&self) -> u64 {
        self.slots
    }

    /// Cycle-walking: the cycle of `E` through `i < M` returns to `i`, so it meets a value
    /// below `M` and the loop ends.
    ///
    /// # Panics
    /// If `sector >= N`: past `M` the walk may not end, and past `N` there is no slot to name.
    fn slot_of(&self, sector: u64) -> u64 {
        assert!(
            sector < self.sectors,
            "sector {sector} is outside the disk's {} sectors",
            self.sectors
        );
        let mut x = sector;
        loop {
            x = self.encrypt(x);
            if x < self.slots {
                return x;
            }
        }
    }

    /// Walks the cycle backwards to the value below `M` that maps here, then keeps it only if
    /// it is a sector (`< N`): the other `M - N` slots are empty.
    fn sector_of(&self, slot: u64) -> Option<u64> {
        if slot >= self.slots {
            return None;
        }
        let mut y = slot;
        loop {
            y = self.decrypt(y);
            if y < self.slots {
                return (y < self.sectors).then_some(y);
            }
        }
    }
}

/// Hand-written so that no key material can ever reach a log.
impl std::fmt::Debug for FeistelPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeistelPlacement")
            .field("sectors", &self.sectors)
            .field("slots", &self.slots)
            .field("domain_bits", &(2 * self.half_bits))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::fixed::assert_placement_contract;
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"feistel placement test key";

    fn map(p: &FeistelPlacement) -> Vec<u64> {
        (0..p.sectors()).map(|i| p.slot_of(i)).collect()
    }

    #[test]
    fn domain_is_the_smallest_even_power_of_two_at_least_m() {
        let cases = [
            (0, 2),
            (1, 2),
            (2, 2),
            (4, 2),
            (5, 4),
            (16, 4),
            (17, 6),
            (64, 6),
            (65, 8),
            (1024, 10),
            (1025, 12),
            (2_097_152, 22),
            (1 << 62, 62),
            ((1 << 62) + 1, 64),
            (u64::MAX, 64),
        ];
        for (m, k) in cases {
            assert_eq!(domain_bits(m), k, "M = {m}");
        }
    }

    #[test]
    fn decrypt_inverts_encrypt_on_the_whole_domain() {
        for (m, k) in [(4u64, 2u32), (16, 4), (64, 6), (1024, 10)] {
            let p = FeistelPlacement::new(KEY, 0, m).unwrap();
            assert_eq!(2 * p.half_bits, k);
            let size = 1u64 << k;
            let mut hit = vec![false; size as usize];
            for x in 0..size {
                let y = p.encrypt(x);
                assert!(y < size, "k = {k}: E({x}) = {y} leaves the domain");
                assert!(!hit[y as usize], "k = {k}: E is not injective at {y}");
                hit[y as usize] = true;
                assert_eq!(p.decrypt(y), x, "k = {k}: D(E({x}))");
            }
        }
    }

    #[test]
    fn encrypt_is_not_the_identity_on_a_tiny_domain() {
        // A round function that ignored its input or the key could still be invertible;
        // make sure it actually scrambles.
        let p = FeistelPlacement::new(KEY, 0, 1024).unwrap();
        let fixed = (0..1024).filter(|&x| p.encrypt(x) == x).count();
        assert!(fixed < 10, "{fixed} fixed points of 1024");
    }

    #[test]
    fn contract_holds_for_many_shapes() {
        let shapes = [
            (0, 0),
            (0, 1),
            (0, 5),
            (1, 1),
            (1, 12),
            (2, 2),
            (2, 12),
            (3, 3),
            (3, 12),
            (6, 12),
            (5, 5),
            (17, 17),
            (1000, 1000),
            (1000, 1500),
            (100_000, 100_000),
            (100_000, 110_000),
        ];
        for (n, m) in shapes {
            let p = FeistelPlacement::new(KEY, n, m).unwrap();
            assert_eq!((p.sectors(), p.slots()), (n, m));
            assert_placement_contract(&p);
        }
    }

    /// Pins the round function, key derivation and cycle-walking. If this changes, every
    /// sealed disk of this placement becomes unreadable: do not update the vector, fix the
    /// code.
    #[test]
    fn regression_vector_zero_key_16_sectors() {
        let p = FeistelPlacement::new(&[0u8; 32], 16, 16).unwrap();
        assert_eq!(map(&p), PINNED_ZERO_KEY_16);
        let p = FeistelPlacement::new(&[0u8; 32], 10, 13).unwrap();
        assert_eq!(map(&p), PINNED_ZERO_KEY_10_13);
    }

    /// Also reproduced by an independent Python model (BLAKE3 key from this crate, AES-256
    /// from the `cryptography` package) when the algorithm was written.
    const PINNED_ZERO_KEY_16: [u64; 16] = [6, 10, 9, 5, 0, 11, 15, 3, 13, 1, 7, 14, 12, 2, 4, 8];
    /// Sector 6 meets 15 >= M first and walks on to 8.
    const PINNED_ZERO_KEY_10_13: [u64; 10] = [6, 10, 9, 5, 0, 11, 8, 3, 2, 1];

    #[test]
    fn huge_thin_disk_needs_no_memory() {
        // 2^63 + 5 slots: k = 64, h = 32. Round trip a few sectors far apart.
        let m = (1u64 << 63) + 5;
        let p = FeistelPlacement::new(KEY, m - 2, m).unwrap();
        for i in [0, 1, 12_345, 1 << 40, m - 3] {
            let s = p.slot_of(i);
            assert!(s < m);
            assert_eq!(p.sector_of(s), Some(i));
        }
    }

    #[test]
    fn same_key_same_map() {
        let a = FeistelPlacement::new(KEY, 1000, 1200).unwrap();
        let b = FeistelPlacement::new(KEY, 1000, 1200).unwrap();
        assert_eq!(map(&a), map(&b));
    }

    #[test]
    fn different_key_different_map() {
        let a = FeistelPlacement::new(b"key a", 1000, 1200).unwrap();
        let b = FeistelPlacement::new(b"key b", 1000, 1200).unwrap();
        assert_ne!(map(&a), map(&b));
    }

    /// Tiny shapes have few maps, so two keys may agree by chance; 32 keys may not all agree.
    #[test]
    fn tiny_shapes_depend_on_the_key() {
        for (n, m) in [(1, 2), (2, 2), (2, 3), (3, 3), (1, 12), (3, 12)] {
            let maps: std::collections::BTreeSet<Vec<u64>> = (0u8..32)
                .map(|k| map(&FeistelPlacement::new(&[k], n, m).unwrap()))
                .collect();
            assert!(maps.len() > 1, "N = {n}, M = {m}: every key gives {maps:?}");
        }
    }

    #[test]
    fn almost_no_fixed_points() {
        let n = 131_072;
        let p = FeistelPlacement::new(KEY, n, n).unwrap();
        let moved = (0..n).filter(|&i| p.slot_of(i) != i).count() as u64;
        assert!(moved * 100 >= n * 99, "only {moved} of {n} sectors moved");
    }

    #[test]
    fn refuses_thin_disk_smaller_than_disk() {
        let err = FeistelPlacement::new(KEY, 5, 4).unwrap_err();
        assert_eq!(
            err,
            PlacementError::Range {
                sectors: 5,
                slots: 4
            }
        );
    }

    #[test]
    #[should_panic(expected = "outside the disk")]
    fn slot_of_past_the_disk_panics() {
        FeistelPlacement::new(KEY, 3, 12).unwrap().slot_of(3);
    }

    proptest! {
        #[test]
        fn round_trip_for_random_keys_and_shapes(
            key in proptest::collection::vec(any::<u8>(), 0..48),
            n in 0u64..400,
            slack in 0u64..400,
        ) {
            let p = FeistelPlacement::new(&key, n, n + slack).unwrap();
            assert_placement_contract(&p);
        }

        #[test]
        fn round_trip_on_huge_shapes(
            key in proptest::collection::vec(any::<u8>(), 0..48),
            n in 1u64..u64::MAX / 2,
            slack in 0u64..u64::MAX / 2,
            pick in any::<u64>(),
        ) {
            let p = FeistelPlacement::new(&key, n, n + slack).unwrap();
            let i = pick % n;
            let s = p.slot_of(i);
            prop_assert!(s < n + slack);
            prop_assert_eq!(p.sector_of(s), Some(i));
        }
    }
}
