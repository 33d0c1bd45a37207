//! Dense placement (record version 4, secure profile with `keep_holes`): the original's
//! **data map** — the byte ranges its file system reported as data when the seal started —
//! and its encrypted form in the record.
//!
//! A dense seal places only the sectors that hold data: with `R` the data ranges rounded
//! out to whole sectors and `D` their sector count, sector `c` of the **compacted image**
//! (the sectors of `R` in ascending order) is sealed like sector `c` of a `D`-sector disk,
//! so the sealed image's data is `[0, D)` and the rest stays holes. The unseal needs the
//! map to put each sector back and to restore the original's holes exactly, so the map is
//! kept, encrypted, in the record (`dense.map`).
//!
//! Encrypted map (hex in the record), AES-256-GCM-SIV under the seal's map key (derived
//! from the per-seal data key, so a crypto-erase destroys it with the data), nonce 12 zero
//! bytes (the key is used for this one message only), associated data
//! `pdguard dense map v1|seal <id>|bytes <image bytes>|sector <S>|dense <D>`:
//!
//! | bytes             | content                                                      |
//! |-------------------|--------------------------------------------------------------|
//! | 16 `k` .. 16 `k`+8 | start of data range `k`, bytes, u64 little-endian           |
//! | 16 `k`+8 .. 16 `k`+16 | end (exclusive) of data range `k`, bytes, u64 little-endian |
//! | then              | `(0, 0)` pairs padding the count to a power of two, at least 16 |
//! | last 16           | the AEAD tag                                                 |
//!
//! The padding hides the exact number of ranges (the record is beside the image); the
//! count is known only within a factor of two.

use std::ops::Range;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use thiserror::Error;

/// The most data ranges a dense seal records (the record stays under
/// [`MAX_RECORD_BYTES`](crate::record::MAX_RECORD_BYTES)); an image with more is sealed
/// with the scattered `keep_holes` placement of version 3.
pub const MAX_DENSE_RANGES: usize = 1 << 18;
/// Fewest entries of an encrypted map (padding).
const MIN_ENTRIES: usize = 16;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DenseError {
    #[error("its dense data map is not hex")]
    NotHex,
    #[error(
        "its dense data map does not open with this seal's key (edited, or from another seal)"
    )]
    Open,
    #[error("its dense data map is malformed: {0}")]
    Malformed(String),
}

/// The original's data ranges, in bytes: ascending, disjoint, not touching, non-empty,
/// inside the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRanges {
    ranges: Vec<Range<u64>>,
}

impl DataRanges {
    /// From a file system's data map; `ranges` must be ascending and disjoint.
    pub fn new(ranges: Vec<Range<u64>>, image_bytes: u64) -> Result<Self, DenseError> {
        let bad = |m: String| Err(DenseError::Malformed(m));
        let mut end = 0u64;
        for (k, r) in ranges.iter().enumerate() {
            if r.start >= r.end || r.end > image_bytes {
                return bad(format!("range {k} is empty or outside the image"));
            }
            if k > 0 && r.start <= end {
                return bad(format!("range {k} is not after range {}", k - 1));
            }
            end = r.end;
        }
        Ok(Self { ranges })
    }

    /// The byte ranges, ascending.
    pub fn bytes(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// The ranges rounded out to whole sectors of `sector` bytes and merged: the byte
    /// ranges of the image that the compacted image is made of, in order.
    pub fn sector_extents(&self, sector: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            let (a, b) = (r.start / sector * sector, r.end.div_ceil(sector) * sector);
            match out.last_mut() {
                Some(last) if a <= last.end => last.end = last.end.max(b),
                _ => out.push(a..b),
            }
        }
        out
    }

    /// `D`: sectors of the compacted image.
    pub fn sectors(&self, sector: u64) -> u64 {
        self.sector_extents(sector)
            .iter()
            .map(|r| (r.end - r.start) / sector)
            .sum()
    }

    /// The byte ranges of `[0, image_bytes)` that are holes in the original.
    pub fn holes(&self, image_bytes: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.ranges {
            if r.start > at {
                out.push(at..r.start);
            }
            at = r.end;
        }
        if at < image_bytes {
            out.push(at..image_bytes);
        }
        out
    }

    /// Encrypt under `key` for the record, bound to `aad` ([`map_aad`]).
    pub fn seal(&self, key: &[u8; 32], aad: &[u8]) -> String {
        let entries = self.ranges.len().max(MIN_ENTRIES).next_power_of_two();
        let mut msg = vec![0u8; entries * 16];
        for (r, e) in self.ranges.iter().zip(msg.chunks_exact_mut(16)) {
            e[..8].copy_from_slice(&r.start.to_le_bytes());
            e[8..].copy_from_slice(&r.end.to_le_bytes());
        }
        let aead = Aes256GcmSiv::new(key.into());
        // Encryption with a valid key and nonce cannot fail for messages under 2^36 bytes.
        let ct = aead
            .encrypt(Nonce::from_slice(&[0; 12]), Payload { msg: &msg, aad })
            .unwrap_or_default();
        hex::encode(ct)
    }

    /// Decrypt and check a map from the record: its ranges must be valid, in order, inside
    /// the image, and add up to `dense_sectors` sectors.
    pub fn open(
        hex_map: &str,
        key: &[u8; 32],
        aad: &[u8],
        image_bytes: u64,
        sector: u64,
        dense_sectors: u64,
    ) -> Result<Self, DenseError> {
        let ct = hex::decode(hex_map).map_err(|_| DenseError::NotHex)?;
        let aead = Aes256GcmSiv::new(key.into());
        let msg = aead
            .decrypt(Nonce::from_slice(&[0; 12]), Payload { msg: &ct, aad })
            .map_err(|_| DenseError::Open)?;
        if msg.len() % 16 != 0 {
            return Err(DenseError::Malformed("length is not whole entries".into()));
        }
        let mut ranges = Vec::new();
        let mut padding = false;
        for e in msg.chunks_exact(16) {
            let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0xff; 8]));
            let (a, b) = (word(&e[..8]), word(&e[8..]));
            if (a, b) == (0, 0) {
                padding = true;
            } else if padding {
                return Err(DenseError::Malformed("a range after the padding".into()));
            } else {
                ranges.push(a..b);
            }
        }
        let map = Self::new(ranges, image_bytes)?;
        if map.sectors(sector) != dense_sectors {
            return Err(DenseError::Malformed(format!(
                "its ranges hold {} sectors, the record says {dense_sectors}",
                map.sectors(sector)
            )));
        }
        Ok(map)
    }
}

/// The associated data of an encrypted map: what it belongs to.
pub fn map_aad(seal_id: &str, image_bytes: u64, sector: u32, dense_sectors: u64) -> Vec<u8> {
    format!("pdguard dense map v1|seal {seal_id}|bytes {image_bytes}|sector {sector}|dense {dense_sectors}")
        .into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ranges() -> impl Strategy<Value = (Vec<Range<u64>>, u64)> {
        proptest::collection::vec((0u64..50, 1u64..50), 0..40).prop_map(|v| {
            let mut at = 0;
            let mut out = Vec::new();
            for (gap, len) in v {
                let start = at + gap * 512 + if out.is_empty() { 0 } else { 512 };
                out.push(start..start + len * 512);
                at = start + len * 512;
            }
            (out, at + 4096)
        })
    }

    proptest! {
        #[test]
        fn a_map_round_trips_and_its_holes_are_its_complement((ranges, len) in arb_ranges()) {
            let m = DataRanges::new(ranges.clone(), len).unwrap();
            let d = m.sectors(512);
            let aad = map_aad("s", len, 512, d);
            let sealed = m.seal(&[7; 32], &aad);
            let back = DataRanges::open(&sealed, &[7; 32], &aad, len, 512, d).unwrap();
            prop_assert_eq!(&back, &m);
            let data: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            let holes: u64 = m.holes(len).iter().map(|r| r.end - r.start).sum();
            prop_assert_eq!(data + holes, len);
            prop_assert_eq!(d * 512, data);
            // A wrong key, other associated data or a flipped byte does not open.
            prop_assert_eq!(DataRanges::open(&sealed, &[8; 32], &aad, len, 512, d), Err(DenseError::Open));
            let other = map_aad("s", len, 512, d + 1);
            prop_assert_eq!(DataRanges::open(&sealed, &[7; 32], &other, len, 512, d), Err(DenseError::Open));
            let mut flipped = sealed.clone().into_bytes();
            flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
            let flipped = String::from_utf8(flipped).unwrap();
            prop_assert_eq!(DataRanges::open(&flipped, &[7; 32], &aad, len, 512, d), Err(DenseError::Open));
        }
    }

    #[test]
    fn sector_extents_round_out_and_merge() {
        let m = DataRanges::new(vec![100..600, 1000..1100, 5000..5001], 8192).unwrap();
        assert_eq!(m.sector_extents(512), vec![0..1536, 4608..5120]);
        assert_eq!(m.sectors(512), 4);
        assert_eq!(m.sector_extents(4096), vec![0..8192]);
        assert_eq!(
            m.holes(8192),
            vec![0..100, 600..1000, 1100..5000, 5001..8192]
        );
    }

    #[test]
    fn bad_maps_are_refused() {
        assert!(DataRanges::new(std::iter::once(0..0).collect(), 10).is_err());
        assert!(DataRanges::new(std::iter::once(0..11).collect(), 10).is_err());
        assert!(DataRanges::new(vec![0..4, 4..6], 10).is_err());
        assert!(DataRanges::new(vec![5..6, 0..4], 10).is_err());
        let m = DataRanges::new(std::iter::once(0..512).collect(), 4096).unwrap();
        let aad = map_aad("s", 4096, 512, 1);
        let sealed = m.seal(&[1; 32], &aad);
        // A record that claims another count of dense sectors.
        let aad2 = map_aad("s", 4096, 512, 2);
        assert_eq!(
            DataRanges::open(&m.seal(&[1; 32], &aad2), &[1; 32], &aad2, 4096, 512, 2),
            Err(DenseError::Malformed(
                "its ranges hold 1 sectors, the record says 2".into()
            ))
        );
        assert_eq!(
            DataRanges::open("zz", &[1; 32], &aad, 4096, 512, 1),
            Err(DenseError::NotHex)
        );
        // The count of ranges is padded to a power of two, at least 16.
        assert_eq!(sealed.len(), 2 * (16 * 16 + 16));
    }
}
