//! Dense placement (record version 4): round trips, the dense region, the tail wipe, crash
//! and fault injection at every step, and old records.

use super::*;
use pdguard_core::keys;
use pdguard_core::record::KeySlotRef;

/// `blocks` 4 KiB blocks: a few holes among tagged data (with some zero sectors inside
/// data blocks), and always data in the last block, past the dense region, so that the
/// seal must wipe there.
pub(super) fn sparse_image(blocks: usize, sector: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut img = tagged_image((blocks * 4096 / sector) as u64, sector, rng);
    for (k, block) in img.chunks_mut(4096).enumerate() {
        if k + 1 < blocks && (k % 3 == 1 || rng.gen_bool(0.3)) {
            block.fill(0);
        }
    }
    if sector < 4096 {
        for s in img.chunks_exact_mut(sector) {
            if rng.gen_bool(0.1) {
                s.fill(0);
            }
        }
    }
    img
}

/// Sectors in the 4 KiB blocks that hold data (the simulator's data map): `D`.
fn data_sectors(img: &[u8], sector: usize) -> u64 {
    let blocks = img
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    (blocks * 4096 / sector) as u64
}

fn dense(o: SealOptions) -> SealOptions {
    SealOptions {
        keep_holes: true,
        ..o
    }
}

/// Checks a dense seal of `img` in `s`: the record, the dense region and the zeros after it.
fn check_dense(s: &SimStorage, img: &[u8], sector: usize, what: &str) {
    let rec = record(s).unwrap();
    assert_eq!(rec.version, 4, "{what}");
    let d = rec
        .dense
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: not dense"));
    assert_eq!(d.sectors, data_sectors(img, sector), "{what}: D");
    let sealed = s.image();
    let region = d.sectors as usize * sector;
    assert!(
        sealed[region..].iter().all(|&b| b == 0),
        "{what}: data past the dense region"
    );
    // Zero sectors stay zeros and every other sector is ciphertext: the dense region holds
    // exactly the compacted image's zero and non-zero sectors.
    assert_eq!(
        zero_sectors(&sealed[..region], sector),
        zero_sectors(img, sector) - (img.len() - region) / sector,
        "{what}: zero sectors"
    );
    for s in sealed[..region].chunks(sector) {
        assert!(tag_free(s), "{what}: a plaintext tag in the sealed image");
    }
}

/// True when `sector` does not begin with a plaintext tag (a sector index under 2^20).
fn tag_free(sector: &[u8]) -> bool {
    sector.iter().all(|&b| b == 0) || u64::from_le_bytes(sector[..8].try_into().unwrap()) >= 1 << 20
}

#[test]
fn dense_seals_put_the_data_first_and_round_trip_bit_exact() {
    let mut rng = StdRng::seed_from_u64(130);
    for (kind, sector, slack, strategy, memory) in [
        (
            PlacementKind::Feistel,
            512,
            0,
            "window",
            DEFAULT_MEMORY_BYTES,
        ),
        (PlacementKind::Feistel, 4096, 50, "window", 1),
        (PlacementKind::Patent, 512, 25, "window", 6 << 10),
        (PlacementKind::Patent, 4096, 0, "direct", 1),
        (PlacementKind::Feistel, 512, 0, "direct", 1),
    ] {
        let img = sparse_image(40, sector as usize, &mut rng);
        let o = with_strategy(dense(secure(kind, sector, slack)), strategy, memory);
        let what = format!("{kind:?} S={sector} slack={slack} {strategy}/{memory}");
        let s = SimStorage::new(img.clone());
        seal(&s, &o, &NoProgress).unwrap();
        check_dense(&s, &img, sector as usize, &what);
        verify(&s, Some(&master()), &NoProgress).unwrap();
        let r = unseal_with(&s, Some(&master()), &NoProgress, memory).unwrap();
        assert_eq!(r.outcome, Outcome::Unsealed, "{what}");
        assert!(s.image() == img, "{what}: not bit-exact");
        assert!(s.record().is_none() && s.thin_count() == 0, "{what}");
    }
}

#[test]
fn an_image_without_data_or_a_dense_image_still_seals() {
    let mut rng = StdRng::seed_from_u64(131);
    // All holes: nothing to place, sealed with the scattered placement (nothing moves).
    let s = SimStorage::new(vec![0; 64 << 10]);
    let o = dense(secure(PlacementKind::Feistel, 512, 0));
    let r = seal(&s, &o, &NoProgress).unwrap();
    assert!(r.record.dense.is_none() && r.record.keep_holes);
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert!(s.image().iter().all(|&b| b == 0));
    // No holes at all: D = N.
    let img = tagged_image(100, 512, &mut rng);
    let s = SimStorage::new(img.clone());
    let r = seal(&s, &o, &NoProgress).unwrap();
    assert_eq!(r.record.dense.as_ref().map(|d| d.sectors), Some(100));
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert!(s.image() == img);
}

#[test]
fn data_past_the_dense_region_fails_verification_and_the_map_is_bound_to_the_record() {
    let mut rng = StdRng::seed_from_u64(132);
    let img = sparse_image(24, 512, &mut rng);
    let o = dense(secure(PlacementKind::Feistel, 512, 0));
    let s = SimStorage::new(img.clone());
    seal(&s, &o, &NoProgress).unwrap();
    let d = record(&s).unwrap().dense.unwrap().sectors;
    // One byte planted in the holes after the dense region.
    let disk = s.open_image(true).unwrap();
    disk.write_at(&[1], d * 512 + 700).unwrap();
    let e = verify(&s, None, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("past its dense region"), "{e}");
    disk.write_at(&[0], d * 512 + 700).unwrap();
    verify(&s, None, &NoProgress).unwrap();
    // An edited map (or D) is refused before anything is touched.
    let good = s.record().unwrap();
    let sealed = s.image();
    for edit in [
        (|r: &mut SealRecord| r.dense.as_mut().unwrap().sectors -= 8) as fn(&mut SealRecord),
        |r: &mut SealRecord| {
            let m = &mut r.dense.as_mut().unwrap().map;
            let flipped = if m.starts_with('0') { "1" } else { "0" };
            m.replace_range(0..1, flipped);
        },
    ] {
        s.write_record(&forge(&good, edit)).unwrap();
        assert!(unseal(&s, Some(&master()), &NoProgress).is_err());
        assert!(s.image() == sealed && s.thin_count() == 0);
    }
    s.write_record(&good).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert!(s.image() == img);
}

/// A version 3 record of a `keep_holes` seal (scattered over all `N` slots, no dense map)
/// still unseals.
#[test]
fn a_version_3_keep_holes_record_still_unseals() {
    let mut rng = StdRng::seed_from_u64(133);
    let img = sparse_image(24, 512, &mut rng);
    let o = SealOptions {
        dense: false,
        ..dense(secure(PlacementKind::Feistel, 512, 0))
    };
    let s = SimStorage::new(img.clone());
    seal(&s, &o, &NoProgress).unwrap();
    // Rewrite as version 3 wrote it: the key slot bound to version 3, the record's MAC.
    let mut rec = record(&s).unwrap();
    assert!(rec.dense.is_none());
    let w = pdguard_core::keyslot::decode(&s.key_slot().unwrap())
        .unwrap()
        .wrapped;
    let (data_key, seed) = keys::unwrap(&master(), &w, &keys::wrap_aad(&rec)).unwrap();
    rec.version = 3;
    let w3 = keys::wrap(&master(), &data_key, &seed, [7; 12], &keys::wrap_aad(&rec));
    let slot = pdguard_core::keyslot::encode(&rec.seal_id, &w3).unwrap();
    rec.key_slot = Some(KeySlotRef {
        checksum: blake3::hash(&slot).to_hex().to_string(),
        bytes: slot.len() as u64,
        ..rec.key_slot.clone().unwrap()
    });
    s.create_key_slot(&slot).unwrap();
    let mac = keys::record_mac_key(&master(), &rec.seal_id);
    let v3 = rec.encode_with_mac(Some(&mac));
    assert!(v3.starts_with(b"PDGUARD-SEAL-RECORD 3 "));
    s.write_record(&v3).unwrap();
    verify(&s, Some(&master()), &NoProgress).unwrap();
    unseal(&s, Some(&master()), &NoProgress).unwrap();
    assert!(s.image() == img);
}

fn crash_everywhere_dense(o: SealOptions, sector: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let img = sparse_image(8, sector, &mut rng);
    let d = data_sectors(&img, sector);
    assert!(d > 0 && d < img.len() as u64 / sector as u64, "not sparse");
    let s = SimStorage::new(img.clone());
    seal(&s, &o, &NoProgress).unwrap();
    check_dense(&s, &img, sector, "crash image");
    crash_everywhere_on(&img, &o, &mut rng);
}

#[test]
fn crash_or_fault_at_every_step_loses_nothing_dense_placement() {
    crash_everywhere_dense(dense(secure(PlacementKind::Feistel, 512, 0)), 512, 134);
    crash_everywhere_dense(
        with_strategy(dense(secure(PlacementKind::Patent, 4096, 50)), "window", 1),
        4096,
        135,
    );
    crash_everywhere_dense(
        with_strategy(dense(secure(PlacementKind::Feistel, 512, 25)), "direct", 1),
        512,
        136,
    );
}

#[test]
fn repeated_crashes_during_recovery_lose_nothing_dense_placement() {
    let o = with_strategy(dense(secure(PlacementKind::Feistel, 512, 0)), "window", 1);
    let mut rng = StdRng::seed_from_u64(137);
    let img = sparse_image(10, 512, &mut rng);
    let total = steps_of(&img, &o, false) + steps_of(&img, &o, true);
    for round in 0..100 {
        let mut s = SimStorage::new(img.clone());
        for _ in 0..4 {
            s.arm(rng.gen_range(1..total), Fault::Crash);
            let _ = if rng.gen_bool(0.5) {
                seal(&s, &o, &NoProgress).map(|_| ())
            } else {
                unseal_with(&s, Some(&master()), &NoProgress, 1).map(|_| ())
            };
            s = s.power_loss(&mut rng);
        }
        let _ = seal(&s, &o, &NoProgress);
        if s.record().is_some() {
            assert_eq!(record(&s).unwrap().phase, Phase::Sealed, "round {round}");
            unseal_with(&s, Some(&master()), &NoProgress, 1).unwrap();
        }
        assert!(s.image() == img, "round {round}: data lost");
        assert_eq!(s.thin_count(), 0);
    }
}
