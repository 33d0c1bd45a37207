//! SIGKILL a real `pdguard` at 50 random moments spread over every pass of seal and
//! unseal; after each, the next `seal` or `unseal` finishes or rolls the job back, and the
//! image unseals to the original bytes every time.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
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

fn spawn(cmd: &str, img: &Path, extra: &[&str]) -> Child {
    Command::new(bin())
        .args(["image", cmd, s(img), "--quiet"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// How long each phase lasts, measured by polling the record during one full run.
fn calibrate(cmd: &str, img: &Path, extra: &[&str], windows: &mut BTreeMap<String, Duration>) {
    let rec = record_of(img);
    let mut child = spawn(cmd, img, extra);
    let mut last: Option<(String, Instant)> = None;
    loop {
        let now = phase(&rec);
        let done = child.try_wait().unwrap().is_some();
        if now.as_ref() != last.as_ref().map(|l| &l.0) || done {
            if let Some((p, t0)) = last.take() {
                windows.insert(p, t0.elapsed());
            }
            last = now.map(|p| (p, Instant::now()));
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    assert!(child.wait().unwrap().success());
}

/// Start `cmd`, wait until the record reaches `target`, sleep a random part of that
/// phase's measured length, SIGKILL. Returns the phase the record was in after the kill,
/// or `None` if the process had already finished (no kill happened).
fn kill_during(
    cmd: &str,
    img: &Path,
    extra: &[&str],
    target: &str,
    window: Duration,
    rng: &mut impl Rng,
) -> Option<String> {
    let rec = record_of(img);
    let mut child = spawn(cmd, img, extra);
    let deadline = Instant::now() + Duration::from_secs(60);
    while phase(&rec).as_deref() != Some(target) {
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    std::thread::sleep(window.mul_f64(rng.gen_range(0.0..1.0)));
    if child.try_wait().unwrap().is_some() {
        return None;
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    if status.signal() != Some(9) {
        return None;
    }
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
    kill_test_on(&img, &["--key-file", s(&key), "--keep-holes"], &k);
}

/// `seal_args` go to every seal, `unseal_args` to every unseal.
fn kill_test(dir: &Path, seal_args: &[&str], unseal_args: &[&str]) {
    let img = dir.join("disk.img");
    tagged_image(&img, 32 * 2048, 512, 5); // 32 MiB
    kill_test_on(&img, seal_args, unseal_args);
}

fn kill_test_on(img: &Path, seal_args: &[&str], unseal_args: &[&str]) {
    let img = img.to_path_buf();
    let original = (digest(&img), data_ranges(&img));
    let mut windows = BTreeMap::new();
    calibrate("seal", &img, seal_args, &mut windows);
    calibrate("unseal", &img, unseal_args, &mut windows);
    assert_original(&img, &original, "calibration");
    for p in PHASES {
        assert!(windows.contains_key(p), "phase {p} never seen: {windows:?}");
    }
    eprintln!("phase lengths: {windows:?}");

    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    let mut cycle = 0usize;
    while total < KILLS {
        assert!(cycle < 3 * KILLS, "too few kills landed: {kills:?}");
        let ctx = format!("cycle {cycle}");
        // Kill a seal in scatter or gather, then resume it — or, every third cycle, roll
        // it back with unseal and check the original is there before sealing again.
        let target = PHASES[cycle % 2];
        if let Some(p) = kill_during("seal", &img, seal_args, target, windows[target], &mut rng) {
            *kills.entry(format!("seal/{p}")).or_default() += 1;
            total += 1;
        }
        if cycle % 3 == 2 {
            run_ok("unseal", &img, unseal_args, "is not sealed");
            assert_original(&img, &original, &ctx);
        }
        run_ok("seal", &img, seal_args, "already sealed");
        assert_eq!(phase(&record_of(&img)).as_deref(), Some("sealed"), "{ctx}");

        // Kill an unseal in scatter or gather, then resume it — or roll it back with seal.
        let target = PHASES[2 + (cycle / 2) % 2];
        if let Some(p) = kill_during(
            "unseal",
            &img,
            unseal_args,
            target,
            windows[target],
            &mut rng,
        ) {
            *kills.entry(format!("unseal/{p}")).or_default() += 1;
            total += 1;
        }
        if cycle % 3 == 1 {
            run_ok("seal", &img, seal_args, "already sealed");
            assert_eq!(phase(&record_of(&img)).as_deref(), Some("sealed"), "{ctx}");
        }
        run_ok("unseal", &img, unseal_args, "is not sealed");
        assert_original(&img, &original, &ctx);
        cycle += 1;
    }
    eprintln!("{total} kills over {cycle} cycles, by command/phase at the kill: {kills:?}");
    for p in PHASES {
        let hits: usize = kills
            .iter()
            .filter(|(k, _)| k.ends_with(p))
            .map(|(_, v)| v)
            .sum();
        assert!(hits >= 3, "phase {p} was hit only {hits} times: {kills:?}");
    }
}
