//! AES-256-XTS throughput on 512-byte sectors: pdguard's batched loop against the
//! `xts-mode` crate (one block at a time), side by side in one run, medians of 7 rounds.
//!
//! `cargo bench -p pdguard-core --bench xts`

use std::time::Instant;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::KeyInit;
use aes::Aes256;
use pdguard_core::cipher::{SectorCipher, XtsAes256};

const BYTES: usize = 64 << 20;
const SECTOR: usize = 512;
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let key = [7u8; 64];
    let ours = XtsAes256::new(&key);
    let theirs = xts_mode::Xts128::new(
        Aes256::new(GenericArray::from_slice(&key[..32])),
        Aes256::new(GenericArray::from_slice(&key[32..])),
    );
    let mut buf: Vec<u8> = (0..BYTES).map(|i| (i * 31) as u8).collect();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for (slot, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            ours.encrypt(slot as u64, s);
        }
        a.push(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
        let t = Instant::now();
        for (slot, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            theirs.encrypt_sector(s, (slot as u128).to_le_bytes());
        }
        b.push(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let (a, b) = (median(a), median(b));
    println!(
        "AES-256-XTS, {SECTOR}-byte sectors, {} MiB, median of {ROUNDS}:",
        BYTES >> 20
    );
    println!("  pdguard batched loop  {a:6.2} GB/s");
    println!("  xts-mode crate        {b:6.2} GB/s");
    println!("  ratio                 {:6.2}x", a / b);
}
