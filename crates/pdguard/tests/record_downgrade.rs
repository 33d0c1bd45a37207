//! A seal record cannot switch its own authentication off, and no edited record makes the
//! real binary end in success over scrambled data (issue 16, items 4 and 5). Each test
//! plays an attacker who can rewrite the record (recomputing its unkeyed checksum) but not
//! the key, and checks the exit code, the one-line message and that the image, the record
//! and the key slot keep their bytes.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use pdguard_core::keys;
use pdguard_core::SealRecord;
use serde_json::Value;

fn slot_of(img: &Path) -> PathBuf {
    PathBuf::from(format!("{}.key", record_of(img).display()))
}

/// Image, record and key slot bytes (the slot with its inode: overwritten in place or not).
type Everything = (Vec<u8>, Vec<u8>, Option<(Vec<u8>, u64)>);

fn everything(img: &Path) -> Everything {
    let slot = slot_of(img);
    (
        std::fs::read(img).unwrap(),
        std::fs::read(record_of(img)).unwrap(),
        std::fs::read(&slot)
            .ok()
            .map(|b| (b, std::fs::metadata(&slot).unwrap().ino())),
    )
}

fn sealed(dir: &Path, profile: &str) -> (PathBuf, Vec<u8>, Option<PathBuf>) {
    let img = dir.join("disk.img");
    let plain = tagged_image(&img, 256, 512, 11);
    let key = (profile == "secure").then(|| keygen(dir, "master.key"));
    let mut args = vec!["image", "seal", s(&img), "--profile", profile, "--quiet"];
    if let Some(k) = &key {
        args.extend(["--key-file", s(k)]);
    }
    let o = pdguard(&args);
    assert_eq!(code(&o), 0, "seal: {}", stderr(&o));
    (img, plain, key)
}

/// Write `body` as the record with a valid checksum, version `version` and, from version
/// 3, the MAC word `mac` (the attacker cannot compute a valid one).
fn write_record(img: &Path, version: u32, body: &Value, mac: Option<&str>) {
    let body = serde_json::to_string_pretty(body).unwrap() + "\n";
    let sum = blake3::hash(body.as_bytes()).to_hex();
    let mac = mac.map(|m| format!(" {m}")).unwrap_or_default();
    let text = format!("PDGUARD-SEAL-RECORD {version} {sum}{mac}\n{body}");
    std::fs::write(record_of(img), text).unwrap();
}

fn body_of(img: &Path) -> (Value, String) {
    let text = std::fs::read_to_string(record_of(img)).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let mac = header.split(' ').nth(3).unwrap_or("-").to_string();
    (serde_json::from_str(body).unwrap(), mac)
}

/// The attack of issue 16 item 4: a secure version 4 record rewritten as version 2, with
/// the key slot's wrapped key in place of `key_slot` and no MAC word.
fn downgrade(img: &Path, phase: &str) {
    let (mut v, _) = body_of(img);
    let slot = pdguard_core::keyslot::decode(&std::fs::read(slot_of(img)).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("key_slot");
    o.insert("version".into(), Value::from(2));
    o.insert("phase".into(), Value::from(phase));
    o.insert(
        "wrapped_key".into(),
        serde_json::to_value(&slot.wrapped).unwrap(),
    );
    write_record(img, 2, &v, None);
}

fn refused_with(args: &[&str], exit: i32, cause: &str) {
    let o = pdguard(args);
    let err = stderr(&o);
    assert_eq!(code(&o), exit, "{args:?}: exit {}: {err}", code(&o));
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    assert!(err.contains(cause), "{args:?}: {err:?} lacks {cause:?}");
}

#[test]
fn a_record_downgraded_to_version_2_is_refused_and_its_key_slot_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (img, plain, key) = sealed(dir.path(), "secure");
    let (key, i) = (key.unwrap(), s(&img).to_string());
    let k = s(&key);
    for phase in ["sealed", "unsealed"] {
        downgrade(&img, phase);
        let before = everything(&img);
        assert!(before.2.is_some(), "the key slot is missing");
        for (args, cause) in [
            (
                vec!["image", "unseal", &i, "--key-file", k],
                "not bound to such a record",
            ),
            (
                vec!["image", "seal", &i, "--key-file", k],
                "not bound to such a record",
            ),
            (vec!["image", "seal", &i, "--profile", "patent"], "key slot"),
            (
                vec!["image", "shred", &i, "--yes", "--key-file", k],
                "not bound to such a record",
            ),
            (
                vec![
                    "image",
                    "shred",
                    &i,
                    "--yes",
                    "--key-file",
                    "/nonexistent/key",
                ],
                "key slot",
            ),
            (
                vec!["image", "verify", &i, "--key-file", k],
                "migrate it first",
            ),
            (vec!["image", "verify", &i], "key slot"),
            (
                vec!["image", "migrate", &i, "--key-file", k],
                "not bound to such a record",
            ),
        ] {
            let mut args = args.clone();
            args.push("--quiet");
            refused_with(&args, 1, cause);
            assert!(
                everything(&img) == before,
                "{phase}: {args:?} touched the image, the record or the key slot"
            );
        }
        // The shred without a key says the record was replaced, never that it destroyed.
        let o = pdguard(&["image", "shred", &i, "--yes"]);
        assert!(!String::from_utf8_lossy(&o.stdout).contains("shredded"));
    }
    // Inspect only shows it (it touches nothing), saying version 2.
    let o = pdguard(&["image", "inspect", &i, "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"].as_u64(), Some(2));
    assert!(
        std::fs::read(&img).unwrap() != plain,
        "the image is not sealed"
    );
}

/// A version 2 record as version 2 wrote it: the seal's key wrapped inside, bound to
/// version 2. It is migrated explicitly (then unseals bit-exact), and the key slot the
/// migration writes is the one a later shred overwrites.
#[test]
fn migrate_brings_a_version_2_record_to_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let (img, plain, key) = sealed(dir.path(), "secure");
    let key = key.unwrap();
    let master = pdguard_engine::keyfile::load(&key).unwrap();
    let bytes = std::fs::read(record_of(&img)).unwrap();
    let mut rec = SealRecord::decode(&bytes).unwrap();
    let slot = pdguard_core::keyslot::decode(&std::fs::read(slot_of(&img)).unwrap()).unwrap();
    let (data_key, seed) = keys::unwrap(&master, &slot.wrapped, &keys::wrap_aad(&rec)).unwrap();
    rec.version = 2;
    rec.key_slot = None;
    rec.wrapped_key = Some(keys::wrap(
        &master,
        &data_key,
        &seed,
        [5; 12],
        &keys::wrap_aad(&rec),
    ));
    std::fs::remove_file(slot_of(&img)).unwrap();
    std::fs::write(record_of(&img), rec.encode()).unwrap();
    let i = s(&img).to_string();
    // Without the key, nothing acts on it; verify of the sealed bytes still works.
    refused_with(
        &["image", "unseal", &i, "--key-file", "/nonexistent/key"],
        1,
        "no key file",
    );
    refused_with(
        &[
            "image",
            "shred",
            &i,
            "--yes",
            "--key-file",
            "/nonexistent/key",
        ],
        1,
        "migrate it first",
    );
    let o = pdguard(&["image", "verify", &i, "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pdguard(&["image", "migrate", &i, "--key-file", s(&key), "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["from_version"].as_u64(), v["migrated"].as_bool()),
        (Some(2), Some(true))
    );
    let text = std::fs::read_to_string(record_of(&img)).unwrap();
    assert!(text.starts_with("PDGUARD-SEAL-RECORD 4 "), "{text}");
    assert!(!text.contains("wrapped_key") && slot_of(&img).exists());
    let o = pdguard(&["image", "migrate", &i, "--key-file", s(&key)]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to migrate"));
    let o = pdguard(&["image", "verify", &i, "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pdguard(&["image", "unseal", &i, "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(&img).unwrap() == plain);
}

/// Shred says what it destroyed: the key slot, overwritten in place (the same inode holds
/// other bytes just before it is deleted), or nothing when there was none left.
#[test]
fn shred_says_whether_it_overwrote_a_key_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, key) = sealed(dir.path(), "secure");
    let (i, k) = (s(&img).to_string(), key.unwrap());
    let slot = slot_of(&img);
    let held = std::fs::File::open(&slot).unwrap();
    let before = std::fs::read(&slot).unwrap();
    let o = pdguard(&["image", "shred", &i, "--yes", "--key-file", s(&k)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("was overwritten with random bytes and deleted"),
        "{out}"
    );
    let mut after = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut after).unwrap();
    assert_eq!(after.len(), before.len());
    assert!(after != before, "the held key slot still has its bytes");
    assert!(!slot.exists());
    // A shred interrupted after the slot was destroyed, finished without the key.
    let (mut v, _) = body_of(&img);
    v["phase"] = Value::from("shredding");
    write_record(&img, 4, &v, Some("-"));
    let o = pdguard(&[
        "image",
        "shred",
        &i,
        "--yes",
        "--key-file",
        "/nonexistent/key",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("there was no key slot") && out.contains("nothing was destroyed now"),
        "{out}"
    );
}

/// Patent profile, no MAC: a record edited to say `unsealed` or `seal-scatter` never makes
/// unseal exit 0 over the sealed (scrambled) image; it exits 3 and touches nothing.
#[test]
fn patent_phase_edits_never_end_in_success_over_scrambled_data() {
    let dir = tempfile::tempdir().unwrap();
    let (img, plain, _) = sealed(dir.path(), "patent");
    let i = s(&img).to_string();
    let genuine = std::fs::read(record_of(&img)).unwrap();
    let (v0, mac) = body_of(&img);
    for (phase, drop) in [
        ("unsealed", &[][..]),
        ("seal-scatter", &[][..]),
        (
            "seal-scatter",
            &["plain_digest", "sealed_digest", "sealed_fingerprint"][..],
        ),
    ] {
        let mut v = v0.clone();
        v["phase"] = Value::from(phase);
        for f in drop {
            v.as_object_mut().unwrap().remove(*f);
        }
        write_record(&img, 4, &v, Some(&mac));
        let before = everything(&img);
        refused_with(
            &["image", "unseal", &i, "--quiet"],
            3,
            "failed verification",
        );
        assert!(
            everything(&img) == before,
            "unseal of {phase} touched something"
        );
        let o = pdguard(&["image", "seal", &i, "--profile", "patent", "--quiet"]);
        assert_ne!(code(&o), 0, "seal over {phase} succeeded");
        assert!(
            everything(&img) == before,
            "seal of {phase} touched something"
        );
    }
    std::fs::write(record_of(&img), genuine).unwrap();
    let o = pdguard(&["image", "unseal", &i, "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(std::fs::read(&img).unwrap() == plain);
}
