//! Never report success over lost data (issue 9, item 4), and one job per image (item 2),
//! over the simulated store.
//!
//! Each test here was checked against a mutation of the job: disabling the sealed-digest
//! check before unseal writes, or the plaintext-digest check at the end of unseal, makes
//! one of them fail.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use pdguard_core::keys::MasterKey;
use pdguard_core::{Phase, PlacementKind, Profile, SealRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::store::sim::SimStorage;
use crate::store::{LockMode, Storage};

fn image(seed: u64) -> Vec<u8> {
    let mut img = vec![0u8; 64 * 512];
    StdRng::seed_from_u64(seed).fill(&mut img[..]);
    img
}

fn profiles() -> [SealOptions; 2] {
    [
        SealOptions::default(),
        SealOptions {
            profile: Profile::Secure,
            placement: Some(PlacementKind::Feistel),
            master_key: Some(MasterKey::from_bytes([0x42; 32])),
            ..SealOptions::default()
        },
    ]
}

fn record(s: &SimStorage) -> SealRecord {
    SealRecord::decode(&s.record().unwrap()).unwrap()
}

/// Flip one byte of the image (sector 3 is outside the sampled fingerprint sectors).
fn flip_image_byte(s: &SimStorage, at: u64) {
    let disk = s.open_image(true).unwrap();
    let mut b = [0u8; 1];
    disk.read_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    disk.write_at(&b, at).unwrap();
}

#[test]
fn a_tampered_sealed_image_is_refused_before_unseal_writes_a_byte_of_it() {
    for o in profiles() {
        let s = SimStorage::new(image(1));
        seal(&s, &o, &NoProgress).unwrap();
        let sealed = record(&s);
        flip_image_byte(&s, 3 * 512 + 100);
        let tampered = s.image();
        let written = s.image_written_bytes();
        let e = unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap_err();
        assert!(e.is_verification(), "{e}");
        assert!(
            e.to_string().contains("sealed image's BLAKE3 digest"),
            "the sealed digest must be what refused it: {e}"
        );
        // Not one byte of plaintext (or anything else) went to the image.
        assert_eq!(s.image_written_bytes(), written, "{:?}", o.profile);
        assert_eq!(s.image(), tampered);
        let after = record(&s);
        assert_eq!(after.phase, Phase::Sealed);
        assert_eq!(after.sealed_digest, sealed.sealed_digest);
        assert_eq!(s.thin_count(), 0);
        assert!(verify(&s, None, &NoProgress).unwrap_err().is_verification());
    }
}

/// Corrupts one byte of the thin disk the first time a pass named `gather` starts: byte
/// `at` of the thin copy of sealed sector `sector` (an unseal's sealed scatter copies each
/// sealed sector's bytes to its thin slot, `thin[u_j] = image[j]`). The slot is found by
/// its bytes, not by an offset: the secure profile's placement is random per seal, and a
/// fixed thin offset would land in a random sealed sector, sometimes one of the sampled
/// fingerprint sectors, which verify then reports as another image's record.
struct CorruptThinAtGather {
    s: SimStorage,
    sealed: Vec<u8>,
    sector: usize,
    at: u64,
    done: AtomicBool,
}

impl Progress for CorruptThinAtGather {
    fn pass(&self, name: &'static str, _total: u64) {
        if name != "gather" || self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let id = record(&self.s).seal_id;
        let thin = self.s.open_thin(&id).unwrap().unwrap();
        let want = &self.sealed[self.sector * 512..(self.sector + 1) * 512];
        let mut slot = vec![0u8; 512];
        let found = (0..thin.len() / 512).map(|k| k * 512).find(|&off| {
            thin.read_at(&mut slot, off).unwrap();
            slot == want
        });
        let off = found.expect("the thin disk holds a copy of the sealed sector") + self.at;
        let mut b = [0u8; 1];
        thin.read_at(&mut b, off).unwrap();
        b[0] ^= 0x01;
        thin.write_at(&b, off).unwrap();
    }
}

#[test]
fn a_thin_disk_corrupted_during_unseal_fails_it_and_verify_reports_the_damage() {
    for o in profiles() {
        let s = SimStorage::new(image(2));
        seal(&s, &o, &NoProgress).unwrap();
        let sealed = record(&s);
        // Sector 5 of 64 is not one of the sampled fingerprint sectors (0, 9, 18, ...).
        assert!(!pdguard_core::fingerprint_sectors(64).contains(&5));
        let hook = CorruptThinAtGather {
            s: s.clone(),
            sealed: s.image(),
            sector: 5,
            at: 77,
            done: AtomicBool::new(false),
        };
        let e = unseal(&s, o.master_key.as_ref(), &hook).unwrap_err();
        assert!(hook.done.load(Ordering::SeqCst));
        assert!(e.is_verification(), "{e}");
        let msg = e.to_string();
        // The region check of the gather names it before the image digest is compared.
        assert!(
            msg.contains("region 0 (bytes 0..32768) does not match the seal's digest tree"),
            "{msg}"
        );
        assert!(msg.contains("thin disk was corrupted"), "{msg}");
        // The seal's digest is a fact of the seal: kept, so verify reports the damage.
        let after = record(&s);
        assert_eq!(after.phase, Phase::Sealed);
        assert_eq!(after.sealed_digest, sealed.sealed_digest);
        assert_eq!(after.sealed_fingerprint, sealed.sealed_fingerprint);
        assert_eq!(s.thin_count(), 0);
        let v = verify(&s, None, &NoProgress).unwrap_err();
        assert!(v.is_verification(), "{v}");
        // The damage is in sealed sector 5 and nowhere else.
        let damaged: Vec<usize> = (0..64)
            .filter(|k| s.image()[k * 512..(k + 1) * 512] != hook.sealed[k * 512..(k + 1) * 512])
            .collect();
        assert_eq!(damaged, vec![5]);
        // And unseal refuses it from now on, by its digest, before writing.
        let written = s.image_written_bytes();
        let e = unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap_err();
        assert!(e.is_verification(), "{e}");
        assert_eq!(s.image_written_bytes(), written);
    }
}

#[test]
fn a_failed_plaintext_check_puts_the_sealed_image_back_bit_exact() {
    // A record whose plaintext digest is wrong (patent profile: the record is only
    // checksummed) makes the plaintext check fail with an intact thin disk.
    let s = SimStorage::new(image(3));
    seal(&s, &SealOptions::default(), &NoProgress).unwrap();
    let sealed_image = s.image();
    let mut rec = record(&s);
    rec.plain_digest = Some("00".repeat(32));
    s.write_record(&rec.encode()).unwrap();
    let e = unseal(&s, None, &NoProgress).unwrap_err();
    assert!(e.is_verification(), "{e}");
    assert!(
        e.to_string().contains("put back in place and matches"),
        "{e}"
    );
    assert_eq!(s.image(), sealed_image);
    let after = record(&s);
    assert_eq!(after.phase, Phase::Sealed);
    assert_eq!(after.sealed_digest, rec.sealed_digest);
    assert_eq!(s.thin_count(), 0);
    verify(&s, None, &NoProgress).unwrap();
}

#[test]
fn every_job_is_refused_as_busy_while_another_holds_the_image() {
    let s = SimStorage::new(image(4));
    let plain = s.image();
    let o = SealOptions::default();
    let held = s.lock_image(LockMode::Exclusive).unwrap();
    let steps = s.steps();
    assert!(seal(&s, &o, &NoProgress).unwrap_err().is_busy());
    assert!(unseal(&s, None, &NoProgress).unwrap_err().is_busy());
    assert!(shred(&s, None).unwrap_err().is_busy());
    assert!(verify(&s, None, &NoProgress).unwrap_err().is_busy());
    assert_eq!(s.steps(), steps, "a busy job must not even read the record");
    assert_eq!(s.image(), plain);
    assert!(s.record().is_none());
    drop(held);
    seal(&s, &o, &NoProgress).unwrap();
    // A shared holder (a verify) lets verifies run but keeps jobs out.
    let reader = s.lock_image(LockMode::Shared).unwrap();
    verify(&s, None, &NoProgress).unwrap();
    assert!(unseal(&s, None, &NoProgress).unwrap_err().is_busy());
    drop(reader);
    unseal(&s, None, &NoProgress).unwrap();
    assert_eq!(s.image(), plain);
    // Each job released its lock.
    drop(s.lock_image(LockMode::Exclusive).unwrap());
}
