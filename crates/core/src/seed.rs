//! The seed of the pseudo-random algorithm ([040], claim 3).
//!
//! "The seed of the pseudo-random algorithm may be determined by reading ten linear offsets
//! from the sectors and doing a bitwise XOR of every word saved on the ten sectors": the
//! seed is one word (`W` bytes), the XOR of every `W`-byte word of the first `min(10, N)`
//! sectors.

use zeroize::Zeroizing;

/// How many leading sectors feed the seed ([040]: "ten linear offsets").
pub const SEED_SECTORS: u64 = 10;

/// Bytes of the disk that feed the seed: the first `min(10, N)` sectors.
pub fn seed_span(sector_size: u32, sectors: u64) -> u64 {
    SEED_SECTORS.min(sectors) * u64::from(sector_size)
}

/// Accumulates the XOR of `W`-byte words; fed the first sectors in order, in any chunking
/// that keeps word boundaries (each chunk a multiple of `W` bytes).
#[derive(Debug, Clone)]
pub struct SeedBuilder {
    /// Wiped when dropped: in the secure profile the seed is secret (it is wrapped).
    word: Zeroizing<Vec<u8>>,
}

impl SeedBuilder {
    pub fn new(word_length: u32) -> Self {
        Self {
            word: Zeroizing::new(vec![0; word_length as usize]),
        }
    }

    /// XOR every whole word of `bytes` into the seed. `bytes.len()` must be a multiple of
    /// `W`; a trailing partial word is a caller bug and is ignored in release builds.
    pub fn update(&mut self, bytes: &[u8]) {
        debug_assert_eq!(bytes.len() % self.word.len(), 0);
        for chunk in bytes.chunks_exact(self.word.len()) {
            for (acc, b) in self.word.iter_mut().zip(chunk) {
                *acc ^= b;
            }
        }
    }

    pub fn finish(self) -> Zeroizing<Vec<u8>> {
        self.word
    }
}

/// The [040] seed of the bytes `first` (the first `min(10, N)` sectors of the disk).
pub fn derive(first: &[u8], word_length: u32) -> Zeroizing<Vec<u8>> {
    let mut b = SeedBuilder::new(word_length);
    b.update(first);
    b.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The test pattern of DESIGN.md §3: byte at offset `o` is `((o * 2654435761) >> 13) & 0xff`.
    fn pattern(len: u64) -> Vec<u8> {
        (0..len)
            .map(|o| ((o.wrapping_mul(2_654_435_761) >> 13) & 0xff) as u8)
            .collect()
    }

    fn vector(sectors: u64, sector_size: u32, word: u32) -> String {
        let disk = pattern(sectors * u64::from(sector_size));
        let span = seed_span(sector_size, sectors) as usize;
        hex::encode(derive(&disk[..span], word))
    }

    #[test]
    fn seed_vector_16_sectors_of_512_w32() {
        assert_eq!(
            vector(16, 512, 32),
            "c777343cf34fd77ec64fdf4fd0401757c7ffa5487642cb0fde690450db2dd859"
        );
    }

    #[test]
    fn seed_vector_12_sectors_of_4096_w16() {
        assert_eq!(vector(12, 4096, 16), "78eb7c65ce8fd48bd4c9743d7a0b404d");
    }

    #[test]
    fn seed_vector_3_sectors_of_512_w32() {
        assert_eq!(
            vector(3, 512, 32),
            "ee29a3082caf6fd2a9e076a967d78beb537a09d0f96ab37bfb97e7799640f991"
        );
    }

    #[test]
    fn all_zero_boot_sectors_give_a_zero_seed() {
        // The weakness DESIGN.md §1 names: the patent profile's seed is public knowledge here.
        assert_eq!(*derive(&[0u8; 5120], 32), vec![0u8; 32]);
    }

    #[test]
    fn chunked_updates_equal_one_update() {
        let data = pattern(5120);
        let mut b = SeedBuilder::new(32);
        for c in data.chunks(512) {
            b.update(c);
        }
        assert_eq!(b.finish(), derive(&data, 32));
    }
}
