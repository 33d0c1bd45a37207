//! Property tests: seal then unseal is the identity, for any content, geometry, profile and
//! placement; and a crash at any step followed by recovery never changes the result.
#![allow(clippy::unwrap_used)]

use pdguard_core::keys::MasterKey;
use pdguard_core::{PlacementKind, Profile};
use proptest::prelude::*;
use rand::SeedableRng;

use super::*;
use crate::store::sim::{Fault, SimStorage};

fn options(profile: Profile, placement: PlacementKind, sector: u32, slack: u32) -> SealOptions {
    SealOptions {
        profile,
        placement: Some(placement),
        sector_size: sector,
        thin_slack_pct: slack,
        master_key: (profile == Profile::Secure).then(|| MasterKey::from_bytes([3; 32])),
        ..SealOptions::default()
    }
}

fn arb_case() -> impl Strategy<Value = (Vec<u8>, SealOptions)> {
    (
        prop_oneof![Just(Profile::Patent), Just(Profile::Secure)],
        prop_oneof![Just(PlacementKind::Patent), Just(PlacementKind::Feistel)],
        prop_oneof![Just(512u32), Just(1024), Just(4096)],
        0u32..=100,
        1usize..40,
        any::<u64>(),
    )
        .prop_map(|(profile, placement, sector, slack, sectors, seed)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut img = vec![0u8; sectors * sector as usize];
            // Half the cases are mostly zeros, like real disks.
            if seed % 2 == 0 {
                rand::Rng::fill(&mut rng, &mut img[..]);
            } else {
                for b in img.iter_mut().step_by(97) {
                    *b = rand::Rng::gen(&mut rng);
                }
            }
            (img, options(profile, placement, sector, slack))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_then_unseal_is_the_identity((img, o) in arb_case()) {
        let s = SimStorage::new(img.clone());
        seal(&s, &o, &NoProgress).unwrap();
        verify(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        prop_assert!(s.image() == img);
        prop_assert!(s.record().is_none());
        prop_assert_eq!(s.thin_count(), 0);
    }

    #[test]
    fn a_crash_anywhere_then_recovery_loses_nothing(
        (img, o) in arb_case(),
        step in 1u64..400,
        lose in any::<u64>(),
    ) {
        // Seal ids are random, so a recovered seal is compared with the original after
        // unsealing; the sealed image must also verify against its record.
        let s = SimStorage::new(img.clone());
        s.arm(step, Fault::Crash);
        let _ = seal(&s, &o, &NoProgress);
        let s = s.power_loss(&mut rand::rngs::StdRng::seed_from_u64(lose));
        match seal(&s, &o, &NoProgress) {
            Ok(_) | Err(JobError::AlreadySealed { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("recovery failed: {e}"))),
        }
        verify(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        prop_assert!(s.image() == img);
    }
}

/// A sparse image: 1 to 24 blocks of 4 KiB, each a hole (zeros) or data (random, with some
/// zero sectors), under a dense seal's options.
fn arb_dense_case() -> impl Strategy<Value = (Vec<u8>, SealOptions)> {
    (
        prop_oneof![Just(PlacementKind::Patent), Just(PlacementKind::Feistel)],
        prop_oneof![Just(512u32), Just(1024), Just(4096)],
        0u32..=100,
        proptest::collection::vec(0u8..4, 1..24),
        any::<u64>(),
    )
        .prop_map(|(placement, sector, slack, blocks, seed)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut img = vec![0u8; blocks.len() * 4096];
            for (b, kind) in img.chunks_mut(4096).zip(&blocks) {
                if *kind > 0 {
                    rand::Rng::fill(&mut rng, b);
                }
                if *kind == 2 {
                    b[..sector as usize].fill(0);
                }
            }
            let mut o = options(Profile::Secure, placement, sector, slack);
            o.keep_holes = true;
            (img, o)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The data slots of a dense seal are exactly `[0, D)`: the record's `D` is the count
    /// of sectors in the original's data ranges, every sector past `D` is a hole, and the
    /// first `D` hold exactly as many zero sectors as the original's data ranges do (zeros
    /// stay zeros, every other sector is ciphertext). Then it unseals bit-exact.
    #[test]
    fn dense_data_slots_are_exactly_the_first_d((img, o) in arb_dense_case()) {
        let sector = o.sector_size as usize;
        let data_blocks: Vec<&[u8]> =
            img.chunks(4096).filter(|b| b.iter().any(|&x| x != 0)).collect();
        let d = (data_blocks.len() * 4096 / sector) as u64;
        let zeros_in_data = data_blocks
            .iter()
            .flat_map(|b| b.chunks(sector))
            .filter(|s| s.iter().all(|&x| x == 0))
            .count();
        let s = SimStorage::new(img.clone());
        let r = seal(&s, &o, &NoProgress).unwrap();
        let sealed = s.image();
        match &r.record.dense {
            None => prop_assert_eq!(d, 0, "an image with data was not sealed densely"),
            Some(dn) => {
                prop_assert_eq!(dn.sectors, d);
                let region = d as usize * sector;
                prop_assert!(sealed[region..].iter().all(|&x| x == 0));
                let zeros = sealed[..region]
                    .chunks(sector)
                    .filter(|s| s.iter().all(|&x| x == 0))
                    .count();
                prop_assert_eq!(zeros, zeros_in_data);
            }
        }
        verify(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        prop_assert!(s.image() == img);
        prop_assert!(s.record().is_none());
        prop_assert_eq!(s.thin_count(), 0);
    }

    #[test]
    fn a_crash_anywhere_in_a_dense_seal_or_unseal_loses_nothing(
        (img, o) in arb_dense_case(),
        step in 1u64..400,
        lose in any::<u64>(),
        unseal_first in any::<bool>(),
    ) {
        let s = SimStorage::new(img.clone());
        if unseal_first {
            seal(&s, &o, &NoProgress).unwrap();
        }
        s.arm(step, Fault::Crash);
        let _ = match unseal_first {
            true => unseal(&s, o.master_key.as_ref(), &NoProgress).map(|_| ()),
            false => seal(&s, &o, &NoProgress).map(|_| ()),
        };
        s.disarm();
        let s = s.power_loss(&mut rand::rngs::StdRng::seed_from_u64(lose));
        match seal(&s, &o, &NoProgress) {
            Ok(_) | Err(JobError::AlreadySealed { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("recovery failed: {e}"))),
        }
        verify(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        unseal(&s, o.master_key.as_ref(), &NoProgress).unwrap();
        prop_assert!(s.image() == img);
    }
}
