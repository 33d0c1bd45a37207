//! An instant reclaim that no daemon serves any more, through the real binary: an image
//! left in phase `migrating` (here: `image unseal --instant` SIGKILLed in pass `migrate`)
//! is described by `inspect`, checked region by region by `verify` (exit 3 naming a
//! changed region), refused by `seal` and `shred` with the fix named, and finished by
//! `image unseal`, bit-exact.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `image unseal --instant` stopped by the test hook after `at` bytes of pass `migrate`,
/// then SIGKILLed: the image is left in phase `migrating`.
fn leave_migrating(img: &Path, extra: &[&str], at: u64) {
    let pause = img.with_extension("paused");
    let mut child = Command::new(bin())
        .args([
            "image",
            "unseal",
            s(img),
            "--quiet",
            "--instant",
            "--memory",
            "4M",
        ])
        .args(extra)
        .env_remove("PDGUARD_KEY_FILE")
        .env("PDGUARD_TEST_PAUSE_AT", format!("migrate:{at}"))
        .env("PDGUARD_TEST_PAUSE_FILE", &pause)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pause.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "it ended before pausing"
        );
        assert!(Instant::now() < deadline, "it never paused");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&pause).unwrap();
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
}

fn sibling(img: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = record_of(img).into_os_string();
    p.push(suffix);
    p.into()
}

#[test]
fn an_image_left_migrating_is_checked_refused_and_finished_by_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let k = ["--key-file", s(&key)];
    let img = dir.path().join("disk.img");
    tagged_image(&img, 16 * 2048, 512, 11); // 16 MiB: 16 regions
    let original = digest(&img);
    let o = pdguard(&[&["image", "seal", s(&img), "--quiet"][..], &k].concat());
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // 16 MiB evacuated, then 4 MiB moved in windows of 2 MiB, killed before the second
    // window's fsync and commit: regions 0 and 1 are plain, 2 and 3 were written but are
    // still `evacuated` (moved again from the evacuation copy by the resume).
    leave_migrating(&img, &k, 20 << 20);

    let o = pdguard(&["image", "inspect", s(&img), "--json"]);
    let v = json_of(&o);
    assert_eq!(v["phase"], "migrating");
    assert!(
        v["note"].as_str().unwrap().contains("pdguard image unseal"),
        "{v}"
    );

    // Region by region; the keyed map and tree need the key.
    let o = pdguard(&["image", "verify", s(&img)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("--key-file"), "{}", stderr(&o));
    let v = json_of(&pdguard(
        &[&["image", "verify", s(&img), "--json"][..], &k].concat(),
    ));
    assert_eq!(v["phase"], "migrating");
    assert_eq!(v["regions_checked"], 16);
    assert_eq!(v["regions"]["plain"], 2, "{v}");
    assert_eq!(v["regions"]["evacuated"], 14, "{v}");

    // A changed byte of a moved region, then of the evacuation copy: exit 3, named.
    // (A byte in every 64th sector of sealed store 12: some of them hold sectors of
    // regions not moved yet, which are read from there.)
    let store_12: Vec<u64> = (0..32).map(|k| (12 << 20) + k * 64 * 512 + 77).collect();
    for (file, at, why) in [
        (
            img.clone(),
            vec![(1 << 20) + 9],
            "something other than the reclaim changed it",
        ),
        (
            sibling(&img, ".evacuation"),
            store_12,
            "evacuation copy was corrupted",
        ),
    ] {
        at.iter().for_each(|&b| flip(&file, b));
        let o = pdguard(&[&["image", "verify", s(&img)][..], &k].concat());
        assert_eq!(code(&o), 3, "{}", stderr(&o));
        assert!(
            stderr(&o).contains(why) && stderr(&o).contains("region "),
            "{}",
            stderr(&o)
        );
        at.iter().for_each(|&b| flip(&file, b));
    }

    // seal and shred refuse it, naming the fix, and change nothing.
    let before = (state(&img), digest(&sibling(&img, ".moved")));
    for (args, want) in [
        (
            &["image", "seal", s(&img)][..],
            "finish it offline with `pdguard image unseal",
        ),
        (
            &["image", "shred", s(&img), "--yes"],
            "the regions already moved are plaintext",
        ),
        (
            &["image", "shred", s(&img)],
            "the regions already moved are plaintext",
        ),
    ] {
        let o = pdguard(&[args, &k].concat());
        assert_eq!(code(&o), 1, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    }
    assert_eq!((state(&img), digest(&sibling(&img, ".moved"))), before);

    // `image unseal` (no --instant) finishes it.
    let v = json_of(&pdguard(
        &[&["image", "unseal", s(&img), "--json"][..], &k].concat(),
    ));
    assert_eq!(v["outcome"], "unsealed");
    assert_eq!(v["resumed_from"], "migrating");
    assert_eq!(
        (v["instant"].clone(), v["dirty_regions"].clone()),
        (true.into(), 0.into())
    );
    assert_eq!(digest(&img), original);
    for f in ["", ".key", ".tree", ".moved", ".evacuation"] {
        assert!(!sibling(&img, f).exists(), "{f} left behind");
    }
}

/// `--instant` on a sealed image unseals it bit-exact (patent profile: no key); without a
/// record in phase `migrating`, plain `image unseal` is the copy unseal, as before.
#[test]
fn unseal_instant_unseals_a_sealed_image_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 8 * 2048, 512, 12);
    let original = digest(&img);
    let seal = ["image", "seal", s(&img), "--quiet", "--profile", "patent"];
    assert_eq!(code(&pdguard(&seal)), 0);
    let o = pdguard(&["image", "unseal", s(&img), "--instant"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("region by region, as an instant reclaim"),
        "{out}"
    );
    assert_eq!(digest(&img), original);
    assert_eq!(code(&pdguard(&seal)), 0);
    let v = json_of(&pdguard(&["image", "unseal", s(&img), "--json"]));
    assert_eq!(
        (v["instant"].clone(), v["resumed_from"].clone()),
        (false.into(), serde_json::Value::Null)
    );
    assert_eq!(digest(&img), original);
    // Nothing to migrate: refused as not sealed, as the copy unseal refuses it.
    let o = pdguard(&["image", "unseal", s(&img), "--instant"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is not sealed"), "{}", stderr(&o));
}
