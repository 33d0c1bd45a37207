//! Per-sector encryption of the secure profile: AES-256-XTS (IEEE 1619), one data unit per
//! sector, tweak = the thin-disk slot the sector occupies (16 bytes, little-endian), as
//! DESIGN.md §3 says. The patent profile uses no cipher.
//!
//! Sectors are powers of two of at least 512 bytes, so no ciphertext stealing is needed.
//! The loop computes the tweaks of 32 blocks, XORs them in, encrypts the 32 blocks with one
//! `encrypt_blocks` call (AES-NI pipelines them), and XORs again — several times faster
//! than one block at a time (see `crates/core/benches` notes in the README).

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Block};
use zeroize::Zeroize;

/// Encrypts and decrypts one sector in place, tweaked by the thin-disk slot it occupies.
pub trait SectorCipher: Send + Sync {
    fn encrypt(&self, slot: u64, sector: &mut [u8]);
    fn decrypt(&self, slot: u64, sector: &mut [u8]);
}

/// Blocks per batch: 512 bytes.
const BATCH: usize = 32;

/// AES-256-XTS with a 512-bit key: the first half keys the data cipher, the second the tweak.
pub struct XtsAes256 {
    data: Aes256,
    tweak: Aes256,
}

impl XtsAes256 {
    pub fn new(key: &[u8; 64]) -> Self {
        let mut k1 = [0u8; 32];
        let mut k2 = [0u8; 32];
        k1.copy_from_slice(&key[..32]);
        k2.copy_from_slice(&key[32..]);
        let c = Self {
            data: Aes256::new(&k1.into()),
            tweak: Aes256::new(&k2.into()),
        };
        k1.zeroize();
        k2.zeroize();
        c
    }

    fn first_tweak(&self, slot: u64) -> u128 {
        let mut t = Block::from(u128::from(slot).to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        let mut b = [0u8; 16];
        b.copy_from_slice(&t);
        u128::from_le_bytes(b)
    }

    fn run(&self, slot: u64, sector: &mut [u8], encrypt: bool) {
        assert!(
            sector.len().is_multiple_of(16) && !sector.is_empty(),
            "XTS sector of {} bytes is not whole AES blocks",
            sector.len()
        );
        let mut t = self.first_tweak(slot);
        let mut blocks = [Block::default(); BATCH];
        let mut tweaks = [0u128; BATCH];
        for chunk in sector.chunks_mut(16 * BATCH) {
            let n = chunk.len() / 16;
            for k in 0..n {
                tweaks[k] = t;
                let word = u128::from_le_bytes(block_at(chunk, k)) ^ t;
                blocks[k] = Block::from(word.to_le_bytes());
                t = times_alpha(t);
            }
            if encrypt {
                self.data.encrypt_blocks(&mut blocks[..n]);
            } else {
                self.data.decrypt_blocks(&mut blocks[..n]);
            }
            for k in 0..n {
                let mut b = [0u8; 16];
                b.copy_from_slice(&blocks[k]);
                let word = u128::from_le_bytes(b) ^ tweaks[k];
                chunk[16 * k..16 * k + 16].copy_from_slice(&word.to_le_bytes());
            }
        }
        blocks.zeroize_blocks();
    }
}

fn block_at(chunk: &[u8], k: usize) -> [u8; 16] {
    let mut b = [0u8; 16];
    b.copy_from_slice(&chunk[16 * k..16 * k + 16]);
    b
}

/// Multiply the tweak by the primitive element of GF(2^128), little-endian convention of
/// IEEE 1619 (reduction polynomial x^128 + x^7 + x^2 + x + 1).
fn times_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Plaintext left in the batch buffer is wiped after each sector.
trait ZeroizeBlocks {
    fn zeroize_blocks(&mut self);
}

impl ZeroizeBlocks for [Block; BATCH] {
    fn zeroize_blocks(&mut self) {
        for b in self.iter_mut() {
            b.as_mut_slice().zeroize();
        }
    }
}

impl SectorCipher for XtsAes256 {
    fn encrypt(&self, slot: u64, sector: &mut [u8]) {
        self.run(slot, sector, true);
    }

    fn decrypt(&self, slot: u64, sector: &mut [u8]) {
        self.run(slot, sector, false);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use aes::cipher::generic_array::GenericArray;
    use proptest::prelude::*;

    /// The `aes` crate is built with its `zeroize` feature: its key schedules (two per
    /// XtsAes256) are wiped when dropped. Without the feature this does not compile.
    #[test]
    fn aes_key_schedules_are_wiped_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<Aes256>();
    }

    fn reference(key: &[u8; 64]) -> xts_mode::Xts128<Aes256> {
        xts_mode::Xts128::new(
            Aes256::new(GenericArray::from_slice(&key[..32])),
            Aes256::new(GenericArray::from_slice(&key[32..])),
        )
    }

    /// IEEE 1619-2007 Annex B, vector 10: AES-256, data unit 512 bytes, sequence 0xff,
    /// plaintext bytes 0, 1, 2, ... 255, 0, 1, ...
    #[test]
    fn ieee_1619_vector_10() {
        let k1 = "2718281828459045235360287471352662497757247093699959574966967627";
        let k2 = "3141592653589793238462643383279502884197169399375105820974944592";
        let key: [u8; 64] = hex::decode(format!("{k1}{k2}"))
            .unwrap()
            .try_into()
            .unwrap();
        let mut sector: Vec<u8> = (0..512).map(|i| i as u8).collect();
        XtsAes256::new(&key).encrypt(0xff, &mut sector);
        assert_eq!(
            hex::encode(&sector[..32]),
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
        );
        assert_eq!(
            hex::encode(&sector[480..]),
            "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
        );
    }

    proptest! {
        #[test]
        fn matches_the_xts_mode_crate_and_round_trips(
            key in proptest::array::uniform32(any::<u8>()),
            key2 in proptest::array::uniform32(any::<u8>()),
            slot in any::<u64>(),
            shift in 9u32..=13,
            fill in any::<u8>(),
        ) {
            let mut k = [0u8; 64];
            k[..32].copy_from_slice(&key);
            k[32..].copy_from_slice(&key2);
            let len = 1usize << shift;
            let plain: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ fill).collect();
            let mut ours = plain.clone();
            XtsAes256::new(&k).encrypt(slot, &mut ours);
            let mut theirs = plain.clone();
            reference(&k).encrypt_sector(&mut theirs, u128::from(slot).to_le_bytes());
            prop_assert_eq!(&ours, &theirs);
            prop_assert_ne!(&ours, &plain);
            XtsAes256::new(&k).decrypt(slot, &mut ours);
            prop_assert_eq!(ours, plain);
        }
    }

    #[test]
    fn same_bytes_in_two_slots_encrypt_differently() {
        let c = XtsAes256::new(&[7u8; 64]);
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        c.encrypt(1, &mut a);
        c.encrypt(2, &mut b);
        assert_ne!(a, b);
    }
}
