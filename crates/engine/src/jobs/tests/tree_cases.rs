//! The region digest tree (issue 18, item 2, first step): recorded at seal time, checked
//! region by region by the unseal and by `verify` with the key, refused before any write
//! when its file is damaged, and absent from old records, which unseal as before.

use super::*;
use pdguard_core::keys;
use pdguard_core::region_tree::{RegionHasher, RegionKeys, RegionLayout, REGION_BYTES};

const R: usize = REGION_BYTES as usize;

/// 3.5 MiB of tagged sectors: four regions, the last one short.
fn image(rng: &mut StdRng) -> Vec<u8> {
    tagged_image((3 * R + R / 2) as u64 / 512, 512, rng)
}

/// [`image`] with holes: region 1 is all holes, and 4 KiB blocks of the others too.
fn holey(rng: &mut StdRng) -> Vec<u8> {
    let mut img = image(rng);
    img[R..2 * R].fill(0);
    for (k, block) in img.chunks_mut(4096).enumerate() {
        if k % 3 == 1 {
            block.fill(0);
        }
    }
    img
}

/// Every profile and placement, dense or not, both strategies.
fn cases() -> Vec<(&'static str, SealOptions, bool)> {
    let dense = |o: SealOptions| SealOptions {
        keep_holes: true,
        ..o
    };
    vec![
        ("patent/patent", opts(PlacementKind::Patent, 512, 0), false),
        (
            "patent/feistel direct",
            with_strategy(opts(PlacementKind::Feistel, 512, 10), "direct", 1),
            false,
        ),
        (
            "secure/feistel",
            secure(PlacementKind::Feistel, 512, 0),
            false,
        ),
        (
            "secure/patent direct",
            with_strategy(secure(PlacementKind::Patent, 4096, 0), "direct", 1),
            false,
        ),
        (
            "secure/feistel dense",
            dense(secure(PlacementKind::Feistel, 512, 0)),
            true,
        ),
        (
            "secure/patent dense slack direct",
            with_strategy(dense(secure(PlacementKind::Patent, 512, 25)), "direct", 1),
            true,
        ),
    ]
}

/// A test image: with holes (a dense seal's case) or random throughout.
fn test_image(rng: &mut StdRng, holes: bool) -> Vec<u8> {
    if holes {
        holey(rng)
    } else {
        image(rng)
    }
}

/// `img` sealed with `o` in a simulated store.
fn sealed(img: &[u8], o: &SealOptions) -> SimStorage {
    let s = SimStorage::new(img.to_vec());
    seal(&s, o, &NoProgress).unwrap();
    s
}

fn key(o: &SealOptions) -> Option<&MasterKey> {
    o.master_key.as_ref()
}

/// Write a record with `edit` applied, its MAC recomputed with the master key (so only
/// the edit differs: what an old pdguard would have written).
fn rewrite(s: &SimStorage, o: &SealOptions, edit: impl FnOnce(&mut SealRecord)) {
    let mut rec = record(s).unwrap();
    edit(&mut rec);
    let mac = key(o).map(|k| keys::record_mac_key(k, &rec.seal_id));
    s.write_record(&rec.encode_with_mac(mac.as_deref()))
        .unwrap();
}

#[test]
fn the_region_tree_is_recorded_and_every_seal_round_trips() {
    let mut rng = StdRng::seed_from_u64(180);
    for (what, o, holes) in cases() {
        let img = test_image(&mut rng, holes);
        let s = sealed(&img, &o);
        let rec = record(&s).unwrap();
        assert_eq!(rec.version, 4, "{what}");
        assert_eq!(rec.dense.is_some(), holes, "{what}");
        let t = rec
            .region_tree
            .clone()
            .unwrap_or_else(|| panic!("{what}: no tree"));
        assert_eq!((t.region_bytes, t.regions), (R as u64, 4), "{what}");
        let file = s.tree().unwrap_or_else(|| panic!("{what}: no tree file"));
        assert_eq!(file.len(), 36 + 4 * 32 + 32, "{what}");
        if o.profile == Profile::Patent {
            // Unkeyed: the root of the plaintext, computed here from the image alone.
            let layout = RegionLayout::new(R as u64, img.len() as u64).unwrap();
            let mut h = RegionHasher::new(layout, RegionKeys::new(None));
            h.update(&img);
            assert_eq!(hex::encode(h.finish().unwrap().1), t.root, "{what}");
        }
        // `verify` with the key reads every region from its sealed places through the
        // read path's address map (not the passes) and checks it against its leaf: this
        // holds the dense seal's leaves to the original's coordinates.
        verify(&s, key(&o), &NoProgress).unwrap_or_else(|e| panic!("{what}: verify: {e}"));
        let r = unseal(&s, key(&o), &NoProgress).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.outcome, Outcome::Unsealed, "{what}");
        assert!(s.image() == img, "{what}: not bit-exact");
        assert!(
            s.record().is_none() && s.tree().is_none(),
            "{what}: left behind"
        );
        assert_eq!(s.thin_count(), 0, "{what}");
    }
}

/// A sealed sector that holds data, away from the sampled fingerprint sectors.
fn victim(s: &SimStorage) -> u64 {
    let rec = record(s).unwrap();
    let placed = rec.dense.as_ref().map_or(rec.sectors, |d| d.sectors);
    let sampled = pdguard_core::fingerprint_sectors(rec.sectors);
    let sealed = s.image();
    (placed / 3..placed)
        .find(|j| {
            let at = *j as usize * rec.sector_size as usize;
            !sampled.contains(j)
                && sealed[at..at + rec.sector_size as usize]
                    .iter()
                    .any(|&b| b != 0)
        })
        .unwrap()
}

/// The region a message names, `region N (bytes A..B)`.
fn named_region(message: &str) -> u64 {
    let at = message
        .find("region ")
        .unwrap_or_else(|| panic!("no region named: {message}"));
    let rest = &message[at + 7..];
    assert!(
        rest.contains("does not match the seal's digest tree"),
        "{message}"
    );
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_corrupted_sealed_sector_fails_the_unseal_naming_its_region() {
    let mut rng = StdRng::seed_from_u64(181);
    for (what, o, holes) in cases() {
        let img = test_image(&mut rng, holes);
        let s = SimStorage::new(img);
        seal(&s, &o, &NoProgress).unwrap();
        let sector = u64::from(record(&s).unwrap().sector_size);
        let j = victim(&s);
        let disk = s.open_image(true).unwrap();
        let mut b = [0u8; 1];
        disk.read_at(&mut b, j * sector + 20).unwrap();
        disk.write_at(&[b[0] ^ 0x10], j * sector + 20).unwrap();
        drop(disk);
        let tampered = s.image();
        let rec_before = s.record();
        // The patent profile does not encrypt: the sealed sector still carries the tag of
        // the plaintext sector it holds, so its region is known here independently.
        let expected = (o.profile == Profile::Patent).then(|| {
            let at = (j * sector) as usize;
            let i = u64::from_le_bytes(tampered[at..at + 8].try_into().unwrap());
            i * sector / R as u64
        });
        let e = unseal(&s, key(&o), &NoProgress).unwrap_err();
        assert!(e.is_verification(), "{what}: {e}");
        let region = named_region(&e.to_string());
        if let Some(want) = expected {
            assert_eq!(region, want, "{what}: {e}");
        }
        // Never declared unsealed: the sealed image and its record are back as they were.
        assert!(
            s.image() == tampered,
            "{what}: the sealed image was not put back"
        );
        assert_eq!(s.record(), rec_before, "{what}");
        assert_eq!(record(&s).unwrap().phase, Phase::Sealed, "{what}");
        assert_eq!(s.thin_count(), 0, "{what}");
        // `verify` with the key (the patent profile needs none) names the same region,
        // found another way (the read path's address map); without the key in the secure
        // profile only the sealed digest is compared.
        let e = verify(&s, key(&o), &NoProgress).unwrap_err();
        assert!(e.is_verification(), "{what}: {e}");
        assert_eq!(named_region(&e.to_string()), region, "{what}: verify: {e}");
        if o.profile == Profile::Secure {
            let e = verify(&s, None, &NoProgress).unwrap_err().to_string();
            assert!(e.contains("BLAKE3 digest"), "{what}: {e}");
        }
    }
}

#[test]
fn a_damaged_edited_swapped_or_missing_tree_is_refused_before_any_write() {
    let mut rng = StdRng::seed_from_u64(182);
    for (what, o, holes) in cases() {
        let img = test_image(&mut rng, holes);
        let s = sealed(&img, &o);
        // A seal of another image of the same size: a tree of the same geometry, another
        // root. (Another seal of the same image in the patent profile has the same tree:
        // unkeyed leaves of the same plaintext.)
        let other = SimStorage::new(test_image(&mut rng, holes));
        seal(&other, &o, &NoProgress).unwrap();
        let good = s.tree().unwrap();
        let with_sum = |mut t: Vec<u8>| {
            let n = t.len() - 32;
            let sum = blake3::hash(&t[..n]);
            t[n..].copy_from_slice(sum.as_bytes());
            t
        };
        let mut leaf_flipped = good.clone();
        leaf_flipped[36 + 32 + 5] ^= 1;
        let mut magic = good.clone();
        magic[0] = b'X';
        let tampers: Vec<(&str, Option<Vec<u8>>)> = vec![
            ("a leaf flipped", Some(leaf_flipped.clone())),
            (
                "a leaf edited, checksum fixed",
                Some(with_sum(leaf_flipped)),
            ),
            ("truncated", Some(good[..good.len() - 40].to_vec())),
            ("empty (a torn create)", Some(Vec::new())),
            ("not a tree", Some(magic)),
            ("swapped from another seal", other.tree()),
            ("missing", None),
        ];
        for (how, tree) in tampers {
            s.set_tree(tree.clone());
            let before = (
                s.image(),
                s.record(),
                s.key_slot(),
                s.tree(),
                s.thin_count(),
            );
            let written = s.image_written_bytes();
            let e = unseal(&s, key(&o), &NoProgress)
                .map(|r| r.outcome)
                .expect_err(&format!("{what}, tree {how}"));
            assert!(e.is_verification(), "{what}, tree {how}: {e}");
            assert!(e.to_string().contains("tree"), "{what}, tree {how}: {e}");
            let after = (
                s.image(),
                s.record(),
                s.key_slot(),
                s.tree(),
                s.thin_count(),
            );
            assert!(after == before, "{what}, tree {how}: something was touched");
            assert_eq!(s.image_written_bytes(), written, "{what}, tree {how}");
            if key(&o).is_some() || o.profile == Profile::Patent {
                let e = verify(&s, key(&o), &NoProgress).unwrap_err();
                assert!(e.is_verification(), "{what}, tree {how}: verify: {e}");
            }
        }
        s.set_tree(Some(good));
        unseal(&s, key(&o), &NoProgress).unwrap();
        assert!(s.image() == img, "{what}");
    }
}

#[test]
fn a_record_without_a_region_tree_unseals_as_before() {
    let mut rng = StdRng::seed_from_u64(183);
    for (what, o, holes) in cases() {
        let img = test_image(&mut rng, holes);
        let s = sealed(&img, &o);
        // As a pdguard of before the tree wrote it: no field, no file.
        rewrite(&s, &o, |r| r.region_tree = None);
        s.set_tree(None);
        verify(&s, key(&o), &NoProgress).unwrap_or_else(|e| panic!("{what}: {e}"));
        unseal(&s, key(&o), &NoProgress).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(s.image() == img, "{what}");
        // A damaged one is still caught, by the whole-image digests.
        let s = sealed(&img, &o);
        rewrite(&s, &o, |r| r.region_tree = None);
        s.set_tree(None);
        let j = victim(&s);
        let sector = u64::from(o.sector_size);
        s.open_image(true)
            .unwrap()
            .write_at(&[0x77; 3], j * sector + 40)
            .unwrap();
        let e = unseal(&s, key(&o), &NoProgress).unwrap_err();
        assert!(e.is_verification(), "{what}: {e}");
        assert!(e.to_string().contains("BLAKE3 digest"), "{what}: {e}");
    }
}

#[test]
fn the_root_and_region_count_are_covered_by_the_record_mac() {
    let mut rng = StdRng::seed_from_u64(184);
    let o = secure(PlacementKind::Feistel, 512, 0);
    let s = SimStorage::new(image(&mut rng));
    seal(&s, &o, &NoProgress).unwrap();
    let bytes = s.record().unwrap();
    for edit in [
        |r: &mut SealRecord| {
            if let Some(t) = r.region_tree.as_mut() {
                t.root = "00".repeat(32);
            }
        },
        |r: &mut SealRecord| r.region_tree = None,
    ] {
        let mut rec = record(&s).unwrap();
        edit(&mut rec);
        // The checksum is right, the MAC is the genuine record's.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let mac = text.lines().next().unwrap().split(' ').nth(3).unwrap();
        let forged = String::from_utf8(rec.encode()).unwrap();
        let (head, body) = forged.split_once('\n').unwrap();
        let head = head.replace(" -", &format!(" {mac}"));
        s.write_record(format!("{head}\n{body}").as_bytes())
            .unwrap();
        let before = s.image();
        let e = unseal(&s, key(&o), &NoProgress).unwrap_err();
        assert!(
            matches!(
                &e,
                JobError::Record {
                    source: pdguard_core::RecordError::Unauthenticated(_),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(s.image() == before);
    }
}

/// The unseal's gather checks each region as it produces it: a thin disk damaged between
/// the scatter (whose sealed digest was right) and the gather is caught there, named, and
/// the image is never declared unsealed.
#[test]
fn a_thin_disk_damaged_before_the_gather_fails_naming_the_region() {
    let mut rng = StdRng::seed_from_u64(185);
    for (what, o, holes) in cases() {
        let img = test_image(&mut rng, holes);
        // An I/O error late in the gather leaves the record in unseal-gather: the last
        // steps of an unseal are its gather's last writes, then the record and cleanup.
        let steps = {
            let s = sealed(&img, &o);
            let before = s.steps();
            unseal(&s, key(&o), &NoProgress).unwrap();
            s.steps() - before
        };
        let s = (1..steps)
            .rev()
            .find_map(|step| {
                let s = sealed(&img, &o);
                s.arm(step, Fault::Eio);
                let r = unseal(&s, key(&o), &NoProgress);
                s.disarm();
                let gathering = record(&s).is_some_and(|r| r.phase == Phase::UnsealGather);
                (r.is_err() && gathering && s.image_written_bytes() > 0).then_some(s)
            })
            .unwrap();
        let rec = record(&s).unwrap();
        let sector = u64::from(rec.sector_size);
        let thin = s.open_thin(&rec.seal_id).unwrap().unwrap();
        let mut all = vec![0u8; thin.len() as usize];
        thin.read_at(&mut all, 0).unwrap();
        // A slot holding data, in the middle of the thin disk.
        let slot = (all.len() as u64 / sector / 2..)
            .find(|k| {
                all[(k * sector) as usize..((k + 1) * sector) as usize]
                    .iter()
                    .any(|&b| b != 0)
            })
            .unwrap();
        let at = slot * sector;
        let expected = (o.profile == Profile::Patent).then(|| {
            let i = u64::from_le_bytes(all[at as usize..at as usize + 8].try_into().unwrap());
            i * sector / R as u64
        });
        thin.write_at(&[all[at as usize + 30] ^ 1], at + 30)
            .unwrap();
        drop(thin);
        let e = unseal(&s, key(&o), &NoProgress).unwrap_err();
        assert!(e.is_verification(), "{what}: {e}");
        let region = named_region(&e.to_string());
        if let Some(want) = expected {
            assert_eq!(region, want, "{what}: {e}");
        }
        let rec = record(&s).unwrap();
        assert_eq!(rec.phase, Phase::Sealed, "{what}: {e}");
        assert!(s.image() != img, "{what}: declared unsealed");
    }
}
