//! What an operator meets first (issue 12, items 1, 3, 4 and 7): refusals that hold and
//! change nothing, a daemon that explains itself and stops cleanly, `disk wait` for
//! scripts, and `image unseal --force --output` when a sealed image is damaged.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A patent-profile daemon on STATE/pdguard.sock, with `extra` flags and `env`.
fn start(state: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let mut serve = Serve::new(state).profile("patent").args(extra);
    for (k, v) in env {
        serve = serve.env(k, v);
    }
    serve.start()
}

/// `disk wait DISK --state STATE --timeout 60s`, which must succeed.
fn wait(d: &Daemon, disk: &str, state: &str) {
    d.ok_text(&["disk", "wait", disk, "--state", state, "--timeout", "60s"]);
}

fn random_file(path: &Path, bytes: usize) {
    use rand::{Rng, SeedableRng};
    let mut v = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(rand::random()).fill(&mut v[..]);
    std::fs::write(path, v).unwrap();
}

// ---- refusals that hold, failures that change nothing ----

#[test]
fn a_bad_setting_stops_serve_at_start_with_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for (args, names) in [
        (&["--strategy", "foo"][..], "--strategy"),
        (&["--jobs", "0"][..], "--jobs"),
        (&["--sealed-io", "maybe"][..], "sealed-io"),
        (&["--profile", "both"][..], "profile"),
        (&["--grace", "abc"][..], "--grace"),
    ] {
        let o = Serve::new(&state).profile("patent").args(args).refused();
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
        if names == "--strategy" {
            assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
            assert!(err.contains("window, direct"), "no fix offered: {err}");
        }
        assert!(!state.exists(), "{args:?} created the state directory");
    }
    // A secure daemon whose key file is missing: refused at start, not at the first seal.
    let o = Serve::new(&state)
        .args(&["--key-file", s(&dir.path().join("no.key"))])
        .refused();
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("no.key"), "{}", stderr(&o));
}

/// A seal that failed for a reason that is gone (here: another process held the image's
/// lock) is retried when the daemon starts again.
#[test]
fn a_disk_that_failed_for_a_passing_reason_is_retried_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = dir.path().join("d1.img");
    let mut d = start(&state, &["--grace", "100ms"], &[]);
    d.ok_text(&["disk", "create", "d1", "--size", "1M", "--path", s(&img)]);
    random_file(&img, 1 << 20);
    let plain = digest(&img);
    let mut holder = Command::new("flock")
        .args(["--no-fork", "-x", s(&img), "sleep", "600"])
        .spawn()
        .expect("flock(1) from util-linux is needed by this test");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let held = Kill(&mut holder);
    std::thread::sleep(Duration::from_millis(200));
    d.ok_text(&["container", "up", "c1", "--disk", "d1"]);
    d.ok_text(&["container", "down", "c1", "--removed"]);
    // disk wait: a failed disk is exit 1 when waiting for another state.
    let o = d.cli(&[
        "disk",
        "wait",
        "d1",
        "--state",
        "sealed",
        "--timeout",
        "30s",
    ]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("failed"), "{}", stderr(&o));
    d.ok_text(&["disk", "wait", "d1", "--state", "failed", "--timeout", "1s"]);
    assert_eq!(digest(&img), plain, "a failed seal changed the image");
    assert_eq!(d.terminate(), 0);
    drop(held);
    let d = start(&state, &[], &[]);
    wait(&d, "d1", "sealed");
    assert!(d.log().contains("retrying"), "{}", d.log());
    assert_ne!(digest(&img), plain);
    d.ok_text(&["disk", "unseal", "d1"]);
    assert_eq!(digest(&img), plain);
}

#[test]
fn seal_of_a_shredded_image_is_refused_until_the_tombstone_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("i.img");
    random_file(&img, 256 << 10);
    let k = ["--key-file", s(&key)];
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&k);
        pdguard(&a)
    };
    assert_eq!(code(&run(&["image", "seal", s(&img)])), 0);
    assert_eq!(code(&run(&["image", "shred", s(&img), "--yes"])), 0);
    let before = state(&img);
    let o = run(&["image", "seal", s(&img)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let rm = format!("rm {}", s(&record_of(&img)));
    assert!(stderr(&o).contains("shred is final"), "{}", stderr(&o));
    assert!(stderr(&o).contains(&rm), "no way out named: {}", stderr(&o));
    assert_eq!(state(&img), before, "a refused seal changed something");
    // On purpose: remove the tombstone, then the image takes new data.
    std::fs::remove_file(record_of(&img)).unwrap();
    let o = run(&["image", "seal", s(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn verify_with_another_images_record_says_it_does_not_belong() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for p in [&a, &b] {
        random_file(p, 256 << 10);
        let o = pdguard(&["image", "seal", s(p), "--profile", "patent"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    std::fs::copy(record_of(&b), record_of(&a)).unwrap();
    let before = state(&a);
    for cmd in ["verify", "unseal"] {
        let o = pdguard(&["image", cmd, s(&a)]);
        assert_eq!(code(&o), 1, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("does not belong to image"),
            "{cmd}: {}",
            stderr(&o)
        );
        assert_eq!(state(&a), before, "{cmd} changed something");
    }
    // Its own record still verifies.
    let o = pdguard(&["image", "verify", s(&b)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// The record of an image of the same name in another directory passes the thin-disk path
/// check once `--thin-dir` points there (as that check's message suggests); the sampled
/// sectors still tell it apart: "does not belong" (exit 1), not "tampered" (exit 3).
#[test]
fn verify_with_a_same_named_images_record_says_it_does_not_belong() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("one"), dir.path().join("two"));
    let (a, b) = (d1.join("disk.img"), d2.join("disk.img"));
    for p in [&a, &b] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        random_file(p, 256 << 10);
        let o = pdguard(&["image", "seal", s(p), "--profile", "patent"]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    let foreign = dir.path().join("foreign.pdguard");
    std::fs::copy(record_of(&b), &foreign).unwrap();
    let before = state(&a);
    for cmd in ["verify", "unseal"] {
        // `unseal` is pointed at the other image's thin-disk directory, as the thin-path
        // check's message suggests; `verify` touches no thin disk and takes no such flag.
        let mut args = vec!["image", cmd, s(&a), "--record", s(&foreign)];
        if cmd == "unseal" {
            args.extend(["--thin-dir", s(&d2)]);
        }
        let o = pdguard(&args);
        assert_eq!(code(&o), 1, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("does not belong to image"),
            "{cmd}: {}",
            stderr(&o)
        );
        assert_eq!(state(&a), before, "{cmd} changed something");
    }
}

/// A container up on a tampered sealed disk fails (exit 3, verification failed, naming it)
/// and leaves no container behind.
#[test]
fn a_failed_container_up_leaves_no_container_running() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir.path().join("state"), &[], &[]);
    let img = dir.path().join("d1.img");
    d.ok_text(&["disk", "create", "d1", "--size", "1M", "--path", s(&img)]);
    random_file(&img, 1 << 20);
    d.ok_text(&["disk", "seal", "d1"]);
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[300_000] ^= 0x40;
    std::fs::write(&img, &bytes).unwrap();
    let o = d.cli(&["container", "up", "c1", "--disk", "d1"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("failed verification"), "{}", stderr(&o));
    let ls = d.ok_text(&["container", "ls", "--all"]);
    assert!(!ls.contains("c1"), "the failed container up left c1: {ls}");
}

// ---- the daemon explains itself ----

#[test]
fn the_daemon_says_where_it_is_and_a_second_one_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut d = start(&state, &[], &[]);
    let log = d.log();
    assert!(
        log.contains(&format!("export PDGUARD_STATE_DIR={}", s(&state))),
        "{log}"
    );
    assert!(log.contains("pdguard disk create"), "{log}");
    assert!(log.contains("patent profile"), "{log}");
    let o = Serve::new(&state).profile("patent").refused();
    assert_eq!(code(&o), 1);
    let want = format!(
        "another pdguard daemon (pid {}) serves {}",
        d.pid(),
        s(&state)
    );
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
    assert!(
        state.join("pdguard.sock").exists(),
        "the second daemon took the socket"
    );
    d.ok_text(&["status"]);
    assert_eq!(d.terminate(), 0);
    assert!(
        !state.join("pdguard.sock").exists(),
        "the socket was left behind"
    );
}

/// SIGTERM with a seal in flight: exit 0, socket removed; the next start says what it
/// resumes, and the disk comes back bit-exact.
#[test]
fn sigterm_with_a_job_in_flight_exits_0_and_the_job_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = dir.path().join("d1.img");
    let pause = dir.path().join("paused");
    let mut d = start(
        &state,
        &["--grace", "100ms"],
        &[
            ("PDGUARD_TEST_PAUSE_AT", "gather:65536"),
            ("PDGUARD_TEST_PAUSE_FILE", s(&pause)),
        ],
    );
    d.ok_text(&["disk", "create", "d1", "--size", "2M", "--path", s(&img)]);
    random_file(&img, 2 << 20);
    let plain = digest(&img);
    d.ok_text(&["container", "up", "c1", "--disk", "d1"]);
    let down = d.ok_text(&["container", "down", "c1", "--removed"]);
    assert!(down.contains("d1: grace until"), "{down}");
    let t0 = Instant::now();
    while !pause.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.terminate(), 0, "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("seal (pass gather) of d1 did not finish"),
        "{log}"
    );
    assert!(!state.join("pdguard.sock").exists(), "socket left: {log}");
    drop(d);
    let d = start(&state, &[], &[]);
    wait(&d, "d1", "sealed");
    let log = d.log();
    assert!(
        log.contains("resuming seal of d1 from seal-gather"),
        "{log}"
    );
    let up = d.ok_text(&["container", "up", "c2", "--disk", "d1"]);
    assert!(up.contains("d1: unsealed and verified in"), "{up}");
    assert_eq!(digest(&img), plain);
}

/// SIGTERM while a client waits for a job (`disk seal` blocks until the seal ends): the
/// daemon still stops, exit 0, within its bounded waits.
#[test]
fn sigterm_with_a_client_waiting_for_a_job_still_stops() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pause = dir.path().join("paused");
    let mut d = start(
        &state,
        &[],
        &[
            ("PDGUARD_TEST_PAUSE_AT", "scatter:0"),
            ("PDGUARD_TEST_PAUSE_FILE", s(&pause)),
        ],
    );
    d.ok_text(&["disk", "create", "d1", "--size", "1M"]);
    let mut client = Command::new(bin())
        .args(["disk", "seal", "d1", "--state-dir", s(&state)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !pause.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    assert_eq!(d.terminate(), 0, "{}", d.log());
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(!state.join("pdguard.sock").exists());
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn names_sort_naturally_and_removed_containers_leave_the_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir.path().join("state"), &[], &[]);
    for n in ["d10", "d2", "d1"] {
        d.ok_text(&["disk", "create", n, "--size", "64K"]);
    }
    let ls = d.ok_text(&["disk", "ls"]);
    let order: Vec<&str> = ls
        .lines()
        .skip(1)
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert_eq!(order, ["d1", "d2", "d10"], "{ls}");
    d.ok_text(&["container", "up", "c1", "--disk", "d1"]);
    d.ok_text(&["container", "up", "c2", "--disk", "d2"]);
    d.ok_text(&["container", "down", "c1", "--removed"]);
    for cmd in [&["container", "ls"][..], &["status"][..]] {
        let out = d.ok_text(cmd);
        assert!(!out.contains("c1 "), "{cmd:?}: {out}");
        assert!(out.contains("c2 "), "{cmd:?}: {out}");
        let mut all = cmd.to_vec();
        all.push("--all");
        assert!(d.ok_text(&all).contains("c1 "), "{cmd:?} --all");
    }
}

// ---- scripts can wait ----

#[test]
fn disk_wait_times_out_with_124_and_rejects_a_bad_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir.path().join("state"), &[], &[]);
    d.ok_text(&["disk", "create", "d1", "--size", "64K"]);
    d.ok_text(&[
        "disk",
        "wait",
        "d1",
        "--state",
        "available",
        "--timeout",
        "1s",
    ]);
    let t0 = Instant::now();
    let o = d.cli(&[
        "disk",
        "wait",
        "d1",
        "--state",
        "sealed",
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(stderr(&o).contains("still available"), "{}", stderr(&o));
    let o = d.cli(&[
        "disk",
        "wait",
        "d1",
        "--state",
        "sealed",
        "--timeout",
        "soon",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = d.cli(&["disk", "wait", "nope", "--state", "sealed"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
}

// ---- recovery when a sealed image is damaged ----

fn force_case(profile: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "master.key");
    let img = dir.path().join("i.img");
    let sector = 512;
    let original = tagged_image(&img, 512, sector, 7);
    let k = ["--key-file", s(&key)];
    let with_key = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&k);
        pdguard(&a)
    };
    let o = with_key(&["image", "seal", s(&img), "--profile", profile]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // Undamaged: --force writes the verified plaintext, exit 0.
    let good = dir.path().join("good.img");
    let o = with_key(&["image", "unseal", s(&img), "--force", "--output", s(&good)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&good).unwrap(), original);
    // One flipped byte in the middle of the sealed image.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[100 * sector + 37] ^= 1;
    std::fs::write(&img, &bytes).unwrap();
    let o = with_key(&["image", "unseal", s(&img)]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let before = state(&img);
    let out = dir.path().join("rescued.img");
    let o = with_key(&["image", "unseal", s(&img), "--force", "--output", s(&out)]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("did not verify"), "{}", stderr(&o));
    assert_eq!(
        state(&img),
        before,
        "--force changed the sealed image or record"
    );
    let rescued = std::fs::read(&out).unwrap();
    let bad: Vec<usize> = (0..512)
        .filter(|i| rescued[i * sector..(i + 1) * sector] != original[i * sector..(i + 1) * sector])
        .collect();
    assert_eq!(bad.len(), 1, "{profile}: sectors that differ: {bad:?}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // Never overwrites; --output without --force is a usage error.
    let o = with_key(&["image", "unseal", s(&img), "--force", "--output", s(&out)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), rescued);
    let other = dir.path().join("other.img");
    let o = with_key(&["image", "unseal", s(&img), "--output", s(&other)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!other.exists());
    assert_eq!(state(&img), before);
}

#[test]
fn unseal_force_writes_best_effort_plaintext_and_leaves_the_seal_patent() {
    force_case("patent");
}

#[test]
fn unseal_force_writes_best_effort_plaintext_and_leaves_the_seal_secure() {
    force_case("secure");
}
