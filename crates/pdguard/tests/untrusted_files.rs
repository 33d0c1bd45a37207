//! Nothing read from disk steers or hangs pdguard (issue 16, items 2 and 3). Each test
//! plays an attacker (or a careless operator) who can plant files beside a disk:
//!
//! - a disk's file swapped for a symbolic link after adoption: the daemon's seal leaves
//!   the link's target byte-identical and the disk `failed`, naming both identities;
//! - a FIFO where pdguard reads a file (the seal record, the key slot, the API token
//!   file): refused within a second with one line naming the file, offline and in the
//!   daemon, whose job slot and image lock are free again, and which, restarted, binds
//!   its API instead of hanging before it.
//!
//! Every command runs under a deadline, so that a regression shows as a failure naming
//! the command instead of a hung test.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// How long a refusal may take.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);
/// After this the command is killed and the test fails as hung.
const HUNG_AFTER: Duration = Duration::from_secs(10);

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

/// Run `pdguard ARGS` and wait at most [`HUNG_AFTER`] for it; its output and how long it
/// took. A command still running then is killed and the test fails.
fn bounded(args: &[&str]) -> (Output, Duration) {
    pdguard_within(HUNG_AFTER, args)
}

/// `args` must be refused (exit 1) within [`REFUSED_WITHIN`], on one line naming `file`
/// and containing `cause`.
fn refused_quickly(args: &[&str], file: &Path, cause: &str) -> String {
    let (o, took) = bounded(args);
    refusal(args, &o, took, file, cause)
}

/// What [`refused_quickly`] checks, of a command that ran `args` and took `took`.
fn refusal<A: std::fmt::Debug>(
    args: A,
    o: &Output,
    took: Duration,
    file: &Path,
    cause: &str,
) -> String {
    let err = stderr(o);
    assert_eq!(code(o), 1, "{args:?} was not refused with exit 1: {err}");
    assert!(
        took < REFUSED_WITHIN,
        "{args:?} took {took:?} to refuse: {err}"
    );
    assert!(
        err.contains(s(file)),
        "{args:?} does not name {file:?}: {err}"
    );
    assert!(
        err.contains(cause),
        "{args:?} does not say {cause:?}: {err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    err
}

#[test]
fn a_fifo_at_the_record_path_is_refused_by_every_image_command() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 64, 512, 1);
    let key = keygen(dir.path(), "master.key");
    let before = digest(&img);
    let record = record_of(&img);
    mkfifo(&record);
    for cmd in ["inspect", "verify", "unseal", "seal"] {
        let mut args = vec!["image", cmd, s(&img)];
        if cmd != "inspect" {
            args.extend(["--key-file", s(&key)]);
        }
        if cmd == "seal" {
            args.push("--quiet");
        }
        refused_quickly(&args, &record, "FIFO");
        assert_eq!(digest(&img), before, "image {cmd} changed the image");
        let t = std::fs::symlink_metadata(&record).unwrap().file_type();
        assert!(
            std::os::unix::fs::FileTypeExt::is_fifo(&t),
            "image {cmd} replaced the FIFO"
        );
    }
    // An image that is a FIFO is refused the same way, before it is read.
    let fifo_img = dir.path().join("fifo.img");
    mkfifo(&fifo_img);
    let args = [
        "image",
        "seal",
        s(&fifo_img),
        "--key-file",
        s(&key),
        "--quiet",
    ];
    refused_quickly(&args, &fifo_img, "FIFO");
}

#[test]
fn a_fifo_key_slot_is_refused_by_unseal_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    tagged_image(&img, 64, 512, 2);
    let key = keygen(dir.path(), "master.key");
    let o = pdguard(&["image", "seal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "seal: {}", stderr(&o));
    let mut slot = record_of(&img).into_os_string();
    slot.push(".key");
    let slot = PathBuf::from(slot);
    assert!(
        slot.exists(),
        "the secure seal made no key slot at {slot:?}"
    );
    let kept = dir.path().join("slot.kept");
    std::fs::rename(&slot, &kept).unwrap();
    mkfifo(&slot);
    let before = state(&img);
    for cmd in ["unseal", "verify"] {
        refused_quickly(
            &["image", cmd, s(&img), "--key-file", s(&key)],
            &slot,
            "FIFO",
        );
        assert_eq!(
            state(&img),
            before,
            "image {cmd} changed the image or record"
        );
    }
    // The real slot back: everything works again, so the refusal was the FIFO's.
    std::fs::remove_file(&slot).unwrap();
    std::fs::rename(&kept, &slot).unwrap();
    let o = pdguard(&["image", "unseal", s(&img), "--key-file", s(&key), "--quiet"]);
    assert_eq!(code(&o), 0, "unseal with the real slot: {}", stderr(&o));
}

#[test]
fn a_fifo_api_token_file_is_refused_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    mkfifo(&token);
    let state = dir.path().join("state");
    let serve = Serve::new(&state).api_tcp().api_token_file(&token);
    let t = Instant::now();
    let o = serve.clone().refused();
    let err = refusal(serve, &o, t.elapsed(), &token, "FIFO");
    assert!(err.contains("API token file"), "{err}");
    // Nor does a client wait on it.
    refused_quickly(
        &[
            "status",
            "--api",
            "tcp:127.0.0.1:9",
            "--api-token-file",
            s(&token),
        ],
        &token,
        "FIFO",
    );
}

/// Start a daemon and fail unless its API answers within `within`.
fn start_within(state: &Path, extra: &[&str], within: Duration) -> (Daemon, Duration) {
    let t = Instant::now();
    let d = Serve::new(state).args(extra).ready_within(within).start();
    (d, t.elapsed())
}

/// Whether a process holds an `flock` on the file, tested by taking one without waiting.
fn locked(path: &Path) -> bool {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
}

#[test]
fn a_daemon_with_a_fifo_record_fails_that_disk_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let serve = ["--grace", "0s", "--profile", "patent", "--jobs", "1"];
    let mut d = Daemon::start(&state, &serve);
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    tagged_image(&a, 2048, 512, 3);
    tagged_image(&b, 2048, 512, 4);
    for (name, p) in [("a", &a), ("b", &b)] {
        d.ok(&["disk", "create", name, "--size", "1M", "--path", s(p)]);
    }
    let before = digest(&a);
    let record = record_of(&a);
    mkfifo(&record);
    let (o, took) = bounded(&["disk", "seal", "a", "--state-dir", s(&state)]);
    assert_eq!(code(&o), 1, "disk seal a: {}", stderr(&o));
    assert!(took < Duration::from_secs(5), "disk seal a took {took:?}");
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    let v = d.disk("a");
    assert_eq!(v["state"], "failed", "{v}");
    let why = v["error"].as_str().unwrap_or_default();
    assert!(why.contains(s(&record)) && why.contains("FIFO"), "{v}");
    assert_eq!(digest(&a), before, "the refused seal changed the image");
    // The image lock is free again, and so is the only job slot: another disk seals.
    assert!(!locked(&a), "the failed seal still holds the lock of {a:?}");
    d.ok(&["disk", "seal", "b"]);
    assert_eq!(d.disk("b")["state"], "sealed");
    // A container that reclaims it is refused, not left waiting on the FIFO.
    let (o, took) = bounded(&[
        "container",
        "up",
        "c1",
        "--disk",
        "a",
        "--state-dir",
        s(&state),
    ]);
    assert_eq!(code(&o), 1, "container up: {}", stderr(&o));
    assert!(took < Duration::from_secs(5), "container up took {took:?}");
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    assert_eq!(d.disk("a")["state"], "failed");

    // A restart with the FIFO still there binds its API and keeps the disk failed.
    d.kill9();
    let (d, took) = start_within(&state, &serve, Duration::from_secs(10));
    let v = d.disk("a");
    assert_eq!(v["state"], "failed", "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("FIFO"),
        "{v}"
    );
    eprintln!("restart with a FIFO record answered after {took:?}");
    assert!(!locked(&a));
    assert_eq!(digest(&a), before);
}

/// A disk file in a directory another user can write, swapped for a symbolic link to a
/// root-only file after adoption: the seal refuses it, naming both identities, and the
/// link's target keeps every byte.
#[test]
fn a_disk_file_swapped_for_a_symlink_is_never_sealed_through_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start(&state, &["--grace", "0s", "--profile", "patent"]);
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::os::unix::fs::chown(&shared, Some(65534), Some(65534)).unwrap();
    let img = shared.join("e1.img");
    tagged_image(&img, 2048, 512, 5);
    d.ok(&["disk", "create", "e1", "--size", "1M", "--path", s(&img)]);
    d.ok(&["container", "up", "c1", "--disk", "e1"]);
    let adopted = std::fs::metadata(&img).unwrap();

    let secret_dir = dir.path().join("root-only");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = secret_dir.join("secret");
    tagged_image(&secret, 128, 512, 6); // 64 KiB
    let secret_before = std::fs::read(&secret).unwrap();
    let secret_meta = std::fs::metadata(&secret).unwrap();

    // The attacker's move: the adopted file is replaced by a link.
    std::fs::remove_file(&img).unwrap();
    std::os::unix::fs::symlink(&secret, &img).unwrap();
    d.ok(&["container", "down", "c1", "--removed"]);
    let v = d.wait_state("e1", "failed", 20);
    let why = v["error"].as_str().unwrap_or_default().to_string();
    assert!(
        std::fs::read(&secret).unwrap() == secret_before,
        "the link's target was written: {why}"
    );
    assert!(!record_of(&secret).exists() && !record_of(&img).exists());
    assert!(
        why.contains(&format!("inode {}", adopted.ino())),
        "the error does not name the adopted file's identity: {why}"
    );
    assert!(
        why.contains(&format!("inode {}", secret_meta.ino())) && why.contains("symbolic link"),
        "the error does not name what the path names now: {why}"
    );
    assert!(
        why.contains("1048576 bytes") && why.contains("65536 bytes"),
        "{why}"
    );

    // A file renamed over it (no link at all) is refused the same way, by identity.
    std::fs::remove_file(&img).unwrap();
    let other = shared.join("other.img");
    tagged_image(&other, 2048, 512, 7);
    let other_before = std::fs::read(&other).unwrap();
    std::fs::rename(&other, &img).unwrap();
    let o = d.cli(&["disk", "seal", "e1"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("inode {}", adopted.ino())),
        "{}",
        stderr(&o)
    );
    assert!(
        std::fs::read(&img).unwrap() == other_before,
        "the impostor file was sealed"
    );
    assert_eq!(d.disk("e1")["state"], "failed");
}
