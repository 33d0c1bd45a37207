//! The seal record parser (`pdguard_core::record`): whatever decodes encodes to bytes that
//! decode to the same record (parse ∘ encode = id) and encode again to the same bytes
//! (encode ∘ parse stable), with and without a MAC; the header the check wrote is the one
//! the parser read; `authenticate` accepts exactly the MACs the reference computes; a
//! `region_tree` that decodes is one `docs/seal-record.md` allows.
//!
//! Input: one mode byte, then
//! - mode 0: the bytes of a record file, as read from disk;
//! - mode 1: a version byte, a MAC byte, then a record body: the check writes the header
//!   line (version, the body's BLAKE3, no MAC / `-` / the MAC under [`KEY`] / a MAC
//!   under another key), so that the fuzzer reaches the JSON and the consistency checks
//!   behind the checksum.

use pdguard_core::record::{authenticate, RecordError, RECORD_MAGIC};
use pdguard_core::record::{KEY_SLOT_VERSION, MIGRATING_VERSION};
use pdguard_core::Phase;
use pdguard_core::SealRecord;

/// The MAC key of the records the check writes.
const KEY: [u8; 32] = [0x4b; 32];
const OTHER_KEY: [u8; 32] = [0x4c; 32];

pub fn check(data: &[u8]) {
    let (mode, rest) = super::split_mode(data);
    if mode % 2 == 0 {
        if let Ok(rec) = SealRecord::decode(rest) {
            decoded(rest, &rec, Mac::Unknown);
        }
        return;
    }
    let ([version, mac], body) = super::take::<2>(rest);
    // Versions 0 to one past the newest (5, phase `migrating` only).
    let version = u32::from(version) % (MIGRATING_VERSION + 2);
    let sum = blake3::hash(body).to_hex();
    let (word, key) = match mac % 4 {
        0 => (String::new(), Mac::None),
        1 => (" -".to_string(), Mac::None),
        2 => (
            format!(" {}", blake3::keyed_hash(&KEY, body).to_hex()),
            Mac::Key,
        ),
        _ => (
            format!(" {}", blake3::keyed_hash(&OTHER_KEY, body).to_hex()),
            Mac::OtherKey,
        ),
    };
    let mut bytes = format!("{RECORD_MAGIC} {version} {sum}{word}\n").into_bytes();
    bytes.extend_from_slice(body);
    let got = SealRecord::decode(&bytes);
    if version > MIGRATING_VERSION {
        // Named as newer when it reads as text at all (a record is UTF-8 throughout).
        let want = match std::str::from_utf8(body) {
            Ok(_) => RecordError::NewerVersion(version),
            Err(_) => RecordError::NotARecord,
        };
        assert_eq!(got, Err(want));
        return;
    }
    // The header's MAC word is present exactly from the version that has one.
    if (version >= KEY_SLOT_VERSION) != (mac % 4 != 0) {
        assert!(
            got.is_err(),
            "a version {version} header with MAC word {word:?} accepted"
        );
        return;
    }
    if let Ok(rec) = got {
        assert_eq!(rec.version, version, "header and body versions differ");
        assert_eq!(
            rec.phase == Phase::Migrating,
            version == MIGRATING_VERSION,
            "phase {} read from a version {version} record",
            rec.phase.name()
        );
        decoded(&bytes, &rec, key);
    }
}

/// What the header of a record the check wrote holds.
#[derive(Clone, Copy)]
enum Mac {
    /// Bytes from the fuzzer: whatever they hold.
    Unknown,
    /// No MAC word, or `-`.
    None,
    /// The MAC under [`KEY`].
    Key,
    /// A MAC under another key.
    OtherKey,
}

/// What `docs/seal-record.md` promises of a decoded record's `region_tree`, from its
/// definition: a power of two from 4 KiB to 1 GiB that the sector size divides,
/// `ceil(image_bytes / region_bytes)` regions, a root of 64 lowercase hex digits.
fn region_tree_holds(rec: &SealRecord) {
    let Some(t) = &rec.region_tree else {
        return;
    };
    let r = t.region_bytes;
    assert!(
        r.is_power_of_two() && (4096..=1 << 30).contains(&r),
        "region_bytes {r} accepted"
    );
    assert_eq!(
        r % u64::from(rec.sector_size),
        0,
        "a region of part sectors"
    );
    let regions = rec.image_bytes / r + u64::from(!rec.image_bytes.is_multiple_of(r));
    assert_eq!(t.regions, regions, "region count");
    let hex = t
        .root
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    assert!(t.root.len() == 64 && hex, "root {:?} accepted", t.root);
}

/// `rec` decoded from `bytes`, whose header holds `mac`.
fn decoded(bytes: &[u8], rec: &SealRecord, mac: Mac) {
    region_tree_holds(rec);
    let plain = rec.encode();
    assert_eq!(
        SealRecord::decode(&plain).as_ref(),
        Ok(rec),
        "parse of encode"
    );
    let again = SealRecord::decode(&plain).map(|r| r.encode());
    assert_eq!(again.as_ref(), Ok(&plain), "encode of parse of encode");
    let signed = rec.encode_with_mac(Some(&KEY));
    assert_eq!(
        SealRecord::decode(&signed).as_ref(),
        Ok(rec),
        "parse of signed"
    );
    let v3 = rec.version >= KEY_SLOT_VERSION;
    assert_eq!(authenticate(&signed, rec, &KEY), Ok(()));
    if v3 {
        // The MAC binds the key; no MAC passes only in a shred phase.
        assert!(authenticate(&signed, rec, &OTHER_KEY).is_err());
        assert_eq!(
            authenticate(&plain, rec, &KEY).is_ok(),
            rec.phase.is_shred()
        );
    } else {
        assert_eq!(
            signed, plain,
            "a version {} record has no MAC word",
            rec.version
        );
    }
    let auth = authenticate(bytes, rec, &KEY);
    match mac {
        _ if !v3 => assert_eq!(auth, Ok(())),
        Mac::Key => assert_eq!(auth, Ok(())),
        Mac::OtherKey => assert!(auth.is_err(), "a MAC under another key accepted"),
        Mac::None => assert_eq!(auth.is_ok(), rec.phase.is_shred(), "no MAC"),
        Mac::Unknown => {}
    }
}
