//! Dense placement on real files (`--keep-holes`, record version 4): the sealed file's data
//! is one region at its start, the original's data past it is wiped and deallocated, and an
//! unseal gives back the bytes and the allocation map exactly.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::*;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// A 64 MiB sparse file holding 16 extents of 256 KiB of random data, spread out to the
/// end, and one extent of 64 KiB of zeros written (allocated) near the end.
fn sparse_image(path: &Path, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = fs::File::create(path).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    for k in 0..16u64 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, k * 4 * MIB + MIB).unwrap();
    }
    f.write_all_at(&[0u8; 64 << 10], 62 * MIB).unwrap();
    f.sync_all().unwrap();
    16 * (256 << 10) + (64 << 10)
}

#[test]
fn a_dense_seal_packs_the_data_first_and_unseals_the_holes_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    for sector in ["4096", "512"] {
        let img = dir.path().join(format!("vol{sector}.img"));
        let data = sparse_image(&img, 13);
        let original = fs::read(&img).unwrap();
        let map = data_ranges(&img);
        if allocated(&img) > 2 * data {
            panic!("the temporary directory's file system does not keep holes ({} bytes allocated for {data} of data)", allocated(&img));
        }
        let o = pdguard(&[
            "image",
            "seal",
            s(&img),
            "--key-file",
            s(&key),
            "--keep-holes",
            "--sector-size",
            sector,
            "--quiet",
            "--json",
        ]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let region = v["dense_sectors"].as_u64().unwrap() * sector.parse::<u64>().unwrap();
        assert_eq!(region, data, "S={sector}: D is the data ranges' sectors");
        // The sealed file allocates its data and no more (within 1% and a few blocks):
        // one region at the start; the original's extents past it were deallocated.
        let sealed_alloc = allocated(&img);
        assert!(
            sealed_alloc <= data + data / 100 + (64 << 10),
            "S={sector}: sealed file allocates {sealed_alloc} bytes for {data} of data"
        );
        for r in data_ranges(&img) {
            assert!(
                r.end <= region,
                "S={sector}: data at {r:?}, past the dense region"
            );
        }
        let sealed = fs::read(&img).unwrap();
        assert!(sealed[region as usize..].iter().all(|&b| b == 0));
        assert!(sealed[..region as usize] != original[..region as usize]);
        let o = pdguard(&["image", "inspect", s(&img), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["version"], 4);
        assert!(v["dense"]["map"]
            .as_str()
            .unwrap()
            .starts_with("<encrypted"));
        let o = pdguard(&["image", "verify", s(&img), "--key-file", s(&key)]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));

        let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        assert!(
            fs::read(&img).unwrap() == original,
            "S={sector}: not bit-exact"
        );
        assert_eq!(
            data_ranges(&img),
            map,
            "S={sector}: holes not restored exactly"
        );
    }
}
