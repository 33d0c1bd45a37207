#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;
use RegionEvent as E;
use RegionState as S;

const R: u64 = 4096;

fn identity(image_bytes: u64) -> MapIdentity {
    MapIdentity {
        seal_id: [0xab; 16],
        layout: RegionLayout::new(R, image_bytes).unwrap(),
    }
}

/// The table of `docs/instant-reclaim.md`, section 3, written out: `None` is refused.
fn documented(from: RegionState, event: RegionEvent) -> Option<Step> {
    let t = |s| Some(Step::To(s));
    let row: [Option<Step>; 7] = match from {
        // Evacuate, StartMove, CommitMove, CommitMoveWritten, AbortMove, Read, Write
        S::Sealed => [
            t(S::Evacuated),
            None,
            None,
            None,
            None,
            Some(Step::DemandMove),
            Some(Step::DemandMove),
        ],
        S::Evacuated => [
            None,
            t(S::Moving),
            None,
            None,
            None,
            Some(Step::DemandMove),
            Some(Step::DemandMove),
        ],
        S::Moving => [
            None,
            None,
            t(S::Plain),
            t(S::Dirty),
            t(S::Evacuated),
            Some(Step::WaitForMove),
            Some(Step::WaitForMove),
        ],
        S::Plain => [
            None,
            None,
            None,
            None,
            None,
            Some(Step::Serve),
            Some(Step::MarkDirty),
        ],
        S::Dirty => [
            None,
            None,
            None,
            None,
            None,
            Some(Step::Serve),
            Some(Step::Serve),
        ],
    };
    let col = E::ALL.iter().position(|&e| e == event).unwrap();
    row[col]
}

#[test]
fn the_transition_table_is_the_documented_one() {
    let mut allowed = 0;
    for from in S::ALL {
        for event in E::ALL {
            let got = next(from, event);
            match documented(from, event) {
                Some(step) => {
                    assert_eq!(got, Ok(step), "{from} + {}", event.name());
                    allowed += 1;
                }
                None => assert_eq!(got, Err(TransitionError { from, event })),
            }
        }
    }
    assert_eq!(allowed, 15, "allowed (state, event) pairs");
}

#[test]
fn a_refused_event_names_the_region_and_its_state() {
    let mut m = MovedMap::new(identity(3 * R), 3).unwrap();
    let err = m.apply(2, E::StartMove).unwrap_err();
    assert_eq!(
        err.to_string(),
        "region 2 cannot take the event \"start move\": it is sealed"
    );
    assert_eq!(m.state(2).unwrap(), S::Sealed, "a refusal changes nothing");
    assert!(matches!(
        m.apply(3, E::Read),
        Err(MapError::Layout(RegionTreeError::OutOfRange {
            region: 3,
            regions: 3
        }))
    ));
}

#[test]
fn a_region_goes_sealed_evacuated_moving_plain_dirty() {
    let mut m = MovedMap::new(identity(2 * R + 1), 3).unwrap();
    assert_eq!(m.sealed_store(0).unwrap(), SealedStore::Image);
    assert_eq!(m.apply(0, E::Read).unwrap(), Step::DemandMove);
    assert_eq!(m.apply(0, E::Evacuate).unwrap(), Step::To(S::Evacuated));
    assert_eq!(m.sealed_store(0).unwrap(), SealedStore::EvacuationCopy);
    assert_eq!(m.apply(0, E::StartMove).unwrap(), Step::To(S::Moving));
    assert_eq!(m.apply(0, E::Write).unwrap(), Step::WaitForMove);
    assert_eq!(m.apply(0, E::CommitMove).unwrap(), Step::To(S::Plain));
    assert_eq!(m.apply(0, E::Read).unwrap(), Step::Serve);
    assert_eq!(m.apply(0, E::Write).unwrap(), Step::MarkDirty);
    assert_eq!(m.state(0).unwrap(), S::Dirty);
    assert_eq!(m.apply(0, E::Write).unwrap(), Step::Serve);
    // A failed move leaves the region at its sealed places.
    m.apply(1, E::Evacuate).unwrap();
    m.apply(1, E::StartMove).unwrap();
    assert_eq!(m.apply(1, E::AbortMove).unwrap(), Step::To(S::Evacuated));
    assert_eq!(m.count(S::Evacuated), 1);
    assert!(!m.is_complete());
    for r in 1..3 {
        if m.state(r).unwrap() == S::Sealed {
            m.apply(r, E::Evacuate).unwrap();
        }
        m.apply(r, E::StartMove).unwrap();
        m.apply(r, E::CommitMoveWritten).unwrap();
    }
    assert!(m.is_complete());
    assert_eq!(m.count(S::Dirty), 3);
}

#[test]
fn a_dense_seal_starts_its_regions_past_the_dense_region_evacuated() {
    let m = MovedMap::new(identity(10 * R), 4).unwrap();
    assert_eq!(m.count(S::Sealed), 4);
    assert_eq!(m.count(S::Evacuated), 6);
    assert_eq!(m.state(3).unwrap(), S::Sealed);
    assert_eq!(m.state(4).unwrap(), S::Evacuated);
}

#[test]
fn slot_sizes_round_up_to_pages() {
    assert_eq!(slot_bytes(0), Some(4096));
    assert_eq!(slot_bytes((4096 - 92) * 4), Some(4096));
    assert_eq!(slot_bytes((4096 - 92) * 4 + 1), Some(8192));
    // 1 TiB in 1 MiB regions: 2^20 regions, 256 KiB of states.
    assert_eq!(slot_bytes(1 << 20), Some((256 << 10) + 4096));
    assert!(slot_bytes(MAX_REGIONS).is_some());
    assert_eq!(slot_bytes(MAX_REGIONS + 1), None);
    assert_eq!(slot_bytes(u64::MAX), None);
    let huge = MapIdentity {
        seal_id: [0; 16],
        layout: RegionLayout::new(4096, u64::MAX).unwrap(),
    };
    assert_eq!(
        MovedMap::new(huge, 0),
        Err(MapError::TooManyRegions(u64::MAX.div_ceil(4096)))
    );
    assert_eq!(
        MovedMap::load(&[], &huge, &MapKey::new(None)),
        Err(MapError::TooManyRegions(u64::MAX.div_ceil(4096)))
    );
}

#[test]
fn the_last_generation_cannot_be_committed_again() {
    let mut m = MovedMap::new(identity(R), 1).unwrap();
    m.committed(u64::MAX);
    assert_eq!(
        m.next_commit(&MapKey::new(None)),
        Err(MapError::LastGeneration(u64::MAX))
    );
}

#[test]
fn a_new_file_holds_generation_1_in_slot_1_and_loads_back() {
    let key = MapKey::new(Some(&[4; 32]));
    let id = identity(5 * R);
    let mut m = MovedMap::new(id, 5).unwrap();
    let file = m.create_file(&key).unwrap();
    assert_eq!(m.generation(), 1);
    assert_eq!(file.len(), 2 * 4096);
    assert!(file[..4096].iter().all(|&b| b == 0));
    assert_eq!(&file[4096..4112], MAP_MAGIC);
    assert_eq!(MovedMap::load(&file, &id, &key).unwrap(), m);
}

/// The file after commits of `old` then `new` (generations g and g + 1).
fn two_commits(old: &MovedMap, new: &MovedMap, key: &MapKey) -> Vec<u8> {
    let a = old.next_commit(key).unwrap();
    let b = new.next_commit(key).unwrap();
    assert_eq!(b.generation, a.generation + 1);
    let mut file = vec![0u8; 2 * a.bytes.len()];
    for c in [&a, &b] {
        file[c.offset as usize..c.offset as usize + c.bytes.len()].copy_from_slice(&c.bytes);
    }
    file
}

#[test]
fn a_file_put_together_from_two_maps_is_refused() {
    let key = MapKey::new(None);
    let id = identity(4 * R);
    let mut m = MovedMap::new(id, 4).unwrap();
    let one = m.next_commit(&key).unwrap();
    m.committed(3);
    let four = m.next_commit(&key).unwrap();
    assert_ne!(one.offset, four.offset);
    let mut file = vec![0u8; 2 * one.bytes.len()];
    file[one.offset as usize..][..one.bytes.len()].copy_from_slice(&one.bytes);
    file[four.offset as usize..][..four.bytes.len()].copy_from_slice(&four.bytes);
    assert_eq!(
        MovedMap::load(&file, &id, &key),
        Err(MapError::NotConsecutive(1, 4))
    );
}

#[test]
fn load_refuses_what_is_not_two_valid_slots_of_this_seal() {
    let key = MapKey::new(Some(&[1; 32]));
    let id = identity(7 * R);
    let mut m = MovedMap::new(id, 7).unwrap();
    let file = m.create_file(&key).unwrap();

    assert!(matches!(
        MovedMap::load(&file[..file.len() - 1], &id, &key),
        Err(MapError::Length { .. })
    ));
    // Another key, seal or size: both slots refused, each with its reason.
    let err = MovedMap::load(&file, &id, &MapKey::new(None)).unwrap_err();
    assert!(
        matches!(
            &err,
            MapError::NoValidSlot(SlotRefusal::Empty, SlotRefusal::Corrupt(_))
        ),
        "{err}"
    );
    let other = MapIdentity {
        seal_id: [0xcd; 16],
        ..id
    };
    assert!(matches!(
        MovedMap::load(&file, &other, &key),
        Err(MapError::NoValidSlot(
            SlotRefusal::Empty,
            SlotRefusal::Inconsistent(_)
        ))
    ));
    let bigger = identity(7 * R + 1);
    assert!(MovedMap::load(&file, &bigger, &key).is_err());
    // Every flipped byte of the only slot.
    for at in 4096..file.len() {
        let mut f = file.clone();
        f[at] ^= 0x10;
        assert!(
            matches!(
                MovedMap::load(&f, &id, &key),
                Err(MapError::NoValidSlot(SlotRefusal::Empty, _))
            ),
            "byte {at}"
        );
    }
    // Garbage in the unused slot leaves the valid one in charge.
    let mut f = file.clone();
    f[0] = 1;
    assert_eq!(MovedMap::load(&f, &id, &key).unwrap(), m);
}

/// A slot whose checksum is right (recomputed with the key) but whose content lies.
fn resealed(mut slot: Vec<u8>, regions: u64, key: &MapKey) -> Vec<u8> {
    let end = HEAD + regions.div_ceil(4) as usize;
    let sum = blake3::keyed_hash(&key.0, &slot[..end]);
    slot[end..end + SUM].copy_from_slice(sum.as_bytes());
    slot
}

#[test]
fn load_refuses_a_slot_that_lies_under_a_valid_checksum() {
    let key = MapKey::new(None);
    let id = identity(5 * R);
    let m = MovedMap::new(id, 5).unwrap();
    let first = m.next_commit(&key).unwrap();
    let file_with = |slot1: Vec<u8>| {
        let mut f = vec![0u8; 4096];
        f.extend_from_slice(&slot1);
        f
    };
    let refusal = |slot1: Vec<u8>| match MovedMap::load(&file_with(slot1), &id, &key) {
        Err(MapError::NoValidSlot(SlotRefusal::Empty, r)) => r,
        other => panic!("{other:?}"),
    };
    let mut bits = first.bytes.clone();
    bits[HEAD + 1] |= 0b0100_0000; // region 7 of 5
    assert_eq!(
        refusal(resealed(bits, 5, &key)),
        SlotRefusal::Corrupt("bits past its last region are set")
    );
    let mut generation = first.bytes.clone();
    generation[44..52].copy_from_slice(&2u64.to_le_bytes());
    assert_eq!(
        refusal(resealed(generation, 5, &key)),
        SlotRefusal::Corrupt("its generation does not belong in this slot")
    );
    let mut count = first.bytes.clone();
    count[52..60].copy_from_slice(&6u64.to_le_bytes());
    assert_eq!(
        refusal(resealed(count, 5, &key)),
        SlotRefusal::Corrupt("its region count does not match its sizes")
    );
    let mut padding = first.bytes.clone();
    padding[4095] = 1;
    assert_eq!(
        refusal(padding),
        SlotRefusal::Corrupt("its padding is not zeros")
    );
    let mut magic = first.bytes;
    magic[0] = b'X';
    assert_eq!(refusal(resealed(magic, 5, &key)), SlotRefusal::NotAMap);
}

fn arb_state() -> impl Strategy<Value = RegionState> {
    prop::sample::select(S::ALL.to_vec())
}

/// A map of 0..40 regions in any states (`moving` included), at some generation.
fn arb_map() -> impl Strategy<Value = MovedMap> {
    (
        proptest::collection::vec(arb_state(), 0..40),
        0u64..1000,
        0u64..R,
    )
        .prop_map(|(states, generation, tail)| {
            let image_bytes = (states.len() as u64 * R).saturating_sub(tail);
            let mut m = MovedMap::new(identity(image_bytes), 0).unwrap();
            let n = m.states.len();
            m.states.copy_from_slice(&states[..n]);
            m.generation = generation;
            m
        })
}

/// `m` as it reads back from disk.
fn durable(m: &MovedMap, generation: u64) -> MovedMap {
    let mut d = m.clone();
    for s in &mut d.states {
        *s = s.durable();
    }
    d.generation = generation;
    d
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Two commits in a row load back as the second, `moving` read back as `evacuated`.
    #[test]
    fn commits_round_trip(old in arb_map(), states in proptest::collection::vec(arb_state(), 40)) {
        let key = MapKey::new(Some(&[2; 32]));
        let mut new = old.clone();
        for (s, &t) in new.states.iter_mut().zip(&states) {
            *s = t;
        }
        new.generation = old.generation + 1;
        let file = two_commits(&old, &new, &key);
        let loaded = MovedMap::load(&file, &old.identity, &key).unwrap();
        prop_assert_eq!(loaded, durable(&new, old.generation + 2));
    }

    /// A commit torn anywhere leaves the previous commit or the new one, never an error.
    #[test]
    fn a_torn_commit_loads_the_previous_one(
        old in arb_map(),
        states in proptest::collection::vec(arb_state(), 40),
        tear in any::<prop::sample::Index>(),
    ) {
        let key = MapKey::new(None);
        let mut new = old.clone();
        for (s, &t) in new.states.iter_mut().zip(&states) {
            *s = t;
        }
        new.generation = old.generation + 1;
        let complete = two_commits(&old, &new, &key);
        let before = {
            let mut f = complete.clone();
            let c = new.next_commit(&key).unwrap();
            f[c.offset as usize..][..c.bytes.len()].fill(0);
            if old.generation > 0 {
                // The slot held the commit before `old`, which is two generations back.
                let mut older = old.clone();
                older.generation -= 1;
                let o = older.next_commit(&key).unwrap();
                prop_assert_eq!(o.offset, c.offset);
                f[o.offset as usize..][..o.bytes.len()].copy_from_slice(&o.bytes);
            }
            f
        };
        let c = new.next_commit(&key).unwrap();
        let cut = tear.index(c.bytes.len());
        let mut torn = before.clone();
        torn[c.offset as usize..][..cut].copy_from_slice(&c.bytes[..cut]);
        let loaded = MovedMap::load(&torn, &old.identity, &key).unwrap();
        let was_new = torn == complete;
        let want = if was_new { durable(&new, c.generation) } else { durable(&old, old.generation + 1) };
        prop_assert_eq!(loaded, want);
    }

    /// Any sequence of events keeps the map's states those of the table, and refusals
    /// change nothing.
    #[test]
    fn events_follow_the_table(
        events in proptest::collection::vec((0u64..6, prop::sample::select(E::ALL.to_vec())), 0..80),
    ) {
        let mut m = MovedMap::new(identity(6 * R), 6).unwrap();
        let mut model = vec![S::Sealed; 6];
        for (r, e) in events {
            let before = m.clone();
            match (m.apply(r, e), next(model[r as usize], e)) {
                (Ok(step), Ok(want)) => {
                    prop_assert_eq!(step, want);
                    match step {
                        Step::To(s) => model[r as usize] = s,
                        Step::MarkDirty => model[r as usize] = S::Dirty,
                        _ => {}
                    }
                }
                (Err(_), Err(_)) => prop_assert_eq!(&m, &before),
                (got, want) => prop_assert!(false, "{:?} against {:?}", got, want),
            }
            prop_assert_eq!(&m.states, &model);
            // Plain implies evacuated: a region at its plain place never keeps sealed data.
            for r in 0..6 {
                let s = m.state(r).unwrap();
                prop_assert!(!s.is_plain() || s.sealed_store() == SealedStore::EvacuationCopy);
            }
        }
    }
}
