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
//! | line 1         | `PDGUARD-SEAL-RECORD <version> <blake3 hex of the body>[ <mac>]`  |
//! | rest (body)    | the [`SealRecord`] as pretty-printed JSON, then `\n`             |
//!
//! The checksum turns a torn record into a clear "corrupt" error instead of a wrong unseal;
//! anyone can recompute it, so it proves nothing against an edit. Version 3 adds a fourth
//! word: the hex keyed BLAKE3 of the body under a key derived from the master key and the
//! seal id (`keys::record_mac_key`), or `-` when the record has none (patent profile, or a
//! `shredding`/`shredded` record written without the key). [`authenticate`] checks it.
//! A `version` above [`RECORD_VERSION`] is refused: a newer pdguard wrote it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::DigestScheme;
use crate::geometry::{Geometry, GeometryError};
use crate::placement::PlacementKind;
use crate::region_tree::{MAX_REGION_BYTES, MIN_REGION_BYTES};

/// First word of every record file.
pub const RECORD_MAGIC: &str = "PDGUARD-SEAL-RECORD";
/// Version this build writes, and the newest it reads.
/// Version 2 added `digest` (the `blake3-64k` scheme) and `keep_holes`; version 1 records
/// are read as `digest: blake3`, `keep_holes: false`. Version 3 added the MAC word of the
/// header, the `key_slot` (the wrapped key moved out of the record into its key-slot file)
/// and the `shredding` phase. Version 4 added `dense` (dense placement of a `keep_holes`
/// seal: the sealed data is `[0, D)`, the original's data map encrypted in the record).
pub const RECORD_VERSION: u32 = 4;
/// The version of a record in phase `migrating` (an instant reclaim under way,
/// `docs/instant-reclaim.md`): a pdguard that reads up to version 4 refuses it as written by
/// a newer pdguard instead of acting on a phase it does not know. Only that phase is
/// written so; the record goes back to [`RECORD_VERSION`] when the migration ends.
pub const MIGRATING_VERSION: u32 = 5;
/// The first version with dense placement.
pub const DENSE_VERSION: u32 = 4;
/// The first version with a MAC word and a key-slot file.
pub const KEY_SLOT_VERSION: u32 = 3;
/// Suffix of the record beside its image: `disk.img` -> `disk.img.pdguard`.
pub const RECORD_SUFFIX: &str = ".pdguard";
/// Records are small; anything larger is not one of ours.
/// (A dense record holds its data map: at most
/// [`MAX_DENSE_RANGES`](crate::dense::MAX_DENSE_RANGES) ranges, 32 hex digits each.)
pub const MAX_RECORD_BYTES: usize = 16 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("it is not a pdguard seal record (first line does not start with {RECORD_MAGIC})")]
    NotARecord,
    #[error("it was written by a newer pdguard (record version {0}, this build reads up to {MIGRATING_VERSION}); upgrade pdguard")]
    NewerVersion(u32),
    #[error("it is corrupt: {0}")]
    Corrupt(String),
    #[error("it is inconsistent: {0}")]
    Inconsistent(String),
    #[error("it is not authentic: {0}; it was edited or replaced after pdguard wrote it, so nothing was touched")]
    Unauthenticated(&'static str),
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
/// | `shredding`      | none: the key slot is being erased | `shred` again finishes it     |
/// | `shredded`       | none: the key was destroyed        | nothing; the data is gone     |
/// | `migrating`      | per region, the moved map `RECORD.moved` says | the migration resumes from the moved map |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    SealScatter,
    SealGather,
    Sealed,
    UnsealScatter,
    UnsealGather,
    Unsealed,
    /// `image shred` started: the key slot is being overwritten and removed.
    Shredding,
    /// Crypto-erased by `image shred`: the wrapped key was overwritten and removed.
    Shredded,
    /// An instant reclaim under way (record version [`MIGRATING_VERSION`]): each region's
    /// data is at its plain or its sealed place, as the moved map says.
    Migrating,
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
            Self::Shredding => "shredding",
            Self::Shredded => "shredded",
            Self::Migrating => "migrating",
        }
    }

    /// True while the thin disk, not the image, holds the one complete copy of the data.
    pub fn thin_is_authoritative(self) -> bool {
        matches!(self, Self::SealGather | Self::UnsealGather)
    }

    /// True once a shred has begun: the record holds no key and needs none.
    pub fn is_shred(self) -> bool {
        matches!(self, Self::Shredding | Self::Shredded)
    }
}

/// Where a version 3 secure seal keeps its wrapped key: the key-slot file beside the
/// record (`keyslot.rs`). The record holds no copy of the wrapped key, only what names and
/// binds the slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlotRef {
    /// AEAD that wraps the data key, e.g. `aes-256-gcm-siv`.
    pub algorithm: String,
    /// Identifies the master key (a hash of it), so a wrong key file is named as such.
    pub master_key_id: String,
    /// Size of the slot file in bytes (fixed for the seal's life).
    pub bytes: u64,
    /// BLAKE3 of the whole slot file: binds this record to its slot.
    pub checksum: String,
}

/// Version 4, dense placement (secure profile with `keep_holes`): the sealed data is the
/// first `sectors` sectors of the image, the rest holes; see `dense.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenseRef {
    /// `D`: sectors of the original's data ranges (rounded out to whole sectors), placed
    /// among the first `D` sectors of the sealed image. The thin disk has `thin_sectors`
    /// slots, `M >= D`.
    pub sectors: u64,
    /// The original's data map, encrypted under the seal's map key (hex; `dense.rs`).
    pub map: String,
}

/// Version 4, optional: the region digest tree recorded at seal time (`region_tree.rs`,
/// `docs/instant-reclaim.md` section 6). The leaves are in the file `RECORD.tree` beside
/// the record (its path derived from the record's, never read from a record); the record
/// holds what authenticates them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionTreeRef {
    /// `R`: a power of two that the sector size divides, 4 KiB to 1 GiB.
    pub region_bytes: u64,
    /// `ceil(image_bytes / R)`.
    pub regions: u64,
    /// The tree's root: 64 lowercase hex digits.
    pub root: String,
}

impl RegionTreeRef {
    /// The root as bytes; `None` unless it is 64 lowercase hex digits.
    pub fn root_bytes(&self) -> Option<[u8; 32]> {
        let lower = self
            .root
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut out = [0u8; 32];
        (self.root.len() == 64 && lower && hex::decode_to_slice(&self.root, &mut out).is_ok())
            .then_some(out)
    }
}

/// Version 4, optional: the placement table recorded at seal time (`place_table.rs`,
/// `docs/seal-record.md`): the patent placement's `slot_of`, or the used slots of a seal
/// with slack, in the file `RECORD.place` beside the record (its path derived from the
/// record's, never read from a record), so that an instant reclaim's start reads it
/// instead of rebuilding it. The record holds what authenticates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceTableRef {
    /// Size of the file in bytes.
    pub bytes: u64,
    /// BLAKE3 of the file as stored: 64 lowercase hex digits.
    pub digest: String,
}

impl PlaceTableRef {
    /// The digest as bytes; `None` unless it is 64 lowercase hex digits.
    pub fn digest_bytes(&self) -> Option<[u8; 32]> {
        hex_32(&self.digest)
    }
}

fn hex_32(s: &str) -> Option<[u8; 32]> {
    let lower = s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let mut out = [0u8; 32];
    (s.len() == 64 && lower && hex::decode_to_slice(s, &mut out).is_ok()).then_some(out)
}

/// True for a seal id as pdguard draws it: exactly 32 lowercase hex digits. It becomes part
/// of file names, so nothing else may pass.
pub fn valid_seal_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
    /// Versions 1 and 2 only: the wrapped key inside the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_key: Option<WrappedKey>,
    /// Version 3, secure profile: the key-slot file that holds the wrapped key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_slot: Option<KeySlotRef>,
    pub phase: Phase,
    /// The thin disk's path as derived when the record was written. Never used to open,
    /// write or delete anything: a job derives the path itself and refuses a record whose
    /// `thin_path` differs from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin_path: Option<String>,
    /// How `plain_digest` and `sealed_digest` are computed: `blake3-64k` (version 2) or
    /// `blake3` (version 1 records, where the field is absent). See `digest.rs`.
    #[serde(default = "legacy_digest")]
    pub digest: String,
    /// Secure profile: sectors of zeros stay zeros (not encrypted) so that holes stay holes;
    /// leaks how many sectors are zero (`--keep-holes`). Always false in the patent profile,
    /// where zeros stay zeros anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_holes: bool,
    /// Version 4: dense placement of a `keep_holes` seal. Absent: every sector of the image
    /// is placed among all `thin_sectors` slots (versions 1 to 3, and any seal without
    /// `keep_holes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense: Option<DenseRef>,
    /// Version 4, optional: the region digest tree of the plaintext, set with
    /// `plain_digest` at the end of seal scatter. Absent in records written before it
    /// existed: their unseal checks the whole image only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_tree: Option<RegionTreeRef>,
    /// Version 4, optional: the placement table (`RECORD.place`), set with `region_tree`
    /// at the end of seal scatter when the seal needs one (the patent placement, or any
    /// placement with slack). Absent: an instant reclaim builds the placement from its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_table: Option<PlaceTableRef>,
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
    /// The geometry the passes work on: the image's `N` sectors, or with dense placement
    /// the compacted image's `D`, and the thin disk's `M` slots.
    pub fn geometry(&self) -> Result<Geometry, GeometryError> {
        Geometry::with_slots(
            self.dense.as_ref().map_or(self.sectors, |d| d.sectors),
            self.thin_sectors,
            self.sector_size,
            self.word_length,
        )
    }

    pub fn placement_kind(&self) -> Option<PlacementKind> {
        PlacementKind::from_name(&self.placement)
    }

    /// The id of the master key this seal needs (secure profile, before a shred).
    pub fn master_key_id(&self) -> Option<&str> {
        match (&self.key_slot, &self.wrapped_key) {
            (Some(s), _) => Some(&s.master_key_id),
            (None, Some(w)) => Some(&w.master_key_id),
            (None, None) => None,
        }
    }

    pub fn digest_scheme(&self) -> Option<DigestScheme> {
        DigestScheme::from_name(&self.digest)
    }

    /// Serialise with the checksummed header line and no MAC.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_mac(None)
    }

    /// Serialise with the checksummed header line and, from version 3, the MAC word: the
    /// keyed BLAKE3 of the body under `mac_key`, or `-` without one.
    pub fn encode_with_mac(&self, mac_key: Option<&[u8; 32]>) -> Vec<u8> {
        // Serialising a plain struct of strings and integers cannot fail.
        let body = match serde_json::to_string_pretty(self) {
            Ok(s) => s + "\n",
            Err(e) => unreachable!("seal record serialisation failed: {e}"),
        };
        let sum = blake3::hash(body.as_bytes()).to_hex();
        let mac = match (self.version >= KEY_SLOT_VERSION, mac_key) {
            (false, _) => String::new(),
            (true, None) => " -".into(),
            (true, Some(k)) => format!(" {}", blake3::keyed_hash(k, body.as_bytes()).to_hex()),
        };
        format!("{RECORD_MAGIC} {} {sum}{mac}\n{body}", self.version).into_bytes()
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
        if version > RECORD_VERSION && version != MIGRATING_VERSION {
            return Err(RecordError::NewerVersion(version));
        }
        let sum = words
            .next()
            .ok_or_else(|| RecordError::Corrupt("header has no checksum".into()))?;
        let mac = words.next();
        let mac_ok = match mac {
            None => version < KEY_SLOT_VERSION,
            Some(m) => {
                version >= KEY_SLOT_VERSION
                    && (m == "-" || (m.len() == 64 && m.bytes().all(|b| b.is_ascii_hexdigit())))
            }
        };
        if !mac_ok || words.next().is_some() {
            return Err(RecordError::Corrupt(
                "header has a malformed MAC word".into(),
            ));
        }
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
        if !valid_seal_id(&self.seal_id) {
            return bad("seal_id is not 32 lowercase hex digits".into());
        }
        if self.version >= KEY_SLOT_VERSION && self.wrapped_key.is_some() {
            return bad(
                "a version 3 record holds a wrapped key (it belongs in the key slot)".into(),
            );
        }
        if (self.version == MIGRATING_VERSION) != (self.phase == Phase::Migrating) {
            return bad(format!(
                "phase {} in a version {} record (phase migrating is written as version {MIGRATING_VERSION}, and only it)",
                self.phase.name(),
                self.version
            ));
        }
        if self.version < KEY_SLOT_VERSION && self.key_slot.is_some() {
            return bad(format!(
                "a version {} record names a key slot",
                self.version
            ));
        }
        if self.profile == Profile::Patent && self.key_slot.is_some() {
            return bad("patent profile with a key slot".into());
        }
        self.geometry()
            .map_err(|e| RecordError::Inconsistent(e.to_string()))?;
        if self.sectors.checked_mul(u64::from(self.sector_size)) != Some(self.image_bytes) {
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
        if let Some(d) = &self.dense {
            if self.version < DENSE_VERSION || !self.keep_holes {
                return bad(format!(
                    "dense placement in a version {} record or without keep_holes",
                    self.version
                ));
            }
            if d.sectors > self.sectors {
                return bad(format!(
                    "dense placement of {} sectors in an image of {}",
                    d.sectors, self.sectors
                ));
            }
        }
        if let Some(t) = &self.region_tree {
            self.check_region_tree(t)?;
        }
        if let Some(t) = &self.placement_table {
            if self.version < DENSE_VERSION {
                return bad(format!(
                    "placement_table in a version {} record",
                    self.version
                ));
            }
            if t.digest_bytes().is_none() {
                return bad("placement_table.digest is not 64 lowercase hex digits".into());
            }
        }
        match self.profile {
            Profile::Patent if self.seed.is_none() => {
                return bad("patent profile without a seed".into())
            }
            Profile::Secure
                if self.wrapped_key.is_none()
                    && self.key_slot.is_none()
                    && !self.phase.is_shred() =>
            {
                return bad("secure profile without a wrapped key or key slot".into())
            }
            Profile::Secure if self.seed.is_some() => {
                return bad("secure profile with a seed in the clear".into())
            }
            _ => {}
        }
        let after_scatter = !matches!(self.phase, Phase::SealScatter) && !self.phase.is_shred();
        if after_scatter && self.plain_digest.is_none() {
            return bad(format!("phase {} without plain_digest", self.phase.name()));
        }
        // An unseal gather may also come from rolling back a seal gather, before any
        // sealed digest existed; only these two phases need one.
        let sealed_once = matches!(
            self.phase,
            Phase::Sealed | Phase::UnsealScatter | Phase::Migrating
        );
        if sealed_once && self.sealed_digest.is_none() {
            return bad(format!("phase {} without sealed_digest", self.phase.name()));
        }
        Ok(())
    }
}

impl SealRecord {
    fn check_region_tree(&self, t: &RegionTreeRef) -> Result<(), RecordError> {
        let bad = |m: String| Err(RecordError::Inconsistent(m));
        let r = t.region_bytes;
        let sized = r.is_power_of_two()
            && (u64::from(MIN_REGION_BYTES)..=u64::from(MAX_REGION_BYTES)).contains(&r)
            && r.is_multiple_of(u64::from(self.sector_size));
        if !sized {
            return bad(format!(
                "region_tree.region_bytes {r} is not a power of two from 4096 to 2^30 that the sector size {} divides",
                self.sector_size
            ));
        }
        if t.regions != self.image_bytes.div_ceil(r) {
            return bad(format!(
                "region_tree.regions {} is not ceil(image_bytes / region_bytes) = {}",
                t.regions,
                self.image_bytes.div_ceil(r)
            ));
        }
        if t.root_bytes().is_none() {
            return bad("region_tree.root is not 64 lowercase hex digits".into());
        }
        Ok(())
    }
}

/// Check the MAC word of a record's `bytes` (already decoded by [`SealRecord::decode`])
/// against `mac_key`. A record without a MAC fails, except in a shred phase, whose record
/// holds no key and may be written without one.
pub fn authenticate(bytes: &[u8], rec: &SealRecord, mac_key: &[u8; 32]) -> Result<(), RecordError> {
    if rec.version < KEY_SLOT_VERSION {
        return Ok(());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| RecordError::NotARecord)?;
    let (header, body) = text.split_once('\n').ok_or(RecordError::NotARecord)?;
    let mac = header.split(' ').nth(3).unwrap_or("-");
    if mac == "-" {
        if rec.phase.is_shred() {
            return Ok(());
        }
        return Err(RecordError::Unauthenticated("it has no MAC"));
    }
    let mut want = [0u8; 32];
    hex::decode_to_slice(mac, &mut want)
        .map_err(|_| RecordError::Unauthenticated("its MAC is not hex"))?;
    // blake3::Hash compares in constant time.
    if blake3::keyed_hash(mac_key, body.as_bytes()) != blake3::Hash::from(want) {
        return Err(RecordError::Unauthenticated(
            "its MAC does not match its contents under this master key",
        ));
    }
    Ok(())
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
            key_slot: None,
            phase: Phase::Sealed,
            thin_path: Some("/tmp/x.pdguard-thin".into()),
            plain_digest: Some("ab".repeat(32)),
            sealed_digest: Some("cd".repeat(32)),
            sealed_fingerprint: Some("ef".repeat(32)),
            digest: "blake3-64k".into(),
            keep_holes: false,
            dense: None,
            region_tree: None,
            placement_table: None,
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
        r.version = MIGRATING_VERSION + 1;
        assert_eq!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::NewerVersion(MIGRATING_VERSION + 1))
        );
    }

    /// Phase `migrating` is written as version 5, and version 5 holds only that phase: a
    /// pdguard reading up to version 4 refuses it as newer instead of acting on it.
    #[test]
    fn migrating_is_version_5_and_only_it() {
        let mut r = sample();
        r.phase = Phase::Migrating;
        r.version = MIGRATING_VERSION;
        assert_eq!(SealRecord::decode(&r.encode()), Ok(r.clone()));
        r.version = RECORD_VERSION;
        assert!(matches!(
            SealRecord::decode(&r.encode()),
            Err(RecordError::Inconsistent(_))
        ));
        let mut sealed = sample();
        sealed.version = MIGRATING_VERSION;
        assert!(matches!(
            SealRecord::decode(&sealed.encode()),
            Err(RecordError::Inconsistent(_))
        ));
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
    fn mac_authenticates_the_whole_record() {
        let key = [7u8; 32];
        let r = sample();
        let bytes = r.encode_with_mac(Some(&key));
        let back = SealRecord::decode(&bytes).unwrap();
        assert_eq!(back, r);
        authenticate(&bytes, &back, &key).unwrap();
        assert!(matches!(
            authenticate(&bytes, &back, &[8u8; 32]),
            Err(RecordError::Unauthenticated(_))
        ));
        // An attacker edits a field and recomputes the unkeyed checksum, keeping the MAC.
        let text = String::from_utf8(bytes).unwrap();
        let (header, _) = text.split_once('\n').unwrap();
        let mac = header.split(' ').nth(3).unwrap();
        let mut edited = r.clone();
        edited.thin_path = Some("/etc/shadow".into());
        let plain = String::from_utf8(edited.encode()).unwrap();
        let forged = plain.replacen(" -\n", &format!(" {mac}\n"), 1);
        let got = SealRecord::decode(forged.as_bytes()).unwrap();
        assert!(matches!(
            authenticate(forged.as_bytes(), &got, &key),
            Err(RecordError::Unauthenticated(_))
        ));
        // No MAC at all: refused, except in a shred phase (the record holds no key).
        let bare = r.encode();
        assert!(authenticate(&bare, &r, &key).is_err());
        let mut tomb = r.clone();
        tomb.phase = Phase::Shredded;
        tomb.plain_digest = None;
        authenticate(&tomb.encode(), &tomb, &key).unwrap();
    }

    #[test]
    fn seal_ids_are_exactly_32_lowercase_hex() {
        assert!(valid_seal_id("00112233445566778899aabbccddeeff"));
        for bad in [
            "",
            "0011",
            "00112233445566778899AABBCCDDEEFF",
            "../../../../etc/passwd/aabbccdde",
            "00112233445566778899aabbccddeefg",
            "00112233445566778899aabbccddeeff0",
        ] {
            assert!(!valid_seal_id(bad), "{bad}");
            let mut r = sample();
            r.seal_id = bad.into();
            assert!(matches!(
                SealRecord::decode(&r.encode()),
                Err(RecordError::Inconsistent(_))
            ));
        }
    }

    #[test]
    fn wrapped_key_and_key_slot_belong_to_their_versions() {
        let slot = KeySlotRef {
            algorithm: "aes-256-gcm-siv".into(),
            master_key_id: "00".repeat(8),
            bytes: 4096,
            checksum: "11".repeat(32),
        };
        let w = WrappedKey {
            algorithm: "aes-256-gcm-siv".into(),
            master_key_id: "00".repeat(8),
            nonce: "22".repeat(12),
            ciphertext: "33".repeat(80),
        };
        let mut r = sample();
        r.profile = Profile::Secure;
        r.seed = None;
        r.key_slot = Some(slot.clone());
        assert!(SealRecord::decode(&r.encode()).is_ok());
        r.wrapped_key = Some(w.clone());
        assert!(
            SealRecord::decode(&r.encode()).is_err(),
            "v3 with a wrapped key"
        );
        r.version = 2;
        r.key_slot = None;
        assert!(SealRecord::decode(&r.encode()).is_ok());
        r.key_slot = Some(slot);
        assert!(
            SealRecord::decode(&r.encode()).is_err(),
            "v2 with a key slot"
        );
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

    #[test]
    fn region_tree_is_checked_against_the_geometry() {
        let good = RegionTreeRef {
            region_bytes: 1 << 20,
            regions: 1,
            root: "0a".repeat(32),
        };
        let mut r = sample();
        r.region_tree = Some(good.clone());
        assert_eq!(SealRecord::decode(&r.encode()).unwrap(), r);
        let mut big = sample();
        big.sector_size = 4096;
        big.sectors = (5 << 20) / 4096 + 1;
        big.image_bytes = big.sectors * 4096;
        big.thin_sectors = big.sectors;
        big.region_tree = Some(RegionTreeRef {
            regions: 6,
            ..good.clone()
        });
        assert!(SealRecord::decode(&big.encode()).is_ok());
        type Edit = fn(&mut SealRecord);
        let bad: &[(&str, Edit)] = &[
            ("not a power of two", |r| {
                r.region_tree.as_mut().unwrap().region_bytes = 3 << 19
            }),
            ("below 4 KiB", |r| {
                r.region_tree.as_mut().unwrap().region_bytes = 2048
            }),
            ("above 1 GiB", |r| {
                r.region_tree.as_mut().unwrap().region_bytes = 1 << 31
            }),
            ("not a multiple of the sector", |r| {
                r.sector_size = 65536;
                r.sectors = 1;
                r.image_bytes = 65536;
                r.thin_sectors = 2;
                r.region_tree.as_mut().unwrap().region_bytes = 4096;
                r.region_tree.as_mut().unwrap().regions = 16;
            }),
            ("wrong region count", |r| {
                r.region_tree.as_mut().unwrap().regions = 2
            }),
            ("no regions", |r| {
                r.region_tree.as_mut().unwrap().regions = 0
            }),
            ("root too short", |r| {
                r.region_tree.as_mut().unwrap().root = "0a".repeat(31)
            }),
            ("root upper case", |r| {
                r.region_tree.as_mut().unwrap().root = "0A".repeat(32)
            }),
            ("root not hex", |r| {
                r.region_tree.as_mut().unwrap().root = "0g".repeat(32)
            }),
        ];
        for (what, edit) in bad {
            let mut r = sample();
            r.region_tree = Some(good.clone());
            edit(&mut r);
            assert!(
                matches!(
                    SealRecord::decode(&r.encode()),
                    Err(RecordError::Inconsistent(_))
                ),
                "{what} accepted"
            );
        }
    }
}
