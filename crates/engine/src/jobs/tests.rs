//! Engine tests over the simulated store: round trips, FIG. 2, crash and fault injection.
#![allow(clippy::unwrap_used)]

use pdguard_core::keys::MasterKey;
use pdguard_core::placement::FixedPlacement;
use pdguard_core::{Geometry, Phase, PlacementKind, Profile, SealRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::strategy::{Direct, PassCtx, Strategy};
use super::*;
use crate::store::sim::{Fault, SimStorage};
use crate::store::{Sparse, Storage};

/// An image whose sectors each begin with their own index as a tag, the rest random.
fn tagged_image(sectors: u64, sector: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut img = vec![0u8; sectors as usize * sector];
    rng.fill(&mut img[..]);
    for (i, s) in img.chunks_exact_mut(sector).enumerate() {
        s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    img
}

/// [`tagged_image`] with holes: about half of its 4 KiB blocks and a fifth of the other
/// sectors are zeros, so that every pass meets holes, zero sectors in data ranges, and data.
fn holey_image(sectors: u64, sector: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut img = tagged_image(sectors, sector, rng);
    for block in img.chunks_mut(4096) {
        if rng.gen_bool(0.5) {
            block.fill(0);
        }
    }
    for s in img.chunks_exact_mut(sector) {
        if rng.gen_bool(0.2) {
            s.fill(0);
        }
    }
    img
}

fn zero_sectors(img: &[u8], sector: usize) -> usize {
    img.chunks_exact(sector)
        .filter(|s| s.iter().all(|&b| b == 0))
        .count()
}

fn master() -> MasterKey {
    MasterKey::from_bytes([0x42; 32])
}

fn opts(placement: PlacementKind, sector: u32, slack: u32) -> SealOptions {
    SealOptions {
        placement: Some(placement),
        sector_size: sector,
        thin_slack_pct: slack,
        ..SealOptions::default()
    }
}

fn secure(placement: PlacementKind, sector: u32, slack: u32) -> SealOptions {
    SealOptions {
        profile: Profile::Secure,
        master_key: Some(master()),
        ..opts(placement, sector, slack)
    }
}

fn record(s: &SimStorage) -> Option<SealRecord> {
    s.record().map(|b| SealRecord::decode(&b).unwrap())
}

#[test]
fn fig2_of_the_patent_through_scatter_and_gather() {
    // N = 6, M = 12, draws 5, 3, 0, 4, 2, 1: X0..X5 go to T5, T3, T0, T4, T2, T1, and
    // gathering T0..T11 skipping empty slots leaves X2, X5, X4, X1, X3, X0 ([042]-[045]).
    let g = Geometry::with_slots(6, 12, 512, 32).unwrap();
    let x: Vec<Vec<u8>> = (0..6u8).map(|k| vec![b'A' + k; 512]).collect();
    let storage = SimStorage::new(x.concat());
    let image = storage.open_image(true).unwrap();
    let thin = storage.scratch_disk("fig2.thin", g.thin_bytes());
    let placement = FixedPlacement::new(vec![5, 3, 0, 4, 2, 1], 12).unwrap();
    let ctx = PassCtx {
        geometry: g,
        placement: &placement,
        cipher: None,
        digest_key: None,
        // The version 1 scheme: the sealed digest is plain BLAKE3 of the sealed image.
        digest: pdguard_core::digest::DigestScheme::Whole,
        keep_holes: false,
        progress: &NoProgress,
        memory_bytes: strategy::DEFAULT_MEMORY_BYTES,
        regions: None,
    };
    let plain = Direct.scatter_plain(&ctx, &*image, &*thin).unwrap();
    let slot = |t: u64| {
        let mut b = vec![0u8; 512];
        thin.read_at(&mut b, t * 512).unwrap();
        b
    };
    for (k, t) in [5, 3, 0, 4, 2, 1].into_iter().enumerate() {
        assert_eq!(slot(t), x[k], "X{k} not at T{t}");
    }
    for t in 6..12 {
        assert_eq!(slot(t), vec![0u8; 512], "T{t} should be empty");
    }
    let sealed = Direct.gather_sealed(&ctx, &*thin, &*image).unwrap();
    let want = [2, 5, 4, 1, 3, 0].map(|k| x[k].clone()).concat();
    assert_eq!(storage.image(), want);
    assert_eq!(sealed, blake3::hash(&want));
    // And back: the unseal passes invert it exactly.
    let thin2 = storage.scratch_disk("fig2.thin2", g.thin_bytes());
    assert_eq!(
        Direct.scatter_sealed(&ctx, &*image, &*thin2).unwrap(),
        sealed
    );
    assert_eq!(Direct.gather_plain(&ctx, &*thin2, &*image).unwrap(), plain);
    assert_eq!(storage.image(), x.concat());
}

#[test]
fn round_trip_for_every_placement_and_geometry() {
    let mut rng = StdRng::seed_from_u64(1);
    for (placement, profile) in [
        (PlacementKind::Patent, Profile::Patent),
        (PlacementKind::Feistel, Profile::Patent),
        (PlacementKind::Feistel, Profile::Secure),
        (PlacementKind::Patent, Profile::Secure),
    ] {
        for (sector, sectors, slack) in [
            (512, 64, 0),
            (512, 37, 50),
            (4096, 20, 0),
            (4096, 9, 50),
            (1024, 1, 0),
        ] {
            let img = tagged_image(sectors, sector as usize, &mut rng);
            let s = SimStorage::new(img.clone());
            let o = match profile {
                Profile::Patent => opts(placement, sector, slack),
                Profile::Secure => secure(placement, sector, slack),
            };
            let r = seal(&s, &o, &NoProgress).unwrap();
            assert_eq!(r.outcome, Outcome::Sealed);
            assert_eq!(record(&s).unwrap().phase, Phase::Sealed);
            assert_eq!(s.thin_count(), 0, "thin disk left behind");
            if sectors > 8 {
                assert_ne!(
                    s.image(),
                    img,
                    "{placement:?} {sector} {sectors}: unchanged"
                );
            }
            verify(&s, None, &NoProgress).unwrap();
            let r = unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
            assert_eq!(r.outcome, Outcome::Unsealed);
            assert_eq!(s.image(), img, "{placement:?} {sector} {sectors} {slack}");
            assert!(s.record().is_none());
            assert_eq!(s.thin_count(), 0);
        }
    }
}

#[test]
fn sealed_image_holds_every_sector_once_and_moves_them() {
    let mut rng = StdRng::seed_from_u64(2);
    let img = tagged_image(4096, 512, &mut rng);
    for placement in [PlacementKind::Patent, PlacementKind::Feistel] {
        let s = SimStorage::new(img.clone());
        seal(&s, &opts(placement, 512, 0), &NoProgress).unwrap();
        let sealed = s.image();
        let mut seen = vec![0u32; 4096];
        let mut moved = 0;
        for (j, sec) in sealed.chunks_exact(512).enumerate() {
            let tag = u64::from_le_bytes(sec[..8].try_into().unwrap()) as usize;
            assert_eq!(sec, &img[tag * 512..tag * 512 + 512]);
            seen[tag] += 1;
            moved += usize::from(tag != j);
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert!(
            moved * 100 >= 4096 * 99,
            "{placement:?}: only {moved} moved"
        );
    }
}

#[test]
fn bad_requests_change_nothing() {
    let mut rng = StdRng::seed_from_u64(3);
    // 33 sectors of 512: not a multiple of 4096.
    let img = tagged_image(33, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    assert!(matches!(
        unseal(&s, None, &NoProgress),
        Err(JobError::NotSealed { .. })
    ));
    assert!(matches!(
        verify(&s, None, &NoProgress),
        Err(JobError::NotSealed { .. })
    ));
    assert!(matches!(
        seal(&s, &opts(PlacementKind::Patent, 4096, 0), &NoProgress),
        Err(JobError::Geometry { .. })
    ));
    s.set_free_bytes(1000);
    assert!(matches!(
        seal(&s, &SealOptions::default(), &NoProgress),
        Err(JobError::NoSpace { .. })
    ));
    assert_eq!(s.image(), img);
    assert!(s.record().is_none());
    s.set_free_bytes(u64::MAX);
    seal(&s, &SealOptions::default(), &NoProgress).unwrap();
    let sealed = s.image();
    let rec = s.record();
    assert!(matches!(
        seal(&s, &SealOptions::default(), &NoProgress),
        Err(JobError::AlreadySealed { .. })
    ));
    assert_eq!((s.image(), s.record()), (sealed.clone(), rec.clone()));
    // A corrupt record is refused by every command, and nothing changes.
    let mut bad = rec.clone().unwrap();
    let n = bad.len();
    bad[n - 5] ^= 1;
    s.write_record(&bad).unwrap();
    assert!(matches!(
        unseal(&s, None, &NoProgress),
        Err(JobError::Record { .. })
    ));
    assert!(matches!(
        seal(&s, &SealOptions::default(), &NoProgress),
        Err(JobError::Record { .. })
    ));
    assert_eq!(s.image(), sealed);
    assert_eq!(s.record(), Some(bad));
}

#[test]
fn tampered_sealed_image_fails_verification_and_stays_sealed() {
    for o in [
        SealOptions::default(),
        secure(PlacementKind::Feistel, 512, 0),
    ] {
        tampered_case(&o);
    }
}

fn tampered_case(o: &SealOptions) {
    let mut rng = StdRng::seed_from_u64(4);
    let img = tagged_image(64, 512, &mut rng);
    let s = SimStorage::new(img);
    seal(&s, o, &NoProgress).unwrap();
    let disk = s.open_image(true).unwrap();
    // Flip one byte outside the sampled fingerprint sectors (sector 3).
    let mut b = [0u8; 1];
    disk.read_at(&mut b, 3 * 512 + 100).unwrap();
    b[0] ^= 0x40;
    disk.write_at(&b, 3 * 512 + 100).unwrap();
    let tampered = s.image();
    let e = verify(&s, None, &NoProgress).unwrap_err();
    assert!(e.is_verification(), "{e}");
    let e = unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap_err();
    assert!(e.is_verification(), "{e}");
    assert_eq!(s.image(), tampered);
    assert_eq!(record(&s).unwrap().phase, Phase::Sealed);
    assert_eq!(s.thin_count(), 0);
}

#[test]
fn a_record_from_another_image_is_refused() {
    let mut rng = StdRng::seed_from_u64(5);
    let a = SimStorage::new(tagged_image(64, 512, &mut rng));
    let b_img = tagged_image(64, 512, &mut rng);
    let b = SimStorage::new(b_img.clone());
    seal(&a, &SealOptions::default(), &NoProgress).unwrap();
    seal(&b, &SealOptions::default(), &NoProgress).unwrap();
    let b_sealed = b.image();
    b.write_record(&a.record().unwrap()).unwrap();
    assert!(matches!(
        unseal(&b, None, &NoProgress),
        Err(JobError::Mismatch { .. })
    ));
    assert_eq!(b.image(), b_sealed);
}

/// The command a user runs after a crash.
#[derive(Debug, Clone, Copy)]
enum Then {
    Seal,
    Unseal,
}

/// Seal (or unseal, if `sealed_first`) with `fault` armed at `step`; then lose power,
/// reboot, run `then`, and check that unsealing gives back `img` bit-exact.
fn crash_case(
    img: &[u8],
    o: &SealOptions,
    sealed_first: bool,
    step: u64,
    fault: Fault,
    then: Then,
    rng: &mut StdRng,
) {
    let s = SimStorage::new(img.to_vec());
    if sealed_first {
        seal(&s, o, &NoProgress).unwrap();
    }
    s.arm(step, fault);
    let first = if sealed_first {
        unseal(&s, o.master_key.as_ref(), &NoProgress)
    } else {
        seal(&s, o, &NoProgress)
    };
    // A job whose I/O count depends on the placement (the window strategy; the secure
    // profile draws a new key per seal) may end before `step`: the fault must not fire
    // in the recovery instead.
    s.disarm();
    let s = if fault == Fault::Crash {
        s.power_loss(rng)
    } else {
        s
    };
    if first.is_ok() {
        assert!(fault != Fault::Crash || step > 0);
    }
    let ctx = format!(
        "sealed_first={sealed_first} step={step} {fault:?} then {then:?} first={:?}",
        first.as_ref().map(|r| r.outcome).map_err(|e| e.to_string())
    );
    match then {
        Then::Seal => {
            match seal(&s, o, &NoProgress) {
                Ok(_) => {}
                Err(JobError::AlreadySealed { .. }) => {}
                Err(e) => panic!("{ctx}: resume by seal failed: {e}"),
            }
            assert_eq!(record(&s).map(|r| r.phase), Some(Phase::Sealed), "{ctx}");
            unseal(&s, o.master_key.as_ref(), &NoProgress)
                .unwrap_or_else(|e| panic!("{ctx}: unseal: {e}"));
        }
        Then::Unseal => match unseal(&s, o.master_key.as_ref(), &NoProgress) {
            Ok(_) | Err(JobError::NotSealed { .. }) => {}
            Err(e) => panic!("{ctx}: resume by unseal failed: {e}"),
        },
    }
    assert!(s.record().is_none(), "{ctx}: record left");
    assert!(s.tree().is_none(), "{ctx}: region digest tree left");
    assert!(s.place().is_none(), "{ctx}: placement table left");
    assert_eq!(s.thin_count(), 0, "{ctx}: thin disk left");
    assert!(s.image() == img, "{ctx}: data lost");
}

fn steps_of(img: &[u8], o: &SealOptions, sealed_first: bool) -> u64 {
    let s = SimStorage::new(img.to_vec());
    if sealed_first {
        seal(&s, o, &NoProgress).unwrap();
    }
    let before = s.steps();
    if sealed_first {
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
    } else {
        seal(&s, o, &NoProgress).unwrap();
    }
    s.steps() - before
}

fn crash_everywhere(o: SealOptions, sector: usize) {
    let mut rng = StdRng::seed_from_u64(6);
    let img = tagged_image(24, sector, &mut rng);
    crash_everywhere_on(&img, &o, &mut rng);
}

/// A crash, an EIO and an ENOSPC at every step of a seal and of an unseal of `img`, each
/// recovered by a seal and by an unseal.
fn crash_everywhere_on(img: &[u8], o: &SealOptions, rng: &mut StdRng) {
    for sealed_first in [false, true] {
        let total = steps_of(img, o, sealed_first);
        assert!(total > 20, "too few steps to be meaningful: {total}");
        for step in 1..=total {
            for fault in [Fault::Crash, Fault::Eio, Fault::NoSpace] {
                for then in [Then::Seal, Then::Unseal] {
                    crash_case(img, o, sealed_first, step, fault, then, rng);
                }
            }
        }
    }
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_patent_placement() {
    crash_everywhere(opts(PlacementKind::Patent, 512, 0), 512);
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_secure_profile() {
    crash_everywhere(secure(PlacementKind::Feistel, 512, 0), 512);
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_secure_4k_with_slack() {
    crash_everywhere(secure(PlacementKind::Feistel, 4096, 50), 4096);
}

#[test]
fn secure_profile_refuses_a_wrong_or_missing_key_without_change() {
    let mut rng = StdRng::seed_from_u64(8);
    let img = tagged_image(64, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    let o = secure(PlacementKind::Feistel, 512, 0);
    let missing = SealOptions {
        master_key: None,
        ..o.clone()
    };
    assert!(matches!(
        seal(&s, &missing, &NoProgress),
        Err(JobError::KeyMissing { .. })
    ));
    assert_eq!((s.image(), s.record()), (img.clone(), None));
    seal(&s, &o, &NoProgress).unwrap();
    let rec = record(&s).unwrap();
    assert!(
        rec.seed.is_none(),
        "secure record holds the seed in the clear"
    );
    let text = String::from_utf8(s.record().unwrap()).unwrap();
    assert!(!text.contains(&hex::encode([0x42u8; 32])));
    let sealed = (s.image(), s.record());
    let wrong = MasterKey::from_bytes([7; 32]);
    assert!(matches!(
        unseal(&s, Some(&wrong), &NoProgress),
        Err(JobError::WrongKey { .. })
    ));
    assert!(matches!(
        unseal(&s, None, &NoProgress),
        Err(JobError::KeyMissing { .. })
    ));
    assert!(matches!(
        verify(&s, Some(&wrong), &NoProgress),
        Err(JobError::WrongKey { .. })
    ));
    // A record whose disk identity was edited (and re-checksummed) is refused: its MAC
    // no longer matches (and the wrap's associated data would not either).
    let mut edited = rec.clone();
    edited.seal_id = "ffffffffffffffffffffffffffffffff".into();
    edited.thin_path = Some(s.thin_name(&edited.seal_id).unwrap());
    s.write_record(&edited.encode()).unwrap();
    assert!(matches!(
        unseal(&s, Some(&master()), &NoProgress),
        Err(JobError::Record { .. })
    ));
    s.write_record(&sealed.1.clone().unwrap()).unwrap();
    assert_eq!((s.image(), s.record()), sealed);
    verify(&s, Some(&master()), &NoProgress).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert_eq!(s.image(), img);
}

#[test]
fn shred_destroys_the_key_and_unseal_is_refused() {
    let mut rng = StdRng::seed_from_u64(9);
    let img = tagged_image(64, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    let o = secure(PlacementKind::Feistel, 512, 0);
    seal(&s, &o, &NoProgress).unwrap();
    let rec = record(&s).unwrap();
    assert!(
        rec.wrapped_key.is_none(),
        "a version 3 record holds the wrapped key"
    );
    let slot = s.key_slot().unwrap();
    let ct = slot_ciphertext(&slot);
    let text = String::from_utf8(s.record().unwrap()).unwrap();
    assert!(
        !text.contains(&hex::encode(&ct)),
        "the record holds a copy of the wrapped key"
    );
    let before = s.record().unwrap();
    let sealed = s.image();
    let tomb = shred(&s, Some(&master())).unwrap();
    assert_eq!(tomb.phase, Phase::Shredded);
    assert!(s.key_slot().is_none(), "the key slot survived the shred");
    let text = String::from_utf8(s.record().unwrap()).unwrap();
    assert!(
        !text.contains(&hex::encode(&ct)),
        "wrapped key survived the shred"
    );
    assert!(matches!(
        unseal(&s, Some(&master()), &NoProgress),
        Err(JobError::Shredded { .. })
    ));
    assert!(matches!(
        verify(&s, None, &NoProgress),
        Err(JobError::Shredded { .. })
    ));
    assert!(matches!(shred(&s, None), Err(JobError::Shredded { .. })));
    assert_eq!(s.image(), sealed);
    // The record as it was before the shred, written back, cannot unseal: its key slot is
    // gone, and with it the only copy of the wrapped key.
    s.write_record(&before).unwrap();
    assert!(matches!(
        unseal(&s, Some(&master()), &NoProgress),
        Err(JobError::KeySlot { .. })
    ));
    assert_eq!(s.image(), sealed);
    s.write_record(&s.record().unwrap()).unwrap();
    shred(&s, None).unwrap();
    // The patent profile has no key to destroy.
    let p = SimStorage::new(img.clone());
    seal(&p, &SealOptions::default(), &NoProgress).unwrap();
    assert!(matches!(shred(&p, None), Err(JobError::Unsupported(_))));
    assert!(p.key_slot().is_none(), "a patent seal has a key slot");
    // A shred is final: sealing over its tombstone is refused and changes nothing...
    let tomb = s.record().unwrap();
    assert!(matches!(
        seal(&s, &o, &NoProgress),
        Err(JobError::SealOverShred { .. })
    ));
    assert_eq!(s.record().unwrap(), tomb);
    assert_eq!(s.image(), sealed);
    // ...until the user removes the tombstone on purpose: then new data can be sealed.
    s.remove_record().unwrap();
    seal(&s, &o, &NoProgress).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert_eq!(s.image(), sealed);
    assert!(
        s.key_slot().is_none(),
        "an unsealed image keeps its key slot"
    );
}

/// The wrapped key's raw bytes inside a slot file.
fn slot_ciphertext(slot: &[u8]) -> Vec<u8> {
    slot[pdguard_core::keyslot::ciphertext_range(slot).unwrap()].to_vec()
}

/// The record's bytes with its body edited by `edit`, and the unkeyed checksum recomputed
/// as anyone can; the MAC word is kept as it was.
fn forge(bytes: &[u8], edit: impl FnOnce(&mut SealRecord)) -> Vec<u8> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let (header, _) = text.split_once('\n').unwrap();
    let mac = header.split(' ').nth(3);
    let mut rec = SealRecord::decode(bytes).unwrap();
    edit(&mut rec);
    let plain = String::from_utf8(rec.encode()).unwrap();
    match mac {
        Some(m) => plain.replacen(" -\n", &format!(" {m}\n"), 1).into_bytes(),
        None => plain.into_bytes(),
    }
}

#[test]
fn an_edited_secure_record_is_refused_before_anything_is_touched() {
    let mut rng = StdRng::seed_from_u64(91);
    let img = tagged_image(64, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    let good = s.record().unwrap();
    let sealed = s.image();
    let slot = s.key_slot();
    // Edits that nothing but the MAC catches: a field no other check reads back.
    let edits: [fn(&mut SealRecord); 3] = [
        |r| r.sealed_digest = Some("00".repeat(32)),
        |r| r.writer = "someone else".into(),
        |r| r.created_unix += 1,
    ];
    for edit in edits {
        let forged = forge(&good, edit);
        assert!(
            SealRecord::decode(&forged).is_ok(),
            "the forgery is well formed"
        );
        s.write_record(&forged).unwrap();
        let unauthentic = |e: JobError| {
            matches!(
                e,
                JobError::Record {
                    source: pdguard_core::RecordError::Unauthenticated(_),
                    ..
                }
            )
        };
        let e = unseal(&s, Some(&master()), &NoProgress).unwrap_err();
        assert!(unauthentic(e));
        let e = verify(&s, Some(&master()), &NoProgress).unwrap_err();
        assert!(unauthentic(e));
        let e = shred(&s, Some(&master())).unwrap_err();
        assert!(unauthentic(e));
        let e = seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap_err();
        assert!(unauthentic(e));
        assert_eq!(
            (s.image(), s.record(), s.key_slot()),
            (sealed.clone(), Some(forged), slot.clone())
        );
    }
    // A record with its MAC word removed is refused too.
    let text = String::from_utf8(good.clone()).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    let words: Vec<&str> = header.split(' ').collect();
    let bare = format!("{} {} {} -\n{body}", words[0], words[1], words[2]);
    s.write_record(bare.as_bytes()).unwrap();
    assert!(unseal(&s, Some(&master()), &NoProgress).is_err());
    assert_eq!(s.image(), sealed);
    s.write_record(&good).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert_eq!(s.image(), img);
}

#[test]
fn a_record_naming_another_thin_disk_is_refused_in_both_profiles() {
    for o in [
        SealOptions::default(),
        secure(PlacementKind::Feistel, 512, 0),
    ] {
        let mut rng = StdRng::seed_from_u64(92);
        let img = tagged_image(64, 512, &mut rng);
        let s = SimStorage::new(img.clone());
        seal(&s, &o, &NoProgress).unwrap();
        let good = s.record().unwrap();
        let sealed = s.image();
        for phase in [
            Phase::Sealed,
            Phase::SealGather,
            Phase::UnsealGather,
            Phase::Unsealed,
        ] {
            let forged = forge(&good, |r| {
                r.thin_path = Some("/etc/victim".into());
                r.phase = phase;
            });
            s.write_record(&forged).unwrap();
            // Without the key (patent profile), the derived path is the only defence.
            for e in [
                unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap_err(),
                unseal(&s, None, &NoProgress).unwrap_err(),
                seal(&s, &o, &NoProgress).unwrap_err(),
                seal(&s, &SealOptions::default(), &NoProgress).unwrap_err(),
            ] {
                let want_mac = o.profile == Profile::Secure && o.master_key.is_some();
                assert!(
                    matches!(e, JobError::ThinPathMismatch { .. })
                        || (want_mac && matches!(e, JobError::Record { .. })),
                    "{e}"
                );
            }
            assert_eq!((s.image(), s.record()), (sealed.clone(), Some(forged)));
        }
        // A seal id that is not 32 lowercase hex digits never becomes a file name.
        let forged = forge(&good, |r| r.seal_id = "../../../etc/passwd".into());
        assert!(SealRecord::decode(&forged).is_err());
        assert!(s.thin_name("../../../etc/passwd").is_err());
        assert!(s.create_thin("../x", 512).is_err());
    }
}

/// A genuine secure record of version 2, as version 2 wrote it: the seal's key wrapped
/// inside the record, bound to version 2, no key slot, no MAC word.
fn genuine_v2(s: &SimStorage) -> Vec<u8> {
    use pdguard_core::keys;
    let mut rec = record(s).unwrap();
    let w = pdguard_core::keyslot::decode(&s.key_slot().unwrap())
        .unwrap()
        .wrapped;
    let (data_key, seed) = keys::unwrap(&master(), &w, &keys::wrap_aad(&rec)).unwrap();
    rec.version = 2;
    rec.key_slot = None;
    rec.wrapped_key = Some(keys::wrap(
        &master(),
        &data_key,
        &seed,
        [9; 12],
        &keys::wrap_aad(&rec),
    ));
    s.destroy_key_slot().unwrap();
    let v2 = rec.encode();
    assert!(String::from_utf8(v2.clone())
        .unwrap()
        .starts_with("PDGUARD-SEAL-RECORD 2 "));
    s.write_record(&v2).unwrap();
    v2
}

/// A version 2 record has no MAC: without the key it is only read (verify), never acted
/// on; without one, shred refuses it (it cannot be migrated) and changes nothing.
#[test]
fn a_version_2_record_is_only_read_until_it_is_migrated() {
    let mut rng = StdRng::seed_from_u64(93);
    let s = SimStorage::new(tagged_image(64, 512, &mut rng));
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    let v2 = genuine_v2(&s);
    let sealed = s.image();
    verify(&s, None, &NoProgress).unwrap();
    for e in [
        shred(&s, None).unwrap_err(),
        unseal(&s, None, &NoProgress).unwrap_err(),
        verify(&s, Some(&master()), &NoProgress).unwrap_err(),
    ] {
        assert!(matches!(e, JobError::OldRecord { version: 2, .. }), "{e}");
    }
    assert_eq!(
        (s.image(), s.record(), s.key_slot()),
        (sealed, Some(v2), None)
    );
}

/// With the master key, a shred migrates a version 2 record first (its wrapped key moves
/// to a key slot) and then overwrites that slot: no copy of the key is left in the record.
#[test]
fn shredding_a_version_2_record_migrates_it_then_destroys_the_slot() {
    let mut rng = StdRng::seed_from_u64(93);
    let s = SimStorage::new(tagged_image(64, 512, &mut rng));
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    genuine_v2(&s);
    let ct = record(&s).unwrap().wrapped_key.unwrap().ciphertext;
    let r = shred_report(&s, Some(&master())).unwrap();
    assert_eq!(
        (r.record.phase, r.record.version, r.slot),
        (
            Phase::Shredded,
            pdguard_core::record::RECORD_VERSION,
            SlotFate::Overwritten
        )
    );
    assert!(s.key_slot().is_none());
    assert!(!String::from_utf8(s.record().unwrap())
        .unwrap()
        .contains(&ct));
    // Shredding the tombstone again destroys nothing, and says so.
    assert!(matches!(
        shred_report(&s, Some(&master())),
        Err(JobError::Shredded { .. })
    ));
}

/// A shred interrupted after its slot was overwritten is finished, and reports that there
/// was no slot left to overwrite rather than claiming to destroy one.
#[test]
fn a_shred_with_no_slot_left_says_so() {
    let mut rng = StdRng::seed_from_u64(95);
    let s = SimStorage::new(tagged_image(64, 512, &mut rng));
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    let mut rec = record(&s).unwrap();
    rec.phase = Phase::Shredding;
    rec.plain_digest = None;
    rec.region_tree = None;
    s.destroy_key_slot().unwrap();
    s.write_record(&rec.encode()).unwrap();
    let r = shred_report(&s, None).unwrap();
    assert_eq!(
        (r.record.phase, r.slot),
        (Phase::Shredded, SlotFate::Absent)
    );
}

/// A secure record of version 2 still unseals with the master key: it is migrated on the
/// way (after its `thin_path` is held to the derived path like any other), and an
/// explicit `migrate` gives a version 4 record whose MAC verifies.
#[test]
fn a_version_2_secure_record_is_migrated_and_unseals() {
    let mut rng = StdRng::seed_from_u64(96);
    let img = tagged_image(64, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    let v2 = genuine_v2(&s);
    let forged = forge(&v2, |r| r.thin_path = Some("/etc/victim".into()));
    s.write_record(&forged).unwrap();
    assert!(matches!(
        unseal(&s, Some(&master()), &NoProgress),
        Err(JobError::ThinPathMismatch { .. })
    ));
    assert_eq!((s.record(), s.key_slot()), (Some(forged), None));
    s.write_record(&v2).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert!(s.image() == img);
    assert!(s.record().is_none() && s.key_slot().is_none());

    // Explicitly, and resumed after a crash between the new slot and the new record.
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    let v2 = genuine_v2(&s);
    let probe = s.power_loss(&mut rng);
    let r = migrate(&probe, Some(&master())).unwrap();
    assert!(r.migrated() && r.record.key_slot.is_some() && r.record.wrapped_key.is_none());
    s.create_key_slot(&probe.key_slot().unwrap()).unwrap();
    assert_eq!(s.record(), Some(v2));
    let r = migrate(&s, Some(&master())).unwrap();
    assert_eq!(
        (r.from, r.record.version),
        (2, pdguard_core::record::RECORD_VERSION)
    );
    assert_eq!(s.key_slot(), probe.key_slot());
    assert!(!migrate(&s, Some(&master())).unwrap().migrated());
    verify(&s, Some(&master()), &NoProgress).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert!(s.image() == img);
}

/// Issue 16 item 4: a version 4 record rewritten as version 2, with the key slot's wrapped
/// key copied in and no MAC word. With the key it is refused (its wrapped key is not bound
/// to version 2); without one, the key slot beside it betrays it. Nothing is touched by
/// any command, and the key slot keeps its bytes.
#[test]
fn a_record_downgraded_to_version_2_is_refused_by_every_command() {
    let mut rng = StdRng::seed_from_u64(97);
    let img = tagged_image(64, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    let o = secure(PlacementKind::Feistel, 512, 0);
    seal(&s, &o, &NoProgress).unwrap();
    let slot = s.key_slot().unwrap();
    let sealed = s.image();
    for phase in [Phase::Sealed, Phase::Unsealed] {
        let mut rec = record(&s).unwrap();
        rec.version = 2;
        rec.key_slot = None;
        rec.phase = phase;
        rec.wrapped_key = Some(pdguard_core::keyslot::decode(&slot).unwrap().wrapped);
        let forged = rec.encode();
        s.write_record(&forged).unwrap();
        let results = [
            ("shred with the key", shred(&s, Some(&master())).map(|_| ())),
            ("shred without it", shred(&s, None).map(|_| ())),
            ("seal", seal(&s, &o, &NoProgress).map(|_| ())),
            (
                "patent seal",
                seal(&s, &opts(PlacementKind::Patent, 512, 0), &NoProgress).map(|_| ()),
            ),
            (
                "unseal",
                unseal(&s, Some(&master()), &NoProgress).map(|_| ()),
            ),
            (
                "verify",
                verify(&s, Some(&master()), &NoProgress).map(|_| ()),
            ),
            (
                "verify without the key",
                verify(&s, None, &NoProgress).map(|_| ()),
            ),
            ("migrate", migrate(&s, Some(&master())).map(|_| ())),
        ];
        for (what, r) in results {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("{what} of the forged {phase:?} record succeeded"));
            assert!(
                matches!(
                    e,
                    JobError::Downgraded { .. }
                        | JobError::OldRecord { .. }
                        | JobError::Record {
                            source: pdguard_core::RecordError::Unauthenticated(_),
                            ..
                        }
                ),
                "{what}: {e}"
            );
            assert_eq!(
                (s.image(), s.record(), s.key_slot()),
                (sealed.clone(), Some(forged.clone()), Some(slot.clone())),
                "{what} touched something"
            );
        }
    }
    // The same record as the patent profile (seed in the clear, no key slot named): the
    // key slot beside it betrays it too.
    let mut rec = record(&s).unwrap();
    rec.profile = Profile::Patent;
    rec.key_slot = None;
    rec.seed = Some("00".repeat(32));
    rec.phase = Phase::Unsealed;
    let forged = rec.encode();
    s.write_record(&forged).unwrap();
    for e in [
        seal(&s, &opts(PlacementKind::Patent, 512, 0), &NoProgress).unwrap_err(),
        unseal(&s, None, &NoProgress).unwrap_err(),
    ] {
        assert!(matches!(e, JobError::Downgraded { .. }), "{e}");
    }
    assert_eq!((s.image(), s.key_slot()), (sealed, Some(slot)));
}

/// A power loss at every step of a shred: the image is sealed (shred did not start) or the
/// record says `shredding` or `shredded`, never a record that no command can read; running
/// `shred` again always finishes it, and after it no copy of the wrapped key is left.
#[test]
fn a_power_loss_at_every_step_of_a_shred_is_resumable() {
    let mut rng = StdRng::seed_from_u64(94);
    let img = tagged_image(64, 512, &mut rng);
    let o = secure(PlacementKind::Feistel, 512, 0);
    let base = SimStorage::new(img.clone());
    seal(&base, &o, &NoProgress).unwrap();
    let ct = hex::encode(slot_ciphertext(&base.key_slot().unwrap()));
    let total = {
        let probe = base.power_loss(&mut rng);
        let before = probe.steps();
        shred(&probe, Some(&master())).unwrap();
        probe.steps() - before
    };
    assert!(total >= 5, "a shred of {total} steps");
    for step in 1..=total + 1 {
        let s = base.power_loss(&mut rng);
        s.arm(step, Fault::Crash);
        let _ = shred(&s, Some(&master()));
        let s = s.power_loss(&mut rng);
        let rec = record(&s).unwrap();
        match rec.phase {
            Phase::Sealed => {
                assert!(s.key_slot().is_some(), "step {step}: sealed without a slot");
                // Still intact: it unseals.
                let t = s.power_loss(&mut rng);
                unseal(&t, Some(&master()), &NoProgress).unwrap();
                assert!(t.image() == img, "step {step}");
            }
            Phase::Shredding => {
                assert!(matches!(
                    unseal(&s, Some(&master()), &NoProgress),
                    Err(JobError::ShredInterrupted { .. })
                ));
                assert!(matches!(
                    seal(&s, &o, &NoProgress),
                    Err(JobError::ShredInterrupted { .. })
                ));
            }
            Phase::Shredded => assert!(s.key_slot().is_none(), "step {step}"),
            other => panic!("step {step}: phase {other:?}"),
        }
        if rec.phase != Phase::Sealed {
            shred(&s, Some(&master())).unwrap_or_else(|e| match e {
                JobError::Shredded { .. } => record(&s).unwrap(),
                e => panic!("step {step}: {e}"),
            });
            assert_eq!(record(&s).unwrap().phase, Phase::Shredded, "step {step}");
            assert!(s.key_slot().is_none(), "step {step}: slot left");
            assert!(!String::from_utf8(s.record().unwrap())
                .unwrap()
                .contains(&ct));
        }
    }
}

/// A power loss at every step of a secure seal up to its first record write (the key slot's
/// create, write and fsync among them): afterwards either nothing is sealed (a slot left
/// behind is destroyed by the next seal) or the seal resumes; the data always comes back.
#[test]
fn a_power_loss_during_the_key_slot_write_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(95);
    let img = tagged_image(64, 512, &mut rng);
    let o = secure(PlacementKind::Feistel, 512, 0);
    for step in 1..=12 {
        let s = SimStorage::new(img.clone());
        s.arm(step, Fault::Crash);
        let _ = seal(&s, &o, &NoProgress);
        let s = s.power_loss(&mut rng);
        if s.record().is_none() {
            assert!(
                s.image() == img,
                "step {step}: image changed without a record"
            );
            // A new seal replaces any stale slot, and it unseals with the new slot.
            seal(&s, &o, &NoProgress).unwrap();
        } else {
            assert!(
                s.key_slot().is_some(),
                "step {step}: a record without its slot"
            );
            let _ = seal(&s, &o, &NoProgress);
        }
        unseal(&s, Some(&master()), &NoProgress).unwrap();
        assert!(s.image() == img, "step {step}: data lost");
        assert!(
            s.key_slot().is_none(),
            "step {step}: slot left after unseal"
        );
    }
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_feistel_with_slack() {
    crash_everywhere(opts(PlacementKind::Feistel, 512, 50), 512);
}

#[test]
fn repeated_crashes_during_recovery_lose_nothing() {
    // Crash, then crash again during each recovery, several times over.
    let mut rng = StdRng::seed_from_u64(7);
    let img = tagged_image(40, 512, &mut rng);
    let o = SealOptions::default();
    for round in 0..200 {
        let mut s = SimStorage::new(img.clone());
        let mut sealed_target = true;
        for _ in 0..4 {
            s.arm(rng.gen_range(1..150), Fault::Crash);
            let _ = if sealed_target {
                seal(&s, &o, &NoProgress).map(|_| ())
            } else {
                unseal(&s, o.master_key.as_ref(), &NoProgress).map(|_| ())
            };
            s = s.power_loss(&mut rng);
            sealed_target = rng.gen_bool(0.5);
        }
        let _ = seal(&s, &o, &NoProgress);
        if s.record().is_some() {
            assert_eq!(record(&s).unwrap().phase, Phase::Sealed, "round {round}");
            unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        }
        assert!(s.image() == img, "round {round}: data lost");
        assert_eq!(s.thin_count(), 0);
    }
}

// ---- The window strategy (issue 5): same images as direct, one thin layout for all passes.

use super::strategy::{Layout, Window, DEFAULT_MEMORY_BYTES};
use pdguard_core::cipher::{SectorCipher, XtsAes256};
use pdguard_core::placement;

/// Memory budgets for the window strategy: the default (one slice per window, few flushes),
/// a few KiB, and 1 byte (one sector per buffer: a flush per sector, windows in slices).
const BUDGETS: [u64; 3] = [DEFAULT_MEMORY_BYTES, 6 << 10, 1];

/// Geometries `(sector size, N, slack %)`: both sector sizes, with and without slack, `N`
/// not a multiple of the window, `N = 1`, and enough sectors for several windows of many.
const GEOMETRIES: [(u32, u64, u32); 8] = [
    (512, 1, 0),
    (512, 1, 50),
    (4096, 1, 0),
    (512, 301, 0),
    (512, 299, 50),
    (4096, 97, 0),
    (4096, 100, 50),
    (512, 5000, 50),
];

struct Pass<'a> {
    ctx: PassCtx<'a>,
    storage: SimStorage,
}

impl Pass<'_> {
    /// Seal pass 1 with `first` then 3 with `then` (the same object: a job; two objects: a
    /// job resumed in pass 3): the thin disk, the sealed image and both digests.
    fn seal(
        &self,
        first: &dyn Strategy,
        then: &dyn Strategy,
        img: &[u8],
    ) -> (Vec<u8>, Vec<u8>, [blake3::Hash; 2]) {
        let g = self.ctx.geometry;
        let image = self.storage.scratch_disk("image", g.disk_bytes());
        image.write_at(img, 0).unwrap();
        let thin = self.storage.scratch_disk("thin", g.thin_bytes());
        let s = u64::from(g.sector_size());
        let sparse = |d| Sparse::new(d, s).unwrap();
        let plain = first
            .scatter_plain(&self.ctx, &sparse(&*image), &sparse(&*thin))
            .unwrap();
        let sealed = then
            .gather_sealed(&self.ctx, &sparse(&*thin), &sparse(&*image))
            .unwrap();
        (
            read_all(&*thin, g.thin_bytes()),
            read_all(&*image, g.disk_bytes()),
            [plain, sealed],
        )
    }

    /// Unseal pass 1 then 3 from a sealed image, as [`Pass::seal`]: thin disk, image, digests.
    fn unseal(
        &self,
        first: &dyn Strategy,
        then: &dyn Strategy,
        sealed: &[u8],
    ) -> (Vec<u8>, Vec<u8>, [blake3::Hash; 2]) {
        let g = self.ctx.geometry;
        let image = self.storage.scratch_disk("image", g.disk_bytes());
        image.write_at(sealed, 0).unwrap();
        let thin = self.storage.scratch_disk("thin", g.thin_bytes());
        let sz = u64::from(g.sector_size());
        let sparse = |d| Sparse::new(d, sz).unwrap();
        let s = first
            .scatter_sealed(&self.ctx, &sparse(&*image), &sparse(&*thin))
            .unwrap();
        let p = then
            .gather_plain(&self.ctx, &sparse(&*thin), &sparse(&*image))
            .unwrap();
        (
            read_all(&*thin, g.thin_bytes()),
            read_all(&*image, g.disk_bytes()),
            [p, s],
        )
    }
}

fn read_all(d: &dyn crate::store::Disk, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

/// Every pass of `window` against `direct` on one geometry, placement and profile, under
/// every memory budget: same sealed image, same digests, unseal bit-exact, and the thin disk
/// of a plain scatter equal to the thin disk of a sealed scatter (one layout for all passes,
/// so a job can roll back across directions).
fn window_equals_direct(
    kind: PlacementKind,
    secure: bool,
    (sector, sectors, slack): (u32, u64, u32),
    rng: &mut StdRng,
) {
    for (holes, keep_holes) in [(false, false), (true, false), (true, secure)] {
        window_equals_direct_on(
            kind,
            secure,
            keep_holes,
            holes,
            (sector, sectors, slack),
            rng,
        );
    }
}

/// [`window_equals_direct`] on one image: dense or with holes, zeros kept or encrypted.
fn window_equals_direct_on(
    kind: PlacementKind,
    secure: bool,
    keep_holes: bool,
    holes: bool,
    (sector, sectors, slack): (u32, u64, u32),
    rng: &mut StdRng,
) {
    let g = Geometry::new(sectors * u64::from(sector), sector, 32, slack).unwrap();
    let key: [u8; 32] = rng.gen();
    let p = placement::build(kind, &key, g.sectors(), g.thin_sectors()).unwrap();
    let xts = XtsAes256::new(&[0x5a; 64]);
    let img = if holes {
        holey_image(sectors, sector as usize, rng)
    } else {
        tagged_image(sectors, sector as usize, rng)
    };
    let ctx = |memory_bytes| PassCtx {
        geometry: g,
        placement: &*p,
        cipher: secure.then_some(&xts as &dyn SectorCipher),
        digest_key: secure.then_some(&[9; 32]),
        digest: pdguard_core::digest::DigestScheme::DEFAULT,
        keep_holes,
        progress: &NoProgress,
        memory_bytes,
        regions: None,
    };
    let direct = Pass {
        ctx: ctx(DEFAULT_MEMORY_BYTES),
        storage: SimStorage::new(Vec::new()),
    };
    let (_, want_sealed, want_digests) = direct.seal(&Direct, &Direct, &img);
    let what = format!(
        "{kind:?} secure={secure} keep_holes={keep_holes} holes={holes} S={sector} N={sectors} slack={slack}"
    );
    if sectors > 8 {
        assert_ne!(want_sealed, img, "{what}: direct did not seal");
    }
    // Zeros stay zeros in the patent profile and with keep_holes; the secure profile
    // otherwise leaves no sector of zeros.
    let zeros = zero_sectors(&want_sealed, sector as usize);
    if secure && !keep_holes {
        assert_eq!(zeros, 0, "{what}: a zero sector was not encrypted");
    } else {
        assert_eq!(zeros, zero_sectors(&img, sector as usize), "{what}");
    }
    // One object for both passes may carry pi from the first to the second (a job); two
    // objects may not (a job resumed after a crash).
    for (memory, one_job) in BUDGETS.into_iter().flat_map(|m| [(m, true), (m, false)]) {
        let what = format!("{what} memory={memory} one_job={one_job}");
        let w = Pass {
            ctx: ctx(memory),
            storage: SimStorage::new(Vec::new()),
        };
        let (a, b) = (Window::default(), Window::default());
        let then = if one_job { &a } else { &b };
        let (thin, sealed, digests) = w.seal(&a, then, &img);
        assert!(sealed == want_sealed, "{what}: sealed images differ");
        assert_eq!(digests, want_digests, "{what}: digests differ");
        let (thin2, plain, back) = w.unseal(&a, then, &sealed);
        assert!(
            thin2 == thin,
            "{what}: sealed scatter left another thin layout"
        );
        assert!(plain == img, "{what}: unseal is not bit-exact");
        assert_eq!(back, want_digests, "{what}: unseal digests differ");
    }
}

#[test]
fn window_gives_the_same_images_as_direct_patent_profile() {
    let mut rng = StdRng::seed_from_u64(50);
    for kind in [PlacementKind::Patent, PlacementKind::Feistel] {
        for geo in GEOMETRIES {
            window_equals_direct(kind, false, geo, &mut rng);
        }
    }
}

#[test]
fn window_gives_the_same_images_as_direct_secure_profile() {
    let mut rng = StdRng::seed_from_u64(51);
    for kind in [PlacementKind::Patent, PlacementKind::Feistel] {
        for geo in GEOMETRIES {
            window_equals_direct(kind, true, geo, &mut rng);
        }
    }
}

#[test]
fn window_thin_disk_is_packed_by_sector_index_in_each_window() {
    // The documented layout (docs/on-disk-layout.md), checked against the definition rather
    // than the code: window w's r-th packed sector is the r-th smallest i with pi(i) in w,
    // encrypted with tweak pi(i); the rest of the thin disk is never written.
    let mut rng = StdRng::seed_from_u64(52);
    let g = Geometry::new(3000 * 512, 512, 32, 30).unwrap();
    let p = placement::build(
        PlacementKind::Feistel,
        b"layout",
        g.sectors(),
        g.thin_sectors(),
    )
    .unwrap();
    let xts = XtsAes256::new(&[3; 64]);
    let img = tagged_image(g.sectors(), 512, &mut rng);
    let pass = Pass {
        ctx: PassCtx {
            geometry: g,
            placement: &*p,
            cipher: Some(&xts),
            digest_key: None,
            digest: pdguard_core::digest::DigestScheme::DEFAULT,
            keep_holes: false,
            progress: &NoProgress,
            memory_bytes: 8 << 10,
            regions: None,
        },
        storage: SimStorage::new(Vec::new()),
    };
    let (thin, _, _) = pass.seal(&Window::default(), &Window::default(), &img);
    let lay = Layout::new(&g);
    assert!(lay.windows() >= 8, "{lay:?}");
    let mut want = vec![0u8; g.thin_bytes() as usize];
    let mut fill = vec![0u64; lay.windows() as usize];
    for i in 0..g.sectors() {
        let slot = p.slot_of(i);
        let w = lay.window_of(slot);
        let at = lay.packed_offset(w, fill[w]) as usize;
        fill[w] += 1;
        want[at..at + 512].copy_from_slice(&img[i as usize * 512..][..512]);
        xts.encrypt(slot, &mut want[at..at + 512]);
    }
    assert!(thin == want, "thin disk differs from the documented layout");
}

fn with_strategy(o: SealOptions, strategy: &str, memory_bytes: u64) -> SealOptions {
    SealOptions {
        strategy: strategy.into(),
        memory_bytes,
        ..o
    }
}

#[test]
fn seal_jobs_with_window_and_direct_give_the_same_image() {
    // The patent profile's placement comes from the image alone, so two seals of one image
    // are comparable byte for byte (a secure seal draws a new key each time: see the
    // strategy-level tests above).
    let mut rng = StdRng::seed_from_u64(53);
    for placement in [PlacementKind::Patent, PlacementKind::Feistel] {
        for (sector, sectors, slack) in GEOMETRIES {
            let img = tagged_image(sectors, sector as usize, &mut rng);
            let o = opts(placement, sector, slack);
            let d = SimStorage::new(img.clone());
            let r = seal(&d, &with_strategy(o.clone(), "direct", 1), &NoProgress).unwrap();
            assert_eq!(r.record.strategy, "direct");
            for memory in BUDGETS {
                let what =
                    format!("{placement:?} S={sector} N={sectors} slack={slack} memory={memory}");
                let w = SimStorage::new(img.clone());
                let r = seal(&w, &with_strategy(o.clone(), "window", memory), &NoProgress).unwrap();
                assert_eq!(r.record.strategy, "window");
                assert!(w.image() == d.image(), "{what}: sealed images differ");
                assert_eq!(r.record.sealed_digest, record(&d).unwrap().sealed_digest);
                assert_eq!(r.record.plain_digest, record(&d).unwrap().plain_digest);
                unseal_with(&w, None, &NoProgress, memory).unwrap();
                assert!(w.image() == img, "{what}: unseal is not bit-exact");
                assert_eq!(w.thin_count(), 0);
            }
        }
    }
}

#[test]
fn window_is_the_default_and_secure_jobs_round_trip_under_every_budget() {
    assert_eq!(SealOptions::default().strategy, "window");
    let mut rng = StdRng::seed_from_u64(54);
    for placement in [PlacementKind::Patent, PlacementKind::Feistel] {
        for (sector, sectors, slack) in GEOMETRIES {
            let img = tagged_image(sectors, sector as usize, &mut rng);
            for memory in BUDGETS {
                let o = with_strategy(secure(placement, sector, slack), "window", memory);
                let s = SimStorage::new(img.clone());
                seal(&s, &o, &NoProgress).unwrap();
                verify(&s, None, &NoProgress).unwrap();
                unseal_with(&s, o.master_key.as_ref(), &NoProgress, memory).unwrap();
                assert!(
                    s.image() == img,
                    "{placement:?} {sector} {sectors} {slack} {memory}"
                );
            }
        }
    }
}

#[test]
fn a_job_resumes_with_the_strategy_its_record_names() {
    // A direct seal cut by a power loss mid-gather, resumed by a seal and by an unseal
    // asking for the window strategy (and the reverse): the record's strategy is used, since
    // the two lay the thin disk out differently.
    let mut rng = StdRng::seed_from_u64(55);
    let img = tagged_image(200, 512, &mut rng);
    for (first, then) in [("direct", "window"), ("window", "direct")] {
        let o = with_strategy(opts(PlacementKind::Feistel, 512, 20), first, 4 << 10);
        let total = steps_of(&img, &o, false);
        for then_unseal in [false, true] {
            for step in [total / 2, total * 3 / 4, total - 3] {
                let s = SimStorage::new(img.clone());
                s.arm(step, Fault::Crash);
                assert!(seal(&s, &o, &NoProgress).is_err());
                let s = s.power_loss(&mut rng);
                let other = with_strategy(o.clone(), then, 1);
                if then_unseal {
                    unseal_with(&s, None, &NoProgress, 1).unwrap();
                } else {
                    let r = seal(&s, &other, &NoProgress).unwrap();
                    assert_eq!(r.record.strategy, first);
                    unseal_with(&s, None, &NoProgress, 1).unwrap();
                }
                assert!(s.image() == img, "{first} then {then} at step {step}");
                assert_eq!(s.thin_count(), 0);
            }
        }
    }
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_window_tiny_memory() {
    // One sector per buffer: a flush per sector and every window moved in slices.
    crash_everywhere(
        with_strategy(opts(PlacementKind::Patent, 512, 50), "window", 1),
        512,
    );
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_window_secure_tiny_memory() {
    crash_everywhere(
        with_strategy(secure(PlacementKind::Feistel, 4096, 0), "window", 1),
        4096,
    );
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_direct_patent_placement() {
    // The tests above run the default strategy (window); direct keeps its own.
    crash_everywhere(
        with_strategy(opts(PlacementKind::Patent, 512, 0), "direct", 1),
        512,
    );
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_direct_secure_with_slack() {
    crash_everywhere(
        with_strategy(secure(PlacementKind::Feistel, 512, 50), "direct", 1),
        512,
    );
}

fn repeated_crashes(o: &SealOptions, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let img = tagged_image(40, 512, &mut rng);
    let total = steps_of(&img, o, false) + steps_of(&img, o, true);
    for round in 0..200 {
        let mut s = SimStorage::new(img.clone());
        let mut sealed_target = true;
        for _ in 0..4 {
            s.arm(rng.gen_range(1..total), Fault::Crash);
            let _ = if sealed_target {
                seal(&s, o, &NoProgress).map(|_| ())
            } else {
                unseal_with(&s, o.master_key.as_ref(), &NoProgress, o.memory_bytes).map(|_| ())
            };
            s = s.power_loss(&mut rng);
            sealed_target = rng.gen_bool(0.5);
        }
        let _ = seal(&s, o, &NoProgress);
        if s.record().is_some() {
            assert_eq!(record(&s).unwrap().phase, Phase::Sealed, "round {round}");
            unseal_with(&s, o.master_key.as_ref(), &NoProgress, o.memory_bytes).unwrap();
        }
        assert!(s.image() == img, "round {round}: data lost");
        assert_eq!(s.thin_count(), 0);
    }
}

#[test]
fn repeated_crashes_during_recovery_lose_nothing_window_tiny_memory() {
    repeated_crashes(
        &with_strategy(opts(PlacementKind::Feistel, 512, 50), "window", 1),
        56,
    );
}

#[test]
fn repeated_crashes_during_recovery_lose_nothing_window_secure() {
    repeated_crashes(
        &with_strategy(secure(PlacementKind::Feistel, 512, 0), "window", 2 << 10),
        57,
    );
}

#[test]
fn repeated_crashes_during_recovery_lose_nothing_direct() {
    repeated_crashes(
        &with_strategy(opts(PlacementKind::Patent, 512, 0), "direct", 1),
        58,
    );
}

#[test]
fn fig2_of_the_patent_through_the_window_strategy() {
    // docs/on-disk-layout.md: K = 2; windows pack their sectors in sector order, so the thin
    // disk is X2 X5 | X1 X4 | X0 X3 | empty, and the sealed image is FIG. 2's.
    let g = Geometry::with_slots(6, 12, 512, 32).unwrap();
    assert_eq!(Layout::new(&g).window_slots(), 2);
    let x: Vec<Vec<u8>> = (0..6u8).map(|k| vec![b'A' + k; 512]).collect();
    let placement = FixedPlacement::new(vec![5, 3, 0, 4, 2, 1], 12).unwrap();
    for one_job in [true, false] {
        let pass = Pass {
            ctx: PassCtx {
                geometry: g,
                placement: &placement,
                cipher: None,
                digest_key: None,
                digest: pdguard_core::digest::DigestScheme::DEFAULT,
                keep_holes: false,
                progress: &NoProgress,
                memory_bytes: DEFAULT_MEMORY_BYTES,
                regions: None,
            },
            storage: SimStorage::new(Vec::new()),
        };
        let (a, b) = (Window::default(), Window::default());
        let then = if one_job { &a } else { &b };
        let (thin, sealed, _) = pass.seal(&a, then, &x.concat());
        let empty = vec![0u8; 512];
        let want_thin = [&x[2], &x[5], &x[1], &x[4], &x[0], &x[3]]
            .into_iter()
            .chain(std::iter::repeat_n(&empty, 6))
            .flatten()
            .copied()
            .collect::<Vec<u8>>();
        assert!(thin == want_thin, "thin disk is not X2 X5 X1 X4 X0 X3");
        assert_eq!(sealed, [2, 5, 4, 1, 3, 0].map(|k| x[k].clone()).concat());
        let (thin2, plain, _) = pass.unseal(&a, then, &sealed);
        assert!(thin2 == want_thin);
        assert_eq!(plain, x.concat());
    }
}

fn crash_everywhere_holey(o: SealOptions, sector: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let img = holey_image(24, sector, &mut rng);
    assert!(zero_sectors(&img, sector) > 0 && zero_sectors(&img, sector) < 24);
    crash_everywhere_on(&img, &o, &mut rng);
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_with_holes_patent_profile() {
    // Zero sectors are skipped over holes, so the number of steps depends on the data; a
    // resumed pass must still find every sector.
    crash_everywhere_holey(opts(PlacementKind::Feistel, 512, 50), 512, 70);
    crash_everywhere_holey(
        with_strategy(opts(PlacementKind::Patent, 512, 0), "direct", 1),
        512,
        71,
    );
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_with_holes_kept_secure_profile() {
    let keep = |o: SealOptions| SealOptions {
        keep_holes: true,
        ..o
    };
    crash_everywhere_holey(keep(secure(PlacementKind::Feistel, 512, 0)), 512, 72);
    crash_everywhere_holey(
        keep(with_strategy(
            secure(PlacementKind::Feistel, 4096, 50),
            "window",
            1,
        )),
        4096,
        73,
    );
}

#[test]
fn keep_holes_is_recorded_and_refused_outside_the_secure_profile() {
    let mut rng = StdRng::seed_from_u64(74);
    let img = holey_image(300, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    let o = SealOptions {
        keep_holes: true,
        ..secure(PlacementKind::Feistel, 512, 0)
    };
    let r = seal(&s, &o, &NoProgress).unwrap();
    assert!(r.record.keep_holes);
    assert_eq!(r.record.digest, "blake3-64k");
    assert_eq!(r.record.version, pdguard_core::record::RECORD_VERSION);
    assert_eq!(zero_sectors(&s.image(), 512), zero_sectors(&img, 512));
    verify(&s, None, &NoProgress).unwrap();
    unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
    assert!(s.image() == img);

    // The patent profile has nothing to keep: refused, nothing changed.
    let s = SimStorage::new(img.clone());
    let o = SealOptions {
        keep_holes: true,
        ..opts(PlacementKind::Feistel, 512, 0)
    };
    let e = seal(&s, &o, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("--keep-holes"), "{e}");
    assert!(s.image() == img && s.record().is_none() && s.thin_count() == 0);
}

#[test]
fn a_mostly_empty_disk_seals_and_unseals_in_proportion_to_its_data() {
    // 4 MiB with 96 KiB of data in three places: the passes must not read the holes nor
    // write zeros into them. Without sparseness each pass would read and write 4 MiB.
    let mut rng = StdRng::seed_from_u64(75);
    let sectors = 8192u64;
    let mut img = vec![0u8; sectors as usize * 512];
    for start in [0usize, 1 << 20, 3 << 20] {
        rng.fill(&mut img[start..start + (32 << 10)]);
    }
    let data = 96u64 << 10;
    let keep = SealOptions {
        keep_holes: true,
        ..secure(PlacementKind::Feistel, 512, 0)
    };
    for (what, o) in [
        ("patent", opts(PlacementKind::Feistel, 512, 0)),
        ("patent slack", opts(PlacementKind::Feistel, 512, 25)),
        ("secure keep-holes", keep),
        (
            "patent direct",
            with_strategy(opts(PlacementKind::Feistel, 512, 0), "direct", 1),
        ),
    ] {
        let s = SimStorage::new(img.clone());
        seal(&s, &o, &NoProgress).unwrap();
        let (read, written) = s.io_bytes();
        // Scatter reads the data and writes it; gather reads it back (the thin disk's data
        // ranges, in 4 KiB blocks) and writes it, plus zeros over the original's data.
        // `direct` scatters 512-byte sectors over the thin disk, so its gather reads up to
        // one 4 KiB block per data sector.
        let read_bound = if what.ends_with("direct") { 10 } else { 3 };
        assert!(read <= read_bound * data, "{what}: seal read {read} bytes");
        let sealed = s.image();
        // The sealed data is spread over the image in 512-byte sectors, so its 4 KiB blocks
        // hold up to 8 times the data; a file system allocates them whole, and the passes
        // write them whole (one system call instead of eight). The thin disk is written in
        // whole pages too, and the original's data is overwritten with zeros.
        let blocks = sealed
            .chunks(4096)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64
            * 4096;
        assert!(
            written <= blocks + 4 * data,
            "{what}: seal wrote {written} bytes"
        );
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        assert!(s.image() == img, "{what}: not bit-exact");
        let (read2, written2) = s.io_bytes();
        // `direct` reads the thin disk sector by sector, in its scattered layout.
        let sealed_blocks = if what.ends_with("direct") {
            2 * blocks
        } else {
            blocks
        };
        assert!(
            read2 - read <= sealed_blocks + 4 * data,
            "{what}: unseal read {} bytes",
            read2 - read
        );
        assert!(
            written2 - written <= sealed_blocks + 4 * data,
            "{what}: unseal wrote {} bytes",
            written2 - written
        );
    }
    // The secure profile without keep_holes encrypts the holes: all of it is written.
    let s = SimStorage::new(img.clone());
    seal(&s, &secure(PlacementKind::Feistel, 512, 0), &NoProgress).unwrap();
    assert!(s.io_bytes().1 >= 2 * sectors * 512);
}

#[test]
fn a_sparse_image_needs_free_space_for_its_data_only_unless_holes_are_encrypted() {
    // 64 MiB holding 1 MiB: the patent profile and keep_holes write about 1 MiB to the thin
    // disk (the unseal up to 8 MiB: the sealed data's pages), so 28 MiB free is plenty; the
    // secure profile without keep_holes writes 64 MiB.
    let mut rng = StdRng::seed_from_u64(76);
    let mut img = vec![0u8; 64 << 20];
    rng.fill(&mut img[8 << 20..9 << 20]);
    let keep = SealOptions {
        keep_holes: true,
        ..secure(PlacementKind::Feistel, 512, 0)
    };
    for o in [opts(PlacementKind::Feistel, 512, 0), keep] {
        let s = SimStorage::new(img.clone());
        s.set_free_bytes(28 << 20);
        seal(&s, &o, &NoProgress).unwrap();
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        assert!(s.image() == img);
    }
    let s = SimStorage::new(img.clone());
    s.set_free_bytes(28 << 20);
    let o = secure(PlacementKind::Feistel, 512, 0);
    assert!(matches!(
        seal(&s, &o, &NoProgress),
        Err(JobError::NoSpace { need, .. }) if need == 64 << 20
    ));
    assert!(s.image() == img && s.record().is_none());
}

// ---- Dense placement (issue 13): tests in tests/dense_cases.rs.
mod dense_cases;

// ---- The region digest tree (issue 18, item 2): tests in tests/tree_cases.rs.
mod tree_cases;

// ---- An instant reclaim finished offline (issue 18): tests in tests/offline_cases.rs.
mod offline_cases;
