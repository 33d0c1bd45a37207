//! [`FeistelPlacement`]: a keyed pseudo-random permutation of `[0, 2^k)` by a balanced
//! Feistel network, restricted to `[0, M)` by cycle-walking.
//!
//! Unlike the patent's draw-and-skip ([039]), which must replay every draw and keep an
//! `M`-entry map, each `pi(i)` and each `pi^-1(s)` is computed alone, with no per-sector
//! state, so a resumed pass needs no state and any thin-disk size works.
//!
//! Speed: a round function value costs one AES-256 block, and a `pi(i)` four of them per
//! Feistel evaluation. Each round function has only `2^h = 2^(k/2)` inputs, so for domains up
//! to `2^36` (`TABLE_MAX_HALF_BITS`) [`FeistelPlacement::new`] computes all of them once,
//! batched through AES-NI, into a table of at most 4 MiB; each round is then one lookup.
//! The table is a memo of the same function: it changes no output.

use std::sync::Arc;

use aes::cipher::{BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use zeroize::Zeroizing;

use super::{Placement, PlacementError, EMPTY};

/// Domain separation of the AES key: the caller's key is never used as an AES key as is.
const CONTEXT: &str = "pdguard 2026-11 feistel placement v1";

/// Luby–Rackoff: four rounds of a pseudo-random function make a strong pseudo-random
/// permutation (three would only resist chosen-plaintext, not chosen-ciphertext, queries).
const ROUNDS: u8 = 4;

/// The largest half width `h` whose round functions [`FeistelPlacement::new`] tabulates:
/// `4 rounds * 2^18 inputs * 4 bytes` = 4 MiB of table, built from 2^20 AES blocks (7.5 ms
/// measured on a 2-vCPU VM), for domains up to `2^36` (32 TiB of 512-byte sectors). Wider
/// halves are computed with AES at every round: the table doubles with each bit of `h` (64
/// GiB at `h = 32`), and a lookup is cheap only while it stays in the caches.
const TABLE_MAX_HALF_BITS: u32 = 18;

/// AES blocks per `encrypt_blocks` call while filling the table: AES-NI pipelines 8 blocks at
/// a time, and several batches of 8 amortise the call.
const TABLE_BATCH: usize = 64;

/// Sector `i` goes to the first value of `E(i), E(E(i)), ...` that is below `M`, where `E` is
/// a 4-round Feistel permutation of `[0, 2^k)` with AES-256 round functions.
///
/// Values evaluated in lockstep by [`Placement::slots_of`] and [`Placement::sectors_of`].
const LANES: usize = 16;

/// Clones share the round table (if any) and are cheap.
#[derive(Clone)]
pub struct FeistelPlacement {
    cipher: Aes256,
    /// `F(r, x)` of [`FeistelPlacement::round`] at index `r * 2^h + x`, for every round `r` and
    /// every `x < 2^h`, when `h <= TABLE_MAX_HALF_BITS` (at most 4 MiB); `None` above, and
    /// for [`FeistelPlacement::without_table`]. A memo of the same function, never a
    /// different one: both paths give the same permutation. Derived from the key, so it is
    /// zeroed when the last clone drops and never printed.
    table: Option<Arc<Zeroizing<Box<[u32]>>>>,
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
    /// For `slots <= 2^36` this also tabulates the round functions (up to 4 MiB and some
    /// milliseconds), which makes each evaluation about 5 times faster and changes no output.
    ///
    /// # Errors
    /// [`PlacementError::Range`] if `slots < sectors` (no injection exists).
    pub fn new(key: &[u8], sectors: u64, slots: u64) -> Result<Self, PlacementError> {
        Self::with_table_limit(key, sectors, slots, TABLE_MAX_HALF_BITS)
    }

    /// The same placement as [`FeistelPlacement::new`], computed with AES at every round and
    /// no table: the same outputs, slower. For benchmarks and cross-checks.
    ///
    /// # Errors
    /// [`PlacementError::Range`] if `slots < sectors` (no injection exists).
    pub fn without_table(key: &[u8], sectors: u64, slots: u64) -> Result<Self, PlacementError> {
        // `h >= 1` always, so a limit of 0 never tabulates.
        Self::with_table_limit(key, sectors, slots, 0)
    }

    /// [`FeistelPlacement::new`], tabulating the round functions if `h <= table_max_half_bits`.
    fn with_table_limit(
        key: &[u8],
        sectors: u64,
        slots: u64,
        table_max_half_bits: u32,
    ) -> Result<Self, PlacementError> {
        if slots < sectors {
            return Err(PlacementError::Range { sectors, slots });
        }
        let half_bits = domain_bits(slots) / 2;
        let mut p = Self {
            cipher: Aes256::new(&blake3::derive_key(CONTEXT, key).into()),
            table: None,
            sectors,
            slots,
            half_bits,
            mask: (1u64 << half_bits) - 1,
        };
        if half_bits <= table_max_half_bits {
            p.table = Some(Arc::new(p.tabulate()));
        }
        Ok(p)
    }

    /// `F(r, x)` for every round and every `x < 2^h`, laid out as [`Self::table`] says, by
    /// batches of [`TABLE_BATCH`] blocks through `encrypt_blocks`. Only sensible for small
    /// `h`: the table has `4 * 2^h` entries.
    fn tabulate(&self) -> Zeroizing<Box<[u32]>> {
        let size = 1usize << self.half_bits;
        let mut table = Zeroizing::new(vec![0u32; usize::from(ROUNDS) * size].into_boxed_slice());
        let mut blocks = [Block::default(); TABLE_BATCH];
        for (r, row) in (0..ROUNDS).zip(table.chunks_mut(size)) {
            for (c, chunk) in row.chunks_mut(TABLE_BATCH).enumerate() {
                let first = (c * TABLE_BATCH) as u64;
                let blocks = &mut blocks[..chunk.len()];
                for (x, block) in (first..).zip(blocks.iter_mut()) {
                    *block = round_input(r, x);
                }
                self.cipher.encrypt_blocks(blocks);
                for (entry, block) in chunk.iter_mut().zip(blocks.iter()) {
                    // Masked to `h <= 32` bits: the cast keeps every bit.
                    *entry = round_output(block, self.mask) as u32;
                }
            }
        }
        blocks.fill(Block::default());
        table
    }

    /// Round function `F(r, x)`: the first 8 bytes (little-endian) of
    /// `AES-256(r, 0 x 7, x as 8 little-endian bytes)`, cut to `h` bits. `x` must be below
    /// `2^h`. Always computed with AES; the table, when present, holds its values.
    fn round(&self, r: u8, x: u64) -> u64 {
        let mut block = round_input(r, x);
        self.cipher.encrypt_block(&mut block);
        round_output(&block, self.mask)
    }

    /// `E`: the Feistel permutation of `[0, 2^k)`. `x` must be below `2^k`.
    fn encrypt(&self, x: u64) -> u64 {
        match self.table.as_deref() {
            Some(table) => self.forward(x, |r, v| self.lookup(table, r, v)),
            None => self.forward(x, |r, v| self.round(r, v)),
        }
    }

    /// `D = E^-1`: the rounds in reverse order, each undone by the same round function.
    fn decrypt(&self, y: u64) -> u64 {
        match self.table.as_deref() {
            Some(table) => self.backward(y, |r, v| self.lookup(table, r, v)),
            None => self.backward(y, |r, v| self.round(r, v)),
        }
    }

    /// `F(r, x)` read from the table. `x` must be below `2^h`.
    #[inline(always)]
    fn lookup(&self, table: &[u32], r: u8, x: u64) -> u64 {
        u64::from(table[(usize::from(r) << self.half_bits) | x as usize])
    }

    /// The Feistel rounds of `E` with round function `f` (generic, so that each path is
    /// compiled with its round function inlined).
    #[inline(always)]
    fn forward(&self, x: u64, f: impl Fn(u8, u64) -> u64) -> u64 {
        let (mut left, mut right) = (x >> self.half_bits, x & self.mask);
        for r in 0..ROUNDS {
            (left, right) = (right, left ^ f(r, right));
        }
        (left << self.half_bits) | right
    }

    /// One step of `E` (`forward`) or `D` for each value `xs[k]`, `k` in `idx` (at most
    /// [`LANES`]), in lockstep: the table lookups of different values overlap in the memory
    /// pipeline, where those of one value wait for each other.
    #[inline(always)]
    fn step_lanes(&self, table: &[u32], xs: &mut [u64], idx: &[usize], forward: bool) {
        let (h, mask) = (self.half_bits, self.mask);
        let (mut l, mut r) = ([0u64; LANES], [0u64; LANES]);
        for (j, &k) in idx.iter().enumerate() {
            (l[j], r[j]) = (xs[k] >> h, xs[k] & mask);
        }
        if forward {
            for round in 0..ROUNDS {
                for j in 0..LANES {
                    (l[j], r[j]) = (r[j], l[j] ^ self.lookup(table, round, r[j]));
                }
            }
        } else {
            for round in (0..ROUNDS).rev() {
                for j in 0..LANES {
                    (l[j], r[j]) = (r[j] ^ self.lookup(table, round, l[j]), l[j]);
                }
            }
        }
        for (j, &k) in idx.iter().enumerate() {
            xs[k] = (l[j] << h) | r[j];
        }
    }

    /// Cycle-walk every value of `xs` (each below `2^k`) into `[0, M)`, [`LANES`] values at a
    /// time: a step for all, then more steps for those still at or above `M`.
    fn walk_all(&self, table: &[u32], xs: &mut [u64], forward: bool) {
        let mut pending: Vec<usize> = (0..xs.len()).collect();
        while !pending.is_empty() {
            for idx in pending.chunks(LANES) {
                self.step_lanes(table, xs, idx, forward);
            }
            pending.retain(|&k| xs[k] >= self.slots);
        }
    }

    /// The Feistel rounds of `D` with round function `f`.
    #[inline(always)]
    fn backward(&self, y: u64, f: impl Fn(u8, u64) -> u64) -> u64 {
        let (mut left, mut right) = (y >> self.half_bits, y & self.mask);
        for r in (0..ROUNDS).rev() {
            (left, right) = (right ^ f(r, left), left);
        }
        (left << self.half_bits) | right
    }
}

/// The AES input of `F(r, x)`: `r`, seven zero bytes, `x` as 8 little-endian bytes.
fn round_input(r: u8, x: u64) -> Block {
    let mut block = Block::default();
    block[0] = r;
    block[8..].copy_from_slice(&x.to_le_bytes());
    block
}

/// `F`'s value from the AES output: its first 8 bytes, little-endian, cut by `mask`.
fn round_output(block: &Block, mask: u64) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&block[..8]);
    u64::from_le_bytes(first) & mask
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

    /// Many sectors at once through the round table: the same values as
    /// [`slot_of`](Placement::slot_of), several times faster.
    fn slots_of(&self, first: u64, out: &mut [u64]) {
        let end = first.saturating_add(out.len() as u64);
        assert!(
            end <= self.sectors,
            "sectors up to {end} are outside the disk's {} sectors",
            self.sectors
        );
        for (k, o) in out.iter_mut().enumerate() {
            *o = first + k as u64;
        }
        match self.table.as_deref() {
            Some(table) => self.walk_all(table, out, true),
            None => {
                for o in out.iter_mut() {
                    *o = self.slot_of(*o);
                }
            }
        }
    }

    /// Many slots at once, as [`slots_of`](Placement::slots_of) does for sectors.
    fn sectors_of(&self, first: u64, out: &mut [u64]) {
        let end = first.saturating_add(out.len() as u64);
        match self.table.as_deref() {
            Some(table) if end <= self.slots => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = first + k as u64;
                }
                self.walk_all(table, out, false);
                for o in out.iter_mut() {
                    if *o >= self.sectors {
                        *o = EMPTY;
                    }
                }
            }
            _ => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = self.sector_of(first + k as u64).unwrap_or(EMPTY);
                }
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

/// Hand-written so that no key material can ever reach a log: neither the AES key schedule
/// nor the round table (derived from the key) is printed, only whether there is a table.
impl std::fmt::Debug for FeistelPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeistelPlacement")
            .field("sectors", &self.sectors)
            .field("slots", &self.slots)
            .field("domain_bits", &(2 * self.half_bits))
            .field("round_table", &self.table.is_some())
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

    /// `a` (round table) and `b` (AES at every round) agree on `E`, `D`, `pi` and `pi^-1`
    /// at `count` random points, and on the whole domain if it is small.
    fn assert_same_map(a: &FeistelPlacement, b: &FeistelPlacement, count: usize) {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        assert!(a.table.is_some() && b.table.is_none());
        assert_eq!(
            (a.sectors, a.slots, a.half_bits),
            (b.sectors, b.slots, b.half_bits)
        );
        let size = 1u64 << (2 * a.half_bits);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.slots);
        let points: Vec<u64> = if size <= 1 << 12 {
            (0..size).collect()
        } else {
            (0..count).map(|_| rng.next_u64() % size).collect()
        };
        for x in points {
            let y = a.encrypt(x);
            assert_eq!(y, b.encrypt(x), "M = {}: E({x})", a.slots);
            assert_eq!(a.decrypt(x), b.decrypt(x), "M = {}: D({x})", a.slots);
            assert_eq!(a.decrypt(y), x, "M = {}: D(E({x}))", a.slots);
            if x < a.sectors {
                assert_eq!(a.slot_of(x), b.slot_of(x), "M = {}: pi({x})", a.slots);
            }
            if x < a.slots {
                assert_eq!(
                    a.sector_of(x),
                    b.sector_of(x),
                    "M = {}: pi^-1({x})",
                    a.slots
                );
            }
        }
    }

    #[test]
    fn batched_evaluation_gives_the_same_values_one_by_one() {
        for (n, m) in [
            (1u64, 1u64),
            (1000, 1000),
            (1000, 1500),
            (5000, 1 << 13),
            (70_000, 70_001),
        ] {
            for p in [
                FeistelPlacement::new(KEY, n, m).unwrap(),
                FeistelPlacement::without_table(KEY, n, m).unwrap(),
            ] {
                let mut slots = vec![0u64; n as usize];
                p.slots_of(0, &mut slots);
                let one: Vec<u64> = (0..n).map(|i| p.slot_of(i)).collect();
                assert_eq!(slots, one, "N={n} M={m}");
                let len = ((n - n / 2) as usize).min((n / 3) as usize);
                let mut part = vec![0u64; len];
                p.slots_of(n / 2, &mut part);
                assert_eq!(
                    part,
                    one[(n / 2) as usize..][..len],
                    "N={n} M={m}: from N/2"
                );
                let mut sectors = vec![0u64; m as usize];
                p.sectors_of(0, &mut sectors);
                for (t, &i) in sectors.iter().enumerate() {
                    assert_eq!(
                        p.sector_of(t as u64).unwrap_or(EMPTY),
                        i,
                        "N={n} M={m} slot {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn round_table_gives_the_same_map_as_aes() {
        let shapes = [
            (0, 0),
            (1, 2),
            (10, 13),
            (16, 16),
            (1000, 1000),
            (900, 1000),
            (100_000, 110_000),
            ((1 << 20) + 3, (1 << 20) + 3),
            (1 << 23, 1 << 23),
            (12_345_678_901, 3 << 32),
            // k = 36, h = 18: the widest tabulated half.
            ((1 << 36) - 7, 1 << 36),
        ];
        for (n, m) in shapes {
            let a = FeistelPlacement::new(KEY, n, m).unwrap();
            let b = FeistelPlacement::without_table(KEY, n, m).unwrap();
            assert_same_map(&a, &b, 2000);
        }
        let a = FeistelPlacement::new(KEY, 1 << 36, 1 << 36).unwrap();
        assert_eq!(a.table.as_ref().map(|t| t.len()), Some(4 << 18));
    }

    #[test]
    fn round_table_holds_every_round_function_value() {
        for m in [4u64, 1000, (1 << 20) + 3] {
            let p = FeistelPlacement::new(KEY, m, m).unwrap();
            let table = p.table.as_deref().unwrap();
            assert_eq!(table.len() as u64, u64::from(ROUNDS) << p.half_bits);
            for r in 0..ROUNDS {
                for x in 0..=p.mask {
                    assert_eq!(p.lookup(table, r, x), p.round(r, x), "M = {m}: F({r}, {x})");
                }
            }
        }
    }

    /// The pinned vectors above run on the table path (`new`); they must hold on the AES
    /// path too.
    #[test]
    fn regression_vectors_hold_without_the_table() {
        let p = FeistelPlacement::without_table(&[0u8; 32], 16, 16).unwrap();
        assert_eq!(map(&p), PINNED_ZERO_KEY_16);
        let p = FeistelPlacement::without_table(&[0u8; 32], 10, 13).unwrap();
        assert_eq!(map(&p), PINNED_ZERO_KEY_10_13);
        assert!(FeistelPlacement::new(&[0u8; 32], 16, 16)
            .unwrap()
            .table
            .is_some());
    }

    #[test]
    fn wider_halves_than_the_limit_take_the_aes_path_and_agree() {
        // k = 38, h = 19: one past the limit. `new` builds no table; a table forced by a
        // higher limit (8 MiB) gives the same map.
        let (n, m) = ((3 << 36) - 1000, 3 << 36);
        assert_eq!(domain_bits(m), 38);
        let p = FeistelPlacement::new(KEY, n, m).unwrap();
        assert_eq!(p.half_bits, TABLE_MAX_HALF_BITS + 1);
        assert!(p.table.is_none());
        let forced =
            FeistelPlacement::with_table_limit(KEY, n, m, TABLE_MAX_HALF_BITS + 1).unwrap();
        assert_same_map(&forced, &p, 2000);
        // And the huge domains of `huge_thin_disk_needs_no_memory` have no table either.
        let huge = FeistelPlacement::new(KEY, 0, (1 << 63) + 5).unwrap();
        assert!(huge.table.is_none());
    }

    #[test]
    fn clones_share_the_table_and_debug_prints_no_key_material() {
        let p = FeistelPlacement::new(KEY, 1000, 1200).unwrap();
        let q = p.clone();
        assert!(Arc::ptr_eq(
            p.table.as_ref().unwrap(),
            q.table.as_ref().unwrap()
        ));
        assert_eq!(map(&p), map(&q));
        let text = format!("{p:?}");
        assert_eq!(
            text,
            "FeistelPlacement { sectors: 1000, slots: 1200, domain_bits: 12, round_table: true, .. }"
        );
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
