//! The placement table of a seal (`RECORD.place`, `docs/seal-record.md`,
//! `docs/instant-reclaim.md` section 5): what the read path of an instant reclaim needs
//! and could otherwise only rebuild in time that grows with the image, written at seal
//! time so that a migration's start reads it instead.
//!
//! - The patent placement: its `slot_of` table (`pi`, one `u32` per sector). Rebuilding it
//!   replays about `N ln N` draws of ChaCha20 ([039]); reading it is `4 N` bytes, and the
//!   used slots follow from it in `O(N + M/64)` (the inverse map `sector_of`, which the
//!   read path never uses, is built on first use, as for a drawn one:
//!   [`PatentPlacement::from_table`]).
//! - A seal with slack and the Feistel placement: the used-slot bitmap of its
//!   [`RankDirectory`] (`M / 8` bytes), instead of a pass of `pi^-1` over the `M` slots.
//!   The counts per 512 slots are rebuilt from the bitmap in `O(M / 64)`.
//! - The Feistel placement without slack needs nothing: no table.
//!
//! Layout (all integers little-endian), then encrypted as a whole (below):
//!
//! ```text
//! magic "PDGPLACE"  8 bytes
//! version u32 = 1, what u32 (bit 0: slot table, bit 1: used bitmap; exactly one)
//! N u64, M u64
//! slot table: N x u32        | used bitmap: ceil(M / 64) x u64
//! ```
//!
//! The file is XOR-ed with a ChaCha20 keystream keyed by
//! `blake3::derive_key(CONTEXT, placement key)`: in the secure profile the placement is
//! secret and the table must not publish it (in the patent profile the key follows from
//! the seed in the record, so this hides nothing more than the record does). The record
//! names the file's size and the BLAKE3 of its bytes as stored; the record's MAC covers
//! them in the secure profile, its checksum in the patent profile.
//!
//! [`PlaceTable::decode`] trusts nothing: size and digest first, then the header against
//! the record's geometry, then the content — a slot table must be an injection into
//! `[0, M)` (no slot out of range, none twice), a bitmap must have exactly `N` used slots
//! and no bit past `M`. A refused table changes nothing.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;

use crate::placement::{PatentPlacement, Placement};
use crate::sealed_address::RankDirectory;

/// Suffix of the table beside its record: `disk.img.pdguard` -> `disk.img.pdguard.place`.
pub const PLACE_SUFFIX: &str = ".place";
/// First bytes of a table (before encryption).
pub const PLACE_MAGIC: &[u8; 8] = b"PDGPLACE";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8;
const SLOT_TABLE: u32 = 1;
const USED_BITMAP: u32 = 2;
/// Domain separation of the keystream key.
const CONTEXT: &str = "pdguard 2026-12 placement table v1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlaceTableError {
    #[error("it is {have} bytes, the seal record says {want}")]
    Size { have: u64, want: u64 },
    #[error(
        "its BLAKE3 digest is not the one the seal record names (edited, torn or of another seal)"
    )]
    Digest,
    #[error("its header is not a placement table of this seal: {0}")]
    Header(String),
    #[error("sector {sector} is placed in slot {slot}, past the thin disk's {slots} slots")]
    OutOfRange { sector: u64, slot: u64, slots: u64 },
    #[error("slot {slot} is named twice (sectors {first} and {second})")]
    Duplicate { slot: u64, first: u64, second: u64 },
    #[error("its used-slot bitmap marks {have} slots used, the seal has {want} sectors")]
    Used { have: u64, want: u64 },
    #[error("its used-slot bitmap marks a slot past the thin disk's {0} slots")]
    BitPastEnd(u64),
    #[error("the patent placement's table holds at most 2^32 - 1 slots, not {0}")]
    TooManySlots(u64),
}

/// A decoded table: what the read path is built from.
#[derive(Debug)]
pub enum PlaceTable {
    /// The patent placement, and its used slots when it has slack (`M > N`).
    Patent(PatentPlacement, Option<RankDirectory>),
    /// The used slots of a Feistel placement with slack.
    Used(RankDirectory),
}

/// What a record says of its table: its size and digest (as stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub bytes: u64,
    pub digest: [u8; 32],
    /// `N` (the compacted image's `D` with dense placement) and `M`.
    pub sectors: u64,
    pub slots: u64,
}

/// Whether a seal of `placement` (patent or not) needs a table: the patent placement
/// always, any placement with slack (`M > N`).
pub fn needed(patent: bool, sectors: u64, slots: u64) -> bool {
    patent || slots != sectors
}

/// The stored bytes of the table of `placement` (the patent placement's `slot_of` when
/// `patent`, else its used slots), keyed by `key` (the seal's placement key); `None` when
/// none is needed (see [`needed`]). The cost is a pass over `pi` (patent) or one of
/// `pi^-1` (slack): at seal time, beside a scatter that reads the whole image.
///
/// # Errors
/// [`PlaceTableError::TooManySlots`] for a patent placement of more than `2^32 - 1` slots
/// (which [`PatentPlacement::new`] refuses anyway).
pub fn encode(
    placement: &dyn Placement,
    patent: bool,
    key: &[u8],
) -> Result<Option<Vec<u8>>, PlaceTableError> {
    let (n, m) = (placement.sectors(), placement.slots());
    if !needed(patent, n, m) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(PLACE_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(if patent { SLOT_TABLE } else { USED_BITMAP }).to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&m.to_le_bytes());
    if patent {
        if m > u64::from(u32::MAX) {
            return Err(PlaceTableError::TooManySlots(m));
        }
        out.reserve(4 * n as usize);
        let mut batch = vec![0u64; 1 << 12];
        let mut first = 0u64;
        while first < n {
            let k = (n - first).min(batch.len() as u64) as usize;
            placement.slots_of(first, &mut batch[..k]);
            for &s in &batch[..k] {
                // `s < M <= u32::MAX`: lossless.
                out.extend_from_slice(&(s as u32).to_le_bytes());
            }
            first += k as u64;
        }
    } else {
        for w in RankDirectory::build(placement).words() {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    keystream_xor(key, &mut out);
    Ok(Some(out))
}

/// The BLAKE3 digest of a table as stored (what the record names).
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Check `bytes` (as stored) against what the record expects, decrypt them with `key`
/// and build the read path's table. Consumes `bytes` (decrypted in place).
///
/// # Errors
/// See [`PlaceTableError`]: wrong size or digest, a header of another geometry, a slot
/// table that is not an injection into `[0, M)`, a bitmap without exactly `N` used slots.
pub fn decode(
    mut bytes: Vec<u8>,
    want: &Expected,
    key: &[u8],
) -> Result<PlaceTable, PlaceTableError> {
    let have = bytes.len() as u64;
    if have != want.bytes {
        return Err(PlaceTableError::Size {
            have,
            want: want.bytes,
        });
    }
    if digest(&bytes) != want.digest {
        return Err(PlaceTableError::Digest);
    }
    keystream_xor(key, &mut bytes);
    let header = |why: &str| PlaceTableError::Header(why.into());
    if bytes.len() < HEADER_BYTES || &bytes[..8] != PLACE_MAGIC {
        return Err(header("no PDGPLACE magic"));
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if u32_at(8) != VERSION {
        return Err(header("unknown version"));
    }
    let what = u32_at(12);
    let (n, m) = (u64_at(16), u64_at(24));
    if (n, m) != (want.sectors, want.slots) {
        return Err(PlaceTableError::Header(format!(
            "it is of {n} sectors in {m} slots, the seal has {} in {}",
            want.sectors, want.slots
        )));
    }
    let body = &bytes[HEADER_BYTES..];
    match what {
        SLOT_TABLE => {
            if m > u64::from(u32::MAX) {
                return Err(PlaceTableError::TooManySlots(m));
            }
            if body.len() as u64 != 4 * n {
                return Err(header("its slot table is not 4 bytes per sector"));
            }
            let (table, used) = patent_from(body, n, m)?;
            let rank = (m != n).then(|| RankDirectory::from_words(used));
            Ok(PlaceTable::Patent(table, rank))
        }
        USED_BITMAP => {
            if body.len() as u64 != 8 * m.div_ceil(64) {
                return Err(header("its bitmap is not one bit per slot"));
            }
            let words: Vec<u64> = body
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_le_bytes(b)
                })
                .collect();
            if m % 64 != 0 {
                if let Some(&last) = words.last() {
                    if last >> (m % 64) != 0 {
                        return Err(PlaceTableError::BitPastEnd(m));
                    }
                }
            }
            let used: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
            if used != n {
                return Err(PlaceTableError::Used {
                    have: used,
                    want: n,
                });
            }
            Ok(PlaceTable::Used(RankDirectory::from_words(words)))
        }
        _ => Err(header(
            "it holds neither a slot table nor a used-slot bitmap",
        )),
    }
}

/// The patent placement from its `slot_of` table (`4 n` bytes), checked to be an
/// injection into `[0, m)` with a bitmap of the slots (`m / 8` bytes, which stays in
/// cache), which is also the used-slot bitmap.
fn patent_from(
    body: &[u8],
    n: u64,
    m: u64,
) -> Result<(PatentPlacement, Vec<u64>), PlaceTableError> {
    let mut slot_of = Vec::with_capacity(n as usize);
    let mut used = vec![0u64; m.div_ceil(64) as usize];
    for (sector, c) in body.chunks_exact(4).enumerate() {
        let slot = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        match used.get_mut(word) {
            Some(w) if u64::from(slot) < m => {
                if *w & bit != 0 {
                    let first = slot_of.iter().position(|&s| s == slot).unwrap_or(0) as u64;
                    return Err(PlaceTableError::Duplicate {
                        slot: slot.into(),
                        first,
                        second: sector as u64,
                    });
                }
                *w |= bit;
            }
            _ => {
                return Err(PlaceTableError::OutOfRange {
                    sector: sector as u64,
                    slot: slot.into(),
                    slots: m,
                })
            }
        }
        slot_of.push(slot);
    }
    // An injection into `[0, m)` (checked above), `m <= u32::MAX` (checked by the caller).
    Ok((PatentPlacement::from_table(slot_of, m as usize), used))
}

fn keystream_xor(key: &[u8], bytes: &mut [u8]) {
    let mut rng = ChaCha20Rng::from_seed(blake3::derive_key(CONTEXT, key));
    let mut block = [0u8; 4096];
    for chunk in bytes.chunks_mut(block.len()) {
        let ks = &mut block[..chunk.len()];
        rng.fill_bytes(ks);
        for (b, k) in chunk.iter_mut().zip(ks.iter()) {
            *b ^= k;
        }
    }
}

#[cfg(test)]
#[path = "place_table_tests.rs"]
mod tests;
