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
use crate::store::Storage;

/// An image whose sectors each begin with their own index as a tag, the rest random.
fn tagged_image(sectors: u64, sector: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut img = vec![0u8; sectors as usize * sector];
    rng.fill(&mut img[..]);
    for (i, s) in img.chunks_exact_mut(sector).enumerate() {
        s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    img
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
    let thin = storage.create_thin("fig2.thin", g.thin_bytes()).unwrap();
    let placement = FixedPlacement::new(vec![5, 3, 0, 4, 2, 1], 12).unwrap();
    let ctx = PassCtx {
        geometry: g,
        placement: &placement,
        cipher: None,
        digest_key: None,
        progress: &NoProgress,
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
    let thin2 = storage.create_thin("fig2.thin2", g.thin_bytes()).unwrap();
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
    for sealed_first in [false, true] {
        let total = steps_of(&img, &o, sealed_first);
        assert!(total > 40, "too few steps to be meaningful: {total}");
        for step in 1..=total {
            for fault in [Fault::Crash, Fault::Eio, Fault::NoSpace] {
                for then in [Then::Seal, Then::Unseal] {
                    crash_case(&img, &o, sealed_first, step, fault, then, &mut rng);
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
    // A record whose disk identity was edited (and re-checksummed) no longer unwraps.
    let mut edited = rec.clone();
    edited.seal_id = "ffffffffffffffffffffffffffffffff".into();
    s.write_record(&edited.encode()).unwrap();
    assert!(matches!(
        unseal(&s, Some(&master()), &NoProgress),
        Err(JobError::Key { .. })
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
    let wrapped = record(&s).unwrap().wrapped_key.unwrap();
    let sealed = s.image();
    let tomb = shred(&s).unwrap();
    assert_eq!(tomb.phase, Phase::Shredded);
    let text = String::from_utf8(s.record().unwrap()).unwrap();
    assert!(
        !text.contains(&wrapped.ciphertext),
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
    assert!(matches!(shred(&s), Err(JobError::Shredded { .. })));
    assert_eq!(s.image(), sealed);
    // The patent profile has no key to destroy.
    let p = SimStorage::new(img.clone());
    seal(&p, &SealOptions::default(), &NoProgress).unwrap();
    assert!(matches!(shred(&p), Err(JobError::Unsupported(_))));
    // New data can be sealed over a shredded image.
    seal(&s, &o, &NoProgress).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert_eq!(s.image(), sealed);
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
