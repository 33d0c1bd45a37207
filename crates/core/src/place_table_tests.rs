#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;
use crate::placement::{FeistelPlacement, PatentPlacement};

const KEY: &[u8] = b"place table test key";

fn expected(bytes: &[u8], n: u64, m: u64) -> Expected {
    Expected {
        bytes: bytes.len() as u64,
        digest: digest(bytes),
        sectors: n,
        slots: m,
    }
}

/// The stored bytes of a table whose plaintext is `plain`, and what a record would say.
fn stored(plain: &[u8], n: u64, m: u64) -> (Vec<u8>, Expected) {
    let mut b = plain.to_vec();
    keystream_xor(KEY, &mut b);
    let e = expected(&b, n, m);
    (b, e)
}

fn header(what: u32, n: u64, m: u64) -> Vec<u8> {
    let mut h = PLACE_MAGIC.to_vec();
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&what.to_le_bytes());
    h.extend_from_slice(&n.to_le_bytes());
    h.extend_from_slice(&m.to_le_bytes());
    h
}

fn slot_table(slots: &[u32], m: u64) -> Vec<u8> {
    let mut b = header(SLOT_TABLE, slots.len() as u64, m);
    for s in slots {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

fn assert_same(a: &dyn Placement, b: &dyn Placement) {
    assert_eq!((a.sectors(), a.slots()), (b.sectors(), b.slots()));
    for i in 0..a.sectors() {
        assert_eq!(a.slot_of(i), b.slot_of(i));
    }
    for s in 0..a.slots() {
        assert_eq!(a.sector_of(s), b.sector_of(s));
    }
}

#[test]
fn feistel_without_slack_needs_no_table() {
    let p = FeistelPlacement::new(KEY, 100, 100).unwrap();
    assert_eq!(encode(&p, false, KEY).unwrap(), None);
    assert!(needed(true, 100, 100));
    assert!(needed(false, 100, 110));
}

#[test]
fn the_stored_table_does_not_show_the_placement() {
    let p = PatentPlacement::new(KEY, 64, 64).unwrap();
    let b = encode(&p, true, KEY).unwrap().unwrap();
    assert_ne!(&b[..8], PLACE_MAGIC);
    let plain: Vec<u8> = (0..64)
        .flat_map(|i| (p.slot_of(i) as u32).to_le_bytes())
        .collect();
    assert!(!b.windows(16).any(|w| plain.windows(16).any(|p| p == w)));
}

#[test]
fn a_truncated_or_lengthened_table_is_refused_even_with_a_matching_digest() {
    let p = PatentPlacement::new(KEY, 50, 60).unwrap();
    let b = encode(&p, true, KEY).unwrap().unwrap();
    // The record's size disagrees.
    let mut e = expected(&b, 50, 60);
    e.bytes -= 4;
    assert!(matches!(
        decode(b.clone(), &e, KEY),
        Err(PlaceTableError::Size { .. })
    ));
    // A truncated file with a record that names it (a forged record): the body is short.
    let short = b[..b.len() - 4].to_vec();
    let e = expected(&short, 50, 60);
    assert!(matches!(
        decode(short, &e, KEY),
        Err(PlaceTableError::Header(_))
    ));
    // One sector's worth too many.
    let mut plain = slot_table(&(0..50).collect::<Vec<_>>(), 60);
    plain.extend_from_slice(&55u32.to_le_bytes());
    let (b, e) = stored(&plain, 50, 60);
    assert!(matches!(
        decode(b, &e, KEY),
        Err(PlaceTableError::Header(_))
    ));
}

#[test]
fn an_edited_byte_is_refused_by_the_digest() {
    let p = PatentPlacement::new(KEY, 50, 60).unwrap();
    let b = encode(&p, true, KEY).unwrap().unwrap();
    let e = expected(&b, 50, 60);
    let mut edited = b.clone();
    edited[40] ^= 1;
    assert_eq!(
        decode(edited, &e, KEY).unwrap_err(),
        PlaceTableError::Digest
    );
    assert!(decode(b, &e, KEY).is_ok());
}

#[test]
fn a_table_of_another_geometry_or_key_is_refused() {
    let p = PatentPlacement::new(KEY, 50, 60).unwrap();
    let b = encode(&p, true, KEY).unwrap().unwrap();
    let e = expected(&b, 50, 61);
    assert!(matches!(
        decode(b.clone(), &e, KEY),
        Err(PlaceTableError::Header(_))
    ));
    let e = expected(&b, 50, 60);
    assert!(matches!(
        decode(b, &e, b"another key"),
        Err(PlaceTableError::Header(_))
    ));
}

#[test]
fn a_reordered_table_decodes_to_its_own_map_not_the_seals() {
    // Reordering entries keeps an injection: only the digest (in the record, under its
    // MAC or checksum) tells it from the seal's table.
    let p = PatentPlacement::new(KEY, 50, 60).unwrap();
    let b = encode(&p, true, KEY).unwrap().unwrap();
    let e = expected(&b, 50, 60);
    let mut slots: Vec<u32> = (0..50).map(|i| p.slot_of(i) as u32).collect();
    slots.swap(3, 7);
    let (swapped, _) = stored(&slot_table(&slots, 60), 50, 60);
    assert_eq!(
        decode(swapped, &e, KEY).unwrap_err(),
        PlaceTableError::Digest
    );
}

#[test]
fn a_duplicate_or_out_of_range_slot_is_refused() {
    let mut slots: Vec<u32> = (0..10).collect();
    slots[6] = 2;
    let (b, e) = stored(&slot_table(&slots, 12), 10, 12);
    assert_eq!(
        decode(b, &e, KEY).unwrap_err(),
        PlaceTableError::Duplicate {
            slot: 2,
            first: 2,
            second: 6
        }
    );
    let mut slots: Vec<u32> = (0..10).collect();
    slots[9] = 12;
    let (b, e) = stored(&slot_table(&slots, 12), 10, 12);
    assert_eq!(
        decode(b, &e, KEY).unwrap_err(),
        PlaceTableError::OutOfRange {
            sector: 9,
            slot: 12,
            slots: 12
        }
    );
    let slots: Vec<u32> = (0..10).map(|i| u32::MAX - i).collect();
    let (b, e) = stored(&slot_table(&slots, 12), 10, 12);
    assert!(matches!(
        decode(b, &e, KEY),
        Err(PlaceTableError::OutOfRange { .. })
    ));
}

#[test]
fn a_bitmap_with_the_wrong_count_or_a_bit_past_the_end_is_refused() {
    let (n, m) = (60u64, 70u64);
    let bits = |w: [u64; 2]| {
        let mut b = header(USED_BITMAP, n, m);
        for x in w {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b
    };
    // Every one of the 70 slots used.
    let (b, e) = stored(&bits([u64::MAX, 0b11_1111]), n, m);
    assert_eq!(
        decode(b, &e, KEY).unwrap_err(),
        PlaceTableError::Used { have: 70, want: 60 }
    );
    // 60 used, one of them slot 64 + 6 = 70 = M.
    let (b, e) = stored(&bits([((1 << 59) - 1) | (1 << 63), 1 << 6]), n, m);
    assert_eq!(
        decode(b, &e, KEY).unwrap_err(),
        PlaceTableError::BitPastEnd(70)
    );
    // Exactly 60 within range: accepted.
    let (b, e) = stored(&bits([u64::MAX >> 4, 0]), n, m);
    assert!(matches!(decode(b, &e, KEY), Ok(PlaceTable::Used(_))));
}

#[test]
fn a_header_of_the_wrong_kind_is_refused() {
    let mut plain = header(3, 0, 0);
    plain.truncate(HEADER_BYTES);
    let (b, e) = stored(&plain, 0, 0);
    assert!(matches!(
        decode(b, &e, KEY),
        Err(PlaceTableError::Header(_))
    ));
    let (b, e) = stored(b"PDGPLACE", 0, 0);
    assert!(matches!(
        decode(b, &e, KEY),
        Err(PlaceTableError::Header(_))
    ));
}

proptest! {
    #[test]
    fn patent_round_trip(key in proptest::collection::vec(any::<u8>(), 0..40), n in 0u64..300, slack in 0u64..300) {
        let p = PatentPlacement::new(&key, n, n + slack).unwrap();
        let b = encode(&p, true, &key).unwrap().unwrap();
        let e = expected(&b, n, n + slack);
        match decode(b, &e, &key).unwrap() {
            PlaceTable::Patent(q, rank) => {
                assert_same(&p, &q);
                assert_eq!(rank, (slack > 0).then(|| RankDirectory::build(&p)));
            }
            PlaceTable::Used(_) => panic!("a patent table decoded as a bitmap"),
        }
    }

    #[test]
    fn feistel_slack_round_trip(key in proptest::collection::vec(any::<u8>(), 0..40), n in 1u64..2000, slack in 1u64..700) {
        let p = FeistelPlacement::new(&key, n, n + slack).unwrap();
        let b = encode(&p, false, &key).unwrap().unwrap();
        let e = expected(&b, n, n + slack);
        match decode(b, &e, &key).unwrap() {
            PlaceTable::Used(r) => assert_eq!(r, RankDirectory::build(&p)),
            PlaceTable::Patent(..) => panic!("a bitmap decoded as a patent table"),
        }
    }
}
