//! End-to-end tests of the secure profile (the default) through the real binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use rand::{Rng, SeedableRng};

const MIB64: usize = 64 << 20;
const MARKERS: usize = 1000;

/// A 64 MiB image that looks like a real disk: mostly zeros, some sectors of text, and
/// 1,000 random 16-byte markers (secrets) planted inside sectors, never across two.
fn planted_image(path: &Path) -> (Vec<u8>, Vec<[u8; 16]>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000);
    let mut img = vec![0u8; MIB64];
    for (i, sector) in img.chunks_exact_mut(512).enumerate() {
        if i % 5 == 0 {
            let line = format!("row {i}: user=alice password=hunter2 balance=1234.56\n");
            for (d, s) in sector.iter_mut().zip(line.bytes().cycle()) {
                *d = s;
            }
        }
    }
    let mut markers = Vec::with_capacity(MARKERS);
    let mut used = HashSet::new();
    while markers.len() < MARKERS {
        let sector = rng.gen_range(0..MIB64 / 512);
        if !used.insert(sector) {
            continue;
        }
        let m: [u8; 16] = rng.gen();
        let at = sector * 512 + rng.gen_range(0..512 - 16);
        img[at..at + 16].copy_from_slice(&m);
        markers.push(m);
    }
    fs::write(path, &img).unwrap();
    (img, markers)
}

/// How many of the markers a byte search of the file finds.
fn findable(path: &Path, markers: &[[u8; 16]]) -> usize {
    let set: HashSet<[u8; 16]> = markers.iter().copied().collect();
    let data = fs::read(path).unwrap();
    let mut found = HashSet::new();
    for w in data.windows(16) {
        if let Ok(k) = <[u8; 16]>::try_from(w) {
            if set.contains(&k) {
                found.insert(k);
            }
        }
    }
    found.len()
}

/// Pearson's chi-square of the byte histogram against the uniform distribution (255 degrees
/// of freedom: mean 255, standard deviation about 22.6).
fn chi_square(path: &Path) -> f64 {
    let data = fs::read(path).unwrap();
    let mut counts = [0u64; 256];
    for b in &data {
        counts[*b as usize] += 1;
    }
    let expected = data.len() as f64 / 256.0;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

#[test]
fn default_seal_hides_every_marker_and_looks_uniform_patent_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("disk.img");
    let (original, markers) = planted_image(&img);
    assert_eq!(findable(&img, &markers), MARKERS);

    // Default profile (secure).
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let hidden = findable(&img, &markers);
    let chi_secure = chi_square(&img);
    assert!(!fs::read(&img).unwrap().windows(7).any(|w| w == b"hunter2"));
    let o = pdguard(&["image", "verify", s(&img), "--key-file", s(&key)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        fs::read(&img).unwrap() == original,
        "secure unseal is not bit-exact"
    );

    // The patent profile, for contrast: the order changes, the bytes do not.
    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let shown = findable(&img, &markers);
    let chi_patent = chi_square(&img);
    let o = pdguard(&["image", "unseal", s(&img), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(fs::read(&img).unwrap() == original);

    eprintln!("markers found: secure {hidden}, patent {shown}; chi-square: secure {chi_secure:.1}, patent {chi_patent:.1}");
    assert_eq!(hidden, 0, "the secure profile leaks markers");
    assert_eq!(
        shown, MARKERS,
        "the patent profile is expected to leave sectors intact"
    );
    // p < 1e-6 bounds for 255 degrees of freedom: a uniform file stays far below 400.
    assert!(
        chi_secure < 400.0,
        "sealed bytes are not uniform: chi-square {chi_secure}"
    );
    assert!(
        chi_patent > 10_000.0,
        "the test image should be far from uniform"
    );
}

#[test]
fn wrong_key_exposed_key_and_shred_are_refused_without_change() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let other = keygen(dir.path(), "other.key");
    let img = dir.path().join("disk.img");
    let original = tagged_image(&img, 2048, 512, 3);
    let before = state(&img);

    // A key file that group or others can read is refused before anything changes.
    let loose = dir.path().join("loose.key");
    fs::copy(&key, &loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&loose)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    assert_eq!(state(&img), before);

    // keygen never overwrites.
    let k0 = fs::read(&key).unwrap();
    let o = pdguard(&["keygen", s(&key)]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("refusing to overwrite"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(&key).unwrap(), k0);

    // The key can come from the environment.
    let o = std::process::Command::new(bin())
        .args(["image", "seal", s(&img), "--quiet"])
        .env("PDGUARD_KEY_FILE", &key)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let sealed = state(&img);

    for (args, needle) in [
        (
            vec!["image", "unseal", s(&img), "--key-file", s(&other)],
            "is not the one",
        ),
        (
            vec!["image", "unseal", s(&img), "--key-file", s(&loose)],
            "chmod 600",
        ),
        (
            vec!["image", "unseal", s(&img), "--key-file", "/nonexistent/k"],
            "needs its master key",
        ),
        (
            vec!["image", "verify", s(&img), "--key-file", s(&other)],
            "is not the one",
        ),
        (vec!["image", "shred", s(&img)], "--yes"),
    ] {
        let o = pdguard(&args);
        // A missing --yes is a usage error (exit 2); the others are errors (exit 1).
        let want = if args.contains(&"shred") { 2 } else { 1 };
        assert_eq!(code(&o), want, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).trim_end().lines().count(), 1);
        assert_eq!(state(&img), sealed, "{args:?} changed something");
    }
    let o = pdguard(&["image", "inspect", s(&img), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["profile"], "secure");
    assert_eq!(v["placement"], "feistel");
    // Version 3: the wrapped key is in the key slot, the record only names it.
    assert!(v.get("wrapped_key").is_none(), "{v}");
    assert_eq!(v["key_slot"]["algorithm"], "aes-256-gcm-siv");
    assert!(v.get("seed").is_none());

    let o = pdguard(&["image", "shred", s(&img), "--yes"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let rec = fs::read_to_string(record_of(&img)).unwrap();
    assert!(
        !rec.contains("ciphertext"),
        "the wrapped key survived: {rec}"
    );
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("crypto-erased"), "{}", stderr(&o));
    assert!(fs::read(&img).unwrap() != original);
}

/// Bytes the file system has allocated to `path`.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// A 256 MiB sparse file holding 3 MiB of random data in three places stays sparse through
/// a seal and an unseal in the patent profile and in the secure profile with --keep-holes,
/// and comes back bit-exact; without --keep-holes the secure profile encrypts the holes.
#[test]
fn a_sparse_image_stays_sparse_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("sparse.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    let mut data = vec![0u8; 1 << 20];
    let len = 256u64 << 20;
    let write = |data: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&img).unwrap();
        f.set_len(len).unwrap();
        for (k, at) in [0u64, 100 << 20, 255 << 20].into_iter().enumerate() {
            f.write_all_at(&data[k * (1 << 18)..][..1 << 18], at)
                .unwrap();
            f.write_all_at(data, at + (1 << 18)).unwrap();
        }
        f.sync_all().unwrap();
    };
    rng.fill(&mut data[..]);
    write(&data);
    let original = fs::read(&img).unwrap();
    let before = allocated(&img);
    if before > 8 << 20 {
        // A file system without holes: nothing to check here, and nothing to skip silently.
        panic!("the temporary directory's file system does not keep holes ({before} bytes allocated for 3.75 MiB of data)");
    }
    for args in [
        &["--profile", "patent"][..],
        &["--key-file", s(&key), "--keep-holes"][..],
    ] {
        let mut seal = vec!["image", "seal", s(&img), "--sector-size", "4096", "--quiet"];
        seal.extend_from_slice(args);
        let o = pdguard(&seal);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        let sealed = allocated(&img);
        // 960 data sectors of 4 KiB, each moved to a place of its own, plus the original
        // data ranges overwritten with zeros (not deallocated): at most about twice the data.
        assert!(
            sealed <= 2 * before + (1 << 20),
            "{args:?}: {sealed} bytes allocated after sealing, {before} before"
        );
        assert!(fs::read(&img).unwrap() != original, "{args:?}: not sealed");
        let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        assert!(
            fs::read(&img).unwrap() == original,
            "{args:?}: not bit-exact"
        );
        assert!(
            allocated(&img) <= 3 * before + (1 << 20),
            "{args:?}: unsealed image grew to {} bytes",
            allocated(&img)
        );
        write(&data);
    }
    // The default secure profile hides which sectors are zeros: every sector is written.
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        allocated(&img) >= len,
        "secure without --keep-holes left holes"
    );
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(fs::read(&img).unwrap() == original);
}
