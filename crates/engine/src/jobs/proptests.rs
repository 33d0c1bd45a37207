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
