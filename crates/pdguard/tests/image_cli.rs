//! End-to-end tests of `pdguard image …` through the real binary (DESIGN.md §5).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, offset).unwrap();
}

/// The "Done when" of the sealing-engine issue, on a 64 MiB image of tagged sectors.
#[test]
fn seal_verify_tamper_unseal_64mib_patent_profile() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sectors = 64 * 1024 * 1024 / 512;
    let original = tagged_image(&img, sectors, 512, 42);

    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sealed = fs::read(&img).unwrap();
    let mut seen = vec![0u8; sectors as usize];
    let mut away = 0u64;
    for (j, sec) in sealed.chunks_exact(512).enumerate() {
        let tag = tag_of(sec).expect("every sealed sector still carries a tag") as usize;
        seen[tag] += 1;
        away += u64::from(tag != j);
    }
    assert!(seen.iter().all(|&c| c == 1), "a tag is missing or repeated");
    assert!(
        away * 100 >= sectors * 99,
        "only {away} of {sectors} sectors moved"
    );
    assert!(!dir.path().read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".pdguard-thin")));

    let o = pdguard(&["image", "verify", s(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // One flipped byte: verify says 3, and unseal refuses with 3, leaving the image sealed.
    flip_byte(&img, 12_345_678);
    let o = pdguard(&["image", "verify", s(&img)]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("corrupted or tampered"),
        "{}",
        stderr(&o)
    );
    let before = state(&img);
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert_eq!(state(&img).0, before.0, "a failed unseal changed the image");
    flip_byte(&img, 12_345_678);

    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        fs::read(&img).unwrap() == original,
        "unseal is not bit-exact"
    );
    assert!(!record_of(&img).exists());

    let o = pdguard(&["image", "unseal", s(&img)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is not sealed"), "{}", stderr(&o));
}

#[test]
fn feistel_placement_slack_and_4k_sectors_round_trip_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let original = tagged_image(&img, 1024, 4096, 7);
    let o = pdguard(&[
        "image",
        "seal",
        s(&img),
        "--profile",
        "patent",
        "--placement",
        "feistel",
        "--sector-size",
        "4096",
        "--word-length",
        "16",
        "--thin-slack",
        "50",
        "--json",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "sealed");
    assert_eq!(v["placement"], "feistel");
    assert_eq!(v["sectors"], 1024);
    assert_eq!(v["thin_sectors"], 1536);
    assert_ne!(fs::read(&img).unwrap(), original);

    let o = pdguard(&["image", "inspect", s(&img), "--json"]);
    assert_eq!(code(&o), 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["phase"], "sealed");
    assert_eq!(v["sector_size"], 4096);
    assert!(
        v["seed"].as_str().unwrap().starts_with("<withheld"),
        "inspect leaks the seed"
    );

    let o = pdguard(&["image", "unseal", s(&img), "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "unsealed");
    assert!(fs::read(&img).unwrap() == original);
}

/// Each bad input gets one line naming the thing and the fix, the right exit code, and
/// changes nothing.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 257, 512, 1);
    let refused = |args: &[&str], exit: i32, needle: &str| {
        let before = state(&img);
        let o = pdguard(args);
        let err = stderr(&o);
        assert_eq!(code(&o), exit, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert_eq!(state(&img), before, "{args:?} changed something");
    };
    let missing = dir.path().join("nope.img");
    refused(&["image", "seal", s(&missing)], 1, "does not exist");
    refused(&["image", "unseal", s(&img)], 1, "is not sealed");
    refused(&["image", "verify", s(&img)], 1, "is not sealed");
    refused(
        &[
            "image",
            "seal",
            s(&img),
            "--profile",
            "patent",
            "--sector-size",
            "1000",
        ],
        2,
        "not a power of two",
    );
    refused(
        &[
            "image",
            "seal",
            s(&img),
            "--profile",
            "patent",
            "--sector-size",
            "65536",
        ],
        1,
        "not a multiple",
    );
    refused(
        &[
            "image",
            "seal",
            s(&img),
            "--profile",
            "patent",
            "--word-length",
            "3",
        ],
        2,
        "--word-length",
    );
    refused(
        &[
            "image",
            "seal",
            s(&img),
            "--profile",
            "patent",
            "--strategy",
            "warp",
        ],
        2,
        "[possible values: window, direct]",
    );
    refused(
        &["image", "seal", s(&img), "--thin-dir", s(&missing)],
        1,
        "not a directory",
    );
    refused(&["image", "seal", s(dir.path())], 1, "is a directory");
    // The default profile is secure: without a key it says how to make one.
    let nokey = dir.path().join("none.key");
    refused(
        &["image", "seal", s(&img), "--key-file", s(&nokey)],
        1,
        "pdguard keygen",
    );

    let odd = dir.path().join("odd.img");
    fs::write(&odd, vec![7u8; 1000]).unwrap();
    let o = pdguard(&["image", "seal", s(&odd), "--profile", "patent"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not a multiple of the sector size"));
    assert_eq!(fs::read(&odd).unwrap(), vec![7u8; 1000]);

    // Sealed: a second seal is refused; a corrupt, newer or foreign record is refused.
    assert_eq!(
        code(&pdguard(&[
            "image",
            "seal",
            s(&img),
            "--profile",
            "patent",
            "--quiet"
        ])),
        0
    );
    refused(
        &["image", "seal", s(&img), "--profile", "patent"],
        1,
        "already sealed",
    );
    let rec = record_of(&img);
    let good = fs::read(&rec).unwrap();
    let mut torn = good.clone();
    torn.truncate(good.len() / 2);
    fs::write(&rec, &torn).unwrap();
    refused(&["image", "unseal", s(&img)], 1, "corrupt");
    refused(
        &["image", "seal", s(&img), "--profile", "patent"],
        1,
        "corrupt",
    );
    let newer = String::from_utf8(good.clone()).unwrap().replacen(
        "PDGUARD-SEAL-RECORD 4 ",
        "PDGUARD-SEAL-RECORD 9 ",
        1,
    );
    assert_ne!(
        newer.as_bytes(),
        &good[..],
        "the record's version is not 4 any more"
    );
    fs::write(&rec, newer).unwrap();
    refused(&["image", "unseal", s(&img)], 1, "newer pdguard");

    let other = dir.path().join("other.img");
    tagged_image(&other, 257, 512, 2);
    assert_eq!(
        code(&pdguard(&[
            "image",
            "seal",
            s(&other),
            "--profile",
            "patent",
            "--quiet"
        ])),
        0
    );
    fs::copy(record_of(&other), &rec).unwrap();
    refused(&["image", "unseal", s(&img)], 1, "does not belong");
    let big = dir.path().join("big.img");
    tagged_image(&big, 512, 512, 3);
    fs::write(&rec, &good).unwrap();
    let o = pdguard(&["image", "unseal", s(&big), "--record", s(&rec)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("does not belong"), "{}", stderr(&o));

    // The record deleted: the image cannot be unsealed, and the message says why.
    fs::rename(&rec, dir.path().join("saved")).unwrap();
    refused(
        &["image", "unseal", s(&img)],
        1,
        "restore the record from a backup",
    );
    fs::rename(dir.path().join("saved"), &rec).unwrap();
    assert_eq!(code(&pdguard(&["image", "unseal", s(&img), "--quiet"])), 0);

    // Usage errors exit 2.
    let o = pdguard(&["image", "seal", s(&img), "--placement", "dice"]);
    assert_eq!(code(&o), 2);
    refused(
        &[
            "image",
            "seal",
            s(&img),
            "--profile",
            "patent",
            "--keep-holes",
        ],
        2,
        "--keep-holes applies to --profile secure only",
    );
    let o = pdguard(&["image", "seal"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn json_errors_are_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 64, 512, 1);
    let o = pdguard(&["image", "unseal", s(&img), "--json"]);
    assert_eq!(code(&o), 1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exit_code"], 1);
    assert!(v["error"].as_str().unwrap().contains("is not sealed"));
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Not enough space for the thin disk is found before anything is written. Needs root to
/// mount a small tmpfs (CI runs as root).
#[test]
fn no_space_for_the_thin_disk_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 4096, 512, 9); // 2 MiB
    let small = dir.path().join("small");
    fs::create_dir(&small).unwrap();
    let o = run(
        "mount",
        &["-t", "tmpfs", "-o", "size=1m", "tmpfs", s(&small)],
    );
    assert!(
        o.status.success(),
        "mounting a tmpfs needs root: {}",
        stderr(&o)
    );
    let before = state(&img);
    let o = pdguard(&[
        "image",
        "seal",
        s(&img),
        "--profile",
        "patent",
        "--thin-dir",
        s(&small),
    ]);
    let err = stderr(&o);
    let _ = run("umount", &[s(&small)]);
    assert_eq!(code(&o), 1, "{err}");
    assert!(err.contains("not enough free space"), "{err}");
    assert!(err.contains("--thin-dir"), "{err}");
    assert_eq!(state(&img), before);
}

/// A block device (a loop device here) needs --record, and seals and unseals like a file.
#[test]
fn block_device_needs_record_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    let original = tagged_image(&backing, 8192, 512, 11); // 4 MiB
    let o = run("losetup", &["--find", "--show", s(&backing)]);
    assert!(
        o.status.success(),
        "losetup needs root and loop devices: {}",
        stderr(&o)
    );
    let dev = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let rec = dir.path().join("dev.pdguard");
    let key = keygen(dir.path(), "k");
    let o1 = pdguard(&["image", "seal", &dev, "--key-file", s(&key)]);
    let o2 = pdguard(&[
        "image",
        "seal",
        &dev,
        "--record",
        s(&rec),
        "--key-file",
        s(&key),
        "--quiet",
    ]);
    let sealed = fs::read(&backing).unwrap();
    let o3 = pdguard(&[
        "image",
        "unseal",
        &dev,
        "--record",
        s(&rec),
        "--key-file",
        s(&key),
        "--quiet",
    ]);
    let _ = run("losetup", &["-d", &dev]);
    assert_eq!(code(&o1), 2, "{}", stderr(&o1));
    assert!(stderr(&o1).contains("--record"), "{}", stderr(&o1));
    assert_eq!(code(&o2), 0, "{}", stderr(&o2));
    assert_ne!(sealed, original);
    assert_eq!(code(&o3), 0, "{}", stderr(&o3));
    assert!(fs::read(&backing).unwrap() == original);
}

#[test]
fn demo_walkthrough_runs() {
    let dir = tempfile::tempdir().unwrap();
    let o = pdguard(&["demo", "--dir", s(dir.path()), "--size", "1M"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("bit-exact with the original"), "{out}");
}
