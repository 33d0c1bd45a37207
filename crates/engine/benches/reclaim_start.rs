//! How long an instant reclaim's start takes with the seal's placement table
//! (`RECORD.place`, `docs/seal-record.md`) and without it (the record's `placement_table`
//! removed: the placement rebuilt as before the table existed), on a sparse image file
//! sealed in the patent profile, in `PDGUARD_BENCH_DIR` (default `target/bench-tmp`).
//! Configurations from `PDGUARD_MEASURE` (`GiB:sector:placement:slack_pct`,
//! comma-separated; default `4:512:patent:0`), e.g.
//!
//! `PDGUARD_MEASURE=4:512:patent:0,64:4096:feistel:10 cargo bench -p pdguard-engine --bench reclaim_start`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use pdguard_core::placement::PlacementKind;
use pdguard_core::{Profile, SealRecord};
use pdguard_engine::jobs::reclaim::{Migration, MigrationOptions};
use pdguard_engine::jobs::{load_tree_for_migration, seal, NoProgress, SealOptions};
use pdguard_engine::store::file::{default_record_path, ImageStorage};
use pdguard_engine::store::Storage;
use rand::{RngCore, SeedableRng};

fn bad<T>(one: &str) -> T {
    panic!("PDGUARD_MEASURE: {one:?} is not GiB:sector:placement:slack_pct")
}

fn main() {
    let spec = std::env::var("PDGUARD_MEASURE").unwrap_or_else(|_| "4:512:patent:0".into());
    let parent = std::env::var("PDGUARD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-tmp")
        });
    std::fs::create_dir_all(&parent).unwrap();
    for one in spec.split(',') {
        let f: Vec<&str> = one.split(':').collect();
        if f.len() != 4 {
            bad::<()>(one);
        }
        let gib: u64 = f[0].parse().unwrap_or_else(|_| bad(one));
        let sector: u32 = f[1].parse().unwrap_or_else(|_| bad(one));
        let placement = PlacementKind::from_name(f[2]).unwrap_or_else(|| bad(one));
        let slack: u32 = f[3].parse().unwrap_or_else(|_| bad(one));
        let dir = tempfile::tempdir_in(&parent).unwrap();
        let path = dir.path().join("m.img");
        {
            let mut file = std::fs::File::create(&path).unwrap();
            file.set_len(gib << 30).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(gib);
            let mut data = vec![0u8; 1 << 20];
            for at in [0, (gib << 30) / 2, (gib << 30) - (1 << 20)] {
                rng.fill_bytes(&mut data);
                file.seek(SeekFrom::Start(at)).unwrap();
                file.write_all(&data).unwrap();
            }
        }
        let storage = ImageStorage::new(path.clone(), default_record_path(&path), None);
        let opts = SealOptions {
            profile: Profile::Patent,
            sector_size: sector,
            placement: Some(placement),
            thin_slack_pct: slack,
            ..SealOptions::default()
        };
        let t = Instant::now();
        seal(&storage, &opts, &NoProgress).unwrap();
        let seal_s = t.elapsed().as_secs_f64();
        let table = std::fs::metadata(storage.place_path()).map_or(0, |m| m.len());
        let mopts = MigrationOptions {
            bulk: false,
            ..MigrationOptions::default()
        };
        let timed = |resume: bool| {
            let tree = load_tree_for_migration(&storage, None).unwrap();
            let t = Instant::now();
            let m = if resume {
                Migration::resume(&storage, None, tree, &mopts)
            } else {
                Migration::start(&storage, None, tree, &mopts)
            }
            .unwrap();
            (t.elapsed().as_secs_f64(), m.placement_from_table())
        };
        let (start_s, a) = timed(false);
        let (resume_s, b) = timed(true);
        let mut rec = SealRecord::decode(&storage.read_record().unwrap().unwrap()).unwrap();
        rec.placement_table = None;
        storage.write_record(&rec.encode()).unwrap();
        let (build_s, c) = timed(true);
        assert!(a && b && !c, "the table was not used as asked");
        println!(
            "{gib} GiB, {sector}-byte sectors, {placement:?}, slack {slack} %: seal {seal_s:.1} s, table {table} bytes; start from the table {start_s:.3} s, resume from it {resume_s:.3} s; resume rebuilding the placement (no table) {build_s:.3} s"
        );
    }
}
