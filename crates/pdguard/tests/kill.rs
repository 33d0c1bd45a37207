//! SIGKILL a real `pdguard` at 50 random moments spread over every pass of seal and
//! unseal; after each, the next `seal` or `unseal` finishes or rolls the job back, and the
//! image unseals to the original bytes every time.
//!
//! Each moment is a random byte offset of a chosen pass: the binary's test hook
//! (`PDGUARD_TEST_PAUSE_AT`, see `src/cli/testhook.rs`) stops the job there and the test
//! kills it, so every pass gets its share of kills however loaded the machine is. The
//! random seed is printed; `PDGUARD_KILL_SEED=N` replays a run.
//!
//! The same for an instant reclaim's migration (`docs/instant-reclaim.md`, section 7),
//! driven offline by `image unseal --instant` and resumed by `image unseal`: killed at
//! random bytes of its pass `migrate` (evacuation and move windows).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Range;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const KILLS: usize = 50;
const PHASES: [&str; 4] = [
    "seal-scatter",
    "seal-gather",
    "unseal-scatter",
    "unseal-gather",
];

/// The phase in the record now (`None`: no record).
fn phase(rec: &Path) -> Option<String> {
    let bytes = std::fs::read(rec).ok()?;
    let text = String::from_utf8(bytes).unwrap();
    let body = text.split_once('\n').unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    Some(v["phase"].as_str().unwrap().to_string())
}

/// Start `pdguard image CMD IMG`, paused by the test hook (`PDGUARD_TEST_PAUSE_AT`) in
/// pass `pass` once it has moved `at` bytes; it creates `pause_file` when it stops there.
fn spawn_paused(
    cmd: &str,
    img: &Path,
    extra: &[&str],
    pass: &str,
    at: u64,
    pause_file: &Path,
) -> Child {
    Command::new(bin())
        .args(["image", cmd, s(img), "--quiet"])
        .args(extra)
        .env_remove("PDGUARD_KEY_FILE")
        .env("PDGUARD_TEST_PAUSE_AT", format!("{pass}:{at}"))
        .env("PDGUARD_TEST_PAUSE_FILE", pause_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Run `cmd` until it stops in pass `target` (`seal-scatter`, ...) after `at` bytes, then
/// SIGKILL it there. Deterministic: the kill lands at that byte of that pass whatever the
/// machine's load. Returns the phase the record was in after the kill.
fn kill_at(cmd: &str, img: &Path, extra: &[&str], target: &str, at: u64) -> String {
    let pass = target.split_once('-').unwrap().1;
    kill_in_pass(cmd, img, extra, pass, at)
        .unwrap_or_else(|| panic!("{cmd} ended before pausing in {target} at byte {at}"))
}

/// Run `cmd` until it stops in pass `pass` after `at` bytes and SIGKILL it there: the phase
/// the record was in after the kill. `None` when `cmd` ended well (exit 0) before moving
/// that many bytes in that pass (it had fewer to move); any other end fails the test.
fn kill_in_pass(cmd: &str, img: &Path, extra: &[&str], pass: &str, at: u64) -> Option<String> {
    let rec = record_of(img);
    let pause = img.with_extension("paused");
    let _ = std::fs::remove_file(&pause);
    let mut child = spawn_paused(cmd, img, extra, pass, at, &pause);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pause.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(
                st.success(),
                "{cmd} ended ({st}) before pausing in {pass} at byte {at}"
            );
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd} never paused in {pass} at byte {at}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{cmd} was not killed: {status}");
    std::fs::remove_file(&pause).unwrap();
    Some(phase(&rec).unwrap_or_else(|| "none".into()))
}

fn run_ok(cmd: &str, img: &Path, extra: &[&str], also_ok: &str) {
    let mut args = vec!["image", cmd, s(img), "--quiet"];
    args.extend_from_slice(extra);
    let o = pdguard(&args);
    let err = stderr(&o);
    assert!(
        code(&o) == 0 || (code(&o) == 1 && err.contains(also_ok)),
        "{cmd} after a kill failed ({}): {err}",
        code(&o)
    );
}

fn assert_original(img: &Path, want: &(String, Vec<Range<u64>>), ctx: &str) {
    assert_eq!(
        digest(img),
        want.0,
        "{ctx}: image differs from the original"
    );
    assert_eq!(
        data_ranges(img),
        want.1,
        "{ctx}: holes differ from the original's"
    );
    assert!(!record_of(img).exists(), "{ctx}: record left behind");
    let mut tree = record_of(img).into_os_string();
    tree.push(".tree");
    assert!(
        !Path::new(&tree).exists(),
        "{ctx}: region digest tree left behind"
    );
    let dir = img.parent().unwrap();
    let thin = dir
        .read_dir()
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".pdguard-thin")
        })
        .count();
    assert_eq!(thin, 0, "{ctx}: thin disk left behind");
    for file in ["evacuation", "moved"] {
        let mut path = record_of(img).into_os_string();
        path.push(format!(".{file}"));
        assert!(!Path::new(&path).exists(), "{ctx}: {file} file left behind");
    }
}

#[test]
fn sigkill_at_50_moments_over_every_pass_loses_nothing_patent_profile() {
    let dir = tempfile::tempdir().unwrap();
    kill_test(dir.path(), &["--profile", "patent"], &[]);
}

#[test]
fn sigkill_at_50_moments_over_every_pass_loses_nothing_secure_profile() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let k = ["--key-file", s(&key)];
    kill_test(dir.path(), &k, &k);
}

/// Dense placement (`--keep-holes`) on a sparse image: 32 MiB of data in 16 extents of a
/// 128 MiB file; after every recovery the holes are the original's too.
#[test]
fn sigkill_at_50_moments_over_every_pass_loses_nothing_dense_placement() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(128 << 20).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut buf = vec![0u8; 2 << 20];
    for k in 0..16u64 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, (8 * k + 3) << 20).unwrap();
    }
    f.sync_all().unwrap();
    let k = ["--key-file", s(&key)];
    // Every pass moves at least the 32 MiB of data: kill within it.
    kill_test_on(&img, 32 << 20, &["--key-file", s(&key), "--keep-holes"], &k);
}

/// Where in a pass of `bytes` to kill: a random byte, or, one time in five, its very end
/// (every byte moved, the sync and the record's phase change not yet done).
fn kill_byte(rng: &mut impl Rng, bytes: u64) -> u64 {
    if rng.gen_bool(0.2) {
        bytes
    } else {
        rng.gen_range(0..bytes)
    }
}

/// `seal_args` go to every seal, `unseal_args` to every unseal.
fn kill_test(dir: &Path, seal_args: &[&str], unseal_args: &[&str]) {
    let img = dir.join("disk.img");
    tagged_image(&img, 32 * 2048, 512, 5); // 32 MiB
    let bytes = std::fs::metadata(&img).unwrap().len();
    kill_test_on(&img, bytes, seal_args, unseal_args);
}

/// Kill seals and unseals of `img` at random bytes below `bytes` of each pass.
fn kill_test_on(img: &Path, bytes: u64, seal_args: &[&str], unseal_args: &[&str]) {
    let img = img.to_path_buf();
    let original = (digest(&img), data_ranges(&img));
    let seed = match std::env::var("PDGUARD_KILL_SEED") {
        Ok(v) => v.parse().expect("PDGUARD_KILL_SEED is a u64"),
        Err(_) => rand::random(),
    };
    // Straight to the process's stderr, past the test harness's capture: a passing run's
    // log carries the seed too, so that a run that passed once can be replayed.
    let _ = writeln!(
        std::io::stderr(),
        "kill test seed {seed} (replay with PDGUARD_KILL_SEED={seed})"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    for cycle in 0..KILLS / 2 {
        let ctx = format!("seed {seed}, cycle {cycle}");
        // Kill a seal in scatter or gather at a random byte, then resume it — or, every
        // third cycle, roll it back with unseal and check the original is there before
        // sealing again.
        let target = PHASES[cycle % 2];
        let at = kill_byte(&mut rng, bytes);
        let p = kill_at("seal", &img, seal_args, target, at);
        assert_eq!(p, target, "{ctx}: killed at byte {at} of {target}");
        *kills.entry(format!("seal/{p}")).or_default() += 1;
        if cycle % 3 == 2 {
            run_ok("unseal", &img, unseal_args, "is not sealed");
            assert_original(&img, &original, &ctx);
        }
        run_ok("seal", &img, seal_args, "already sealed");
        assert_eq!(phase(&record_of(&img)).as_deref(), Some("sealed"), "{ctx}");

        // Kill an unseal in scatter or gather, then resume it — or roll it back with seal.
        let target = PHASES[2 + (cycle / 2) % 2];
        let at = kill_byte(&mut rng, bytes);
        let p = kill_at("unseal", &img, unseal_args, target, at);
        assert_eq!(p, target, "{ctx}: killed at byte {at} of {target}");
        *kills.entry(format!("unseal/{p}")).or_default() += 1;
        if cycle % 3 == 1 {
            run_ok("seal", &img, seal_args, "already sealed");
            assert_eq!(phase(&record_of(&img)).as_deref(), Some("sealed"), "{ctx}");
        }
        run_ok("unseal", &img, unseal_args, "is not sealed");
        assert_original(&img, &original, &ctx);
    }
    eprintln!("{KILLS} kills, by command/phase at the kill: {kills:?}");
    for p in PHASES {
        let hits: usize = kills
            .iter()
            .filter(|(k, _)| k.ends_with(p))
            .map(|(_, v)| v)
            .sum();
        assert!(hits >= 3, "phase {p} was hit only {hits} times: {kills:?}");
    }
}

/// Cycles of an instant reclaim's migration: seal, `unseal --instant` killed at a random
/// byte of pass `migrate`, resume; every other time the resume is killed too (at a random
/// byte, or at the start of its end, pass `migrate-end`).
const MIGRATION_CYCLES: usize = 8;

/// An instant reclaim's migration driven offline (`image unseal --instant`), in windows of
/// 4 MiB (`--memory 8M`): SIGKILLed at a random byte of its evacuation and move windows
/// (pass `migrate`, each evacuated and each moved byte counted), resumed by `image unseal`
/// (killed again at a random byte every other time), and bit-exact every time.
#[test]
fn sigkill_in_an_instant_reclaims_migration_loses_nothing_patent_profile() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 32 * 2048, 512, 6); // 32 MiB
                                           // Evacuated, then moved: 64 MiB in the pass.
    migration_kill_test(&img, 64 << 20, &["--profile", "patent"], &[]);
}

#[test]
fn sigkill_in_an_instant_reclaims_migration_loses_nothing_secure_profile() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("disk.img");
    tagged_image(&img, 32 * 2048, 512, 7); // 32 MiB
    let k = ["--key-file", s(&key)];
    migration_kill_test(&img, 64 << 20, &k, &k);
}

/// Dense placement (`--keep-holes`): 16 MiB of data in 8 extents of a 64 MiB file; the
/// regions past the dense region start `evacuated` and are only moved; the original's
/// holes come back.
#[test]
fn sigkill_in_an_instant_reclaims_migration_loses_nothing_dense_placement() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut buf = vec![0u8; 2 << 20];
    for k in 0..8u64 {
        rng.fill(&mut buf[..]);
        f.write_all_at(&buf, (8 * k + 3) << 20).unwrap();
    }
    f.sync_all().unwrap();
    let k = ["--key-file", s(&key)];
    // The pass copies the 16 MiB of data twice, and moves the other 48 MiB once.
    migration_kill_test(&img, 80 << 20, &["--key-file", s(&key), "--keep-holes"], &k);
}

/// Seal `img`, kill its migration at a random byte below `bytes` of pass `migrate`, resume
/// (and, every other cycle, kill the resumed migration too), check the original is back.
fn migration_kill_test(img: &Path, bytes: u64, seal_args: &[&str], unseal_args: &[&str]) {
    let original = (digest(img), data_ranges(img));
    let seed = match std::env::var("PDGUARD_KILL_SEED") {
        Ok(v) => v.parse().expect("PDGUARD_KILL_SEED is a u64"),
        Err(_) => rand::random(),
    };
    let _ = writeln!(
        std::io::stderr(),
        "migration kill test seed {seed} (replay with PDGUARD_KILL_SEED={seed})"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let window = ["--memory", "8M"];
    let instant: Vec<&str> = [unseal_args, &window, &["--instant"]].concat();
    let resume: Vec<&str> = [unseal_args, &window].concat();
    let (mut kills, mut resumed_to_end) = (0, 0);
    for cycle in 0..MIGRATION_CYCLES {
        let ctx = format!("seed {seed}, cycle {cycle}");
        run_ok("seal", img, seal_args, "already sealed");
        assert_eq!(phase(&record_of(img)).as_deref(), Some("sealed"), "{ctx}");
        let at = kill_byte(&mut rng, bytes);
        let p = kill_in_pass("unseal", img, &instant, "migrate", at);
        assert_eq!(
            p.as_deref(),
            Some("migrating"),
            "{ctx}: killed at byte {at}"
        );
        kills += 1;
        if cycle % 2 == 1 {
            // The resumed migration has fewer bytes left: it may end before the byte. One
            // time in two it is killed at its end instead: every region moved, the record
            // still `migrating`.
            let (pass, again) = match cycle % 4 {
                3 => ("migrate-end", 0),
                _ => ("migrate", rng.gen_range(0..bytes / 2)),
            };
            match kill_in_pass("unseal", img, &resume, pass, again) {
                Some(p) => {
                    assert_eq!(p, "migrating", "{ctx}: resume killed in {pass} at {again}");
                    kills += 1;
                }
                None => resumed_to_end += 1,
            }
        }
        if phase(&record_of(img)).is_some() {
            // `seal` is refused on a migrating record, naming the fix, and changes nothing.
            let o = pdguard(&[&["image", "seal", s(img), "--quiet"], seal_args].concat());
            assert_eq!(
                code(&o),
                1,
                "{ctx}: seal of a migrating image: {}",
                stderr(&o)
            );
            assert!(
                stderr(&o).contains("pdguard image unseal"),
                "{ctx}: {}",
                stderr(&o)
            );
            run_ok("unseal", img, &resume, "is not sealed");
        }
        assert_original(img, &original, &ctx);
    }
    eprintln!("{kills} kills of a migration; {resumed_to_end} resumes ended before their kill");
    assert!(kills >= MIGRATION_CYCLES, "only {kills} kills");
}
