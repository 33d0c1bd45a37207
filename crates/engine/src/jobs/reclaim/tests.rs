//! The migration over the simulated store (`docs/instant-reclaim.md`, section 7): a whole
//! background migration, requests interleaved with its steps, a power loss at every step
//! then resume, a corrupted sealed sector, threads.
//!
//! What must hold after a power loss (block-device semantics), checked byte by byte: every
//! byte of the final image is either its value in the **flushed model** (the plaintext with
//! every write acknowledged before the last `flush` that returned) or the value some write
//! acknowledged after that flush — or the write in flight when the power went — put there.
//! Without a power loss, the final image is exactly the plaintext plus every write.
#![allow(clippy::unwrap_used)]

use pdguard_core::keys::MasterKey;
use pdguard_core::region_tree::{RegionHasher, RegionKeys, RegionLayout, RegionTree};
use pdguard_core::sealed_address::SealedAddress;
use pdguard_core::{Phase, PlacementKind, Profile, SealRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::jobs::job::open_for_reclaim;
use crate::jobs::{seal, unseal, JobError, NoProgress, SealOptions};
use crate::store::sim::{Fault, SimStorage};
use crate::store::{MigrationFile, Storage};

const SECTOR: usize = 512;
const REGION: u32 = 4096;
const IMAGE_BYTES: usize = 64 << 10;

fn master() -> MasterKey {
    MasterKey::from_bytes([0x42; 32])
}

#[derive(Debug, Clone, Copy)]
struct Case {
    profile: Profile,
    placement: PlacementKind,
    slack: u32,
    keep_holes: bool,
    dense: bool,
}

const SECURE: Case = Case {
    profile: Profile::Secure,
    placement: PlacementKind::Feistel,
    slack: 0,
    keep_holes: false,
    dense: false,
};

/// Both profiles, both placements, with and without slack, dense and not.
fn cases() -> Vec<Case> {
    let patent = Case {
        profile: Profile::Patent,
        placement: PlacementKind::Patent,
        ..SECURE
    };
    vec![
        SECURE,
        Case {
            slack: 25,
            ..SECURE
        },
        Case {
            placement: PlacementKind::Patent,
            ..SECURE
        },
        Case {
            keep_holes: true,
            dense: true,
            ..SECURE
        },
        Case {
            keep_holes: true,
            dense: false,
            ..SECURE
        },
        patent,
        Case {
            slack: 10,
            ..patent
        },
        Case {
            placement: PlacementKind::Feistel,
            ..patent
        },
    ]
}

fn key(case: Case) -> Option<MasterKey> {
    (case.profile == Profile::Secure).then(master)
}

/// Tagged random sectors, some 4 KiB blocks and sectors zeros (holes for a dense seal),
/// data in the last block.
fn plaintext(rng: &mut StdRng) -> Vec<u8> {
    let mut img = vec![0u8; IMAGE_BYTES];
    rng.fill(&mut img[..]);
    for (i, s) in img.chunks_exact_mut(SECTOR).enumerate() {
        s[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    let blocks = IMAGE_BYTES / 4096;
    for (k, block) in img.chunks_mut(4096).enumerate() {
        if k + 1 < blocks && (k % 3 == 1 || rng.gen_bool(0.2)) {
            block.fill(0);
        }
    }
    for s in img.chunks_exact_mut(SECTOR) {
        if rng.gen_bool(0.1) {
            s.fill(0);
        }
    }
    img
}

/// A sealed image of `plain` and the region digest tree of `plain`, as the seal side
/// would record it (built here with core's `RegionHasher`).
fn sealed(case: Case, plain: &[u8]) -> (SimStorage, RegionTree) {
    let storage = SimStorage::new(plain.to_vec());
    let opts = SealOptions {
        profile: case.profile,
        master_key: key(case),
        placement: Some(case.placement),
        thin_slack_pct: case.slack,
        keep_holes: case.keep_holes,
        dense: case.dense,
        ..SealOptions::default()
    };
    seal(&storage, &opts, &NoProgress).unwrap();
    let rec = SealRecord::decode(&storage.record().unwrap()).unwrap();
    assert_eq!(rec.phase, Phase::Sealed);
    assert_eq!(rec.dense.is_some(), case.dense, "{case:?}");
    let (opened, _) = open_for_reclaim(&storage, key(case).as_ref()).unwrap();
    let keys = RegionKeys::new(opened.digest_key.as_deref());
    let layout = RegionLayout::new(REGION.into(), plain.len() as u64).unwrap();
    let mut hasher = RegionHasher::new(layout, keys);
    hasher.update(plain);
    (storage, hasher.finish().unwrap().0)
}

fn options() -> MigrationOptions {
    MigrationOptions {
        region_bytes: REGION,
        window_bytes: 2 * u64::from(REGION),
        served: false,
        bulk: true,
    }
}

fn start(s: &SimStorage, case: Case, tree: &RegionTree) -> Result<Migration> {
    Migration::start(s, key(case).as_ref(), Some(tree.clone()), &options())
}

fn run_to_end(m: Migration, s: &SimStorage) -> Result<Finished> {
    while m.step()? != StepDone::Complete {}
    m.finish(s)
}

/// Nothing of the migration is left: no record, key slot, evacuation copy or moved map.
fn assert_cleaned(s: &SimStorage, what: &str) {
    assert!(s.key_slot().is_none(), "{what}: key slot left");
    assert_cleaned_but_slot(s, what);
}

/// [`assert_cleaned`], but for a key slot that a power loss between the record's removal
/// and the slot's may leave (without a record; the next seal destroys it, as after an
/// unseal).
fn assert_cleaned_but_slot(s: &SimStorage, what: &str) {
    assert!(s.record().is_none(), "{what}: record left");
    assert!(s.place().is_none(), "{what}: placement table left");
    for f in [MigrationFile::EvacuationCopy, MigrationFile::MovedMap] {
        assert!(s.migration_file(f).is_none(), "{what}: {f:?} left");
    }
    assert_eq!(s.thin_count(), 0, "{what}: the bulk move's thin disk left");
}

/// Step until the evacuation pass is over; the first step after it.
fn step_past_evacuation(m: &Migration) -> StepDone {
    loop {
        match m.step().unwrap() {
            StepDone::Evacuated(_) => continue,
            other => return other,
        }
    }
}

#[test]
fn the_move_pass_runs_in_bulk_once_every_region_is_evacuated() {
    let mut rng = StdRng::seed_from_u64(11);
    for case in cases() {
        let plain = plaintext(&mut rng);
        let (s, tree) = sealed(case, &plain);
        let m = start(&s, case, &tree).unwrap();
        // The simulator counts E and M among its thin disks, and T makes three.
        assert_eq!(
            s.thin_count(),
            3,
            "{case:?}: no thin disk for the bulk pass"
        );
        let regions = m.regions();
        // One step moves every region: the bulk pass, not windows of two regions.
        assert_eq!(
            step_past_evacuation(&m),
            StepDone::Moved(0..regions),
            "{case:?}"
        );
        assert_eq!(m.counts(), [0, 0, regions, 0], "{case:?}");
        assert_eq!(m.step().unwrap(), StepDone::Complete, "{case:?}");
        m.finish(&s).unwrap();
        assert!(s.image() == plain, "{case:?}: not the plaintext");
        assert_cleaned(&s, &format!("{case:?}"));
    }
}

#[test]
fn without_room_for_its_thin_disk_the_move_pass_goes_region_by_region() {
    let mut rng = StdRng::seed_from_u64(12);
    let plain = plaintext(&mut rng);
    let (s, tree) = sealed(SECURE, &plain);
    s.set_free_bytes(IMAGE_BYTES as u64);
    let m = start(&s, SECURE, &tree).unwrap();
    assert_eq!(
        s.thin_count(),
        2,
        "E and M, and a thin disk without room for it"
    );
    assert_eq!(step_past_evacuation(&m), StepDone::Moved(0..2));
    run_to_end(m, &s).unwrap();
    assert!(s.image() == plain, "not the plaintext");
    assert_cleaned(&s, "region by region");
}

#[test]
fn a_background_migration_gives_back_the_plaintext() {
    let mut rng = StdRng::seed_from_u64(1);
    for case in cases() {
        let plain = plaintext(&mut rng);
        let (s, tree) = sealed(case, &plain);
        assert_ne!(s.image(), plain, "{case:?}: not sealed");
        let m = start(&s, case, &tree).unwrap();
        let rec = SealRecord::decode(&s.record().unwrap()).unwrap();
        assert_eq!((rec.phase, rec.version), (Phase::Migrating, 5), "{case:?}");
        assert_eq!(m.counts()[2] + m.counts()[3], 0);
        let done = run_to_end(m, &s).unwrap();
        assert_eq!(done.dirty_regions, 0, "{case:?}");
        assert!(s.image() == plain, "{case:?}: not the plaintext");
        assert_cleaned(&s, &format!("{case:?}"));
    }
}

#[test]
fn a_migrating_record_is_left_to_the_migration() {
    let mut rng = StdRng::seed_from_u64(2);
    let plain = plaintext(&mut rng);
    let (s, tree) = sealed(SECURE, &plain);
    let m = start(&s, SECURE, &tree).unwrap();
    drop(m);
    let e = unseal(&s, Some(&master()), &NoProgress).unwrap_err();
    assert!(matches!(e, JobError::Reclaiming { .. }), "{e}");
    // A pdguard of record version 4 would refuse it as newer: the header says 5.
    let bytes = s.record().unwrap();
    assert!(bytes.starts_with(b"PDGUARD-SEAL-RECORD 5 "));
}

/// The requests of one script, and the model they are checked against.
#[derive(Debug, Clone)]
enum Op {
    Read(u64, usize),
    Write(u64, Vec<u8>),
    Flush,
    Step,
}

fn script(rng: &mut StdRng, ops: usize) -> Vec<Op> {
    (0..ops)
        .map(|_| {
            let len = rng.gen_range(1..(REGION as usize * 3 / 2));
            let off = rng.gen_range(0..(IMAGE_BYTES - len) as u64);
            match rng.gen_range(0..10) {
                0..=2 => Op::Read(off, len),
                3..=5 => {
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data[..]);
                    Op::Write(off, data)
                }
                6 => Op::Flush,
                _ => Op::Step,
            }
        })
        .collect()
}

/// What reads must see now, what a power loss must keep, and what it may keep.
struct Model {
    now: Vec<u8>,
    flushed: Vec<u8>,
    /// Writes acknowledged since the last flush, and the one in flight.
    unflushed: Vec<(u64, Vec<u8>)>,
}

impl Model {
    fn new(plain: &[u8]) -> Self {
        Self {
            now: plain.to_vec(),
            flushed: plain.to_vec(),
            unflushed: Vec::new(),
        }
    }

    /// After a power loss: each byte as flushed, or as an unflushed write put it.
    fn check_after_power_loss(&self, image: &[u8], what: &str) {
        for (b, &have) in image.iter().enumerate() {
            if have == self.flushed[b] {
                continue;
            }
            let b64 = b as u64;
            let written = self.unflushed.iter().any(|(off, data)| {
                (*off..*off + data.len() as u64).contains(&b64)
                    && data[(b64 - off) as usize] == have
            });
            assert!(
                written,
                "{what}: byte {b} is {have:#x}, neither flushed ({:#x}) nor written",
                self.flushed[b]
            );
        }
    }
}

/// Run `ops` on a migration of `s`, then the migration to its end; stop at the first error.
fn run_script(
    s: &SimStorage,
    case: Case,
    tree: &RegionTree,
    ops: &[Op],
    model: &mut Model,
) -> Result<Finished> {
    let m = start(s, case, tree)?;
    drive(&m, case, ops, model)?;
    run_to_end(m, s)
}

/// Run `ops` on `m`, checking each read against the model; stop at the first error.
fn drive(m: &Migration, case: Case, ops: &[Op], model: &mut Model) -> Result<()> {
    for op in ops {
        match op {
            Op::Read(off, len) => {
                let mut buf = vec![0u8; *len];
                m.read(*off, &mut buf)?;
                let at = *off as usize;
                assert!(
                    buf == model.now[at..at + len],
                    "{case:?}: read at {off} differs"
                );
            }
            Op::Write(off, data) => {
                model.unflushed.push((*off, data.clone()));
                m.write(*off, data)?;
                let at = *off as usize;
                model.now[at..at + data.len()].copy_from_slice(data);
            }
            Op::Flush => {
                m.flush()?;
                model.flushed.clone_from(&model.now);
                model.unflushed.clear();
            }
            Op::Step => {
                m.step()?;
            }
        }
    }
    while m.step()? != StepDone::Complete {}
    Ok(())
}

#[test]
fn requests_interleaved_with_steps_read_the_plaintext_and_keep_every_write() {
    let mut rng = StdRng::seed_from_u64(3);
    for case in cases() {
        let plain = plaintext(&mut rng);
        let (s, tree) = sealed(case, &plain);
        let ops = script(&mut rng, 40);
        let mut model = Model::new(&plain);
        let done = run_script(&s, case, &tree, &ops, &mut model).unwrap();
        assert!(done.dirty_regions > 0, "{case:?}: no write landed");
        assert!(
            s.image() == model.now,
            "{case:?}: final image differs from the model"
        );
        assert_cleaned(&s, &format!("{case:?}"));
    }
}

/// After a power loss, whatever the record says: resume the migration (or finish the
/// `unsealed` phase as an unseal does) with no more requests. The phase found, if any.
fn recover(s: &SimStorage, case: Case, tree: &RegionTree) -> Option<Phase> {
    let phase = SealRecord::decode(&s.record()?).unwrap().phase;
    match phase {
        Phase::Sealed | Phase::Migrating => {
            run_to_end(start(s, case, tree).unwrap(), s).unwrap();
        }
        Phase::Unsealed => {
            unseal(s, key(case).as_ref(), &NoProgress).unwrap();
        }
        other => panic!("{case:?}: phase {other:?} after a power loss"),
    }
    Some(phase)
}

#[test]
fn a_power_loss_at_every_step_resumes_to_the_plaintext_and_the_flushed_writes() {
    let mut rng = StdRng::seed_from_u64(4);
    for case in cases() {
        let plain = plaintext(&mut rng);
        let (base, tree) = sealed(case, &plain);
        let ops = script(&mut rng, 32);
        let clean = base.power_loss(&mut rng);
        let before = clean.steps();
        run_script(&clean, case, &tree, &ops, &mut Model::new(&plain)).unwrap();
        let total = clean.steps() - before;
        let mut resumed = 0;
        for k in 1..=total {
            let s = base.power_loss(&mut rng);
            s.arm(k, Fault::Crash);
            let mut model = Model::new(&plain);
            let what = format!("{case:?}, power loss at step {k} of {total}");
            assert!(
                run_script(&s, case, &tree, &ops, &mut model).is_err(),
                "{what}: no crash"
            );
            let after = s.power_loss(&mut rng);
            if recover(&after, case, &tree) == Some(Phase::Migrating) {
                resumed += 1;
            }
            model.check_after_power_loss(&after.image(), &what);
            assert_cleaned_but_slot(&after, &what);
        }
        assert!(
            resumed * 10 > total * 8,
            "{case:?}: resumed from migrating {resumed} times of {total}"
        );
    }
}

#[test]
fn an_io_error_at_every_step_refuses_further_requests_and_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(5);
    let case = SECURE;
    let plain = plaintext(&mut rng);
    let (base, tree) = sealed(case, &plain);
    let ops = script(&mut rng, 16);
    let clean = base.power_loss(&mut rng);
    let before = clean.steps();
    run_script(&clean, case, &tree, &ops, &mut Model::new(&plain)).unwrap();
    let total = clean.steps() - before;
    for k in (1..=total).step_by(3) {
        let s = base.power_loss(&mut rng);
        s.arm(k, Fault::Eio);
        let mut model = Model::new(&plain);
        let what = format!("EIO at step {k} of {total}");
        // An error in the start or the end leaves no handle; in between, the handle
        // refuses every request after the first error.
        let driven = start(&s, case, &tree).map(|m| {
            let r = drive(&m, case, &ops, &mut model);
            (m, r)
        });
        let finished = match driven {
            Err(_) => false,
            Ok((m, Ok(()))) => m.finish(&s).is_ok(),
            Ok((m, Err(_))) => {
                let mut buf = [0u8; 8];
                let refused = |r: Result<()>| matches!(r, Err(ReclaimError::Failed { .. }));
                assert!(
                    refused(m.read(0, &mut buf)),
                    "{what}: read served after an error"
                );
                assert!(
                    refused(m.write(0, &buf)),
                    "{what}: write served after an error"
                );
                assert!(refused(m.flush()), "{what}: flush served after an error");
                assert!(refused(m.step().map(drop)), "{what}: step after an error");
                false
            }
        };
        assert!(!finished, "{what}: the error was swallowed");
        // Restart the reclaim over what a power loss now would leave (the harder case:
        // unsynced writes may be lost too).
        let after = s.power_loss(&mut rng);
        recover(&after, case, &tree);
        model.check_after_power_loss(&after.image(), &what);
    }
}

/// A plaintext image whose region `bad` is data throughout, sealed, with one byte of the
/// sealed sector of one of its plaintext sectors flipped (one the record's fingerprint
/// does not sample, so that the reclaim starts and meets it in a move).
fn sealed_with_a_bad_region(
    case: Case,
    bad: u64,
    rng: &mut StdRng,
) -> (SimStorage, RegionTree, Vec<u8>) {
    let mut plain = plaintext(rng);
    let first = (bad * u64::from(REGION)) as usize;
    rng.fill(&mut plain[first..first + REGION as usize]);
    let (s, tree) = sealed(case, &plain);
    let (opened, placement) = open_for_reclaim(&s, key(case).as_ref()).unwrap();
    let address = SealedAddress::new(
        &*placement.placement,
        opened.dense.as_ref().map(|d| &d.ranges),
        opened.rec.sectors,
        SECTOR as u64,
    );
    let sampled = pdguard_core::fingerprint_sectors(opened.rec.sectors);
    drop(opened);
    let sectors = first as u64 / SECTOR as u64..(first as u64 + u64::from(REGION)) / SECTOR as u64;
    let j = sectors
        .map(|i| address.locate(i).unwrap().sealed_sector)
        .find(|j| !sampled.contains(j))
        .unwrap();
    s.corrupt_image(j as usize * SECTOR + 100);
    (s, tree, plain)
}

#[test]
fn a_corrupted_sealed_sector_refuses_its_region_and_serves_none_of_it() {
    let mut rng = StdRng::seed_from_u64(6);
    for case in [cases()[0], cases()[5]] {
        let (s, tree, plain) = sealed_with_a_bad_region(case, 5, &mut rng);
        let first = 5 * u64::from(REGION);
        let m = start(&s, case, &tree).unwrap();
        let mut ok = vec![0u8; 16];
        let mut buf = vec![0xee_u8; REGION as usize];
        let e = m.read(first, &mut buf).unwrap_err();
        assert!(
            matches!(&e, ReclaimError::Region { .. }) && e.to_string().contains("region 5 "),
            "{case:?}: {e}"
        );
        assert!(
            buf.iter().all(|&b| b == 0xee),
            "{case:?}: a byte of the bad region was returned"
        );
        // The region was never written: it stays as sealed, and on disk `evacuated`.
        let e = m.read(0, &mut ok).unwrap_err();
        assert!(matches!(e, ReclaimError::Failed { .. }), "{case:?}: {e}");
        assert!(matches!(m.step(), Err(ReclaimError::Failed { .. })));
        assert_eq!(
            m.counts()[1],
            1,
            "{case:?}: the region is not back to evacuated"
        );
        drop(m);
        let image = s.image();
        let region = &image[first as usize..][..REGION as usize];
        assert!(
            region != &plain[first as usize..][..REGION as usize],
            "{case:?}: plaintext written"
        );
        // Resumed, the migration refuses the region again.
        let m = start(&s, case, &tree).unwrap();
        let e = run_to_end(m, &s).unwrap_err();
        assert!(e.to_string().contains("region 5 "), "{case:?}: {e}");
    }
}

#[test]
fn a_write_over_a_whole_region_needs_nothing_of_its_old_content() {
    let mut rng = StdRng::seed_from_u64(7);
    let case = SECURE;
    let (s, tree, _) = sealed_with_a_bad_region(case, 5, &mut rng);
    let first = 5 * u64::from(REGION);
    let m = start(&s, case, &tree).unwrap();
    let data = vec![0x5c_u8; REGION as usize];
    m.write(first, &data).unwrap();
    let mut back = vec![0u8; REGION as usize];
    m.read(first, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(m.counts()[3], 1, "the region is not dirty");
}

#[test]
fn threads_share_one_migration() {
    let mut rng = StdRng::seed_from_u64(8);
    for case in [SECURE, cases()[5]] {
        let plain = plaintext(&mut rng);
        let (s, tree) = sealed(case, &plain);
        let m = start(&s, case, &tree).unwrap();
        // Each thread writes and reads back its own interleaved sectors, crossing regions.
        let threads = 4u64;
        std::thread::scope(|scope| {
            for t in 0..threads {
                let m = &m;
                scope.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(100 + t);
                    for _ in 0..30 {
                        let sector =
                            rng.gen_range(0..(IMAGE_BYTES / SECTOR) as u64 / threads) * threads + t;
                        let at = sector * SECTOR as u64;
                        let data = vec![(t as u8) + 1; SECTOR];
                        m.write(at, &data).unwrap();
                        let mut back = vec![0u8; SECTOR];
                        m.read(at, &mut back).unwrap();
                        assert_eq!(back, data);
                    }
                });
            }
            scope.spawn(|| while m.step().unwrap() != StepDone::Complete {});
        });
        let done = run_to_end(m, &s).unwrap();
        assert!(done.dirty_regions > 0);
        let image = s.image();
        for (i, (have, was)) in image.chunks(SECTOR).zip(plain.chunks(SECTOR)).enumerate() {
            let t = i as u64 % threads;
            let written = have.iter().all(|&b| b == t as u8 + 1);
            assert!(
                written || have == was,
                "{case:?}: sector {i} is neither plaintext nor its thread's write"
            );
        }
    }
}

#[test]
fn a_write_to_a_plain_region_is_committed_dirty_before_it_is_issued() {
    let mut rng = StdRng::seed_from_u64(9);
    let plain = plaintext(&mut rng);
    let (base, tree) = sealed(SECURE, &plain);
    let mut kept = 0;
    for _ in 0..16 {
        let s = base.power_loss(&mut rng);
        let m = start(&s, SECURE, &tree).unwrap();
        while m.step().unwrap() != StepDone::Complete {}
        // Every region is `plain` and durable; this write is acknowledged, not flushed.
        let at = 3 * u64::from(REGION) + 100;
        m.write(at, b"written after the move").unwrap();
        drop(m);
        let after = s.power_loss(&mut rng);
        if after.image()[at as usize..][..7] != *b"written" {
            continue;
        }
        // The write survived: the moved map must say its region changed, or the end of
        // the migration takes it for a corruption.
        kept += 1;
        let done = run_to_end(start(&after, SECURE, &tree).unwrap(), &after).unwrap();
        assert_eq!(done.dirty_regions, 1);
    }
    assert!(kept > 0, "no power loss kept the write");
}

mod property {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any script of requests and steps, on any seal: reads see the plaintext and the
        /// writes before them, and the end is the plaintext plus every write.
        #[test]
        fn any_script_reads_and_keeps_every_write(seed in any::<u64>(), which in 0..8usize, ops in 1..60usize) {
            let mut rng = StdRng::seed_from_u64(seed);
            let case = cases()[which];
            let plain = plaintext(&mut rng);
            let (s, tree) = sealed(case, &plain);
            let ops = script(&mut rng, ops);
            let mut model = Model::new(&plain);
            run_script(&s, case, &tree, &ops, &mut model).unwrap();
            prop_assert!(s.image() == model.now);
        }
    }
}

#[test]
fn a_resume_without_its_files_or_with_a_damaged_moved_map_touches_nothing() {
    let mut rng = StdRng::seed_from_u64(10);
    let plain = plaintext(&mut rng);
    let (s, tree) = sealed(SECURE, &plain);
    let m = start(&s, SECURE, &tree).unwrap();
    m.step().unwrap();
    drop(m);
    let saved = s.power_loss(&mut rng);
    let image = saved.image();
    // Both slots damaged: neither is trusted, and the error names the file.
    let map = saved.migration_file(MigrationFile::MovedMap).unwrap();
    let moved = saved
        .create_migration_file(MigrationFile::MovedMap, map.len() as u64)
        .unwrap();
    let mut bad = map.clone();
    bad[0] ^= 1;
    bad[map.len() / 2] ^= 1;
    moved.write_at(&bad, 0).unwrap();
    let e = start(&saved, SECURE, &tree).err().unwrap();
    assert!(matches!(e, ReclaimError::Map { .. }), "{e}");
    assert!(e.to_string().contains("sim.img.pdguard.moved"), "{e}");
    // Only the newer slot damaged: the older one is loaded, and the migration goes on.
    // The start committed generation 1 (slot 1), the step generation 2 (slot 0).
    let newer = 0;
    assert!(map[map.len() / 2..].starts_with(b"PDGUARD-MOVEDMP1"));
    assert!(map.starts_with(b"PDGUARD-MOVEDMP1"));
    let mut torn = map.clone();
    torn[newer + 70] ^= 1;
    moved.write_at(&torn, 0).unwrap();
    run_to_end(start(&saved, SECURE, &tree).unwrap(), &saved).unwrap();
    assert!(saved.image() == plain);
    // No evacuation copy: refused, naming it.
    let saved = s.power_loss(&mut rng);
    saved
        .remove_migration_file(MigrationFile::EvacuationCopy)
        .unwrap();
    let e = start(&saved, SECURE, &tree).err().unwrap();
    assert!(
        matches!(e, ReclaimError::Missing { .. }) && e.to_string().contains(".evacuation"),
        "{e}"
    );
    assert!(saved.image() == image, "the image was touched");
}

/// A move does not overwrite a region while a gather still reads its sealed store from the
/// image: the reads are drained first.
#[test]
fn a_move_waits_for_the_image_reads_of_its_sealed_store() {
    let mut rng = StdRng::seed_from_u64(11);
    let plain = plaintext(&mut rng);
    let (s, tree) = sealed(SECURE, &plain);
    let sealed_image = s.image();
    let m = start(&s, SECURE, &tree).unwrap();
    let r = 6usize;
    let bytes = r * REGION as usize..(r + 1) * REGION as usize;
    // A gather elsewhere is reading sealed store 6 from the image.
    m.lock().image_readers[r] += 1;
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut buf = vec![0u8; 64];
            m.read(bytes.start as u64, &mut buf).unwrap();
            buf
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !reader.is_finished(),
            "the move did not wait for the image reads"
        );
        assert!(
            s.image()[bytes.clone()] == sealed_image[bytes.clone()],
            "region overwritten under a reader"
        );
        m.lock().image_readers[r] -= 1;
        m.changed.notify_all();
        assert_eq!(reader.join().unwrap(), plain[bytes.start..][..64]);
    });
}

/// Rewrite the record (its MAC too, in the secure profile).
fn rewrite_record(s: &SimStorage, case: Case, edit: impl FnOnce(&mut SealRecord)) {
    let mut rec = SealRecord::decode(&s.record().unwrap()).unwrap();
    edit(&mut rec);
    let mac = key(case).map(|k| pdguard_core::keys::record_mac_key(&k, &rec.seal_id));
    s.write_record(&rec.encode_with_mac(mac.as_deref()))
        .unwrap();
}

/// The patent placement and every seal with slack record a placement table, and the
/// migration's start reads it instead of rebuilding the placement (`from_table` is false
/// when the fallback build runs); a record without one (an older seal) falls back.
#[test]
fn the_read_path_comes_from_the_placement_table_and_an_older_record_falls_back() {
    let mut rng = StdRng::seed_from_u64(18);
    for case in cases() {
        for drop_table in [false, true] {
            let what = format!("{case:?} drop_table={drop_table}");
            let plain = plaintext(&mut rng);
            let (s, tree) = sealed(case, &plain);
            let rec = SealRecord::decode(&s.record().unwrap()).unwrap();
            let needed = case.placement == PlacementKind::Patent || case.slack > 0;
            assert_eq!(rec.placement_table.is_some(), needed, "{what}");
            assert_eq!(s.place().is_some(), needed, "{what}");
            if drop_table {
                rewrite_record(&s, case, |r| r.placement_table = None);
            }
            let m = start(&s, case, &tree).unwrap();
            assert_eq!(m.placement_from_table(), needed && !drop_table, "{what}");
            run_to_end(m, &s).unwrap();
            assert!(s.image() == plain, "{what}: not the plaintext");
            assert_cleaned(&s, &what);
        }
    }
}

/// An edited, truncated or missing table is refused at the start, naming the file and
/// `image unseal`, and nothing changes; put back, the reclaim runs.
#[test]
fn a_bad_placement_table_is_refused_at_start_and_touches_nothing() {
    let mut rng = StdRng::seed_from_u64(19);
    let patent = Case {
        profile: Profile::Patent,
        placement: PlacementKind::Patent,
        ..SECURE
    };
    let cases = [
        patent,
        Case {
            placement: PlacementKind::Patent,
            ..SECURE
        },
        Case {
            slack: 25,
            ..SECURE
        },
    ];
    for case in cases {
        let plain = plaintext(&mut rng);
        let (s, tree) = sealed(case, &plain);
        let good = s.place().unwrap();
        let (record, image) = (s.record(), s.image());
        let mut edited = good.clone();
        edited[good.len() / 2] ^= 0x10;
        let bad: [(&str, Option<Vec<u8>>); 3] = [
            ("edited", Some(edited)),
            ("truncated", Some(good[..good.len() - 4].to_vec())),
            ("missing", None),
        ];
        for (how, bytes) in bad {
            let what = format!("{case:?} {how}");
            s.set_place(bytes);
            let e = match start(&s, case, &tree) {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains("sim.img.pdguard.place"), "{what}: {e}");
            assert!(e.contains("pdguard image unseal"), "{what}: {e}");
            assert!(!e.contains('\n'), "{what}: {e}");
            assert_eq!(s.record(), record, "{what}: record changed");
            assert!(s.image() == image, "{what}: image changed");
            for f in [MigrationFile::EvacuationCopy, MigrationFile::MovedMap] {
                assert!(s.migration_file(f).is_none(), "{what}: {f:?} made");
            }
        }
        s.set_place(Some(good));
        let m = start(&s, case, &tree).unwrap();
        assert!(m.placement_from_table());
        run_to_end(m, &s).unwrap();
        assert!(s.image() == plain, "{case:?}: not the plaintext");
    }
}
