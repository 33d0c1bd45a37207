//! One job per image, across processes (issue 9, item 2): while one `pdguard image` job
//! holds an image, a second one fails at once with exit 1 and one line
//! "busy: another pdguard job (pid N) holds IMG", and changes nothing; the first one
//! finishes and the image ends bit-exact.
//!
//! Deterministic: the first job is stopped inside its pass by the binary's test hook
//! (`PDGUARD_TEST_PAUSE_AT`, src/cli/testhook.rs) while the second one runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `pdguard image CMD IMG ARGS`, stopped in `pass` after `at` bytes until `pause` is
/// removed. Returns once it is stopped there (holding its lock).
fn start_paused(cmd: &str, img: &Path, args: &[&str], pass: &str, at: u64, pause: &Path) -> Child {
    let mut child = Command::new(bin())
        .args(["image", cmd, s(img), "--quiet"])
        .args(args)
        .env_remove("PDGUARD_KEY_FILE")
        .env("PDGUARD_TEST_PAUSE_AT", format!("{pass}:{at}"))
        .env("PDGUARD_TEST_PAUSE_FILE", pause)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pause.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{cmd} ended ({st}) before pausing");
        }
        assert!(Instant::now() < deadline, "{cmd} never paused");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

/// Let a paused job go on and check that it succeeds.
fn resume_ok(child: Child, pause: &Path) {
    std::fs::remove_file(pause).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Every other job on `img` is refused as busy, naming `pid`, and changes nothing.
fn others_are_busy(img: &Path, pid: u32, commands: &[&[&str]]) {
    for args in commands {
        let before = state(img);
        let mut a = vec!["image"];
        a.extend_from_slice(args);
        a.extend_from_slice(&[s(img), "--quiet"]);
        let o = pdguard(&a);
        let err = stderr(&o);
        assert_eq!(code(&o), 1, "{a:?}: {err}");
        let want = format!(
            "busy: another pdguard job (pid {pid}) holds {}",
            img.display()
        );
        assert!(err.contains(&want), "{a:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{a:?}: not one line: {err}"
        );
        assert_eq!(state(img), before, "{a:?} changed the image or its record");
    }
}

#[test]
fn seal_and_unseal_on_one_image_one_runs_the_other_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let pause = dir.path().join("paused");
    tagged_image(&img, 8 * 2048, 512, 9); // 8 MiB
    let original = digest(&img);
    let patent = ["--profile", "patent"];

    // A seal stopped half-way through its scatter: unseal, seal, verify are busy.
    let seal = start_paused("seal", &img, &patent, "scatter", 4 << 20, &pause);
    others_are_busy(
        &img,
        seal.id(),
        &[&["unseal"], &["seal", "--profile", "patent"], &["verify"]],
    );
    resume_ok(seal, &pause);
    assert_ne!(digest(&img), original);

    // An unseal stopped as its gather starts: seal, unseal, verify are busy.
    let unseal = start_paused("unseal", &img, &[], "gather", 0, &pause);
    others_are_busy(
        &img,
        unseal.id(),
        &[&["seal", "--profile", "patent"], &["unseal"], &["verify"]],
    );
    resume_ok(unseal, &pause);
    assert_eq!(digest(&img), original, "the image is not bit-exact");
    assert!(!record_of(&img).exists());
}

#[test]
fn a_verify_in_progress_keeps_jobs_out_but_lets_another_verify_run() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let pause = dir.path().join("paused");
    tagged_image(&img, 4 * 2048, 512, 10);
    let o = pdguard(&["image", "seal", s(&img), "--profile", "patent", "--quiet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let verify = start_paused("verify", &img, &[], "verify", 1 << 20, &pause);
    others_are_busy(&img, verify.id(), &[&["unseal"], &["shred", "--yes"]]);
    let o = pdguard(&["image", "verify", s(&img), "--quiet"]);
    assert_eq!(
        code(&o),
        0,
        "a second verify must run beside the first: {}",
        stderr(&o)
    );
    resume_ok(verify, &pause);
}
