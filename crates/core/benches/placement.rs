//! `FeistelPlacement::slot_of` for every sector of a whole disk, N = M: the round-table path
//! of `FeistelPlacement::new` against the same map computed with AES at every round
//! (`FeistelPlacement::without_table`), and the table path in batches (`slots_of`, 16 sectors
//! in lockstep), medians of 5 runs, in ns per evaluation.
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

/// One pass over the disk with `slots_of` in batches of 2048 (as a window pass asks): ns per
/// sector, and the same checksum as [`pass`].
fn batched(p: &FeistelPlacement) -> (f64, u64) {
    let n = p.sectors();
    let t = Instant::now();
    let mut sum = 0u64;
    let mut out = vec![0u64; 2048];
    let mut i = 0;
    while i < n {
        let k = (n - i).min(out.len() as u64) as usize;
        p.slots_of(black_box(i), &mut out[..k]);
        for &s in &out[..k] {
            sum = sum.wrapping_mul(31).wrapping_add(s);
        }
        i += k as u64;
    }
    (t.elapsed().as_secs_f64() * 1e9 / n as f64, black_box(sum))
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
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (ns, sum_a) = pass(&table);
            a.push(ns);
            let (ns, sum_b) = pass(&aes);
            b.push(ns);
            let (ns, sum_c) = batched(&table);
            c.push(ns);
            assert_eq!(sum_a, sum_b, "the two paths give different maps");
            assert_eq!(sum_a, sum_c, "slots_of gives another map than slot_of");
        }
        let (a, b, c) = (median(a), median(b), median(c));
        println!(
            "slot_of over N = M = 2^{log} ({} GiB of 512-byte sectors), median of {RUNS}:",
            (n * 512) >> 30
        );
        println!("  round table  {a:8.1} ns/eval   (new(): {build_ms:.1} ms)");
        println!("  AES rounds   {b:8.1} ns/eval");
        println!(
            "  table, slots_of in lockstep  {c:8.1} ns/eval ({:.1}x the one-by-one table)",
            a / c
        );
        println!("  ratio        {:8.1}x", b / a);
    }
    // The largest table `new` builds: h = 18, 4 MiB, 2^20 AES blocks.
    let t = Instant::now();
    let p = FeistelPlacement::new(&key, 1 << 36, 1 << 36).unwrap_or_else(|e| panic!("{e}"));
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("new() with the largest table (M = 2^36, 4 MiB): {build_ms:.1} ms; {p:?}");
}
