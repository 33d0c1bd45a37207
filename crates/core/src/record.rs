//! The seal record: the durable journal of one seal (DESIGN.md §2, §3).
//!
//! It lives beside the image at `PATH.pdguard` and is always replaced atomically (write a
//! temporary file, fsync, rename, fsync the directory), so a reader sees either the old or
//! the new record, never a torn one. `docs/seal-record.md` documents every field.
//!
//! File layout (text, UTF-8):
//!
//! | bytes          | content                                                          |
//! |----------------|------------------------------------------------------------------|
//! | line 1         | `PDGUARD-SEAL-RECORD <version> <blake3 hex of the body>`         |
//! | rest (body)    | the [`SealRecord`] as pretty-printed JSON, then `\n`             |
//!
//! The checksum turns a torn or edited record into a clear "corrupt" error instead of a
//! wrong unseal. A `version` above [`RECORD_VERSION`] is refused: a newer pdguard wrote it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::DigestScheme;
use crate::geometry::{Geometry, GeometryError};
use crate::placement::PlacementKind;

/// First word of every record file.
pub const RECORD_MAGIC: &str = "PDGUARD-SEAL-RECORD";
/// Version this build writes, and the newest it reads.
/// Version 2 added `digest` (the `blake3-64k` scheme) and `keep_holes`; version 1 records
/// are read as `digest: blake3`, `keep_holes: false`.
pub const RECORD_VERSION: u32 = 2;
/// Suffix of the record beside its image: `disk.img` -> `disk.img.pdguard`.
pub const RECORD_SUFFIX: &str = ".pdguard";
/// Records are small; anything larger is not one of ours.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("it is not a pdguard seal record (first line does not start with {RECORD_MAGIC})")]
    NotARecord,
    #[error("it was written by a newer pdguard (record version {0}, this build reads up to {RECORD_VERSION}); upgrade pdguard")]
    NewerVersion(u32),
    #[error("it is corrupt: {0}")]
    Corrupt(String),
    #[error("it is inconsistent: {0}")]
    Inconsistent(String),
}

/// What a seal hides (DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// The patent's literal method: data seed, no key, no encryption. Hides sector order only.
    Patent,
    /// Keyed placement and AES-256-XTS per sector with a wrapped per-seal key.
    Secure,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Self::Patent => "patent",
            Self::Secure => "secure",
        }
    }
}

/// Where a seal or unseal stands, and so which copy of the data is authoritative.
///
/// | phase            | authoritative copy                 | a crash is followed by        |
/// |------------------|------------------------------------|-------------------------------|
/// | `seal-scatter`   | the image (plaintext, untouched)   | seal: restart scatter; unseal: drop thin disk and record |
/// | `seal-gather`    | the thin disk (complete, synced)   | seal: restart gather; unseal: plain gather from the thin disk |
/// | `sealed`         | the image (sealed)                 | nothing to do (stale thin disk removed) |
/// | `unseal-scatter` | the image (sealed, untouched)      | unseal: restart scatter; seal: drop thin disk, back to `sealed` |
/// | `unseal-gather`  | the thin disk (complete, synced)   | unseal: restart gather; seal: sealed gather from the thin disk |
/// | `unsealed`       | the image (plaintext, verified)    | remove thin disk and record   |
/// | `shredded`       | none: the key was destroyed        | nothing; the data is gone     |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    SealScatter,
    SealGather,
    Sealed,
    UnsealScatter,
    UnsealGather,
    Unsealed,
    /// Crypto-erased by `image shred`: the wrapped key was overwritten and removed.
    Shredded,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::SealScatter => "seal-scatter",
            Self::SealGather => "seal-gather",
            Self::Sealed => "sealed",
            Self::UnsealScatter => "unseal-scatter",
            Self::UnsealGather => "unseal-gather",
            Self::Unsealed => "unsealed",
            Self::Shredded => "shredded",
        }
    }

    /// True while the thin disk, not the image, holds the one complete copy of the data.
    pub fn thin_is_authoritative(self) -> bool {
        matches!(self, Self::SealGather | Self::UnsealGather)
    }
}

/// A per-seal data key wrapped by the master key (secure profile). Never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// AEAD that wraps the data key, e.g. `aes-256-gcm-siv`.
    pub algorithm: String,
    /// Identifies the master key (a hash of it), so a wrong key file is named as such.
    pub master_key_id: String,
    /// Hex nonce of the AEAD.
    pub nonce: String,
    /// Hex ciphertext and tag of the data key.
    pub ciphertext: String,
}

/// One seal, as journaled. Digests and identifiers are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealRecord {
    pub version: u32,
    /// Random 128-bit identifier of this seal.
    pub seal_id: String,
    pub profile: Profile,
    /// `patent` or `feistel`.
    pub placement: String,
    /// How bytes are moved (`direct`); never changes the bytes that end up on the disk.
    pub strategy: String,
    /// Size of the image in bytes (`sectors * sector_size`).
    pub image_bytes: u64,
    pub sector_size: u32,
    pub word_length: u32,
    /// `N`.
    pub sectors: u64,
    /// `M`.
    pub thin_sectors: u64,
    /// Hex [040] seed (patent profile only; the secure profile keeps it inside the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_key: Option<WrappedKey>,
    pub phase: Phase,
    /// Path of the thin disk while a job runs.
    pub thin_path: String,
    /// How `plain_digest` and `sealed_digest` are computed: `blake3-64k` (version 2) or
    /// `blake3` (version 1 records, where the field is absent). See `digest.rs`.
    #[serde(default = "legacy_digest")]
    pub digest: String,
    /// Secure profile: sectors of zeros stay zeros (not encrypted) so that holes stay holes;
    /// leaks how many sectors are zero (`--keep-holes`). Always false in the patent profile,
    /// where zeros stay zeros anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_holes: bool,
    /// BLAKE3 of the plaintext image, known from the end of seal scatter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_digest: Option<String>,
    /// BLAKE3 of the sealed image, known once sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_digest: Option<String>,
    /// BLAKE3 of a few sampled sectors of the sealed image: a cheap identity check that the
    /// record belongs to this image before an unseal starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_fingerprint: Option<String>,
    /// Unix seconds of the seal's start and of this record's last write.
    pub created_unix: u64,
    pub updated_unix: u64,
    /// The pdguard that wrote the record, e.g. `pdguard 0.1.0`.
    pub writer: String,
}

/// Records of version 1 have no `digest` field: they hash the whole image.
fn legacy_digest() -> String {
    DigestScheme::Whole.name().into()
}

impl SealRecord {
    /// The geometry this record describes.
    pub fn geometry(&self) -> Result<Geometry, GeometryError> {
        Geometry::with_slots(
            self.sectors,
            self.thin_sectors,
            self.sector_size,
            self.word_length,
        )
    }

    pub fn placement_kind(&self) -> Option<PlacementKind> {
        PlacementKind::from_name(&self.placement)
    }

    pub fn digest_scheme(&self) -> Option<DigestScheme> {
        DigestScheme::from_name(&self.digest)
    }

    /// Serialise with the checksummed header line.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a plain struct of strings and integers cannot fail.
        let body = match serde_json::to_string_pretty(self) {
            Ok(s) => s + "\n",
            Err(e) => unreachable!("seal record serialisation failed: {e}"),
        };
        let sum = blake3::hash(body.as_bytes()).to_hex();
        format!("{RECORD_MAGIC} {} {sum}\n{body}", self.version).into_bytes()
    }

    /// Parse and check a record file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::Corrupt(format!(
                "{} bytes is larger than any record",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| RecordError::NotARecord)?;
        let (header, body) = text.split_once('\n').ok_or(RecordError::NotARecord)?;
        let mut words = header.split(' ');
        if words.next() != Some(RECORD_MAGIC) {
            return Err(RecordError::NotARecord);
        }
        let version: u32 = words
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| RecordError::Corrupt("header has no version number".into()))?;
        if version > RECORD_VERSION {
            return Err(RecordError::NewerVersion(version));
        }
        let sum = words
            .next()
            .ok_or_else(|| RecordError::Corrupt("header has no checksum".into()))?;
        if blake3::hash(body.as_bytes()).to_hex().as_str() != sum {
            return Err(RecordError::Corrupt(
                "checksum does not match its contents (torn or edited)".into(),
            ));
        }
        let rec: Self =
            serde_json::from_str(body).map_err(|e| RecordError::Corrupt(e.to_string()))?;
        if rec.version != version {
            return Err(RecordError::Corrupt(format!(
                "header says version {version}, body says {}",
                rec.version
            )));
        }
        rec.check()?;
        Ok(rec)
    }

    /// Internal consistency: what a valid writer always produces.
    fn check(&self) -> Result<(), RecordError> {
        let bad = |m: String| Err(RecordError::Inconsistent(m));
        let g = self
            .geometry()
            .map_err(|e| RecordError::Inconsistent(e.to_string()))?;
        if g.disk_bytes() != self.image_bytes {
            return bad(format!(
                "image_bytes {} is not sectors x sector_size",
                self.image_bytes
            ));
        }
        if self.placement_kind().is_none() {
            return bad(format!("unknown placement {:?}", self.placement));
        }
        if self.digest_scheme().is_none() {
            return bad(format!("unknown digest scheme {:?}", self.digest));
        }
        if self.keep_holes && self.profile != Profile::Secure {
            return bad("keep_holes outside the secure profile".into());
        }
        match self.profile {
            Profile::Patent if self.seed.is_none() => {
                return bad("patent profile without a seed".into())
            }
            Profile::Secure if self.wrapped_key.is_none() && self.phase != Phase::Shredded => {
                return bad("secure profile without a wrapped key".into())
            }
            Profile::Secure if self.seed.is_some() => {
                return bad("secure profile with a seed in the clear".into())
            }
            _ => {}
        }
        let after_scatter = !matches!(self.phase, Phase::SealScatter | Phase::Shredded);
        if after_scatter && self.plain_digest.is_none() {
            return bad(format!("phase {} without plain_digest", self.phase.name()));
        }
        // An unseal gather may also come from rolling back a seal gather, before any
        // sealed digest existed; only these two phases need one.
        let sealed_once = matches!(self.phase, Phase::Sealed | Phase::UnsealScatter);
        if sealed_once && self.sealed_digest.is_none() {
            return bad(format!("phase {} without sealed_digest", self.phase.name()));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> SealRecord {
        SealRecord {
            version: RECORD_VERSION,
            seal_id: "00112233445566778899aabbccddeeff".into(),
            profile: Profile::Patent,
            placement: "patent".into(),
            strategy: "direct".into(),
            image_bytes: 6 * 512,
            sector_size: 512,
            word_length: 32,
            sectors: 6,
            thin_sectors: 12,
            seed: Some("00".repeat(32)),
            wrapped_key: None,
            phase: Phase::Sealed,
            thin_path: "/tmp/x.pdguard-thin".into(),
            plain_digest: Some("ab".repeat(32)),
            sealed_digest: Some("cd".repeat(32)),
            sealed_fingerprint: Some("ef".repeat(32)),
            digest: "blake3-64k".into(),
            keep_holes: false,
            created_unix: 1,
            updated_unix: 2,
            writer: "pdguard test".into(),
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = SealRecord::decode(&bytes);
        }

        #[test]
        fn decoding_a_mangled_record_never_panics(cut in 0usize..2000, flip in proptest::prelude::any::<u8>(), at in 0usize..2000) {
            let mut b = sample().encode();
            let at = at % b.len();
            b[at] ^= flip;
            b.truncate(cut.max(1));
            let _ = SealRecord::decode(&b);
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        assert_eq!(SealRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(SealRecord::decode(&b).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn truncated_record_is_refused() {
        let bytes = sample().encode();
        for cut in [0, 5, 30, bytes.len() / 2, bytes.len() - 1] {
            assert!(SealRecord::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn newer_version_is_named() {
        let mut r = sample();
        r.version = RECORD_VERSION + 1;
        assert_eq!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::NewerVersion(RECORD_VERSION + 1))
        );
    }

    /// A version 1 record (no `digest`, no `keep_holes`) reads as the whole-image BLAKE3
    /// digest without holes kept, which is what version 1 wrote.
    #[test]
    fn version_1_records_still_read() {
        let mut r = sample();
        r.version = 1;
        let text = String::from_utf8(r.encode()).unwrap();
        let (_, body) = text.split_once('\n').unwrap();
        let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("digest");
        obj.remove("keep_holes");
        let body = serde_json::to_string_pretty(&v).unwrap() + "\n";
        let sum = blake3::hash(body.as_bytes()).to_hex();
        let old = format!("{RECORD_MAGIC} 1 {sum}\n{body}");
        let got = SealRecord::decode(old.as_bytes()).unwrap();
        assert_eq!(got.digest_scheme(), Some(DigestScheme::Whole));
        assert!(!got.keep_holes);
    }

    #[test]
    fn unknown_digest_and_misplaced_keep_holes_are_inconsistent() {
        let mut r = sample();
        r.digest = "md5".into();
        assert!(matches!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::Inconsistent(_))
        ));
        let mut r = sample();
        r.keep_holes = true; // the sample is in the patent profile
        assert!(matches!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::Inconsistent(_))
        ));
    }

    #[test]
    fn foreign_file_is_not_a_record() {
        assert_eq!(
            SealRecord::decode(b"hello world\n{}"),
            Err(RecordError::NotARecord)
        );
    }

    #[test]
    fn inconsistent_record_is_refused() {
        let mut r = sample();
        r.image_bytes += 1;
        assert!(matches!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::Inconsistent(_))
        ));
        let mut r = sample();
        r.sealed_digest = None;
        assert!(matches!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::Inconsistent(_))
        ));
    }
}
