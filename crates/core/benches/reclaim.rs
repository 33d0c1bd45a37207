//! The pure costs of an instant reclaim (`docs/instant-reclaim.md`), medians of 3 runs:
//! - the region digest tree at seal time: `RegionHasher` against the `blake3-64k`
//!   `ImageHasher` the seal already runs, over 256 MiB of bytes that are not zeros, in
//!   MB/s (the tree hashes the plaintext a second time);
//! - what the read path builds before it serves (section 5): a `SealedAddress` for the
//!   Feistel placement without slack (nothing), with 10 % slack (the rank directory), and
//!   the patent placement's replay, for `N` = 2^23 sectors (4 GiB of 512-byte sectors);
//! - `locate` per sector, in ns.
//!
//! `cargo bench -p pdguard-core --bench reclaim`

use std::hint::black_box;
use std::time::Instant;

use pdguard_core::digest::{DigestScheme, ImageHasher};
use pdguard_core::placement::{FeistelPlacement, PatentPlacement, Placement};
use pdguard_core::region_tree::{RegionHasher, RegionKeys, RegionLayout, REGION_BYTES};
use pdguard_core::sealed_address::SealedAddress;

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

fn hashing() {
    let len = 256usize << 20;
    let data: Vec<u8> = (0..len)
        .map(|o| ((o as u64 * 2654435761) >> 13) as u8 | 1)
        .collect();
    let key = [9u8; 32];
    let (mut tree, mut image) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (s, _) = time(|| {
            let layout = RegionLayout::new(u64::from(REGION_BYTES), len as u64)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut h = RegionHasher::new(layout, RegionKeys::new(Some(&key)));
            for chunk in data.chunks(1 << 20) {
                h.update(black_box(chunk));
            }
            black_box(h.finish().unwrap_or_else(|e| panic!("{e}")).1)
        });
        tree.push(len as f64 / s / 1e6);
        let (s, _) = time(|| {
            let mut h = ImageHasher::new(DigestScheme::Blocks64k, Some(&key));
            for chunk in data.chunks(1 << 20) {
                h.update(black_box(chunk));
            }
            black_box(h.finalize())
        });
        image.push(len as f64 / s / 1e6);
    }
    println!(
        "hash 256 MiB: region tree {:.0} MB/s, blake3-64k image digest {:.0} MB/s",
        median(tree),
        median(image)
    );
}

fn read_path() {
    let n = 1u64 << 23;
    let key = [7u8; 32];
    let m = n + n / 10;
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>, u64)> = Vec::new();
    for (name, slots, patent) in [
        ("feistel, no slack", n, false),
        ("feistel, 10% slack", m, false),
        ("patent, no slack", n, true),
    ] {
        let (mut build, mut locate, mut bytes) = (Vec::new(), Vec::new(), 0);
        for _ in 0..RUNS {
            let (s, (p, b)) = time(|| {
                let p: Box<dyn Placement> = if patent {
                    Box::new(PatentPlacement::new(&key, n, slots).unwrap_or_else(|e| panic!("{e}")))
                } else {
                    Box::new(
                        FeistelPlacement::new(&key, n, slots).unwrap_or_else(|e| panic!("{e}")),
                    )
                };
                let b = SealedAddress::new(&*p, None, n, 512).bytes();
                (p, b)
            });
            build.push(s * 1e3);
            bytes = b;
            let a = SealedAddress::new(&*p, None, n, 512);
            let k = 1u64 << 20;
            let (s, _) = time(|| {
                let mut sum = 0u64;
                for i in 0..k {
                    // A stride that visits sectors all over the disk.
                    let i = (i * 2654435761) % n;
                    if let Some(l) = a.locate(black_box(i)) {
                        sum = sum.wrapping_add(l.sealed_sector);
                    }
                }
                black_box(sum)
            });
            locate.push(s * 1e9 / k as f64);
        }
        rows.push((name, build, locate, bytes));
    }
    for (name, build, locate, bytes) in rows {
        println!(
            "N = 2^23, {name}: placement + SealedAddress built in {:.0} ms ({} MiB besides the placement), locate {:.0} ns",
            median(build),
            bytes >> 20,
            median(locate)
        );
    }
}

fn main() {
    hashing();
    read_path();
}
