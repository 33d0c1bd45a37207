//! Property: a seal record edited by someone without the key is refused with nothing
//! touched, or the job ends bit-exact — never `Ok` over data that is not (issue 16, item 5).
//!
//! Every field of a version 3 and a version 4 record, in both profiles, is edited with a
//! valid checksum (in the secure profile the MAC word is kept or set to `-`, so it is never
//! valid for the edited body), then `seal` or `unseal` runs on the simulated store. Either
//! the job fails and the image, the record, the key slot and the thin disks are exactly as
//! before, or it succeeds and the image unseals to the original plaintext. The fields come
//! from [`FIELDS`], which `fields_cover_the_whole_record` holds to the record type: a new
//! field of [`SealRecord`] fails that test until it is given edits here.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::OnceLock;

use pdguard_core::keys::{self, MasterKey};
use pdguard_core::record::{DenseRef, KeySlotRef, PlaceTableRef, RegionTreeRef, WrappedKey};
use pdguard_core::{PlacementKind, Profile, SealRecord};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::*;
use crate::store::sim::SimStorage;
use crate::store::Storage;

/// Every key of the record's JSON; a nested one as `outer.inner`.
const FIELDS: &[&str] = &[
    "version",
    "seal_id",
    "profile",
    "placement",
    "strategy",
    "image_bytes",
    "sector_size",
    "word_length",
    "sectors",
    "thin_sectors",
    "seed",
    "wrapped_key",
    "wrapped_key.algorithm",
    "wrapped_key.master_key_id",
    "wrapped_key.nonce",
    "wrapped_key.ciphertext",
    "key_slot",
    "key_slot.algorithm",
    "key_slot.master_key_id",
    "key_slot.bytes",
    "key_slot.checksum",
    "phase",
    "thin_path",
    "digest",
    "keep_holes",
    "dense",
    "dense.sectors",
    "dense.map",
    "region_tree",
    "region_tree.region_bytes",
    "region_tree.regions",
    "region_tree.root",
    "placement_table",
    "placement_table.bytes",
    "placement_table.digest",
    "plain_digest",
    "sealed_digest",
    "sealed_fingerprint",
    "created_unix",
    "updated_unix",
    "writer",
];

/// A record with every optional field present, built field by field so that a new field
/// of the type is a compile error here.
fn full_record() -> SealRecord {
    SealRecord {
        version: 4,
        seal_id: "00112233445566778899aabbccddeeff".into(),
        profile: Profile::Secure,
        placement: "feistel".into(),
        strategy: "window".into(),
        image_bytes: 512,
        sector_size: 512,
        word_length: 32,
        sectors: 1,
        thin_sectors: 1,
        seed: Some("00".into()),
        wrapped_key: Some(sample_wrapped()),
        key_slot: Some(KeySlotRef {
            algorithm: "a".into(),
            master_key_id: "b".into(),
            bytes: 1,
            checksum: "c".into(),
        }),
        phase: pdguard_core::Phase::Sealed,
        thin_path: Some("t".into()),
        digest: "blake3-64k".into(),
        keep_holes: true,
        dense: Some(DenseRef {
            sectors: 1,
            map: "00".into(),
        }),
        region_tree: Some(RegionTreeRef {
            region_bytes: 1,
            regions: 1,
            root: "r".into(),
        }),
        placement_table: Some(PlaceTableRef {
            bytes: 1,
            digest: "d".into(),
        }),
        plain_digest: Some("p".into()),
        sealed_digest: Some("s".into()),
        sealed_fingerprint: Some("f".into()),
        created_unix: 1,
        updated_unix: 2,
        writer: "w".into(),
    }
}

fn sample_wrapped() -> WrappedKey {
    WrappedKey {
        algorithm: keys::WRAP_ALGORITHM.into(),
        master_key_id: master().id(),
        nonce: "11".repeat(12),
        ciphertext: "22".repeat(80),
    }
}

fn json_keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(o) = v {
        for (k, v) in o {
            let name = format!("{prefix}{k}");
            if prefix.is_empty() {
                json_keys(v, &format!("{name}."), out);
            }
            out.insert(name);
        }
    }
}

#[test]
fn fields_cover_the_whole_record() {
    let mut keys = BTreeSet::new();
    json_keys(&serde_json::to_value(full_record()).unwrap(), "", &mut keys);
    let covered: BTreeSet<String> = FIELDS.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        keys, covered,
        "the record's fields and the fields the property test edits differ"
    );
}

fn master() -> MasterKey {
    MasterKey::from_bytes([0x5a; 32])
}

/// A sealed image with its plaintext and how it was sealed.
struct Template {
    name: &'static str,
    storage: SimStorage,
    plain: Vec<u8>,
    opts: SealOptions,
}

impl Template {
    fn key(&self) -> Option<&MasterKey> {
        self.opts.master_key.as_ref()
    }

    fn record(&self) -> SealRecord {
        SealRecord::decode(&self.storage.record().unwrap()).unwrap()
    }
}

fn image(seed: u64, holes: bool) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; 48 * 512];
    rng.fill(&mut img[..]);
    if holes {
        for block in img.chunks_mut(4096).step_by(2) {
            block.fill(0);
        }
    }
    img
}

fn template(name: &'static str, plain: Vec<u8>, opts: SealOptions) -> Template {
    let storage = SimStorage::new(plain.clone());
    seal(&storage, &opts, &NoProgress).unwrap();
    Template {
        name,
        storage,
        plain,
        opts,
    }
}

/// Rewrite a template's record as version 3, as version 3 wrote it: in the secure profile
/// the key wrapped again for version 3 into a new key slot, and the record's MAC.
fn as_version_3(mut t: Template, name: &'static str) -> Template {
    let s = &t.storage;
    let mut rec = t.record();
    assert!(rec.dense.is_none());
    rec.version = 3;
    // A version 3 record names no placement table (it is refused in one).
    rec.placement_table = None;
    if let Some(k) = t.opts.master_key.clone() {
        let old = pdguard_core::keyslot::decode(&s.key_slot().unwrap()).unwrap();
        let mut v4 = rec.clone();
        v4.version = 4;
        let (data_key, seed) = keys::unwrap(&k, &old.wrapped, &keys::wrap_aad(&v4)).unwrap();
        let wrapped = keys::wrap(&k, &data_key, &seed, [7; 12], &keys::wrap_aad(&rec));
        let bytes = pdguard_core::keyslot::encode(&rec.seal_id, &wrapped).unwrap();
        s.create_key_slot(&bytes).unwrap();
        rec.key_slot = Some(KeySlotRef {
            algorithm: wrapped.algorithm.clone(),
            master_key_id: wrapped.master_key_id.clone(),
            bytes: bytes.len() as u64,
            checksum: blake3::hash(&bytes).to_hex().to_string(),
        });
        let mac = keys::record_mac_key(&k, &rec.seal_id);
        s.write_record(&rec.encode_with_mac(Some(&mac))).unwrap();
    } else {
        s.write_record(&rec.encode()).unwrap();
    }
    // The genuine version 3 record works.
    let probe = s.power_loss(&mut StdRng::seed_from_u64(0));
    verify(&probe, t.key(), &NoProgress).unwrap();
    unseal(&probe, t.key(), &NoProgress).unwrap();
    assert!(probe.image() == t.plain);
    t.name = name;
    t
}

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let patent = || SealOptions {
            placement: Some(PlacementKind::Patent),
            ..SealOptions::default()
        };
        let secure = || SealOptions {
            profile: Profile::Secure,
            master_key: Some(master()),
            ..SealOptions::default()
        };
        let dense = SealOptions {
            keep_holes: true,
            ..secure()
        };
        vec![
            template("patent v4", image(1, false), patent()),
            as_version_3(template("", image(2, true), patent()), "patent v3"),
            template("secure v4", image(3, false), secure()),
            template("secure v4 dense", image(4, true), dense),
            as_version_3(template("", image(5, false), secure()), "secure v3"),
        ]
    })
}

/// The values a field is edited to: `None` removes it.
fn candidates(t: &Template, field: &str, cur: Option<&Value>) -> Vec<Option<Value>> {
    let mut out = vec![None];
    let names: &[&str] = match field {
        "phase" => &[
            "seal-scatter",
            "seal-gather",
            "sealed",
            "unseal-scatter",
            "unseal-gather",
            "unsealed",
            "shredding",
            "shredded",
        ],
        "profile" => &["patent", "secure"],
        "placement" => &["patent", "feistel", "bogus"],
        "strategy" => &["direct", "window", "bogus"],
        "digest" => &["blake3", "blake3-64k"],
        "seal_id" => &["ffeeddccbbaa99887766554433221100"],
        "thin_path" => &["/etc/victim"],
        _ => &[],
    };
    out.extend(names.iter().map(|n| Some(json!(n))));
    if field == "thin_path" {
        let other = t.storage.thin_name("ffeeddccbbaa99887766554433221100");
        out.push(Some(json!(other.unwrap())));
    }
    match cur {
        Some(Value::Number(n)) => {
            let n = n.as_u64().unwrap();
            for m in [0, 1, n.saturating_sub(1), n + 1, n * 2, n / 2, u64::MAX] {
                out.push(Some(json!(m)));
            }
        }
        Some(Value::String(s)) => {
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                for at in [0, s.len() / 2, s.len() - 1] {
                    let mut b = s.clone().into_bytes();
                    b[at] = if b[at] == b'0' { b'1' } else { b'0' };
                    out.push(Some(json!(String::from_utf8(b).unwrap())));
                }
                out.push(Some(json!(s[..s.len() - 2])));
            }
            out.push(Some(json!("")));
        }
        Some(Value::Bool(b)) => out.push(Some(json!(!b))),
        Some(Value::Object(_)) => out.push(Some(json!({}))),
        _ => {}
    }
    if cur.is_none() {
        out.extend(insertion(t, field));
    }
    out
}

/// Plausible values for a field the record does not have.
fn insertion(t: &Template, field: &str) -> Vec<Option<Value>> {
    let rec = t.record();
    let v = match field {
        "seed" => json!("00".repeat(rec.word_length as usize)),
        "wrapped_key" => serde_json::to_value(sample_wrapped()).unwrap(),
        "key_slot" => match t.storage.key_slot() {
            Some(b) => json!({
                "algorithm": keys::WRAP_ALGORITHM,
                "master_key_id": master().id(),
                "bytes": b.len(),
                "checksum": blake3::hash(&b).to_hex().to_string(),
            }),
            None => {
                json!({"algorithm": keys::WRAP_ALGORITHM, "master_key_id": master().id(), "bytes": 4096, "checksum": "00".repeat(32)})
            }
        },
        "dense" => json!({"sectors": rec.sectors / 2, "map": "00".repeat(48)}),
        "region_tree" => {
            json!({"region_bytes": 1 << 20, "regions": rec.image_bytes.div_ceil(1 << 20), "root": "00".repeat(32)})
        }
        "placement_table" => json!({"bytes": 40, "digest": "00".repeat(32)}),
        "keep_holes" => json!(true),
        "thin_path" | "plain_digest" | "sealed_digest" | "sealed_fingerprint" => {
            json!("00".repeat(32))
        }
        _ => return Vec::new(),
    };
    vec![Some(v)]
}

/// One edit: `field` (maybe nested) set to `value` (or removed), the MAC word kept or `-`.
#[derive(Debug, Clone)]
struct Edit {
    field: &'static str,
    value: Option<Value>,
}

fn apply(body: &mut Map<String, Value>, t: &Template, e: &Edit) {
    match e.field.split_once('.') {
        None => match &e.value {
            Some(v) => {
                body.insert(e.field.into(), v.clone());
            }
            None => {
                body.remove(e.field);
            }
        },
        Some((outer, inner)) => {
            if !body.contains_key(outer) {
                if let Some(Some(v)) = insertion(t, outer).pop() {
                    body.insert(outer.into(), v);
                }
            }
            if let Some(Value::Object(o)) = body.get_mut(outer) {
                match &e.value {
                    Some(v) => {
                        o.insert(inner.into(), v.clone());
                    }
                    None => {
                        o.remove(inner);
                    }
                }
            }
        }
    }
}

/// The template's record with `edits` applied, a valid checksum, and the MAC word as it
/// was (`keep_mac`) or `-` from version 3 on, none below.
fn forged(t: &Template, edits: &[Edit], keep_mac: bool) -> Vec<u8> {
    let bytes = t.storage.record().unwrap();
    let text = String::from_utf8(bytes).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let words: Vec<&str> = header.split(' ').collect();
    let mut v: Value = serde_json::from_str(body).unwrap();
    for e in edits {
        apply(v.as_object_mut().unwrap(), t, e);
    }
    let version = v["version"].as_u64().unwrap_or(4);
    let body = serde_json::to_string_pretty(&v).unwrap() + "\n";
    let sum = blake3::hash(body.as_bytes()).to_hex();
    let mac = match (version >= 3, keep_mac) {
        (false, _) => String::new(),
        (true, true) => format!(" {}", words.get(3).copied().unwrap_or("-")),
        (true, false) => " -".into(),
    };
    format!("{} {version} {sum}{mac}\n{body}", words[0]).into_bytes()
}

type State = (
    Vec<u8>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    usize,
);

fn state(s: &SimStorage) -> State {
    (
        s.image(),
        s.record(),
        s.key_slot(),
        s.tree(),
        s.thin_count(),
    )
}

/// Run `command` on the template's image under the forged record and check the property.
fn check(t: &Template, edits: &[Edit], keep_mac: bool, command: &str) -> Result<(), String> {
    let s = t.storage.power_loss(&mut StdRng::seed_from_u64(0));
    if s.image() != t.storage.image() {
        return Err("the copy of the template differs".into());
    }
    let bytes = forged(t, edits, keep_mac);
    s.write_record(&bytes).unwrap();
    let before = state(&s);
    let what = format!(
        "{} {command} after {edits:?} (MAC kept: {keep_mac})",
        t.name
    );
    let r = match command {
        "seal" => seal(&s, &t.opts, &NoProgress),
        _ => unseal(&s, t.key(), &NoProgress),
    };
    let outcome = match r {
        Err(e) => {
            if state(&s) != before {
                return Err(format!("{what}: refused ({e}) but something was touched"));
            }
            return Ok(());
        }
        Ok(r) => r.outcome,
    };
    if matches!(outcome, Outcome::Sealed | Outcome::UnsealRolledBack) {
        if let Err(e) = unseal(&s, t.key(), &NoProgress) {
            return Err(format!(
                "{what}: ended {} but the seal it left does not unseal: {e}",
                outcome.name()
            ));
        }
    }
    if s.image() != t.plain {
        return Err(format!(
            "{what}: ended {} over data that is not the plaintext",
            outcome.name()
        ));
    }
    Ok(())
}

/// Every candidate edit of every field, one at a time, in every template, both commands.
#[test]
fn every_single_field_edit_is_refused_untouched_or_ends_bit_exact() {
    let mut applied: BTreeSet<(&str, bool)> = BTreeSet::new();
    let mut failures = Vec::new();
    let mut runs = 0;
    for t in templates() {
        let body: Value = {
            let text = String::from_utf8(t.storage.record().unwrap()).unwrap();
            serde_json::from_str(text.split_once('\n').unwrap().1).unwrap()
        };
        for &field in FIELDS {
            let cur = match field.split_once('.') {
                None => body.get(field),
                Some((o, i)) => body.get(o).and_then(|o| o.get(i)),
            };
            for value in candidates(t, field, cur) {
                applied.insert((field, t.opts.profile == Profile::Secure));
                for keep_mac in [true, false] {
                    for command in ["seal", "unseal"] {
                        runs += 1;
                        let edit = Edit {
                            field,
                            value: value.clone(),
                        };
                        if let Err(e) = check(t, &[edit], keep_mac, command) {
                            failures.push(e);
                        }
                    }
                }
            }
        }
    }
    for &field in FIELDS {
        for secure in [false, true] {
            assert!(
                applied.contains(&(field, secure)),
                "no edit of {field} in the {} profile",
                if secure { "secure" } else { "patent" }
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs broke the property:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn arb_edit() -> impl Strategy<Value = (usize, usize, u64)> {
    (0..templates().len(), 0..FIELDS.len(), any::<u64>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Two edits at once (a phase and the digests that would betray it, say), random.
    #[test]
    fn two_field_edits_are_refused_untouched_or_end_bit_exact(
        (ti, f1, c1) in arb_edit(),
        (f2, c2) in (0..FIELDS.len(), any::<u64>()),
        keep_mac in any::<bool>(),
        unseal_it in any::<bool>(),
    ) {
        let t = &templates()[ti];
        let body: Value = {
            let text = String::from_utf8(t.storage.record().unwrap()).unwrap();
            serde_json::from_str(text.split_once('\n').unwrap().1).unwrap()
        };
        let pick = |f: usize, c: u64| {
            let field = FIELDS[f];
            let cur = match field.split_once('.') {
                None => body.get(field),
                Some((o, i)) => body.get(o).and_then(|o| o.get(i)),
            };
            let all = candidates(t, field, cur);
            Edit { field, value: all[(c % all.len() as u64) as usize].clone() }
        };
        let edits = [pick(f1, c1), pick(f2, c2)];
        let command = if unseal_it { "unseal" } else { "seal" };
        if let Err(e) = check(t, &edits, keep_mac, command) {
            return Err(TestCaseError::fail(e));
        }
    }
}
