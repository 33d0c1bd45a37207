//! What the region digest tree (`docs/instant-reclaim.md`, section 6) costs a seal and an
//! unseal: the `window` strategy's plain passes (seal scatter, unseal gather), the only
//! passes that hash the plaintext, timed without and with the region hasher beside the
//! image digest, interleaved, medians of 3, on a file of random data (default 1 GiB, or
//! `PDGUARD_BENCH_BYTES`) in `PDGUARD_BENCH_DIR` (default `target/bench-tmp`), for the
//! patent profile (no cipher: hashing is the largest share of its CPU) and the secure
//! profile (AES-XTS). Every pass ends with the destination's fsync, as in a job.
//!
//! `cargo bench -p pdguard-engine --bench region_tree`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pdguard_core::cipher::{SectorCipher, XtsAes256};
use pdguard_core::digest::DigestScheme;
use pdguard_core::placement::{self, Placement, PlacementKind};
use pdguard_core::region_tree::{RegionKeys, RegionLayout, REGION_BYTES};
use pdguard_core::Geometry;
use pdguard_engine::jobs::strategy::{PassCtx, RegionTap, Strategy, Window, DEFAULT_MEMORY_BYTES};
use pdguard_engine::jobs::NoProgress;
use pdguard_engine::store::file::FileDisk;
use pdguard_engine::store::Disk;
use rand::{RngCore, SeedableRng};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn disk(path: &Path, bytes: u64) -> FileDisk {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.set_len(bytes).unwrap();
    FileDisk::new(f, path.display().to_string()).unwrap()
}

fn pass_ctx<'a>(
    geometry: Geometry,
    placement: &'a dyn Placement,
    cipher: Option<&'a dyn SectorCipher>,
    digest_key: Option<&'a [u8; 32]>,
    regions: Option<&'a RegionTap>,
) -> PassCtx<'a> {
    PassCtx {
        geometry,
        placement,
        cipher,
        digest_key,
        digest: DigestScheme::DEFAULT,
        keep_holes: false,
        progress: &NoProgress,
        memory_bytes: DEFAULT_MEMORY_BYTES,
        regions,
    }
}

fn main() {
    let bytes: u64 = std::env::var("PDGUARD_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30);
    let dir = std::env::var("PDGUARD_BENCH_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-tmp"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).unwrap();
    let dir = tempfile::tempdir_in(&dir).unwrap();
    let image = disk(&dir.path().join("image"), bytes);
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        image.write_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
    image.sync().unwrap();
    let thin = disk(&dir.path().join("thin"), bytes);
    let out = disk(&dir.path().join("out"), bytes);
    let g = Geometry::new(bytes, 512, 32, 0).unwrap();
    let digest_key = [7u8; 32];
    let xts = XtsAes256::new(&[3u8; 64]);
    println!(
        "region tree cost, {} MiB of random data, window strategy, medians of {RUNS}",
        bytes >> 20
    );
    println!("| profile | pass | without tree | with tree | cost |");
    println!("|---|---|---|---|---|");
    let profiles: [(&str, PlacementKind, Option<&dyn SectorCipher>); 2] = [
        ("patent", PlacementKind::Patent, None),
        ("secure", PlacementKind::Feistel, Some(&xts)),
    ];
    for (profile, kind, cipher) in profiles {
        let placement = placement::build(kind, &[5u8; 32], g.sectors(), g.thin_sectors()).unwrap();
        let key = cipher.map(|_| &digest_key);
        let tap = || {
            let layout = RegionLayout::new(REGION_BYTES.into(), bytes).unwrap();
            RegionTap::new(layout, RegionKeys::new(key), None)
        };
        let w = Window::default();
        let mut times = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        for run in 0..RUNS {
            // Alternate which goes first, so that neither always meets a warmer cache.
            for k in 0..2 {
                let with = (k + run) % 2 == 1;
                let t = with.then(tap);
                let t0 = Instant::now();
                let d1 = w
                    .scatter_plain(
                        &pass_ctx(g, &*placement, cipher, key, t.as_ref()),
                        &image,
                        &thin,
                    )
                    .unwrap();
                thin.sync().unwrap();
                times[0][usize::from(with)].push(t0.elapsed().as_secs_f64());
                if let Some(t) = t {
                    assert!(t.finish().is_some(), "the scatter fed the tree");
                }
                let t = with.then(tap);
                let t0 = Instant::now();
                let d2 = w
                    .gather_plain(
                        &pass_ctx(g, &*placement, cipher, key, t.as_ref()),
                        &thin,
                        &out,
                    )
                    .unwrap();
                out.sync().unwrap();
                times[1][usize::from(with)].push(t0.elapsed().as_secs_f64());
                if let Some(t) = t {
                    assert!(t.finish().is_some(), "the gather fed the tree");
                }
                assert_eq!(d1, d2, "the round trip is not bit-exact");
            }
        }
        for (p, name) in [(0, "seal scatter"), (1, "unseal gather")] {
            let a = median(times[p][0].clone());
            let b = median(times[p][1].clone());
            let mbs = |s: f64| bytes as f64 / s / 1e6;
            println!(
                "| {profile} | {name} | {a:.3} s ({:.0} MB/s) | {b:.3} s ({:.0} MB/s) | {:+.1} % |",
                mbs(a),
                mbs(b),
                (b / a - 1.0) * 100.0
            );
        }
    }
}
