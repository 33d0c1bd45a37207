//! `FeistelPlacement::slot_of` for every sector of a whole disk, N = M: the round-table path
//! of `FeistelPlacement::new` against the same map computed with AES at every round
//! (`FeistelPlacement::without_table`), medians of 5 runs, in ns per evaluation.
//!
//! `cargo bench -p pdguard-core --bench placement`

use std::hint::black_box;
use std::time::Instant;

use pdguard_core::placement::{FeistelPlacement, Placement};

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One pass over the disk: ns per `slot_of`, and a checksum of the map (to compare paths).
fn pass(p: &FeistelPlacement) -> (f64, u64) {
    let n = p.sectors();
    let t = Instant::now();
    let mut sum = 0u64;
    for i in 0..n {
        sum = sum.wrapping_mul(31).wrapping_add(p.slot_of(black_box(i)));
    }
    (t.elapsed().as_secs_f64() * 1e9 / n as f64, black_box(sum))
}

fn main() {
    let key = [7u8; 32];
    for log in [23u32, 27] {
        let n = 1u64 << log;
        let t = Instant::now();
        let table = FeistelPlacement::new(&key, n, n).unwrap_or_else(|e| panic!("{e}"));
        let build_ms = t.elapsed().as_secs_f64() * 1e3;
        let aes = FeistelPlacement::without_table(&key, n, n).unwrap_or_else(|e| panic!("{e}"));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (ns, sum_a) = pass(&table);
            a.push(ns);
            let (ns, sum_b) = pass(&aes);
            b.push(ns);
            assert_eq!(sum_a, sum_b, "the two paths give different maps");
        }
        let (a, b) = (median(a), median(b));
        println!(
            "slot_of over N = M = 2^{log} ({} GiB of 512-byte sectors), median of {RUNS}:",
            (n * 512) >> 30
        );
        println!("  round table  {a:8.1} ns/eval   (new(): {build_ms:.1} ms)");
        println!("  AES rounds   {b:8.1} ns/eval");
        println!("  ratio        {:8.1}x", b / a);
    }
    // The largest table `new` builds: h = 18, 4 MiB, 2^20 AES blocks.
    let t = Instant::now();
    let p = FeistelPlacement::new(&key, 1 << 36, 1 << 36).unwrap_or_else(|e| panic!("{e}"));
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("new() with the largest table (M = 2^36, 4 MiB): {build_ms:.1} ms; {p:?}");
}
