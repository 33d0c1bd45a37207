//! An instant reclaim finished offline (`reclaim_offline`, `pdguard image unseal` on phase
//! `migrating` or with `--instant`) and the tree it takes (`load_tree_for_migration`); what
//! the other commands do with a `migrating` record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use crate::jobs::reclaim::{Migration, MigrationOptions, ReclaimError, StepDone};
use crate::store::MigrationFile;
use pdguard_core::region_tree::REGION_BYTES;

const R: usize = REGION_BYTES as usize;

/// Counts the bytes of pass `migrate`.
#[derive(Default)]
struct Counted(AtomicU64);

impl Progress for Counted {
    fn pass(&self, name: &'static str, _total: u64) {
        assert!([MIGRATE_PASS, MIGRATE_END_PASS].contains(&name), "{name}");
    }
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// A sealed 4.5 MiB image of tagged sectors (five regions, the last one short), secure
/// profile, and its plaintext.
fn sealed(rng: &mut StdRng) -> (SimStorage, Vec<u8>) {
    let plain = tagged_image((4 * R + R / 2) as u64 / 512, 512, rng);
    let s = SimStorage::new(plain.clone());
    let opts = SealOptions {
        profile: Profile::Secure,
        master_key: Some(master()),
        ..SealOptions::default()
    };
    seal(&s, &opts, &NoProgress).unwrap();
    (s, plain)
}

fn phase_of(s: &SimStorage) -> Option<Phase> {
    s.record().map(|b| SealRecord::decode(&b).unwrap().phase)
}

fn offline(start: bool) -> OfflineReclaim {
    OfflineReclaim {
        start,
        window_bytes: 2 * R as u64,
    }
}

#[test]
fn the_tree_for_a_migration_is_the_seals_and_an_edited_one_is_refused() {
    let mut rng = StdRng::seed_from_u64(81);
    let (s, _) = sealed(&mut rng);
    let tree = load_tree_for_migration(&s, Some(&master()))
        .unwrap()
        .unwrap();
    assert_eq!(tree.layout().regions(), 5);
    let good = s.tree().unwrap();
    let mut edited = good.clone();
    edited[40] ^= 1;
    s.set_tree(Some(edited));
    let e = load_tree_for_migration(&s, Some(&master())).unwrap_err();
    assert!(e.is_verification(), "{e}");
    s.set_tree(None);
    let e = load_tree_for_migration(&s, Some(&master())).unwrap_err();
    assert!(
        e.is_verification() && e.to_string().contains("missing"),
        "{e}"
    );
    s.set_tree(Some(good));
    let other = MasterKey::from_bytes([7; 32]);
    let e = load_tree_for_migration(&s, Some(&other)).unwrap_err();
    assert!(matches!(e, JobError::WrongKey { .. }), "{e}");
    // Nothing of a migration was started by any of it.
    assert_eq!(phase_of(&s), Some(Phase::Sealed));
    assert!(s.migration_file(MigrationFile::MovedMap).is_none());
}

#[test]
fn a_sealed_image_is_migrated_offline_only_when_asked() {
    let mut rng = StdRng::seed_from_u64(82);
    let (s, plain) = sealed(&mut rng);
    let sealed_image = s.image();
    let count = Arc::new(Counted::default());
    let e = reclaim_offline(&s, Some(&master()), count.clone(), &offline(false)).unwrap_err();
    assert!(e.to_string().contains("not being reclaimed"), "{e}");
    assert!(s.image() == sealed_image && phase_of(&s) == Some(Phase::Sealed));
    assert!(s.image() == sealed_image && phase_of(&s) == Some(Phase::Sealed));
    assert!(s.migration_file(MigrationFile::EvacuationCopy).is_none());

    // Neither does `verify` begin one.
    let e = verify_migrating(&s, Some(&master()), &NoProgress).unwrap_err();
    assert!(matches!(e, ReclaimError::NotMigrating { .. }), "{e}");
    assert!(s.image() == sealed_image && phase_of(&s) == Some(Phase::Sealed));
    assert!(s.migration_file(MigrationFile::MovedMap).is_none());

    let r = reclaim_offline(&s, Some(&master()), count.clone(), &offline(true)).unwrap();
    assert_eq!(r.job.outcome, Outcome::Unsealed);
    assert_eq!(
        (r.job.resumed_from, r.dirty_regions, r.regions),
        (None, 0, 5)
    );
    assert_eq!(r.job.record.phase, Phase::Unsealed);
    assert!(s.image() == plain, "not the plaintext");
    assert!(s.record().is_none() && s.key_slot().is_none() && s.tree().is_none());
    for f in [MigrationFile::EvacuationCopy, MigrationFile::MovedMap] {
        assert!(s.migration_file(f).is_none(), "{f:?} left");
    }
    // Every byte evacuated once and moved once, each reported as written.
    assert_eq!(count.0.load(Ordering::SeqCst), 2 * plain.len() as u64);
}

/// A daemon served the migration (a write made one region dirty), then died: the offline
/// finish resumes from what the moved map says, keeps the write, and ends as an unseal.
#[test]
fn a_migration_left_by_its_daemon_is_finished_offline_with_its_writes() {
    let mut rng = StdRng::seed_from_u64(83);
    let (s, mut plain) = sealed(&mut rng);
    let tree = load_tree_for_migration(&s, Some(&master())).unwrap();
    let opts = MigrationOptions {
        window_bytes: R as u64,
        ..MigrationOptions::default()
    };
    let m = Migration::start(&s, Some(&master()), tree, &opts).unwrap();
    assert!(matches!(m.step().unwrap(), StepDone::Evacuated(_)));
    let data = vec![0xa5u8; 1000];
    m.write(3 * R as u64 + 17, &data).unwrap();
    m.flush().unwrap();
    plain[3 * R + 17..3 * R + 1017].copy_from_slice(&data);
    drop(m);
    assert_eq!(phase_of(&s), Some(Phase::Migrating));

    // Seal and shred refuse it, naming the fix; nothing changes.
    let before = (s.image(), s.record());
    let e = seal(&s, &SealOptions::default(), &NoProgress).unwrap_err();
    assert!(matches!(e, JobError::Reclaiming { .. }), "{e}");
    assert!(e.to_string().contains("pdguard image unseal"), "{e}");
    let e = shred(&s, Some(&master())).unwrap_err();
    assert!(matches!(e, JobError::ShredReclaiming { .. }), "{e}");
    assert!(
        (s.image(), s.record()) == before,
        "a refusal changed something"
    );

    // `verify` checks every region where the map says it is but the dirty one.
    let checked = verify_migrating(&s, Some(&master()), &NoProgress).unwrap();
    assert_eq!(checked.counts[3], 1, "{checked:?}");
    assert_eq!(checked.checked, 4, "{checked:?}");
    assert!(
        (s.image(), s.record()) == before,
        "verify changed something"
    );

    let count = Arc::new(Counted::default());
    let r = reclaim_offline(&s, Some(&master()), count, &offline(false)).unwrap();
    assert_eq!(r.job.resumed_from, Some(Phase::Migrating));
    assert_eq!(r.dirty_regions, 1);
    assert!(s.image() == plain, "not the plaintext with the write");
    assert!(s.record().is_none() && s.key_slot().is_none());
    for f in [MigrationFile::EvacuationCopy, MigrationFile::MovedMap] {
        assert!(s.migration_file(f).is_none(), "{f:?} left");
    }
}

/// A region holding a changed sealed sector is refused by its leaf offline too (exit 3 in
/// the CLI), the record left in phase `migrating`.
#[test]
fn an_offline_migration_refuses_a_corrupted_region() {
    let mut rng = StdRng::seed_from_u64(84);
    let (s, _) = sealed(&mut rng);
    s.corrupt_image(2 * R + 700);
    let count = Arc::new(Counted::default());
    let e = reclaim_offline(&s, Some(&master()), count, &offline(true)).unwrap_err();
    // Named by its leaf (the tree was loaded), not only by the end's digest.
    let named = e
        .to_string()
        .contains("does not match the seal's digest tree");
    assert!(e.is_verification() && named, "{e}");
    assert_eq!(phase_of(&s), Some(Phase::Migrating));
}
