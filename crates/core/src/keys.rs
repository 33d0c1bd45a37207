//! Keys of the secure profile (DESIGN.md §6), pure: no randomness, no files.
//!
//! - The **master key** (32 bytes) lives in a key file made by `pdguard keygen`; it only
//!   wraps per-seal data keys.
//! - Each seal draws a fresh **data key** (32 bytes). HKDF-SHA256 (salt = the seal id)
//!   derives from it, under distinct labels, the AES-256-XTS key (64 bytes), the placement
//!   key, the digest key and the dense data map key (32 bytes each).
//! - The data key and the [040] seed are wrapped together with AES-256-GCM-SIV under the
//!   master key; the associated data binds the record version and the disk identity (seal
//!   id, sizes, geometry, placement), so a wrapped key moved to another record fails to
//!   unwrap. Only the wrapped form is ever stored.
//! - The placement seed is a keyed BLAKE3 (placement key) of the [040] seed, the seal id and
//!   the image size: still derived from the patent's seed, unpredictable without the key.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::record::{SealRecord, WrappedKey};

/// Bytes of a master key and of a data key.
pub const KEY_BYTES: usize = 32;
/// Bytes of the AEAD nonce.
pub const NONCE_BYTES: usize = 12;
/// The AEAD named in records.
pub const WRAP_ALGORITHM: &str = "aes-256-gcm-siv";
/// First word of a master key file.
pub const KEY_FILE_MAGIC: &str = "PDGUARD-MASTER-KEY";

const LABEL_XTS: &[u8] = b"pdguard 2026-11 sector cipher aes-256-xts v1";
const LABEL_PLACEMENT: &[u8] = b"pdguard 2026-11 placement key v1";
const LABEL_DIGEST: &[u8] = b"pdguard 2026-11 plaintext digest key v1";
const LABEL_DENSE_MAP: &[u8] = b"pdguard 2026-12 dense data map key v1";
const CONTEXT_KEY_ID: &str = "pdguard 2026-11 master key id v1";
const LABEL_RECORD_MAC: &[u8] = b"pdguard 2026-12 seal record mac v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("it is not a pdguard master key file (expected one line `{KEY_FILE_MAGIC} 1 <64 hex digits>`); make one with `pdguard keygen PATH`")]
    NotAKeyFile,
    #[error("the seal record's wrapped key uses {0:?}, unknown to this pdguard; upgrade pdguard")]
    Algorithm(String),
    #[error("the seal record's wrapped key is malformed ({0})")]
    Malformed(&'static str),
    #[error("the wrapped key does not open with this master key: the key is wrong or the seal record was altered")]
    Unwrap,
}

/// The master key. Never printed: its `Debug` shows only its id.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; KEY_BYTES]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(id {})", self.id())
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// A public name of the key (8 bytes of a one-way hash), stored in records so that a
    /// wrong key file is named as such.
    pub fn id(&self) -> String {
        hex::encode(&blake3::derive_key(CONTEXT_KEY_ID, &self.0)[..8])
    }

    /// The key file's contents.
    pub fn to_file(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{KEY_FILE_MAGIC} 1 {}\n", hex::encode(self.0)))
    }

    /// Parse a key file's contents.
    pub fn from_file(text: &[u8]) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(text).map_err(|_| KeyError::NotAKeyFile)?;
        let mut words = text.split_whitespace();
        if words.next() != Some(KEY_FILE_MAGIC) || words.next() != Some("1") {
            return Err(KeyError::NotAKeyFile);
        }
        let hexkey = words.next().ok_or(KeyError::NotAKeyFile)?;
        if words.next().is_some() || hexkey.len() != 2 * KEY_BYTES {
            return Err(KeyError::NotAKeyFile);
        }
        let mut key = [0u8; KEY_BYTES];
        hex::decode_to_slice(hexkey, &mut key).map_err(|_| KeyError::NotAKeyFile)?;
        Ok(Self(key))
    }
}

/// The key of a version 3 record's MAC: HKDF-SHA256 of the master key, salt = the seal id,
/// info = `pdguard 2026-12 seal record mac v1`. One key per seal, so a record's MAC cannot
/// be moved to another seal's record.
pub fn record_mac_key(master: &MasterKey, seal_id: &str) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(seal_id.as_bytes()), &master.0);
    let mut key = Zeroizing::new([0u8; 32]);
    // expand only fails for outputs longer than 255 * 32 bytes.
    let ok = hk.expand(LABEL_RECORD_MAC, &mut key[..]).is_ok();
    debug_assert!(ok);
    key
}

/// A per-seal data key.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_BYTES]);

impl DataKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The keys of one seal, from this data key and the seal id.
    pub fn derive(&self, seal_id: &str) -> SealKeys {
        let hk = Hkdf::<Sha256>::new(Some(seal_id.as_bytes()), &self.0);
        let mut keys = SealKeys {
            xts: [0; 64],
            placement: [0; 32],
            digest: [0; 32],
            dense_map: [0; 32],
        };
        // expand only fails for outputs longer than 255 * 32 bytes.
        let ok = hk.expand(LABEL_XTS, &mut keys.xts).is_ok()
            && hk.expand(LABEL_PLACEMENT, &mut keys.placement).is_ok()
            && hk.expand(LABEL_DIGEST, &mut keys.digest).is_ok()
            && hk.expand(LABEL_DENSE_MAP, &mut keys.dense_map).is_ok();
        debug_assert!(ok);
        keys
    }
}

/// The keys one seal uses. Wiped from memory when dropped.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SealKeys {
    /// AES-256-XTS key: data half then tweak half.
    pub xts: [u8; 64],
    /// Keys the placement seed.
    pub placement: [u8; 32],
    /// Keys the plaintext digest (a plain hash of the plaintext would let anyone confirm a
    /// guess of the disk's contents).
    pub digest: [u8; 32],
    /// Encrypts a dense seal's data map in the record (`dense.rs`).
    pub dense_map: [u8; 32],
}

impl SealKeys {
    /// The seed the placement is built from: keyed BLAKE3 of the [040] seed, the seal id
    /// and the image size.
    pub fn placement_seed(&self, data_seed: &[u8], seal_id: &str, image_bytes: u64) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.placement);
        h.update(&(data_seed.len() as u64).to_le_bytes());
        h.update(data_seed);
        h.update(seal_id.as_bytes());
        h.update(&image_bytes.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

/// The associated data of the key wrap: record version and disk identity.
pub fn wrap_aad(rec: &SealRecord) -> Vec<u8> {
    // A record in phase `migrating` (version 5) is a version 4 record during an instant
    // reclaim: its key was wrapped under version 4.
    let version = if rec.version == crate::record::MIGRATING_VERSION {
        crate::record::RECORD_VERSION
    } else {
        rec.version
    };
    let mut aad = format!(
        "pdguard seal record v{}|seal {}|profile {}|placement {}|bytes {}|sector {}|word {}|sectors {}|slots {}",
        version,
        rec.seal_id,
        rec.profile.name(),
        rec.placement,
        rec.image_bytes,
        rec.sector_size,
        rec.word_length,
        rec.sectors,
        rec.thin_sectors
    );
    // Version 2 binds the fields that change what the sealed bytes mean.
    if rec.version >= 2 {
        aad.push_str(&format!(
            "|digest {}|keep-holes {}",
            rec.digest, rec.keep_holes
        ));
    }
    aad.into_bytes()
}

/// Wrap `data_key` and the [040] `seed` under `master`, bound to `aad`.
pub fn wrap(
    master: &MasterKey,
    data_key: &DataKey,
    seed: &[u8],
    nonce: [u8; NONCE_BYTES],
    aad: &[u8],
) -> WrappedKey {
    let aead = Aes256GcmSiv::new(&master.0.into());
    let mut msg = Zeroizing::new(Vec::with_capacity(KEY_BYTES + seed.len()));
    msg.extend_from_slice(&data_key.0);
    msg.extend_from_slice(seed);
    // Encryption with a valid key and nonce cannot fail for messages under 2^36 bytes.
    let ct = aead
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: &msg, aad })
        .unwrap_or_default();
    WrappedKey {
        algorithm: WRAP_ALGORITHM.into(),
        master_key_id: master.id(),
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ct),
    }
}

/// Unwrap a data key and the [040] seed.
pub fn unwrap(
    master: &MasterKey,
    wrapped: &WrappedKey,
    aad: &[u8],
) -> Result<(DataKey, Zeroizing<Vec<u8>>), KeyError> {
    if wrapped.algorithm != WRAP_ALGORITHM {
        return Err(KeyError::Algorithm(wrapped.algorithm.clone()));
    }
    let mut nonce = [0u8; NONCE_BYTES];
    hex::decode_to_slice(&wrapped.nonce, &mut nonce).map_err(|_| KeyError::Malformed("nonce"))?;
    let ct = hex::decode(&wrapped.ciphertext).map_err(|_| KeyError::Malformed("ciphertext"))?;
    let aead = Aes256GcmSiv::new(&master.0.into());
    let msg = Zeroizing::new(
        aead.decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad })
            .map_err(|_| KeyError::Unwrap)?,
    );
    if msg.len() < KEY_BYTES {
        return Err(KeyError::Malformed("plaintext too short"));
    }
    let mut key = [0u8; KEY_BYTES];
    key.copy_from_slice(&msg[..KEY_BYTES]);
    let data = DataKey(key);
    key.zeroize();
    Ok((data, Zeroizing::new(msg[KEY_BYTES..].to_vec())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_and_refusals() {
        let k = MasterKey::from_bytes([9; 32]);
        let back = MasterKey::from_file(k.to_file().as_bytes()).unwrap();
        assert_eq!(back.id(), k.id());
        for bad in [
            &b""[..],
            b"hello",
            b"PDGUARD-MASTER-KEY 2 0909",
            b"PDGUARD-MASTER-KEY 1 zz",
            b"PDGUARD-MASTER-KEY 1 0909090909090909090909090909090909090909090909090909090909090909 extra",
        ] {
            assert_eq!(MasterKey::from_file(bad).unwrap_err(), KeyError::NotAKeyFile);
        }
        assert!(!format!("{k:?}").contains("0909"), "Debug leaks the key");
    }

    #[test]
    fn wrap_unwrap_round_trip_and_binding() {
        let m = MasterKey::from_bytes([1; 32]);
        let w = wrap(
            &m,
            &DataKey::from_bytes([2; 32]),
            b"seedseed",
            [3; 12],
            b"aad",
        );
        let (d, seed) = unwrap(&m, &w, b"aad").unwrap();
        assert_eq!(d.0, [2; 32]);
        assert_eq!(&seed[..], b"seedseed");
        assert!(!w.ciphertext.contains(&hex::encode([2u8; 32])));
        assert_eq!(
            unwrap(&MasterKey::from_bytes([4; 32]), &w, b"aad").err(),
            Some(KeyError::Unwrap)
        );
        assert_eq!(unwrap(&m, &w, b"other").err(), Some(KeyError::Unwrap));
        let mut t = w.clone();
        t.ciphertext.replace_range(0..2, "ff");
        assert_eq!(unwrap(&m, &t, b"aad").err(), Some(KeyError::Unwrap));
    }

    #[test]
    fn record_mac_keys_differ_by_master_and_seal() {
        let a = MasterKey::from_bytes([1; 32]);
        let b = MasterKey::from_bytes([2; 32]);
        assert_ne!(*record_mac_key(&a, "s1"), *record_mac_key(&a, "s2"));
        assert_ne!(*record_mac_key(&a, "s1"), *record_mac_key(&b, "s1"));
        assert_eq!(*record_mac_key(&a, "s1"), *record_mac_key(&a, "s1"));
    }

    #[test]
    fn derived_keys_differ_by_label_and_seal() {
        let d = DataKey::from_bytes([5; 32]);
        let a = d.derive("seal-a");
        let b = d.derive("seal-b");
        assert_ne!(a.xts[..32], a.xts[32..]);
        assert_ne!(a.placement, a.digest);
        assert_ne!(a.dense_map, a.digest);
        assert_ne!(a.placement, b.placement);
        assert_ne!(
            a.placement_seed(&[0; 32], "seal-a", 512),
            b.placement_seed(&[0; 32], "seal-a", 512)
        );
        // A zero [040] seed no longer gives a predictable placement.
        assert_ne!(a.placement_seed(&[0; 32], "s", 512), [0; 32]);
    }
}
