//! The key slot: the one place a version 3 secure seal keeps its wrapped key.
//!
//! A small file beside the record (`PATH.pdguard.key`), written once when the seal starts
//! (created exclusively, never renamed or rewritten) and overwritten in place with random
//! bytes by `image shred`, as LUKS does with its key slots. The record holds no copy of
//! the wrapped key, only the slot's size and checksum ([`crate::record::KeySlotRef`]).
//! Pure: encoding and decoding only. `docs/seal-record.md` has the same table.
//!
//! | bytes             | content                                                     |
//! |-------------------|-------------------------------------------------------------|
//! | 0..16             | magic `PDGUARD-KEYSLOT1` (ASCII; the 1 is the slot version) |
//! | 16..32            | seal id, raw (the record's `seal_id` decoded from hex)      |
//! | 32..40            | master key id, raw (the record's `master_key_id`)           |
//! | 40..52            | AES-256-GCM-SIV nonce                                       |
//! | 52..56            | `L`, length of the ciphertext, u32 little-endian            |
//! | 56..56+L          | ciphertext and tag of (data key ‖ [040] seed)               |
//! | 56+L..len-32      | zeros                                                       |
//! | len-32..len       | BLAKE3 of bytes `0..len-32`                                 |
//!
//! `len` is `56 + L + 32` rounded up to a multiple of 4096: one page for the default word
//! length, fixed for the life of the seal.

use thiserror::Error;

use crate::keys::{KEY_BYTES, NONCE_BYTES, WRAP_ALGORITHM};
use crate::record::WrappedKey;

/// First 16 bytes of every slot.
pub const SLOT_MAGIC: &[u8; 16] = b"PDGUARD-KEYSLOT1";
/// Suffix of the slot beside its record: `disk.img.pdguard` -> `disk.img.pdguard.key`.
pub const SLOT_SUFFIX: &str = ".key";
/// Slots are rounded up to this many bytes.
pub const SLOT_GRAIN: usize = 4096;
/// Larger than any slot (a 65536-byte word makes a slot of 20 pages).
pub const MAX_SLOT_BYTES: u64 = 128 << 10;

const HEAD: usize = 56;
const SUM: usize = 32;
const TAG_BYTES: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SlotError {
    #[error(
        "it is not a pdguard key slot (no {} magic)",
        String::from_utf8_lossy(SLOT_MAGIC)
    )]
    NotASlot,
    #[error("it is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("the wrapped key to store is malformed ({0})")]
    Malformed(&'static str),
}

/// The slot file's bytes for `wrapped` of seal `seal_id`.
pub fn encode(seal_id: &str, wrapped: &WrappedKey) -> Result<Vec<u8>, SlotError> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(seal_id, &mut id).map_err(|_| SlotError::Malformed("seal id"))?;
    let mut key_id = [0u8; 8];
    hex::decode_to_slice(&wrapped.master_key_id, &mut key_id)
        .map_err(|_| SlotError::Malformed("master key id"))?;
    let mut nonce = [0u8; NONCE_BYTES];
    hex::decode_to_slice(&wrapped.nonce, &mut nonce).map_err(|_| SlotError::Malformed("nonce"))?;
    let ct = hex::decode(&wrapped.ciphertext).map_err(|_| SlotError::Malformed("ciphertext"))?;
    if wrapped.algorithm != WRAP_ALGORITHM {
        return Err(SlotError::Malformed("algorithm"));
    }
    let len = (HEAD + ct.len() + SUM).div_ceil(SLOT_GRAIN) * SLOT_GRAIN;
    if len as u64 > MAX_SLOT_BYTES {
        return Err(SlotError::Malformed("ciphertext too long"));
    }
    let mut b = vec![0u8; len];
    b[..16].copy_from_slice(SLOT_MAGIC);
    b[16..32].copy_from_slice(&id);
    b[32..40].copy_from_slice(&key_id);
    b[40..52].copy_from_slice(&nonce);
    b[52..56].copy_from_slice(&(ct.len() as u32).to_le_bytes());
    b[HEAD..HEAD + ct.len()].copy_from_slice(&ct);
    let sum = blake3::hash(&b[..len - SUM]);
    b[len - SUM..].copy_from_slice(sum.as_bytes());
    Ok(b)
}

/// What a slot holds: the seal id it belongs to and the wrapped key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub seal_id: String,
    pub wrapped: WrappedKey,
}

/// Parse and check a slot file's bytes; every bound is checked before it is used.
pub fn decode(b: &[u8]) -> Result<Slot, SlotError> {
    if b.len() < HEAD + SUM || b[..16] != SLOT_MAGIC[..] {
        return Err(SlotError::NotASlot);
    }
    if !b.len().is_multiple_of(SLOT_GRAIN) || b.len() as u64 > MAX_SLOT_BYTES {
        return Err(SlotError::Corrupt(
            "its size is not a whole number of slot pages",
        ));
    }
    let body = b.len() - SUM;
    if blake3::hash(&b[..body]).as_bytes()[..] != b[body..] {
        return Err(SlotError::Corrupt(
            "its checksum does not match (torn or overwritten)",
        ));
    }
    let mut l = [0u8; 4];
    l.copy_from_slice(&b[52..56]);
    let l = u32::from_le_bytes(l) as usize;
    if l < KEY_BYTES + TAG_BYTES || HEAD + l > body {
        return Err(SlotError::Corrupt("its ciphertext length is out of range"));
    }
    Ok(Slot {
        seal_id: hex::encode(&b[16..32]),
        wrapped: WrappedKey {
            algorithm: WRAP_ALGORITHM.into(),
            master_key_id: hex::encode(&b[32..40]),
            nonce: hex::encode(&b[40..52]),
            ciphertext: hex::encode(&b[HEAD..HEAD + l]),
        },
    })
}

/// The raw ciphertext bytes of a slot (for tests that look for them on a raw device).
pub fn ciphertext_range(b: &[u8]) -> Option<std::ops::Range<usize>> {
    let l = u32::from_le_bytes(b.get(52..56)?.try_into().ok()?) as usize;
    (HEAD + l <= b.len()).then_some(HEAD..HEAD + l)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn wrapped(ct_len: usize) -> WrappedKey {
        WrappedKey {
            algorithm: WRAP_ALGORITHM.into(),
            master_key_id: "0123456789abcdef".into(),
            nonce: "aa".repeat(12),
            ciphertext: "5c".repeat(ct_len),
        }
    }

    #[test]
    fn round_trip_and_size() {
        let id = "00112233445566778899aabbccddeeff";
        let b = encode(id, &wrapped(80)).unwrap();
        assert_eq!(b.len(), 4096);
        let s = decode(&b).unwrap();
        assert_eq!(s.seal_id, id);
        assert_eq!(s.wrapped, wrapped(80));
        assert_eq!(&b[ciphertext_range(&b).unwrap()], &[0x5c; 80][..]);
        // The largest word length still fits.
        let big = encode(id, &wrapped(32 + 65536 + 16)).unwrap();
        assert_eq!(decode(&big).unwrap().wrapped, wrapped(32 + 65536 + 16));
    }

    #[test]
    fn every_flipped_byte_and_cut_is_refused() {
        let b = encode("00112233445566778899aabbccddeeff", &wrapped(80)).unwrap();
        for i in (0..b.len()).step_by(7) {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(decode(&c).is_err(), "flip at {i}");
        }
        for cut in [0, 10, 60, 4095] {
            assert!(decode(&b[..cut]).is_err());
        }
        assert_eq!(decode(&[0u8; 4096]), Err(SlotError::NotASlot));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000), magic in proptest::prelude::any::<bool>()) {
            if magic && bytes.len() >= 16 {
                bytes[..16].copy_from_slice(SLOT_MAGIC);
            }
            let _ = decode(&bytes);
            let _ = ciphertext_range(&bytes);
        }
    }
}
