//! The key slot parser (`pdguard_core::keyslot`) against the byte table of its module doc
//! and docs/seal-record.md: it accepts exactly the slots the table allows, reads each
//! field from its offset, and whatever decodes encodes to a slot that decodes the same
//! (parse ∘ encode = id) and encodes again to the same bytes (encode ∘ parse stable),
//! equal to the input when the input is the minimal slot with zero padding.
//!
//! Input: one mode byte, then
//! - mode 0: the bytes of a slot file;
//! - mode 1: a page-count byte, then bytes 16.. of a slot: the check writes the magic and
//!   the trailing BLAKE3, so that the fuzzer reaches the fields behind the checksum.

use pdguard_core::keys::WRAP_ALGORITHM;
use pdguard_core::keyslot::{self, SlotError, MAX_SLOT_BYTES, SLOT_GRAIN, SLOT_MAGIC};

/// Header bytes before the ciphertext, and the checksum at the end.
const HEAD: usize = 56;
const SUM: usize = 32;
/// The shortest ciphertext: a 32-byte data key and the AEAD's 16-byte tag.
const MIN_CIPHERTEXT: usize = 32 + 16;

pub fn check(data: &[u8]) {
    let (mode, rest) = super::split_mode(data);
    if mode % 2 == 0 {
        return slot(rest);
    }
    let ([pages], fields) = super::take::<1>(rest);
    // One or two pages; 0xff: one page past the largest slot. (The largest slot itself
    // is a unit test: at 32 pages a run is 30 times slower.)
    let pages = match pages {
        0xff => MAX_SLOT_BYTES as usize / SLOT_GRAIN + 1,
        p => 1 + usize::from(p % 2),
    };
    let len = pages * SLOT_GRAIN;
    let mut b = vec![0u8; len];
    b[..16].copy_from_slice(SLOT_MAGIC);
    let n = fields.len().min(len - SUM - 16);
    b[16..16 + n].copy_from_slice(&fields[..n]);
    let sum = blake3::hash(&b[..len - SUM]);
    b[len - SUM..].copy_from_slice(sum.as_bytes());
    slot(&b);
}

fn le32(b: &[u8]) -> usize {
    b.iter().rev().fold(0, |v, &x| v << 8 | usize::from(x))
}

fn slot(b: &[u8]) {
    let got = keyslot::decode(b);
    let framed = b.len() >= HEAD + SUM && b.starts_with(SLOT_MAGIC);
    let sized = b.len().is_multiple_of(SLOT_GRAIN) && b.len() as u64 <= MAX_SLOT_BYTES;
    let summed = || blake3::hash(&b[..b.len() - SUM]).as_bytes()[..] == b[b.len() - SUM..];
    let l = if framed { le32(&b[52..56]) } else { 0 };
    let fits = framed && l >= MIN_CIPHERTEXT && HEAD + l <= b.len() - SUM;
    let s = match got {
        Err(e) => {
            assert_eq!(matches!(e, SlotError::NotASlot), !framed, "{e}");
            assert!(
                !(framed && sized && fits && summed()),
                "a valid slot refused: {e}"
            );
            return;
        }
        Ok(s) => s,
    };
    assert!(
        framed && sized && fits && summed(),
        "accepted against the table"
    );
    assert_eq!(s.seal_id, hex::encode(&b[16..32]));
    assert_eq!(s.wrapped.master_key_id, hex::encode(&b[32..40]));
    assert_eq!(s.wrapped.nonce, hex::encode(&b[40..52]));
    assert_eq!(s.wrapped.algorithm, WRAP_ALGORITHM);
    assert_eq!(s.wrapped.ciphertext, hex::encode(&b[HEAD..HEAD + l]));
    assert_eq!(keyslot::ciphertext_range(b), Some(HEAD..HEAD + l));
    let e = match keyslot::encode(&s.seal_id, &s.wrapped) {
        Ok(e) => e,
        Err(err) => panic!("a decoded slot does not encode: {err}"),
    };
    assert_eq!(keyslot::decode(&e).as_ref(), Ok(&s), "parse of encode");
    let again = keyslot::decode(&e).map(|s| keyslot::encode(&s.seal_id, &s.wrapped));
    assert_eq!(again, Ok(Ok(e.clone())), "encode of parse of encode");
    assert_eq!(e.len(), (HEAD + l + SUM).div_ceil(SLOT_GRAIN) * SLOT_GRAIN);
    assert_eq!(e[..HEAD + l], b[..HEAD + l]);
    let zero_padded = b[HEAD + l..b.len() - SUM].iter().all(|&x| x == 0);
    if e.len() == b.len() && zero_padded {
        assert_eq!(e, b, "a minimal zero-padded slot re-encodes to other bytes");
    }
}
