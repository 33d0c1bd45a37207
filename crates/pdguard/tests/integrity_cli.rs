//! Never report success over lost data, end to end (issue 9, item 4): a thin disk
//! corrupted while an unseal runs, and a sealed image tampered with before one.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn inspect(img: &Path) -> Value {
    let o = pdguard(&["image", "inspect", s(img), "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn thin_disks(dir: &Path) -> Vec<PathBuf> {
    dir.read_dir()
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".pdguard-thin"))
        .collect()
}

fn flip_byte(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
    f.sync_all().unwrap();
}

/// The unseal is stopped as its gather starts (test hook), its thin disk corrupted, then it
/// goes on: exit 3, the image is sealed again, the record keeps the seal's digest, and
/// `verify` reports the damage instead of vouching for it.
fn corrupted_thin_case(seal_args: &[&str], key: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 4 * 2048, 512, 21);
    let mut a = vec!["image", "seal", s(&img), "--quiet"];
    a.extend_from_slice(seal_args);
    let o = pdguard(&a);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sealed = inspect(&img);
    let pause = dir.path().join("paused");
    let child = Command::new(bin())
        .args(["image", "unseal", s(&img), "--quiet"])
        .args(key)
        .env_remove("PDGUARD_KEY_FILE")
        .env("PDGUARD_TEST_PAUSE_AT", "gather:0")
        .env("PDGUARD_TEST_PAUSE_FILE", &pause)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pause.exists() {
        assert!(Instant::now() < deadline, "unseal never paused");
        std::thread::sleep(Duration::from_millis(2));
    }
    let thins = thin_disks(dir.path());
    assert_eq!(thins.len(), 1, "{thins:?}");
    flip_byte(&thins[0], 1000 * 512 + 300);
    std::fs::remove_file(&pause).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(3),
        "unseal over a corrupted thin disk: {err}"
    );
    // The gather's region check names the region before the image digest is compared.
    assert!(
        err.contains("does not match the seal's digest tree"),
        "{err}"
    );
    assert!(err.contains("thin disk was corrupted"), "{err}");
    let after = inspect(&img);
    assert_eq!(after["phase"], "sealed");
    assert_eq!(after["sealed_digest"], sealed["sealed_digest"]);
    assert!(thin_disks(dir.path()).is_empty());
    let mut v = vec!["image", "verify", s(&img), "--quiet"];
    v.extend_from_slice(key);
    let o = pdguard(&v);
    assert_eq!(
        code(&o),
        3,
        "verify vouched for a damaged image: {}",
        stderr(&o)
    );
}

#[test]
fn a_thin_disk_corrupted_during_unseal_is_reported_never_vouched_for_patent() {
    corrupted_thin_case(&["--profile", "patent"], &[]);
}

#[test]
fn a_thin_disk_corrupted_during_unseal_is_reported_never_vouched_for_secure() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let k = ["--key-file", s(&key)];
    corrupted_thin_case(&k, &k);
}

#[test]
fn a_tampered_sealed_image_is_refused_before_unseal_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 4 * 2048, 512, 22);
    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    flip_byte(&img, 3 * 512 + 100);
    let before = state(&img);
    let sealed = inspect(&img);
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sealed image's BLAKE3 digest"),
        "{}",
        stderr(&o)
    );
    assert_eq!(digest(&img), before.0, "unseal wrote to a tampered image");
    assert_eq!(inspect(&img)["sealed_digest"], sealed["sealed_digest"]);
    assert!(thin_disks(dir.path()).is_empty());
}

/// The region digest tree end to end: `RECORD.tree` beside the record (mode 0600) after a
/// seal; `verify --key-file` names the bad region of a tampered sealed image (exit 3) where
/// `verify` without the key can only say the digest differs; a tree edited on disk is
/// refused by `unseal` before anything is written; the tree goes with the record.
#[test]
fn the_region_tree_names_a_bad_region_and_a_bad_tree_is_refused_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("disk.img");
    tagged_image(&img, 4 * 2048, 512, 23);
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let tree = dir.path().join("disk.img.pdguard.tree");
    let meta = std::fs::metadata(&tree).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 36 + 4 * 32 + 32);
    assert_eq!(inspect(&img)["region_tree"]["regions"], 4);
    // A byte of sealed sector 3000 (not a sampled fingerprint sector).
    flip_byte(&img, 3000 * 512 + 7);
    let o = pdguard(&["image", "verify", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not match the seal's digest tree"),
        "{}",
        stderr(&o)
    );
    let o = pdguard(&["image", "verify", s(&img), "--quiet"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("BLAKE3 digest"), "{}", stderr(&o));
    flip_byte(&img, 3000 * 512 + 7);
    // A leaf of the tree edited (its checksum then fails): refused, nothing written.
    flip_byte(&tree, 36 + 40);
    let before = state(&img);
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("region digest tree"), "{}", stderr(&o));
    assert_eq!(digest(&img), before.0, "unseal wrote under a bad tree");
    assert_eq!(inspect(&img)["phase"], "sealed");
    flip_byte(&tree, 36 + 40);
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!tree.exists(), "the tree outlived its record");
}
