//! The moved map loader (`pdguard_core::moved_map`) against the byte table of its module
//! doc and docs/instant-reclaim.md: each slot is judged by a reference written from the
//! table (checksum computed with `blake3` alone from the documented key derivation, every
//! field read from its offset, the rules checked in the order the table lists them), the
//! file by the documented choice (the newer valid slot; two valid slots must be
//! consecutive generations); a loaded map commits and loads back.
//!
//! Input: one mode byte, then four bytes choosing the migration (region size, image size
//! in units of 3 KiB, whether the checksum is keyed), then
//! - mode 0: the bytes of a map file;
//! - mode 1: for each slot, a control byte and bytes 16.. of the slot (as many as the
//!   control uses): control 0, the slot is zeros (no bytes); 1, the magic and the bytes as
//!   given (a whole slot); 2, the check writes the magic, pads with zeros and
//!   writes the checksum under the right key; 3, the same under a wrong key. The fuzzer
//!   so reaches the fields behind the checksum.

use pdguard_core::moved_map::{
    slot_bytes, MapError, MapIdentity, MapKey, MovedMap, SlotRefusal, MAP_MAGIC,
};
use pdguard_core::region_tree::RegionLayout;

const HEAD: usize = 60;
const SUM: usize = 32;
const SEAL_ID: [u8; 16] = [0x5a; 16];
const KEY: [u8; 32] = [0x6d; 32];

pub fn check(data: &[u8]) {
    let (mode, rest) = super::split_mode(data);
    let ([size, lo, hi, keyed], rest) = super::take::<4>(rest);
    let region = 4096u64 << (size % 4);
    // Up to 64 Ki regions of 4 KiB: slots of at most 5 pages.
    let image = u64::from(u16::from_le_bytes([lo, hi])) * 3 * 1024 + u64::from(size / 4);
    let layout = match RegionLayout::new(region, image) {
        Ok(l) => l,
        Err(e) => panic!("a region of {region} bytes refused: {e}"),
    };
    let id = MapIdentity {
        seal_id: SEAL_ID,
        layout,
    };
    let material = (keyed % 2 == 1).then_some(&KEY);
    let Some(len) = slot_bytes(layout.regions()) else {
        panic!("no slot size for {} regions", layout.regions());
    };
    if mode % 2 == 0 {
        return file(rest, &id, material, len);
    }
    let mut b = Vec::with_capacity(2 * len);
    let mut rest = rest;
    let end = HEAD + layout.regions().div_ceil(4) as usize;
    for _ in 0..2 {
        let ([control], r) = super::take::<1>(rest);
        // What the slot takes: nothing, a whole slot, or its fields up to the checksum.
        let want = match control % 4 {
            0 => 0,
            1 => len - 16,
            _ => end - 16,
        };
        let n = r.len().min(want);
        let (fields, r) = r.split_at(n);
        rest = r;
        b.extend_from_slice(&slot(control, fields, len, layout.regions(), material));
    }
    file(&b, &id, material, len);
}

/// One slot built from `fields` as `control` says.
fn slot(control: u8, fields: &[u8], len: usize, regions: u64, key: Option<&[u8; 32]>) -> Vec<u8> {
    let mut s = vec![0u8; len];
    match control % 4 {
        0 => {}
        1 => {
            s[..16].copy_from_slice(MAP_MAGIC);
            s[16..16 + fields.len()].copy_from_slice(fields);
        }
        c => {
            s[..16].copy_from_slice(MAP_MAGIC);
            let end = HEAD + regions.div_ceil(4) as usize;
            let n = fields.len().min(end - 16);
            s[16..16 + n].copy_from_slice(&fields[..n]);
            let sum = if c == 2 {
                checksum(key, &s[..end])
            } else {
                checksum(Some(&[0x01; 32]), &s[..end])
            };
            s[end..end + SUM].copy_from_slice(&sum);
        }
    }
    s
}

fn checksum(key: Option<&[u8; 32]>, bytes: &[u8]) -> [u8; 32] {
    let material: &[u8] = key.map_or(&[], |k| k.as_slice());
    let map_key = blake3::derive_key("pdguard 2026-12 moved map v1", material);
    blake3::keyed_hash(&map_key, bytes).into()
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x))
}

/// What a slot holds by the table: its generation and state codes, or why it is refused.
fn reference_slot(
    s: &[u8],
    k: u64,
    id: &MapIdentity,
    key: Option<&[u8; 32]>,
) -> Result<(u64, Vec<u8>), SlotRefusal> {
    let regions = id.layout.regions();
    let end = HEAD + regions.div_ceil(4) as usize;
    let corrupt = SlotRefusal::Corrupt("");
    if s.iter().all(|&x| x == 0) {
        return Err(SlotRefusal::Empty);
    }
    if s[..16] != MAP_MAGIC[..] {
        return Err(SlotRefusal::NotAMap);
    }
    if checksum(key, &s[..end])[..] != s[end..end + SUM] || s[end + SUM..].iter().any(|&x| x != 0) {
        return Err(corrupt);
    }
    if le(&s[16..20]) != u64::from(id.layout.region_bytes())
        || s[20..36] != SEAL_ID
        || le(&s[36..44]) != id.layout.image_bytes()
    {
        return Err(SlotRefusal::Inconsistent(String::new()));
    }
    let generation = le(&s[44..52]);
    if generation == 0 || generation % 2 != k || le(&s[52..60]) != regions {
        return Err(corrupt);
    }
    let codes: Vec<u8> = (0..regions)
        .map(|r| (s[HEAD + (r / 4) as usize] >> (2 * (r % 4))) & 3)
        .collect();
    let used = 2 * (regions % 4);
    if used != 0 && s[end - 1] >> used != 0 {
        return Err(corrupt);
    }
    Ok((generation, codes))
}

fn same_kind(a: &SlotRefusal, b: &SlotRefusal) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn codes_of(m: &MovedMap) -> Vec<u8> {
    (0..m.regions())
        .map(|r| match m.state(r).map(|s| s.name()) {
            Ok("sealed") => 0,
            Ok("evacuated") => 1,
            Ok("plain") => 2,
            Ok("dirty") => 3,
            other => panic!("region {r} of a loaded map is {other:?}"),
        })
        .collect()
}

fn file(b: &[u8], id: &MapIdentity, material: Option<&[u8; 32]>, len: usize) {
    let key = MapKey::new(material);
    let got = MovedMap::load(b, id, &key);
    if b.len() != 2 * len {
        assert!(
            matches!(got, Err(MapError::Length { .. })),
            "a file of {} bytes, not {}: {got:?}",
            b.len(),
            2 * len
        );
        return;
    }
    let (a, c) = b.split_at(len);
    let want = match (
        reference_slot(a, 0, id, material),
        reference_slot(c, 1, id, material),
    ) {
        (Ok(x), Ok(y)) => {
            let (old, new) = if x.0 < y.0 { (x, y) } else { (y, x) };
            if old.0.checked_add(1) == Some(new.0) {
                Ok(new)
            } else {
                Err(None)
            }
        }
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(x), Err(y)) => Err(Some((x, y))),
    };
    let map = match (got, want) {
        (Ok(m), Ok((generation, codes))) => {
            assert_eq!(m.generation(), generation);
            assert_eq!(codes_of(&m), codes);
            m
        }
        (Err(MapError::NotConsecutive(..)), Err(None)) => return,
        (Err(MapError::NoValidSlot(x, y)), Err(Some((rx, ry)))) => {
            assert!(same_kind(&x, &rx), "slot 0: {x} against {rx}");
            assert!(same_kind(&y, &ry), "slot 1: {y} against {ry}");
            return;
        }
        (got, want) => panic!("loaded {got:?}, the table says {want:?}"),
    };
    // A commit of the loaded map lands in the other slot and loads back, newer.
    let mut map = map;
    let commit = match map.next_commit(&key) {
        Ok(c) => c,
        Err(MapError::LastGeneration(g)) if g == u64::MAX => return,
        Err(e) => panic!("a loaded map does not commit: {e}"),
    };
    assert_eq!(commit.bytes.len(), len);
    let mut after = b.to_vec();
    after[commit.offset as usize..][..len].copy_from_slice(&commit.bytes);
    map.committed(commit.generation);
    assert_eq!(MovedMap::load(&after, id, &key).as_ref(), Ok(&map));
}
